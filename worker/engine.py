"""The resident model, and how to denoise with it.

One CLIP + UNet + VAE stack stays loaded (worker/components.py). The worker runs rows
(worker/rows.py) through the hooks `prepare`, `step` and `finish`: a lane per job, any mix of
steps, schedulers and guidance stepping together, one UNet call per step for every lane of one
size, with per-row timesteps. `generate` runs one batch noise-to-pixels (images that share
width, height, steps and scheduler, with one diffusers scheduler): the benchmarks' engine
figure and the tests' reference, not served since static batching went. Either way the loop is
ours (not `pipe(...)`) so that guidance can differ per row: cond and uncond go through the UNet
in one call and guidance is a (B, 1, 1, 1) tensor.

Split along diffusers' named steps: the components (worker/components.py), prompt encoding
(worker/prompting.py), latent preparation (worker/latents.py), the VAE (worker/vae.py), and the
compiled-call boundary every UNet and decoder call goes through (worker/compiled.py). The
engine holds them together and runs the denoising step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from app.jobs.contract import Hires
from app.jobs.prompts import Syntax
from worker import lora_kernel
from worker.adapters import Adapters, RowMix
from worker.compiled import CompiledCalls, Tuning
from worker.components import Components, load_components, load_vae
from worker.controls import Block, ControlNets
from worker.devices import on_device
from worker.embeddings import Embeddings
from worker.families import family_of, joined, read
from worker.inputs import (
    BatchShape,
    ImageSpec,
    NoUpscaler,
    Observer,
    Source,
    StepCallback,
)
from worker.latents import LatentMaker, enlarged
from worker.previews import Previews, clean_latents, colours, fit_colours
from worker.prompting import ENCODE_CHUNK, Prompt, PromptTooLong, emphasized
from worker.rows import Lane
from worker.schedulers import SAMPLERS, make_scheduler
from worker.timing import GpuTimer, Lead
from worker.vae import Decoding, Vae

# What callers take from here: the engine and the types its calls take and give.
__all__ = ["BatchShape", "Decoding", "Engine", "GpuTimer", "ImageSpec", "NoUpscaler",
           "PromptTooLong", "Source", "StepCallback", "Tuning", "emphasized", "enlarged",
           "resolve_device"]  # fmt: skip

log = logging.getLogger("sdserve.engine")


def adapters_of(parts: Components, tuning: Tuning) -> Adapters | None:
    """The model's LoRA layers, where LoRAs are served (not by the x4 upscaler)."""
    if tuning.loras is None or parts.low_res_scheduler is not None:
        return None
    lora_kernel.TILES = lora_kernel.tiles_of(tuning.lora_tiles)  # one tiling a process
    modules = {"unet": parts.unet, "text_encoder": parts.text_encoder,
               "text_encoder_2": parts.text_encoder_2}  # fmt: skip
    adapters = Adapters(
        {name: module for name, module in modules.items() if module is not None},
        tuning.loras,
        tuning.lora_slots,
        tuning.lora_row_rank,
        rows=max(2, tuning.row_cap(), 2 * tuning.max_batch),
        text_rows=ENCODE_CHUNK,
        device=parts.device,
        kernels=tuning.lora_kernels,
    )
    log.info("LoRAs from %s: %d layers per row, %d slots of %d ranks, %.0f MiB of pools, %s",
             tuning.loras, sum(len(v) for v in adapters.layers.values()), tuning.lora_slots,
             tuning.lora_row_rank, adapters.pool_bytes() / 2**20,
             "Triton kernels" if tuning.lora_kernels and lora_kernel.usable_on(parts.device)
             else "the tensor path")  # fmt: skip
    return adapters


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"SDSERVE_DEVICE={setting} but no CUDA device is available")
    return device


class Engine:
    def __init__(
        self, model: str, device: torch.device, tuning: Tuning | None = None, vae: str | None = None
    ) -> None:
        """`vae`: the VAE the model runs with instead of its own (SDSERVE_MODELS' `;vae=`)."""
        self.model = model
        self.device = device
        tuning = tuning or Tuning()
        parts = self.parts = load_components(model, device, tuning.fuse, tuning.loras is None,
                                             vae, tuning.vae_upcast)  # fmt: skip
        # LoRAs per row: their layers wrapped before anything is compiled (worker/adapters.py).
        self.adapters = adapters_of(parts, tuning)
        # Embeddings' tokens and vectors, before the family publishes its tokenizer.
        self.embeddings: Embeddings | None = None
        if tuning.embeddings is not None and parts.low_res_scheduler is None:
            self.embeddings = Embeddings(tuning.embeddings)
            self.embeddings.install(parts)
            parts.expansions = self.embeddings.expansions
        self.embeddings_asked = False  # refresh-embeddings, applied between steps
        self.dtype = parts.dtype
        self.tokenizer: Any = parts.tokenizer  # None: an SDXL refiner (the second one only)
        self.text_encoder: Any = parts.text_encoder
        self.unet = parts.unet
        self.vae = parts.vae
        self.scheduler_config = parts.scheduler_config
        self.low_res_scheduler = parts.low_res_scheduler
        self.latent_scale = parts.latent_scale
        self.inpainting_unet = parts.inpainting_unet
        # How this model's prompts become what its UNet's rows see (SD 1.x/2.x or SDXL).
        self.family = family_of(parts, tuning.prompt_chunks, self.adapters)
        if not tuning.compiled_sizes:  # none chosen: the size this family draws by default
            side = self.family.published.default_side
            tuning = dataclasses.replace(tuning, compiled_sizes=((side, side),))
        self.published_tokenizer = self.family.published
        self.vocabulary = self.family.vocabulary
        # The only way to the UNet and the VAE decoder: compiled, padded and canonical there.
        self.calls = CompiledCalls(
            self.unet,
            self.vae,
            tuning,
            device,
            self.family.added_shapes(),
            None if self.adapters is None else self.adapters.unet_rows,
        )
        self.codec = Vae(parts, self.calls, tuning.vae_chunk)
        self.latents = LatentMaker(parts, self.family, self.codec, tuning, self.adapters)
        self.latents.vaes = self._vaes(tuning)
        # ControlNets per row (worker/controls.py), where served and fitting this UNet.
        self.controls = self._controlnets(tuning)
        self.latents.controls = self.controls
        if self.controls is not None:
            self.calls.serve_controls(self.controls)
        # What previews need of the schedule: the signal left at each timestep, and what the
        # UNet predicts.
        self._alphas_cumprod = (
            make_scheduler("ddim", self.scheduler_config).alphas_cumprod.double().numpy()
        )
        self._prediction = str(self.scheduler_config.get("prediction_type", "epsilon"))
        self._colour_map: torch.Tensor | None = None
        self._signals: dict[float, float] = {}
        self._observer: Observer | None = None
        self._timers: deque[tuple[GpuTimer, int, int]] = deque(maxlen=64)
        self._lead = Lead(self.device)  # at most RUN_AHEAD calls queued ahead of the GPU

    def _vaes(self, tuning: Tuning) -> dict[str, Vae]:
        """The VAEs of SDSERVE_VAES that fit this model (its latents' channels), loaded."""
        held = {}
        for name, source in tuning.vaes:
            if self.parts.low_res_scheduler is not None:
                break  # the x4 upscaler keeps its own
            module = load_vae(source, self.vae, self.model)
            mine = self.vae.config.latent_channels
            if module.config.latent_channels != mine:
                log.warning("VAE %s skipped for %s: %d latent channels, the model's %d", name,
                            self.model, module.config.latent_channels, mine)  # fmt: skip
                continue
            held[name] = Vae(self.parts, self.calls, tuning.vae_chunk, module)
        return held

    def _controlnets(self, tuning: Tuning) -> ControlNets | None:
        """The ControlNets of SDSERVE_CONTROLNETS that fit this model's UNet, loaded."""
        if not tuning.controlnets or self.parts.low_res_scheduler is not None:
            return None
        from diffusers import ControlNetModel

        held = {}
        for name, source in tuning.controlnets:
            path, _, config = source.partition(";config=")
            if config:  # one .safetensors file of the original layout, its configuration beside
                model = ControlNetModel.from_single_file(path, config=config,
                                                         local_files_only=True,
                                                         torch_dtype=self.dtype)  # fmt: skip
            else:
                model = ControlNetModel.from_pretrained(source, torch_dtype=self.dtype)
            why = ControlNets.fits(model, self.unet)
            if why is not None:
                log.warning("ControlNet %s skipped for %s: %s", name, self.model, why)
                continue
            held[name] = model.to(self.device).eval()
            log.info("ControlNet %s for %s: %.0f MiB", name, self.model,
                     sum(p.nbytes for p in model.parameters()) / 2**20)  # fmt: skip
        return ControlNets(held, self.unet) if held else None

    def refresh_embeddings(self) -> None:
        """Take the embeddings added to the folder since (on the GPU's thread, between steps:
        the tokenizer, the token table and the family's published tokenizer change; and while
        no prompt is read: the prompt reader reads them too)."""
        self.embeddings_asked = False
        if self.embeddings is None:
            return
        with self.parts.reading:
            if not self.embeddings.install(self.parts):
                return
            self.family = family_of(self.parts, self.tuning.prompt_chunks, self.adapters)
        self.latents.family = self.family
        self.published_tokenizer = self.family.published
        self.vocabulary = self.family.vocabulary

    @property
    def tuning(self) -> Tuning:
        """How the engine lays out and compiles its work: one, read by every part."""
        return self.latents.tuning

    @tuning.setter
    def tuning(self, tuning: Tuning) -> None:  # the tests change the tiles of a live engine
        self.latents.tuning = self.calls.tuning = tuning
        self.codec.chunk = tuning.vae_chunk

    @property
    def observer(self) -> Observer | None:
        """Told how long steps, batches and decodes took (the worker's metrics)."""
        return self._observer

    @observer.setter
    def observer(self, observer: Observer | None) -> None:
        self._observer = self.codec.observer = observer
        for codec in self.latents.vaes.values():
            codec.observer = observer

    def weight_bytes(self) -> int:
        return self.parts.weight_bytes()

    def warm_up(self, helped: Callable[[], None] | None = None) -> None:
        """Compile every compiled call the worker can make and record the start's share of
        them (the boundary's warm-up, `CompiledCalls.now_and_later`; the rest are recorded in
        the loop's idle time, `warm_next`), then run a small job through the path the worker
        serves at each compiled size (or one small batch uncompiled): no compilation is left
        for a job to pay.
        `helped`: see `CompiledCalls.warm_up`."""
        spec = ImageSpec(prompt="warm-up", negative_prompt="", guidance_scale=7.5, seed=0)
        self.calls.warm_up(self.latent_scale, helped)
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

    def warm_next(self) -> bool:
        """Warm one entry the start left for idle time (`CompiledCalls.warm_next`); False
        when none is left."""
        return self.calls.warm_next(self.latent_scale)

    def precompile(self, unet: bool) -> None:
        """A helper process's share of this model's warm-up (`CompiledCalls.precompile`)."""
        self.calls.precompile(self.latent_scale, unet)

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
        size = (shape.width, shape.height)
        negatives = [read(s, negative=True) for s in specs]
        prompts = [read(s, negative=False) for s in specs]
        contexts = self.family.contexts(negatives, negative=True) + self.family.contexts(prompts)
        blocks = [context[None] for context in contexts]
        added = joined([self.family.added(negatives, size, negative=True),
                        self.family.added(prompts, size)])  # fmt: skip
        guidance = on_device([s.guidance_scale for s in specs], self.dtype, self.device)
        guidance = guidance.view(batch, 1, 1, 1)
        mix = None
        if self.adapters is not None:  # negatives' rows, then prompts', as `contexts`
            mix = self.adapters.mix([s.loras for s in specs] * 2)
        step_options = {"generator": generators} if sampler.ancestral else {}

        for k, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            if self.inpainting_unet:
                whole = self.latents.whole_picture(shape).expand(len(model_input), -1, -1, -1)
                model_input = torch.cat([model_input, whole], 1)
            noise, _ = self.calls.run_unet(model_input, t, blocks, size, added=added, mix=mix)
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance * (cond - uncond)
            latents = scheduler.step(noise, t, latents, **step_options).prev_sample
            if on_step is not None and not on_step(k + 1):
                return None
        return self.codec.decode(latents, self.calls.compiled(size))[:count]

    def _start(
        self, specs: Sequence[ImageSpec], shape: BatchShape
    ) -> tuple[Any, list[torch.Generator], torch.Tensor]:
        """A fresh sampler and the starting latents, scaled for it."""
        sampler = make_scheduler(shape.scheduler, self.scheduler_config)
        sampler.set_timesteps(shape.steps, device=self.device)
        generators, noise = self.latents.noise(specs, shape)
        return sampler, generators, noise * sampler.init_noise_sigma

    # -- the steps of diffusers' pipelines, each in its module ---------------------------------

    def prepare(
        self, key: str, specs: Sequence[ImageSpec], shape: BatchShape, source: Source | None = None
    ) -> Lane:
        """A job's lane at its first step (worker/latents.py)."""
        return self.latents.prepare(key, specs, shape, source)

    def ready(self, source: Source, shape: BatchShape) -> Source:
        """The source's picture preprocessed on the host, in any thread (worker/latents.py)."""
        return self.latents.ready(source, shape)

    def second_pass(
        self, lane: Lane, specs: Sequence[ImageSpec], shape: BatchShape, hires: Hires
    ) -> Lane:
        """A hires fix's second pass of a finished lane (worker/latents.py)."""
        return self.latents.second_pass(lane, specs, shape, hires)

    def encode(self, prompts: Sequence[str], syntax: Syntax = "plain") -> torch.Tensor:
        """Prompts of one length as UNet contexts, (len(prompts), 77 x chunks, dim)."""
        return torch.stack(self.family.contexts([Prompt(p, syntax) for p in prompts]))

    def chunk_count(self, prompt: str, syntax: Syntax) -> int:
        return self.family.chunk_count(prompt, syntax)

    def decode(self, latents: torch.Tensor, compiled: bool = False) -> list[np.ndarray | None]:
        return self.codec.decode(latents, compiled)

    def images(self, decoding: Decoding) -> list[np.ndarray | None]:
        """A decoding's pixels, waiting for it if it is not ready (worker/vae.py)."""
        return decoding.codec.images(decoding)

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
        # SDXL: each row's added conditioning, in the rows' order (cond, then guided uncond).
        added = joined([lane.cond_added for lane in lanes]
                       + [lanes[i].uncond_added for i in guided])  # fmt: skip
        # A step's time, ControlNets' forwards included (they are part of what a row costs).
        timer = GpuTimer(self.device) if self.observer is not None else None
        if self.controls is not None:  # each row's ControlNet residuals (zero without control)
            row_blocks = [Block(lane.rows, lane.step, lane.steps, lane.controls, True)
                          for lane in lanes]  # fmt: skip
            row_blocks += [Block(lanes[i].rows, lanes[i].step, lanes[i].steps, lanes[i].controls,
                                 False) for i in guided]  # fmt: skip
            forward = partial(self.calls.run_control, size=lanes[0].size)
            residuals = self.controls.residuals(row_blocks, sample, t_rows, blocks, added,
                                                forward)  # fmt: skip
            added = (added or {}) | residuals
        mix = None
        if self.adapters is not None:  # each row's LoRAs, in the same order
            mixes = [lane.mix or self.adapters.zero(lane.rows) for lane in lanes]
            mix = RowMix.joined(mixes + [mixes[i] for i in guided])
        noise, padding = self.calls.run_unet(sample, t_rows, blocks, lanes[0].size, labels, added,
                                             mix)  # fmt: skip
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
        waited = self._lead.launched()
        if self.observer is not None:
            self.observer.waited(waited)
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
            fitted = fit_colours(self.vae, self.device, self.vae.dtype, self.latent_scale)
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
    def read_prompts(self, jobs: Sequence[Sequence[ImageSpec]]) -> None:
        """Encode these jobs' prompts ahead of their lanes (the prompt reader's thread, off the
        GPU's: worker/continuous.py), into the family's cache, where their lanes find them."""
        self.family.remember(jobs)

    @torch.inference_mode()
    def finish(self, lane: Lane) -> Decoding:
        """A finished lane's decode, started: `images` gives its pixels once `ready`."""
        whole = lane.tiling is None and self.calls.compiled(lane.size)
        codec = self.codec if lane.vae is None else self.latents.vaes[lane.vae]
        return codec.decode_async(lane.latents, whole)

    def release_memory(self) -> None:
        """Give cached GPU memory back after an out-of-memory error, before retrying smaller."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
