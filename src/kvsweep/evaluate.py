"""Perplexity, overall and by position bucket.

A sample of T tokens gives T-1 predictions; the one at position i predicts token i+1 from tokens 0..i.
Perplexity is exp(mean NLL) over all predictions of the samples; a bucket's perplexity is exp(mean NLL)
over the predictions whose position falls in it. Sums are kept in float64 so that bucket NLLs add up to
the total. ``evaluate`` forms the logits ``EVAL_CHUNK`` tokens at a time (``kvsweep.chunked``), so that a batch
of long samples (16 x 2,048 tokens of Pythia's 50k vocabulary: 6.6 GB of float32 logits) costs no more memory
for its logits than a short one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .chunked import linear_nll

EVAL_CHUNK = 4096
"""Tokens whose logits exist at once while a model is evaluated."""


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """NLL of every prediction: logits (B, T, V), ids (B, T) -> (B, T-1) float32."""
    pred = logits[:, :-1, :].float()  # (B, T-1, V): position i predicts token i+1
    target = input_ids[:, 1:].long()  # (B, T-1)
    nll = F.cross_entropy(pred.reshape(-1, pred.size(-1)), target.reshape(-1), reduction="none")
    return nll.view(target.shape)


@dataclass
class PositionStats:
    """NLL sums and prediction counts per position: both (T-1,)."""

    nll_sum: np.ndarray
    tokens: np.ndarray

    @classmethod
    def zeros(cls, seq_len: int) -> "PositionStats":
        return cls(np.zeros(seq_len - 1, dtype=np.float64), np.zeros(seq_len - 1, dtype=np.int64))

    def add(self, nll: torch.Tensor) -> None:
        """Add a batch of per-prediction NLLs (B, T-1)."""
        self.nll_sum += nll.detach().double().sum(0).cpu().numpy()
        self.tokens += nll.shape[0]

    @property
    def total_nll(self) -> float:
        return float(self.nll_sum.sum())

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def ppl(self) -> float:
        return math.exp(self.total_nll / self.total_tokens)

    def buckets(self, ranges: list[tuple[int, int]]) -> list[dict]:
        """``[{lo, hi, ppl, tokens, nll_sum}]`` for ``[lo, hi)`` ranges (clipped to the last position)."""
        out = []
        for lo, hi in ranges:
            nll, n = float(self.nll_sum[lo:hi].sum()), int(self.tokens[lo:hi].sum())
            out.append({"lo": lo, "hi": hi, "ppl": math.exp(nll / n) if n else float("nan"), "tokens": n, "nll_sum": nll})
        return out


@dataclass
class SplitStats:
    """One model's statistics on the validation samples and on the test samples (``None`` without a test set)."""

    val: PositionStats
    test: PositionStats | None = None


@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: np.ndarray, *, batch_size: int = 8) -> PositionStats:
    """Per-position NLL of ``model`` over ``samples`` (N, T), on the model's device, in batches.

    ``model`` is a causal LM whose logits are its output embedding's weight times its base model's last hidden
    states, without a bias (GPT-NeoX's ``embed_out``); the logits are formed ``EVAL_CHUNK`` tokens at a time.
    """
    if len(samples) == 0:
        raise ValueError("evaluate needs at least one sample")
    device = next(model.parameters()).device
    weight = model.get_output_embeddings().weight.detach()  # (V, d)
    stats = PositionStats.zeros(samples.shape[1])
    was_training = model.training
    model.eval()
    for start in range(0, len(samples), batch_size):
        ids = torch.from_numpy(np.array(samples[start : start + batch_size], dtype=np.int64)).to(device)  # (B, T)
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, d), after the final norm
        stats.add(linear_nll(hidden[:, :-1], weight, ids[:, 1:], chunk_rows=EVAL_CHUNK))  # (B, T-1)
    model.train(was_training)
    return stats


def evaluate_splits(model: torch.nn.Module, val: np.ndarray, test: np.ndarray, *, batch_size: int = 8) -> SplitStats:
    """``evaluate`` on the validation samples ``val`` (N_val, E) and, unless it holds none, the test samples ``test``."""
    return SplitStats(evaluate(model, val, batch_size=batch_size), evaluate(model, test, batch_size=batch_size) if len(test) else None)


def unigram_ppl(train_ids: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on ``train_ids``, on ``targets`` (both flat)."""
    counts = np.bincount(train_ids.reshape(-1), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return math.exp(-float(logp[targets.reshape(-1)].mean()))


def format_table(stats: PositionStats, ranges: list[tuple[int, int]], *, title: str = "") -> str:
    """The seed's tables: overall perplexity, then perplexity per position bucket."""
    lines = []
    if title:
        lines.append(title)
    lines += [
        f"Overall perplexity: {stats.ppl:.4f}  ({stats.total_tokens:,} predicted tokens, mean NLL {stats.total_nll / stats.total_tokens:.4f})",
        "",
        "Position-wise perplexity",
        f"| {'positions':>10} | {'PPL':>10} | {'tokens':>10} | {'mean NLL':>8} |",
        f"|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 10}|",
    ]
    for b in stats.buckets(ranges):
        mean = b["nll_sum"] / b["tokens"]
        lines.append(f"| {str(b['lo']) + '-' + str(b['hi']):>10} | {b['ppl']:>10.4f} | {b['tokens']:>10,} | {mean:>8.4f} |")
    return "\n".join(lines)
