"""Textual-inversion embeddings (issue 23, 4): names a prompt may use, each standing for learned
vectors in the text encoders' token table.

As diffusers' `load_textual_inversion` does it: an embedding of n vectors named `name` adds the
tokens `name`, `name_1` ... `name_{n-1}` to the tokenizer and their vectors to the text
encoder's token embeddings (an SDXL embedding: its `clip_l` vectors to the first encoder, its
`clip_g` to the second); a prompt that says `name` reads all n (diffusers' `maybe_convert_prompt`;
here `expansions`, published with the tokenizer, so the API counts the same tokens). Only token
ids change between prompts: rows with different embeddings share every UNet call.

Files: A1111's `.pt` (`string_to_param`, read with `torch.load(weights_only=True)`: no pickled
code runs) and `.safetensors` (`emb_params`; SDXL's `clip_l` / `clip_g`), and diffusers'
(`{token: vectors}`, `.bin` or `.safetensors`). A file whose vectors fit none of the model's
encoders, or whose name is a token already, is skipped, and said (A1111's `skipped`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from worker.components import Components

log = logging.getLogger("sdserve.embeddings")

SUFFIXES = (".pt", ".bin", ".safetensors")
ENCODERS = ("text_encoder", "text_encoder_2")


# How A1111's list shows a file that is no embedding at all.
UNREADABLE = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 0,
              "vectors": 0}  # fmt: skip


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: dict[str, torch.Tensor]  # by encoder: (n, width)
    step: int | None = None  # A1111's training step and checkpoint, where the file says
    checkpoint: str | None = None

    @property
    def count(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    def described(self, shape: int) -> dict[str, Any]:
        """As A1111's `/sdapi/v1/embeddings` lists one."""
        return {"step": self.step, "sd_checkpoint": None, "sd_checkpoint_name": self.checkpoint,
                "shape": shape, "vectors": self.count}  # fmt: skip


def read_embedding(path: Path) -> Embedding:
    """An embedding file, as its name's vectors. Raises ValueError for one that is not."""
    name = path.stem
    if path.suffix == ".safetensors":
        raw: dict[str, Any] = load_file(str(path))
    else:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise ValueError("not an embedding")
    step, checkpoint = raw.get("step"), raw.get("sd_checkpoint_name")
    if "clip_l" in raw and "clip_g" in raw:  # SDXL's, A1111's layout
        vectors = {"text_encoder": raw["clip_l"], "text_encoder_2": raw["clip_g"]}
    elif "string_to_param" in raw:  # A1111's .pt
        vectors = {"text_encoder": next(iter(raw["string_to_param"].values()))}
    elif "emb_params" in raw:  # A1111's .safetensors
        vectors = {"text_encoder": raw["emb_params"]}
    else:  # diffusers': {token: vectors}
        tensors = [v for v in raw.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ValueError("not an embedding (no A1111 or diffusers layout)")
        vectors = {"text_encoder": tensors[0]}
    out = {}
    for encoder, tensor in vectors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2):
            raise ValueError("not an embedding (vectors of another shape)")
        out[encoder] = tensor.detach().float().reshape(-1, tensor.shape[-1])
    return Embedding(name, out, step if isinstance(step, int) else None,
                     checkpoint if isinstance(checkpoint, str) else None)  # fmt: skip


@dataclass
class Embeddings:
    """A model's embeddings: what its tokenizers and encoders were given, and what not."""

    folder: Path
    loaded: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, dict[str, Any]] = field(default_factory=dict)
    # A multi-vector embedding's first token id -> all its ids, as a prompt reads them.
    expansions: dict[int, list[int]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)  # A1111's short hash, by name

    def install(self, parts: Components) -> int:
        """Give the model the folder's embeddings it has not yet (at start, and when
        refresh-embeddings asks); returns how many were added."""
        pairs = {name: (getattr(parts, name), getattr(parts, name.replace("text_encoder",
                                                                           "tokenizer")))
                 for name in ENCODERS if getattr(parts, name) is not None}  # fmt: skip
        tokenizers = [t for _e, t in pairs.values() if t is not None]
        added = 0
        files = sorted(p for p in self.folder.glob("*") if p.suffix in SUFFIXES and p.is_file())
        # The files skipped are read again (one replaced, or copied in whole since a scan that
        # met it half-written, loads now; one removed is no longer listed), as A1111 does.
        self.skipped = {}
        for path in files:
            name = path.stem
            if name in self.loaded:
                continue
            try:
                embedding = read_embedding(path)
            except Exception as e:  # a file we cannot read: said, skipped
                log.warning("embedding %s skipped: %s", path.name, str(e)[-800:])
                self.skipped[name] = UNREADABLE
                continue
            problem = self._problem(embedding, pairs, tokenizers)
            first = next(iter(embedding.vectors.values()))
            if problem is not None:
                log.warning("embedding %s skipped: %s", name, problem)
                self.skipped[name] = embedding.described(int(first.shape[1]))
                continue
            tokens = [name] + [f"{name}_{k}" for k in range(1, embedding.count)]
            for tokenizer in tokenizers:
                tokenizer.add_tokens(tokens)
            ids = tokenizers[0].convert_tokens_to_ids(tokens)
            assert all(t.convert_tokens_to_ids(tokens) == ids for t in tokenizers), (
                "both tokenizers give the embedding the same ids"
            )
            for encoder_name, (encoder, _tokenizer) in pairs.items():
                vectors = embedding.vectors[encoder_name]
                encoder.resize_token_embeddings(len(tokenizers[0]))
                table = encoder.get_input_embeddings().weight
                with torch.no_grad():
                    table[ids] = vectors.to(table.device, table.dtype)
            if len(ids) > 1:
                self.expansions[ids[0]] = ids
            self.loaded[name] = embedding.described(int(first.shape[1]))
            self.hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            added += 1
            log.info("embedding %s: %d vectors", name, embedding.count)
        return added

    @staticmethod
    def _problem(embedding: Embedding, pairs: dict[str, tuple[Any, Any]],
                 tokenizers: list[Any]) -> str | None:  # fmt: skip
        """Why the model cannot take it (None: it can)."""
        if set(embedding.vectors) != set(pairs):
            return f"vectors for {', '.join(embedding.vectors)}; the model has {', '.join(pairs)}"
        for encoder_name, (encoder, _t) in pairs.items():
            width = int(encoder.get_input_embeddings().weight.shape[1])
            have = int(embedding.vectors[encoder_name].shape[1])
            if have != width:
                return f"{have}-wide vectors; {encoder_name} takes {width}"
        vocabulary = tokenizers[0].get_vocab()
        if embedding.name in vocabulary:
            return "its name is a token of the vocabulary already"
        return None

    def used(self, *texts: str) -> dict[str, str]:
        """The short hashes of the embeddings these prompts use (A1111's `TI hashes`)."""
        return {name: digest for name, digest in self.hashes.items()
                if any(name in text for text in texts)}  # fmt: skip
