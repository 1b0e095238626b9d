"""Test configuration. TRITON_INTERPRET must be set before any Triton kernel module is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

TOFU_DIR = os.environ.get("SIMNPO_FAST_TOFU_DIR", "")


@pytest.fixture
def tofu_dir():
    """Path of the real TOFU JSONL files (set SIMNPO_FAST_TOFU_DIR; `make test` does). Skips when absent."""
    if not TOFU_DIR or not os.path.exists(os.path.join(TOFU_DIR, "forget10.json")):
        pytest.skip("SIMNPO_FAST_TOFU_DIR is not set to the TOFU data folder")
    return TOFU_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _process_group_per_test():
    """A test that calls ``train()`` in this process joins a (1-process) gloo group, as a Python user's script
    does; like the command-line entry points (``distributed.owned_process_group``), each test shuts down a group
    it created, so the next test starts without one (tests/trainer/test_distributed_teardown.py checks that)."""
    from simnpo_fast.distributed import owned_process_group

    with owned_process_group():
        yield
