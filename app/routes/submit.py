"""Submitting jobs: `POST /v1/txt2img`, and the queueing step every way in shares."""

from __future__ import annotations

import hashlib
import math
import secrets
from functools import partial
from typing import NoReturn

import redis
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.requests import Request

from app.auth import Caller
from app.jobs.contract import (
    SEED_MAX,
    JobRequest,
    PromptLength,
    PromptLengths,
    Status,
    Submission,
    Txt2ImgRequest,
)
from app.jobs.prompts import CHUNK, count
from app.jobs.tasks import task_of
from app.jobs.tiles import TILE, whole
from app.jobs.vocabulary import PromptMeter
from app.routes.context import (
    NO_RETRY,
    RETRY_AFTER_S,
    Context,
    find_job,
)
from app.settings import ApiSettings
from app.webhooks import refusal

# What the workers publish of a model's family, as a message names it.
FAMILIES = {"sd": "an SD 1.x/2.x model", "sdxl": "an SDXL model"}


class Accepted(BaseModel):
    id: str
    status: Status = Field(description="`queued`, or where a replay's job has got to.")
    url: str


class Submitter:
    """Limits, then the job queued (or a replay's job found)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        store = ctx.store
        self.prompts = {model: PromptMeter(partial(store.tokenizer_digest, model),
                                           partial(store.tokenizer, model))
                        for model in store.models}  # fmt: skip

    def __call__(
        self,
        request: JobRequest,
        http: Request,
        caller: Caller,
        idempotency_key: str | None,
        retrying: bool | None = None,
        job_id: str | None = None,
    ) -> tuple[str, Status, bool]:
        """Limits, then the job queued (or a replay's job found): its id, its status, and
        whether it is a replay. `retrying` (OpenAI route, no Idempotency-Key): whether the
        client says this is its automatic retry of a call, which then lands on the job the
        first try made. `job_id`: the id a new job gets (its inputs are stored under it)."""

        too_many = partial(_too_many, http)

        if request.webhook_url is not None:
            _check_webhook(request.webhook_url, self.ctx.settings)
        elif _events_chosen(request):  # for no webhook at all
            raise RequestValidationError([{"loc": ("body", "webhook_events"), "type": "value_error",
                                           "msg": "chooses the changes a webhook sends: give"
                                           " webhook_url too"}])  # fmt: skip
        model = self._model(request.model)
        # What the client sent, before the server fills anything in, identifies a retry.
        sent = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        request = self._sized(request, model)
        _check_hires(request, self.ctx.settings)
        self._check_refiner(request, model)
        self._check_loras(request, model)
        self._check_controlnets(request, model)
        self._check_controlled_hires(request, model)
        self._check_clip_skip(request, model)
        if request.vae is not None and request.vae not in self.ctx.settings.vaes:
            served = ", ".join(self.ctx.settings.vaes) or "none"
            problem = f"unknown VAE {request.vae!r}; this server's: {served} (SDSERVE_VAES)"
            raise RequestValidationError([{"loc": ("body", "vae"), "msg": problem,
                                           "type": "value_error"}])  # fmt: skip
        normalized = request.model_copy(
            update={
                "seed": secrets.randbelow(SEED_MAX + 1) if request.seed is None else request.seed,
                "timeout_s": request.timeout_s or self.ctx.settings.job_timeout_s,
                "prompt_length": self._lengths(request, model),
                "model": model,
            }
        )
        idempotency = (idempotency_key, sent) if idempotency_key is not None else None
        retry = (sent, retrying) if retrying is not None and idempotency is None else None
        rate = (caller.rate_per_s, caller.burst) if caller.rate_per_s else None
        outcome, job_id = self.ctx.store.submit(
            normalized,
            self.ctx.settings.max_queue,
            caller.key_id,
            caller.max_in_flight,
            idempotency,
            rate,
            retry,
            job_id,
        )
        if outcome is Submission.LATE:  # Redis stalled; the call created nothing
            raise redis.TimeoutError("the submission ran too late on Redis")
        if outcome in (Submission.RATE_LIMITED, Submission.BUSY):
            _refuse(http, caller, outcome, float(job_id or 0))
        if outcome is Submission.FULL:
            message = f"the queue is full ({self.ctx.settings.max_queue} jobs waiting)"
            too_many("queue_full", message, RETRY_AFTER_S)
        if outcome is Submission.CONFLICT:
            raise HTTPException(
                409, "this Idempotency-Key was used with another request", headers=NO_RETRY
            )
        if outcome is Submission.REPLAYED:
            return job_id, find_job(self.ctx.store, job_id, caller).status, True
        http.state.accepted = model  # for the metrics: a new job of this model
        return job_id, Status.QUEUED, False

    def admit(self, http: Request, caller: Caller, idempotency_key: str | None) -> None:
        """Before a request's expensive work (decoding its pictures): a 429 now if this key's
        rate or jobs in flight would refuse it anyway. A request with an Idempotency-Key may be
        a replay, which no limit refuses: `submit` decides."""
        if idempotency_key is not None:
            return
        rate = (caller.rate_per_s, caller.burst) if caller.rate_per_s else None
        outcome, wait_s = self.ctx.store.admission(caller.key_id, caller.max_in_flight, rate)
        if outcome is not None:
            _refuse(http, caller, outcome, wait_s)

    def _model(self, name: str | None) -> str:
        """The model a request names (the default when none), or a 422 listing the names."""
        models = self.ctx.store.models
        if name is None:
            return models[0]
        if name not in models:
            message = f"unknown model {name!r}; this server serves {', '.join(models)}"
            raise RequestValidationError(
                [{"loc": ("body", "model"), "msg": message, "type": "value_error"}]
            )
        return name

    def _check_refiner(self, request: JobRequest, model: str) -> None:
        """A refiner must be a model served here, of the job's model's family (it denoises in
        that family's latent space, as far as the workers have published it), and not with a
        hires fix: a 422 naming the field otherwise."""
        refiner = getattr(request, "refiner", None)
        if refiner is None:
            return
        problem: str | None = None
        where: tuple[str, ...] = ("body", "refiner", "model")
        base, other = self.prompts[model].current(), self.prompts.get(refiner.model)
        mine = other.current() if other is not None else None
        if isinstance(request, Txt2ImgRequest) and request.hires is not None:
            problem, where = "a refiner and a hires fix do not go together: ask for one", where[:2]
        elif other is None:
            served = ", ".join(self.ctx.store.models)
            problem = f"unknown model {refiner.model!r}; this server serves {served}"
        elif base is not None and mine is not None and base[0].family != mine[0].family:
            problem = (f"{refiner.model} is {FAMILIES[mine[0].family]}, {model} is"
                       f" {FAMILIES[base[0].family]}: a refiner finishes its own family's"
                       " latents")  # fmt: skip
        if problem is not None:
            raise RequestValidationError([{"loc": where, "msg": problem, "type": "value_error"}])

    def _check_loras(self, request: JobRequest, model: str) -> None:
        """Each LoRA must be one the model's workers take (as they have published: nothing
        published, nothing is refused here, and a worker without it fails the job): a 422
        naming it otherwise, and the models that do take it. Where the model's live workers
        have all said they take no LoRAs (no SDSERVE_LORA_DIR), any LoRA is refused."""
        if not request.loras:
            return
        store = self.ctx.store
        taken, takes_none = store.loras(model), False
        if taken is None:
            said = [beat.loras for beat in store.workers_of(model) if beat.loras is not None]
            if not said or any(takes.get(model, False) for takes in said):
                return
            taken, takes_none = [], True
        for k, lora in enumerate(request.loras):
            if lora.name in taken:
                continue
            others = store.lora_models().get(lora.name, [])
            problem = f"no LoRA named {lora.name!r} for {model} (GET /v1/loras lists them)"
            if others:
                problem = (f"LoRA {lora.name!r} is for {', '.join(others)}, not {model}"
                           " (another family or size)")  # fmt: skip
            elif takes_none:
                problem = (f"no live worker of model {model} takes LoRAs (they run without"
                           " SDSERVE_LORA_DIR)")  # fmt: skip
            elif lora.name in (skipped := store.loras_skipped(model)):
                problem = f"the workers of {model} skip LoRA {lora.name!r}: {skipped[lora.name]}"
            where = ("body", "loras", k, "name")
            raise RequestValidationError([{"loc": where, "msg": problem, "type": "value_error"}])

    def _check_controlnets(self, request: JobRequest, model: str) -> None:
        """Each unit's ControlNet must be one of the deployment's (SDSERVE_CONTROLNETS) and,
        where live workers of the model have said which they hold, one that fits the model
        (an SDXL ControlNet on an SD 1.x model does not): a 422 naming
        `controlnets[k].model` otherwise. (No live worker has said: the job waits, and a
        worker whose model it does not fit fails it `invalid_request`.)"""
        units = getattr(request, "controlnets", [])
        if not units:
            return
        served = self.ctx.settings.controlnets
        said = [beat.controlnets for beat in self.ctx.store.workers_of(model)
                if beat.controlnets is not None]  # fmt: skip
        for k, unit in enumerate(units):
            problem = None
            if unit.model not in served:
                names = ", ".join(served) or "none"
                problem = (f"unknown ControlNet {unit.model!r}; this server's: {names}"
                           " (GET /v1/controlnets)")  # fmt: skip
            elif said and not any(unit.model in held.get(model, ()) for held in said):
                fits = sorted({other for held in said for other, names in held.items()
                               if unit.model in names})  # fmt: skip
                holders = ", ".join(fits) or "none"
                problem = (
                    f"no live worker of model {model} holds ControlNet {unit.model!r}: it does"
                    " not fit the model (another family or size), or the workers do not load it"
                    f" (SDSERVE_CONTROLNETS); models whose workers hold it: {holders}"
                )
            if problem is not None:
                where = ("body", "controlnets", k, "model")
                raise RequestValidationError([{"loc": where, "msg": problem,
                                               "type": "value_error"}])  # fmt: skip

    def _check_controlled_hires(self, request: JobRequest, model: str) -> None:
        """A hires fix whose second pass is larger than a tile is denoised in tiles, where
        ControlNets do not steer: a 422 naming `hires.scale` for a job with ControlNets (the
        tile as the model's live workers have said, the default before any has)."""
        if not isinstance(request, Txt2ImgRequest) or not request.controlnets:
            return
        size = request.hires_size()
        if size is None:
            return
        said = [beat.pace.tile for beat in self.ctx.store.workers_of(model) if beat.pace]
        tile = min(said, default=TILE)
        if whole(size, tile):
            return
        message = (f"makes {size[0]}x{size[1]}, over the {tile}x{tile} pixels of a tile: it is"
                   " denoised in tiles, where ControlNets do not steer (a smaller scale, or no"
                   " ControlNet)")  # fmt: skip
        raise RequestValidationError(
            [{"loc": ("body", "hires", "scale"), "msg": message, "type": "value_error"}]
        )

    def _check_clip_skip(self, request: JobRequest, model: str) -> None:
        """A 422 naming `clip_skip` for one deeper than the model's text encoder, as its workers
        have published it (nothing published: the worker checks). The x4 upscaler reads prompts
        with a text encoder of its own: its worker checks those."""
        current = self.prompts[model].current()
        if current is None or task_of(request).engine != "model":
            return
        layers = current[0].clip_layers
        if layers is not None and request.clip_skip > layers:
            message = f"{request.clip_skip} layers: this model's text encoder has {layers}"
            raise RequestValidationError(
                [{"loc": ("body", "clip_skip"), "msg": message, "type": "value_error"}]
            )

    def side_of(self, model: str | None) -> int:
        """The default side of a model's text-to-image job (its workers publish it; 512 before
        any has)."""
        current = self.prompts[self._model(model)].current()
        return current[0].default_side if current is not None else 512

    def _sized(self, request: JobRequest, model: str) -> JobRequest:
        """A text-to-image request without a width or height gets the model's default side
        (SDXL's 1024, as its workers publish it; 512 before any worker has published). What
        the client sent is what identifies a retry, so this changes no replay."""
        if not isinstance(request, Txt2ImgRequest):
            return request
        side = self.side_of(model)
        update = {k: side for k in ("width", "height") if k not in request.model_fields_set}
        return request.model_copy(update=update) if update else request

    def _lengths(self, request: JobRequest, model: str) -> PromptLengths | None:
        """Both prompts' lengths, as the model's tokenizer counts them (its workers publish
        it); a 422 naming the field for one over the model's limit. None (the worker then
        checks) before any worker has published its tokenizer."""
        current = self.prompts[model].current()
        if current is None:
            return None
        published, vocabulary = current
        lengths, problems = {}, []
        for field in ("prompt", "negative_prompt"):
            tokens, pieces = count(getattr(request, field), request.prompt_syntax, vocabulary)
            lengths[field] = PromptLength(tokens=tokens, chunks=pieces)
            if pieces > published.max_chunks:
                limit = published.max_chunks
                message = (
                    f"{tokens} tokens, {pieces} chunks of {CHUNK}: the model takes at most"
                    f" {limit} chunks ({limit * CHUNK} tokens)"
                )
                problems.append({"loc": ("body", field), "msg": message, "type": "value_error"})
        if problems:
            raise RequestValidationError(problems)
        return PromptLengths(**lengths)


def _too_many(http: Request, reason: str, message: str, retry_after_s: float) -> NoReturn:
    http.state.rejected = reason  # for the metrics
    raise HTTPException(
        429, message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    )


def _refuse(http: Request, caller: Caller, outcome: Submission, wait_s: float) -> NoReturn:
    """The 429 of a key's own limits: its rate (`wait_s` until a token) or its jobs in flight."""
    if outcome is Submission.RATE_LIMITED:
        message = f"rate limit: {caller.rate_per_s:g} submissions a second for this key"
        _too_many(http, "rate_limited", message, wait_s)
    message = f"this key has {caller.max_in_flight} jobs queued or running, its limit"
    _too_many(http, "in_flight", message, RETRY_AFTER_S)


def _check_hires(request: JobRequest, settings: ApiSettings) -> None:
    """422 on hires.scale when the second pass would be larger than upscaling allows."""
    size = request.hires_size() if isinstance(request, Txt2ImgRequest) else None
    if size is not None and max(size) > settings.max_upscale_side:
        message = (
            f"makes {size[0]}x{size[1]}, over the {settings.max_upscale_side}-pixel limit of a side"
        )
        raise RequestValidationError(
            [{"loc": ("body", "hires", "scale"), "msg": message, "type": "value_error"}]
        )


def _events_chosen(request: JobRequest) -> bool:
    """Whether the request chose webhook events other than the default. The default sent
    explicitly is not a choice: a job's own `request` (GET /jobs/{id}), sent again, carries
    it."""
    if "webhook_events" not in request.model_fields_set:
        return False
    default = type(request).model_fields["webhook_events"].default
    return set(request.webhook_events) != set(default)


def _check_webhook(url: str, settings: ApiSettings) -> None:
    """422 on webhook_url when this server sends no webhooks or the target is refused."""
    reason = (
        "this server sends no webhooks (SDSERVE_WEBHOOK_SECRET is not set)"
        if settings.webhook_secret is None
        else refusal(url, settings.webhook_allow_private)
    )
    if reason:
        raise RequestValidationError(
            [{"loc": ("body", "webhook_url"), "msg": reason, "type": "value_error"}]
        )
