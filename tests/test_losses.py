"""Loss weight schedules, named schedules and the KL / reconstruction terms."""

from __future__ import annotations

import math

import pytest
import torch

from kvsweep.config import ConfigError
from kvsweep.losses import NAMED_SCHEDULES, SCHEDULE_KINDS, LossCfg, Schedule, kl_divergence, relative_reconstruction

TS = (0.0, 0.25, 0.5, 1.0)
COS_QUARTER = (1 - math.cos(math.pi / 4)) / 2  # progress of a cosine schedule at t = 0.25


# ----------------------------------------------------------------------------- Schedule


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (Schedule("constant", 2.0), (2.0, 2.0, 2.0, 2.0)),
        (Schedule("constant", 0.0), (0.0, 0.0, 0.0, 0.0)),
        (Schedule("linear", 1.0, 0.0), (1.0, 0.75, 0.5, 0.0)),
        (Schedule("linear", 0.0, 2.0), (0.0, 0.5, 1.0, 2.0)),
        (Schedule("cosine", 1.0, 0.0), (1.0, 1.0 - COS_QUARTER, 0.5, 0.0)),
        (Schedule("cosine", 0.0, 1.0), (0.0, COS_QUARTER, 0.5, 1.0)),
        (Schedule("step", 1.0, 0.0, 0.3), (1.0, 1.0, 0.0, 0.0)),
        (Schedule("step", 0.0, 1.0, 0.5), (0.0, 0.0, 1.0, 1.0)),  # t == at: already the end value
    ],
    ids=lambda v: repr(v) if isinstance(v, Schedule) else "",
)
def test_schedule_values(schedule, expected):
    assert [schedule(t) for t in TS] == pytest.approx(list(expected), abs=1e-12)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_schedule_clamps_progress_to_0_1(kind):
    s = Schedule(kind, 3.0, 1.0, 0.5) if kind != "constant" else Schedule(kind, 3.0)
    assert s(0.0) == pytest.approx(3.0)
    assert s(-1.0) == pytest.approx(3.0)
    assert s(-1e9) == pytest.approx(3.0)
    assert s(2.0) == pytest.approx(s(1.0))
    assert s(1e9) == pytest.approx(3.0 if kind == "constant" else 1.0)


def test_schedule_end_defaults_to_start():
    assert Schedule("linear", 0.7).end == 0.7
    assert Schedule("linear", 0.7)(0.9) == pytest.approx(0.7)


def test_schedule_parse_constant():
    s = Schedule.parse("0.5")
    assert (s.kind, s.start, s.end) == ("constant", 0.5, 0.5)
    assert s(0.0) == s(1.0) == 0.5


def test_schedule_parse_linear():
    s = Schedule.parse("linear:1:0")
    assert (s.kind, s.start, s.end) == ("linear", 1.0, 0.0)
    assert s(0.25) == pytest.approx(0.75)


def test_schedule_parse_cosine():
    s = Schedule.parse("cosine:0:1")
    assert (s.kind, s.start, s.end) == ("cosine", 0.0, 1.0)


def test_schedule_parse_step_with_at():
    s = Schedule.parse("step:1:0:0.3")
    assert (s.kind, s.start, s.end, s.at) == ("step", 1.0, 0.0, 0.3)
    assert (s(0.29), s(0.3), s(0.31)) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "text",
    ["", "abc", "linear:x:0", "linear", "linear:1:0:0.5:9", "foo:1:0", "-1", "nan", "inf", "linear:1:-2", "step:1:0:1.5"],
)
def test_schedule_parse_garbage_raises_config_error(text):
    with pytest.raises(ConfigError):
        Schedule.parse(text)


@pytest.mark.parametrize("start", [-1.0, -1e-9, float("nan"), float("inf"), float("-inf")])
def test_bad_start_raises_config_error(start):
    with pytest.raises(ConfigError, match="start"):
        Schedule("constant", start)
    with pytest.raises(ConfigError, match="start"):
        Schedule("linear", start, 1.0)


@pytest.mark.parametrize("end", [-0.5, float("nan"), float("inf")])
def test_bad_end_raises_config_error(end):
    with pytest.raises(ConfigError, match="end"):
        Schedule("linear", 1.0, end)


def test_non_numeric_start_raises_config_error():
    with pytest.raises(ConfigError, match="start"):
        Schedule("constant", "1")
    with pytest.raises(ConfigError, match="start"):
        Schedule("constant", True)


@pytest.mark.parametrize("at", [-0.1, 1.1])
def test_step_point_outside_0_1_raises_config_error(at):
    with pytest.raises(ConfigError, match="at"):
        Schedule("step", 1.0, 0.0, at)


@pytest.mark.parametrize("kind", ["exp", "Linear", "", "warmup"])
def test_unknown_kind_raises_config_error(kind):
    with pytest.raises(ConfigError, match="kind"):
        Schedule(kind, 1.0)


# ----------------------------------------------------------------------------- LossCfg


@pytest.mark.parametrize("name", sorted(NAMED_SCHEDULES))
def test_every_named_schedule_builds_and_follows_its_schedules(name):
    cfg = LossCfg.named(name)
    lm, rec = NAMED_SCHEDULES[name]
    assert cfg.name == name
    for t in TS:
        w = cfg.weights(t)
        assert set(w) == {"lm", "rec", "kl"}
        assert w["lm"] == pytest.approx(lm(t))
        assert w["rec"] == pytest.approx(rec(t))
        assert w["kl"] == 0.0
        assert all(v >= 0 for v in w.values())


# name: weights (lm, rec) at t = 0, 0.5, 1
EXPECTED_NAMED = {
    "lm": ((1, 0), (1, 0), (1, 0)),
    "rec": ((0, 1), (0, 1), (0, 1)),
    "rec_to_lm": ((0, 1), (0.5, 0.5), (1, 0)),
    "rec_to_lm_cosine": ((0, 1), (0.5, 0.5), (1, 0)),
    "rec_to_lm_step": ((0, 1), (1, 0), (1, 0)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMED))
def test_named_schedule_values(name):
    cfg = LossCfg.named(name)
    for t, (lm, rec) in zip((0.0, 0.5, 1.0), EXPECTED_NAMED[name]):
        w = cfg.weights(t)
        assert (w["lm"], w["rec"]) == pytest.approx((lm, rec)), t


def test_rec_to_lm_is_the_seeds_linear_schedule():
    cfg = LossCfg.named("rec_to_lm")
    assert (cfg.rec.kind, cfg.rec.start, cfg.rec.end) == ("linear", 1.0, 0.0)
    assert (cfg.lm.kind, cfg.lm.start, cfg.lm.end) == ("linear", 0.0, 1.0)
    assert cfg.weights(0.5) == pytest.approx({"lm": 0.5, "rec": 0.5, "kl": 0.0})
    assert cfg.weights(0.25) == pytest.approx({"lm": 0.25, "rec": 0.75, "kl": 0.0})


def test_named_schedule_with_kl_weight():
    cfg = LossCfg.named("rec_to_lm", kl=0.1)
    assert cfg.name == "rec_to_lm+kl0.1"
    for t in TS:
        assert cfg.weights(t)["kl"] == pytest.approx(0.1)
    assert cfg.weights(0.5)["lm"] == pytest.approx(0.5)


def test_unknown_named_schedule_raises_config_error_listing_names():
    with pytest.raises(ConfigError, match="rec_to_lm") as e:
        LossCfg.named("nope")
    assert "nope" in str(e.value)


def test_all_zero_weights_raise_config_error():
    zero = Schedule("constant", 0.0)
    with pytest.raises(ConfigError, match="zero"):
        LossCfg(lm=zero, rec=zero, kl=zero)
    with pytest.raises(ConfigError):
        LossCfg(lm=Schedule("linear", 0.0, 0.0), rec=Schedule("step", 0.0, 0.0), kl=zero)


def test_a_single_nonzero_weight_is_enough():
    zero = Schedule("constant", 0.0)
    assert LossCfg(lm=zero, rec=zero, kl=Schedule("constant", 1.0)).weights(0.5)["kl"] == 1.0
    assert LossCfg(lm=Schedule("linear", 0.0, 1.0), rec=zero, kl=zero).weights(1.0)["lm"] == 1.0


def test_default_loss_is_plain_language_modelling():
    assert LossCfg().weights(0.3) == {"lm": 1.0, "rec": 0.0, "kl": 0.0}


# ----------------------------------------------------------------------------- loss terms


def test_kl_divergence_of_identical_logits_is_zero():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    assert kl_divergence(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # shifting all logits of a prediction by a constant leaves its distribution unchanged
    assert kl_divergence(logits + 3.0, logits).item() == pytest.approx(0.0, abs=1e-5)


def test_kl_divergence_of_different_logits_is_positive():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    kl = kl_divergence(a, b)
    assert kl.ndim == 0
    assert kl.item() > 0


def test_kl_divergence_by_hand():
    # two predictions over 2 tokens: teacher p, student q; KL(p || q) averaged over predictions
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    teacher, student = p.log().view(1, 2, 2), q.log().view(1, 2, 2)  # log-probs are valid logits
    by_hand = [sum(pi * math.log(pi / qi) for pi, qi in zip(p_row, q_row)) for p_row, q_row in zip(p.tolist(), q.tolist())]
    expected = sum(by_hand) / 2
    assert kl_divergence(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    # direction matters: KL(base || adapted), the teacher is the second argument
    reverse = sum(sum(qi * math.log(qi / pi) for pi, qi in zip(p_row, q_row)) for p_row, q_row in zip(p.tolist(), q.tolist())) / 2
    assert kl_divergence(teacher, student).item() == pytest.approx(reverse, rel=1e-5)
    assert abs(expected - reverse) > 1e-3


def test_kl_divergence_accepts_half_precision_logits():
    logits = torch.randn(1, 3, 7, generator=torch.Generator().manual_seed(2))
    kl = kl_divergence(logits.bfloat16(), (logits * 2).bfloat16())
    assert kl.dtype == torch.float32 and kl.item() > 0


def test_relative_reconstruction_by_hand():
    x = torch.tensor([3.0, 4.0])
    assert relative_reconstruction(x, torch.tensor([3.0, 0.0])).item() == pytest.approx(16 / 25)
    assert relative_reconstruction(x, x).item() == 0.0
    assert relative_reconstruction(x, torch.zeros(2)).item() == pytest.approx(1.0)
    # over all elements of a batch: (1 + 4) / (1 + 4 + 9 + 16)
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    x_hat = torch.tensor([[[0.0, 2.0], [3.0, 2.0]]])
    assert relative_reconstruction(x, x_hat).item() == pytest.approx(5 / 30)


def test_relative_reconstruction_of_zero_input_is_finite():
    z = torch.zeros(4)
    assert relative_reconstruction(z, z).item() == 0.0
    assert math.isfinite(relative_reconstruction(z, torch.full((4,), 1e-7)).item())


def test_relative_reconstruction_is_float32_for_half_inputs():
    x = torch.tensor([3.0, 4.0]).half()
    out = relative_reconstruction(x, torch.tensor([3.0, 0.0]).half())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(0.64)
