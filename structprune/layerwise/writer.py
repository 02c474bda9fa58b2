"""Write a Hugging Face model folder shard by shard, all or nothing.

Tensors arrive one layer at a time and are written as soon as a shard is full, so memory holds at
most one shard. Everything goes into a hidden folder beside the destination, which is renamed into
place only when the index, the config and the other files are written: a failure (an error, a full
disk, an interrupt) leaves no destination folder at all, and the partial one is removed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from ..errors import InvalidOptionError, StructPruneError
from .checkpoint import _DTYPES, HEADER_SIZE_BYTES, INDEX_FILE, SINGLE_FILE

_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}

DEFAULT_SHARD_BYTES = 4 * 2 ** 30  # what transformers' save_pretrained uses by default is 5 GB
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")


class _ShardFile:
    """One safetensors file written tensor by tensor: each tensor's bytes go to disk as it arrives, after room
    left for the header, which is written last (padded with spaces, as the format allows), so a shard never
    sits in memory. safetensors itself only writes whole dicts of tensors, and its Python binding copies
    them to bytes first, which would hold a shard twice."""

    HEADER_ROOM = 64 * 2 ** 10  # bytes; about 300 tensor entries

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "wb")
        self.handle.seek(HEADER_SIZE_BYTES + self.HEADER_ROOM)
        self.entries: Dict[str, Dict[str, Any]] = {}
        self.offset = 0

    def room_for(self, name: str) -> bool:
        return len(self._header(extra=name)) <= self.HEADER_ROOM

    def _header(self, extra: str = "") -> bytes:
        entries = dict(self.entries)
        if extra:
            entries[extra] = {"dtype": "BF16", "shape": [2 ** 40] * 4, "data_offsets": [2 ** 50, 2 ** 50]}
        return json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()

    def write(self, name: str, tensor: torch.Tensor) -> int:
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel():
            self.handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
        size = tensor.numel() * tensor.element_size()
        self.entries[name] = {"dtype": _DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.offset, self.offset + size]}
        self.offset += size
        return size

    def close(self) -> None:
        header = self._header()
        self.handle.seek(0)
        self.handle.write(struct.pack("<Q", self.HEADER_ROOM))
        self.handle.write(header + b" " * (self.HEADER_ROOM - len(header)))
        self.handle.close()


class ShardWriter:
    """Collect tensors into shards of at most ``max_shard_bytes`` and move the folder into place on
    :meth:`commit`.

    Use as a context manager: leaving it by an exception removes everything written.
    """

    def __init__(self, destination: "str | Path", max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.destination = Path(destination)
        if self.destination.exists():
            raise InvalidOptionError(f"{self.destination} already exists; pass a new folder (nothing is overwritten)")
        parent = self.destination.parent
        if not parent.is_dir():
            raise InvalidOptionError(f"cannot write {self.destination}: its folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise InvalidOptionError(f"cannot write {self.destination}: {parent} is not writable")
        if max_shard_bytes <= 0:
            raise InvalidOptionError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.max_shard_bytes = max_shard_bytes
        self.staging = parent / f".{self.destination.name}.partial-{os.getpid()}"
        self._current: Optional[_ShardFile] = None
        self._shards: List[List[str]] = []
        self.bytes_written = 0
        self.payload_bytes = 0  # tensor bytes, what an index's total_size counts

    def __enter__(self) -> "ShardWriter":
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is not None:
            if self._current is not None:
                self._current.handle.close()
            shutil.rmtree(self.staging, ignore_errors=True)

    @contextlib.contextmanager
    def _disk(self) -> Iterator[None]:
        """A failed write (a full disk above all) becomes one clear error."""
        try:
            yield
        except OSError as error:
            reason = "the disk is full" if error.errno == errno.ENOSPC else f"{type(error).__name__}: {error}"
            raise StructPruneError(f"writing {self.destination} failed ({reason}); nothing was left behind") from error

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor into the current shard (starting a new one when it is full)."""
        size = tensor.numel() * tensor.element_size()
        current = self._current
        if current is not None and (current.offset + size > self.max_shard_bytes or not current.room_for(name)):
            self.flush()
        with self._disk():
            if self._current is None:
                self._current = _ShardFile(self.staging / f"shard-{len(self._shards) + 1:05d}.safetensors")
            self.payload_bytes += self._current.write(name, tensor)

    def flush(self) -> None:
        """Finish the current shard."""
        if self._current is None:
            return
        with self._disk():
            self._current.close()
        self.bytes_written += self._current.path.stat().st_size
        self._shards.append(list(self._current.entries))
        self._current = None

    def _name_shards(self) -> Optional[Dict[str, str]]:
        """Rename the shards to Hugging Face's names; the weight map when there are several."""
        count = len(self._shards)
        if count == 1:
            (self.staging / "shard-00001.safetensors").rename(self.staging / SINGLE_FILE)
            return None
        weight_map = {}
        for number, names in enumerate(self._shards, 1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.staging / f"shard-{number:05d}.safetensors").rename(self.staging / final)
            weight_map.update({name: final for name in names})
        return weight_map

    def commit(self, files_from: Optional[Path] = None, config: Any = None,
               check: Optional[Callable[[Path], None]] = None) -> Path:
        """Write the last shard, the index, ``config`` (``save_pretrained``) and every non-weight file of
        ``files_from`` (tokenizer, generation config); run ``check`` on the staged folder; then move the folder
        into place."""
        self.flush()
        if not self._shards:
            raise StructPruneError("no tensor was written; nothing to commit")
        weight_map = self._name_shards()
        if weight_map is not None:
            index = {"metadata": {"total_size": self.payload_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if files_from is not None:
            for item in sorted(files_from.iterdir()):
                if item.is_file() and item.suffix not in WEIGHT_SUFFIXES and item.name not in (INDEX_FILE,
                                                                                                "config.json"):
                    shutil.copy2(item, self.staging / item.name)
        if config is not None:
            config.save_pretrained(str(self.staging))
        if check is not None:
            check(self.staging)
        if self.destination.exists():
            raise InvalidOptionError(f"{self.destination} appeared while pruning; nothing was overwritten")
        self.staging.rename(self.destination)
        return self.destination


__all__ = ["ShardWriter", "DEFAULT_SHARD_BYTES"]
