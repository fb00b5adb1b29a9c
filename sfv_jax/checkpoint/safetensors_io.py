"""Reading and writing safetensors checkpoints without torch: memory-mapped, validated, never pickled.

A diffusers component folder holds ``config.json`` and the weights as one of (in this order of
preference): ``{stem}.safetensors``, ``{stem}.safetensors.index.json`` (sharded), and the same with the
``fp16`` variant. Pickled formats (``.bin``, ``.ckpt``, ``.pt``, ``.pth``, ``.pkl``) are refused: loading
them can execute arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, corrupt, pickled, or does not fit the model."""


def refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path}: refusing to load a pickled checkpoint ({path.suffix}); unpickling can execute arbitrary code. "
        "Use the .safetensors files published next to it (diffusers folders ship "
        "'diffusion_pytorch_model.safetensors' or its '.fp16' variant), or convert it once in a trusted "
        "environment with diffusers: Model.from_pretrained(dir).save_pretrained(out, safe_serialization=True)."
    )


class SafetensorsFile:
    """One safetensors file, memory-mapped. ``shapes`` maps key -> shape; ``get(key)`` -> np.ndarray view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(self.path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: safetensors file does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.path}: corrupt safetensors file (only {size} bytes, no header)")
            n = int.from_bytes(prefix, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors file (header length {n} exceeds the "
                    f"file size {size}); is this a safetensors file, or was it truncated?"
                )
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors file (header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start, data_size = 8 + n, size - 8 - n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {key!r} ({e!r})") from None
            if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= data_size:
                raise CheckpointError(
                    f"{self.path}: corrupt or truncated safetensors file: tensor {key!r} {info['dtype']}{list(shape)} "
                    f"claims bytes [{begin}, {end}) of a {data_size}-byte data section"
                )
            self._entries[key] = (dtype, shape, begin, end)
        self._check_layout(data_size)
        self._mmap: np.memmap | None = None

    def _check_layout(self, data_size: int) -> None:
        """The tensors tile the data section exactly, as the safetensors format requires: each starts where
        the previous one ends, none overlaps another (two tensors reading one byte range would silently
        share values), and the last ends at the end of the file."""
        at, prev = 0, None
        for key, (_, _, begin, end) in sorted(self._entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin != at:
                how = f"overlaps {prev!r}" if begin < at else f"leaves bytes [{at}, {begin}) unused"
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors file: tensor {key!r} at bytes [{begin}, {end}) {how} "
                    "(tensors must tile the data section in order)"
                )
            at, prev = end, key
        if at != data_size:
            raise CheckpointError(
                f"{self.path}: corrupt safetensors file: the tensors end at byte {at} of a {data_size}-byte data "
                "section (extra bytes at the end)"
            )

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[1] for k, v in self._entries.items()}

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def get(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[key]
        if begin == end:
            return np.zeros(shape, dtype)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
        return self._mmap[begin:end].view(dtype).reshape(shape)


class WeightSource(Mapping[str, np.ndarray]):
    """Every tensor of a (possibly sharded) checkpoint, read lazily. ``shapes`` needs no tensor data."""

    def __init__(self, files: list[SafetensorsFile], description: str):
        self.files, self.description = files, description
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for key in f.shapes:
                if key in self._where:
                    raise CheckpointError(
                        f"{description}: tensor {key!r} appears in both {self._where[key].path.name} and {f.path.name}"
                    )
                self._where[key] = f

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: f.shapes[k] for k, f in self._where.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _from_index(index_path: Path) -> WeightSource:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index (needs a 'weight_map'): {e!r}") from None
    names = sorted(set(weight_map.values()))
    files = [SafetensorsFile(index_path.parent / n) for n in names]
    source = WeightSource(files, str(index_path))
    listed, found = set(weight_map), set(source.shapes)
    if listed != found:
        raise CheckpointError(
            f"{index_path}: the index and its shards disagree: listed but absent "
            f"{sorted(listed - found)[:10]}, present but unlisted {sorted(found - listed)[:10]}"
        )
    return source


def open_weights(
    path: str | os.PathLike, stem: str = "diffusion_pytorch_model", variant: str | None = None
) -> WeightSource:
    """Open the weights of a diffusers component folder, or a single ``.safetensors`` / index file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        if path.name.endswith(".index.json"):
            return _from_index(path)
        return WeightSource([SafetensorsFile(path)], str(path))
    suffixes = [f".{variant}"] if variant else ["", ".fp16"]
    for suffix in suffixes:
        single = path / f"{stem}{suffix}.safetensors"
        if single.is_file():
            return WeightSource([SafetensorsFile(single)], str(single))
        index = path / f"{stem}{suffix}.safetensors.index.json"
        if index.is_file():
            return _from_index(index)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(pickles[0])
    wanted = " or ".join(f"{stem}{s}.safetensors[.index.json]" for s in suffixes)
    present = sorted(p.name for p in path.iterdir())[:20]
    raise CheckpointError(f"{path}: no weights found: expected {wanted}; the folder holds {present}")


assert sys.byteorder == "little", "safetensors I/O here assumes a little-endian host"


def save_file(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (temp file + rename): a crash never leaves half a file."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset, arrays = 0, []
    for key, value in tensors.items():
        arr = np.ascontiguousarray(value)
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {arr.dtype}, which safetensors cannot store")
        header[key] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(len(blob).to_bytes(8, "little"))
            fh.write(blob)
            for arr in arrays:
                fh.write(arr.tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
