"""Model families: how a family's prompts become what its UNet's rows see.

SD 1.x/2.x reads a prompt with one CLIP text encoder: a row's context is its last hidden state.
SDXL reads it with two (its refiner with the second only, worker/xl_prompts.py) and its UNet
takes, beside the context, added conditioning per row: the pooled text embedding and six time
ids (the original size, the crop's top-left corner, the target size; a refiner's five: the size,
the crop and an aesthetic score). Everything else (latents, samplers, the VAE, the loops) is
the same for both: the engine asks its family for each lane's `Conditioning` and hands the
added tensors to the compiled-call boundary row for row with the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from app.jobs.prompts import Syntax, chunks
from app.jobs.vocabulary import PublishedTokenizer
from worker.adapters import Adapters
from worker.components import Components
from worker.devices import on_device
from worker.inputs import ImageSpec
from worker.prompting import Prompt, PromptEncoder, Remembered, prompts_of, publishable
from worker.xl_prompts import XlPrompt, XlPromptEncoder, zeros_like

Size = tuple[int, int]  # (width, height) in pixels

# A1111's and diffusers' aesthetic scores for an SDXL refiner's rows: the prompt's, and the
# negative prompt's (diffusers' `aesthetic_score`, `negative_aesthetic_score` defaults).
AESTHETIC, NEGATIVE_AESTHETIC = 6.0, 2.5
# SDXL's pictures when a text-to-image request gives no size (diffusers' default too); the API
# reads it from what the workers publish.
DEFAULT_SIDE = 1024


@dataclass(frozen=True)
class Conditioning:
    """What one lane's images see of their prompts (or negative prompts), a row per image."""

    context: torch.Tensor  # (images, 77 x chunks, dim)
    # SDXL's added conditioning, by the UNet's names: text_embeds (images, pooled dim) and
    # time_ids (images, 6 or 5). None for SD 1.x/2.x.
    added: dict[str, torch.Tensor] | None = None

    def repeated(self, count: int) -> Conditioning:
        """Each row `count` times in a row (a picture in tiles: a row per tile)."""
        added = None
        if self.added is not None:
            added = {k: v.repeat_interleave(count, 0) for k, v in self.added.items()}
        return Conditioning(self.context.repeat_interleave(count, 0), added)


class Family:
    """SD 1.x/2.x (the x4 upscaler too): one text encoder, no added conditioning."""

    name = "sd"

    def __init__(
        self, parts: Components, max_chunks: int, adapters: Adapters | None = None
    ) -> None:
        self.parts = parts
        self.encoder = PromptEncoder(parts, max_chunks, adapters)
        # The API refuses a clip skip deeper than the text encoder (a 422 naming the field).
        self.published: PublishedTokenizer = replace(self.encoder.published,
                                                     clip_layers=self.clip_layers)  # fmt: skip
        self.vocabulary = self.encoder.vocabulary

    def chunk_count(self, prompt: str, syntax: Syntax) -> int:
        return len(chunks(prompt, syntax, self.vocabulary))

    def forget(self) -> None:
        """Encode every prompt afresh (its LoRAs' files changed)."""
        self.encoder.forget()

    @property
    def clip_layers(self) -> int:
        """The deepest clip skip its text encoders take: their layers (the fewest)."""
        encoders = [
            e for e in (self.parts.text_encoder, self.parts.text_encoder_2) if e is not None
        ]
        return min(int(e.config.num_hidden_layers) for e in encoders)

    def conditioning(
        self, specs: Sequence[ImageSpec], size: Size, negative: bool = False
    ) -> Conditioning:
        """A lane's images' prompts (or negative prompts) as their UNet rows see them, for a
        picture of `size` (a job's images share their prompts, and so their length)."""
        texts = [read(s, negative) for s in specs]
        context = torch.stack(self.contexts(texts, negative))
        return Conditioning(context, self.added(texts, size, negative))

    def contexts(self, texts: Sequence[Prompt], negative: bool = False) -> list[torch.Tensor]:
        """Each prompt's context, (77 x its chunks, dim)."""
        return self.encoder.embeddings(texts)

    def remember(self, jobs: Sequence[Sequence[ImageSpec]]) -> None:
        """Encode the prompts (and, where guided, negative prompts) of these jobs' images
        now, in as few encoder calls as they fill, so that their lanes find them encoded."""
        texts: list[Prompt] = []
        for specs in jobs:
            texts += [read(spec, negative=False) for spec in specs]
            if any(spec.guidance_scale > 1 for spec in specs):  # as the lane reads them
                texts += [read(spec, negative=True) for spec in specs]
        self.contexts(texts)

    def added(
        self, texts: Sequence[Prompt], size: Size, negative: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """The prompts' added conditioning, a row each (none in this family)."""
        return None

    def added_shapes(self) -> dict[str, int]:
        """The added conditioning a row takes: each tensor's width (none in this family)."""
        return {}


class Xl(Family):
    """SDXL's base model (both encoders) and refiner (the second only)."""

    name = "sdxl"

    def __init__(
        self, parts: Components, max_chunks: int, adapters: Adapters | None = None
    ) -> None:
        self.parts = parts
        pairs = [(encoder, tokenizer) for encoder, tokenizer in
                 ((parts.text_encoder, parts.tokenizer),
                  (parts.text_encoder_2, parts.tokenizer_2)) if tokenizer is not None]  # fmt: skip
        assert pairs and parts.text_encoder_2 is not None, "SDXL reads with its second encoder"
        # Both tokenizers cut text alike (one vocabulary); they differ in their padding only.
        self.published = replace(
            publishable(parts.model, pairs[0][1], max_chunks, DEFAULT_SIDE, self.name,
                        parts.expansions),
            clip_layers=self.clip_layers,
        )  # fmt: skip
        self.vocabulary = self.published.vocabulary()
        self.encoder_xl = XlPromptEncoder(
            self.vocabulary,
            [(encoder, tokenizer.pad_token_id) for encoder, tokenizer in pairs],
            parts.device,
            max_chunks,
            adapters,
        )
        self._cache: Remembered[XlPrompt] = Remembered(parts.reading, parts.device)
        # diffusers' SDXL pipelines: no negative prompt is zeros, not the encoding of "" (the
        # base model's setting; its refiner encodes "").
        self.zeros_for_empty = bool(parts.options.get("force_zeros_for_empty_prompt", True))
        self.aesthetic = bool(parts.options.get("requires_aesthetics_score", False))
        unet = parts.unet.config
        self.pooled_width = int(parts.text_encoder_2.config.projection_dim)
        self.time_ids = (unet.projection_class_embeddings_input_dim - self.pooled_width) // int(
            unet.addition_time_embed_dim
        )

    def forget(self) -> None:
        self._cache.clear()

    def prompts(self, texts: Sequence[Prompt], negative: bool) -> list[XlPrompt]:
        prompts = prompts_of(texts)
        encoded = self._cache.each(prompts, self.encoder_xl.encode)
        if negative and self.zeros_for_empty:
            encoded = [zeros_like(e) if text == "" else e
                       for e, (text, *_) in zip(encoded, prompts, strict=True)]  # fmt: skip
        return encoded

    def conditioning(
        self, specs: Sequence[ImageSpec], size: Size, negative: bool = False
    ) -> Conditioning:
        texts = [read(s, negative) for s in specs]
        encoded = self.prompts(texts, negative)  # once for the context and the pooled rows
        context = torch.stack([e.context for e in encoded])
        return Conditioning(context, self._added(encoded, size, negative))

    def contexts(self, texts: Sequence[Prompt], negative: bool = False) -> list[torch.Tensor]:
        return [e.context for e in self.prompts(texts, negative)]

    def added(
        self, texts: Sequence[Prompt], size: Size, negative: bool = False
    ) -> dict[str, torch.Tensor] | None:
        return self._added(self.prompts(texts, negative), size, negative)

    def _added(
        self, encoded: Sequence[XlPrompt], size: Size, negative: bool
    ) -> dict[str, torch.Tensor]:
        pooled = torch.stack([e.pooled for e in encoded])
        ids = on_device([self.time_ids_of(size, negative)], pooled.dtype, pooled.device)
        return {"text_embeds": pooled, "time_ids": ids.expand(len(encoded), -1)}

    def time_ids_of(self, size: Size, negative: bool) -> list[float]:
        """diffusers' defaults: the original and target size are the picture's, the crop at
        (0, 0); a refiner's fifth id is the aesthetic score."""
        width, height = size
        if self.aesthetic:
            return [height, width, 0, 0, NEGATIVE_AESTHETIC if negative else AESTHETIC]
        return [height, width, 0, 0, height, width]

    def added_shapes(self) -> dict[str, int]:
        return {"text_embeds": self.pooled_width, "time_ids": self.time_ids}


def read(spec: ImageSpec, negative: bool) -> Prompt:
    """An image's prompt (or negative prompt) as it is encoded. Clip skip reads the prompt
    only, as diffusers' `clip_skip` does: the negative prompt is read at the model's own layer
    (A1111 reads both at it)."""
    if negative:
        return Prompt(spec.negative_prompt, spec.syntax, 1, spec.loras)
    return Prompt(spec.prompt, spec.syntax, spec.clip_skip, spec.loras)


def joined(
    parts: Sequence[dict[str, torch.Tensor] | None],
) -> dict[str, torch.Tensor] | None:
    """Added conditioning of several row groups, laid end to end in their order; None when
    the rows take none."""
    present = [part for part in parts if part is not None]
    if not present:
        return None
    assert len(present) == len(parts), "rows of one UNet call are all of one family"
    return {name: torch.cat([part[name] for part in present]) for name in present[0]}


def family_of(parts: Components, max_chunks: int, adapters: Adapters | None = None) -> Family:
    kind = Xl if parts.family == "sdxl" else Family
    return kind(parts, max_chunks, adapters)
