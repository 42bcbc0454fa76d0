"""Read a torch.distributed.checkpoint (DCP) directory for :func:`ftrain.finetune.load_pretrained`.

DCP's format stays DCP's business: its own ``FileSystemReader`` and
``torch.distributed.checkpoint.load`` read the data (tensors through
``torch.load(weights_only=True)``) and reshard it into whatever the model holds
(whole tensors, or the local shards of FSDP2's DTensors). ftrain adds two things:

* The ``.metadata`` file is a plain pickle that DCP's reader would
  ``pickle.load``; ftrain unpickles it with an allowlist of DCP's own metadata
  types (:class:`MetadataUnpickler`), so a hostile directory cannot run code.
* Non-tensor entries (DCP stores them as pickles that its planner loads with
  ``weights_only=False``) are never requested: only tensors are read.

:func:`index` lists the tensors without reading any data, so that every check
happens before the first byte is loaded; :func:`read` then loads into fresh
buffers shaped like the model's tensors, never into the model itself.

Process-safety: under an initialized process group :func:`read` is a
collective (DCP plans the load on all ranks); every rank must call it with the
same keys, which it does when every rank calls load_pretrained with the same
arguments on the same model.
"""
from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from ftrain.errors import CorruptCheckpoint, FtrainError

#: The file that makes a directory a DCP checkpoint (written last by ``torch.distributed.checkpoint.save``).
METADATA = ".metadata"

_META_MODULE = "torch.distributed.checkpoint.metadata"
#: Globals a DCP ``.metadata`` pickle names besides the classes of :data:`_META_MODULE` and torch's dtypes;
#: constructing any of them from pickled arguments runs no code of the file's choosing.
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a torch.layout by name
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),  # storage_meta.checkpoint_id
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}


def is_dcp_dir(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file()


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: dataclasses and enums of DCP's metadata module, sizes, dtypes, layouts."""

    def find_class(self, module: str, name: str) -> Any:
        if module == _META_MODULE:
            import torch.distributed.checkpoint.metadata as meta

            if isinstance(getattr(meta, name, None), type):
                return getattr(meta, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name}")


def read_metadata(file: IO[bytes], where: str) -> Any:
    """DCP's ``Metadata`` object from an open ``.metadata`` file, unpickled through the allowlist."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        md = MetadataUnpickler(file).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("global "):
            raise FtrainError(
                f"{where} needs code execution to load (it pickles {str(e).removeprefix('global ')}, not one of "
                "DCP's metadata types); ftrain reads DCP metadata only through an allowlist. If you trust it, "
                "load it with torch.distributed.checkpoint.load yourself and pass the tensors to load_pretrained "
                "as a mapping") from None
        raise CorruptCheckpoint(where, f"not a readable DCP metadata file ({e})") from None
    except (EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError) as e:
        raise CorruptCheckpoint(where, f"not a readable DCP metadata file ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise CorruptCheckpoint(where, f"not DCP metadata (it holds a {type(md).__name__})")
    return md


def _reader(path: Path) -> Any:
    """DCP's own ``FileSystemReader`` for ``path``, reading its metadata through :func:`read_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            rank = kwargs.get("rank")  # DCP's per-rank metadata name, used when it loads without collectives
            name = METADATA if rank is None else f"__{rank}{METADATA}"
            file = Path(self.path) / name
            with open(file, "rb") as f:
                md = read_metadata(f, str(file))
            if getattr(md, "storage_meta", None) is None:  # what DCP's reader does after its own unpickling
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(path)


def index(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({key: meta-device tensor of the stored global shape and dtype}, [non-tensor keys, not readable])``.

    Meta tensors carry shape and dtype without data, so the caller's key matching and shape checks run on them
    unchanged; :func:`read` later maps each back to its key by identity.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    file = path / METADATA
    try:
        with open(file, "rb") as f:
            md = read_metadata(f, str(file))
    except OSError as e:
        raise CorruptCheckpoint(str(file), f"cannot read it ({e.strerror or e})") from None
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, item in md.state_dict_metadata.items():
        if not isinstance(key, str):
            raise CorruptCheckpoint(str(file), f"not a flat state dict: key {key!r} is not a string")
        if isinstance(item, TensorStorageMetadata):
            tensors[key] = torch.empty(tuple(item.size), dtype=item.properties.dtype, device="meta")
        else:
            skipped.append(key)
    return tensors, skipped


def read(path: Path, stored: Mapping[str, torch.Tensor], wanted: Mapping[str, torch.Tensor],
         like: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Load the tensors ``wanted`` (``{model key: a value of stored}``, ``stored`` from :func:`index`) with DCP.

    Each lands in a new buffer shaped like the model's value ``like[key]`` (a DTensor buffer for a DTensor, so
    DCP reads only this rank's shard); dtypes are cast to the model's by DCP's copy. Collective when
    torch.distributed is initialized. Raises :class:`CorruptCheckpoint` when DCP cannot read the data.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    source = {id(t): key for key, t in stored.items()}
    buffers: dict[str, torch.Tensor] = {}
    request: dict[str, torch.Tensor] = {}
    for key, meta in wanted.items():
        have = like.get(key)
        buf = (torch.empty_like(have.detach()) if isinstance(have, torch.Tensor)
               else torch.empty_like(meta, device="cpu"))  # a tensor for a module's extra state: its own judge
        buffers[key] = buf
        request[source[id(meta)]] = buf
    distributed = dist.is_available() and dist.is_initialized()
    try:
        with _quiet():
            dcp.load(request, storage_reader=_reader(path), no_dist=not distributed)
    except (CheckpointException, RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise CorruptCheckpoint(str(path), f"DCP could not read its tensors ({type(e).__name__}: {e})") from None
    return buffers


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # DCP warns that it "assumes a single process" even when told so with no_dist=True.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        yield
