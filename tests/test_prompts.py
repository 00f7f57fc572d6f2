"""Long and weighted prompts: A1111's emphasis syntax, chunks of 75 tokens, embeddings equal to
CLIP's own per chunk, images equal to diffusers' pipeline given those embeddings, and rows of
different prompt lengths batched together without changing anyone's image."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from app.api import create_app
from app.jobs.contract import Status
from app.jobs.prompts import CHUNK, changing, chunks, count, fragments, token_ids
from app.jobs.vocabulary import PublishedTokenizer
from app.settings import ApiSettings
from tests.conftest import JobStore, serving
from tests.test_image_jobs import b64
from tests.test_rows import max_diff, run
from tests.test_worker import run_once, runner, submit
from worker.engine import BatchShape, Engine, ImageSpec, PromptTooLong, emphasized
from worker.prompting import Prompt, Remembered
from worker.schedulers import make_scheduler

# A1111's own examples of its syntax, with the weights it gives them.
# fmt: off
EMPHASIS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
         ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)],
    ),
    ("[a] [[b]]", [("a", 1 / 1.1), (" ", 1.0), ("b", 1 / 1.1**2)]),
    ("(a:1.5) and :colons:", [("a", 1.5), (" and :colons:", 1.0)]),
]
# fmt: on


@pytest.mark.parametrize(("prompt", "expected"), EMPHASIS)
def test_emphasis_weighs_as_a1111(prompt: str, expected: list[tuple[str, float]]) -> None:
    got = fragments(prompt, "a1111")
    assert [f.text for f in got] == [text for text, _ in expected]
    assert [f.weight for f in got] == pytest.approx([weight for _, weight in expected])


@pytest.mark.parametrize(
    ("prompt", "found"),
    [
        ("a [cat:dog:0.5]", "[cat:dog:0.5]"),  # editing: from, to, when
        ("a [dog:10] b", "[dog:10]"),  # added at step 10
        ("[cat::0.3] x", "[cat::0.3]"),  # removed at 30%
        ("[cat|dog]", "[cat|dog]"),  # alternation
        ("[a:[b]:0.5]", "[a:[b]:0.5]"),  # emphasis inside an edit: the edit
        ("[(a:1.2):b:0.5]", "[(a:1.2):b:0.5]"),
        ("[[a]|b]", "[[a]|b]"),
        ("rock AND roll", "AND"),
        ("[a]", None),  # emphasis
        ("[a: b]", None),  # a colon that is text
        ("(a:1.2) [y]", None),
        ("\\[a:0.5\\]", None),  # escaped: literal brackets
        ("and, Anderson", None),
    ],
)
def test_changing_prompts_are_found(prompt: str, found: str | None) -> None:
    """What A1111 reads as a prompt that changes during the steps, or several prompts: the
    API refuses it (app/jobs/contract.py) rather than encode it as emphasized words."""
    assert changing(prompt) == found
    assert changing("a AND b", composable=False) is None  # a negative prompt's AND is text


def test_plain_prompts_keep_every_character() -> None:
    prompt = "a (house:1.3) BREAK [x]"
    assert [(f.text, f.weight) for f in fragments(prompt, "plain")] == [(prompt, 1.0)]


def test_break_ends_a_chunk_and_commas_keep_phrases_whole(engine: Engine) -> None:
    vocabulary = engine.vocabulary
    assert [len(c.ids) for c in chunks("ab BREAK cd", "a1111", vocabulary)] == [2, 2]
    assert len(chunks("", "plain", vocabulary)) == 1
    # The tiny tokenizer has one token per character: 70 tokens, a comma, then 10 more. The
    # first chunk ends after the comma rather than in the middle of the last phrase.
    prompt = "a" * 70 + "," + "b" * 10
    pieces = chunks(prompt, "plain", vocabulary)
    assert [len(c.ids) for c in pieces] == [71, 10]
    assert count(prompt, "plain", vocabulary) == (81, 2)
    # No comma near the end: cut at 75.
    assert [len(c.ids) for c in chunks("a" * 160, "plain", vocabulary)] == [75, 75, 10]


def test_a_short_prompt_is_exactly_what_the_tokenizer_gives(engine: Engine) -> None:
    text = "a lighthouse, at dusk"
    (chunk,) = chunks(text, "plain", engine.vocabulary)
    ids, weights = token_ids(chunk, engine.vocabulary)
    expected = engine.tokenizer(text, padding="max_length", max_length=77).input_ids
    assert ids == expected and weights == [1.0] * 77


def clip(engine: Engine, text: str) -> torch.Tensor:
    """CLIP's own encoding of up to 75 tokens of text, as diffusers encodes a prompt."""
    ids = engine.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt")
    with torch.inference_mode():
        return engine.text_encoder(ids.input_ids)[0][0]  # type: ignore[no-any-return]


def test_a_long_prompt_is_its_chunks_encoded_alone_end_to_end(engine: Engine) -> None:
    first, second = "c " * 75, "d " * 30  # a token per letter in the tiny tokenizer
    ours = engine.encode([first + second])[0]
    assert ours.shape[0] == 2 * 77
    expected = torch.cat([clip(engine, first), clip(engine, second)])
    # Equal up to fp32 rounding (sdserve encodes chunks 8 at a time, this one at a time).
    assert torch.allclose(ours, expected, atol=1e-5)


def test_weights_scale_tokens_and_keep_the_mean(engine: Engine) -> None:
    ours = engine.encode(["ab (cd:1.5)"], "a1111")[0]
    plain = clip(engine, "ab cd")
    weights = torch.ones(77)
    # start, a, b, then c and d at 1.5 (a token per letter in the tiny tokenizer)
    ids = engine.tokenizer("ab cd", add_special_tokens=False).input_ids
    weights[1 + len(ids) - 2 : 1 + len(ids)] = 1.5
    assert torch.allclose(ours, emphasized(plain, weights), atol=1e-5)
    assert not torch.allclose(ours, plain)


def test_emphasis_keeps_the_mean_unless_the_mean_is_noise() -> None:
    """A1111's rule where the mean means something (real CLIP's is far from 0); weights alone
    where the weighted mean is next to nothing (the tiny model's final layer norm has no bias:
    its mean is ~1e-8, and the ratio of two such means was any number, inf, or negative: black
    or non-finite images) or the ratio is negative (negative weights)."""
    generator = torch.Generator().manual_seed(0)
    plain = torch.randn(77, 32, generator=generator) + 0.5
    weights = torch.ones(77)
    weights[3:6] = 1.5
    kept = emphasized(plain, weights)
    assert torch.allclose(kept.mean(), plain.mean())
    weighted = plain * weights[:, None]
    assert torch.allclose(kept, weighted * (plain.mean() / weighted.mean()))
    centred = plain - plain.mean()
    assert torch.equal(emphasized(centred, weights), centred * weights[:, None])
    negative = weights.clone()
    negative[:40] = -3.0
    assert torch.equal(emphasized(plain, negative), plain * negative[:, None])


def test_a_prompt_over_the_limit_is_refused(engine: Engine) -> None:
    limit = engine.tuning.prompt_chunks
    with pytest.raises(PromptTooLong):
        engine.encode(["e" * (CHUNK * limit + 1)])
    assert engine.encode(["e" * (CHUNK * limit)]).shape[1] == 77 * limit


LONG = "a red fox in deep snow, " * 5  # 120 tokens of the tiny tokenizer: two chunks
NEGATIVE = "blurry, low quality, noisy " * 4  # 104: two chunks


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a"])
def test_long_prompts_equal_diffusers_given_the_same_embeddings(
    engine: Engine, tiny_model: Path, scheduler: str
) -> None:
    """Diffusers cuts prompts at 77 tokens; handed the chunked embeddings, its pipeline makes
    the images sdserve makes (static batches and rows alike)."""
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.scheduler = make_scheduler(scheduler, engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt_embeds=engine.encode([LONG]),
        negative_prompt_embeds=engine.encode([NEGATIVE]),
        height=64, width=64, num_inference_steps=4, guidance_scale=6.0,
        generator=torch.Generator().manual_seed(21), output_type="np",
    ).images[0]  # fmt: skip
    reference = (reference * 255).round().astype(np.uint8)
    spec = ImageSpec(LONG, NEGATIVE, 6.0, 21)
    shape = BatchShape(64, 64, 4, scheduler)
    static = engine.generate([spec], shape)
    assert static is not None and static[0] is not None
    assert max_diff(static[0], reference) <= 1
    rows = run(engine, [engine.prepare("long", [spec], shape)])["long"][0]
    assert max_diff(rows, reference) <= 1


def test_rows_of_different_prompt_lengths_step_together_unchanged(engine: Engine) -> None:
    """The seed contract across prompt lengths: a long prompt, a long prompt with a short
    negative, and short prompts, stepping in the same calls, each make the image they make
    alone (fp32 on the CPU: ~1e-6 apart before rounding, as for any strangers)."""
    shape = BatchShape(64, 64, 4, "dpmpp_2m")
    specs = {
        "long": ImageSpec(LONG, NEGATIVE, 6.0, 1),
        "mixed": ImageSpec(LONG, "blurry", 7.0, 2, "a1111"),
        "weighted": ImageSpec("a (fox:1.4) BREAK in snow", "", 5.0, 3, "a1111"),
        "short": ImageSpec("a cat", "", 6.0, 4),
        "unguided": ImageSpec(LONG, "", 1.0, 5),
    }
    alone = {k: run(engine, [engine.prepare(k, [s], shape)])[k][0] for k, s in specs.items()}
    together = run(engine, [engine.prepare(key, [s], shape) for key, s in specs.items()])
    for key, image in alone.items():
        assert max_diff(together[key][0], image) <= 1, key
    static = engine.generate(list(specs.values()), shape)
    assert static is not None
    for key, made in zip(specs, static, strict=True):
        assert made is not None and max_diff(made, alone[key]) <= 1, key


def test_the_api_counts_as_the_workers_do_and_refuses_a_prompt_over_the_limit(
    api: httpx.Client, store: JobStore, engine: Engine
) -> None:
    over = "e " * (CHUNK * engine.tuning.prompt_chunks + 1)
    # Before any worker has published its tokenizer: accepted, uncounted (the worker checks).
    early = api.post("/v1/txt2img", json={"prompt": over})
    assert early.status_code == 202
    assert api.get(early.json()["url"]).json()["request"]["prompt_length"] is None
    store.publish_tokenizer("default", engine.published_tokenizer.fields())
    refused = api.post("/v1/txt2img", json={"prompt": "x", "negative_prompt": over})
    assert refused.status_code == 422
    (problem,) = refused.json()["detail"]
    assert problem["loc"] == ["body", "negative_prompt"]
    assert "301 tokens, 5 chunks of 75" in problem["msg"]
    body = {"prompt": LONG, "negative_prompt": "(blurry:1.2)", "prompt_syntax": "a1111"}
    accepted = api.post("/v1/txt2img", json=body)
    assert accepted.status_code == 202
    lengths = api.get(accepted.json()["url"]).json()["request"]["prompt_length"]
    expected = count(LONG, "a1111", engine.vocabulary)
    assert lengths == {
        "prompt": {"tokens": expected[0], "chunks": 2},
        "negative_prompt": {"tokens": len(engine.tokenizer("blurry").input_ids) - 2, "chunks": 1},
    }


def test_the_api_refuses_a_clip_skip_deeper_than_the_model_once_its_workers_said(
    api: httpx.Client, store: JobStore, engine: Engine, api_settings: ApiSettings
) -> None:
    """The tiny model's text encoder has 2 layers: a clip skip of 3 was accepted, then failed
    at the worker. Its workers publish the layers with the tokenizer, and the API refuses it,
    naming `clip_skip` (A1111's name on its routes)."""
    layers = engine.family.clip_layers
    store.publish_tokenizer("default", engine.published_tokenizer.fields())
    refused = api.post("/v1/txt2img", json={"prompt": "x", "clip_skip": layers + 1})
    assert refused.status_code == 422
    (problem,) = refused.json()["detail"]
    assert problem["loc"] == ["body", "clip_skip"]
    assert f"this model's text encoder has {layers}" in problem["msg"]
    assert api.post("/v1/txt2img", json={"prompt": "x", "clip_skip": layers}).status_code == 202
    a1111 = api.post("/sdapi/v1/txt2img", json={
        "prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": layers + 1}})  # fmt: skip
    assert a1111.status_code == 422
    (problem,) = a1111.json()["detail"]
    assert problem["loc"] == ["body", "override_settings", "CLIP_stop_at_last_layers"]
    # The x4 upscaler reads its prompt with a text encoder of its own: its worker checks.
    settings = api_settings.model_copy(update={"upscaler": "x4-upscaler"})
    with serving(create_app(store, settings)) as url:
        x4 = {"image": b64(Image.new("RGB", (64, 64))), "method": "x4", "clip_skip": layers + 1}
        answer = httpx.post(f"{url}/v1/upscale", json=x4)
        assert answer.status_code == 202, answer.text


def test_the_published_record_reads_across_versions(engine: Engine) -> None:
    """A record from an older worker (no clip_layers) reads with the field unknown, and one
    from a newer worker (a field this API does not know) reads without it, not as a 500 on
    every submission while a deployment is half upgraded."""
    record = json.loads(engine.published_tokenizer.fields()["record"])
    older = {k: v for k, v in record.items() if k != "clip_layers"}
    assert PublishedTokenizer.parse(json.dumps(older)).clip_layers is None
    newer = PublishedTokenizer.parse(json.dumps(record | {"added_later": 1}))
    assert newer == engine.published_tokenizer


def test_a_job_queued_before_the_count_fails_at_the_worker_naming_the_prompt(
    store: JobStore, tiny_model: Path, redis_url: str
) -> None:
    job_id = submit(store, prompt="e " * 301)
    assert run_once(runner(store, tiny_model, redis_url)) == 1
    view = store.view(job_id)
    assert view is not None and view.status is Status.FAILED and view.error is not None
    assert view.error.code == "invalid_request"
    assert "prompt: 5 chunks of 75 tokens" in view.error.message


def test_the_cache_of_encodings_serves_two_threads_and_encodes_each_prompt_once() -> None:
    """The loop's thread and the prompt reader's share the cache: a prompt asked by both while
    one encodes it is encoded once; a thread whose prompts are all there does not wait for
    another's encode; what was encoded before a `clear` is not remembered after it."""
    reading = threading.Lock()
    cache: Remembered[str] = Remembered(reading)
    encoded: list[list[str]] = []
    started, release = threading.Event(), threading.Event()

    def slow(prompts: list[Prompt]) -> list[str]:
        encoded.append([p.text for p in prompts])
        started.set()
        release.wait(10)
        return [f"<{p.text}>" for p in prompts]

    release.set()
    assert cache.each([Prompt("kept")], slow) == ["<kept>"]
    release.clear()
    results: dict[str, list[str]] = {}
    first = threading.Thread(target=lambda: results.update(a=cache.each([Prompt("a")], slow)))
    first.start()
    started.wait(10)  # the reader is encoding "a", holding `reading`
    second = threading.Thread(target=lambda: results.update(b=cache.each([Prompt("a")], slow)))
    second.start()
    # Remembered prompts come back at once, the encode in flight notwithstanding.
    meanwhile = threading.Thread(target=lambda: results.update(k=cache.each([Prompt("kept")],
                                                                             slow)))  # fmt: skip
    meanwhile.start()
    meanwhile.join(5)
    assert results.get("k") == ["<kept>"]
    assert second.is_alive()  # "a" is being encoded: it waits for that encode
    release.set()
    first.join(10)
    second.join(10)
    assert results == {"a": ["<a>"], "b": ["<a>"], "k": ["<kept>"]}
    assert encoded == [["kept"], ["a"]]

    release.clear()
    started.clear()
    late = threading.Thread(target=lambda: results.update(c=cache.each([Prompt("c")], slow)))
    late.start()
    started.wait(10)
    cache.clear()  # e.g. a LoRA's file changed while "c" was being encoded with its old one
    release.set()
    late.join(10)
    assert results["c"] == ["<c>"]  # its caller has what was encoded
    release.set()
    assert cache.each([Prompt("c")], slow) == ["<c>"] and encoded[-1] == ["c"]  # afresh
    assert len(encoded) == 4
