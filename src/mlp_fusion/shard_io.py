"""Safetensors files one tensor at a time: :class:`CheckpointReader` reads a checkpoint's tensors under the
names the model gives them (stacking per-expert tensors as the model holds them), :class:`ShardWriter`
writes output shards as tensors come, never holding more than one in memory."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint_files import INDEX_FILE, WEIGHTS_FILE
from .errors import UserError, first_line

SHARD_BYTES = 2 << 30  # output shard size (shards are written as they fill, never held in memory)
RENAMES = ((".block_sparse_moe.", ".mlp."),)  # Mixtral's checkpoint name of its sparse MLP
EXPERT_PART = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<part>\w+)\.weight$")
PARTS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
STORED_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


@contextmanager
def open_stored(path: Path, device: torch.device | str = "cpu") -> Iterator:
    """``safe_open`` of one safetensors file; a damaged one (cut short, not safetensors) refused in one line,
    whether opening or reading it fails."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as stored:
            yield stored
    except torch.OutOfMemoryError:
        raise  # a RuntimeError too, but the file is not to blame
    except (SafetensorError, RuntimeError, OSError) as error:
        raise damaged(path.parent, error) from None


def damaged(directory: Path | str, error: BaseException) -> UserError:
    """The one-line refusal of a checkpoint whose weights file cannot be read."""
    return UserError(f"cannot load {directory}: {first_line(error)}; the file is damaged, save it again")


class CheckpointReader:
    """The tensors of safetensors files under the names the model gives them, read one at a time."""

    def __init__(self, files: list[Path]):
        self.plain: dict[str, tuple[Path, str]] = {}
        self.experts: dict[str, dict[str, dict[int, tuple[Path, str]]]] = {}  # experts path -> part -> index
        self.first_dtype: torch.dtype | None = None
        for path in files:
            with open_stored(path) as stored:
                for key in stored.keys():
                    self._add(path, key)
                    dtype = STORED_DTYPES.get(stored.get_slice(key).get_dtype())
                    if self.first_dtype is None and dtype is not None and dtype.is_floating_point:
                        self.first_dtype = dtype

    def _add(self, path: Path, key: str) -> None:
        name = key
        for old, new in RENAMES:
            name = name.replace(old, new)
        match = EXPERT_PART.match(name)
        if match and match["part"] in PARTS:
            parts = self.experts.setdefault(match["experts"], {})
            parts.setdefault(PARTS[match["part"]], {})[int(match["index"])] = (path, key)
        else:
            self.plain[name] = (path, key)

    def names(self) -> set[str]:
        stacked = {f"{experts}.{name}" for experts in self.experts for name in ("gate_up_proj", "down_proj")}
        return set(self.plain) | stacked

    def read(self, name: str, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
        """One tensor, cast to ``dtype`` when it is floating; stacked experts assembled as the model holds
        them (``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``)."""
        if name in self.plain:
            tensor = _read_one(*self.plain[name], device)
        else:
            experts, _, kind = name.rpartition(".")
            parts = self.experts[experts]
            if kind == "gate_up_proj":
                tensor = torch.stack(
                    [torch.cat([_read_one(*parts["gate"][i], device), _read_one(*parts["up"][i], device)])
                     for i in sorted(parts["gate"])]
                )  # fmt: skip
            else:
                tensor = torch.stack([_read_one(*parts["down"][i], device) for i in sorted(parts["down"])])
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _read_one(path: Path, key: str, device: torch.device) -> torch.Tensor:
    # Opened for each read: a file mapping kept open would count every page read so far as resident.
    with open_stored(path, device) as stored:
        return stored.get_tensor(key)


class ShardWriter:
    """Output tensors written to disk as they come, in shards of about ``max_bytes``.

    Each tensor's bytes go straight to a data file; when a shard is full, its safetensors header (names,
    dtypes, shapes, offsets) is written and the data copied behind it in blocks. Memory never holds more
    than the tensor being written, whatever the shard size.
    """

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.entries: dict[str, dict] = {}
        self.data: BinaryIO | None = None
        self.offset = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.entries and self.offset + size > self.max_bytes:
            self._finish_shard()
        if self.data is None:
            self.data = (self.directory / ".shard-data").open("wb")
        self.data.write(tensor.reshape(-1).view(torch.uint8).numpy())  # its buffer, not a copy
        dtype = SAFETENSORS_DTYPES[tensor.dtype]
        self.entries[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [self.offset, self.offset + size],
        }
        self.offset += size
        self.total_bytes += size

    def _finish_shard(self) -> None:
        self.data.close()
        header = json.dumps(
            {"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")
        ).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        path = self.directory / f".shard-{len(self.written)}"
        with path.open("wb") as shard, (self.directory / ".shard-data").open("rb") as data:
            shard.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(data, shard, 64 << 20)
        (self.directory / ".shard-data").unlink()
        self.written.append((path, list(self.entries)))
        self.entries, self.data, self.offset = {}, None, 0

    def close(self) -> None:
        """Name the shards as transformers does: one ``model.safetensors``, or numbered files and an index."""
        if self.entries or not self.written:
            if self.data is None:
                self.data = (self.directory / ".shard-data").open("wb")
            self._finish_shard()
        if len(self.written) == 1:
            os.replace(self.written[0][0], self.directory / WEIGHTS_FILE)
            return
        weight_map = {}
        for number, (path, names) in enumerate(self.written, 1):
            final = f"model-{number:05d}-of-{len(self.written):05d}.safetensors"
            os.replace(path, self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
