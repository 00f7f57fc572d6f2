"""Every Redis key name sdserve uses: the one place that spells them.

All keys live under the ``sdserve:`` prefix:

- ``sdserve:queue``             stream of work for the model named ``default`` (a deployment
                                of one model); each entry is ``{job: <id>}``; group ``workers``
- ``sdserve:queue:<model>``     the same, for each model SDSERVE_MODELS names
- ``sdserve:queued``            sorted set of queued job ids, scored by creation time
                                (positions), for ``default``; ``sdserve:queued:<model>`` for
                                each named model
- ``sdserve:job:<id>``          hash: the job record (request, status, timestamps, progress,
                                finishing estimate, error, image count); images live in object
                                storage, not here
- ``sdserve:preview:<id>``      the running job's latest preview (a small JPEG), a short TTL
- ``sdserve:worker:<name>``     heartbeat of a live worker, with a TTL; holds the process's
                                instance token, so a second process under the same name is seen
- ``sdserve:workers``           set of worker names that have sent a heartbeat
- ``sdserve:dead``              stream of dead-lettered (poison) entries
- ``sdserve:idempotency:<sha256 of caller and key>``  "<job id> <sha256 of the request>"
- ``sdserve:retry:<sha256 of caller and request>``    the last job an OpenAI-route call made
- ``sdserve:inflight:<key id>`` set of an API key's queued and running jobs
- ``sdserve:ratelimit:<key id>`` token bucket of an API key's submissions
- ``sdserve:stats:job_seconds`` histogram of accepted-to-finished times, by final status
- ``sdserve:webhooks``          stream of webhook events to send; group ``senders``
- ``sdserve:sweep``             lock: one process at a time sweeps expired files from storage
- ``sdserve:tokenizer``         hash: the model's tokenizer as workers publish it (``digest``,
                                ``record``), for the API to count prompt tokens;
                                ``sdserve:tokenizer:<model>`` for each named model
- ``sdserve:loras``             JSON list of the LoRAs the model's workers take (names), set at
                                each heartbeat with a TTL; ``sdserve:loras:<model>`` for each
                                named model
- ``sdserve:loras-skipped``     JSON object: the folder's other LoRA files, each with why the
                                model's workers skip it (unreadable, rank, another model), set
                                with ``sdserve:loras``; ``sdserve:loras-skipped:<model>``
- ``sdserve:embeddings``        JSON of the textual-inversion embeddings the model's workers
                                loaded and skipped (A1111's shape), set at each heartbeat with a
                                TTL; ``sdserve:embeddings:<model>`` for each named model
- ``sdserve:ended``             pub/sub channel: a job's id, published when it ends (any
                                terminal status), for the API's routes that wait for it
- ``sdserve:latest:<key id>``    the caller's latest job from A1111's routes (its progress and
                                interrupt)
- ``sdserve:options:<key id>``   hash: the caller's A1111 settings (``POST /sdapi/v1/options``:
                                model, VAE, clip skip), JSON values, for its later A1111 jobs
- ``sdserve:refresh:<what>``    counter (``loras``, ``embeddings``): A1111's refresh-loras and
                                refresh-embeddings bump it; workers read their folders again
                                when it moves
"""

from __future__ import annotations

import hashlib

from app.jobs.contract import DEFAULT_MODEL

STREAM = "sdserve:queue"
GROUP = "workers"
QUEUED = "sdserve:queued"
WORKERS = "sdserve:workers"
DEAD = "sdserve:dead"
WEBHOOKS = "sdserve:webhooks"
WEBHOOK_GROUP = "senders"
JOB_SECONDS = "sdserve:stats:job_seconds"
SWEEP_LOCK = "sdserve:sweep"
TOKENIZER = "sdserve:tokenizer"
LORAS = "sdserve:loras"
LORAS_SKIPPED = "sdserve:loras-skipped"
EMBEDDINGS = "sdserve:embeddings"
ENDED = "sdserve:ended"


def _per_model(key: str, model: str) -> str:
    # A deployment of one model keeps the keys it had before models had names.
    return key if model == DEFAULT_MODEL else f"{key}:{model}"


def stream_key(model: str) -> str:
    return _per_model(STREAM, model)


def queued_key(model: str) -> str:
    return _per_model(QUEUED, model)


def tokenizer_key(model: str) -> str:
    return _per_model(TOKENIZER, model)


def loras_key(model: str) -> str:
    return _per_model(LORAS, model)


def loras_skipped_key(model: str) -> str:
    return _per_model(LORAS_SKIPPED, model)


def embeddings_key(model: str) -> str:
    return _per_model(EMBEDDINGS, model)


def refresh_key(what: str) -> str:
    return f"sdserve:refresh:{what}"


def job_key(job_id: str) -> str:
    return f"sdserve:job:{job_id}"


def preview_key(job_id: str) -> str:
    return f"sdserve:preview:{job_id}"


def worker_key(name: str) -> str:
    return f"sdserve:worker:{name}"


def _digest(*parts: str) -> str:
    # A client's key or request is arbitrary text: it never lands in Redis as given.
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def idempotency_key(owner: str, key: str) -> str:
    # Per caller: one API key cannot find another's jobs by guessing its Idempotency-Keys.
    return f"sdserve:idempotency:{_digest(owner, key)}"


def retry_key(owner: str, request_hash: str) -> str:
    return f"sdserve:retry:{_digest(owner, request_hash)}"


def inflight_key(owner: str) -> str:
    return f"sdserve:inflight:{owner}"


def ratelimit_key(owner: str) -> str:
    return f"sdserve:ratelimit:{owner}"


def options_key(owner: str) -> str:
    """The caller's A1111 settings: what its A1111 jobs take where `override_settings` is silent."""
    return f"sdserve:options:{owner}"


def latest_key(owner: str) -> str:
    """The caller's latest job from A1111's routes (its progress and interrupt are per caller)."""
    return f"sdserve:latest:{owner}"
