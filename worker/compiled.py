"""The compiled-call boundary: the one place that compiles, pads and lays out what the UNet and
the VAE decoder are given.

vLLM's rule for its model runner holds here: every compilation finishes before the first
request. A compiled function is guarded by what it was traced with (ranks, dtypes, strides,
sizes outside the marked ranges); an input that fails a guard compiles the function again, for a
minute or more on a GPU, while every job on the worker waits. So:

- every input is made canonical here, whatever produced it: contiguous (latents from a
  channels-last VAE encoder are channels-last, and `torch.cat` of channels-last lanes stays
  so), one dtype, and one timestep per row (a 0-d timestep is another rank);
- the batch dimension is dynamic over the row buckets, and the context's length over 1 to
  `prompt_chunks` chunks of 77 tokens, so no request's size or prompt length is a guard;
- `warm_up` compiles the UNet at the first entry of `warm_list` (compiled size x row bucket x
  prompt length) and records the entries of one-chunk prompts at the fewest and the most rows,
  and the decoder at every compiled size, then serving starts: a call that would compile runs
  eagerly instead (`torch.compiler.set_stance("fail_on_recompile")`, caught), is logged with
  the guard that failed and counted (`sdserve_worker_recompiles_total`);
- the other entries compile nothing (rows and the context's length are dynamic): each is a
  CUDA graph recording and cuDNN's first calls at its shapes, 0.4-0.7 s of an H100, 45 of an
  SD 1.5 start's 48. The row loop records them one at a time while it has no rows
  (`warm_next`); a call that meets one first records it then;
- CUDA graphs reuse their output buffers at the next replay: an output is copied out before
  another call can overwrite it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch._dynamo.utils import compile_times, counters

from worker.adapters import RowBuffers, RowMix
from worker.controls import ControlNets, split
from worker.devices import on_device

log = logging.getLogger("sdserve.compiled")

# diffusers' upsampling branches on the batch (`if hidden_states.shape[0] >= 64`: a workaround
# for large batches), so a compiled UNet's graph holds either fewer than 64 rows or 64 and more
# (seen with torch 2.11 on an H200: traced at a few rows, "size()[0] <= 63"; marked dynamic
# over 2..64, the trace fails). Continuous batching stays within one graph: at most 62 rows
# (31 guided images); static batches of 2 x max_batch rows past it compile a second graph.
ROW_LIMIT = 62
# Row buckets are 4 apart up to here, 8 apart above (Tuning.row_buckets).
FINE_ROWS = 24

# Compiled entries one code object may hold (dynamo's own limit is 8, then it refuses, and a
# fullgraph compile fails): a worker holding several models (SD 1.x, SDXL, an inpainting UNet,
# the x4 upscaler, their ControlNets) compiles one UNet forward per architecture and dtype, at
# warm-up; while serving nothing compiles whatever the limit (`fail_on_recompile`).
RECOMPILE_LIMIT = 64

# A chunk of a prompt as CLIP reads it: start, 75 tokens, end.
CHUNK_TOKENS = 77

Size = tuple[int, int]  # (width, height) in pixels
Out = TypeVar("Out")


@dataclass(frozen=True)
class Tuning:
    """How the engine lays out and compiles its work; the worker's settings give it."""

    max_batch: int = 8
    # Channels-last convolutions and fused attention projections: faster on GPUs.
    fuse: bool = False
    # torch.compile with CUDA graphs, for the (width, height) sizes in `compiled_sizes`; other
    # sizes run eagerly rather than stall the GPU for a compilation. Empty: the engine's model
    # family's default size (worker/engine.py).
    compile: bool = False
    compile_mode: str = "reduce-overhead"
    # What compiles the traced graph: inductor on a GPU; the tests trace with "eager" (the
    # same guards, none of inductor's minutes on a CPU).
    compile_backend: str = "inductor"
    compiled_sizes: tuple[Size, ...] = ((512, 512),)
    # Images per VAE decode call: its memory grows with the pixels, not the latents.
    vae_chunk: int = 1
    # On a GPU, the dtype of a VAE that overflows in fp16 (SDSERVE_VAE_UPCAST).
    vae_upcast: str = "float32"
    # Continuous batching (rows of many jobs per call, at most ROW_LIMIT) or static batches.
    rows: bool = False
    # The longest prompt encoded, in chunks of 75 tokens.
    prompt_chunks: int = 4
    # Rows of different prompt lengths in one UNet call: each context padded to the call's
    # longest and masked (the cross-attention gives padded tokens no weight, so a row's image
    # stays its own). Off: one call per length, where no call takes a mask. Every call then
    # takes a mask (one compiled graph), which moves the cross-attention off the kernels
    # that take none: its price against a call per length is bench/masked.py's to say.
    masked_contexts: bool = False
    # Pictures of more than `tile` x `tile` pixels are denoised in tiles of `tile` overlapping by
    # `tile_overlap` (worker/tiles.py); smaller ones in one piece.
    tile: int = 1024
    tile_overlap: int = 128
    # LoRAs per row (worker/adapters.py): their folder (None: no LoRA layers at all), how many
    # stay resident on the GPU, and the most ranks one row's LoRAs take together.
    loras: Path | None = None
    lora_slots: int = 8
    lora_row_rank: int = 128
    lora_kernels: bool = True  # worker/lora_kernel.py on CUDA (False: the tensor path)
    lora_tiles: tuple[int, ...] = ()  # its tiling (SDSERVE_LORA_TILES); (): its defaults
    # ControlNets (worker/controls.py): (name, diffusers folder), loaded beside every model
    # whose UNet they fit.
    controlnets: tuple[tuple[str, str], ...] = ()
    # Textual-inversion embeddings' folder (worker/embeddings.py); None: none.
    embeddings: Path | None = None
    # The VAEs a request may choose instead of the model's (SDSERVE_VAES): (name, source).
    vaes: tuple[tuple[str, str], ...] = ()

    def buckets(self) -> list[int]:
        """Static batching: batch sizes a batch is padded up to: powers of two, and max_batch
        itself."""
        sizes = {1 << k for k in range(self.max_batch.bit_length()) if 1 << k < self.max_batch}
        return sorted(sizes | {self.max_batch})

    def bucket(self, size: int) -> int:
        if size > self.max_batch:
            raise ValueError(f"a batch of {size} exceeds max_batch {self.max_batch}")
        return next(b for b in self.buckets() if b >= size)

    def row_cap(self) -> int:
        """UNet rows in one call at most: cond and uncond make twice max_batch; continuous
        batching stays within ROW_LIMIT (one graph)."""
        return min(2 * self.max_batch, ROW_LIMIT) if self.rows else 2 * self.max_batch

    def row_buckets(self) -> list[int]:
        """UNet rows a compiled call is padded up to: 2, 4, 8, every 4 up to FINE_ROWS, then
        every 8, up to the cap. Each bucket is one CUDA graph of the one compiled UNet (a
        warm-up entry a prompt length: about half a second of the start). Fine steps where
        padding is dear: from 8 rows on, a step's time grows about linearly with its rows (an
        H200: 20 ms at 8, 37 at 16), so a padded row costs what a real one does; and a load at
        60% holds few rows (the GPU check's Poisson load: 5.6 jobs a second of about a second
        each, two rows a job: about 11), where a bucket every 8 padded 9-15 rows to 16. None is
        1: dynamo specializes a size of 1, and a second row costs next to nothing."""
        top = max(2, self.row_cap())
        fine = {2, 4, *range(8, FINE_ROWS + 1, 4)}
        return sorted({b for b in fine | set(range(FINE_ROWS, top, 8)) if b < top} | {top})

    def row_bucket(self, rows: int) -> int:
        return next((b for b in self.row_buckets() if b >= rows), rows)


@dataclass(frozen=True)
class Warm:
    """One entry of the warm-up list: a compiled call of this many rows at this size, with a
    context of this many tokens."""

    size: Size
    rows: int
    tokens: int


class CompiledCalls:
    """The UNet and the VAE decoder as the engine calls them: compiled at the compiled sizes,
    eager elsewhere (other sizes, the x4 upscaler's class labels)."""

    def __init__(
        self,
        unet: Any,
        vae: Any,
        tuning: Tuning,
        device: torch.device,
        added_shapes: dict[str, int] | None = None,
        lora_rows: RowBuffers | None = None,
    ) -> None:
        self.unet = unet
        # Where the UNet's LoRA layers read each row's LoRAs (worker/adapters.py); None when
        # the worker serves none.
        self.lora_rows = lora_rows
        # SDXL's added conditioning: each tensor's width per row (worker/families.py).
        self.added_shapes = added_shapes or {}
        self.vae = vae
        self.tuning = tuning
        self.device = device
        self.dtype: torch.dtype = unet.dtype
        self.recompiles = 0  # calls that would have compiled while serving (run eagerly)
        # Told of each such call, with the guard that failed (the worker counts it).
        self.on_recompile: Callable[[str], None] | None = None
        self.serving = False
        # Where ControlNets are served (`serve_controls`): every call takes residuals (zeros
        # without control), so the compiled UNet has one signature; and each ControlNet's
        # compiled forward, by name.
        self.controls: ControlNets | None = None
        self._fast_controls: dict[str, Callable[..., Any]] = {}
        self._fast_unet: Callable[..., Any] | None = None
        self._fast_decode: Callable[..., Any] | None = None
        self._fast_encode: Callable[..., Any] | None = None
        # Entries of the warm-up list left for the loop's idle time (`warm_next`).
        self._later: deque[Warm] = deque()
        inductor = tuning.compile_backend == "inductor"
        self._options: dict[str, Any] = {"mode": tuning.compile_mode} if inductor else {}
        if tuning.compile:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
            # Only the sizes marked here are dynamic (rows, context length). Dynamo otherwise
            # makes dynamic whatever size differs from an earlier compile of the same code:
            # every model of a worker runs one UNet class's forward, so a second model's (an
            # SDXL refiner after its base) was traced with its widths symbolic, a graph that
            # differs from the one its compile helper put in the cache (seen on an H100: the
            # refiner's first entry compiled again, 127 s, after its helper's 149 s).
            config.automatic_dynamic_shapes = False
            self._fast_unet = self._compiled(unet)
            self._fast_decode = torch.compile(
                vae.decode, backend=tuning.compile_backend, fullgraph=True
            )
            # The encoder too: eager, a 512x512 picture's encode took 14.5 ms of an H200 against
            # the compiled decoder's 8.7 (which does twice its work); img2img, inpainting and a
            # pixel hires fix encode one picture per job.
            # A function of the VAE, not a method of this object: dynamo would guard on this
            # object's identity, and every engine of the process (a worker holds several
            # models) would recompile it, up to dynamo's limit of 8; a module argument is
            # guarded by its structure, its weights are inputs.
            self._fast_encode = torch.compile(
                moments, backend=tuning.compile_backend, fullgraph=True
            )

    def compiled_controls(self) -> list[str]:
        """The ControlNets whose forward runs compiled (at the compiled sizes)."""
        return sorted(self._fast_controls)

    def _compiled(self, module: Any) -> Callable[..., Any]:
        compiled: Callable[..., Any] = torch.compile(
            module, backend=self.tuning.compile_backend, fullgraph=True, **self._options
        )
        return compiled

    def serve_controls(self, controls: ControlNets) -> None:
        """Serve ControlNets: every UNet call takes residuals from now on (zeros without
        control), and each ControlNet's forward is compiled as the UNet is (before warm-up)."""
        self.controls = controls
        if self._fast_unet is not None:
            self._fast_controls = {name: self._compiled(model)
                                   for name, model in controls.models.items()}  # fmt: skip

    # -- what is compiled, and its warm-up -----------------------------------------------------

    def compiled(self, size: Size) -> bool:
        return self._fast_unet is not None and size in self.tuning.compiled_sizes

    def warm_list(self) -> list[Warm]:
        """Everything a compiled call can be given: each compiled size, row bucket and prompt
        length. Whatever a request chooses (kind, strength, mask, sampler, guidance, previews,
        n) is one of these once its inputs are canonical. The largest call comes first (the
        graph traced at the most rows and the longest context: whatever the trace decides by
        its sizes, it decides for the largest)."""
        if self._fast_unet is None:
            return []
        lengths = [CHUNK_TOKENS * chunks for chunks in range(1, self.tuning.prompt_chunks + 1)]
        return [
            Warm(size, rows, tokens)
            for size in self.tuning.compiled_sizes
            for rows in reversed(self.tuning.row_buckets())
            for tokens in reversed(lengths)
        ]

    def now_and_later(self) -> tuple[list[Warm], list[Warm]]:
        """The warm-up list split into what the start warms and what the row loop warms when
        idle. Now: the first entry (the trace) and, for one-chunk prompts, the fewest and the
        most rows (one request alone, the worker's own warm-up job; a full step). Later, the
        shortest prompts first, few rows first (the calls a worker just started meets first).
        Rows and the context's length are dynamic, so no later entry compiles: each is a CUDA
        graph recording and cuDNN's first calls at its shapes (0.4-0.7 s of an H100), paid
        once by the call that meets it before the idle loop did. Static batches have no idle
        hook: everything now."""
        entries = self.warm_list()
        if not self.tuning.rows:
            return entries, []
        buckets = self.tuning.row_buckets()
        ends = {buckets[0], buckets[-1]}
        later = [w for w in entries[1:] if w.tokens != CHUNK_TOKENS or w.rows not in ends]
        now = [w for w in entries if w not in later]
        return now, sorted(later, key=lambda w: (w.tokens, w.rows, w.size))

    def entries_left(self) -> int:
        """Entries left for idle time."""
        return len(self._later)

    @torch.inference_mode()
    def warm_next(self, latent_scale: int) -> bool:
        """Record the next entry left for idle time, if any is left (under the serving stance:
        one that would compile runs eagerly and is counted, as a request's would)."""
        if not self._later:
            return False
        warm = self._later.popleft()
        if self.lora_rows is not None:
            self.lora_rows.clear()
        self._warm_entry(warm, latent_scale)
        if not self._later:
            log.info("warmed up the UNet entries left for idle time")
        return True

    @torch.inference_mode()
    def warm_up(self, latent_scale: int, helped: Callable[[], None] | None = None) -> None:
        """Compile and record the entries the start warms (`now_and_later`; each twice: CUDA
        graph trees record a shape at its second call) and the decoder at each compiled size;
        then serve, the rest left for `warm_next`.
        `helped` is called before the parts a helper process compiles (worker/helpers.py):
        it returns once their compiled code is in the cache, or the helper has failed."""
        began = time.perf_counter()
        entries, later = self.now_and_later()
        for warm in entries:
            try:
                self._warm_entry(warm, latent_scale)
            except Exception as e:
                if not self.tuning.masked_contexts:
                    raise
                # Seen on an H100 with torch 2.11 (2026-12-05): the masked graph's trace
                # specializes the rows (diffusers repeats the mask per head) and the compile
                # fails. The worker then serves as without the setting, rather than not at all.
                log.error("SDSERVE_MASKED_CONTEXTS: the UNet with a mask did not compile (%s);"
                          " rows of each prompt length run in calls of their own",
                          str(e).splitlines()[0][:300])  # fmt: skip
                self.tuning = replace(self.tuning, masked_contexts=False)
                self.warm_up(latent_scale, helped)
                return
        unet_s = time.perf_counter() - began
        if helped is not None:
            helped()
        decoder_s, encoder_s = self._warm_vae(latent_scale)
        if entries:  # where a cold start's minutes go
            log.info("warm-up: %d UNet entries in %.1fs (%d left for idle time), the VAE decoder"
                     " in %.1fs, its encoder in %.1fs", len(entries), unet_s, len(later),
                     decoder_s, encoder_s)  # fmt: skip
            phases = compiler_phases()
            if phases:
                log.info("the compiler's seconds by phase, this process: %s", phases)
        for name in list(self._fast_controls):
            self._warm_control(name, self.warm_list(), latent_scale)
        # A compiled call that CUDA graphs could not capture runs without them, slower and
        # silently (torch says why only under TORCH_LOGS=cudagraphs): say how many did.
        skipped = cudagraph_skips()
        if skipped:
            log.warning("CUDA graphs skipped %d times in the warm-up (TORCH_LOGS=cudagraphs says"
                        " why): those calls run without them", skipped)  # fmt: skip
        self._later = deque(later)
        self.serving = True

    @torch.inference_mode()
    def precompile(self, latent_scale: int, unet: bool) -> None:
        """What a helper process compiles for a worker's warm-up, into the compile cache the
        warm-up then reads (worker/helpers.py): the VAE's decoder and encoder, each
        ControlNet's forward, and with `unet` the UNet (its first entry: rows and context
        length are dynamic, so one trace serves every entry). Nothing is recorded for serving:
        CUDA graphs live in the process that replays them."""
        entries = self.warm_list()
        if unet and entries:
            self._warm_entry(entries[0], latent_scale)
        self._warm_vae(latent_scale)
        for name in list(self._fast_controls):
            self._warm_control(name, entries[:1], latent_scale)

    def _warm_entry(self, warm: Warm, latent_scale: int) -> None:
        started = time.perf_counter()
        width, height = warm.size
        latent, sample, t, context, added = self._warm_inputs(warm, self.unet.config,
                                                              latent_scale)  # fmt: skip
        if self.controls is not None:
            added = (added or {}) | self.controls.zeros(warm.rows, *latent)
        mask = None
        if self.tuning.masked_contexts:
            mask = torch.ones(warm.rows, warm.tokens, device=self.device, dtype=self.dtype)
        for _ in range(2):
            self._unet_call(sample, t, context, None, True, added, mask)
        took = time.perf_counter() - started
        level = logging.INFO if took > 1 else logging.DEBUG
        log.log(level, "warmed up %dx%d at %d UNet rows, %d tokens in %.1fs",
                width, height, warm.rows, warm.tokens, took)  # fmt: skip

    def _warm_vae(self, latent_scale: int) -> tuple[float, float]:
        """The decoder and the encoder at each compiled size; the seconds each took."""
        began = time.perf_counter()
        if self._fast_decode is not None:
            channels = self.vae.config.latent_channels
            for width, height in self.tuning.compiled_sizes:
                latents = torch.zeros(self.tuning.vae_chunk, channels, height // latent_scale,
                                      width // latent_scale, device=self.device,
                                      dtype=self.vae.dtype)  # fmt: skip
                self.decode(latents, compiled=True)
        decoder_s = time.perf_counter() - began
        began = time.perf_counter()
        if self._fast_encode is not None:
            try:
                for width, height in self.tuning.compiled_sizes:
                    picture = torch.zeros(1, 3, height, width, device=self.device)
                    self.encode(picture, compiled=True)
            except Exception as e:  # any compiler failure: the encoder runs eagerly, as it did
                self._fast_encode = None
                log.error("the VAE encoder did not compile (it runs eagerly): %s", e)
        return decoder_s, time.perf_counter() - began

    def _warm_inputs(self, warm: Warm, config: Any, latent_scale: int) -> tuple[Any, ...]:
        """A warm-up entry's inputs for a model of this configuration (a UNet's, a
        ControlNet's): (latent size, sample, timesteps, context, SDXL's added conditioning)."""
        width, height = warm.size
        latent = (height // latent_scale, width // latent_scale)
        sample = torch.zeros(warm.rows, config.in_channels, *latent, device=self.device,
                             dtype=self.dtype)  # fmt: skip
        t = torch.full((warm.rows,), 500.0, device=self.device)
        context = torch.zeros(warm.rows, warm.tokens, config.cross_attention_dim,
                              device=self.device, dtype=self.dtype)  # fmt: skip
        added = {name: torch.zeros(warm.rows, n, device=self.device, dtype=self.dtype)
                 for name, n in self.added_shapes.items()} or None  # fmt: skip
        return latent, sample, t, context, added

    def _warm_control(self, name: str, entries: list[Warm], latent_scale: int) -> None:
        """A ControlNet's forward at every entry of the warm-up list (its rows are some of a
        call's); one that fails to compile runs eagerly from then on, said (the worker serves
        it slower rather than not at all)."""
        assert self.controls is not None
        model = self.controls.models[name]
        config = model.config
        began = time.perf_counter()
        try:
            for warm in entries:
                latent, sample, t, context, added = self._warm_inputs(warm, config, latent_scale)
                cond = torch.zeros(warm.rows, *self.controls.cond_shape(name, *latent),
                                   device=self.device, dtype=self.dtype)  # fmt: skip
                for _ in range(2):
                    self.run_control(name, sample, t, context, cond, added, warm.size)
        except Exception as e:  # any compiler failure: that ControlNet is served eagerly
            del self._fast_controls[name]
            log.error("ControlNet %s did not compile (it runs eagerly): %s", name, e)
            return
        log.info("warmed up ControlNet %s: %d entries in %.1fs", name, len(entries),
                 time.perf_counter() - began)  # fmt: skip

    def run_control(
        self,
        name: str,
        sample: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        cond: torch.Tensor,
        added: dict[str, torch.Tensor] | None,
        size: Size,
    ) -> list[torch.Tensor]:
        """A ControlNet's residuals for its rows of a call (the down path's, then the middle
        block's): compiled at the compiled sizes, padded to a row bucket as the UNet's rows
        are; eager elsewhere."""
        assert self.controls is not None
        sample = sample.to(self.dtype).contiguous()
        t = canonical_timesteps(t, len(sample)).contiguous()
        context = context.to(self.dtype).contiguous()
        cond = cond.to(self.dtype).contiguous()
        if added is not None:
            added = {k: v.to(self.dtype).contiguous() for k, v in added.items()}
        rows = len(sample)
        fast = self._fast_controls.get(name)
        if fast is None or not self.compiled(size) or rows > max(2, self.tuning.row_cap()):
            return list(self.controls.eager(name, sample, t, context, cond, added))
        padding = self.tuning.row_bucket(rows) - rows
        if padding:
            sample, t, context, cond = (padded_rows(x, padding) for x in (sample, t, context, cond))
            if added is not None:
                added = {k: padded_rows(v, padding) for k, v in added.items()}
        self._mark_rows([sample, t, context, cond, *(added or {}).values()], context)

        def run() -> list[torch.Tensor]:
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
            down, mid = fast(sample, t, context, cond, added_cond_kwargs=added, return_dict=False)
            return [r[:rows].clone() for r in (*down, mid)]  # out of the graph's pool

        def eager() -> list[torch.Tensor]:
            assert self.controls is not None
            outputs = self.controls.eager(name, sample, t, context, cond, added)
            return [r[:rows] for r in outputs]

        what = f"ControlNet {name} {tuple(sample.shape)} x {tuple(context.shape)}"
        return self._serve(run, eager, what)

    def _mark_rows(self, row_tensors: list[torch.Tensor], *contexts: torch.Tensor) -> None:
        """Dynamic over the row buckets (first dimension) and the prompt's chunks (the
        context's second, and its mask's), so no bucket or prompt length is a guard."""
        # Continuous batching bounds the rows (one graph); static batches grow to 2 x max_batch,
        # past ROW_LIMIT (a second graph, compiled at warm-up).
        # (Bounds on one side only break inductor's range analysis: none, or both.)
        bounds = {"min": 2, "max": max(2, self.tuning.row_cap())} if self.tuning.rows else {}
        for tensor in row_tensors:
            torch._dynamo.mark_dynamic(tensor, 0, **bounds)
        if self.tuning.prompt_chunks > 1:
            most = CHUNK_TOKENS * self.tuning.prompt_chunks
            for context in contexts:
                torch._dynamo.mark_dynamic(context, 1, min=CHUNK_TOKENS, max=most)

    # -- the calls ------------------------------------------------------------------------------

    def run_unet(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        blocks: list[torch.Tensor],
        size: Size,
        labels: torch.Tensor | None = None,
        added: dict[str, torch.Tensor] | None = None,
        mix: RowMix | None = None,
    ) -> tuple[torch.Tensor, int]:
        """The UNet's output for `sample`, whose rows see the prompt embeddings in `blocks`
        (laid end to end, a block per prompt), timestep `t` (one, or one per row), for SDXL
        the `added` conditioning and, where LoRAs are served, their LoRAs (`mix`), a row each;
        and the rows of padding it ran. Rows whose
        prompts have more chunks see a longer context: they run in a call of their own (one
        per length), since padding a shorter context would change what its rows attend to, and
        so their images; or, with `masked_contexts`, in one call, shorter contexts padded and
        masked. Most calls have one length."""
        t = canonical_timesteps(t, len(sample))
        compiled = self.compiled(size) and labels is None
        if self.tuning.masked_contexts:
            context, mask = masked(blocks)
            return self._padded(sample, t, context, labels, compiled, added, mix, mask)
        lengths = [block.shape[1] for block in blocks]
        if len(set(lengths)) == 1:
            return self._padded(sample, t, torch.cat(blocks), labels, compiled, added, mix)
        offsets = [0]
        for block in blocks:
            offsets.append(offsets[-1] + len(block))
        out: torch.Tensor | None = None
        padding = 0
        for length in dict.fromkeys(lengths):
            mine = [b for b, n in enumerate(lengths) if n == length]
            rows = [row for b in mine for row in range(offsets[b], offsets[b + 1])]
            index = on_device(rows, torch.long, self.device)
            part, padded = self._padded(
                sample.index_select(0, index),
                t.index_select(0, index),
                torch.cat([blocks[b] for b in mine]),
                None if labels is None else labels.index_select(0, index),
                compiled,
                None if added is None else {k: v.index_select(0, index) for k, v in added.items()},
                None if mix is None else mix.rows(index),
            )
            if out is None:
                out = part.new_empty((len(sample), *part.shape[1:]))
            out.index_copy_(0, index, part)
            padding += padded
        assert out is not None
        return out, padding

    def _padded(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        labels: torch.Tensor | None,
        compiled: bool,
        added: dict[str, torch.Tensor] | None = None,
        mix: RowMix | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """One UNet call; a compiled one is padded to its row bucket (copies of the last row,
        whose outputs are dropped): CUDA graphs need the shape, and an eager call computes no
        row it throws away. More rows than the cap (one job's many tiles) go in calls of the
        cap each."""
        rows = len(sample)
        cap = max(2, self.tuning.row_cap())
        if rows > cap:
            parts = [self._padded(sample[at : at + cap], t[at : at + cap],
                                  context[at : at + cap],
                                  None if labels is None else labels[at : at + cap], compiled,
                                  None if added is None
                                  else {k: v[at : at + cap] for k, v in added.items()},
                                  None if mix is None else mix.sliced(at, at + cap),
                                  None if mask is None else mask[at : at + cap])
                     for at in range(0, rows, cap)]  # fmt: skip
            return torch.cat([part for part, _ in parts]), sum(pad for _, pad in parts)
        padding = self.tuning.row_bucket(rows) - rows if compiled else 0
        if padding:
            sample, t, context = (padded_rows(x, padding) for x in (sample, t, context))
            if added is not None:
                added = {k: padded_rows(v, padding) for k, v in added.items()}
            if mix is not None:
                mix = mix.padded(padding)
            if mask is not None:
                mask = padded_rows(mask, padding)
        if self.lora_rows is not None:  # rows without LoRAs: unit 0 at scale 0
            if mix is None:
                self.lora_rows.clear()
            else:
                self.lora_rows.write(mix)
        return self._unet_call(sample, t, context, labels, compiled, added, mask)[:rows], padding

    def _unet_call(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        labels: torch.Tensor | None,
        compiled: bool,
        added: dict[str, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sample = sample.to(self.dtype).contiguous()
        context = context.to(self.dtype).contiguous()
        # Samplers differ in the timestep's dtype (int or float); one dtype keeps one graph.
        # The UNet embeds timesteps in float32 either way, so nothing changes numerically.
        t = t.to(torch.float32).contiguous()
        # SDXL's added conditioning in the model's dtype, as diffusers' pipelines give it.
        extra: dict[str, Any] = {}
        contexts = [context]
        if mask is not None:  # 1 a token the row attends to, 0 padding (diffusers' convention)
            mask = mask.to(self.dtype).contiguous()
            extra["encoder_attention_mask"] = mask
            contexts.append(mask)
        residuals: list[torch.Tensor] = []
        if added is not None:
            conditioning, control = split({k: v.to(self.dtype).contiguous()
                                           for k, v in added.items()})  # fmt: skip
            if conditioning:
                extra["added_cond_kwargs"] = conditioning
            extra |= control
            if control:
                residuals = [*control["down_block_additional_residuals"],
                             control["mid_block_additional_residual"]]  # fmt: skip
        if not compiled or self._fast_unet is None:
            out = self.unet(sample, t, encoder_hidden_states=context, class_labels=labels,
                            **extra)  # fmt: skip
            return out.sample  # type: ignore[no-any-return]
        row_tensors = [sample, *contexts, t, *extra.get("added_cond_kwargs", {}).values(),
                       *residuals]  # fmt: skip
        self._mark_rows(row_tensors, *contexts)
        fast = self._fast_unet

        def run() -> torch.Tensor:
            # Each call starts a new CUDA-graph step; its output lives in the graph's pool
            # until the next replay, so it is copied out (a few MB) before anyone can call
            # again (a call of many tiles, or of several prompt lengths, calls again at once).
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
            out: torch.Tensor = fast(sample, t, encoder_hidden_states=context, **extra).sample
            return out.clone()

        def eager() -> torch.Tensor:
            return self.unet(sample, t, encoder_hidden_states=context, **extra).sample  # type: ignore[no-any-return]

        return self._serve(run, eager, f"UNet {tuple(sample.shape)} x {tuple(context.shape)}")

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, compiled: bool) -> torch.Tensor:
        """Decoded pixels of latents already divided by the VAE's scaling factor: compiled
        (at its chunk size, for the compiled sizes) or eager."""
        latents = latents.to(self.vae.dtype).contiguous()  # an upcast VAE's: fp32
        if not compiled or self._fast_decode is None:
            return self.vae.decode(latents).sample  # type: ignore[no-any-return]
        fast = self._fast_decode

        def run() -> torch.Tensor:
            return fast(latents).sample  # type: ignore[no-any-return]

        def eager() -> torch.Tensor:
            return self.vae.decode(latents).sample  # type: ignore[no-any-return]

        return self._serve(run, eager, f"VAE decode {tuple(latents.shape)}")

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, compiled: bool) -> torch.Tensor:
        """The VAE's posterior parameters (`moments`) of pictures in [-1, 1]: compiled for one
        picture of a compiled size, eager otherwise."""
        # A copy made here: whoever made the picture (a loading thread, the loop; in inference
        # mode or not), the compiled call sees one kind of tensor, in the VAE's dtype.
        pixels = pixels.to(self.vae.dtype, memory_format=torch.contiguous_format, copy=True)
        if not compiled or self._fast_encode is None or len(pixels) != 1:
            return moments(self.vae, pixels)
        fast = self._fast_encode

        def run() -> torch.Tensor:
            return fast(self.vae, pixels)  # type: ignore[no-any-return]

        return self._serve(run, lambda: moments(self.vae, pixels),
                           f"VAE encode {tuple(pixels.shape)}")  # fmt: skip

    def _serve(self, fast: Callable[[], Out], eager: Callable[[], Out], what: str) -> Out:
        """A compiled call; once serving, one that would compile runs eagerly instead, said and
        counted (a guard failed: an input the warm-up did not cover)."""
        if not self.serving:
            return fast()
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return fast()
        except RuntimeError as e:
            if "fail_on_recompile" not in str(e):
                raise
            self.recompiles += 1
            log.error("a compiled call would have compiled while serving (run eagerly): %s: %s",
                      what, e)  # fmt: skip
            if self.on_recompile is not None:
                self.on_recompile(str(e))
            return eager()


def moments(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """What diffusers' `AutoencoderKL.encode` makes its latent distribution of (its `_encode`:
    the encoder, then the quantizing convolution where the VAE has one; its tiling and slicing
    are never switched on here)."""
    out: torch.Tensor = vae.encoder(pixels)
    quant = getattr(vae, "quant_conv", None)
    return out if quant is None else quant(out)


# The compiler's phases a cold start's minutes divide into (torch's own timers, summed over
# every compile of the process): tracing, AOT autograd, inductor's lowering, scheduling and
# code generation, waiting for the Triton kernels' compiles, loading them, guards; then, at
# the first calls, the Triton kernels' configurations timed on the GPU and the CUDA graphs'
# recordings.
COMPILER_PHASES = (
    "bytecode_tracing",
    "create_aot_dispatcher_function",
    "GraphLowering.run",
    "Scheduler.__init__",
    "Scheduler.codegen",
    "async_compile.wait",
    "PyCodeCache.load_by_key_path",
    "build_guards",
    "_compile.compile_inner",
    "CachingAutotuner.benchmark_all_configs",
    "CUDAGraphNode.record",
)


def compiler_phases() -> str:
    """`phase=seconds` for each phase torch timed in this process, "" when it timed none."""
    # The CSV form: the printable one is a table laid out by `tabulate` where it is installed
    # (the GPU image has it), and by commas where not, and only the commas were read.
    table = compile_times(repr="csv", aggregate=True)
    names, values = table if isinstance(table, tuple) else ([], [])
    seconds = {str(n): f"{float(str(v)):.2f}" for n, v in zip(names, values, strict=True)}
    return " ".join(f"{name}={seconds[name]}" for name in COMPILER_PHASES if name in seconds)


def cudagraph_skips() -> int:
    """Compiled calls in this process that CUDA graphs could not capture (torch's count)."""
    return int(counters["inductor"]["cudagraph_skips"])


def masked(blocks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings of any lengths as one context, each block padded with zeros to the
    longest, and its mask: 1 where a row has a token, 0 where it is padded."""
    longest = max(block.shape[1] for block in blocks)
    context = torch.cat([torch.nn.functional.pad(block, (0, 0, 0, longest - block.shape[1]))
                         for block in blocks])  # fmt: skip
    lengths = on_device([block.shape[1] for block in blocks for _ in range(len(block))],
                        torch.long, context.device)  # fmt: skip
    mask = torch.arange(longest, device=context.device) < lengths[:, None]
    return context, mask.to(context.dtype)


def padded_rows(tensor: torch.Tensor, padding: int) -> torch.Tensor:
    """The tensor with its last row repeated `padding` more times."""
    return torch.cat([tensor, tensor[-1:].expand(padding, *tensor.shape[1:])])


def canonical_timesteps(t: torch.Tensor, rows: int) -> torch.Tensor:
    """One float32 timestep per row, whether given one for all (a 0-d tensor) or one each."""
    t = t.to(torch.float32)
    return t.expand(rows) if t.dim() == 0 else t
