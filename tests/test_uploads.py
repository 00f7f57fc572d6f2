"""Reading clients' images (app/uploads.py): only PNG, JPEG and WebP, by content; bombs refused
from the header; every bad file a 4xx naming the field, never an exception of another kind."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

import pytest
from PIL import Image

from app.uploads import UploadError, as_mask, flatten, from_base64, read_image


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def picture(mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, (40, 24))
    image.putdata([(x * 6 % 256, y * 10 % 256, 90, 255)[: len(mode)]
                   for y in range(24) for x in range(40)])  # fmt: skip
    return image


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def declared_png(width: int, height: int) -> bytes:
    """A PNG header that declares width x height, and almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))  # fmt: skip


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_the_three_formats_are_read(fmt: str) -> None:
    upload = read_image("image", encoded(picture(), fmt))
    assert upload.format == fmt and upload.image.size == (40, 24)


def test_a_tiny_file_declaring_50000x50000_is_refused_413_before_decoding() -> None:
    data = declared_png(50000, 50000)
    assert len(data) < 100
    with pytest.raises(UploadError) as refused:
        read_image("image", data)
    assert refused.value.status == 413 and "more than 16777216 pixels" in refused.value.message
    with pytest.raises(UploadError, match="declares 5000x4000") as large:
        read_image("image", declared_png(5000, 4000))  # under Pillow's own limit, over ours
    assert large.value.status == 413


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "empty"),
        (b"hello, this is text in a file part", "not a PNG, JPEG or WebP"),
        (encoded(picture(), "GIF"), "not a PNG, JPEG or WebP"),  # a GIF, whatever its name
        (encoded(picture(), "BMP"), "not a PNG, JPEG or WebP"),
        (encoded(picture(), "PNG")[:60], "cannot be read as PNG"),  # truncated
        (encoded(picture(), "JPEG")[:30], "cannot be read as JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "cannot be read as PNG"),
    ],
)
def test_bad_files_are_refused_422_naming_the_field(data: bytes, says: str) -> None:
    with pytest.raises(UploadError) as refused:
        read_image("mask", data)
    assert refused.value.status == 422 and refused.value.field == "mask"
    assert says in refused.value.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_bit_flipped_files_are_read_or_refused_never_crash(fmt: str) -> None:
    good = encoded(picture(), fmt)
    rng = random.Random(fmt)
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        cut = bytes(data[: rng.randint(1, len(data))]) if rng.random() < 0.3 else bytes(data)
        try:
            upload = read_image("image", cut)
        except UploadError as refused:
            assert refused.status in (413, 422)
        else:
            assert upload.image.width * upload.image.height <= 4096 * 4096


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the stored 40x24 picture is shown 24x40
    upload = read_image("image", encoded(picture(), "JPEG", exif=exif.tobytes()))
    assert upload.image.size == (24, 40)


def test_alpha_is_flattened_over_white_for_the_source() -> None:
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert flatten(clear).getpixel((0, 0)) == (255, 255, 255)
    assert flatten(picture()).mode == "RGB"


def test_a_mask_is_white_to_repaint_or_transparent_to_repaint() -> None:
    white = Image.new("L", (4, 4), 0)
    white.putpixel((1, 1), 255)
    assert as_mask(white).getpixel((1, 1)) == 255 and as_mask(white).getpixel((0, 0)) == 0
    holed = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
    holed.putpixel((2, 2), (0, 0, 0, 0))  # OpenAI's convention: transparent is edited
    assert as_mask(holed).getpixel((2, 2)) == 255 and as_mask(holed).getpixel((0, 0)) == 0
    opaque = Image.new("RGBA", (4, 4), (255, 255, 255, 255))  # alpha says nothing: brightness
    assert as_mask(opaque).getpixel((0, 0)) == 255


def test_base64_plain_or_as_a_data_url() -> None:
    data = encoded(picture(), "PNG")
    plain = base64.b64encode(data).decode()
    assert from_base64("image", plain) == data
    assert from_base64("image", f"data:image/png;base64,{plain}") == data
    with pytest.raises(UploadError, match="image: is not valid base64"):
        from_base64("image", "not base64!!")


def test_line_wrapped_base64_and_data_urls_with_parameters() -> None:
    """What `base64` prints (lines of 76) and a data URL with a charset, as A1111 accepts them
    (issue 21, 18); a stray character is still refused."""
    data = encoded(picture(), "PNG")
    plain = base64.b64encode(data).decode()
    wrapped = "\n".join(plain[k : k + 76] for k in range(0, len(plain), 76)) + "\n"
    assert from_base64("image", wrapped) == data
    assert from_base64("image", f"data:image/png;charset=utf-8;base64,{wrapped}") == data
    with pytest.raises(UploadError, match="image: is not valid base64"):
        from_base64("image", plain[:40] + "!" + plain[40:])


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grey_is_scaled_not_clipped(mode: str) -> None:
    """A 25%-grey 16-bit PNG read as 255 (white: the whole picture repainted, issue 21, 5); it
    reads as 25% grey, as picture and as mask."""
    grey = Image.new("I", (32, 16), 16384).convert(mode)
    upload = read_image("mask", encoded(grey, "PNG"))
    assert upload.image.mode == "L"
    assert upload.image.getextrema() == (64, 64)
    assert as_mask(upload.image).getextrema() == (64, 64)
    assert flatten(upload.image).getpixel((0, 0)) == (64, 64, 64)


def test_reasons_name_no_memory_address_and_no_server_path() -> None:
    """Pillow names the file object it read (`<_io.BytesIO object at 0x...>`); storage errors
    name server paths (issue 21, 20): neither reaches a client."""
    from app.jobs.contract import plain_reason

    png = encoded(picture(), "PNG")
    with pytest.raises(UploadError) as refused:
        read_image("image", png[:60] + b"\0" * 40)
    assert "0x" not in refused.value.message and "BytesIO" not in refused.value.message
    said = plain_reason(ValueError("cannot identify image file <_io.BytesIO object at 0x7f3a>"))
    assert said == "cannot identify image file the file"
    denied = PermissionError(13, "Permission denied", "/var/lib/sdserve/results/x/0.png")
    assert plain_reason(denied) == "Permission denied"
    assert "/srv" not in plain_reason(RuntimeError("no room in /srv/images/ab/c.png, sorry"))
