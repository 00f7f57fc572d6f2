"""The job contract: what a client asks for, what a job is, and what a worker hands back.

Shared by the API and the workers; FastAPI-free (the worker image carries no web stack) and
Redis-free (the store modules own every key).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from app.jobs.prompts import Syntax, changing

# A deployment's models have names (SDSERVE_MODELS); one that names none serves one model,
# called this.
DEFAULT_MODEL = "default"
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

SchedulerName = Literal[
    "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde",
    "dpmpp_2m_sde_karras", "lms", "pndm", "unipc", "lcm",
]  # fmt: skip
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
SEED_MAX = 2**32 - 1

# Seconds from accepted to finished: explicit, up to five minutes (the defaults stop at 10 s).
JOB_SECONDS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{22}")


def new_job_id() -> str:
    """128 random bits, URL-safe base64 without padding (22 characters)."""
    return secrets.token_urlsafe(16)


def is_job_id(text: str) -> bool:
    return _JOB_ID.fullmatch(text) is not None


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"


# States a job never leaves (StrEnum: plain status strings match too).
TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED, Status.EXPIRED})


class ErrorCode(StrEnum):
    """Typed reasons a job fails; clients branch on these, never on messages."""

    NUMERICAL = "numerical"  # the model produced NaN/inf pixels, even decoded in fp32
    ENGINE = "engine_error"  # the model raised while generating
    OUT_OF_MEMORY = "out_of_memory"  # one image alone does not fit on the GPU
    DEADLINE = "deadline_exceeded"  # its timeout_s passed before a worker took it
    POISON = "poison"  # its workers died every time it ran: dead-lettered
    INVALID = "invalid_request"  # a record the worker could not read as a request
    STORAGE = "storage_error"  # the images could not be written to storage, retries included
    INPUT = "input_missing"  # its source picture had left storage (it waited past the TTL)
    LORA = "lora_unreadable"  # a LoRA file it names is corrupt, or not a LoRA diffusers reads


# Limits shared by every way in (the native API, the OpenAI-compatible one).
Prompt = Annotated[str, Field(min_length=1, max_length=2000, description="What to draw.")]
NegativePrompt = Annotated[str, Field(max_length=2000, description="What to avoid.")]
# A generated picture: each side 64 to 2048 pixels, and at most 1024 x 1024 pixels in all (SDXL's
# sizes: 1024x1024, and as many pixels wide, 1344x768, 1536x640). A larger picture is an
# upscale's (UpscaleSide), denoised in tiles.
SIDE_MIN, SIDE_MAX, SIDE_STEP = 64, 2048, 8
PIXELS_MAX = 1024 * 1024
Side = Annotated[int, Field(ge=SIDE_MIN, le=SIDE_MAX, multiple_of=SIDE_STEP, description="Pixels.")]


def is_side(pixels: int) -> bool:
    """Whether an image side is one `Side` allows (for sizes written as text, like "512x512")."""
    return SIDE_MIN <= pixels <= SIDE_MAX and pixels % SIDE_STEP == 0


def size_problem(width: int, height: int) -> str | None:
    """What is wrong with a generated picture's size (None: nothing): more pixels than
    PIXELS_MAX (its sides are `Side`s)."""
    if width * height <= PIXELS_MAX:
        return None
    return (f"{width}x{height} is {width * height} pixels; a generated picture has at most"
            f" {PIXELS_MAX} (1024x1024, or as many in another shape: 1344x768)")  # fmt: skip


Steps = Annotated[int, Field(ge=1, le=100, description="Denoising steps.")]
Guidance = Annotated[float, Field(ge=0, le=30, description="Classifier-free guidance.")]
Seed = Annotated[
    int,
    Field(
        ge=0,
        le=SEED_MAX,
        description="Seed of image 0; image k uses (seed + k) mod 2^32. Chosen when absent.",
    ),
]
COUNT_MAX = 8  # images a request makes
Count = Annotated[int, Field(ge=1, le=COUNT_MAX, description="Number of images.")]
Timeout = Annotated[
    int,
    Field(
        ge=1,
        le=86400,
        description="Seconds after submission when the job, if not yet taken by a worker, fails"
        " `deadline_exceeded` without using the GPU. The server's default when absent.",
    ),
]
WebhookEvent = Literal["running", "succeeded", "failed", "canceled"]


# What every request model shares: a wrong JSON type is an error, never a silent coercion;
# unknown fields are refused; NaN and infinities (which Python's JSON reader accepts) too.
STRICT_INPUT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class PromptLength(BaseModel):
    tokens: int = Field(description="Tokens of text, as the model's tokenizer reads it.")
    chunks: int = Field(description="Chunks of 75 tokens it is encoded in.")


class PromptLengths(BaseModel):
    """Set by the server, from the tokenizer its workers publish (anything sent is replaced)."""

    prompt: PromptLength
    negative_prompt: PromptLength


LORA_WEIGHT = 4.0  # the largest weight either way: A1111's sliders stop at 2, people go further
LORAS_MAX = 8  # on one image


class Lora(BaseModel):
    """A LoRA on the job's images: a file of the deployment's LoRA folder, by name."""

    model_config = STRICT_INPUT

    name: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[^/\\\x00-\x1f]+$",
        description="The file's name without `.safetensors` (`GET /v1/loras`).",
    )
    weight: float = Field(
        default=1.0,
        ge=-LORA_WEIGHT,
        le=LORA_WEIGHT,
        description="Its weight on the UNet (and on the text encoders, unless `text_weight`).",
    )
    text_weight: float | None = Field(
        default=None,
        ge=-LORA_WEIGHT,
        le=LORA_WEIGHT,
        description="Its weight on the text encoders, where it differs (A1111's"
        " `<lora:name:te:unet>`).",
    )


# A1111 reads `<lyco:...>` as `<lora:...>` (an alias its LoRA extension registers).
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)((?::[^:>]*)*)>")
# A1111's other extra network: not served, so refused rather than encoded as words.
HYPERNET_TAG = re.compile(r"<hypernet:[^>]*>")
# Validation context of a stored request read back (`parse_request`): refusals that only a new
# request meets are not made again.
STORED = "stored"
# A1111's prompt syntax that sdserve does not serve (app/jobs/prompts.py `changing`), by its
# sign: refused rather than encoded as words.
UNSERVED_SYNTAX = {
    ":": "A1111's prompt editing (a prompt that changes at a step) is not served",
    "|": "A1111's alternating prompt (words that change every step) is not served",
    "AND": "A1111's composable prompts (several prompts combined with AND) are not served",
}


def field_error(field: str, message: str, value: Any) -> ValidationError:
    """A rule across fields, checked by a model validator, refused as one field's error (a
    plain ValueError there names the whole body)."""
    detail = InitErrorDetails(type=PydanticCustomError("value_error", message), loc=(field,),
                              input=value)  # fmt: skip
    return ValidationError.from_exception_data("request", [detail])


def lora_tags(prompt: str) -> tuple[str, list[Lora]]:
    """A prompt without its A1111 LoRA tags, and the LoRAs they name: `<lora:name>`,
    `<lora:name:weight>`, `<lora:name:te:unet>`, `<lora:name:te=0.5:unet=1>` (and the same
    with `lyco`). A tag that is not one of these is an error naming it."""
    loras: list[Lora] = []

    def taken(match: re.Match[str]) -> str:
        name, rest = match.group(1).strip(), match.group(2)
        numbers: dict[str, float] = {}
        for k, part in enumerate(p.strip() for p in rest.split(":")[1:]):
            key, _, value = part.rpartition("=")
            key = key or ("te", "unet")[min(k, 1)]
            if key not in ("te", "unet") or key in numbers:
                raise ValueError(f"{match.group(0)}: A1111's tag is <lora:name:te:unet>")
            try:
                numbers[key] = float(value)
            except ValueError:
                raise ValueError(f"{match.group(0)}: {value!r} is not a weight") from None
        te = numbers.get("te", 1.0)
        unet = numbers.get("unet", te)
        if not all(-LORA_WEIGHT <= w <= LORA_WEIGHT for w in (te, unet)):
            raise ValueError(f"{match.group(0)}: weights go from -{LORA_WEIGHT:g} to"
                             f" {LORA_WEIGHT:g}")  # fmt: skip
        try:
            loras.append(Lora(name=name, weight=unet, text_weight=None if te == unet else te))
        except ValidationError as e:
            raise ValueError(f"{match.group(0)}: {e.errors()[0]['msg']}") from None
        return ""

    text = LORA_TAG.sub(taken, prompt)
    return re.sub(r"  +", " ", text).strip() if loras else prompt, loras


class Generation(BaseModel):
    """What every kind of job asks for but its size. Strict: a wrong JSON type is an error,
    never a silent coercion."""

    model_config = ConfigDict(
        **STRICT_INPUT,
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a lighthouse on a cliff at dusk, oil painting",
                    "negative_prompt": "blurry",
                    "width": 512,
                    "height": 512,
                    "steps": 25,
                    "guidance_scale": 7.5,
                    "scheduler": "dpmpp_2m",
                    "seed": 1234,
                    "n": 2,
                }
            ]
        },
    )

    model: str | None = Field(
        default=None,
        max_length=64,
        description="Which of the deployment's models draws it (`GET /v1/models`); its first"
        " when absent. The server writes the name in.",
    )
    prompt: str = Field(
        max_length=2000,
        description="What to draw. Empty only in A1111's syntax, as A1111 takes it: no text, or"
        " LoRA tags only.",
    )
    negative_prompt: NegativePrompt = ""
    prompt_syntax: Syntax = Field(
        default="plain",
        description="How both prompts are read. plain: as text. a1111: AUTOMATIC1111's"
        " emphasis, `(word:1.3)`, `(word)` (x1.1), `[word]` (/1.1), `\\(` for a bracket, and"
        " `BREAK` to start a new chunk of 75 tokens. Either way a prompt longer than 75 tokens"
        " is encoded in chunks of 75, laid end to end; the model's limit is in chunks.",
    )
    prompt_length: PromptLengths | None = Field(
        default=None,
        description="Set by the server: the prompts' token and chunk counts (absent when no"
        " worker had published its tokenizer yet). Anything sent is replaced.",
    )
    steps: Steps = 25
    guidance_scale: Guidance = 7.5
    clip_skip: int = Field(
        default=1,
        ge=1,
        le=12,
        description="Which of the text encoder's layers the prompt is read at, counted from"
        " the last (A1111's clip skip, `CLIP_stop_at_last_layers`): 1 the last (SDXL: its own"
        " penultimate), 2 the one before. The negative prompt is read at the model's own layer,"
        " as diffusers' `clip_skip` reads it. At most the model's text encoder's layers (a 422"
        " once its workers have said how many: 12 for SD 1.x).",
    )
    loras: list[Lora] = Field(
        default=[],
        max_length=LORAS_MAX,
        description="LoRAs on every image of the job, each row with its own (other jobs' rows"
        " in the same UNet call have theirs, or none). A1111's `<lora:name:weight>` in a"
        " prompt comes here on its routes.",
    )
    vae: str | None = Field(
        default=None,
        max_length=64,
        pattern=MODEL_NAME,
        description="The VAE that encodes and decodes the job's pictures: one of the"
        " deployment's SDSERVE_VAES (`GET /sdapi/v1/sd-vae`); the model's own when absent.",
    )
    scheduler: SchedulerName = Field(default="dpmpp_2m", description="Sampler.")
    seed: Seed | None = None
    n: Count = 1
    timeout_s: Timeout | None = None
    webhook_url: str | None = Field(
        default=None,
        max_length=2000,
        pattern=r"^https?://[^\s/@]+(/\S*)?$",
        description="Where to POST the job (signed) when it reaches a state in webhook_events.",
    )
    webhook_events: list[WebhookEvent] = Field(
        default=["succeeded", "failed", "canceled"],
        min_length=1,
        max_length=4,
        description="Which changes to send: running, succeeded, failed, canceled (others than"
        " the default need webhook_url).",
    )

    @model_validator(mode="after")
    def _prompt_read(self, info: ValidationInfo) -> Generation:
        """A plain prompt that a kind requires is text; in A1111's syntax, `<lora:name:weight>`
        tags are LoRAs, and the text left is encoded (A1111 takes it empty). A1111's syntax
        that is not served is refused when a request comes, not when a stored one is read
        (`parse_request`): a job accepted before the refusal existed stays readable."""
        if self.prompt_syntax == "plain":
            if not self.prompt and type(self).model_fields["prompt"].is_required():
                raise field_error("prompt", "is empty (A1111's syntax takes an empty prompt)",
                                  self.prompt)  # fmt: skip
            return self
        if not (info.context and info.context.get(STORED)):
            self._refuse_unserved_syntax()
        if LORA_TAG.search(self.prompt) is None:
            return self
        try:
            text, tagged = lora_tags(self.prompt)
        except ValueError as e:
            raise field_error("prompt", str(e), self.prompt) from None
        loras = [*self.loras, *tagged]
        if len(loras) > LORAS_MAX:
            raise field_error("loras", f"{len(loras)} LoRAs, the prompt's tags with them; at"
                              f" most {LORAS_MAX} on an image", len(loras))  # fmt: skip
        # Set past validation: this validator runs again on the assigned copy otherwise. The
        # stored request keeps the text and the LoRAs apart, and reads back the same.
        object.__setattr__(self, "prompt", text)
        object.__setattr__(self, "loras", loras)
        return self

    def _refuse_unserved_syntax(self) -> None:
        """A1111 syntax that A1111 would honour and sdserve does not serve: a 422 naming its
        field, rather than the words encoded (another picture than A1111's)."""
        for field in ("prompt", "negative_prompt"):
            text = getattr(self, field)
            network = HYPERNET_TAG.search(text)
            if network is not None:
                raise field_error(field, f"{network.group(0)}: hypernetworks are not served"
                                  " (GET /sdapi/v1/hypernetworks lists none)", text)  # fmt: skip
            change = changing(text, composable=field == "prompt")
            if change is not None:
                sign = "AND" if change == "AND" else "|" if "|" in change else ":"
                # How to say the same words literally: A1111 reads only an upper-case AND.
                literal = ("a literal 'and': lower case" if sign == "AND"
                           else "escape a literal bracket: \\[")  # fmt: skip
                raise field_error(field, f"{change}: {UNSERVED_SYNTAX[sign]} ({literal})",
                                  text)  # fmt: skip

    def seeds(self) -> list[int]:
        """One seed per image; each one, sent back alone with n=1, reproduces that image."""
        if self.seed is None:
            raise ValueError("seeds() needs a normalized request (seed set)")
        return [(self.seed + k) % (SEED_MAX + 1) for k in range(self.n)]


class StoredImage(BaseModel):
    """An input image, stored once beside the job's results (its bytes are not in the queue)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sha256: str = Field(description="Of the stored PNG.")
    width: int
    height: int


CONTROLNETS_MAX = 4  # units on one job
ControlMode = Literal["balanced", "prompt", "control"]
ControlResize = Literal["resize", "crop", "fill"]
Preprocessor = Literal["none", "invert", "canny"]


class ControlNetSettings(BaseModel):
    """A ControlNet unit but its picture: which ControlNet, how strongly, when, and how its
    picture becomes the control image."""

    model_config = STRICT_INPUT

    model: str = Field(
        max_length=64,
        pattern=MODEL_NAME,
        description="One of the deployment's SDSERVE_CONTROLNETS (`GET /v1/controlnets`).",
    )
    weight: float = Field(default=1.0, ge=0, le=2, description="How strongly it steers.")
    start: float = Field(default=0.0, ge=0, lt=1, description="Share of the steps before it.")
    end: float = Field(default=1.0, gt=0, le=1, description="Share of the steps after it.")
    mode: ControlMode = Field(
        default="balanced",
        description="A1111's control mode. balanced: on the guided and unguided rows alike, as"
        ' diffusers\' pipeline. prompt ("My prompt is more important"): each residual scaled'
        ' by 0.825 per level below the middle block. control ("ControlNet is more'
        " important\", diffusers' guess mode): on the guided row only, its residuals ramped"
        " from 0.1 to 1.",
    )
    resize: ControlResize = Field(
        default="resize",
        description="How the picture is fitted to the job's size: resize (stretched, as"
        " diffusers does), crop (scaled to cover, the middle kept), fill (scaled to fit, the"
        " rest black).",
    )
    preprocess: Preprocessor = Field(
        default="none",
        description="none: the picture is the control image. invert: its colours inverted"
        " (a black-on-white sketch). canny: OpenCV's Canny edges (white on black).",
    )
    processor_res: int | None = Field(
        default=None,
        ge=64,
        le=2048,
        description="The short side the preprocessor runs at, its map then fitted to the job"
        " (A1111's processor resolution); absent: at the job's size (A1111's pixel perfect).",
    )
    low_threshold: int = Field(default=100, ge=1, le=255, description="Canny's lower bound.")
    high_threshold: int = Field(default=200, ge=1, le=255, description="Canny's upper bound.")

    @model_validator(mode="after")
    def _ordered(self) -> ControlNetSettings:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must come after start ({self.start})")
        if self.high_threshold < self.low_threshold:
            raise ValueError("high_threshold must not be below low_threshold")
        return self


class ControlNetUnit(ControlNetSettings):
    """A ControlNet unit as queued: its control image stored beside the job (`control{k}`),
    fitted to the job's size and preprocessed already."""

    image: StoredImage


ControlNets = Annotated[
    list[ControlNetUnit],
    Field(
        max_length=CONTROLNETS_MAX,
        description="ControlNet units on every image of the job (several add up); other jobs'"
        " rows in the same UNet call have theirs, or none.",
    ),
]


class GenerationRequest(Generation):
    """What every kind of job asks for: its size too (and, but for upscaling, ControlNets)."""

    controlnets: ControlNets = []

    width: Side = Field(
        default=512,
        description="Pixels. Text to image without one: the model's default side (1024 for an"
        " SDXL model, 512 otherwise).",
    )
    height: Side = Field(
        default=512,
        description="Pixels. Text to image without one: the model's default side (1024 for an"
        " SDXL model, 512 otherwise). Sides 64 to 2048, width x height at most 1024 x 1024.",
    )

    @field_validator("height")
    @classmethod
    def _pixels(cls, height: int | None, info: ValidationInfo) -> int | None:
        width = info.data.get("width")
        problem = size_problem(width, height) if width and height else None
        if problem is not None:
            raise ValueError(problem)
        return height


# Upscaled pictures may be larger than generated ones (SDSERVE_MAX_UPSCALE_SIDE, 2048 by
# default; this is the most any deployment may allow).
UPSCALE_SIDE_MAX = 4096
UpscaleSide = Annotated[
    int, Field(ge=SIDE_MIN, le=UPSCALE_SIDE_MAX, multiple_of=SIDE_STEP, description="Pixels.")
]
HiresMethod = Literal["pixel", "latent"]
UpscaleMethod = Literal["pixel", "latent", "x4"]


class Hires(BaseModel):
    """A hires fix: a second pass that enlarges the first pass's picture and redraws it at
    `strength`, as one job."""

    model_config = STRICT_INPUT

    scale: float = Field(
        default=2.0,
        gt=1,
        le=4,
        description="How many times larger each side gets (each rounded down to a multiple of 8).",
    )
    steps: Steps | None = Field(
        default=None, description="The second pass's schedule; the job's `steps` if absent."
    )
    strength: Strength = 0.5
    method: HiresMethod = Field(
        default="latent",
        description="latent: the first pass's latents enlarged (bilinear). pixel: its picture"
        " decoded, resized (Lanczos) and encoded again.",
    )


class Refiner(BaseModel):
    """A refiner: another model of the deployment finishes the job's denoising from the switch,
    as diffusers' `denoising_end` / `denoising_start` ensemble of SDXL's base and refiner."""

    model_config = STRICT_INPUT

    model: str = Field(
        max_length=64,
        description="The model that finishes (`GET /v1/models`): one of the job's model's family"
        " (SDXL's refiner after an SDXL model), held by the same workers.",
    )
    switch_at: float = Field(
        default=0.8,
        gt=0,
        lt=1,
        description="Where the refiner takes over, as a share of the noise schedule: the job's"
        " model runs the timesteps above (1 - switch_at) x 1000, the refiner the rest.",
    )


RefinerField = Annotated[
    Refiner | None,
    Field(
        description="Another model finishes the denoising from `switch_at`, in the same job;"
        " not with a hires fix."
    ),
]


class Txt2ImgRequest(GenerationRequest):
    """Text to image."""

    kind: Literal["txt2img"] = Field(default="txt2img", description="What the job does.")
    hires: Hires | None = Field(default=None, description="A second, larger pass (hires fix).")
    refiner: RefinerField = None

    def hires_size(self) -> tuple[int, int] | None:
        """The second pass's (width, height); None without one."""
        if self.hires is None:
            return None
        return (int(self.width * self.hires.scale) // SIDE_STEP * SIDE_STEP,
                int(self.height * self.hires.scale) // SIDE_STEP * SIDE_STEP)  # fmt: skip


Strength = Annotated[
    float,
    Field(
        gt=0,
        le=1,
        description="How much of the source is redrawn: the share of the steps that run (1: "
        "all of them, from noise).",
    ),
]
MaskBlur = Annotated[
    int,
    Field(
        ge=0,
        le=64,
        description="Pixels of blur on the mask's edge where the result is laid over the source.",
    ),
]


SourceResize = Literal["resize", "crop", "fill"]
ResizeMode = Annotated[
    SourceResize,
    Field(
        description="How the picture (and mask) is fitted to `width` x `height` where their"
        " shapes differ (A1111's resize modes 0, 1, 2): resize: stretched; crop: scaled to"
        " cover, centred, the overflow cut off; fill: scaled to fit, centred, the bands filled"
        " with its edge rows or columns drawn out.",
    ),
]


class Img2ImgRequest(GenerationRequest):
    """Image to image: the source noised to `strength`, then denoised toward the prompt."""

    kind: Literal["img2img"] = "img2img"
    strength: Strength = 0.75
    resize_mode: ResizeMode = "resize"
    image: StoredImage
    refiner: RefinerField = None


MaskCrop = Annotated[
    int | None,
    Field(
        ge=0,
        le=SIDE_MAX,
        description="Inpaint the masked area only (A1111's 'only masked', diffusers'"
        " `padding_mask_crop`): the box around what the mask repaints, this many pixels wider"
        " on each side and widened to the job's aspect, is cut from the picture, drawn at"
        " `width` x `height`, and laid back into the picture, which comes back at its own size"
        " (more detail where a small area is repainted). null: the whole picture is drawn at"
        " `width` x `height`.",
    ),
]
MaskedContent = Annotated[
    Literal["original", "fill"],
    Field(
        description="What is under the mask before it is noised: original: the picture as it"
        " is; fill: colours spread in from around the mask (A1111's 'fill'), so that the old"
        " content does not steer the new (it matters below strength 1).",
    ),
]


class InpaintRequest(GenerationRequest):
    """Inpainting: only where the mask is white is redrawn."""

    kind: Literal["inpaint"] = "inpaint"
    strength: Strength = 1.0
    mask_blur: MaskBlur = 4
    mask_crop: MaskCrop = None
    masked_content: MaskedContent = "original"
    resize_mode: ResizeMode = "resize"
    image: StoredImage
    mask: StoredImage
    crop_box: tuple[int, int, int, int] | None = Field(
        default=None,
        description="Set by the server with `mask_crop`: the box (left, top, right, bottom) of"
        " the picture that is drawn.",
    )


class Upscaling(Generation):
    """What an upscaling job asks for, as a client sends it."""

    prompt: str = Field(
        default="", max_length=2000, description="What the picture shows; may be empty."
    )
    scale: int = Field(
        default=2,
        description="How many times larger each side gets: 2 or 4.",
        json_schema_extra={"enum": [2, 4]},
    )
    method: UpscaleMethod = Field(
        default="pixel",
        description="pixel: the picture resized (Lanczos), then encoded and redrawn. latent: the"
        " picture encoded at its own size and its latents enlarged (bilinear), then redrawn. x4:"
        " the Stable Diffusion x4 upscaler (when the server has one, SDSERVE_UPSCALER) draws it"
        " four times larger from the picture noised to `noise_level` (scale 2: then halved).",
    )
    strength: Strength = Field(
        default=0.35,
        gt=0,
        le=1,
        description="pixel and latent: how much of the enlarged picture is redrawn (the share"
        " of the steps that run). x4 runs every step.",
    )
    noise_level: int = Field(
        default=20,
        ge=0,
        le=350,
        description="x4: how much noise the picture gets before the upscaler draws from it"
        " (more: more invented detail, less faithful).",
    )

    @field_validator("scale")
    @classmethod
    def _two_or_four(cls, scale: int) -> int:
        # Not a Literal: a form field's "2" must read as 2, which lax mode does for an int.
        if scale not in (2, 4):
            raise ValueError("must be 2 or 4")
        return scale


class UpscaleRequest(Upscaling):
    """Upscaling: the picture enlarged `scale` times, then redrawn at `strength` by the model
    (a hires fix), in tiles when it is larger than one UNet call holds."""

    kind: Literal["upscale"] = "upscale"
    width: UpscaleSide = Field(description="Set by the server: the picture's width x scale.")
    height: UpscaleSide = Field(description="Set by the server: the picture's height x scale.")
    image: StoredImage


def upscale_drawn(own: tuple[int, int], scale: int, method: str) -> tuple[int, int]:
    """The pixels an upscaling job draws, from the picture's own (width, height): the x4
    upscaler always four times it (a job of scale 2 is halved afterwards), the others `scale`
    times. The API's size limit, the worker's shape and the rows a job costs all count this."""
    times = 4 if method == "x4" else scale
    return own[0] * times, own[1] * times


def _kind(value: Any) -> str:
    # Records written before kinds existed have none: they are text to image.
    if isinstance(value, dict):
        return str(value.get("kind", "txt2img"))
    return str(getattr(value, "kind", "txt2img"))


JobRequest = Annotated[
    Annotated[Txt2ImgRequest, Tag("txt2img")]
    | Annotated[Img2ImgRequest, Tag("img2img")]
    | Annotated[InpaintRequest, Tag("inpaint")]
    | Annotated[UpscaleRequest, Tag("upscale")],
    Discriminator(_kind),
]
SourceRequest = Img2ImgRequest | InpaintRequest | UpscaleRequest
_JOB_REQUEST: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)


def parse_request(raw: str | bytes) -> JobRequest:
    """A job's stored request, whatever its kind (validated as stored: `STORED`)."""
    return _JOB_REQUEST.validate_json(raw, context={STORED: True})


class Progress(BaseModel):
    step: int
    steps: int


class JobError(BaseModel):
    code: str
    message: str


class JobView(BaseModel):
    """What `GET /jobs/{id}` answers."""

    id: str
    status: Status
    position: int | None = Field(description="0-based place in the queue while queued.")
    progress: Progress | None = Field(description="Denoising step while running.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    request: JobRequest
    seeds: list[int]
    images: list[str]
    error: JobError | None
    eta_s: float | None = Field(
        default=None,
        description="Seconds until it is likely done, while queued or running: from the"
        " workers' measured pace, its place in the queue and its steps left. Absent before any"
        " worker has measured its pace.",
    )
    preview_url: str | None = Field(
        default=None,
        description="While running: its latest live preview (a small JPEG of every image side"
        " by side), when the workers make previews. The query changes with each new one.",
    )
    workers: int | None = Field(
        default=None,
        description="While queued: the live workers that hold its model. 0: no worker will"
        " run it until one starts (its `eta_s` is then absent, and its `timeout_s` still"
        " holds: it fails `deadline_exceeded` when that passes).",
    )


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to a worker, for the `deliveries`-th time, from the queue of
    `model`."""

    entry_id: str
    job_id: str
    deliveries: int = 1
    model: str = DEFAULT_MODEL

    @property
    def suspect(self) -> bool:
        """Its workers died twice with it: it runs alone, so it takes no stranger down."""
        return self.deliveries > 2

    @property
    def started_as(self) -> str:
        """What the job's record keeps of the delivery that started it."""
        return f"{self.entry_id}:{self.deliveries}"


class Submission(StrEnum):
    QUEUED = "queued"
    REPLAYED = "replayed"  # the same Idempotency-Key and request: the job made the first time
    CONFLICT = "conflict"  # the same Idempotency-Key with another request
    FULL = "full"  # the queue holds its maximum of jobs
    BUSY = "busy"  # the caller has its maximum of jobs queued or running
    RATE_LIMITED = "rate"  # the caller's token bucket is empty
    LATE = "late"  # Redis ran the call after the API had given up on it (a stall): no job


@dataclass(frozen=True)
class Notification:
    """A job reached a state its webhook asked for; `entry_id` acks it once sent."""

    entry_id: str
    job_id: str
    event: str


@dataclass(frozen=True)
class Job:
    """A job a worker has taken: its delivery, its request, and the API key id that owns it."""

    delivery: Delivery
    request: JobRequest
    owner: str = ""
    created_at: float = 0.0

    @property
    def id(self) -> str:
        return self.delivery.job_id


def plain_reason(error: BaseException) -> str:
    """An error's reason as a client may read it: no object addresses (Pillow names the file
    it read, a `<_io.BytesIO object at 0x...>`) and no server paths."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the file", str(error))
    return re.sub(r"(?<![\w.])/(?:[\w.-]+/)*[\w.-]+", "(a path)", text)
