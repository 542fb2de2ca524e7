"""Reading safetensors checkpoints from any fsspec URL, one file or a sharded set, taking only
the tensors asked for.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the
raw tensor bytes, offsets counted from the end of the header. So a reader can take a few tensors
out of a multi-GB shard on S3 with one ranged read each, which is how the entropy model is taken
out of a 7B BLT checkpoint without downloading it. A sharded set is `model.safetensors.index.json`
(`{"weight_map": {name: shard file}}`) beside its shards (Hugging Face's `save_pretrained`).

Invariant: a tensor comes back with exactly the dtype, shape and bytes stored; a damaged header,
an unknown dtype or a short file is a `SafetensorsError` naming the file (and the tensor).
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Callable

import fsspec
import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# A header larger than this is not a safetensors header (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100 << 20


class SafetensorsError(ValueError):
    """A safetensors file or index that cannot be read as one."""


def join_url(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def read_safetensors(
    url: str, select: Callable[[str], bool] | None = None, digest: "hashlib._Hash | None" = None
) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file whose names `select` accepts (all by default).

    digest: if given, updated with each returned tensor's name, dtype, shape and bytes, in name
    order: a fingerprint of exactly what was read, without reading the rest of the file.
    """
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{url}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER_BYTES:
            raise SafetensorsError(f"{url}: not a safetensors file (header of {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{url}: unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{url}: unreadable safetensors header (not an object)")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        tensors = {}
        for name in sorted(header):
            if select is not None and not select(name):
                continue
            info = header[name]
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = [int(s) for s in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{url}: tensor {name!r} has an unreadable header entry {info!r}") from None
            expected = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            if end - begin != expected:
                raise SafetensorsError(f"{url}: tensor {name!r} spans {end - begin} bytes, its shape {shape} needs {expected}")
            f.seek(data_start + begin)
            data = f.read(end - begin)
            if len(data) != end - begin:
                raise SafetensorsError(f"{url}: file ends inside tensor {name!r}")
            if digest is not None:
                digest.update(f"{name}\0{info['dtype']}\0{shape}\0".encode())
                digest.update(data)
            # bytearray: a writable buffer, so the tensor owns its memory.
            tensor = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
            tensors[name] = tensor.reshape(shape)
    return tensors


def read_safetensors_set(
    url: str, select: Callable[[str], bool] | None = None, digest: "hashlib._Hash | None" = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The selected tensors of the checkpoint in the folder `url`: `model.safetensors`, or the
    shards `model.safetensors.index.json` lists (only shards holding a selected tensor are
    opened). Returns the tensors and the file names read."""
    fs, path = fsspec.core.url_to_fs(url)
    index_url = join_url(url, INDEX_FILE)
    if fs.exists(join_url(path, INDEX_FILE)):
        with fsspec.open(index_url, "r") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SafetensorsError(f"{index_url}: not a safetensors index (no weight_map)") from None
        shards = sorted({shard for name, shard in weight_map.items() if select is None or select(name)})
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            wanted = {n for n, s in weight_map.items() if s == shard and (select is None or select(n))}
            found = read_safetensors(join_url(url, shard), wanted.__contains__, digest)
            missing = sorted(wanted - found.keys())
            if missing:
                raise SafetensorsError(f"{join_url(url, shard)}: the index puts {missing[0]!r} there, but the shard lacks it")
            tensors.update(found)
        return tensors, [INDEX_FILE, *shards]
    if not fs.exists(join_url(path, SINGLE_FILE)):
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} under {url}")
    return read_safetensors(join_url(url, SINGLE_FILE), select, digest), [SINGLE_FILE]
