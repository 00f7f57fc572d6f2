"""The model's tokenizer, shared through Redis.

The API holds no model, yet it must count a prompt's tokens as the workers will (to refuse a
prompt over the model's limit with a 422 and to show the count). So a worker, at start,
publishes its tokenizer (the `tokenizer.json` of Hugging Face's `tokenizers`, a few MB) and the
limit; the API reads it back and keeps it until a worker publishes another. Both sides chunk
with app/jobs/prompts.py over the same tokenizer, so their counts are the same.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from tokenizers import Tokenizer

from app.jobs.prompts import Vocabulary


@dataclass(frozen=True)
class PublishedTokenizer:
    model: str
    tokenizer: str  # tokenizer.json
    start: int
    end: int
    pad: int
    comma: int
    max_chunks: int  # the longest prompt a worker encodes, in chunks of 75 tokens
    # Besides the tokenizer, what the API needs of the model: the side of a text-to-image
    # picture whose request gives none (its family's: 512 for SD 1.x, 1024 for SDXL).
    default_side: int = 512
    # Its family ("sd": SD 1.x/2.x, "sdxl"): a refiner must be of its base's.
    family: str = "sd"
    # Textual-inversion embeddings of several vectors: the token a prompt names (its id, as
    # text) read as all of theirs (worker/embeddings.py).
    expansions: dict[str, list[int]] = field(default_factory=dict)
    # The deepest clip skip its text encoders take (their layers; None from an older worker).
    clip_layers: int | None = None

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def fields(self) -> dict[str, str]:
        return {"digest": self.digest, "record": json.dumps(asdict(self))}

    @classmethod
    def parse(cls, record: str) -> PublishedTokenizer:
        """A worker's record; fields a newer worker adds are left out (an API and its workers
        are upgraded one after the other)."""
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in json.loads(record).items() if k in known})

    def vocabulary(self) -> Vocabulary:
        tokenizer = Tokenizer.from_str(self.tokenizer)
        # A saved tokenizer may carry the model's truncation and padding: chunks need neither.
        tokenizer.no_truncation()
        tokenizer.no_padding()

        expansions = {int(first): ids for first, ids in self.expansions.items()}

        def tokenize(text: str) -> list[int]:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            if not expansions:
                return list(ids)
            return [each for i in ids for each in expansions.get(i, [i])]

        return Vocabulary(tokenize, self.start, self.end, self.pad, self.comma)


class PromptMeter:
    """The API's token counter: the published tokenizer, read again only when a worker
    publishes another (one small read per submission to see whether it did)."""

    def __init__(self, digest: Callable[[], str | None], record: Callable[[], str | None]):
        self._digest = digest
        self._record = record
        self._lock = threading.Lock()
        self._known: tuple[str, PublishedTokenizer, Vocabulary] | None = None

    def current(self) -> tuple[PublishedTokenizer, Vocabulary] | None:
        """The workers' tokenizer and its vocabulary; None before any worker published one."""
        digest = self._digest()
        if digest is None:
            return None
        with self._lock:
            if self._known is None or self._known[0] != digest:
                raw = self._record()
                if raw is None:
                    return None
                published = PublishedTokenizer.parse(raw)
                self._known = (digest, published, published.vocabulary())
            return self._known[1], self._known[2]
