"""Reading DCP checkpoints without unpickling untrusted bytes (see the trust boundary in the package docstring).

``.metadata`` goes through an unpickler that resolves only DCP's metadata dataclasses, ``torch.Size``, dtypes
and layouts (anything else is refused before it is called); non-tensor entries through
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io
import os
import pickle

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from .files import MANIFEST, METADATA_FILE

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    *((_DCP_METADATA, n) for n in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                                   "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to a torch.layout, nothing else
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes a DCP ``.metadata`` file holds; any other global is refused *before* it could
    be called (the restricted-globals recipe of the ``pickle`` documentation)."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (not a DCP metadata class)")


def read_dcp_metadata(path: str):
    """The DCP ``Metadata`` of the checkpoint folder ``path``, read with the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(os.path.join(path, METADATA_FILE), "rb") as f:
        md = _MetadataUnpickler(f).load()
    if not isinstance(md, Metadata) or not isinstance(getattr(md, "storage_data", None), dict):
        raise pickle.UnpicklingError(f"not a DCP Metadata object ({type(md).__name__})")
    return md


def check_storage_paths(md, allowed) -> None:
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or rel not in allowed:
            raise ValueError(f"the DCP metadata points at {rel!r}, which is not a file listed in {MANIFEST}")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the ``.metadata`` unpickle replaced by :func:`read_dcp_metadata`; shard paths must
    be files of the manifest."""

    def __init__(self, path: str, allowed_files):
        super().__init__(path)
        self._dir = os.fspath(path)
        self._allowed = frozenset(allowed_files)

    def read_metadata(self, *args, **kwargs):
        if kwargs.get("rank") is not None:
            raise FileNotFoundError("per-rank DCP metadata is not used by simnpo-fast checkpoints")
        from torch.distributed.checkpoint.metadata import StorageMeta

        md = read_dcp_metadata(self._dir)
        check_storage_paths(md, self._allowed)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor entries (optimizer hyper-parameters) are read with
    ``torch.load(weights_only=True)`` instead of ``weights_only=False``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        trusted = io.BytesIO()  # re-serialised by us: the parent's unrestricted torch.load only sees our bytes
        torch.save(obj, trusted)
        trusted.seek(0)
        super().load_bytes(read_item, trusted)
