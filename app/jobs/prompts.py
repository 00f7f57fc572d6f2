"""Prompts as CLIP reads them: A1111's emphasis syntax, and chunks of 75 tokens.

CLIP reads 77 tokens: a start token, 75 of text, an end token. A longer prompt is cut into
chunks of 75, each encoded alone and the embeddings laid end to end (what A1111 does), so
nothing past the 75th token is lost. Both sides use this module: the API to count a prompt's
tokens and refuse one over the model's limit, the worker to build the chunks it encodes, so
the two never disagree. No torch here: the tokenizer is any `text -> ids` function.

Emphasis (the `a1111` syntax): `(a)` weighs `a` 1.1 times, `[a]` 1/1.1 times, `(a:1.3)` 1.3
times, nested brackets multiply, `\\(` is a literal bracket, and `BREAK` starts a new chunk.
A bracket left open weighs to the end of the prompt, as in A1111. The `plain` syntax reads
every character as text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Syntax = Literal["plain", "a1111"]
CHUNK = 75  # text tokens per chunk; with the start and end tokens, CLIP's 77
# A full chunk is cut after its last comma when that comma is this close to the end, so a
# phrase is not split between two chunks (A1111's default).
COMMA_BACKTRACK = 20
UP, DOWN = 1.1, 1 / 1.1

# One piece of an emphasized prompt: an escape, a bracket, a `:weight)` closing, a colon that
# is text, or a run of plain text.
_PIECE = re.compile(
    r"\\[\\()\[\]]|\\|\(|\[|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
# A1111's prompt editing, `[from:to:when]`, `[to:when]`, `[from::when]` (the text changes at a
# step), and alternation, `[a|b]` (it changes every step): a square bracket whose text ends in
# `:number` or holds a `|`. And composable prompts, `a AND b` (several prompts combined).
_SQUARE = re.compile(r"\[([^\[\]]*)\]")
_WHEN = re.compile(r":\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*$")
_AND = re.compile(r"\bAND\b")


def changing(prompt: str, composable: bool = True) -> str | None:
    """The first piece of the prompt that A1111 reads as a prompt that changes during the
    steps (editing, alternation) or, with `composable`, as several prompts (`AND`); None when
    there is none. Not served (a row's prompt is encoded once, as one prompt), so refused where
    the A1111 syntax is read, rather than read as emphasized words: A1111 would draw another
    picture. (A1111 reads `AND` in a positive prompt only.)"""
    text = re.sub(r"\\.", "__", prompt)  # escaped characters are text; spans keep their place
    while True:
        for group in _SQUARE.finditer(text):
            if _WHEN.search(group.group(1)) or "|" in group.group(1):
                return prompt[group.start() : group.end()]
        outer = _SQUARE.sub(lambda group: "_" * len(group.group(0)), text)  # the next level
        if outer == text:
            break
        text = outer
    found = _AND.search(text) if composable else None
    return found.group(0) if found else None


@dataclass(frozen=True)
class Fragment:
    """Text with its weight; `breaks` marks a BREAK (no text: the chunk ends there)."""

    text: str
    weight: float = 1.0
    breaks: bool = False


@dataclass
class _Piece:
    text: str
    weight: float = 1.0
    breaks: bool = False


def fragments(prompt: str, syntax: Syntax) -> list[Fragment]:
    """The prompt as weighted pieces of text, adjacent pieces of one weight merged."""
    if syntax == "plain":
        return [Fragment(prompt)]
    pieces: list[_Piece] = []
    rounds: list[int] = []  # where each open `(` began, in `pieces`
    squares: list[int] = []

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece.weight *= factor

    for match in _PIECE.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\") and len(text) == 2:
            pieces.append(_Piece(text[1]))
        elif text == "(":
            rounds.append(len(pieces))
        elif text == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            weigh(rounds.pop(), float(weight))
        elif text == ")" and rounds:
            weigh(rounds.pop(), UP)
        elif text == "]" and squares:
            weigh(squares.pop(), DOWN)
        else:
            for k, part in enumerate(_BREAK.split(text)):
                if k:
                    pieces.append(_Piece("", breaks=True))
                if part:
                    pieces.append(_Piece(part))
    for start in rounds:
        weigh(start, UP)
    for start in squares:
        weigh(start, DOWN)
    merged: list[Fragment] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if last and not (last.breaks or piece.breaks) and last.weight == piece.weight:
            merged[-1] = Fragment(last.text + piece.text, piece.weight)
        else:
            merged.append(Fragment(piece.text, piece.weight, piece.breaks))
    return merged or [Fragment("")]


@dataclass
class Chunk:
    """Up to 75 text tokens and their weights (start, end and padding not included)."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Vocabulary:
    """What chunking needs of a tokenizer: text to ids (no special tokens), and the ids of the
    start, end, padding and comma tokens."""

    tokenize: Callable[[str], list[int]]
    start: int
    end: int
    pad: int
    comma: int


def chunks(prompt: str, syntax: Syntax, vocabulary: Vocabulary) -> list[Chunk]:
    """The prompt's chunks, at least one (an empty prompt is one empty chunk)."""
    done: list[Chunk] = []
    current = Chunk()
    comma = -1  # where the current chunk's last comma is

    def close(keep: int) -> Chunk:
        """End the current chunk after `keep` tokens; what follows starts the next."""
        nonlocal comma
        done.append(Chunk(current.ids[:keep], current.weights[:keep]))
        comma = -1
        return Chunk(current.ids[keep:], current.weights[keep:])

    for piece in fragments(prompt, syntax):
        if piece.breaks:
            current = close(len(current.ids))
            continue
        for token in vocabulary.tokenize(piece.text) if piece.text else []:
            if len(current.ids) == CHUNK:
                near = comma >= 0 and CHUNK - comma <= COMMA_BACKTRACK
                current = close(comma + 1 if near and token != vocabulary.comma else CHUNK)
            if token == vocabulary.comma:
                comma = len(current.ids)
            current.ids.append(token)
            current.weights.append(piece.weight)
    if current.ids or not done:
        done.append(current)
    return done


def token_ids(chunk: Chunk, vocabulary: Vocabulary) -> tuple[list[int], list[float]]:
    """A chunk as CLIP reads it, 77 ids: start, text, end, padding (for a prompt of 75 tokens
    or fewer, exactly what the tokenizer gives with padding to its maximum), with a weight per
    id (1 for all but the text)."""
    padding = CHUNK - len(chunk.ids)
    ids = [vocabulary.start, *chunk.ids, vocabulary.end, *[vocabulary.pad] * padding]
    weights = [1.0, *chunk.weights, 1.0, *[1.0] * padding]
    return ids, weights


def count(prompt: str, syntax: Syntax, vocabulary: Vocabulary) -> tuple[int, int]:
    """(text tokens, chunks) of a prompt."""
    pieces = chunks(prompt, syntax, vocabulary)
    return sum(len(c.ids) for c in pieces), len(pieces)
