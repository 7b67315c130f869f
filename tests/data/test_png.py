"""LoadPNGd / read_png: grayscale PNG without Pillow, the same arrays as MONAI's Pillow reader, named errors."""

from __future__ import annotations

import struct
import sys
import zlib

import numpy as np
import pytest
from monai.transforms import LoadImaged

from monai_dp.data import CheckLabelRanged, LoadPNGd, read_png
from monai_dp.data.png import check_png
from monai_dp.utils import DatasetError


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _filter_row(ftype: int, row: bytes, prev: bytes, bpp: int) -> bytes:
    """The PNG encoder's side of each filter, written straight from the specification's formulas."""
    out = bytearray()
    for x, value in enumerate(row):
        a, b = (row[x - bpp] if x >= bpp else 0), prev[x]
        c = prev[x - bpp] if x >= bpp else 0
        p = a + b - c
        paeth = min((abs(p - a), 0, a), (abs(p - b), 1, b), (abs(p - c), 2, c))[2]
        pred = (0, a, b, (a + b) // 2, paeth)[ftype]
        out.append((value - pred) % 256)
    return bytes(out)


def write_gray_png(path, array: np.ndarray, depth: int = 8, color_type: int = 0, interlace: int = 0) -> bytes:
    """Grayscale PNG whose rows cycle through all five filter types."""
    h, w = array.shape[:2]
    rows = array.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1)
    bpp, prev, raw = max(1, rows.itemsize * (array.shape[2] if array.ndim == 3 else 1)), bytes(rows[0].nbytes), b""
    for r in range(h):
        line = rows[r].tobytes()
        raw += bytes([r % 5]) + _filter_row(r % 5, line, prev, bpp)
        prev = line
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, interlace))
    png += _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
    path.write_bytes(png)
    return png


@pytest.mark.parametrize("depth", [8, 16])
def test_all_filters_decode(tmp_path, depth):
    array = np.random.default_rng(depth).integers(0, 2**depth, (11, 7))
    write_gray_png(tmp_path / "a.png", array, depth)
    out = read_png(tmp_path / "a.png")
    assert out.dtype == (np.uint8 if depth == 8 else np.uint16)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("mode, dtype", [("L", np.uint8), ("I;16", np.uint16)])
def test_same_as_monai_pillow_reader(tmp_path, mode, dtype):
    image = pytest.importorskip("PIL.Image")
    array = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, (40, 30)).astype(dtype)
    array[:, :15] = np.arange(15, dtype=dtype)  # smooth parts make Pillow choose Sub/Up/Average/Paeth rows
    image.fromarray(array).save(tmp_path / "a.png")
    ours = LoadPNGd("image")({"image": str(tmp_path / "a.png")})["image"]
    monai = LoadImaged("image", ensure_channel_first=True)({"image": str(tmp_path / "a.png")})["image"]
    assert ours.shape == monai.shape == (1, 30, 40) and ours.dtype == monai.dtype
    np.testing.assert_array_equal(ours.numpy(), monai.numpy())
    assert ours.meta["filename_or_obj"] == str(tmp_path / "a.png")
    assert LoadPNGd("image", reverse_indexing=False)({"image": str(tmp_path / "a.png")})["image"].shape == (1, 40, 30)


def test_works_without_pillow_and_feeds_check_label_range(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # any `import PIL...` now fails
    write_gray_png(tmp_path / "mask.png", np.array([[0, 1, 2], [1, 1, 0]]))
    rec = LoadPNGd("label")({"label": tmp_path / "mask.png"})
    assert rec["label"].shape == (1, 3, 2)
    with pytest.raises(DatasetError, match=r"Label .*mask.png holds value\(s\) \[2\] outside the classes \[0, 2\)"):
        CheckLabelRanged("label", num_classes=2)(rec)


def _adam7_length(w: int, h: int) -> int:
    """Bytes of an interlaced 8-bit grayscale image, counting each pass's pixels one by one."""
    total = 0
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        cols = len([x for x in range(w) if x % dx == x0])
        rows = len([y for y in range(h) if y % dy == y0])
        total += rows * (1 + cols) if cols and rows else 0
    return total


def test_other_kinds_pass_the_check_but_are_not_decoded(tmp_path):
    write_gray_png(tmp_path / "rgb.png", np.zeros((4, 5, 3)), color_type=2)
    assert check_png(tmp_path / "rgb.png") == (5, 4)
    with pytest.raises(DatasetError, match=r"rgb.png: only 8/16-bit grayscale non-interlaced PNG .* colour type 2"):
        read_png(tmp_path / "rgb.png")
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 7, 5, 8, 0, 0, 0, 1))
    idat = _chunk(b"IDAT", zlib.compress(bytes(_adam7_length(7, 5))))
    (tmp_path / "i.png").write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + idat + _chunk(b"IEND", b""))
    assert check_png(tmp_path / "i.png") == (7, 5)
    with pytest.raises(DatasetError, match=r"i.png: only .* interlace 1"):
        read_png(tmp_path / "i.png")


def test_corrupt_files_are_named(tmp_path):
    png = write_gray_png(tmp_path / "a.png", np.zeros((4, 4)))
    cases = {
        "sig.png": (b"GIF89a" + png[6:], r"sig.png: not a PNG file"),
        "head.png": (png[:20] + b"\xff" + png[21:], r"head.png: corrupt PNG header \(CRC mismatch\)"),
        "crc.png": (png[:-20] + bytes([png[-20] ^ 1]) + png[-19:], r"crc.png: corrupt PNG chunk b'IDAT'"),
        "cut.png": (png[:-12], r"cut.png: truncated PNG \(no IEND chunk"),
        "short.png": (png[:33] + _chunk(b"IDAT", zlib.compress(b"\0" * 3)) + png[-12:],
                      r"short.png: PNG image data holds 3 bytes, expected 20"),
        "filter.png": (png[:33] + _chunk(b"IDAT", zlib.compress(b"\x07" + b"\0" * 19)) + png[-12:],
                       r"filter.png: unknown PNG filter type 7 in row 0"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DatasetError, match=r"Cannot read .*" + match):
            LoadPNGd("image")({"image": str(tmp_path / name)})
