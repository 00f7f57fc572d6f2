"""Inpainting's masks, as both sides read them: where the result is laid over the source, and
the box that inpainting of the masked area only (`mask_crop`: A1111's "only masked",
diffusers' `padding_mask_crop`) cuts from the picture.

With `mask_crop` the API keeps the picture and mask at their own size and finds the box
(`mask_box`: around what the mask repaints, a margin added, widened to the drawn size's
aspect); the job's size is then the size the box is drawn at. The worker cuts the picture and
mask by the box (`Cut`), denoises the cut, and lays the result back into the whole picture
(worker/sources.py). ControlNet pictures are cut by the same box (app/controls.py), so they
line up with what is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageFilter

Box = tuple[int, int, int, int]  # left, top, right, bottom, as Pillow's `crop` takes it
Size = tuple[int, int]  # width, height


def repainted(mask: Image.Image, blur: int) -> Image.Image:
    """The mask (L) as the result is laid through it: black or white as the denoising saw it
    (white from 128), its edge then blurred by `blur` pixels."""
    sharp = mask.point(lambda v: 255 if v >= 128 else 0)
    return sharp.filter(ImageFilter.GaussianBlur(blur)) if blur else sharp


def mask_box(mask: Image.Image, padding: int, blur: int, size: Size) -> Box:
    """The part of the picture a masked-area job draws at `size`: the bounds of what the mask
    lays the result over (its blurred edge included), `padding` pixels more on each side, then
    widened across or down, about its middle, to `size`'s aspect, kept within the picture. A
    mask that repaints nothing: the whole picture."""
    bounds = repainted(mask, blur).getbbox()
    if bounds is None:
        return (0, 0, mask.width, mask.height)
    left, top = max(bounds[0] - padding, 0), max(bounds[1] - padding, 0)
    right, bottom = min(bounds[2] + padding, mask.width), min(bounds[3] + padding, mask.height)
    width, height = size
    # Integer arithmetic: the wanted extent rounded down, as diffusers' `get_crop_region` does.
    if (right - left) * height > (bottom - top) * width:
        top, bottom = _widened(top, bottom, (right - left) * height // width, mask.height)
    else:
        left, right = _widened(left, right, (bottom - top) * width // height, mask.width)
    return left, top, right, bottom


def _widened(start: int, end: int, wanted: int, limit: int) -> tuple[int, int]:
    """[start, end) grown to `wanted` about its middle, then moved back within [0, limit)
    (and cut there, when the picture is narrower than wanted)."""
    grow = wanted - (end - start)
    start, end = start - grow // 2, end + grow - grow // 2
    if end > limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


@dataclass(frozen=True)
class Cut:
    """A box of a picture of size `whole`, drawn at `size`: what a masked-area job denoises."""

    box: Box
    whole: Size
    size: Size

    def of(self, picture: Image.Image) -> Image.Image:
        """The box of a picture of the whole size, stretched to the drawn size (Lanczos)."""
        assert picture.size == self.whole, "a cut applies to the picture it was found in"
        part = picture.crop(self.box)
        return part if part.size == self.size else part.resize(self.size, Image.Resampling.LANCZOS)

    def back(self, drawn: Image.Image, whole: Image.Image, mask: Image.Image,
             blur: int) -> Image.Image:  # fmt: skip
        """What was drawn, brought back to the box's size and laid into the whole picture
        through its mask (`repainted`): outside the mask the picture's own pixels."""
        left, top, right, bottom = self.box
        pasted = whole.copy()
        pasted.paste(drawn.resize((right - left, bottom - top), Image.Resampling.LANCZOS),
                     (left, top))  # fmt: skip
        return Image.composite(pasted, whole, repainted(mask, blur))
