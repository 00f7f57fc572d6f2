"""Tiles: a picture larger than one UNet call holds, denoised as overlapping tiles of latents.

Every step, each tile's latents go through the UNet as a row of their own (beside any other
rows of the tile's size), and the tiles' outputs are blended back into one output for the
whole picture, which then advances as one sample (MultiDiffusion). Where tiles overlap, each
tile's weight falls off linearly toward its edge, so no tile border shows: each step's output
is a smooth mix across the overlap, and the next step starts every tile from the same blended
sample. Pure tensor code: the engine decides when a lane is tiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.jobs.tiles import starts, whole
from worker.devices import placed


def _ramp(length: int, start: int, tile: int, overlap: int) -> torch.Tensor:
    """One tile's weight along one side: 1 inside, falling linearly toward a side it shares
    with a neighbour over `overlap`; no fall at the picture's own edge."""
    weight = torch.ones(tile, dtype=torch.float32)
    fall = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    if start > 0 and overlap:
        weight[:overlap] = fall
    if start + tile < length and overlap:
        weight[-overlap:] = torch.minimum(weight[-overlap:], fall.flip(0))
    return weight


@dataclass(frozen=True, eq=False)
class Tiling:
    """How one lane's latents are cut: tiles of `tile` latents (height, width) at `corners`
    (top, left), and each tile's share of every position it covers (shares sum to 1)."""

    canvas: tuple[int, int]  # the whole picture's latents, (height, width)
    tile: tuple[int, int]
    corners: tuple[tuple[int, int], ...]
    shares: torch.Tensor  # (tiles, 1, tile height, tile width), float32

    @property
    def count(self) -> int:
        return len(self.corners)

    def split(self, latents: torch.Tensor) -> torch.Tensor:
        """(images, C, H, W) to (images x tiles, C, th, tw), each image's tiles together."""
        th, tw = self.tile
        crops = [latents[:, :, y : y + th, x : x + tw] for y, x in self.corners]
        return torch.stack(crops, 1).flatten(0, 1)

    def merge(self, rows: torch.Tensor) -> torch.Tensor:
        """The inverse of `split` for outputs: each position the share-weighted sum of the
        tiles over it, added up in float32."""
        th, tw = self.tile
        images = len(rows) // self.count
        tiles = rows.view(images, self.count, *rows.shape[1:]).float()
        weighted = tiles * self.shares
        out = rows.new_zeros((images, rows.shape[1], *self.canvas), dtype=torch.float32)
        for k, (y, x) in enumerate(self.corners):
            out[:, :, y : y + th, x : x + tw] += weighted[:, k]
        return out.to(rows.dtype)


def tiling(
    canvas: tuple[int, int], tile: int, overlap: int, device: torch.device | None = None
) -> Tiling | None:
    """The tiles of a canvas of latents (height, width), tiles of at most `tile` latents a side
    overlapping by `overlap`; None when it has no more than one tile's latents, in any shape
    (app/jobs/tiles.py `whole`). The shares on `device` (where the lane's outputs are merged:
    a copy there at every step would make the loop's thread wait for the GPU)."""
    height, width = canvas
    rows, columns = starts(height, tile, overlap), starts(width, tile, overlap)
    if whole(canvas, tile) or (len(rows) == 1 and len(columns) == 1):
        return None
    th, tw = min(tile, height), min(tile, width)
    corners = tuple((y, x) for y in rows for x in columns)
    weights = torch.stack([
        _ramp(height, y, th, overlap)[:, None] * _ramp(width, x, tw, overlap)[None, :]
        for y, x in corners
    ])  # fmt: skip
    total = torch.zeros(canvas, dtype=torch.float32)
    for (y, x), weight in zip(corners, weights, strict=True):
        total[y : y + th, x : x + tw] += weight
    shares = torch.stack([
        weight / total[y : y + th, x : x + tw] for (y, x), weight in zip(corners, weights,
                                                                          strict=True)
    ])[:, None]  # fmt: skip
    if device is not None:
        shares = placed(shares, device)
    return Tiling(canvas, (th, tw), corners, shares)
