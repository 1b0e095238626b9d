"""Entry points own the process group they create: it is destroyed when the command returns or raises, while a
group that existed before the command is left alone."""
import pytest
import torch.distributed as dist

from simnpo_fast.distributed import init_distributed, owned_process_group, shutdown_distributed


@pytest.fixture(autouse=True)
def _no_group_leaks():
    assert not dist.is_initialized()
    yield
    if dist.is_initialized():  # keep a failing test from poisoning the others
        dist.destroy_process_group()


def test_group_created_inside_is_destroyed_on_return():
    with owned_process_group():
        init_distributed("cpu")
        assert dist.is_initialized() and dist.get_world_size() == 1
    assert not dist.is_initialized()


def test_group_created_inside_is_destroyed_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with owned_process_group():
            init_distributed("cpu")
            raise RuntimeError("boom")
    assert not dist.is_initialized()


def test_existing_group_is_left_alone():
    init_distributed("cpu")
    with owned_process_group():
        pass
    assert dist.is_initialized()
    shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()  # nothing to do: no error
