"""Read a Hugging Face checkpoint folder tensor by tensor, never all of it at once.

A folder holds ``config.json`` and its weights as one ``model.safetensors`` or as shards listed by
``model.safetensors.index.json``. Every shard is checked when the folder is opened (its header
parses and the file is as long as the header says), so a truncated download fails before any work
starts, not an hour into it. Tensors are read with ``safetensors.safe_open`` and the file is closed
after each read: the memory map is released, so what was read stops counting against the process.
"""
from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch

from ..errors import LoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HEADER_SIZE_BYTES = 8
MAX_HEADER_BYTES = 100 * 2 ** 20  # safetensors' own limit on the JSON header

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _read_header(path: Path) -> Dict[str, dict]:
    """The JSON header of one safetensors file, checked against the file's length."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(HEADER_SIZE_BYTES)
        if len(prefix) < HEADER_SIZE_BYTES:
            raise LoadError(f"{path} is not a safetensors file: it is {size} bytes long")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - HEADER_SIZE_BYTES):
            raise LoadError(f"{path} is damaged: its header claims {length} bytes in a {size}-byte file")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LoadError(f"{path} is damaged: its header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise LoadError(f"{path} is damaged: its header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if HEADER_SIZE_BYTES + length + end != size:
        raise LoadError(f"{path} is truncated or damaged: its header describes {HEADER_SIZE_BYTES + length + end} "
                        f"bytes, the file has {size}. Download or copy it again")
    return tensors


class Checkpoint:
    """A Hugging Face model folder whose tensors are read one at a time by name.

    Raises :class:`~structprune.errors.LoadError` when the folder has no config, no safetensors weights
    (``.bin``/``.pt`` checkpoints are pickles: convert them first), or a damaged shard.
    """

    def __init__(self, folder: "str | Path"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise LoadError(f"{self.folder} is not a folder; pass the folder a Hugging Face model was saved to "
                            f"(config.json and *.safetensors)")
        if not (self.folder / "config.json").is_file():
            raise LoadError(f"{self.folder} has no config.json: it is not a Hugging Face model folder")
        self.shard_of: Dict[str, Path] = self._weight_map()
        self._entries: Dict[str, dict] = {}
        self.bytes_read = 0  # tensor bytes read so far (a tensor read twice counts twice)
        for shard in sorted(set(self.shard_of.values())):
            for name, entry in _read_header(shard).items():
                self._entries[name] = entry
        missing = sorted(set(self.shard_of) - set(self._entries))
        if missing:
            raise LoadError(f"{self.folder / INDEX_FILE} lists tensors its shards do not hold: {missing[:5]}")

    def _weight_map(self) -> Dict[str, Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise LoadError(f"{index} is damaged: it has no readable weight_map ({error})") from error
            shards = {name: self.folder / file for name, file in weight_map.items()}
            absent = sorted({str(p.name) for p in shards.values() if not p.is_file()})
            if absent:
                raise LoadError(f"{index} names shards that are not in the folder: {absent[:5]}")
            return shards
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = (f" It has {pickles[:3]}: pickled weights are not read (they can run code); convert them with "
                    f"model.save_pretrained(folder) (safetensors is the default)") if pickles else ""
            raise LoadError(f"{self.folder} has no *.safetensors weights.{hint}")
        return {name: path for path in files for name in _read_header(path)}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def keys(self) -> List[str]:
        return list(self._entries)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(int(d) for d in self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._entries[name]["dtype"]
        if code not in _DTYPES:
            raise LoadError(f"tensor {name} has dtype {code}, which structprune does not read")
        return _DTYPES[code]

    def nbytes(self, name: str) -> int:
        start, end = self._entries[name]["data_offsets"]
        return int(end) - int(start)

    def read(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """The tensors ``names``, each shard opened once and closed after."""
        from safetensors import safe_open

        by_shard: Dict[Path, List[str]] = defaultdict(list)
        for name in names:
            if name not in self._entries:
                raise LoadError(f"the checkpoint in {self.folder} has no tensor {name!r}")
            by_shard[self.shard_of[name]].append(name)
        tensors: Dict[str, torch.Tensor] = {}
        for shard, shard_names in by_shard.items():
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    for name in shard_names:
                        tensors[name] = handle.get_tensor(name)
                        self.bytes_read += self.nbytes(name)
            except Exception as error:  # safetensors raises its own SafetensorError as well as OSError
                raise LoadError(f"cannot read {shard}: {error}") from error
        return tensors

    def dtypes(self) -> Dict[torch.dtype, int]:
        """Bytes stored per floating dtype."""
        found: Dict[torch.dtype, int] = defaultdict(int)
        for name in self._entries:
            dtype = self.dtype(name)
            if dtype.is_floating_point:
                found[dtype] += self.nbytes(name)
        return dict(found)

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(name) for name in self._entries)


__all__ = ["Checkpoint"]
