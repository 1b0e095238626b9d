"""Backend dispatch. One backend = one module implementing the contract of ``backends/base.py`` on one
parameter object (:class:`HeadInputs`); ``get_backend`` picks one per call.

Order of precedence: the ``backend=`` argument, then ``SIMNPO_FAST_BACKEND``, then the default for the
device (``triton`` for CUDA tensors when Triton imports, ``chunked`` otherwise). ``backend`` may also be a
``Backend`` instance (e.g. ``ReferenceBackend(torch.float64)`` for an fp64 oracle).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Union

import torch

from .base import Backend
from .chunked import ChunkedBackend
from .inputs import GradNeeds, HeadInputs, SeqWeightFn
from .reference import ReferenceBackend
from .tiles import chunk_rows

_FACTORIES: Dict[str, Callable[[], Backend]] = {
    "chunked": ChunkedBackend,
    "reference": ReferenceBackend,
}
_CACHE: Dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    _FACTORIES[name] = factory
    _CACHE.pop(name, None)


def _triton_factory():
    from .triton import TritonBackend  # imported lazily: triton is optional and heavy

    return TritonBackend()


_FACTORIES["triton"] = _triton_factory


def _triton_gemm_factory():
    from .triton import TritonGemmBackend  # lazy, like "triton"; not a default: bench/gpu.py decides

    return TritonGemmBackend()


_FACTORIES["triton-gemm"] = _triton_gemm_factory


def available_backends() -> "list[str]":
    return sorted(_FACTORIES)


def _by_name(name: str) -> Backend:
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; choose one of {available_backends()}")
    if name not in _CACHE:
        _CACHE[name] = _FACTORIES[name]()
    return _CACHE[name]


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def get_backend(backend: Union[None, str, Backend], device: torch.device) -> Backend:
    if isinstance(backend, Backend):
        chosen = backend
    else:
        name = backend or os.environ.get("SIMNPO_FAST_BACKEND") or None
        if name is None:
            name = "triton" if _triton_usable(device) else "chunked"
        chosen = _by_name(name)
    if not chosen.supports(device):
        raise ValueError(
            f"backend {chosen.name!r} cannot run on {device.type} tensors"
            + (" (Triton runs on CPU tensors only with TRITON_INTERPRET=1)" if chosen.name.startswith("triton") else "")
        )
    return chosen


__all__ = [
    "Backend",
    "GradNeeds",
    "HeadInputs",
    "SeqWeightFn",
    "ChunkedBackend",
    "ReferenceBackend",
    "available_backends",
    "chunk_rows",
    "get_backend",
    "register_backend",
]
