"""The offline ``tiny`` preset: a small GPT-NeoX of Pythia's family, pretrained by kvsweep itself.

Its corpus (``kvsweep.corpus``) is the documentation that ships with Python's standard library
(``pydoc_data.topics``, one document per topic) or a text file the user names (``tiny:PATH``). The corpus has a fixed train /
validation / test split; the byte-level BPE tokenizer and the model see only the train split, so the
validation and test splits are held out for the model and for every evaluation of it (``--data tiny``). The
build reports its held-out PPL on the validation split.

The first use builds it (about a minute on 2 CPU cores) into ``$KVSWEEP_CACHE/tiny/<key>/`` with
``save_pretrained`` (model and tokenizer, so ``from_pretrained`` reloads both); later uses load it from
there. The key covers the recipe and the corpus, so changing either builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .archs import neox_config
from .atomic import atomic_path
from .config import KvsweepError, cache_dir
from .corpus import tiny_corpus
from .data import to_windows, tokenize_stream
from .evaluate import evaluate, unigram_ppl

TINY_TOKENS = ("<|endoftext|>", "<|padding|>")  # ids 0 and 1, as in Pythia's tokenizer
RECIPE = {
    "version": 1,
    "vocab_size": 4096,
    "layers": 4,
    "hidden": 128,
    "heads": 4,
    "intermediate": 512,
    "positions": 2048,
    "seq_len": 128,
    "batch_size": 16,
    "epochs": 6,
    "lr": 2e-3,
    "weight_decay": 0.1,
    "seed": 0,
}
MIN_GAIN_OVER_UNIGRAM = 3.0


def tiny_config():
    """The tiny model's ``GPTNeoXConfig``: 4 layers, width 128, 4 heads of 32, Pythia's family."""
    r = RECIPE
    return neox_config(layers=r["layers"], hidden=r["hidden"], heads=r["heads"], intermediate=r["intermediate"],
                       vocab=r["vocab_size"], positions=r["positions"])


def tiny_dir(corpus_path: str | None = None) -> Path:
    """The cache folder of the tiny model for this recipe and corpus."""
    h = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    for split, docs in sorted(tiny_corpus(corpus_path).items()):
        h.update(split.encode())
        for d in docs:
            h.update(d.encode())
            h.update(b"\0")
    return cache_dir() / "tiny" / h.hexdigest()[:16]


def ensure_tiny(corpus_path: str | None = None, *, log: Callable[[str], None] = print) -> Path:
    """The tiny model's folder, built first if it is not in the cache (safe across processes)."""
    folder = tiny_dir(corpus_path)
    if (folder / "tiny.json").is_file():
        return folder
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "tiny.json").is_file():
            with atomic_path(folder) as tmp:
                build_tiny(tmp, corpus_path, log=log)
    return folder


def train_tokenizer(documents, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``documents``, wrapped for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    eos, pad = TINY_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=pad,
                                   model_max_length=RECIPE["positions"])


def build_tiny(out: Path, corpus_path: str | None = None, *, log: Callable[[str], None] = print) -> dict:
    """Train the tokenizer and pretrain the model on the corpus's train split; save both into ``out``."""
    from transformers import GPTNeoXForCausalLM

    r = RECIPE
    t0 = time.perf_counter()
    corpus = tiny_corpus(corpus_path)
    log(f"building the tiny preset (first use; about a minute) from {corpus_path or 'the standard library documentation'}")
    tokenizer = train_tokenizer(corpus["train"], r["vocab_size"])
    train_stream = tokenize_stream(corpus["train"], tokenizer)
    val_stream = tokenize_stream(corpus["validation"], tokenizer)
    train = torch.from_numpy(to_windows(train_stream, r["seq_len"]).astype(np.int64))  # (N, T)
    val = to_windows(val_stream, r["seq_len"])  # (N_val, T)
    if len(train) < r["batch_size"] or len(val) < 1:
        raise KvsweepError(f"tiny corpus too small: {len(train_stream):,} train and {len(val_stream):,} validation tokens; "
                           f"need at least {r['batch_size'] * r['seq_len']:,} and {r['seq_len']:,}")

    torch.manual_seed(r["seed"])
    model = GPTNeoXForCausalLM(tiny_config())
    steps_per_epoch = len(train) // r["batch_size"]
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.95), weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=steps_per_epoch * r["epochs"], pct_start=0.1)
    gen = torch.Generator().manual_seed(r["seed"])
    model.train()
    for epoch in range(1, r["epochs"] + 1):
        order = torch.randperm(len(train), generator=gen)
        for step in range(steps_per_epoch):
            batch = train[order[step * r["batch_size"] : (step + 1) * r["batch_size"]]]  # (B, T)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        stats = evaluate(model, val, batch_size=32)
        log(f"  epoch {epoch}/{r['epochs']}: held-out PPL {stats.ppl:.2f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()

    targets = val[:, 1:]  # the tokens the model predicts: position i predicts token i+1
    uni = unigram_ppl(train_stream, targets, r["vocab_size"])
    ppl = stats.ppl
    seconds = time.perf_counter() - t0
    meta = {
        "recipe": r,
        "corpus": corpus_path or "pydoc_data.topics",
        "train_tokens": int(len(train_stream)),
        "heldout_tokens": int(targets.size),
        "heldout_ppl": ppl,
        "unigram_ppl": uni,
        "gain_over_unigram": uni / ppl,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": seconds,
    }
    log(f"tiny preset: held-out PPL {ppl:.2f} vs unigram {uni:.2f} ({uni / ppl:.1f}x lower) on {targets.size:,} "
        f"held-out tokens; {meta['parameters']:,} parameters; built in {seconds:.0f} s")
    if uni / ppl < MIN_GAIN_OVER_UNIGRAM or not math.isfinite(ppl):
        raise KvsweepError(f"the tiny model did not learn: held-out PPL {ppl:.2f} is not {MIN_GAIN_OVER_UNIGRAM}x below the "
                           f"unigram model's {uni:.2f}; the corpus may be too small")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tiny.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
