"""SDXL's prompt encoding against diffusers' `encode_prompt`, on the tiny SDXL base and refiner
the project builds (issue 22)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from app.jobs.prompts import Vocabulary
from worker.tiny import build_tiny_model
from worker.xl_prompts import XlPromptEncoder, zeros_like

CPU = torch.device("cpu")
LONG = "a red fox in deep snow, golden hour, " * 3  # 111 tokens of the byte tokenizer: 2 chunks


def vocabulary(tokenizer: object) -> Vocabulary:
    t: object = tokenizer

    def tokenize(text: str) -> list[int]:
        return list(t(text, add_special_tokens=False).input_ids)  # type: ignore[operator]

    comma = t(",", add_special_tokens=False).input_ids[-1]  # type: ignore[operator]
    return Vocabulary(tokenize, t.bos_token_id, t.eos_token_id, t.pad_token_id, comma)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    root = tmp_path_factory.mktemp("xlp")
    base = StableDiffusionXLPipeline.from_pretrained(build_tiny_model(root / "b", "tiny-sdxl"))
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        build_tiny_model(root / "r", "tiny-sdxl-refiner")
    )
    return base, refiner


def base_encoder(pipe: Any) -> XlPromptEncoder:
    pairs = [(pipe.text_encoder, pipe.tokenizer.pad_token_id),
             (pipe.text_encoder_2, pipe.tokenizer_2.pad_token_id)]  # fmt: skip
    return XlPromptEncoder(vocabulary(pipe.tokenizer), pairs, CPU)


def test_one_chunk_is_exactly_diffusers_encoding(pipes: tuple[Any, Any]) -> None:
    base, _ = pipes
    [mine] = base_encoder(base).encode([("a lighthouse at dusk", "plain")])
    context, _, pooled, _ = base.encode_prompt("a lighthouse at dusk", device=CPU,
                                               do_classifier_free_guidance=False)  # fmt: skip
    assert mine.context.shape == context[0].shape == (77, 32 + 48)  # CLIP-L and the second, wider
    torch.testing.assert_close(mine.context, context[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.pooled, pooled[0], rtol=1e-5, atol=1e-5)


def test_the_refiner_reads_the_second_encoder_only(pipes: tuple[Any, Any]) -> None:
    _, refiner = pipes
    encoder = XlPromptEncoder(vocabulary(refiner.tokenizer_2),
                              [(refiner.text_encoder_2, refiner.tokenizer_2.pad_token_id)],
                              CPU)  # fmt: skip
    [mine] = encoder.encode([("a lighthouse at dusk", "plain")])
    context, _, pooled, _ = refiner.encode_prompt("a lighthouse at dusk", device=CPU,
                                                  do_classifier_free_guidance=False)  # fmt: skip
    assert mine.context.shape == (77, 48)
    torch.testing.assert_close(mine.context, context[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.pooled, pooled[0], rtol=1e-5, atol=1e-5)


def test_a_long_prompt_is_its_chunks_end_to_end_pooled_from_the_first(
    pipes: tuple[Any, Any],
) -> None:
    encoder = base_encoder(pipes[0])
    # BREAK ends a chunk (A1111's syntax): the two chunks are these two prompts.
    split, one, two = encoder.encode([("a red fox BREAK deep snow", "a1111"),
                                      ("a red fox", "a1111"), ("deep snow", "a1111")])  # fmt: skip
    assert split.context.shape == (154, 80)
    torch.testing.assert_close(split.context, torch.cat([one.context, two.context]))
    torch.testing.assert_close(split.pooled, one.pooled)
    [long] = encoder.encode([(LONG, "plain")])
    assert long.context.shape == (154, 80)


def test_weights_change_both_encoders_and_an_empty_negative_is_zeros(
    pipes: tuple[Any, Any],
) -> None:
    encoder = base_encoder(pipes[0])
    plain, weighted = encoder.encode([("a (red:1.5) fox", "a1111"), ("a red fox", "a1111")])
    assert not torch.equal(plain.context[:, :32], weighted.context[:, :32])
    assert not torch.equal(plain.context[:, 32:], weighted.context[:, 32:])
    none = zeros_like(plain)
    assert not none.context.any() and not none.pooled.any()
