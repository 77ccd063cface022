"""The tiny preset's corpus: text that ships with Python, or a text file the user names.

Built-in: the documentation of Python's standard library (``pydoc_data.topics``, one document per
topic). The corpus has a fixed train / validation / test split of whole topics; ``kvsweep.tiny`` trains
the tiny model's tokenizer and weights on the train split only, so that validation and test are held out
for the model too, and ``kvsweep.data`` serves the three splits (``--data tiny``). Needs no torch.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from .config import KvsweepError

HELD_OUT = 0.1
"""The fraction of the corpus's characters in each held-out split (validation, then test)."""


@lru_cache(maxsize=4)
def tiny_corpus(path: str | None = None) -> dict[str, tuple[str, ...]]:
    """``{"train": (...), "validation": (...), "test": (...)}`` documents of the tiny corpus.

    Built-in: the standard library's documentation topics, one document each, in a fixed pseudo-random
    order (by the SHA-256 of their names): the first topics, until they hold a tenth of the characters, are
    validation (the same topics as before the test split existed); of the topics after them, those that fit
    into another tenth are test; the rest train. The three hold disjoint, whole topics. A user's text file: its lines, cut at line boundaries so that the last two tenths of the
    characters are validation and then test; each part is one document.
    """
    if path:
        text = Path(path).read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        if len(lines) < 3:
            raise KvsweepError(f"tiny corpus {path} needs at least three lines (train, validation and test text)")
        val_at = _cut(lines, (1 - 2 * HELD_OUT) * len(text), 1, len(lines) - 2)
        test_at = _cut(lines, (1 - HELD_OUT) * len(text), val_at + 1, len(lines) - 1)
        return {"train": ("".join(lines[:val_at]),), "validation": ("".join(lines[val_at:test_at]),),
                "test": ("".join(lines[test_at:]),)}
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split pydoc_data off the standard library
        raise KvsweepError("the tiny corpus needs pydoc_data (part of CPython's standard library); "
                           "install your distribution's full Python, or use tiny:PATH with a text file") from e
    names = sorted(topics, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    total, split, held = sum(len(t) for t in topics.values()), {}, {"validation": 0, "test": 0}
    for n in names:
        if held["validation"] < HELD_OUT * total:  # validation: the first topics, until a tenth is reached
            part = "validation"
        elif held["test"] + len(topics[n]) <= HELD_OUT * total:  # test: the next ones that fit in a tenth
            part = "test"
        else:
            continue
        split[n] = part
        held[part] += len(topics[n])
    return {part: tuple(topics[n] for n in sorted(topics) if split.get(n, "train") == part) for part in ("train", "validation", "test")}


def _cut(lines: list[str], chars: float, low: int, high: int) -> int:
    """The first line index at which at least ``chars`` characters lie before it, kept in ``low..high``."""
    seen = 0
    for i, line in enumerate(lines):
        seen += len(line)
        if seen >= chars:
            return min(max(i + 1, low), high)
    return high
