"""The engines a worker holds: one per model it serves (`SDSERVE_MODELS`, or the worker's share
of them), and the x4 upscaler's (`SDSERVE_UPSCALER`) beside them. A job runs on its model's
engine (the queue it came from), an x4 upscale on the upscaler's, a refiner's pass on the
refiner's."""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import time
from pathlib import Path

import torch

from app.jobs.contract import Job
from app.jobs.settings import refuse
from app.jobs.tasks import task_of
from worker.compiled import Tuning
from worker.engine import Engine
from worker.helpers import Helpers
from worker.images import Provenance
from worker.inputs import NoRefiner, NoUpscaler
from worker.rows import Lane
from worker.settings import TINY_MODEL_DIR, WorkerSettings, split_source
from worker.single_file import as_folder

log = logging.getLogger("sdserve.worker")

X4 = "x4-upscaler"  # the engine key of the x4 upscaler's jobs


class Engines:
    def __init__(self, models: dict[str, Engine], upscaler: Engine | None = None) -> None:
        self.models = models
        self.upscaler = upscaler
        # The first model's engine: what every engine shares (device, tuning) is read here.
        self.first = next(iter(models.values()))
        self.tuning = self.first.tuning
        self.device = self.first.device

    def key(self, job: Job, lane: Lane | None = None) -> str:
        """Which engine runs the job (or, given, its lane): the x4 upscaler's jobs its, a
        refiner's pass the refiner's, the others their model's (whose queue they came
        from)."""
        if lane is not None and lane.model is not None:
            return lane.model
        return X4 if task_of(job.request).engine == "x4" else job.delivery.model

    def of(self, job: Job, lane: Lane | None = None) -> Engine:
        key = self.key(job, lane)
        if key == X4:
            if self.upscaler is None:
                raise NoUpscaler("this worker has no x4 upscaler (SDSERVE_UPSCALER)")
            return self.upscaler
        return self.models[key]

    def all(self) -> list[Engine]:
        return [*self.models.values(), *([self.upscaler] if self.upscaler else [])]

    def warm_entries_left(self) -> int:
        """Warm-up entries left for the loop's idle time, all engines."""
        return sum(engine.calls.entries_left() for engine in self.all())

    def warming(self) -> bool:
        return self.warm_entries_left() > 0

    def warm_next(self) -> bool:
        """Warm one entry left for idle time, of the first engine that has one."""
        return any(engine.warm_next() for engine in self.all())

    def refiner(self, job: Job) -> Engine | None:
        """The engine of the job's refiner; None when it has none. A refiner this worker does
        not hold fails the job: base and refiner are served by the same workers."""
        wanted = getattr(job.request, "refiner", None)
        if wanted is None:
            return None
        if wanted.model not in self.models:
            raise NoRefiner(f"the refiner {wanted.model!r} is not among this worker's models"
                            f" ({', '.join(self.models)}): serve it beside {job.delivery.model}"
                            " (SDSERVE_WORKER_MODELS)")  # fmt: skip
        return self.models[wanted.model]

    def provenance(self, job: Job) -> Provenance:
        """The model's folder name and the short hashes of the job's LoRAs and embeddings, as
        the images' infotext names them."""
        engine = self.of(job)
        hashes = {}
        if engine.adapters is not None:
            hashes = {lora.name: engine.adapters.short_hash(lora.name)
                      for lora in job.request.loras}  # fmt: skip
        used = {}
        if engine.embeddings is not None:
            used = engine.embeddings.used(job.request.prompt, job.request.negative_prompt)
        return Provenance(Path(engine.model).name, hashes, used)

    def info(self) -> dict[str, object]:
        """What the heartbeat says of them."""
        # Each model's ControlNets (those that fit its UNet): the API refuses a unit that no
        # live worker of the job's model holds, where a worker would fail the job.
        controlnets = {name: sorted(e.controls.models) if e.controls else []
                       for name, e in self.models.items()}  # fmt: skip
        # Whether each model takes LoRAs at all (SDSERVE_LORA_DIR): from the first heartbeat
        # on, before the LoRA list is published, so the API refuses a LoRA that no live worker
        # could apply where this worker would fail the job.
        loras = {name: e.adapters is not None for name, e in self.models.items()}
        return {"device": str(self.device), "models": list(self.models),
                "upscaler": self.upscaler is not None, "controlnets": controlnets,
                "loras": loras}  # fmt: skip

    def tokenizers(self) -> dict[str, dict[str, str]]:
        """Each model's tokenizer as the API reads it (to count a prompt's chunks)."""
        return {name: e.published_tokenizer.fields() for name, e in self.models.items()}


def tuning_of(settings: WorkerSettings, device: torch.device) -> Tuning:
    cuda = device.type == "cuda"
    return Tuning(
        max_batch=settings.max_batch,
        fuse=cuda,
        compile=settings.compile == "on" or (settings.compile == "auto" and cuda),
        compiled_sizes=tuple(settings.compiled_sizes),
        vae_chunk=settings.vae_chunk,
        vae_upcast=settings.vae_upcast,
        rows=True,  # continuous batching: rows of many jobs per UNet call
        prompt_chunks=settings.max_prompt_chunks,
        masked_contexts=settings.masked_contexts,
        tile=settings.tile,
        tile_overlap=settings.tile_overlap,
        loras=settings.lora_dir,
        lora_slots=settings.lora_slots,
        lora_row_rank=settings.lora_row_rank,
        lora_kernels=settings.lora_kernels,
        lora_tiles=settings.lora_tiles,
        controlnets=tuple(settings.controlnets.items()),
        embeddings=settings.embeddings_dir,
        vaes=tuple(settings.vaes.items()),
    )


def prepare_model(model: str) -> str:
    """The model to load; the default tiny model is built on first use."""
    if model == str(TINY_MODEL_DIR) and not (TINY_MODEL_DIR / "model_index.json").exists():
        from worker.tiny import build_tiny_model

        TINY_MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
        # Built aside, then renamed: a crash or a second worker never sees half a model.
        with tempfile.TemporaryDirectory(dir=TINY_MODEL_DIR.parent) as tmp:
            build_tiny_model(Path(tmp) / "model")
            with contextlib.suppress(OSError):  # another worker won the race: use its model
                (Path(tmp) / "model").rename(TINY_MODEL_DIR)
        log.info("built the tiny model in %s", TINY_MODEL_DIR)
    return model


def build_engine(source: str, device: torch.device, tuning: Tuning) -> Engine:
    """A model's engine, loaded (a single-file checkpoint's folder made first), not warmed."""
    model, vae, config = split_source(source)
    if model.endswith(".safetensors") and config is not None:
        model = as_folder(model, config)
    return Engine(prepare_model(model), device, tuning, vae=vae)


def _warmed(
    name: str, source: str, device: torch.device, tuning: Tuning, helpers: Helpers | None
) -> tuple[Engine, float]:
    """A model's engine, warmed up (from what its helper compiled, where it has one); and when
    its loading ended."""
    engine = build_engine(source, device, tuning)
    loaded = time.perf_counter()
    if helpers is None:
        engine.warm_up()
    elif helpers.compiles_unet(name):  # all of it compiled aside: wait, then read it
        helpers.wait(name)
        engine.warm_up()
    else:  # the UNet compiled here meanwhile, the rest aside
        engine.warm_up(helped=functools.partial(helpers.wait, name))
    return engine, loaded


def load_engines(
    models: dict[str, str], device: torch.device, tuning: Tuning, helpers: Helpers | None = None
) -> tuple[dict[str, Engine], float, float]:
    """Load and warm up each model, saying what each holds in memory; and the seconds all the
    loading and all the warming took. Models that do not fit beside each other stop the worker
    (exit 2) naming them: hold fewer per worker. `helpers`: the compile helpers started for
    these models (worker/helpers.py); each model's warm-up waits for its helper's part."""
    engines: dict[str, Engine] = {}
    load_s = warm_s = 0.0
    for name, source in models.items():
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        started = time.perf_counter()
        try:
            try:
                engine, loaded = _warmed(name, source, device, tuning, helpers)
            except torch.cuda.OutOfMemoryError:
                if helpers is None or not helpers.running():
                    raise
                # The helpers' copies of models took the room: without them, once more.
                log.warning("model %s ran out of GPU memory beside the compile helpers: they"
                            " are stopped, and its warm-up starts again", name)  # fmt: skip
                helpers.stop()
                helpers = None
                torch.cuda.empty_cache()
                engine, loaded = _warmed(name, source, device, tuning, None)
        except torch.cuda.OutOfMemoryError:
            beside = f" beside {', '.join(engines)}" if engines else ""
            refuse(f"model {name} does not fit in {device}'s memory{beside}: give this worker"
                   " fewer models (SDSERVE_WORKER_MODELS) or a larger GPU")  # fmt: skip
        finally:
            if helpers is not None:
                helpers.stop(name)
        warmed = time.perf_counter()
        engines[name] = engine
        load_s, warm_s = load_s + loaded - started, warm_s + warmed - loaded
        weights = engine.weight_bytes()
        held = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else weights
        log.info("model %s (%s): %.0f MiB of weights, %.0f MiB held on %s; loaded in %.1fs,"
                 " warmed up in %.1fs", name, source, weights / 2**20, held / 2**20, device,
                 loaded - started, warmed - loaded)  # fmt: skip
    return engines, load_s, warm_s
