"""Prompt encoding (diffusers' `encode_prompt`): CLIP embeddings of prompts in chunks of 75
tokens, weighted where A1111's syntax weighs them, cached for repeated prompts."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from threading import Lock
from typing import Any, Generic, NamedTuple, TypeVar

import torch

from app.jobs.prompts import Chunk, Syntax, Vocabulary, chunks, token_ids
from app.jobs.vocabulary import PublishedTokenizer
from worker.adapters import Adapters, LoraUse
from worker.components import Components
from worker.devices import Handover, on_device

# Prompts are encoded in chunks of this many rows (padded), so that a prompt's embedding does
# not depend on how many other prompts arrived with it.
ENCODE_CHUNK = 8
EMBEDDING_CACHE_SIZE = 512


class PromptTooLong(ValueError):
    """A prompt of more chunks of 75 tokens than the engine encodes."""


def publishable(
    model: str,
    tokenizer: Any,
    max_chunks: int,
    default_side: int = 512,
    family: str = "sd",
    expansions: dict[int, list[int]] | None = None,
) -> PublishedTokenizer:
    """The tokenizer as the API reads it (app/jobs/vocabulary.py); chunks are cut with it in
    the worker too, so both sides count alike."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    if not isinstance(comma, int) or comma == tokenizer.unk_token_id:
        comma = tokenizer(",", add_special_tokens=False).input_ids[-1]
    return PublishedTokenizer(
        model=model,
        tokenizer=tokenizer.backend_tokenizer.to_str(),
        start=tokenizer.bos_token_id,
        end=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        comma=comma,
        max_chunks=max_chunks,
        default_side=default_side,
        family=family,
        expansions={str(first): ids for first, ids in (expansions or {}).items()},
    )


class PromptEncoder:
    """SD 1.x/2.x: one CLIP text encoder, whose last hidden state is a row's context."""

    def __init__(
        self, parts: Components, max_chunks: int, adapters: Adapters | None = None
    ) -> None:
        assert parts.tokenizer is not None, "SD 1.x/2.x models have a text encoder"
        self.parts = parts
        self.adapters = adapters
        self.max_chunks = max_chunks
        self.published = publishable(parts.model, parts.tokenizer, max_chunks,
                                     expansions=parts.expansions)  # fmt: skip
        self.vocabulary = self.published.vocabulary()
        self._cache: Remembered[torch.Tensor] = Remembered(parts.reading, parts.device)

    def encode(self, prompts: Sequence[str], syntax: Syntax = "plain") -> torch.Tensor:
        """CLIP embeddings of prompts of one length in chunks, (len(prompts), 77 x chunks,
        dim)."""
        return torch.stack(self.embeddings([(p, syntax) for p in prompts]))

    def chunk_count(self, prompt: str, syntax: Syntax) -> int:
        return len(chunks(prompt, syntax, self.vocabulary))

    def forget(self) -> None:
        self._cache.clear()

    def embeddings(self, prompts: Sequence[tuple[str, Syntax] | Prompt]) -> list[torch.Tensor]:
        """Each prompt's CLIP embeddings, (77 x chunks, dim): its chunks of 75 tokens encoded
        alone, weighted where the syntax weighs them, laid end to end (what A1111 does; a
        prompt of one chunk is exactly diffusers' encoding). Repeated prompts come from the
        cache. Raises PromptTooLong (encoding nothing) for a prompt over the limit."""
        return self._cache.each(prompts_of(prompts), self._encode)

    def _encode(self, prompts: list[Prompt]) -> list[torch.Tensor]:
        rows: list[Row] = []
        skips: list[int] = []
        loras: list[tuple[LoraUse, ...]] = []
        counts = []
        for text, syntax, skip, uses in prompts:
            pieces = chunks(text, syntax, self.vocabulary)
            if len(pieces) > self.max_chunks:
                raise PromptTooLong(
                    f"a prompt of {len(pieces)} chunks of 75 tokens; this worker encodes at"
                    f" most {self.max_chunks}"
                )
            rows += [token_ids(piece, self.vocabulary) for piece in pieces]
            skips += [skip] * len(pieces)
            loras += [uses] * len(pieces)
            counts.append(len(pieces))
        hidden = self._encode_rows(rows, skips, loras)
        out, at = [], 0
        for count in counts:
            out.append(torch.cat(hidden[at : at + count]))
            at += count
        return out

    def _encode_rows(
        self, rows: list[Row], skips: list[int], loras: list[tuple[LoraUse, ...]]
    ) -> list[torch.Tensor]:
        """CLIP's last hidden state per chunk of 77 ids (with a clip skip of n, the states n - 1
        layers before the last, through the final layer norm, as diffusers' `clip_skip` n - 1
        takes them), in fixed batches of ENCODE_CHUNK rows (padded with empty chunks), so that a
        chunk's embedding does not depend on how many others came with it. Weighted chunks are
        scaled token by token, then brought back to their unweighted mean (as A1111 does), so
        emphasis shifts attention between words without making the whole prompt louder."""
        hidden: list[torch.Tensor] = []
        encoder = self.parts.text_encoder
        # transformers 5 has the layer norm on the model, earlier ones on its `text_model`.
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
        deep = any(skip > 1 for skip in skips)
        at = 0
        for batch, ids in fixed_batches(rows, self.vocabulary, self.parts.device):
            with text_loras(self.adapters, loras[at : at + len(batch)]):
                output = encoder(ids, output_hidden_states=deep)
            for k, (_ids, weights) in enumerate(batch):
                skip = skips[at + k]
                state = output[0][k]
                if skip > 1:
                    state = final_norm(output.hidden_states[-skip][k])
                hidden.append(weighed(state, weights))
            at += len(batch)
        return hidden


Row = tuple[list[int], list[float]]  # a chunk's 77 ids and their weights


class Prompt(NamedTuple):
    """A prompt as it is encoded, and remembered: its text, how it reads, the text encoder's
    layer whose states it takes (A1111's clip skip: 1 the last, 2 the one before), and the
    LoRAs its encoders read it with."""

    text: str
    syntax: Syntax = "plain"
    clip_skip: int = 1
    loras: tuple[LoraUse, ...] = ()


def prompts_of(texts: Sequence[tuple[str, Syntax] | Prompt]) -> list[Prompt]:
    """Prompts from (text, syntax) pairs (clip skip 1) or Prompts."""
    return [Prompt(*text) for text in texts]


@contextmanager
def text_loras(adapters: Adapters | None, rows: list[tuple[LoraUse, ...]]) -> Iterator[None]:
    """The text encoders' calls inside read each row's LoRAs (where LoRAs are served)."""
    if adapters is None:
        yield
        return
    with adapters.text(rows):
        yield


V = TypeVar("V")


class Remembered(Generic[V]):
    """The encodings of the last EMBEDDING_CACHE_SIZE prompts: a prompt met again (the negative
    prompt most users share, a retried job) is not encoded again.

    Two threads use it: the loop's reads a lane's prompts at its join, and the prompt reader
    (worker/continuous.py) reads the prompts of jobs just taken, so that the join finds them
    here. Encodes run one at a time under `reading` (the components' lock: the text encoders'
    LoRA rows and token table are shared state); a thread whose prompts are all here never
    waits for another's encode."""

    def __init__(
        self, reading: Lock, device: torch.device | None = None, size: int = EMBEDDING_CACHE_SIZE
    ) -> None:
        self.reading = reading
        # The two threads' encoder calls in order on the GPU too (worker/devices.py).
        self.handover = Handover(device or torch.device("cpu"))
        self.size = size
        self._items: OrderedDict[Prompt, V] = OrderedDict()
        self._guard = Lock()  # the dictionary's (held for moments, never across an encode)
        # Bumped by `clear`: an encode that began before it is not remembered after it.
        self._generation = 0

    def clear(self) -> None:
        """Forget everything (any thread may ask)."""
        with self._guard:
            self._items.clear()
            self._generation += 1

    def each(self, prompts: Sequence[Prompt], encode: Callable[[list[Prompt]], list[V]]) -> list[V]:
        """Each prompt's encoding, `encode` called once for those not remembered."""
        found = self._found(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in found))
        if missing:
            with self.reading:
                found |= self._found(missing)  # encoded meanwhile by the other thread
                missing = [p for p in missing if p not in found]
                if missing:
                    with self._guard:
                        generation = self._generation
                    self.handover.before()
                    encoded = dict(zip(missing, encode(missing), strict=True))
                    self.handover.after(encoded.values())
                    found |= encoded
                    with self._guard:
                        if generation == self._generation:
                            self._items.update(encoded)
                        while len(self._items) > self.size:
                            self._items.popitem(last=False)
        return [found[p] for p in prompts]

    def _found(self, prompts: Sequence[Prompt]) -> dict[Prompt, V]:
        with self._guard:
            found = {p: self._items[p] for p in prompts if p in self._items}
            for p in found:
                self._items.move_to_end(p)
            return found


def fixed_batches(
    rows: list[Row], vocabulary: Vocabulary, device: torch.device
) -> Iterator[tuple[list[Row], torch.Tensor]]:
    """The rows in batches of ENCODE_CHUNK, each padded with empty chunks, and its ids on the
    device: a chunk's encoding never depends on how many others came with it."""
    empty = token_ids(Chunk(), vocabulary)
    for start in range(0, len(rows), ENCODE_CHUNK):
        batch = rows[start : start + ENCODE_CHUNK]
        padded = batch + [empty] * (ENCODE_CHUNK - len(batch))
        yield batch, on_device([r[0] for r in padded], torch.long, device)


def weighed(state: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A chunk's hidden states with its words' weights applied (`emphasized`); as they are when
    every weight is 1."""
    if all(w == 1 for w in weights):
        return state
    scale = on_device(weights, torch.float32, state.device)
    return emphasized(state.to(torch.float32), scale).to(state.dtype)


def emphasized(plain: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A chunk's hidden states (tokens, dim) weighted token by token, then brought back to their
    unweighted mean, as A1111 does. Where the weighted mean is next to nothing (final layer
    norms without bias, as random models have; weights that cancel) the ratio of the means is
    noise, and a negative one flips every sign: then the weights stand alone."""
    weighted = plain * weights[:, None]
    mean = weighted.mean()
    ratio = plain.mean() / mean
    sound = torch.isfinite(ratio) & (ratio > 0) & (mean.abs() > 1e-3 * weighted.abs().mean())
    return torch.where(sound, weighted * ratio, weighted)
