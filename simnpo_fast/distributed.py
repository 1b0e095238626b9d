"""Process group setup and FSDP2 / activation checkpointing / compile application (torchtitan style).

* :func:`init_distributed` -- ``env://`` under torchrun (gloo on CPU, nccl on GPU); without torchrun a world of
  one process (an in-memory store, no port), so single-process runs take the very same FSDP2 code path.
* :func:`shutdown_distributed` -- end-of-program teardown (barrier, ``destroy_process_group``, ``gc.collect``), so
  no live process group reaches interpreter finalization, where gloo can abort an otherwise finished job.
* :func:`apply_fsdp` -- ``fully_shard`` on every decoder layer, ``[norm, lm_head]`` as one unit (the LM head
  stays in the root unit with the embeddings when they are tied), then the root. Gradients are *summed* over
  ranks (divide factor 1): the trainer already divides every loss by the global sequence / token counts.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Initialise (or reuse) the default process group and pick this rank's device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device != "auto" and device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} requested but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout,
                                    device_id=dev if use_cuda else None)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    else:
        backend = dist.get_backend()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def shutdown_distributed(wait: bool = True) -> None:
    """Destroy the default process group (no-op when none is initialised).

    ``wait=True`` first holds a barrier, so no rank tears its connections down while a peer is still inside the
    last collective; pass ``wait=False`` on an error path, where a peer may never reach the barrier. The
    ``gc.collect()`` releases process-group objects kept alive only by reference cycles now, while the
    interpreter is whole: a group that survives into interpreter finalization can abort the process after the
    job's results were written ("terminate called without an active exception", SIGABRT; pytorch issues
    65231 and 190489), which torchrun then reports as a failed job.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()


@contextlib.contextmanager
def owned_process_group():
    """Context of a command-line entry point: a process group that the command initialises inside the block is
    shut down when it leaves (barrier on success only). A group that existed before is left alone."""
    existed = dist.is_available() and dist.is_initialized()
    ok = False
    try:
        yield
        ok = True
    finally:
        if not existed:
            shutdown_distributed(wait=ok)


def rank() -> int:
    """This process's rank in the default process group (0 when none is initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes in the default process group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn, is_main: Optional[bool] = None):
    """Run ``fn`` on rank 0 only and hand its result to every rank; when it raises, rank 0 re-raises the error
    and every other rank raises the same :mod:`simnpo_fast.errors` class with the same message (any other type
    as a :class:`~simnpo_fast.errors.RankZeroError` with its exit code), so no rank waits forever at the next
    collective."""
    from . import errors as E

    if is_main is None:
        is_main = rank() == 0
    box, err = None, None
    if is_main:
        try:
            box = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
            err = e
            code, kind = E.classify(e)
            box = ("err", f"{e}", code, kind, type(e).__module__, type(e).__name__)
    box = broadcast_object(box)
    if err is not None:
        raise err
    if box[0] == "err":
        _, msg, code, kind, module, name = box
        cls = getattr(E, name, None) if module == E.__name__ else None
        if isinstance(cls, type) and issubclass(cls, E.SimnpoError) and cls is not E.RankZeroError:
            raise cls(msg)  # the same class as on rank 0
        raise E.RankZeroError(msg, code, kind)
    return box[1]


def mixed_precision_policy(device: torch.device, mode: str = "auto"):
    """bf16 params / fp32 gradient reduction on GPU (``mode='auto'`` or ``'bf16'``), none on CPU or ``'no'``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mode == "no" or (mode == "auto" and device.type != "cuda"):
        return MixedPrecisionPolicy()
    if mode not in ("auto", "bf16"):
        raise ValueError(f"mixed_precision must be auto, bf16 or no, got {mode!r}")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_ac(model) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant; parameter names unchanged)."""
    model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_compile(model) -> None:
    """``torch.compile`` each decoder layer in place (names unchanged)."""
    for layer in model.decoder_layers():
        layer.compile()


def apply_fsdp(model, *, mp_policy=None, reshard_after_forward: bool = True, cpu_offload: bool = False,
               mesh=None) -> nn.Module:
    """Shard ``model`` (an :class:`~simnpo_fast.model.UnlearnModel`) in place and return it."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kw = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy(),
              offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for layer in model.decoder_layers():
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    norm = model.final_norm()
    if not model.tied:
        tail = [m for m in (norm, model.head) if m is not None]
        # the head runs last in forward and first in backward: keeping it gathered saves one all-gather
        fully_shard(tail if len(tail) > 1 else tail[0], reshard_after_forward=False, **kw)
    # root: embeddings (+ tied LM head, + norm when tied), rotary buffers, anything left
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    for m in model.modules():
        if _is_fsdp(m):
            # plain SUM reduce-scatter (no PREMUL_SUM, which gloo lacks), no division by the world size
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def _is_fsdp(m) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(m, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor (collective: every rank must call it); plain tensors unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm_(params, max_norm: Optional[float], norm_type: float = 2.0) -> torch.Tensor:
    """Total gradient norm over all ranks (DTensor-aware); clips when ``max_norm`` is set and > 0."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type, foreach=None)
    total = full_tensor(total)
    if max_norm is not None and max_norm > 0 and torch.isfinite(total):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=None)
    return total
