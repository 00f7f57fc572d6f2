"""ControlNet per row (issue 24): rows with and without ControlNets, with different models,
weights and start/end ranges, in one UNet call.

The design, and why. diffusers' ControlNet pipelines run one set of units over a whole batch,
so a row without control would wait for a batch of its own. Here each step gathers, for each
ControlNet model, only the rows that use it (and only while their step is inside the unit's
start/end range), runs that ControlNet on them, scales each row's residuals by its own weight
(and by the guess-mode ramp where the unit asks for it), and adds them, per row, into residual
tensors of the whole call (zero on every other row), which the UNet takes as diffusers' UNet
takes a ControlNet's: `down_block_additional_residuals`, `mid_block_additional_residual`. A row
without control thus sees zero residuals: its output is the UNet's alone. Several units of one
row add up, as diffusers' `MultiControlNetModel` adds them.

The residuals travel with the call's other per-row tensors (`worker/compiled.py` pads, splits
and orders them as it does SDXL's added conditioning), under the keys `control.down.K` and
`control.mid`; a worker that serves ControlNets gives them to every call (zeros when no row has
control), so its compiled UNet has one signature. The ControlNets are compiled beside the UNet
(`worker/compiled.py` `run_control`: the same row buckets and prompt lengths, warmed up before
serving), since an eager ControlNet costs a launch-bound 18 ms per call at 2 rows on an H200
(3 ms compiled) and is far from linear in its rows; each starts from its control images'
embeddings, made once per job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from PIL import Image

from worker.devices import on_device, placed

log = logging.getLogger("sdserve.controls")

DOWN = "control.down."  # + the residual's index: one per UNet down-path output
MID = "control.mid"


@dataclass(frozen=True)
class ControlUse:
    """One ControlNet unit of an image: its model, its control image (RGB, already through
    any preprocessor), and how strongly and when it steers."""

    model: str
    image: Image.Image
    weight: float = 1.0
    start: float = 0.0  # fraction of the steps before which the unit is off
    end: float = 1.0  # fraction of the steps after which it is off
    # A1111's "ControlNet is more important" (diffusers' guess mode): the unit steers the cond
    # row only, its residuals ramped from 0.1 (shallowest) to 1 (the middle block).
    guess: bool = False
    # A1111's "My prompt is more important": every residual scaled by 0.825 per level below
    # the middle block, on both rows.
    soft: bool = False


@dataclass(frozen=True)
class RowControl:
    """A unit on one cond row of a lane, its control image ready: prepared as diffusers'
    ControlNet pipelines prepare it, then through its ControlNet's image embedding (the
    model's first channels x the latents' size), on the device in the model's dtype."""

    row: int
    use: ControlUse
    cond: torch.Tensor


class Block(NamedTuple):
    """One block of a call's rows (a lane's cond rows, or a guided lane's uncond rows): what
    its units need to know."""

    rows: int
    step: int  # the lane's step now, of
    steps: int
    controls: tuple[RowControl, ...]
    cond: bool  # cond rows (uncond rows take no guess-mode unit)


class ControlRefused(ValueError):
    """A unit this worker cannot run for the job (a ControlNet it does not hold, a picture in
    tiles): the job fails `invalid_request`, the worker goes on."""


def steering(use: ControlUse, step: int, steps: int) -> bool:
    """Whether a unit steers this step, by diffusers' rule for `control_guidance_start/end`."""
    return not (step / steps < use.start or (step + 1) / steps > use.end)


# One ControlNet forward: (name, latents, timesteps, context, embedded control images, SDXL's
# added conditioning) -> the residuals, the down path's then the middle block's. The
# compiled-call boundary gives the compiled one (worker/compiled.py `run_control`).
ControlForward = Callable[
    [str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None],
    Sequence[torch.Tensor],
]


class ControlNets:
    """The ControlNets of one model, by name, and the per-row residuals of a call."""

    def __init__(self, models: dict[str, Any], unet: Any) -> None:
        self.models = models
        self.unet = unet
        self._shapes: dict[tuple[int, int], list[tuple[int, ...]]] = {}
        # A control image's embedding (a few convolutions at the picture's full size) depends
        # on the picture alone: it is computed once, when the unit's job joins (`embed`), not
        # at every step (on an H200, 14 of a ControlNet forward's 81 ms at 62 rows; the
        # result is the same). Each model's forward then starts from the embedding.
        self.embedders: dict[str, Any] = {}
        for name, model in models.items():
            self.embedders[name] = model.controlnet_cond_embedding
            model.controlnet_cond_embedding = torch.nn.Identity()

    @torch.inference_mode()
    def embed(self, name: str, pixels: torch.Tensor) -> torch.Tensor:
        """A unit's control image (3, height, width) as its ControlNet's down path takes it."""
        embedder = self.embedders[name]
        weight = next(embedder.parameters())
        out: torch.Tensor = embedder(pixels[None].to(weight.device, weight.dtype))[0]
        return out

    def cond_shape(self, name: str, height: int, width: int) -> tuple[int, ...]:
        """An embedded control image's shape for latents of this size: what the forward adds it
        to, the output of the ControlNet's first convolution."""
        return (self.models[name].config.block_out_channels[0], height, width)

    def eager(
        self,
        name: str,
        sample: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        cond: torch.Tensor,
        added: dict[str, torch.Tensor] | None,
    ) -> Sequence[torch.Tensor]:
        """One ControlNet forward as loaded (no compilation), in the model's dtype."""
        model = self.models[name]
        dtype = model.dtype
        if added is not None:
            added = {k: v.to(dtype) for k, v in added.items()}
        down, mid = model(sample.to(dtype), t, context.to(dtype), cond.to(dtype),
                          added_cond_kwargs=added, return_dict=False)  # fmt: skip
        return [*down, mid]

    @staticmethod
    def fits(controlnet: Any, unet: Any) -> str | None:
        """Why the ControlNet cannot steer this UNet (None: it can): another family or size,
        or more input channels than the UNet's (a ControlNet reads the first of them)."""
        if controlnet.config.in_channels > unet.config.in_channels:
            return (f"it reads {controlnet.config.in_channels} input channels, the model has"
                    f" {unet.config.in_channels}")  # fmt: skip
        for key in ("cross_attention_dim", "block_out_channels", "addition_embed_type"):
            theirs, ours = controlnet.config.get(key), unet.config.get(key)
            if (list(theirs) if isinstance(theirs, tuple) else theirs) != (
                list(ours) if isinstance(ours, tuple) else ours
            ):
                return f"its {key} is {theirs}, the model's {ours}"
        return None

    def check(self, uses: Sequence[ControlUse]) -> None:
        for use in uses:
            if use.model not in self.models:
                raise ControlRefused(
                    f"controlnets: {use.model!r} is not a ControlNet this worker holds for the"
                    f" model (it holds {sorted(self.models) or 'none'})"
                )

    def shapes(self, height: int, width: int) -> list[tuple[int, ...]]:
        """The residuals' shapes (without the row) for latents of this size: the down path's
        outputs, then the middle block's (learnt once per size from a ControlNet's own call)."""
        if (height, width) not in self._shapes:
            name, controlnet = next(iter(self.models.items()))
            config = controlnet.config
            device, dtype = controlnet.device, controlnet.dtype
            sample = torch.zeros(1, config.in_channels, height, width, device=device, dtype=dtype)
            context = torch.zeros(1, 77, config.cross_attention_dim, device=device, dtype=dtype)
            cond = torch.zeros(1, *self.cond_shape(name, height, width), device=device,
                               dtype=dtype)  # fmt: skip
            added = _zero_added(self.unet, 1, device, dtype)
            with torch.inference_mode():
                t = torch.tensor([500.0], device=device)
                outputs = self.eager(name, sample, t, context, cond, added)
            self._shapes[(height, width)] = [tuple(r.shape[1:]) for r in outputs]
        return self._shapes[(height, width)]

    def zeros(self, rows: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """Residuals of no control, for `rows` rows of latents of this size."""
        device, dtype = self.unet.device, self.unet.dtype
        shapes = self.shapes(height, width)
        out = {f"{DOWN}{k}": torch.zeros(rows, *shape, device=device, dtype=dtype)
               for k, shape in enumerate(shapes[:-1])}  # fmt: skip
        out[MID] = torch.zeros(rows, *shapes[-1], device=device, dtype=dtype)
        return out

    def residuals(
        self,
        parts: Sequence[Block],
        sample: torch.Tensor,
        t: torch.Tensor,
        blocks: Sequence[torch.Tensor],
        added: dict[str, torch.Tensor] | None,
        forward: ControlForward,
    ) -> dict[str, torch.Tensor]:
        """Every row's residuals for one step, in the call's row order: `parts` and `blocks`
        (their prompt embeddings) row block for row block; each ControlNet run by `forward` on
        its rows only."""
        height, width = sample.shape[-2:]
        out = self.zeros(len(sample), height, width)
        # (row in the call, its block, its row in the block, the unit's row control)
        entries: list[tuple[int, int, int, RowControl]] = []
        at = 0
        for block, part in enumerate(parts):
            for control in part.controls:
                if (part.cond or not control.use.guess) and steering(control.use, part.step,
                                                                     part.steps):  # fmt: skip
                    entries.append((at + control.row, block, control.row, control))
            at += part.rows
        groups: dict[tuple[str, int], list[tuple[int, int, int, RowControl]]] = {}
        for entry in entries:
            groups.setdefault((entry[3].use.model, blocks[entry[1]].shape[1]), []).append(entry)
        for (name, _tokens), members in groups.items():
            index = on_device([m[0] for m in members], torch.long, sample.device)
            context = torch.stack([blocks[m[1]][m[2]] for m in members])
            conds = torch.stack([m[3].cond for m in members])
            mine = None
            if added is not None:
                mine = {k: v.index_select(0, index) for k, v in added.items()}
            # The latents alone: an inpainting UNet's input carries the mask and the masked
            # picture's latents after them, which a ControlNet never reads (as diffusers'
            # inpainting ControlNet pipeline gives it its latents only).
            channels = self.models[name].config.in_channels
            outputs = forward(name, sample.index_select(0, index)[:, :channels],
                              t.index_select(0, index), context, conds, mine)  # fmt: skip
            weights = [m[3].use.weight for m in members]
            levels = len(outputs)
            guess = torch.logspace(-1, 0, levels).tolist()  # diffusers' guess-mode scales
            soft = [0.825 ** (levels - 1 - k) for k in range(levels)]  # A1111's soft injection
            for k, residual in enumerate(outputs):
                scale = [w * (guess[k] if m[3].use.guess else soft[k] if m[3].use.soft else 1.0)
                         for w, m in zip(weights, members, strict=True)]  # fmt: skip
                factor = on_device(scale, residual.dtype, residual.device).view(-1, 1, 1, 1)
                key = MID if k == levels - 1 else f"{DOWN}{k}"
                out[key].index_add_(0, index, (residual * factor).to(out[key].dtype))
        return out


def split(extra: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A call's per-row extras apart: SDXL's added conditioning, and the UNet's keyword
    arguments for ControlNet residuals (none when there are none)."""
    added = {k: v for k, v in extra.items() if not k.startswith("control.")}
    if MID not in extra:
        return added, {}
    downs = sorted((k for k in extra if k.startswith(DOWN)), key=lambda k: int(k[len(DOWN) :]))
    return added, {
        "down_block_additional_residuals": tuple(extra[k] for k in downs),
        "mid_block_additional_residual": extra[MID],
    }


def _zero_added(unet: Any, rows: int, device: Any, dtype: Any) -> dict[str, torch.Tensor] | None:
    """SDXL's added conditioning of zeros (a shape probe needs some); None for SD 1.x/2.x."""
    if unet.config.get("addition_embed_type") != "text_time":
        return None
    time_ids = unet.config.projection_class_embeddings_input_dim
    width = unet.config.addition_time_embed_dim
    text = time_ids - 6 * width
    return {"text_embeds": torch.zeros(rows, text, device=device, dtype=dtype),
            "time_ids": torch.zeros(rows, 6, device=device, dtype=dtype)}  # fmt: skip


def control_image(processor: Any, use: ControlUse, width: int, height: int, device: Any,
                  dtype: Any) -> torch.Tensor:  # fmt: skip
    """The unit's image as diffusers' ControlNet pipelines prepare it: RGB, resized to the
    picture, in [0, 1], not normalized. Placed without waiting for the GPU (it is read at the
    job's join, on the loop's thread: a pageable copy would wait for every step queued)."""
    pixels: torch.Tensor = processor.preprocess(use.image, height=height, width=width)
    placed_pixels: torch.Tensor = placed(pixels[0], device, dtype)
    return placed_pixels
