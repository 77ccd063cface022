"""Perplexity: overall and per position bucket, against the model's own ``labels`` loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvsweep.config import position_buckets
from kvsweep.evaluate import PositionStats, evaluate, format_table, token_nll, unigram_ppl


def _samples(n: int, T: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, T), dtype=np.int32)


def test_ppl_matches_the_models_labels_loss(small_model):
    ids = _samples(6, 40, 320)
    stats = evaluate(small_model, ids, batch_size=6)
    with torch.no_grad():
        loss = small_model(input_ids=torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long()).loss
    assert stats.total_tokens == 6 * 39
    assert stats.ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_long_samples_never_form_the_logits_of_a_whole_batch(small_model, monkeypatch):
    from kvsweep import evaluate as kevaluate

    monkeypatch.setattr(kevaluate, "EVAL_CHUNK", 100)  # fewer tokens than one sample's predictions
    ids = _samples(3, 256, 320)
    small_model.get_output_embeddings().register_forward_hook(lambda *a: pytest.fail("formed the full logits"))
    stats = evaluate(small_model, ids, batch_size=3)
    with torch.no_grad():
        hidden = small_model.gpt_neox(input_ids=torch.from_numpy(ids).long()).last_hidden_state
        logits = hidden @ small_model.get_output_embeddings().weight.T  # (3, 256, V)
    assert stats.total_nll == pytest.approx(float(token_nll(logits, torch.from_numpy(ids)).double().sum()), rel=1e-5)


def test_batching_does_not_change_the_result(small_model):
    ids = _samples(7, 33, 320)
    a, b = evaluate(small_model, ids, batch_size=7), evaluate(small_model, ids, batch_size=2)
    np.testing.assert_allclose(a.nll_sum, b.nll_sum, rtol=1e-5)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_position_i_predicts_token_i_plus_1(small_model):
    ids = torch.from_numpy(_samples(3, 20, 320)).long()
    with torch.no_grad():
        logits = small_model(input_ids=ids).logits
    nll = token_nll(logits, ids)
    assert nll.shape == (3, 19)
    for i in (0, 7, 18):
        expected = F.cross_entropy(logits[:, i, :], ids[:, i + 1], reduction="none")
        torch.testing.assert_close(nll[:, i], expected)
    # position 0 sees only token 0: changing later tokens leaves its NLL alone
    ids2 = ids.clone()
    ids2[:, 2:] = (ids2[:, 2:] + 1) % 320
    with torch.no_grad():
        nll2 = token_nll(small_model(input_ids=ids2).logits, ids2)
    torch.testing.assert_close(nll2[:, 0], nll[:, 0])


def test_bucket_nlls_add_up_to_the_total(small_model):
    T = 128
    stats = evaluate(small_model, _samples(4, T, 320), batch_size=4)
    buckets = stats.buckets(position_buckets(T))
    assert [(b["lo"], b["hi"]) for b in buckets] == [(0, 16), (16, 32), (32, 64), (64, 96), (96, 128)]
    assert [b["tokens"] for b in buckets] == [4 * 16, 4 * 16, 4 * 32, 4 * 32, 4 * 31]  # 96..126 in the last
    assert sum(b["tokens"] for b in buckets) == stats.total_tokens == 4 * 127
    assert sum(b["nll_sum"] for b in buckets) == pytest.approx(stats.total_nll, rel=1e-12)
    for b in buckets:
        assert b["ppl"] == pytest.approx(math.exp(b["nll_sum"] / b["tokens"]))


def test_bucket_ppl_matches_a_direct_computation(small_model):
    ids = torch.from_numpy(_samples(5, 64, 320, seed=3)).long()
    with torch.no_grad():
        loss = small_model(input_ids=ids).logits
    nll = F.cross_entropy(loss[:, 16:31, :].reshape(-1, 320), ids[:, 17:32].reshape(-1))  # positions 16..30
    stats = evaluate(small_model, ids.int().numpy(), batch_size=2)
    (bucket,) = stats.buckets([(16, 31)])
    assert bucket["tokens"] == 5 * 15
    assert bucket["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_unigram_ppl_by_hand():
    train = np.array([0, 0, 1])  # counts + 1: [3, 2, 1] over a vocabulary of 3 -> p = [1/2, 1/3, 1/6]
    targets = np.array([0, 2])
    assert unigram_ppl(train, targets, 3) == pytest.approx(math.exp(-(math.log(1 / 2) + math.log(1 / 6)) / 2))


def test_table_lists_every_bucket():
    stats = PositionStats.zeros(128)
    stats.nll_sum[:] = 2.0
    stats.tokens[:] = 1
    text = format_table(stats, position_buckets(128))
    assert "Overall perplexity: 7.3891" in text
    for label in ("0-16", "16-32", "32-64", "64-96", "96-128"):
        assert f" {label} " in text


def test_evaluate_needs_samples(small_model):
    with pytest.raises(ValueError):
        evaluate(small_model, np.zeros((0, 8), dtype=np.int32))
