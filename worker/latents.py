"""Latent preparation (diffusers' `prepare_latents`): a job's lane at its first step, from noise
(text to image), from a picture noised to where its plan starts (img2img, inpainting, upscaling,
a hires fix's second pass), or the x4 upscaler's noise beside its noised low-resolution picture;
with each row's prompt embeddings and guidance, in tiles when the picture is larger than one
tile. Every image draws from its own generator in diffusers' order, so an image is its seed's
whatever shares its UNet calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from app.jobs.contract import Hires
from worker.adapters import Adapters
from worker.compiled import Tuning
from worker.components import Components
from worker.controls import ControlNets, ControlRefused, RowControl, control_image
from worker.devices import on_device, placed
from worker.families import Family
from worker.inputs import BatchShape, ImageSpec, NoVae, Source
from worker.plans import Plan, probe, refiner_start, start_step
from worker.rows import Inpainting, Lane
from worker.tiles import tiling
from worker.vae import Vae


class LatentMaker:
    def __init__(
        self,
        parts: Components,
        family: Family,
        vae: Vae,
        tuning: Tuning,
        adapters: Adapters | None = None,
    ) -> None:
        self.parts = parts
        self.adapters = adapters  # LoRAs per row, where served
        self.vaes: dict[str, Vae] = {}  # the VAEs a job may choose (SDSERVE_VAES), by name
        self.family = family
        self.vae = vae
        self.tuning = tuning
        self.device = parts.device
        self.dtype = parts.dtype
        self.scale = parts.latent_scale
        self.channels = int(parts.vae.config.latent_channels)
        # Source images and masks are prepared as diffusers' img2img and inpainting pipelines
        # prepare them (resizing, normalizing, a mask made black or white).
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.scale)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.scale,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )
        # Control images as diffusers' ControlNet pipelines prepare them (RGB, in [0, 1]).
        self.control_processor = VaeImageProcessor(
            vae_scale_factor=self.scale, do_convert_rgb=True, do_normalize=False
        )
        self.controls: ControlNets | None = None  # the model's ControlNets, where served
        self._plans: dict[tuple[str, int, int, bool], Plan] = {}
        self._blank: dict[tuple[int, int], torch.Tensor] = {}

    def codec(self, specs: Sequence[ImageSpec]) -> Vae:
        """The VAE the job's images are encoded and decoded by: its choice, or the model's."""
        name = specs[0].vae
        if name is None:
            return self.vae
        if name not in self.vaes:
            raise NoVae(f"vae: {name!r} is not a VAE this worker holds for"
                        f" {Path(self.parts.model).name}")  # fmt: skip
        return self.vaes[name]

    def plan(self, sampler: str, steps: int, start: int = 0, fresh: bool = False) -> Plan:
        """The sampler's plan over so many steps, probed once per (sampler, steps, start,
        fresh): a bounded set (8 samplers, 100 steps, their starts, two kinds)."""
        key = (sampler, steps, start, fresh)
        if key not in self._plans:
            self._plans[key] = probe(sampler, steps, self.parts.scheduler_config, start, fresh)
        return self._plans[key]

    def noise(
        self, specs: Sequence[ImageSpec], shape: BatchShape
    ) -> tuple[list[torch.Generator], torch.Tensor]:
        """One generator per image (its noise, ancestral noise included, is its own) and the
        unscaled starting noise."""
        generators = [torch.Generator(self.device).manual_seed(s.seed) for s in specs]
        size = (len(specs), self.channels, shape.height // self.scale, shape.width // self.scale)
        noise = randn_tensor(size, generator=generators, device=self.device, dtype=self.dtype)
        return generators, noise

    def prepare(
        self, key: str, specs: Sequence[ImageSpec], shape: BatchShape, source: Source | None = None
    ) -> Lane:
        """A lane from whatever `source` is (for callers without a task: tests, benchmarks);
        the loops ask the job's task, which knows (worker/tasks.py)."""
        if source is None:
            return self.from_noise(key, specs, shape)
        if source.noise_level is not None:
            return self.from_low_res(key, specs, shape, source)
        return self.from_picture(key, specs, shape, source)

    @torch.inference_mode()
    def from_noise(self, key: str, specs: Sequence[ImageSpec], shape: BatchShape) -> Lane:
        """Text to image: a job's images at their first step from noise, made exactly as
        `generate` makes it."""
        plan = self.plan(shape.scheduler, shape.steps)
        generators, noise = self.noise(specs, shape)
        return self._lane(key, specs, shape, plan, generators, noise * plan.init_sigma)

    @torch.inference_mode()
    def from_picture(
        self, key: str, specs: Sequence[ImageSpec], shape: BatchShape, source: Source
    ) -> Lane:
        """img2img, inpainting, upscaling: the source's latents noised to where the plan
        starts, as diffusers' img2img and inpainting pipelines make them for each image's
        seed."""
        start = start_step(shape.steps, source.strength)
        blends = source.mask is not None and not self.parts.inpainting_unet
        plan = self.plan(shape.scheduler, shape.steps, start, fresh=blends)
        generators = [torch.Generator(self.device).manual_seed(s.seed) for s in specs]
        codec = self.codec(specs)
        latents, inpainting, conditioning = self._from_source(generators, shape, source, plan,
                                                              codec)  # fmt: skip
        return self._lane(key, specs, shape, plan, generators, latents, inpainting, conditioning)

    @torch.inference_mode()
    def from_low_res(
        self, key: str, specs: Sequence[ImageSpec], shape: BatchShape, source: Source
    ) -> Lane:
        """The x4 upscaler: noise beside the picture noised to the source's level."""
        assert source.noise_level is not None, "the x4 upscaler noises its picture"
        plan = self.plan(shape.scheduler, shape.steps)
        generators = [torch.Generator(self.device).manual_seed(s.seed) for s in specs]
        conditioning, labels = self._low_res(source.image, source.noise_level, generators)
        noise = randn_tensor((len(specs), self.channels, *conditioning.shape[-2:]),
                             generator=generators, device=self.device,
                             dtype=self.dtype)  # fmt: skip
        latents = noise * plan.init_sigma
        return self._lane(key, specs, shape, plan, generators, latents, None, conditioning, labels)

    def _low_res(
        self, picture: Image.Image, level: int, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The x4 upscaler's inputs: the picture at its own size noised to `level` by each
        image's generator (drawn first, as diffusers' upscale pipeline draws it), and the level
        per image."""
        low_res = self.parts.low_res_scheduler
        assert low_res is not None, "not an x4 upscaler"
        pixels = self.pixels(picture, BatchShape(picture.width, picture.height, 0, ""))
        levels = on_device([level], torch.long, self.device)
        noised = [
            low_res.add_noise(
                pixels,
                randn_tensor(pixels.shape, generator=g, device=self.device, dtype=self.dtype),
                levels,
            )
            for g in generators
        ]
        return torch.cat(noised), levels.expand(len(generators))

    @torch.inference_mode()
    def second_pass(
        self, lane: Lane, specs: Sequence[ImageSpec], shape: BatchShape, hires: Hires
    ) -> Lane:
        """A hires fix's second pass of a finished lane, at `shape`'s (larger) size: its
        picture enlarged (its latents bilinearly, or decoded, resized and encoded again) and
        noised to where the pass starts, as diffusers' img2img pipeline noises a picture,
        with each image's generator going on from the first pass."""
        start = start_step(shape.steps, hires.strength)
        plan = self.plan(shape.scheduler, shape.steps, start)
        generators = lane.generators
        small = (shape.height // self.scale, shape.width // self.scale)
        if hires.method == "latent":
            encoded = enlarged(lane.latents, small)
        else:
            size = (shape.width, shape.height)
            pictures = [
                Image.fromarray(
                    pixels if pixels is not None else np.zeros((1, 1, 3), np.uint8)
                ).resize(size, Image.Resampling.LANCZOS)
                for pixels in self.codec(specs).decode(lane.latents)
            ]
            encoded = torch.cat([
                self.codec(specs).sample_latents(self.pixels(picture, shape), [generator])
                for picture, generator in zip(pictures, generators, strict=True)
            ])  # fmt: skip
        noise = randn_tensor(encoded.shape, generator=generators, device=self.device,
                             dtype=self.dtype)  # fmt: skip
        latents = encoded * plan.noising[0] + noise * plan.noising[1]
        made = self._lane(lane.key, specs, shape, plan, generators, latents)
        made.earlier_steps = lane.earlier_steps + lane.steps
        return made

    def refiner_plan(self, shape: BatchShape, switch_at: float) -> Plan | None:
        """This model's plan as a refiner: its schedule of `shape`'s steps from the switch;
        None where no step of it falls below the switch (a switch near 1, few steps): the
        refiner runs none, as diffusers' `denoising_start` then does."""
        config = self.parts.scheduler_config
        start = refiner_start(shape.scheduler, shape.steps, config, switch_at)
        if start >= shape.steps:
            return None
        return self.plan(shape.scheduler, shape.steps, start)

    @torch.inference_mode()
    def refined(
        self, lane: Lane, specs: Sequence[ImageSpec], shape: BatchShape, switch_at: float
    ) -> Lane | None:
        """A refiner's pass (this model is the refiner) of a lane its base model denoised to
        the switch, as diffusers' ensemble hands the base's latents to the refiner's
        `denoising_start`: the same latents, no noise added, on from the switch in this
        model's schedule, its own prompt conditioning, each image's generator going on. None
        where the refiner has no step to run: the base's lane is the job's last."""
        plan = self.refiner_plan(shape, switch_at)
        if plan is None:
            return None
        latents = lane.latents.to(self.dtype)
        made = self._lane(lane.key, specs, shape, plan, lane.generators, latents)
        made.earlier_steps = lane.earlier_steps + lane.steps
        return made

    def _lane(
        self,
        key: str,
        specs: Sequence[ImageSpec],
        shape: BatchShape,
        plan: Plan,
        generators: list[torch.Generator],
        latents: torch.Tensor,
        inpainting: Inpainting | None = None,
        conditioning: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Lane:
        """A lane of these latents: the prompts' embeddings and guidance per row, in tiles
        when the picture is larger than one tile."""
        picture = (shape.width, shape.height)
        cond = self.family.conditioning(specs, picture)
        uncond = None
        if any(s.guidance_scale > 1 for s in specs):
            uncond = self.family.conditioning(specs, picture, negative=True)
        guidance = on_device([s.guidance_scale for s in specs], self.dtype, self.device)
        guidance = guidance.view(-1, 1, 1, 1)
        # Each image's LoRAs, on its cond and uncond rows alike (diffusers' LoRAs adapt both).
        mix = None if self.adapters is None else self.adapters.mix([s.loras for s in specs])
        scale = self.scale
        tiles = tiling(
            (shape.height // scale, shape.width // scale),
            self.tuning.tile // scale,
            self.tuning.tile_overlap // scale,
            self.device,
        )
        size = picture
        if tiles is not None:  # every per-row tensor gets a row per tile
            size = (tiles.tile[1] * scale, tiles.tile[0] * scale)
            cond = cond.repeated(tiles.count)
            guidance = guidance.repeat_interleave(tiles.count, 0)
            if mix is not None:
                mix = mix.repeated(tiles.count)
            if uncond is not None:
                uncond = uncond.repeated(tiles.count)
            if conditioning is not None:
                conditioning = tiles.split(conditioning)
            if labels is not None:
                labels = labels.repeat_interleave(tiles.count, 0)
        controls = self._controls(specs, size, tiles is not None)
        if self.parts.inpainting_unet and conditioning is None:
            whole = self.whole_picture(BatchShape(*size, shape.steps, shape.scheduler))
            conditioning = whole.expand(len(cond.context), -1, -1, -1)
        return Lane(
            key=key,
            size=size,
            plan=plan,
            latents=latents,
            generators=generators,
            guidance=guidance,
            cond=cond.context,
            uncond=None if uncond is None else uncond.context,
            cond_added=cond.added,
            uncond_added=None if uncond is None else uncond.added,
            inpainting=inpainting,
            conditioning=conditioning,
            class_labels=labels,
            tiling=tiles,
            mix=mix,
            vae=specs[0].vae,
            controls=controls,
        )

    def _controls(
        self, specs: Sequence[ImageSpec], size: tuple[int, int], tiled: bool
    ) -> tuple[RowControl, ...]:
        """Each image's ControlNet units, on its cond row, their images ready."""
        uses = [use for spec in specs for use in spec.controls]
        if not uses:
            return ()
        if self.controls is None:
            raise ControlRefused("controlnets: this worker serves no ControlNets for the model")
        if tiled:
            raise ControlRefused("controlnets: a picture this large runs in tiles, where"
                                 " ControlNets are not served")  # fmt: skip
        self.controls.check(uses)
        width, height = size
        controls = self.controls
        return tuple(RowControl(row, use, controls.embed(use.model, control_image(
                         self.control_processor, use, width, height, self.device, self.dtype)))
                     for row, spec in enumerate(specs) for use in spec.controls)  # fmt: skip

    def _from_source(
        self,
        generators: list[torch.Generator],
        shape: BatchShape,
        source: Source,
        plan: Plan,
        codec: Vae,
    ) -> tuple[torch.Tensor, Inpainting | None, torch.Tensor | None]:
        """Starting latents from a source image, and what inpainting needs each step. Each
        image draws from its own generator in diffusers' order: the VAE's sample of the source
        (not drawn by an inpainting UNet at strength 1, which starts from noise alone), the
        noise, then (inpainting) the VAE's sample of the masked source, which a 4-channel UNet
        does not use but which moves the generator on before an ancestral sampler's noise."""
        shape4 = (len(generators), self.channels, shape.height // self.scale,
                  shape.width // self.scale)  # fmt: skip
        if source.pixels is None or (source.mask is not None and source.mask_pixels is None):
            source = self.ready(source, shape)
        image: torch.Tensor = placed(source.pixels, self.device, self.dtype)
        pure_noise = source.mask is not None and source.strength == 1
        inpainting_unet = self.parts.inpainting_unet
        encoded = None
        if source.enlarge:
            encoded = enlarged(codec.mode_latents(image), shape4[-2:]).expand(shape4)
        elif not (pure_noise and inpainting_unet):
            encoded = codec.sample_latents(image, generators)
        noise = randn_tensor(shape4, generator=generators, device=self.device, dtype=self.dtype)
        if pure_noise:
            latents = noise * plan.init_sigma
        else:
            assert encoded is not None
            latents = encoded * plan.noising[0] + noise * plan.noising[1]
        if source.mask is None:
            return latents, None, None
        mask = source.mask_pixels
        keep = placed(mask, self.device, self.dtype) < 0.5
        masked = codec.sample_latents(image * keep, generators)
        small = torch.nn.functional.interpolate(mask, size=shape4[-2:])
        small = placed(small, self.device, self.dtype)
        if inpainting_unet:  # the UNet sees the mask and the masked source
            return latents, None, torch.cat([small.expand(len(generators), -1, -1, -1), masked], 1)
        assert encoded is not None
        return latents, Inpainting(small, encoded, noise), None

    def ready(self, source: Source, shape: BatchShape) -> Source:
        """The source with its picture (and mask) preprocessed as diffusers' pipelines do it,
        on the host: safe in another thread, so that the loops do it where the picture is read
        rather than on the GPU's thread. The x4 upscaler's picture is left as it is."""
        if source.noise_level is not None:
            return source
        size = {"height": shape.height, "width": shape.width}
        if source.enlarge:  # latent upscaling encodes the picture at its own size
            size = {"height": source.image.height, "width": source.image.width}
        encoded = source.image if source.encoded is None else source.encoded
        pixels = self.image_processor.preprocess(encoded, **size)
        mask = None
        if source.mask is not None:
            mask = pinned(self.mask_processor.preprocess(source.mask, **size), self.device)
        pixels = pinned(pixels.to(self.dtype), self.device)
        return dataclasses.replace(source, pixels=pixels, mask_pixels=mask)

    def pixels(self, picture: Image.Image, shape: BatchShape) -> torch.Tensor:
        """A picture as the VAE takes it, at `shape`'s size (diffusers' preprocessing)."""
        pixels = self.image_processor.preprocess(picture, height=shape.height, width=shape.width)
        on_gpu: torch.Tensor = placed(pixels, self.device, self.dtype)
        return on_gpu

    def whole_picture(self, shape: BatchShape) -> torch.Tensor:
        """An inpainting UNet's conditioning for work with no mask (text to image, image to
        image): everything is repainted, nothing of a source is shown (a mask of ones, the
        latents of a blank picture), as A1111 conditions such a model."""
        key = (shape.width, shape.height)
        if key not in self._blank:
            blank = torch.zeros(1, 3, shape.height, shape.width, device=self.device,
                                dtype=self.dtype)  # fmt: skip
            latents = self.vae.mode_latents(blank)
            ones = torch.ones_like(latents[:, :1])
            self._blank[key] = torch.cat([ones, latents], 1)
        return self._blank[key]


def pinned(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor in pinned memory when it is bound for a GPU (its copy then waits for
    nothing)."""
    return host.pin_memory() if device.type == "cuda" else host


def enlarged(latents: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Latents resized to (height, width) bilinearly: latent upscaling, as A1111's "Latent"
    hires fix does it."""
    resized = torch.nn.functional.interpolate(latents.float(), size=tuple(size), mode="bilinear")
    return resized.to(latents.dtype)
