"""The worker's settings (env prefix SDSERVE_)."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from app.jobs.contract import DEFAULT_MODEL, is_side
from app.jobs.settings import CommonSettings, cache_dir, json_or_commas
from app.jobs.tiles import TILE, TILE_OVERLAP

# The tiny model lives here unless SDSERVE_MODEL names another; it is built on first start.
# Not ~/.cache/sdserve/tiny-model, where an older sdserve built it: that one's scheduler config
# lacks `clip_sample: false`, which DDIM's plan refuses.
TINY_MODEL_DIR = cache_dir() / "models" / "tiny-model"


def lora_tiling(text: str) -> tuple[int, ...]:
    """SDSERVE_LORA_TILES, "tokens,features,warps[,stages[,fan,fill[,out_stages]]]": () for
    empty (the kernel's defaults, worker/lora_kernel.py `Tiles`)."""
    if not text.strip():
        return ()
    wrong = (f"{text!r}: tokens,features,warps[,stages[,fan,fill[,out_stages]]]; tokens,"
             " features and warps powers of two, tokens and features at least 16 (tl.dot's"
             " least side), fill and out_stages 0 or more, the others at least 1")  # fmt: skip
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise ValueError(wrong) from None
    if len(parts) not in (3, 4, 6, 7) or any(p <= 0 for p in parts[:5]) or min(parts) < 0:
        raise ValueError(wrong)
    if any(p & (p - 1) for p in parts[:3]) or min(parts[:2]) < 16:
        raise ValueError(wrong)
    return parts


class Source(NamedTuple):
    """A model's source as SDSERVE_MODELS gives it: the model (a hub id, a diffusers folder, or
    one `.safetensors` checkpoint of the original layout), the VAE it runs with instead of its
    own (`;vae=`), and, for a single file, the diffusers folder whose configuration it takes
    (`;config=`: its configs and tokenizer, no weights needed)."""

    model: str
    vae: str | None = None
    config: str | None = None


def split_source(source: str) -> Source:
    """`/models/sd15;vae=/vaes/ft-mse`, `/models/x.safetensors;config=/configs/sd15`."""
    model, *options = (part.strip() for part in source.split(";"))
    given: dict[str, str] = {}
    for option in options:
        key, equals, value = option.partition("=")
        if key.strip() not in ("vae", "config") or not equals or not value.strip():
            raise ValueError(f"{source!r}: options after ';' are vae=SOURCE and config=FOLDER")
        given[key.strip()] = value.strip()
    return Source(model, given.get("vae"), given.get("config"))


def _checked_entry(source: str) -> str:
    """A model entry as given: its model there (a folder, or a `.safetensors` checkpoint with
    its configuration folder; never a pickle), its VAE there."""
    model, vae, config = split_source(source)
    if model.endswith((".ckpt", ".pt", ".bin")):
        raise ValueError(f"{model}: a pickled checkpoint; sdserve runs no pickled"
                         " code: convert it to .safetensors")  # fmt: skip
    if model.endswith(".safetensors"):
        if not Path(model).expanduser().is_file():
            raise ValueError(f"no such checkpoint: {model}")
        if config is None or not (Path(config) / "model_index.json").is_file():
            raise ValueError(f"{model}: a single-file checkpoint takes its"
                             " configuration from a diffusers folder of its kind:"
                             " SOURCE;config=FOLDER")  # fmt: skip
    else:
        _checked_source(model)
    if vae is not None and not Path(vae).expanduser().exists():
        raise ValueError(f"no such VAE folder or file: {vae}")
    return source


def _checked_source(model: str) -> str:
    """A model's source as given: a path must be there (the default tiny model is built on
    first start); anything else is a hub id, fetched by from_pretrained."""
    local = model.startswith(("/", ".", "~"))
    if local and model != str(TINY_MODEL_DIR) and not Path(model).expanduser().is_dir():
        raise ValueError(f"no such model folder: {model}")
    return model


class WorkerSettings(CommonSettings):
    model: str = Field(
        default=str(TINY_MODEL_DIR),
        min_length=1,
        description="Hub id or local diffusers folder. Default: the tiny model, built if missing.",
    )
    worker_models: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="Which of SDSERVE_MODELS this worker holds (comma-separated names); all of"
        " them when unset. It reads only those models' queues.",
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="auto (CUDA when present), cpu, cuda or cuda:N.",
    )
    max_batch: int = Field(default=8, ge=1, le=256, description="Images per UNet batch.")
    batching: Literal["continuous"] = Field(
        default="continuous",
        description="continuous (the only one): jobs of any kind, steps, schedulers and"
        " guidance join the rows in flight between UNet steps.",
    )
    # Only an idle GPU waits: under load the next batch is gathered while the last one runs.
    # 0: with continuous batching a job that comes a moment later joins at the next step (a
    # few ms on a GPU), so an idle worker that waited for company only delayed the first job.
    batch_window_ms: int = Field(
        default=0, ge=0, le=10_000, description="How long an idle GPU waits for company."
    )
    heartbeat_ttl_s: int = Field(
        default=15, ge=3, le=600, description="A worker silent this long counts as gone."
    )
    claim_idle_s: int = Field(
        default=30,
        ge=3,
        le=3600,
        description="Entries untouched this long belong to a dead worker and are taken over"
        " (live workers touch theirs with every heartbeat).",
    )
    delivery_cap: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Runs a job may crash its worker before it is"
        " dead-lettered and fails `poison`.",
    )
    stop_grace_s: int = Field(
        default=60,
        ge=0,
        le=3600,
        description="After SIGTERM, the batch in hand may run this long; past it the batch is"
        " abandoned and its jobs go back to the queue.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="torch.compile + CUDA graphs for the UNet and VAE (auto: on CUDA).",
    )
    compiled_sizes: Annotated[list[tuple[int, int]], NoDecode] = Field(
        default=[],
        description="Sizes compiled at start: 512x512,768x512 or JSON [[512, 512], ...];"
        " others run eagerly. Unset: each model's default size (512x512 for SD 1.x/2.x,"
        " 1024x1024 for SDXL), so a worker holding both compiles each once.",
    )
    compile_helpers: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Helper processes that compile parts of the warm-up beside it (the VAE,"
        " ControlNets, a second model) into the compile cache it reads: a shorter cold start"
        " (auto: with inductor on a GPU of 40 GiB or more; each holds a copy of its model"
        " while it compiles, so two models get one at 40 GiB and one more model each further"
        " 20 GiB).",
    )
    compile_cache: Path = Field(
        default=cache_dir() / "inductor",
        description="Compiled kernels, kept across restarts (a volume in containers).",
    )
    vae_chunk: int = Field(default=1, ge=1, le=64, description="Images per VAE decode call.")
    vae_upcast: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="On a GPU, the dtype of a VAE that overflows in fp16 (SDXL's: its config's"
        " force_upcast): float32 as diffusers runs it, or bfloat16 (float32's range: never a"
        " black picture; pixels half a level from float32's on average).",
    )
    sync_debug: bool = Field(
        default=False,
        description="Warn (with where, in the log) at every call that makes the host wait for"
        " the GPU once serving: a stall of the loop shows as idle GPU time.",
    )
    read_stream: bool = Field(
        default=False,
        description="On a GPU, the prompt reader encodes the prompts of jobs about to join on a"
        " CUDA stream of its own, above the steps' in priority, instead of queuing behind the"
        " UNet calls in flight.",
    )
    preview_every: int = Field(
        default=5,
        ge=0,
        le=100,
        description="A live preview of each running image every this many steps (a cheap"
        " latent-to-RGB picture, not a VAE decode; continuous batching only); 0: none.",
    )
    max_prompt_chunks: int = Field(
        default=4,
        ge=1,
        le=16,
        description="The longest prompt encoded, in chunks of 75 tokens (a longer one is a 422"
        " at the API). Each chunk lengthens the UNet's cross-attention for that row.",
    )
    masked_contexts: bool = Field(
        default=False,
        description="Rows of different prompt lengths in one UNet call, the shorter contexts"
        " padded and masked (their images unchanged); false: one call per length. Every call"
        " then takes a mask: `python3 -m bench.masked` weighs the two on a GPU.",
    )
    tile: int = Field(
        default=TILE,
        ge=64,
        le=4096,
        multiple_of=8,
        description="Pictures of more than this many pixels squared (upscaling) are denoised in"
        " tiles of this size, overlapping and blended at every step.",
    )
    tile_overlap: int = Field(
        default=TILE_OVERLAP,
        ge=0,
        le=1024,
        multiple_of=8,
        description="Pixels neighbouring tiles share; over it one tile's weight gives way to"
        " the other's.",
    )
    lora_dir: Path | None = Field(
        default=None,
        description="A folder of LoRA .safetensors files (kohya/A1111, diffusers/PEFT layouts),"
        " each named by its file name; unset: no LoRAs, and no LoRA layers at all.",
    )
    lora_slots: int = Field(
        default=8,
        ge=1,
        le=256,
        description="LoRAs resident on the GPU at once (memory: see the worker's start log);"
        " the least recently used leave first.",
    )
    lora_row_rank: int = Field(
        default=128,
        ge=8,
        le=1024,
        multiple_of=8,
        description="The most LoRA ranks one image takes, its LoRAs together (the tensor path"
        " pays for this many on every row; the CUDA kernels for the ranks each row uses).",
    )
    lora_kernels: bool = Field(
        default=True,
        description="On CUDA, LoRA rows through the Triton kernels that skip rows without LoRA"
        " and unused ranks; false: the plain tensor path (every row pays the row rank).",
    )
    lora_tiles: Annotated[tuple[int, ...], NoDecode] = Field(
        default=(),
        description="The LoRA kernel's tiling, tokens,features,warps[,stages[,fan,fill"
        "[,out_stages]]] (the first three powers of two; fan and fill: how its programs are"
        " dealt out among a call's LoRA rows; out_stages: the output loop's pipelining depth,"
        " 0 Triton's own; worker/lora_kernel.py Tiles); empty: its defaults, chosen on an"
        " H100. For trying another GPU's best without a new build (python3 -m bench.lora_unet"
        " --tiles and --deals time them in a whole UNet call).",
    )
    embeddings_dir: Path | None = Field(
        default=None,
        description="A folder of textual-inversion embeddings (A1111 .pt/.safetensors, SDXL's"
        " clip_l/clip_g, diffusers'), each used by writing its file name in a prompt.",
    )
    metrics_port: int = Field(
        default=9400, ge=0, le=65535, description="Port of the worker's /metrics; 0: none."
    )
    worker_name: str = Field(
        default_factory=socket.gethostname,
        pattern=r"^[A-Za-z0-9_.:-]{1,100}$",
        description="Consumer name; unique per worker (several workers on one host: set it).",
    )

    def cache_in_use(self) -> Path:
        """The compile cache the worker uses: torch's own TORCHINDUCTOR_CACHE_DIR where it is
        set, else `compile_cache` (also where worker/bytecode.py keeps bytecode)."""
        return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or self.compile_cache)

    def held_models(self) -> dict[str, str]:
        """The models this worker holds: name to source, the deployment's order."""
        if not self.models:
            return {DEFAULT_MODEL: self.model}
        names = self.worker_models or list(self.models)
        return {name: source for name, source in self.models.items() if name in names}

    @field_validator("batching", mode="before")
    @classmethod
    def _no_static(cls, value: object) -> object:
        if value == "static":
            raise ValueError(
                "static batching was removed: continuous batching meets it on uniform load and"
                " leads on every other (BENCHMARKS.md); leave SDSERVE_BATCHING unset"
            )
        return value

    @field_validator("model")
    @classmethod
    def _model_exists(cls, model: str) -> str:
        return _checked_entry(model)

    @field_validator("lora_dir", "embeddings_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, folder: object) -> object:
        # Compose passes `${SDSERVE_LORA_DIR:-}` when an operator sets nothing; an empty path
        # would be the working directory, scanned for LoRAs.
        return None if folder == "" else folder

    @field_validator("lora_dir", "embeddings_dir")
    @classmethod
    def _folder_exists(cls, folder: Path | None) -> Path | None:
        # A misspelt folder would serve no LoRAs without a word; an empty one is fine (files
        # come later, with a refresh).
        if folder is None:
            return None
        if not folder.expanduser().is_dir():
            raise ValueError(f"no such folder: {folder}")
        return folder.expanduser()

    @field_validator("upscaler")
    @classmethod
    def _upscaler_exists(cls, upscaler: str) -> str:
        return _checked_source(upscaler) if upscaler else upscaler

    @field_validator("models")
    @classmethod
    def _sources_exist(cls, models: dict[str, str]) -> dict[str, str]:
        for name, source in models.items():
            try:
                _checked_entry(source)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        return models

    @field_validator("controlnets")
    @classmethod
    def _controlnets_exist(cls, nets: dict[str, str]) -> dict[str, str]:
        """Each a diffusers ControlNet folder, or `FILE.safetensors;config=FOLDER` (one file of
        the original layout, read offline with the folder's configuration)."""
        for name, source in nets.items():
            path, _, config = source.partition(";config=")
            if not Path(path).expanduser().exists():
                raise ValueError(f"{name}: no such ControlNet folder or file: {path}")
            single = path.endswith(".safetensors")
            if single and not (config and (Path(config) / "config.json").is_file()):
                raise ValueError(f"{name}: a single-file ControlNet needs ;config=FOLDER, a"
                                 " diffusers ControlNet folder of its kind")  # fmt: skip
            if not single and config:
                raise ValueError(f"{name}: ;config= goes with a .safetensors file")
        return nets

    @field_validator("worker_models", mode="before")
    @classmethod
    def _names_text(cls, value: object) -> object:
        return json_or_commas(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _held_models_served(self) -> WorkerSettings:
        unknown = [name for name in self.worker_models if name not in self.model_names()]
        if unknown:
            raise ValueError(
                f"SDSERVE_WORKER_MODELS={','.join(self.worker_models)}: {', '.join(unknown)} not"
                f" among SDSERVE_MODELS ({', '.join(self.model_names())})"
            )
        return self

    @field_validator("lora_tiles", mode="before")
    @classmethod
    def _tiling_text(cls, value: object) -> object:
        if isinstance(value, list | tuple):  # given as numbers (JSON, or in code): checked too
            value = ",".join(str(v) for v in value)
        return lora_tiling(value) if isinstance(value, str) else value

    @field_validator("compiled_sizes", mode="before")
    @classmethod
    def _sizes_text(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        if value.strip().startswith("["):
            return json.loads(value)
        sizes = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            match = re.fullmatch(r"(\d+)x(\d+)", part)
            if match is None:
                raise ValueError(f"{part!r}: write sizes as WIDTHxHEIGHT, like 512x512")
            sizes.append((int(match.group(1)), int(match.group(2))))
        return sizes

    @field_validator("compiled_sizes")
    @classmethod
    def _image_sizes(cls, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for width, height in sizes:
            if not (is_side(width) and is_side(height)):
                raise ValueError(f"{width}x{height}: sides must be multiples of 8 in 64..2048")
        return sizes

    @model_validator(mode="after")
    def _overlap_within_tile(self) -> WorkerSettings:
        if self.tile_overlap * 2 > self.tile:
            raise ValueError(f"SDSERVE_TILE_OVERLAP={self.tile_overlap}: at most half of"
                             f" SDSERVE_TILE ({self.tile})")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _claim_after_heartbeat(self) -> WorkerSettings:
        if self.claim_idle_s < self.heartbeat_ttl_s:
            raise ValueError(
                "SDSERVE_CLAIM_IDLE_S must be at least SDSERVE_HEARTBEAT_TTL_S: a live worker"
                " touches its entries only once a heartbeat"
            )
        return self
