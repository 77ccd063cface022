"""The tiny preset's corpus: text that ships with Python, or a text file the user names.

Built-in: the documentation of Python's standard library (``pydoc_data.topics``, one document per
topic). The corpus has a fixed train / validation split; ``kvsweep.tiny`` trains the tiny model's
tokenizer and weights on the train split only, and ``kvsweep.data`` serves both splits (``--data tiny``).
Needs no torch.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from .config import KvsweepError


@lru_cache(maxsize=4)
def tiny_corpus(path: str | None = None) -> dict[str, tuple[str, ...]]:
    """``{"train": [...], "validation": [...]}`` documents of the tiny corpus.

    Built-in: the standard library's documentation topics, one document each; about a tenth of the
    characters, whole topics picked by a fixed hash of their names, is validation. A user's text file: its lines, cut at a line boundary so that the last
    tenth of the characters is validation; each part is one document.
    """
    if path:
        text = Path(path).read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        if len(lines) < 2:
            raise KvsweepError(f"tiny corpus {path} needs at least two lines (train and validation text)")
        cut, seen, target = len(lines) - 1, 0, 0.9 * len(text)
        for i, line in enumerate(lines):
            seen += len(line)
            if seen >= target:
                cut = min(max(i + 1, 1), len(lines) - 1)
                break
        return {"train": ("".join(lines[:cut]),), "validation": ("".join(lines[cut:]),)}
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split pydoc_data off the standard library
        raise KvsweepError("the tiny corpus needs pydoc_data (part of CPython's standard library); "
                           "install your distribution's full Python, or use tiny:PATH with a text file") from e
    # Topics in a fixed pseudo-random order (by the SHA-256 of their names); the first ones, up to a
    # tenth of the characters, are validation.
    names = sorted(topics, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    total, held, val = sum(len(t) for t in topics.values()), 0, set()
    for n in names:
        if held >= 0.1 * total:
            break
        val.add(n)
        held += len(topics[n])
    return {
        "train": tuple(topics[n] for n in sorted(topics) if n not in val),
        "validation": tuple(topics[n] for n in sorted(topics) if n in val),
    }
