"""A trial's typed config (``TrialCfg``), its error, its epoch 0 and the report callback's type."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable


from ..adapters import ADAPTERS, AdapterSpec, adapter_class, check_combination
from ..config import ConfigError, DataCfg, KvsweepError, ModelCfg, TrainCfg, calibration_samples, position_buckets
from ..losses import LossCfg
from ..results import EpochMetrics, EpochReport


Report = Callable[[EpochReport, "Path | None"], None]


class TrialError(KvsweepError):
    """A trial that cannot go on (a loss that turned NaN or infinite)."""


@dataclass(frozen=True)
class TrialCfg:
    """Everything one trial needs: base, data, adapters, loss schedules, optimisation; ``buckets``: the position
    buckets of its evaluation samples (default: the seed's, doubling beyond 128 to ``data.eval_len``)."""

    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=lambda: DataCfg(train_samples=10_000))
    adapters: tuple[AdapterSpec, ...] = ()
    loss: LossCfg = field(default_factory=LossCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        check_combination(self.adapters)
        if self.data.eval_seq_len != "max":  # else once the model's maximum is known (with_max_positions)
            position_buckets(self.data.eval_len, self.buckets)
        has_rec = any("rec" in adapter_class(s.name).loss_terms for s in self.adapters)
        if self.loss.rec.peak > 0 and not has_rec and self.loss.lm.peak == 0 and self.loss.kl.peak == 0:
            rec = [n for n, cls in ADAPTERS.items() if "rec" in cls.loss_terms]
            raise ConfigError("loss schedule: only the reconstruction weight is > 0, but no adapter reconstructs anything "
                              f"(add one of {', '.join(rec)})")
        if self.train.epochs > 0:
            if not self.adapters:
                raise ConfigError("adapters: a trial needs at least one adapter to train (epochs 0 evaluates the base alone)")
            if self.data.train_samples == 0:
                raise ConfigError("train_samples must be >= 1 (or 'all') to train; use epochs 0 to only evaluate")
            if isinstance(self.data.train_samples, int) and self.train.batch_size > self.data.train_samples:
                raise ConfigError(f"batch_size {self.train.batch_size} is larger than train_samples "
                                  f"{self.data.train_samples}; valid range 1..{self.data.train_samples}")
        calib = calibration_samples(s.options for s in self.adapters)
        if calib > 0 and self.data.train_samples == 0:  # epochs 0: the adapters are still initialised from data
            raise ConfigError(f"train_samples is 0, but the adapters calibrate on up to {calib} train samples (calib_samples) "
                              "before the first evaluation; give train_samples >= 1 or 'all', or an init that needs no data")

    def with_max_positions(self, max_positions: int) -> "TrialCfg":
        """This config with an ``eval_seq_len`` of ``"max"`` set to the model's ``max_positions`` (and its buckets checked).

        Raises:
            ConfigError: the buckets hold no prediction at that length.
        """
        data = self.data.with_max_positions(max_positions)
        return self if data is self.data else replace(self, data=data)

    def to_dict(self) -> dict:
        return {
            "model": asdict(self.model),
            "data": asdict(self.data),
            "adapters": [s.to_dict() for s in self.adapters],
            "loss": {"name": self.loss.name, **{k: asdict(getattr(self.loss, k)) for k in ("lm", "rec", "kl")}},
            "train": asdict(self.train),
            "buckets": list(self.buckets) if self.buckets else None,
        }


def init_metrics(cfg: TrialCfg, val_ppl: float) -> EpochMetrics:
    """Epoch 0 of a trial: its adapters at init (validation PPL ``val_ppl``), before any step; the loss weights
    at the schedule's start; no training figures."""
    w = cfg.loss.weights(0.0)
    return EpochMetrics(epoch=0, val_ppl=val_ppl, w_lm=w["lm"], w_rec=w["rec"], w_kl=w["kl"], lr=cfg.train.lr, steps=0)
