"""PNG files without Pillow: header and integrity checks, and a grayscale decoder with a MONAI-style transform.

MONAI reads PNG only through Pillow (``PILReader``); without Pillow, ``LoadImage`` hands a ``.png`` to the next
reader and fails with an unrelated DICOM error. :class:`LoadPNGd` decodes 8- and 16-bit grayscale,
non-interlaced PNGs (the usual medical exports) with ``zlib`` and ``struct`` only, and lays the result out as
``LoadImaged(..., ensure_channel_first=True)`` does with Pillow: ``(1, W, H)`` float32, width first.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import MetaKeys

from monai_dp.utils.errors import DatasetError

__all__ = ["LoadPNGd", "check_png", "png_header", "read_png"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _fail(path: str | os.PathLike, problem: str) -> DatasetError:
    return DatasetError(f"Cannot read {os.fspath(path)}: {problem}.")


def png_header(path: str | os.PathLike) -> dict[str, int]:
    """Read the IHDR chunk: ``width``, ``height``, ``bit_depth``, ``color_type``, ``interlace``.

    Raises:
        DatasetError: naming the file when the signature, the IHDR chunk or its CRC is wrong.
    """
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != SIGNATURE or head[12:16] != b"IHDR":
        raise _fail(path, "not a PNG file (bad signature or header)")
    if struct.unpack(">I", head[29:33])[0] != zlib.crc32(head[12:29]):
        raise _fail(path, "corrupt PNG header (CRC mismatch)")
    width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if not (width and height) or ctype not in _CHANNELS:
        raise _fail(path, f"invalid PNG header (size {width}x{height}, colour type {ctype})")
    return {"width": width, "height": height, "bit_depth": depth, "color_type": ctype, "interlace": interlace}


def _pixel_bytes(path: str | os.PathLike) -> tuple[dict[str, int], bytes]:
    """Header and decompressed (still filtered) image data, every chunk CRC and the data length checked."""
    info = png_header(path)
    with open(path, "rb") as f:
        data = f.read()
    pos, idat, ended = 8, [], False
    while pos + 12 <= len(data) and not ended:
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        crc = data[pos + 8 + length : pos + 12 + length]
        if len(body) < length or len(crc) < 4 or struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise _fail(path, f"corrupt PNG chunk {kind!r} at byte {pos} (truncated or CRC mismatch)")
        idat += [body] if kind == b"IDAT" else []
        ended, pos = kind == b"IEND", pos + 12 + length
    if not ended or not idat:
        raise _fail(path, "truncated PNG (no IEND chunk or no image data)")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise _fail(path, f"corrupt PNG image data ({e})") from e
    if len(raw) != _expected_length(info):
        raise _fail(path, f"PNG image data holds {len(raw)} bytes, expected {_expected_length(info)}")
    return info, raw


def _expected_length(info: dict[str, int]) -> int:
    bits = _CHANNELS[info["color_type"]] * info["bit_depth"]
    w, h = info["width"], info["height"]
    passes = _ADAM7 if info["interlace"] else ((0, 0, 1, 1),)
    sizes = [(-(-(w - x0) // dx), -(-(h - y0) // dy)) for x0, y0, dx, dy in passes]
    return sum(ph * (1 + -(-pw * bits // 8)) for pw, ph in sizes if pw > 0 and ph > 0)


def check_png(path: str | os.PathLike) -> tuple[int, int]:
    """Check a PNG of any kind end to end (chunk CRCs, decompression, data length); return ``(width, height)``."""
    info, _ = _pixel_bytes(path)
    return info["width"], info["height"]


def _unfilter(raw: bytes, height: int, stride: int, bpp: int, path: str | os.PathLike) -> np.ndarray:
    """Undo the per-scanline PNG filters (None, Sub, Up, Average, Paeth)."""
    out = np.zeros((height, stride), np.uint8)
    prev = bytes(stride)
    for r in range(height):
        ftype, line = raw[r * (stride + 1)], raw[r * (stride + 1) + 1 : (r + 1) * (stride + 1)]
        cur = np.frombuffer(line, np.uint8)
        if ftype == 1:
            cur = (np.cumsum(cur.reshape(-1, bpp), axis=0, dtype=np.int64) & 0xFF).reshape(-1)
        elif ftype == 2:
            cur = (cur.astype(np.int64) + np.frombuffer(prev, np.uint8)) & 0xFF
        elif ftype in (3, 4):
            cur = _unfilter_sequential(bytearray(line), prev, bpp, ftype)
        elif ftype != 0:
            raise _fail(path, f"unknown PNG filter type {ftype} in row {r}")
        out[r] = cur
        prev = out[r].tobytes()
    return out


def _unfilter_sequential(cur: bytearray, prev: bytes, bpp: int, ftype: int) -> np.ndarray:
    for x in range(len(cur)):
        a = cur[x - bpp] if x >= bpp else 0
        b = prev[x]
        if ftype == 3:
            pred = (a + b) >> 1
        else:
            c = prev[x - bpp] if x >= bpp else 0
            pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        cur[x] = (cur[x] + pred) & 0xFF
    return np.frombuffer(bytes(cur), np.uint8)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Decode an 8- or 16-bit grayscale, non-interlaced PNG into a ``(height, width)`` uint8/uint16 array.

    Raises:
        DatasetError: naming the file when it is corrupt or of another kind (colour, palette, interlaced).
    """
    info, raw = _pixel_bytes(path)
    depth = info["bit_depth"]
    if info["color_type"] != 0 or depth not in (8, 16) or info["interlace"]:
        raise _fail(path, f"only 8/16-bit grayscale non-interlaced PNG can be decoded without Pillow, got colour "
                          f"type {info['color_type']}, bit depth {depth}, interlace {info['interlace']}; "
                          "install Pillow and use monai.transforms.LoadImaged")
    bpp = depth // 8
    rows = _unfilter(raw, info["height"], info["width"] * bpp, bpp, path)
    return rows if depth == 8 else rows.view(">u2").astype(np.uint16)


class LoadPNGd(MapTransform):
    """Load grayscale PNG files of ``keys`` into channel-first ``MetaTensor``s without Pillow.

    The output matches ``LoadImaged(keys, ensure_channel_first=True)`` with Pillow: shape ``(1, W, H)``
    (``reverse_indexing=True``, MONAI's default) or ``(1, H, W)``, values unscaled, ``dtype`` float32, the path in
    ``meta["filename_or_obj"]`` (so :class:`~monai_dp.data.CheckLabelRanged` can name the file).

    Args:
        keys: keys whose values are PNG paths.
        reverse_indexing: put width first, as MONAI's ``PILReader`` does.
        dtype: data type of the output.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, reverse_indexing: bool = True, dtype: Any = np.float32,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reverse_indexing = reverse_indexing
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = os.fspath(d[key])
            array = read_png(path)
            array = array.T if self.reverse_indexing else array
            meta = {"filename_or_obj": path, MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
                    MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan")}
            d[key] = MetaTensor(torch.as_tensor(np.ascontiguousarray(array[None], dtype=self.dtype)), meta=meta)
        return d
