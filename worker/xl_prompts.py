"""SDXL's prompt encoding (issue 22; not served yet: the SDXL family will use it).

SDXL reads every prompt with two CLIP text encoders: the base model with both (CLIP ViT-L and
OpenCLIP ViT-bigG), its refiner with the second only. A row's context is each encoder's
penultimate hidden states side by side (77 tokens a chunk, chunks laid end to end, as for SD
1.x); its pooled embedding, the second encoder's projected output, goes in with the time ids.
As A1111 does for long prompts, every chunk is encoded alone and the pooled embedding is the
first chunk's; a prompt of one chunk is exactly diffusers' `encode_prompt`. The second
tokenizer pads with "!" where the first pads with its end token: each encoder gets its own
padding. Weighted words are scaled in both encoders' states (worker/prompting.py's rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from app.jobs.prompts import Chunk, Syntax, Vocabulary, chunks, token_ids
from worker.adapters import Adapters, LoraUse
from worker.prompting import (
    Prompt,
    PromptTooLong,
    fixed_batches,
    prompts_of,
    text_loras,
    weighed,
)


@dataclass(frozen=True)
class XlPrompt:
    """One prompt as SDXL's UNet takes it."""

    context: torch.Tensor  # (77 x chunks, width of both encoders' states)
    pooled: torch.Tensor  # (the second encoder's projection,)


class XlPromptEncoder:
    def __init__(
        self,
        vocabulary: Vocabulary,
        encoders: Sequence[tuple[Any, int]],
        device: torch.device,
        max_chunks: int = 4,
        adapters: Adapters | None = None,
    ) -> None:
        """`encoders`: each text encoder with its tokenizer's padding id, the one whose
        projection is pooled last. `vocabulary`: how both tokenizers cut text (they share
        their vocabulary; only their padding differs)."""
        self.vocabulary = vocabulary
        self.encoders = list(encoders)
        self.device = device
        self.max_chunks = max_chunks
        self.adapters = adapters  # LoRAs per row, where served

    @torch.inference_mode()
    def encode(self, prompts: Sequence[tuple[str, Syntax] | Prompt]) -> list[XlPrompt]:
        """Each prompt's context and pooled embedding; with a clip skip of n, each encoder's
        states n layers before its last (diffusers' SDXL `clip_skip` n - 1; 1: the
        penultimate, SDXL's own)."""
        read = prompts_of(prompts)
        pieces = [chunks(p.text, p.syntax, self.vocabulary) for p in read]
        skips = [p.clip_skip for p, cut in zip(read, pieces, strict=True) for _ in cut]
        loras = [p.loras for p, cut in zip(read, pieces, strict=True) for _ in cut]
        for cut in pieces:
            if len(cut) > self.max_chunks:
                raise PromptTooLong(
                    f"a prompt of {len(cut)} chunks of 75 tokens; this worker encodes at most"
                    f" {self.max_chunks}"
                )
        flat = [chunk for cut in pieces for chunk in cut]
        states: list[list[torch.Tensor]] = []
        pooled: list[torch.Tensor] = []
        for encoder, pad in self.encoders:
            hidden, projected = self._encode_chunks(encoder, replace(self.vocabulary, pad=pad),
                                                    flat, skips, loras)  # fmt: skip
            states.append(hidden)
            pooled = projected
        out, at = [], 0
        for cut in pieces:
            rows = range(at, at + len(cut))
            context = torch.cat([torch.cat([s[k] for s in states], -1) for k in rows])
            out.append(XlPrompt(context, pooled[at]))  # the first chunk's, as A1111 pools
            at += len(cut)
        return out

    def _encode_chunks(
        self,
        encoder: Any,
        vocabulary: Vocabulary,
        pieces: list[Chunk],
        skips: list[int],
        loras: list[tuple[LoraUse, ...]],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each chunk's penultimate hidden states (weighted where its words are) and the
        encoder's first output per chunk (the projected pooled embedding, for an encoder with
        a projection), in fixed batches so that a chunk's encoding never depends on its
        company."""
        rows = [token_ids(piece, vocabulary) for piece in pieces]
        hidden: list[torch.Tensor] = []
        first: list[torch.Tensor] = []
        at = 0
        for batch, ids in fixed_batches(rows, vocabulary, self.device):
            with text_loras(self.adapters, loras[at : at + len(batch)]):
                output = encoder(ids, output_hidden_states=True)
            for k, (_ids, weights) in enumerate(batch):
                layer = -1 - skips[at + k]
                hidden.append(weighed(output.hidden_states[layer][k], weights))
                first.append(output[0][k])
            at += len(batch)
        return hidden, first


def zeros_like(prompt: XlPrompt) -> XlPrompt:
    """SDXL's unconditional input for an empty negative prompt (`force_zeros_for_empty_prompt`
    in the base model's config): zeros, not the encoding of ""."""
    return XlPrompt(torch.zeros_like(prompt.context), torch.zeros_like(prompt.pooled))
