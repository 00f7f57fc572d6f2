"""How a source picture (and its mask) is fitted to the job's size where their shapes differ:
A1111's img2img resize modes, as diffusers' image processor has them (`resize_mode` default,
crop and fill), done once in the API before the pictures are stored."""

from __future__ import annotations

from PIL import Image

from app.jobs.contract import SourceResize

LANCZOS = Image.Resampling.LANCZOS


def framed(picture: Image.Image, size: tuple[int, int], how: SourceResize) -> Image.Image:
    """The picture at `size` (width, height). resize: stretched to it. crop: scaled to cover it
    (aspect kept), centred, what overflows cut off. fill: scaled to fit inside it (aspect
    kept), centred, the bands left filled with the picture's nearest row or column drawn out."""
    if picture.size == size:
        return picture
    if how == "resize":
        return picture.resize(size, LANCZOS)
    width, height = size
    frame, own = width / height, picture.width / picture.height  # compared as diffusers does
    # crop: scaled to the frame's width where the frame is the wider; fill: where it is the
    # narrower; else to its height.
    across = frame > own if how == "crop" else frame < own
    scaled = (width, picture.height * width // picture.width) if across else (
        picture.width * height // picture.height, height)  # fmt: skip
    inner = picture.resize(scaled, LANCZOS)
    left, top = width // 2 - scaled[0] // 2, height // 2 - scaled[1] // 2
    made = Image.new(picture.mode, size)
    made.paste(inner, (left, top))
    if how == "fill" and frame != own:
        _draw_out_edges(made, inner, left, top)
    return made


def _draw_out_edges(made: Image.Image, inner: Image.Image, left: int, top: int) -> None:
    """Fill's bands: above and below the picture, its first and last rows stretched down the
    band (or, beside it, its first and last columns stretched across); bicubic, as A1111 and
    diffusers stretch them."""
    width, height = made.size
    cubic = Image.Resampling.BICUBIC
    if top > 0:
        made.paste(inner.resize((width, top), cubic, box=(0, 0, width, 0)), (0, 0))
        made.paste(inner.resize((width, top), cubic, box=(0, inner.height, width, inner.height)),
                   (0, top + inner.height))  # fmt: skip
    elif left > 0:
        made.paste(inner.resize((left, height), cubic, box=(0, 0, 0, height)), (0, 0))
        made.paste(inner.resize((left, height), cubic, box=(inner.width, 0, inner.width, height)),
                   (left + inner.width, 0))  # fmt: skip
