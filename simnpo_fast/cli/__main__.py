"""``python -m simnpo_fast.cli ...`` and ``torchrun ... -m simnpo_fast.cli unlearn ...``: the `simnpo-fast` command."""
import sys

from . import main

sys.exit(main())
