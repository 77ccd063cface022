"""Loss terms and the schedules that weight them over training.

    loss = w_lm(t) * CE + w_rec(t) * sum_layers ||V - V_restored||^2 / ||V||^2 + w_kl(t) * KL(base || adapted)

``t`` in [0, 1] is training progress by step. Each weight follows a ``Schedule`` (``constant``,
``linear``, ``cosine`` or ``step``) from a start to an end value. Named schedules cover the seed's
studies; ``rec_to_lm`` is the seed's "reconstruction first, language modelling later".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import ConfigError

SCHEDULE_KINDS = ("constant", "linear", "cosine", "step")


@dataclass(frozen=True)
class Schedule:
    """A weight over training progress t in [0, 1]: from ``start`` (t=0) to ``end`` (t=1).

    ``step`` holds ``start`` until t reaches ``at``, then ``end``.
    """

    kind: str = "constant"
    start: float = 1.0
    end: float | None = None
    at: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"schedule kind must be one of {', '.join(SCHEDULE_KINDS)}; got {self.kind!r}")
        if self.end is None:
            object.__setattr__(self, "end", self.start)
        for name in ("start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"schedule {name} must be a finite number >= 0, got {v!r}")
        if not 0.0 <= self.at <= 1.0:
            raise ConfigError(f"schedule at must be in [0, 1], got {self.at}")

    def __call__(self, t: float) -> float:
        t = min(max(t, 0.0), 1.0)
        if self.kind == "constant":
            return float(self.start)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        if self.kind == "cosine":
            return self.start + (self.end - self.start) * (1.0 - math.cos(math.pi * t)) / 2.0
        return float(self.start if t < self.at else self.end)

    @property
    def peak(self) -> float:
        return float(self.start) if self.kind == "constant" else max(self.start, self.end)

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        """``"0.5"`` (constant), ``"linear:1:0"``, ``"cosine:0:1"``, ``"step:1:0:0.3"``."""
        parts = text.split(":")
        try:
            if len(parts) == 1:
                return cls("constant", float(parts[0]))
            nums = [float(p) for p in parts[1:]]
        except ValueError:
            raise ConfigError(f"schedule {text!r}: expected NUMBER or KIND:START:END[:AT], e.g. linear:1:0") from None
        if len(nums) not in (1, 2, 3):
            raise ConfigError(f"schedule {text!r}: expected KIND:START:END[:AT]")
        return cls(parts[0], *nums)


NAMED_SCHEDULES = {
    # name: (w_lm, w_rec)
    "lm": (Schedule("constant", 1.0), Schedule("constant", 0.0)),
    "rec_to_lm": (Schedule("linear", 0.0, 1.0), Schedule("linear", 1.0, 0.0)),
    "rec_to_lm_cosine": (Schedule("cosine", 0.0, 1.0), Schedule("cosine", 1.0, 0.0)),
    "rec_to_lm_step": (Schedule("step", 0.0, 1.0, 0.5), Schedule("step", 1.0, 0.0, 0.5)),
    "rec": (Schedule("constant", 0.0), Schedule("constant", 1.0)),
}


@dataclass(frozen=True)
class LossCfg:
    """Weights of the three loss terms, each a schedule over training progress."""

    lm: Schedule = field(default_factory=lambda: Schedule("constant", 1.0))
    rec: Schedule = field(default_factory=lambda: Schedule("constant", 0.0))
    kl: Schedule = field(default_factory=lambda: Schedule("constant", 0.0))
    name: str = "lm"

    def __post_init__(self) -> None:
        if self.lm.peak == 0 and self.rec.peak == 0 and self.kl.peak == 0:
            raise ConfigError("loss schedule: the weights of lm, rec and kl are all zero over the whole run; at least one must be > 0")

    @classmethod
    def named(cls, name: str, kl: float = 0.0) -> "LossCfg":
        """A named schedule (``lm``, ``rec_to_lm``, ``rec_to_lm_cosine``, ``rec_to_lm_step``, ``rec``), plus a constant KL weight."""
        if name not in NAMED_SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(NAMED_SCHEDULES)}; got {name!r}")
        lm, rec = NAMED_SCHEDULES[name]
        return cls(lm=lm, rec=rec, kl=Schedule("constant", kl), name=name + (f"+kl{kl:g}" if kl else ""))

    def weights(self, t: float) -> dict[str, float]:
        return {"lm": self.lm(t), "rec": self.rec(t), "kl": self.kl(t)}


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over predictions of KL(teacher || student): logits (B, T, V) each -> scalar."""
    log_q = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)  # (B*T, V)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def relative_reconstruction(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """||x - x_hat||^2 / ||x||^2 over all elements (float32)."""
    x, x_hat = x.float(), x_hat.float()
    return (x - x_hat).pow(2).sum() / x.pow(2).sum().clamp_min(1e-12)
