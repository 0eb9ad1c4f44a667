"""Real encoded bytes of every image kind the pipeline may meet, made with Pillow (deterministic).

``ALL_KINDS`` maps a kind name to a builder; ``EXPECTED_STATUS`` gives the row status each kind
should end with under the default ImageOptions, and ``EXPECTED_OK`` the kinds that decode.
Colour layouts are chosen so tests can check them: most "halves" images are left colour A,
right colour B.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from typing import Callable

import numpy as np
from PIL import Image

RED, GREEN, BLUE, BLACK, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255)
# 16-bit gray levels that land on known 8-bit values (v * 257) and would both read 255 if clipped.
GRAY16_LEFT, GRAY16_RIGHT = 128 * 257, 240 * 257


def encode(img: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def photo(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """Photo-like RGB content: smooth gradients, some texture and sensor-like noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 90 * np.sin(x / 37.0) * np.cos(y / 23.0)
    g = 40 + 180 * x / width
    b = 40 + 180 * y / height
    noise = np.random.default_rng(seed).normal(0, 10, (height, width, 3))
    pixels = np.stack([r, g, b], axis=-1) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def halves(width: int, height: int, left, right, mode: str = "RGB") -> Image.Image:
    img = Image.new(mode, (width, height), right)
    img.paste(left, (0, 0, width // 2, height))
    return img


def jpeg_photo(width: int = 640, height: int = 480, **save_kwargs) -> bytes:
    return encode(photo(width, height), "JPEG", quality=90, **save_kwargs)


def jpeg_oriented(orientation: int) -> bytes:
    """96x64 stored pixels in four coloured quadrants, tagged with an EXIF orientation (1-8)."""
    img = Image.new("RGB", (96, 64), RED)
    img.paste(GREEN, (48, 0, 96, 32))
    img.paste(BLUE, (0, 32, 48, 64))
    img.paste(WHITE, (48, 32, 96, 64))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif)


def jpeg_exif_rotated() -> bytes:
    """Stored left red / right blue, orientation 6 (rotate 90 degrees clockwise): upright it is
    top red / bottom blue."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(halves(320, 160, RED, BLUE), "JPEG", quality=95, exif=exif)


def jpeg_cmyk() -> bytes:
    return encode(halves(128, 64, RED, BLUE).convert("CMYK"), "JPEG", quality=95)


def png_rgba() -> bytes:
    """Left half fully transparent (black underneath, so ignoring alpha shows), right opaque green."""
    return encode(halves(128, 64, (0, 0, 0, 0), (0, 255, 0, 255), "RGBA"), "PNG")


def png_la() -> bytes:
    return encode(halves(128, 64, (0, 0), (100, 255), "LA"), "PNG")


def _palette_halves(transparent_left: bool) -> Image.Image:
    img = halves(128, 64, 0, 1, "P")
    img.putpalette([*(BLACK if transparent_left else RED), *BLUE])
    if transparent_left:
        img.info["transparency"] = 0
    return img


def png_palette() -> bytes:
    return encode(_palette_halves(False), "PNG")


def png_palette_transparent() -> bytes:
    img = _palette_halves(True)
    return encode(img, "PNG", transparency=0)


def _gray16_halves() -> np.ndarray:
    values = np.full((64, 128), GRAY16_RIGHT, dtype=np.uint16)
    values[:, :64] = GRAY16_LEFT
    return values


def png_gray16() -> bytes:
    return encode(Image.fromarray(_gray16_halves()), "PNG")  # mode I;16


def tiff_gray16_be() -> bytes:
    values = _gray16_halves()
    return encode(Image.frombytes("I;16B", (128, 64), values.astype(">u2").tobytes()), "TIFF")


def tiff_int32() -> bytes:
    return encode(Image.fromarray(_gray16_halves().astype(np.int32)), "TIFF")  # mode I


def tiff_float() -> bytes:
    return encode(Image.fromarray(_gray16_halves().astype(np.float32) / 65535), "TIFF")  # mode F


def png_1bit() -> bytes:
    return encode(halves(128, 64, 0, 1, "1"), "PNG")


def _animated(fmt: str, colours, mode: str = "RGB", **save_kwargs) -> bytes:
    frames = [Image.new(mode, (64, 48), colour) for colour in colours]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **save_kwargs)


def gif_animated() -> bytes:
    return _animated("GIF", [RED, BLUE, GREEN])


def png_animated() -> bytes:
    return _animated("PNG", [GREEN, RED])


def webp_animated() -> bytes:
    return _animated("WEBP", [RED, BLUE], lossless=True)


def webp_alpha() -> bytes:
    return encode(halves(128, 64, (0, 0, 0, 0), (0, 255, 0, 255), "RGBA"), "WEBP", lossless=True)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bomb(width: int = 8000, height: int = 8000, complete: bool = True) -> bytes:
    """A 1-bit all-black PNG: the pixel data compresses ~1000:1, so the file is tiny while decoding
    allocates width*height bytes. With complete=False only the first rows are stored (the header's
    claim is what a guard must look at)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    rows = height if complete else 4
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def gif_bomb(width: int = 7000, height: int = 7000) -> bytes:
    """A 1x1 GIF whose screen and frame descriptors are patched to claim width x height."""
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    new_size = struct.pack("<HH", width, height)
    data[6:10] = new_size  # logical screen descriptor
    frame = data.index(b",")  # image descriptor: ',' x y width height
    data[frame + 5 : frame + 9] = new_size
    return bytes(data)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def random_bytes() -> bytes:
    return random.Random(0).randbytes(4096)


SVG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<rect width="64" height="64" fill="red"/></svg>\n'
)

OK = "ok"
ALL_KINDS: dict[str, Callable[[], bytes]] = {
    "jpeg_baseline": jpeg_photo,
    "jpeg_progressive": lambda: jpeg_photo(progressive=True),
    "jpeg_grayscale": lambda: encode(photo().convert("L"), "JPEG", quality=90),
    "jpeg_cmyk": jpeg_cmyk,
    "jpeg_exif_rotated": jpeg_exif_rotated,
    # Multi-picture JPEG, as many phone cameras write: Pillow reads it as format MPO.
    "jpeg_mpo": lambda: encode(photo(), "MPO", quality=90, save_all=True, append_images=[photo(seed=1)]),
    "png_rgb": lambda: encode(photo(320, 240), "PNG"),
    "png_rgba": png_rgba,
    "png_la": png_la,
    "png_palette": png_palette,
    "png_palette_transparent": png_palette_transparent,
    "png_gray16": png_gray16,
    "png_1bit": png_1bit,
    "png_animated": png_animated,
    "gif_animated": gif_animated,
    "webp": lambda: encode(photo(), "WEBP", quality=80),
    "webp_alpha": webp_alpha,
    "webp_animated": webp_animated,
    "bmp": lambda: encode(photo(320, 240), "BMP"),
    "tiff": lambda: encode(photo(320, 240), "TIFF"),
    "tiff_gray16_be": tiff_gray16_be,
    "tiff_int32": tiff_int32,
    "tiff_float": tiff_float,
    "tiny_1x1": lambda: encode(Image.new("RGB", (1, 1), RED), "PNG"),
    "wide_10000x10": lambda: encode(halves(10000, 10, RED, BLUE), "PNG"),
    "png_bomb": png_bomb,
    "png_bomb_huge": lambda: png_bomb(60000, 60000, complete=False),
    "gif_bomb": gif_bomb,
    "jpeg_truncated": lambda: truncated(jpeg_photo()),
    "png_truncated": lambda: truncated(encode(photo(320, 240), "PNG")),
    "empty": lambda: b"",
    "random_bytes": random_bytes,
    "svg": lambda: SVG,
}

_FAILURES = {
    "png_bomb": "image_too_large",
    "png_bomb_huge": "image_too_large",
    "gif_bomb": "image_too_large",
    "jpeg_truncated": "image_decode_error",
    "png_truncated": "image_decode_error",
    "empty": "missing_image",
    "random_bytes": "image_decode_error",
    "svg": "image_decode_error",
}
EXPECTED_STATUS: dict[str, str] = {kind: _FAILURES.get(kind, OK) for kind in ALL_KINDS}
EXPECTED_OK: set[str] = {kind for kind, status in EXPECTED_STATUS.items() if status == OK}
