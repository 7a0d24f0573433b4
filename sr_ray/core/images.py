"""Image bytes in and out: decoding with validation, and the procedural drawing
that the demo data (and the simulated community) are made of."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageDraw

from sr_ray.core.limits import DEFAULT_LIMITS, InputLimits

# PIL's own bomb guard warns, then raises, at sizes of its choosing; decode() checks limits.max_pixels itself
Image.MAX_IMAGE_PIXELS = None

# Named colours a prompt can ask for; the demo's "taste" is that the dominant
# colour of a popular image matches the colour named in its prompt.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "orange": (250, 140, 20),
    "pink": (250, 120, 190),
    "cyan": (30, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond", "stripes")


class BadImage(ValueError):
    """Bytes that are not a usable image; the message says why."""


def decode(data: bytes | None, limits: InputLimits = DEFAULT_LIMITS) -> Image.Image:
    """Encoded image bytes -> RGB PIL image; raises :class:`BadImage` with the reason.

    Size, shape and byte limits are checked from the header, before pixels are decoded. What any image
    becomes: the first frame of an animation; 16-bit and 32-bit grey scaled to 8 bits (PIL's own
    conversion clips them, so a 16-bit PNG turned white); transparency composited over white (what a viewer
    sees; dropping alpha shows whatever colour the transparent pixels happen to hold); CMYK, palette and
    grey converted to RGB.
    """
    if data is None or len(data) == 0:
        raise BadImage("empty image bytes")
    if len(data) > limits.max_image_bytes:
        raise BadImage(f"image of {len(data)} bytes exceeds limits.max_image_bytes={limits.max_image_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
        check_shape(img.width, img.height, limits)
        img.load()
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        # PIL names the buffer object (with its address) in the message: keep the reason stable across runs
        msg = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise BadImage(f"undecodable image: {type(e).__name__}: {msg}") from None
    return to_rgb(img)


def check_shape(width: int, height: int, limits: InputLimits = DEFAULT_LIMITS) -> None:
    """Raise :class:`BadImage` when a ``width`` x ``height`` image is beyond ``limits``."""
    if width * height > limits.max_pixels:
        raise BadImage(f"image of {width}x{height} pixels exceeds limits.max_pixels={limits.max_pixels}")
    if min(width, height) < limits.min_image_side:
        raise BadImage(f"image too small ({width}x{height}; limits.min_image_side={limits.min_image_side})")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise BadImage(f"image of {width}x{height} is more elongated than "
                       f"limits.max_aspect_ratio={limits.max_aspect_ratio:g}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see :func:`decode`)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (the jobs' plots), laid out tight; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def draw(colour: str, shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A ``size`` x ``size`` picture whose dominant object has ``colour`` and ``shape``.

    Background tone, object position and scale, and a few small distractor
    marks of other colours are drawn from ``rng``, so images of one colour differ.
    """
    bg = tuple(int(v) for v in rng.integers(90, 200, size=3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # distractors, small
        other = COLOURS[str(rng.choice(list(COLOURS)))]
        x, y = (int(v) for v in rng.integers(0, size - 8, size=2))
        r = int(rng.integers(3, 7))
        d.ellipse([x, y, x + r, y + r], fill=other)
    rgb = np.array(COLOURS[colour]) + rng.integers(-20, 21, size=3)
    fill = tuple(int(v) for v in np.clip(rgb, 0, 255))
    s = size * float(rng.uniform(0.55, 0.8))
    cx, cy = (float(v) for v in rng.uniform(size * 0.35, size * 0.65, size=2))
    box = [cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=fill)
    elif shape == "stripes":
        step = max(2, int(s / 6))
        for k in range(int(box[0]), int(box[2]), 2 * step):
            d.rectangle([k, box[1], k + step, box[3]], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    angle = float(rng.uniform(-20, 20))
    if abs(angle) > 1:
        img = img.rotate(angle, resample=Image.BILINEAR, fillcolor=bg)
    return img


def checkerboard_png(size: int = 16) -> bytes:
    """A valid tiny PNG used where tests need a known-good image."""
    arr = ((np.indices((size, size)).sum(0) % 2) * 255).astype(np.uint8)
    return encode_png(Image.fromarray(arr).convert("RGB"))


