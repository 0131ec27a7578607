"""A fast, read-only GGUF parser: metadata and zero-copy tensor views.

`gguf.GGUFReader` builds a numpy view per vocabulary string and takes seconds
on a 49k-token vocabulary; this walks the file once with `struct` (~0.1 s).
Dequantization still uses `gguf.quants`.
"""
from __future__ import annotations

import dataclasses
import mmap
import pathlib
import struct
from typing import Any

import gguf
import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # gguf.GGUFValueType -> struct format
_PLAIN = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]               # numpy order (GGML's ne reversed): [rows, cols]
  qtype: gguf.GGMLQuantizationType
  raw: np.ndarray                      # plain dtype [rows, cols] or uint8 [rows, row_bytes]

  def dequantize(self) -> np.ndarray:
    """f32 [rows, cols]. Raises NotImplementedError for quant types gguf cannot read."""
    if self.qtype in _PLAIN:
      return self.raw.astype(np.float32)
    return np.asarray(gguf.quants.dequantize(self.raw, self.qtype), np.float32).reshape(self.shape)


@dataclasses.dataclass
class GGUFFile:
  metadata: dict[str, Any]
  tensors: dict[str, TensorInfo]


def read(path: str | pathlib.Path, prefix: str = "", tensors: bool = True) -> GGUFFile:
  """Parses a GGUF file. Only metadata keys starting with `prefix` are decoded."""
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  try:
    return _parse(buf, prefix, tensors)
  except (struct.error, UnicodeDecodeError, KeyError, ValueError) as e:
    raise ValueError(f"{path}: corrupt or truncated GGUF file ({e})") from None


def _parse(buf, prefix: str, with_tensors: bool) -> GGUFFile:
  magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
  if magic != gguf.GGUF_MAGIC:
    raise ValueError("not a GGUF file (bad magic bytes)")
  if version not in (2, 3):
    raise ValueError(f"unsupported GGUF version {version}")
  pos, meta = 24, {}

  def string(p: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, p)
    if p + 8 + n > len(buf):
      raise ValueError("string runs past the end of the file")
    return buf[p + 8:p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

  for _ in range(n_kv):
    key, pos = string(pos)
    (vtype,) = struct.unpack_from("<I", buf, pos)
    pos += 4
    keep = key.startswith(prefix) or key in ("general.architecture", "general.alignment")
    if vtype in _SCALARS:
      (value,) = struct.unpack_from(_SCALARS[vtype], buf, pos)
      pos += struct.calcsize(_SCALARS[vtype])
    elif vtype == gguf.GGUFValueType.STRING:
      value, pos = string(pos)
    elif vtype == gguf.GGUFValueType.ARRAY:
      etype, n = struct.unpack_from("<IQ", buf, pos)
      pos += 12
      if etype in _SCALARS:
        width = struct.calcsize(_SCALARS[etype])
        value = np.frombuffer(buf, np.dtype(_SCALARS[etype]), n, pos).tolist() if keep else n
        pos += n * width
      elif etype == gguf.GGUFValueType.STRING:
        value = []
        for _ in range(n):
          if keep:
            s, pos = string(pos)
            value.append(s)
          else:
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
      else:
        raise ValueError(f"key {key!r} holds an array of GGUF type {etype}")
    else:
      raise ValueError(f"key {key!r} has unknown GGUF value type {vtype}")
    if keep:
      meta[key] = value
  if not with_tensors:
    return GGUFFile(meta, {})

  infos = []
  for _ in range(n_tensors):
    name, pos = string(pos)
    (n_dims,) = struct.unpack_from("<I", buf, pos)
    dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
    qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
    pos += 4 + 8 * n_dims + 12
    infos.append((name, tuple(reversed(dims)), qtype, offset))
  align = int(meta.get("general.alignment", 32))
  data_start = -(-pos // align) * align
  tensors = {}
  for name, shape, qtype, offset in infos:
    try:
      qtype = gguf.GGMLQuantizationType(qtype)
    except ValueError:
      raise ValueError(f"tensor {name} has unknown GGML type id {qtype}") from None
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
    row_bytes = cols // block * type_size
    start = data_start + offset
    if start + rows * row_bytes > len(buf):
      raise ValueError(f"tensor {name} runs past the end of the file")
    raw = np.frombuffer(buf, np.uint8, rows * row_bytes, start).reshape(rows, row_bytes)
    if qtype in _PLAIN:
      raw = raw.view(_PLAIN[qtype])
    tensors[name] = TensorInfo(name, shape, qtype, raw.reshape(shape) if qtype in _PLAIN else raw)
  return GGUFFile(meta, tensors)
