"""The worker's PNG writer (worker/png.py): what Pillow reads back is the picture and its text,
exactly, at any size (in one zlib stream or in parts deflated side by side), and a file no
larger than Pillow's own at its fastest level."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from worker import png

INFOTEXT = "a fox\nNegative prompt: blurry\nSteps: 25, Sampler: DPM++ 2M, Seed: 7"


def smooth(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A picture that compresses as photographs do: gradients and a little grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     (x + y) * 127 // max(width + height - 2, 1)], -1)  # fmt: skip
    return np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)


def read(data: bytes) -> tuple[np.ndarray, dict[str, object]]:
    Image.open(io.BytesIO(data)).verify()  # every chunk's CRC, the stream's end
    picture = Image.open(io.BytesIO(data))
    assert picture.mode == "RGB"
    return np.asarray(picture), {str(key): value for key, value in picture.info.items()}


@pytest.mark.parametrize("height,width", [(1, 1), (5, 7), (96, 64), (400, 600), (1024, 1024)])
@pytest.mark.parametrize("kind", ["smooth", "noise"])
def test_pillow_reads_back_the_picture_and_its_text(height: int, width: int, kind: str) -> None:
    rng = np.random.default_rng(height * width)
    pixels = (smooth(height, width) if kind == "smooth"
              else rng.integers(0, 256, (height, width, 3), dtype=np.uint8))  # fmt: skip
    data = png.encode(pixels, {"parameters": INFOTEXT})
    back, info = read(data)
    assert back.shape == pixels.shape and (back == pixels).all()
    assert info["parameters"] == INFOTEXT
    # Past the threshold the bytes are deflated in parts: still one stream.
    assert (height * (1 + 3 * width) >= png.PART_FROM) == (height * width >= 400 * 600)


def test_text_beyond_latin_1_is_utf_8_and_a_view_of_a_bigger_array_is_fine() -> None:
    text = "日本の庭 🌸, <lora:style:0.7>\nSteps: 4"
    big = smooth(80, 120)
    pixels = big[10:74, 20:116]  # not contiguous
    back, info = read(png.encode(pixels, {"parameters": text, "Software": "sdserve"}))
    assert (back == pixels).all() and info["parameters"] == text and info["Software"] == "sdserve"


def test_no_larger_than_pillows_fastest() -> None:
    """A smooth 1024x1024 picture, and a 512x512 one: within 2% of Pillow's level-1 file."""
    for side in (512, 1024):
        pixels = smooth(side, side, seed=side)
        ours = png.encode(pixels, {"parameters": INFOTEXT})
        theirs = io.BytesIO()
        Image.fromarray(pixels).save(theirs, format="PNG", compress_level=1)
        assert len(ours) <= 1.02 * len(theirs.getvalue()), (side, len(ours), theirs.tell())
