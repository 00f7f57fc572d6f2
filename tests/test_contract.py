"""The job contract: request validation limits, seeds, ids (pure; no Redis, no model)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.jobs.contract import (
    SCHEDULERS,
    Txt2ImgRequest,
    is_job_id,
    new_job_id,
    parse_request,
)


def error_fields(body: dict[str, Any]) -> set[str]:
    try:
        Txt2ImgRequest.model_validate(body)
    except ValidationError as e:
        return {str(err["loc"][0]) for err in e.errors()}
    return set()


def test_defaults_match_the_contract() -> None:
    r = Txt2ImgRequest(prompt="x")
    assert (r.negative_prompt, r.width, r.height, r.steps) == ("", 512, 512, 25)
    assert (r.guidance_scale, r.scheduler, r.seed, r.n) == (7.5, "dpmpp_2m", None, 1)


@pytest.mark.parametrize(
    ("field", "ok", "bad"),
    [
        ("width", [64, 1024, 520, 2048], [56, 2056, 100, 0]),
        ("height", [64, 1024, 2048], [63, 2049]),
        ("steps", [1, 100], [0, 101]),
        ("guidance_scale", [0, 0.0, 30, 30.0], [-0.01, 30.01]),
        ("seed", [0, 2**32 - 1], [-1, 2**32]),
        ("n", [1, 8], [0, 9]),
        ("prompt", ["x", "y" * 2000], ["", "y" * 2001]),
        ("negative_prompt", ["", "y" * 2000], ["y" * 2001]),
        ("scheduler", list(SCHEDULERS), ["DDIM", "euler-a", ""]),
    ],
)
def test_each_limit_at_its_edge(field: str, ok: list[Any], bad: list[Any]) -> None:
    base = {"prompt": "x"}
    for value in ok:
        assert error_fields({**base, field: value}) == set(), (field, value)
    for value in bad:
        assert error_fields({**base, field: value}) == {field}, (field, value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", "25"), ("steps", 25.0), ("n", True), ("prompt", 5), ("seed", "1"), ("width", None)],
)
def test_wrong_types_are_refused_not_coerced(field: str, value: Any) -> None:
    assert error_fields({"prompt": "x", field: value}) == {field}


def test_unknown_fields_and_missing_prompt_are_named() -> None:
    assert error_fields({"prompt": "x", "sampler": "ddim"}) == {"sampler"}
    assert error_fields({}) == {"prompt"}


def test_seeds_count_up_and_wrap_at_32_bits() -> None:
    assert Txt2ImgRequest(prompt="x", seed=7, n=3).seeds() == [7, 8, 9]
    assert Txt2ImgRequest(prompt="x", seed=2**32 - 1, n=2).seeds() == [2**32 - 1, 0]
    with pytest.raises(ValueError, match="normalized"):
        Txt2ImgRequest(prompt="x").seeds()


def test_job_ids_are_128_bit_url_safe() -> None:
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(is_job_id(i) and len(i) == 22 for i in ids)
    for bad in ["", "x" * 21, "x" * 23, "../../etc/passwd00000", "a" * 21 + "/", "a" * 21 + "="]:
        assert not is_job_id(bad)


def test_progress_counts_the_steps_the_job_runs() -> None:
    """A hires fix showed 150/100, img2img at 0.3 ended at 29/100 and A1111's progress passed
    1 (issue 21, 7): `steps` is what the worker runs."""
    import json
    import time

    from app.jobs.contract import Hires, Img2ImgRequest, StoredImage, Txt2ImgRequest
    from app.jobs.views import job_view

    image = StoredImage(sha256="0" * 64, width=64, height=64)
    cases = [
        (Img2ImgRequest(prompt="a", image=image, steps=100, strength=0.3, seed=1), 30),
        (Txt2ImgRequest(prompt="a", steps=100, seed=1, hires=Hires(strength=0.5)), 150),
        (Txt2ImgRequest(prompt="a", steps=100, seed=1), 100),
    ]
    for request, steps in cases:
        record = {"request": json.dumps(request.model_dump(mode="json")), "status": "running",
                  "created_at": str(time.time()), "step": str(steps)}  # fmt: skip
        progress = job_view("j", record, None, time.time()).progress
        assert progress is not None and (progress.step, progress.steps) == (steps, steps)


def test_infotext_of_a_hires_fix_and_of_x4_says_what_ran() -> None:
    """A hires fix's PNG said nothing of its second pass, and x4's said Lanczos and a strength
    it does not use, with no noise level (issue 21, 11)."""
    from app.jobs.contract import Hires, StoredImage, Txt2ImgRequest, UpscaleRequest
    from worker.images import parameters

    second = Hires(scale=1.5, steps=8, strength=0.45, method="pixel")
    hires = Txt2ImgRequest(prompt="a", seed=1, steps=20, hires=second)
    text = parameters(hires, 1, "m")
    for said in ("Size: 512x512", "Denoising strength: 0.45", "Hires upscale: 1.5",
                 "Hires steps: 8", "Hires upscaler: Lanczos"):  # fmt: skip
        assert said in text, said
    image = StoredImage(sha256="0" * 64, width=64, height=64)
    x4 = UpscaleRequest(image=image, width=128, height=128, method="x4", scale=2, seed=1,
                        noise_level=40)  # fmt: skip
    text = parameters(x4, 1, "m")
    assert "Noise level: 40" in text and "SD x4 upscaler" in text
    assert "Lanczos" not in text and "Denoising strength" not in text


@pytest.mark.parametrize(
    ("size", "fine"),
    [
        ((1024, 1024), True),
        ((1344, 768), True),
        ((1536, 640), True),
        ((2048, 512), True),
        ((1032, 1024), False),
        ((1536, 1024), False),
        ((2048, 1024), False),
    ],
)
def test_a_generated_picture_has_at_most_1024_x_1024_pixels_in_any_shape(
    size: tuple[int, int], fine: bool
) -> None:
    """SDXL's wide sizes are drawn (sides to 2048); more pixels than 1024 x 1024 is an error
    naming `height`, with the count."""
    fields = error_fields({"prompt": "x", "width": size[0], "height": size[1]})
    assert fields == (set() if fine else {"height"}), size


@pytest.mark.parametrize(
    "prompt", ["<lora:style:0.8>", " <lora:style> ", "", "a cat <lora:style:0.5:1.2>"]
)
def test_what_a1111_syntax_accepts_reads_back_from_its_record(prompt: str) -> None:
    """A prompt of LoRA tags only was accepted, then stored as an empty prompt that the
    contract refused: every `GET /jobs/{id}` of it was a 500 and the worker failed it as
    unreadable. A1111 takes an empty prompt and one of tags only; the record reads back."""
    from app.jobs.contract import parse_request
    from worker.images import parameters

    request = Txt2ImgRequest(prompt=prompt, prompt_syntax="a1111", seed=1)
    again = parse_request(request.model_dump_json())
    assert again == request and again.prompt == prompt.split("<")[0].strip()
    assert [lora.name for lora in again.loras] == ["style"] * ("<lora" in prompt)
    said = parameters(again, 1, "m").split("\n")[0]
    assert said == said.strip() and ("<lora:style:" in said) == ("<lora" in prompt), said


def test_a1111s_lyco_tag_is_a_lora_tag() -> None:
    """A1111 reads `<lyco:name:w>` as `<lora:name:w>` (an alias its LoRA extension registers):
    it was left in the text, encoded as words, and no LoRA applied."""
    lyco = Txt2ImgRequest(prompt="a cat <lyco:style:0.5:1.2>", prompt_syntax="a1111", seed=1)
    lora = Txt2ImgRequest(prompt="a cat <lora:style:0.5:1.2>", prompt_syntax="a1111", seed=1)
    assert lyco == lora and lyco.prompt == "a cat"
    assert [(x.name, x.weight, x.text_weight) for x in lyco.loras] == [("style", 1.2, 0.5)]


@pytest.mark.parametrize(
    ("body", "named", "says"),
    [
        ({"prompt": ""}, "prompt", "is empty"),
        ({"prompt": "a <lora:style:abc>", "prompt_syntax": "a1111"}, "prompt", "not a weight"),
        ({"prompt": "a <lora:style:9>", "prompt_syntax": "a1111"}, "prompt", "from -4 to 4"),
        ({"prompt": " ".join(f"<lora:l{k}:1>" for k in range(9)), "prompt_syntax": "a1111"},
         "loras", "at most 8"),
        ({"prompt": "a <hypernet:anime:0.6>", "prompt_syntax": "a1111"}, "prompt",
         "hypernetworks are not served"),
        ({"prompt": "a", "negative_prompt": "<hypernet:x>", "prompt_syntax": "a1111"},
         "negative_prompt", "<hypernet:x>: hypernetworks"),
        ({"prompt": "a [cat:dog:0.5]", "prompt_syntax": "a1111"}, "prompt",
         "[cat:dog:0.5]: A1111's prompt editing"),
        ({"prompt": "a", "negative_prompt": "[blur|noise]", "prompt_syntax": "a1111"},
         "negative_prompt", "[blur|noise]: A1111's alternating prompt"),
        ({"prompt": "a cat AND a dog", "prompt_syntax": "a1111"}, "prompt",
         "AND: A1111's composable prompts (several prompts combined with AND) are not served"
         " (a literal 'and': lower case)"),
        ({"prompt": "a [cat:dog:0.5]", "prompt_syntax": "a1111"}, "prompt",
         "(escape a literal bracket: \\[)"),
    ],
)  # fmt: skip
def test_a_prompts_tags_refused_name_the_field(body: dict[str, Any], named: str, says: str) -> None:
    """Refused tags named the whole body (`loc: ["body"]`), not the prompt."""
    with pytest.raises(ValidationError) as refused:
        Txt2ImgRequest.model_validate(body)
    (error,) = refused.value.errors()
    assert error["loc"] == (named,) and says in error["msg"], error


def test_a_stored_request_refused_now_is_still_read() -> None:
    """A job accepted before a refusal existed (A1111's prompt editing, a hypernetwork tag,
    until 2026-12-06) is read back as stored: its view and its worker do not fail on it."""
    import json

    body = {"prompt": "a [cat:dog:0.5] <hypernet:x>", "negative_prompt": "[a|b]",
            "prompt_syntax": "a1111"}  # fmt: skip
    with pytest.raises(ValidationError):
        Txt2ImgRequest.model_validate(body)
    read = parse_request(json.dumps({"kind": "txt2img", **body}))
    assert (read.prompt, read.negative_prompt) == (body["prompt"], body["negative_prompt"])
