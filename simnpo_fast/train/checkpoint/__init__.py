"""Checkpoints: torch distributed checkpoints (DCP) of model + optimizer, written atomically, verified before
use, read without unpickling untrusted bytes; HF export.

Layout under ``<output_dir>/checkpoints``::

    step_00000010/            one complete checkpoint (renamed from step_00000010.tmp only once complete)
        .metadata, __*.distcp   DCP shards of {"model", "optim"} (any world size can reload them)
        trainer_state.json      step, run id, sampler position, scheduler, the run's config (rank 0)
        config.yaml             the resolved config of the run that wrote it
        tensors.pt              rank-0 tensors (e.g. the cached NPO reference log-likelihoods)
        rng_rank<r>.pt          each rank's RNG state
        MANIFEST.json           run id, step, and the size and SHA-256 of every file above
        COMPLETE                written last, before the rename: step + SHA-256 of MANIFEST.json
    step_00000008.rejected/   a checkpoint that failed verification on resume, moved aside (never deleted)
    latest                    name of the newest complete checkpoint (informational; resume scans the folder)

A crash while writing leaves only a ``*.tmp`` folder, which is ignored (and removed by the next save), so the
last good checkpoint is never lost.

**Verification** (:func:`verify_checkpoint`, run before a checkpoint is used): the ``COMPLETE`` marker's hash
matches ``MANIFEST.json``; the manifest names this run; every listed file exists with its recorded size and
SHA-256 (the files are split over the ranks, so each rank hashes ``1/world`` of the bytes); the DCP metadata
parses with the restricted reader below and names only listed files; ``trainer_state.json`` parses; the RNG
and tensor files load with ``torch.load(weights_only=True)``. Any failure names the checkpoint and the file.

**Trust boundary.** The manifest detects corruption (truncation, a flipped bit, a missing file); it is not a
signature: whoever can write the folder can rewrite the manifest too. What keeps a crafted checkpoint from
running code is the reader: resume never calls ``pickle.load`` on checkpoint bytes. DCP's own reader unpickles
``.metadata`` with ``pickle.load`` and non-tensor entries with ``torch.load(weights_only=False)``; here
``.metadata`` goes through an unpickler that resolves only DCP's metadata dataclasses, ``torch.Size``, dtypes
and layouts (anything else is refused before it is called), and the non-tensor entries, the RNG states and the
tensors through ``torch.load(weights_only=True)``. Tensors are read by DCP with ``weights_only=True`` already.
A crafted checkpoint can still hold wrong *numbers*: load only checkpoints of runs you trust to be what they
claim.
"""

from .export import export_hf, full_model_state_dict
from .files import (MANIFEST, MARKER, METADATA_FILE, REJECTED_SUFFIX, STATE_FILE, latest_checkpoint, list_checkpoints,
                    move_aside, rng_state, set_rng_state, sha256_file)
from .safe_read import SafeFileSystemReader, SafeLoadPlanner, read_dcp_metadata
from .save import save_checkpoint
from .verify import Verification, load_checkpoint, verify_checkpoint

__all__ = ["MANIFEST", "MARKER", "METADATA_FILE", "REJECTED_SUFFIX", "STATE_FILE", "SafeFileSystemReader",
           "SafeLoadPlanner", "Verification", "export_hf", "full_model_state_dict", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "move_aside", "read_dcp_metadata", "rng_state", "save_checkpoint",
           "set_rng_state", "sha256_file", "verify_checkpoint"]
