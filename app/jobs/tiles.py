"""Where a large picture's tiles go: plain arithmetic, shared by the engine (worker/tiles.py,
which denoises them) and the API (which counts a job's UNet rows for its ETA)."""

from __future__ import annotations

import math

# A picture of more than TILE x TILE pixels is denoised in tiles of TILE overlapping by
# TILE_OVERLAP (the workers' defaults: SDSERVE_TILE, SDSERVE_TILE_OVERLAP); one of as many
# pixels or fewer, in one piece whatever its shape (SDXL's 1344x768 is drawn whole).
TILE, TILE_OVERLAP = 1024, 128


def whole(size: tuple[int, int], tile: int) -> bool:
    """Whether a picture of `size` (either order of its sides) is denoised in one piece."""
    return size[0] * size[1] <= tile * tile


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` start along a side of `length`, overlapping by `overlap` at least,
    evenly spread so the first starts at 0 and the last ends at `length`."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(k * (length - tile) / (count - 1)) for k in range(count)]


def tile_count(size: tuple[int, int], tile: int, overlap: int) -> int:
    """Tiles a picture of `size` (width, height) takes; 1 when it fits in one."""
    if whole(size, tile):
        return 1
    return len(starts(size[0], tile, overlap)) * len(starts(size[1], tile, overlap))
