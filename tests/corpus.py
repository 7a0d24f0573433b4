"""The malformed-input corpus, made in code: every case with the outcome a job must give it.

Images: each case is bytes plus what decoding must give: ``("ok", rgb)`` with the colour of the
picture's centre after decoding, or ``("bad", reason)`` with a substring of the bad-row reason.
Prompts: each case is a value plus ``("ok", None)`` or ``("bad", reason)``.

Jobs count a bad image or prompt as a bad row (training), a reject (scoring) or a dropped pair
(curation), with the reason; tests/test_bad_input.py checks every case through each of them.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

RED, WHITE = (220, 30, 30), (255, 255, 255)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def red_square(size: int = 48, mode: str = "RGB") -> Image.Image:
    """A grey picture with a red square in its middle."""
    img = Image.new("RGB", (size, size), (128, 128, 128))
    img.paste(RED, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return img.convert(mode) if mode != "RGB" else img


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (PIL cannot write 48-bit RGB, and a bomb must not be rendered to be made)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows, 6))
            + _png_chunk(b"IEND", b""))


def png16_rgb() -> bytes:
    """48-bit RGB: the red square at 16 bits per channel."""
    arr = np.asarray(red_square(), dtype=np.uint16) * 257
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)
    return raw_png(arr.shape[1], arr.shape[0], 16, 2, rows)


def png16_grey() -> bytes:
    """16-bit greyscale (PIL mode I;16) of mid grey 0x8080 = 32896 (8-bit 128)."""
    arr = np.full((48, 48), 32896, dtype=np.uint16)
    return _save(Image.fromarray(arr), "PNG")


def bomb_png() -> bytes:
    """A PNG declaring 50000 x 50000 greyscale pixels (2.5 GB decoded) in about 2 KB."""
    rows = zlib.compress(b"\x00" * (1 << 20), 9)  # the first ~20 rows: a valid stream, cut short
    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def rgba_png() -> bytes:
    """Transparent background (its hidden RGB is black) around an opaque red square."""
    img = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    img.paste(RED + (255,), (12, 12, 36, 36))
    return _save(img, "PNG")


def palette_png(transparent: bool) -> bytes:
    img = red_square().quantize(colors=4)
    if transparent:  # the grey background's palette entry transparent
        grey = img.getpixel((0, 0))
        return _save(img, "PNG", transparency=grey)
    return _save(img, "PNG")


def animated(fmt: str) -> bytes:
    """Two frames: the red square first, then solid blue (a job reads the first)."""
    frames = [red_square(), Image.new("RGB", (48, 48), (30, 60, 220))]
    if fmt == "GIF":
        frames = [f.quantize(colors=8) for f in frames]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                 **({"lossless": True} if fmt == "WEBP" else {}))


def cmyk_jpeg() -> bytes:
    return _save(red_square(mode="CMYK"), "JPEG", quality=95)


def truncated(fmt: str) -> bytes:
    data = _save(red_square(96), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return data[: len(data) * 6 // 10]


def solid(width: int, height: int) -> bytes:
    return _save(Image.new("RGB", (width, height), RED), "PNG")


# name -> (bytes, expected). Centre colours are checked within a tolerance (JPEG is lossy).
IMAGES: dict[str, tuple[bytes, tuple]] = {
    "png": (_save(red_square(), "PNG"), ("ok", RED)),
    "jpeg": (_save(red_square(), "JPEG", quality=95), ("ok", RED)),
    "webp": (_save(red_square(), "WEBP", lossless=True), ("ok", RED)),
    "cmyk_jpeg": (cmyk_jpeg(), ("ok", RED)),
    "png16_grey": (png16_grey(), ("ok", (128, 128, 128))),
    "png16_rgb": (png16_rgb(), ("ok", RED)),
    "rgba_png": (rgba_png(), ("ok", RED)),
    "palette_png": (palette_png(False), ("ok", RED)),
    "palette_transparent_png": (palette_png(True), ("ok", RED)),
    "grey_png": (_save(red_square(mode="L"), "PNG"), ("ok", (int(round(0.299 * 220 + 0.587 * 30 + 0.114 * 30)),) * 3)),
    "animated_gif": (animated("GIF"), ("ok", RED)),
    "animated_webp": (animated("WEBP"), ("ok", RED)),
    "truncated_jpeg": (truncated("JPEG"), ("bad", "undecodable image")),
    "truncated_png": (truncated("PNG"), ("bad", "undecodable image")),
    "zero_bytes": (b"", ("bad", "empty image bytes")),
    "random_bytes": (np.random.default_rng(0).bytes(5000), ("bad", "undecodable image")),
    "bomb_png_50000x50000": (bomb_png(), ("bad", "exceeds limits.max_pixels")),
    "one_pixel": (solid(1, 1), ("bad", "image too small")),
    "strip_10000x10": (solid(10_000, 10), ("bad", "limits.max_aspect_ratio")),
    "strip_65000x8": (solid(65_000, 8), ("bad", "limits.max_aspect_ratio")),
}

# corners of the transparent cases are white after compositing; of the others, grey
CORNER = {"rgba_png": WHITE, "palette_transparent_png": WHITE}

PROMPTS: dict[str, tuple[object, tuple]] = {
    "plain": ("a red square", ("ok", None)),
    "emoji": ("a red square 🟥🔥 on grey", ("ok", None)),
    "rtl": ("مربع أحمر על רקע אפור", ("ok", None)),
    "nul_byte": ("a red\x00square", ("ok", None)),
    "empty": ("", ("bad", "empty prompt")),
    "blank": ("   \t ", ("bad", "empty prompt")),
    "null": (None, ("bad", "null prompt")),
    "huge_100kb": ("a red square " * 8000, ("bad", "exceeds limits.max_prompt_chars")),
}


def expected_ok_images() -> list[str]:
    return [k for k, (_, (kind, _)) in IMAGES.items() if kind == "ok"]


def expected_bad_images() -> list[str]:
    return [k for k, (_, (kind, _)) in IMAGES.items() if kind == "bad"]
