"""A run folder belongs to one run: see :mod:`simnpo_fast.train.run_folder` and :mod:`simnpo_fast.train.run_lock`
(this name is kept for importers)."""
from .train.run_folder import (CHECKPOINT_DIR, KEPT_FOR_A_FRESH_RUN, REPLACED_DIR, RESUME_MAY_CHANGE,  # noqa: F401
                               RUN_FILE, RunFolder, config_differences, open_run, read_run_file, write_run_file)
from .train.run_lock import LOCK_FILE, RunLock, lock_is_stale, read_lock  # noqa: F401
