"""Images sent by clients (img2img and inpainting sources, masks): read safely, or refused with a
4xx naming the field.

Only PNG, JPEG and WebP, told by their first bytes (never by a name or a declared type). The
pixel count comes from the header and is checked before anything is decoded, so a small file
that declares a huge image (a decompression bomb) is refused without the memory it asks for.
EXIF orientation is applied, so the picture is the way up the camera meant it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

from app.jobs.contract import plain_reason

# What each accepted format's files start with (WebP: "RIFF", four bytes of size, "WEBP").
_SIGNATURES = {
    "PNG": (re.compile(rb"\A\x89PNG\r\n\x1a\n", re.DOTALL)),
    "JPEG": (re.compile(rb"\A\xff\xd8\xff", re.DOTALL)),
    "WEBP": (re.compile(rb"\ARIFF....WEBP", re.DOTALL)),
}
# A source larger than this is refused before decoding: 4096 x 4096 (a 1024 x 1024 output needs
# no more; a larger source is resized down anyway).
MAX_PIXELS = 4096 * 4096
# A data URL may carry parameters before `;base64` (`data:image/png;charset=utf-8;base64,`).
_DATA_URL = re.compile(r"\Adata:image/[a-z0-9.+-]+(;[a-z0-9_.+-]+=[^;,]*)*;base64,", re.IGNORECASE)
# Grey at 16 bits (and 32-bit integer pixels): Pillow's conversion to 8 bits clips every value
# over 255 to white; these are scaled down instead.
_WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class UploadError(ValueError):
    """A client's image that cannot be used; `status` is 413 (too large) or 422."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Upload:
    image: Image.Image  # decoded, orientation applied
    format: str  # PNG, JPEG or WEBP


def from_base64(field: str, text: str) -> bytes:
    """The bytes of a base64 image, plain or as a `data:image/...;base64,` URL."""
    payload = _DATA_URL.sub("", text.strip(), count=1)
    # Line-wrapped base64 (what `base64` prints; A1111 accepts it): the breaks are not data.
    payload = "".join(payload.split())
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(field, "is not valid base64 (plain, or a data:image/... URL)") from None


def read_image(field: str, data: bytes, max_pixels: int = MAX_PIXELS) -> Upload:
    """Decode `data` as an image, or raise `UploadError` naming `field`."""
    if not data:
        raise UploadError(field, "is empty")
    kind = next((name for name, sig in _SIGNATURES.items() if sig.match(data)), None)
    if kind is None:
        raise UploadError(field, "is not a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns (or raises) on its limit; ours comes first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=[kind])
            width, height = opened.size
            if width * height > max_pixels:
                raise UploadError(
                    field,
                    f"declares {width}x{height}: more than {max_pixels} pixels",
                    status=413,
                )
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except UploadError:
        raise
    except Image.DecompressionBombError:  # Pillow's own check, on a header larger still
        raise UploadError(field, f"declares more than {max_pixels} pixels", status=413) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise UploadError(field, f"cannot be read as {kind}: {plain_reason(e)}") from None
    if image.width < 1 or image.height < 1:
        raise UploadError(field, "has no pixels")
    if image.mode in _WIDE_GREY:
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return Upload(image, kind)


def flatten(image: Image.Image) -> Image.Image:
    """RGB, any transparency laid over white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def as_mask(image: Image.Image) -> Image.Image:
    """The mask as L, white repaints. A mask with transparency is read as OpenAI reads it:
    where it is transparent (alpha 0) is repainted. Otherwise (no alpha, or alpha that is
    opaque everywhere) its brightness is the mask."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        lowest, _highest = alpha.getextrema()
        if isinstance(lowest, int) and lowest < 255:
            return alpha.point(lambda a: 255 if a == 0 else 0)
    return image.convert("L")


def to_png(image: Image.Image) -> bytes:
    """The picture as the API stores it. Zlib's fastest level: it is written on the request's
    path, and Pillow's default level took 2.3 s for a 2048x2048 picture (an upscale's input,
    stored enlarged) against 0.3 s, for files about 15% larger (2 CPUs; `bench.png`'s
    smooth picture, enlarged)."""
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()
