"""The resident model, and two ways to denoise with it.

One CLIP + UNet + VAE stack stays loaded. `generate` runs a static batch noise-to-pixels: any
set of images that share width, height, steps and scheduler. The hooks `prepare`, `step` and
`finish` run rows instead (worker/rows.py): a lane per job, any mix of steps, schedulers and
guidance stepping together, one UNet call per step for every lane of one size, with per-row
timesteps. Either way the loop is ours (not `pipe(...)`) so that guidance can differ per row:
cond and uncond go through the UNet in one call and guidance is a (B, 1, 1, 1) tensor.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizerFast
from transformers.utils import logging as transformers_logging

from app.jobs.contract import Hires
from app.jobs.prompts import Chunk, Syntax, chunks, token_ids
from app.jobs.vocabulary import PublishedTokenizer
from worker.compiled import CompiledCalls, Tuning, on_device, placed
from worker.timing import GpuTimer

__all__ = ["Engine", "GpuTimer", "Tuning"]
from worker.plans import Plan, probe, start_step
from worker.previews import Previews, clean_latents, colours, fit_colours
from worker.rows import Inpainting, Lane
from worker.schedulers import SAMPLERS, load_schedule, make_scheduler
from worker.tiles import tiling

log = logging.getLogger("sdserve.engine")

# Progress bars and advice about optional packages are noise in a service's log.
for _library in (diffusers_logging, transformers_logging):
    _library.set_verbosity_error()
    _library.disable_progress_bar()

# Prompts are encoded in chunks of this many rows (padded), so that a prompt's embedding does
# not depend on how many other prompts arrived with it.
ENCODE_CHUNK = 8
EMBEDDING_CACHE_SIZE = 512


class NoUpscaler(LookupError):
    """An x4 upscaling job reached a worker without the x4 upscaler (SDSERVE_UPSCALER)."""


class PromptTooLong(ValueError):
    """A prompt of more chunks of 75 tokens than the engine encodes."""


@dataclass(frozen=True)
class ImageSpec:
    """What differs between the images of one batch."""

    prompt: str
    negative_prompt: str
    guidance_scale: float
    seed: int
    syntax: Syntax = "plain"  # how both prompts read (app/jobs/prompts.py)


@dataclass(frozen=True)
class Source:
    """img2img and inpainting: the picture a job starts from, at the job's size."""

    image: Image.Image  # RGB
    strength: float  # 0 < strength <= 1: how much of the schedule runs (1: all of it)
    mask: Image.Image | None = None  # L, white repaints; None: img2img
    # Latent upscaling: the picture is at its own size, and its latents (the VAE's mode: no
    # noise drawn) are enlarged to the job's size, as a hires fix's latents are.
    enlarge: bool = False
    # The x4 upscaler: the picture, at its own size, noised to this level, is what the UNet
    # sees beside the latents (the whole schedule runs; `strength` is not used).
    noise_level: int | None = None


@dataclass(frozen=True)
class BatchShape:
    """What the images of one batch share."""

    width: int
    height: int
    steps: int
    scheduler: str


# Called after each step with the number of steps done; returning False abandons the batch.
StepCallback = Callable[[int], bool]


class Observer(Protocol):
    """Told how long the parts of each batch took (metrics)."""

    def denoised(self, seconds: float, steps: int) -> None: ...

    def stepped(self, seconds: float, rows: int, bucket: int, padding: int) -> None: ...

    def decoded(self, seconds: float) -> None: ...


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"SDSERVE_DEVICE={setting} but no CUDA device is available")
    return device


class Engine:
    def __init__(self, model: str, device: torch.device, tuning: Tuning | None = None) -> None:
        self.model = model
        self.device = device
        self.tuning = tuning or Tuning()
        # fp16 on GPUs; the CPU has no fast fp16 kernels.
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.tokenizer: CLIPTokenizerFast = CLIPTokenizerFast.from_pretrained(
            model, subfolder="tokenizer"
        )
        self.published_tokenizer = self._publishable_tokenizer()
        self.vocabulary = self.published_tokenizer.vocabulary()
        self.text_encoder = self._place(
            CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=self.dtype)
        )
        self.unet = self._place(
            UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=self.dtype)
        )
        self.vae = self._place(
            AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=self.dtype)
        )
        self.scheduler_config = load_schedule(model)
        # What previews need of the schedule: the signal left at each timestep, and what the
        # UNet predicts.
        self._alphas_cumprod = (
            make_scheduler("ddim", self.scheduler_config).alphas_cumprod.double().numpy()
        )
        self._prediction = str(self.scheduler_config.get("prediction_type", "epsilon"))
        self._colour_map: torch.Tensor | None = None
        self._signals: dict[float, float] = {}
        self.latent_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # Source images and masks are prepared as diffusers' img2img and inpainting pipelines
        # prepare them (resizing, normalizing, a mask made black or white).
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.latent_scale)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.latent_scale,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )
        self._embeddings: OrderedDict[tuple[str, Syntax], torch.Tensor] = OrderedDict()
        self._plans: dict[tuple[str, int, int, bool], Plan] = {}
        # A 9-channel UNet (an inpainting model) takes a mask and a masked picture beside the
        # latents, for every job.
        self.inpainting_unet = self.unet.config.in_channels == 9
        # A 7-channel UNet (the x4 upscaler) takes a noised low-resolution picture beside the
        # latents, and its noise level as a class label.
        self.low_res_scheduler: DDPMScheduler | None = None
        if self.unet.config.in_channels == 7:
            self.low_res_scheduler = DDPMScheduler.from_pretrained(
                model, subfolder="low_res_scheduler"
            )
        self._blank: dict[tuple[int, int], torch.Tensor] = {}
        if self.tuning.fuse:
            for module in (self.unet, self.vae):
                module.fuse_qkv_projections()
                module.to(memory_format=torch.channels_last)
        self._vae_fp32: Any = None
        self.observer: Observer | None = None
        self._timers: deque[tuple[GpuTimer, int, int]] = deque(maxlen=64)
        # The only way to the UNet and the VAE decoder: compiled, padded and canonical there.
        self.calls = CompiledCalls(self.unet, self.vae, self.tuning, device)

    def _publishable_tokenizer(self) -> PublishedTokenizer:
        """The tokenizer as the API reads it (app/jobs/vocabulary.py); chunks are cut with it here
        too, so both sides count alike."""
        tokenizer = self.tokenizer
        comma = tokenizer.convert_tokens_to_ids(",</w>")
        if not isinstance(comma, int) or comma == tokenizer.unk_token_id:
            comma = tokenizer(",", add_special_tokens=False).input_ids[-1]
        return PublishedTokenizer(
            model=self.model,
            tokenizer=tokenizer.backend_tokenizer.to_str(),
            start=tokenizer.bos_token_id,
            end=tokenizer.eos_token_id,
            pad=tokenizer.pad_token_id,
            comma=comma,
            max_chunks=self.tuning.prompt_chunks,
        )

    def weight_bytes(self) -> int:
        """What the model's weights take (text encoder, UNet, VAE)."""
        modules = (self.text_encoder, self.unet, self.vae)
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())

    def _place(self, module: torch.nn.Module) -> Any:
        return module.to(self.device).eval().requires_grad_(False)

    def warm_up(self) -> None:
        """Compile and record every compiled call the worker can make (the boundary's warm-up
        list), then run a small job through the path the worker serves at each compiled size
        (or one small batch uncompiled): no first-call costs (compilation, CUDA graph capture,
        kernel selection) are left for a job to pay."""
        spec = ImageSpec(prompt="warm-up", negative_prompt="", guidance_scale=7.5, seed=0)
        self.calls.warm_up(self.latent_scale)
        sizes = self.tuning.compiled_sizes if self.tuning.compile else ((64, 64),)
        for width, height in sizes:
            shape = BatchShape(width, height, 2, "dpmpp_2m")
            started = time.perf_counter()
            if self.tuning.rows:
                lane = self.prepare("warm-up", [spec], shape)
                while not lane.done:
                    self.step([lane])
                self.images(self.finish(lane))
            else:
                self.generate([spec], shape)
            log.info("warmed up a %dx%d job in %.1fs", width, height,
                     time.perf_counter() - started)  # fmt: skip

    @torch.inference_mode()
    def generate(
        self,
        specs: Sequence[ImageSpec],
        shape: BatchShape,
        on_step: StepCallback | None = None,
    ) -> list[np.ndarray | None] | None:
        """HxWx3 uint8 pixels per spec, in order; None for an image that came out non-finite.

        Returns None when `on_step` abandoned the batch. The batch is padded to its bucket size
        (copies of the last spec, whose outputs are dropped): how many strangers came along
        does not change the shapes the kernels see, and what they asked for never matters.
        """
        count = len(specs)
        specs = [*specs, *[specs[-1]] * (self.tuning.bucket(count) - count)]
        batch = len(specs)
        sampler = SAMPLERS[shape.scheduler]
        scheduler, generators, latents = self._start(specs, shape)
        contexts = self.embeddings(
            [(s.negative_prompt, s.syntax) for s in specs] + [(s.prompt, s.syntax) for s in specs]
        )
        blocks = [context[None] for context in contexts]
        guidance = on_device([s.guidance_scale for s in specs], self.dtype, self.device)
        guidance = guidance.view(batch, 1, 1, 1)
        step_options = {"generator": generators} if sampler.ancestral else {}
        size = (shape.width, shape.height)

        started = time.perf_counter()
        for k, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            if self.inpainting_unet:
                whole = self._whole_picture(shape).expand(len(model_input), -1, -1, -1)
                model_input = torch.cat([model_input, whole], 1)
            noise, _ = self.calls.run_unet(model_input, t, blocks, size)
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance * (cond - uncond)
            latents = scheduler.step(noise, t, latents, **step_options).prev_sample
            if on_step is not None and not on_step(k + 1):
                return None
        self._synchronize()  # the GPU runs behind the host: wait, so the times are the GPU's
        if self.observer is not None:
            self.observer.denoised(time.perf_counter() - started, shape.steps)
        return self.decode(latents, self.calls.compiled(size))[:count]

    def _start(
        self, specs: Sequence[ImageSpec], shape: BatchShape
    ) -> tuple[Any, list[torch.Generator], torch.Tensor]:
        """A fresh sampler and the starting latents, scaled for it."""
        sampler = make_scheduler(shape.scheduler, self.scheduler_config)
        sampler.set_timesteps(shape.steps, device=self.device)
        generators, noise = self._noise(specs, shape)
        return sampler, generators, noise * sampler.init_noise_sigma

    def _noise(
        self, specs: Sequence[ImageSpec], shape: BatchShape
    ) -> tuple[list[torch.Generator], torch.Tensor]:
        """One generator per image (its noise, ancestral noise included, is its own) and the
        unscaled starting noise."""
        generators = [torch.Generator(self.device).manual_seed(s.seed) for s in specs]
        noise = randn_tensor(
            (
                len(specs),
                self.vae.config.latent_channels,
                shape.height // self.latent_scale,
                shape.width // self.latent_scale,
            ),
            generator=generators,
            device=self.device,
            dtype=self.dtype,
        )
        return generators, noise

    def plan(self, sampler: str, steps: int, start: int = 0, fresh: bool = False) -> Plan:
        """The sampler's plan over so many steps, probed once per (sampler, steps, start,
        fresh): a bounded set (8 samplers, 100 steps, their starts, two kinds)."""
        key = (sampler, steps, start, fresh)
        if key not in self._plans:
            self._plans[key] = probe(sampler, steps, self.scheduler_config, start, fresh)
        return self._plans[key]

    # -- rows: the continuous-batching hooks --------------------------------------------------

    @torch.inference_mode()
    def prepare(
        self, key: str, specs: Sequence[ImageSpec], shape: BatchShape, source: Source | None = None
    ) -> Lane:
        """A job's images as a lane at its first step: its plan, generators, starting latents
        and embeddings. Text to image: noise made exactly as `generate` makes it. From a source
        image: its latents noised to where the plan starts, as diffusers' img2img and
        inpainting pipelines make them for each image's seed."""
        inpainting = conditioning = labels = None
        if source is None:
            plan = self.plan(shape.scheduler, shape.steps)
            generators, noise = self._noise(specs, shape)
            latents = noise * plan.init_sigma
        elif source.noise_level is not None:
            plan = self.plan(shape.scheduler, shape.steps)
            generators = [torch.Generator(self.device).manual_seed(s.seed) for s in specs]
            conditioning, labels = self._low_res(source.image, source.noise_level, generators)
            noise = randn_tensor((len(specs), self.vae.config.latent_channels,
                                  *conditioning.shape[-2:]), generator=generators,
                                 device=self.device, dtype=self.dtype)  # fmt: skip
            latents = noise * plan.init_sigma
        else:
            start = start_step(shape.steps, source.strength)
            blends = source.mask is not None and not self.inpainting_unet
            plan = self.plan(shape.scheduler, shape.steps, start, fresh=blends)
            generators = [torch.Generator(self.device).manual_seed(s.seed) for s in specs]
            latents, inpainting, conditioning = self._from_source(generators, shape, source, plan)
        return self._lane(
            key, specs, shape, plan, generators, latents, inpainting, conditioning, labels
        )

    def _low_res(
        self, picture: Image.Image, level: int, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The x4 upscaler's inputs: the picture at its own size noised to `level` by each
        image's generator (drawn first, as diffusers' upscale pipeline draws it), and the level
        per image."""
        assert self.low_res_scheduler is not None, "not an x4 upscaler"
        pixels = self._pixels(picture, BatchShape(picture.width, picture.height, 0, ""))
        levels = on_device([level], torch.long, self.device)
        noised = [
            self.low_res_scheduler.add_noise(
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
        small = (shape.height // self.latent_scale, shape.width // self.latent_scale)
        if hires.method == "latent":
            encoded = enlarged(lane.latents, small)
        else:
            size = (shape.width, shape.height)
            pictures = [
                Image.fromarray(
                    pixels if pixels is not None else np.zeros((1, 1, 3), np.uint8)
                ).resize(size, Image.Resampling.LANCZOS)
                for pixels in self.decode(lane.latents)
            ]
            encoded = torch.cat([
                self._sample_latents(self._pixels(picture, shape), [generator])
                for picture, generator in zip(pictures, generators, strict=True)
            ])  # fmt: skip
        noise = randn_tensor(encoded.shape, generator=generators, device=self.device,
                             dtype=self.dtype)  # fmt: skip
        latents = encoded * plan.noising[0] + noise * plan.noising[1]
        made = self._lane(lane.key, specs, shape, plan, generators, latents)
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
        cond = torch.stack(self.embeddings([(s.prompt, s.syntax) for s in specs]))
        uncond = None
        if any(s.guidance_scale > 1 for s in specs):
            uncond = torch.stack(self.embeddings([(s.negative_prompt, s.syntax) for s in specs]))
        guidance = on_device([s.guidance_scale for s in specs], self.dtype, self.device)
        guidance = guidance.view(-1, 1, 1, 1)
        scale = self.latent_scale
        tiles = tiling(
            (shape.height // scale, shape.width // scale),
            self.tuning.tile // scale,
            self.tuning.tile_overlap // scale,
        )
        size = (shape.width, shape.height)
        if tiles is not None:  # every per-row tensor gets a row per tile
            size = (tiles.tile[1] * scale, tiles.tile[0] * scale)
            cond = cond.repeat_interleave(tiles.count, 0)
            guidance = guidance.repeat_interleave(tiles.count, 0)
            if uncond is not None:
                uncond = uncond.repeat_interleave(tiles.count, 0)
            if conditioning is not None:
                conditioning = tiles.split(conditioning)
            if labels is not None:
                labels = labels.repeat_interleave(tiles.count, 0)
        if self.inpainting_unet and conditioning is None:
            whole = self._whole_picture(BatchShape(*size, shape.steps, shape.scheduler))
            conditioning = whole.expand(len(cond), -1, -1, -1)
        return Lane(
            key=key,
            size=size,
            plan=plan,
            latents=latents,
            generators=generators,
            guidance=guidance,
            cond=cond,
            uncond=uncond,
            inpainting=inpainting,
            conditioning=conditioning,
            class_labels=labels,
            tiling=tiles,
        )

    def _from_source(
        self, generators: list[torch.Generator], shape: BatchShape, source: Source, plan: Plan
    ) -> tuple[torch.Tensor, Inpainting | None, torch.Tensor | None]:
        """Starting latents from a source image, and what inpainting needs each step. Each
        image draws from its own generator in diffusers' order: the VAE's sample of the source
        (not drawn by an inpainting UNet at strength 1, which starts from noise alone), the
        noise, then (inpainting) the VAE's sample of the masked source, which a 4-channel UNet
        does not use but which moves the generator on before an ancestral sampler's noise."""
        size = {"height": shape.height, "width": shape.width}
        shape4 = (len(generators), self.vae.config.latent_channels,
                  shape.height // self.latent_scale, shape.width // self.latent_scale)  # fmt: skip
        if source.enlarge:
            size = {"height": source.image.height, "width": source.image.width}
        image = self._pixels(source.image, BatchShape(size["width"], size["height"], 0, ""))
        pure_noise = source.mask is not None and source.strength == 1
        encoded = None
        if source.enlarge:
            encoded = enlarged(self._mode_latents(image), shape4[-2:]).expand(shape4)
        elif not (pure_noise and self.inpainting_unet):
            encoded = self._sample_latents(image, generators)
        noise = randn_tensor(shape4, generator=generators, device=self.device, dtype=self.dtype)
        if pure_noise:
            latents = noise * plan.init_sigma
        else:
            assert encoded is not None
            latents = encoded * plan.noising[0] + noise * plan.noising[1]
        if source.mask is None:
            return latents, None, None
        mask = self.mask_processor.preprocess(source.mask, **size)
        keep = placed(mask, self.device, self.dtype) < 0.5
        masked = self._sample_latents(image * keep, generators)
        small = torch.nn.functional.interpolate(mask, size=shape4[-2:])
        small = placed(small, self.device, self.dtype)
        if self.inpainting_unet:  # the UNet sees the mask and the masked source
            return latents, None, torch.cat([small.expand(len(generators), -1, -1, -1), masked], 1)
        assert encoded is not None
        return latents, Inpainting(small, encoded, noise), None

    def _pixels(self, picture: Image.Image, shape: BatchShape) -> torch.Tensor:
        """A picture as the VAE takes it, at `shape`'s size (diffusers' preprocessing)."""
        pixels = self.image_processor.preprocess(picture, height=shape.height, width=shape.width)
        on_gpu: torch.Tensor = placed(pixels, self.device, self.dtype)
        return on_gpu

    def _sample_latents(
        self, image: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """A sample of the VAE's latents of `image` per generator, scaled."""
        posterior = self.vae.encode(image).latent_dist
        samples = [posterior.sample(generator=g) for g in generators]
        # Canonical layout: a channels-last VAE gives channels-last latents.
        latents: torch.Tensor = torch.cat(samples) * self.vae.config.scaling_factor
        return latents.contiguous()

    def _mode_latents(self, image: torch.Tensor) -> torch.Tensor:
        """The VAE's most likely latents of `image`, scaled (no noise drawn)."""
        latents: torch.Tensor = self.vae.encode(image).latent_dist.mode()
        scaled: torch.Tensor = latents * self.vae.config.scaling_factor
        return scaled.contiguous()

    def _whole_picture(self, shape: BatchShape) -> torch.Tensor:
        """An inpainting UNet's conditioning for work with no mask (text to image, image to
        image): everything is repainted, nothing of a source is shown (a mask of ones, the
        latents of a blank picture), as A1111 conditions such a model."""
        key = (shape.width, shape.height)
        if key not in self._blank:
            blank = torch.zeros(1, 3, shape.height, shape.width, device=self.device,
                                dtype=self.dtype)  # fmt: skip
            latents = self._mode_latents(blank)
            ones = torch.ones_like(latents[:, :1])
            self._blank[key] = torch.cat([ones, latents], 1)
        return self._blank[key]

    @torch.inference_mode()
    def step(self, lanes: Sequence[Lane], previews: Collection[str] = ()) -> Previews | None:
        """One denoising step of every lane (all of one size) in one UNet call (one per prompt
        length, where long prompts are in flight): per-row timesteps, padded to a row bucket;
        the cond rows of every image first, then the uncond
        rows of guided lanes. Guidance is applied to all images at once (an unguided image is
        set against its own cond row, which leaves it as it is), then each lane advances by its
        plan. Lanes named in `previews` get a preview of this step (worker/previews.py).
        Raises (leaving every lane as it was) if the UNet call fails."""
        inputs = [lane.model_input() for lane in lanes]
        guided = [i for i, lane in enumerate(lanes) if lane.uncond is not None]
        rows = sum(lane.rows for lane in lanes)
        sample = torch.cat(inputs + [inputs[i] for i in guided])
        blocks = [lane.cond for lane in lanes]
        blocks += [uncond for i in guided if (uncond := lanes[i].uncond) is not None]
        times = [lane.timestep() for lane in lanes for _ in range(lane.rows)]
        times += [lanes[i].timestep() for i in guided for _ in range(lanes[i].rows)]
        against: list[int] = []  # each row's uncond row, or its own cond row
        uncond_at = rows
        for lane in lanes:
            start = len(against)
            if lane.uncond is None:
                against += range(start, start + lane.rows)
            else:
                against += range(uncond_at, uncond_at + lane.rows)
                uncond_at += lane.rows
        t_rows = on_device(times, torch.float32, self.device)
        labels = None
        if self.low_res_scheduler is not None:  # the x4 upscaler: every row has its level
            parts = [lane.class_labels for lane in lanes]
            parts += [lanes[i].class_labels for i in guided]
            labels = torch.cat([part for part in parts if part is not None])
        timer = GpuTimer(self.device) if self.observer is not None else None
        noise, padding = self.calls.run_unet(sample, t_rows, blocks, lanes[0].size, labels)
        called = len(sample)
        cond = noise[:rows]
        uncond = noise.index_select(0, on_device(against, torch.long, self.device))
        guidance = torch.cat([lane.guidance for lane in lanes])
        noise = uncond + guidance * (cond - uncond)  # a new tensor: the UNet's is reused
        made = self._previews(lanes, inputs, noise, previews) if previews else None
        at = 0
        for lane in lanes:
            lane.advance(noise[at : at + lane.rows])
            at += lane.rows
        if timer is not None:
            # No synchronization: the host runs ahead of the GPU; the time is read when the
            # GPU has got there (a later step), so measuring never stalls the loop.
            self._timers.append((timer.stop(), called, padding))
        while self._timers and self._timers[0][0].ready() and self.observer is not None:
            done, real, padded = self._timers.popleft()
            self.observer.stepped(done.seconds(), real, self.tuning.row_bucket(real), padded)
        return made

    def _previews(
        self,
        lanes: Sequence[Lane],
        inputs: list[torch.Tensor],
        outputs: torch.Tensor,
        wanted: Collection[str],
    ) -> Previews | None:
        """The wanted lanes' images as they would be if denoising stopped at this step, in
        small: all whole pictures in a few operations, whatever their number; a picture in
        tiles from its tiles' predictions blended as its latents are."""
        if self._colour_map is None:
            fitted = fit_colours(self.vae, self.device, self.dtype, self.latent_scale)
            self._colour_map = fitted.to(self.device, torch.float32)
        channels = self.vae.config.latent_channels
        samples: list[torch.Tensor] = []
        signals: list[float] = []
        index: list[int] = []
        rows: dict[str, tuple[int, int, int, int]] = {}
        tiled: list[torch.Tensor] = []
        at = count = 0
        for lane, sample in zip(lanes, inputs, strict=True):
            if lane.key in wanted and lane.tiling is not None:
                # x0 is linear in the output: the blend of the tiles' x0 is the picture's.
                signal = self._signal(lane.timestep())
                tiles = clean_latents(sample[:, :channels].float(),
                                      outputs[at : at + lane.rows].float(), signal,
                                      self._prediction)  # fmt: skip
                tiled.append(colours(lane.tiling.merge(tiles), self._colour_map))
                rows[lane.key] = (len(tiled), 0, lane.images, lane.step + 1)
            elif lane.key in wanted:
                samples.append(sample[:, :channels])
                index += range(at, at + lane.images)
                signals += [self._signal(lane.timestep())] * lane.images
                rows[lane.key] = (0, count, lane.images, lane.step + 1)
                count += lane.images
            at += lane.rows
        if not rows:
            return None
        whole = torch.empty(0, 1, 1, 3, dtype=torch.uint8, device=self.device)
        if samples:
            noise = outputs.index_select(0, on_device(index, torch.long, self.device))
            left = on_device(signals, torch.float32, self.device).view(-1, 1, 1, 1)
            clean = clean_latents(torch.cat(samples).float(), noise.float(), left,
                                  self._prediction)  # fmt: skip
            whole = colours(clean, self._colour_map)
        return Previews([whole, *tiled], GpuTimer(self.device), rows)

    def _signal(self, timestep: float) -> float:
        """How much of the clean image is left at a timestep: sqrt of the schedule's cumulative
        alpha there (interpolated for a fractional timestep, as Karras sigmas give)."""
        if timestep not in self._signals:
            alphas = self._alphas_cumprod
            cumulative = float(np.interp(timestep, np.arange(len(alphas)), alphas))
            self._signals[timestep] = cumulative**0.5
        return self._signals[timestep]

    @torch.inference_mode()
    def finish(self, lane: Lane) -> Decoding:
        """A finished lane's decode, started: `images` gives its pixels once `ready`."""
        whole = lane.tiling is None and self.calls.compiled(lane.size)
        return self.decode_async(lane.latents, whole)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def encode(self, prompts: Sequence[str], syntax: Syntax = "plain") -> torch.Tensor:
        """CLIP embeddings of prompts of one length in chunks, (len(prompts), 77 x chunks,
        dim)."""
        return torch.stack(self.embeddings([(p, syntax) for p in prompts]))

    def chunk_count(self, prompt: str, syntax: Syntax) -> int:
        return len(chunks(prompt, syntax, self.vocabulary))

    def embeddings(self, prompts: Sequence[tuple[str, Syntax]]) -> list[torch.Tensor]:
        """Each prompt's CLIP embeddings, (77 x chunks, dim): its chunks of 75 tokens encoded
        alone, weighted where the syntax weighs them, laid end to end (what A1111 does; a
        prompt of one chunk is exactly diffusers' encoding). Repeated prompts come from the
        cache. Raises PromptTooLong (encoding nothing) for a prompt over the limit."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._embeddings))
        rows: list[tuple[list[int], list[float]]] = []
        counts = []
        for text, syntax in missing:
            pieces = chunks(text, syntax, self.vocabulary)
            if len(pieces) > self.tuning.prompt_chunks:
                raise PromptTooLong(
                    f"a prompt of {len(pieces)} chunks of 75 tokens; this worker encodes at"
                    f" most {self.tuning.prompt_chunks}"
                )
            rows += [token_ids(piece, self.vocabulary) for piece in pieces]
            counts.append(len(pieces))
        hidden = self._encode_rows(rows)
        at = 0
        for prompt, count in zip(missing, counts, strict=True):
            self._embeddings[prompt] = torch.cat(hidden[at : at + count])
            at += count
        for p in prompts:
            self._embeddings.move_to_end(p)
        embeddings = [self._embeddings[p] for p in prompts]
        while len(self._embeddings) > EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return embeddings

    def _encode_rows(self, rows: list[tuple[list[int], list[float]]]) -> list[torch.Tensor]:
        """CLIP's last hidden state per chunk of 77 ids, in fixed batches of ENCODE_CHUNK rows
        (padded with empty chunks), so that a chunk's embedding does not depend on how many
        others came with it. Weighted chunks are scaled token by token, then brought back to
        their unweighted mean (as A1111 does), so emphasis shifts attention between words
        without making the whole prompt louder."""
        empty = token_ids(Chunk(), self.vocabulary)
        hidden: list[torch.Tensor] = []
        for start in range(0, len(rows), ENCODE_CHUNK):
            batch = rows[start : start + ENCODE_CHUNK]
            padded = batch + [empty] * (ENCODE_CHUNK - len(batch))
            ids = on_device([r[0] for r in padded], torch.long, self.device)
            states = self.text_encoder(ids)[0]
            for (_ids, weights), state in zip(batch, states, strict=False):
                if any(w != 1 for w in weights):
                    scale = on_device(weights, torch.float32, self.device)
                    plain = state.to(torch.float32)
                    state = emphasized(plain, scale).to(state.dtype)
                hidden.append(state)
        return hidden

    def decode(self, latents: torch.Tensor, compiled: bool = False) -> list[np.ndarray | None]:
        """Pixels per latent: HxWx3 uint8, or None for an image that stays non-finite."""
        return self.images(self.decode_async(latents, compiled))

    @torch.inference_mode()
    def decode_async(self, latents: torch.Tensor, compiled: bool = False) -> Decoding:
        """Start decoding: fixed-size chunks (padded), so that a chunk's shape, and so its
        kernels and rounding, never depend on the batch around it; pixels and a finite flag per
        image are copied to the host behind the GPU's work, so the caller does not wait."""
        chunk = self.tuning.vae_chunk
        timer = GpuTimer(self.device)
        scaled = latents / self.vae.config.scaling_factor
        parts = []
        for start in range(0, len(scaled), chunk):
            part = scaled[start : start + chunk]
            padded = torch.cat([part, part[-1:].expand(chunk - len(part), *part.shape[1:])])
            parts.append(self.calls.decode(padded, compiled)[: len(part)])
        pixels = torch.cat(parts)
        finite = torch.isfinite(pixels).flatten(1).all(1)
        return Decoding(latents, _to_uint8(pixels), finite, timer)

    @torch.inference_mode()
    def images(self, decoding: Decoding) -> list[np.ndarray | None]:
        """A decoding's pixels (waiting for it if it is not ready). An image that came out
        non-finite is decoded once more in fp32 (fp16 VAEs overflow on some latents); None if
        that fails too."""
        decoding.wait()
        if self.observer is not None:
            self.observer.decoded(decoding.timer.seconds())
        out: list[np.ndarray | None] = []
        for row, pixels, finite in zip(
            decoding.latents, decoding.pixels, decoding.finite.tolist(), strict=True
        ):
            if finite:
                out.append(pixels.numpy())
                continue
            log.warning("non-finite pixels: decoding again in fp32")
            scaled = row[None].float() / self.vae.config.scaling_factor
            again = self._fp32_vae().decode(scaled).sample
            out.append(_to_uint8(again)[0].cpu().numpy() if torch.isfinite(again).all() else None)
        return out

    def _fp32_vae(self) -> Any:
        """The VAE in fp32, made on first need (most deployments never need it)."""
        if self._vae_fp32 is None:
            fp32 = self.dtype == torch.float32
            self._vae_fp32 = self.vae if fp32 else copy.deepcopy(self.vae).float()
        return self._vae_fp32

    def release_memory(self) -> None:
        """Give cached GPU memory back after an out-of-memory error, before retrying smaller."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class Decoding:
    """A decode under way: pixels and finite flags on their way to the host (pinned memory, so
    the copy runs behind the GPU's queue), and the latents for an fp32 retry."""

    def __init__(
        self, latents: torch.Tensor, pixels: torch.Tensor, finite: torch.Tensor, timer: GpuTimer
    ) -> None:
        self.latents = latents
        if pixels.is_cuda:
            self.pixels = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
            self.finite = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
            self.pixels.copy_(pixels, non_blocking=True)
            self.finite.copy_(finite, non_blocking=True)
        else:
            self.pixels, self.finite = pixels, finite
        self.timer = timer.stop()  # after the copies: ready means the host has the pixels

    def ready(self) -> bool:
        return self.timer.ready()

    def wait(self) -> None:
        self.timer.wait()


def emphasized(plain: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A chunk's hidden states (tokens, dim) weighted token by token, then brought back to their
    unweighted mean, as A1111 does. Where the weighted mean is next to nothing (final layer
    norms without bias, as random models have; weights that cancel) the ratio of the means is
    noise, and a negative one flips every sign: then the weights stand alone."""
    weighted = plain * weights[:, None]
    mean = weighted.mean()
    ratio = plain.mean() / mean
    sound = torch.isfinite(ratio) & (ratio > 0) & (mean.abs() > 1e-3 * weighted.abs().mean())
    return torch.where(sound, weighted * ratio, weighted)


def enlarged(latents: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Latents resized to (height, width) bilinearly: latent upscaling, as A1111's "Latent"
    hires fix does it."""
    resized = torch.nn.functional.interpolate(latents.float(), size=tuple(size), mode="bilinear")
    return resized.to(latents.dtype)


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] to (N, H, W, 3) uint8, rounded as diffusers does."""
    image = (pixels / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return image.permute(0, 2, 3, 1).contiguous()
