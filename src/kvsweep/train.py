"""One trial: train adapters on a frozen base, report every epoch, checkpoint, resume. No Ray here.

``run_trial(cfg, report)`` attaches the trial's adapters to the frozen base, trains them with AdamW
under the loss schedules, and after each epoch evaluates, writes a checkpoint (adapter weights,
optimizer, schedule position, early-stopping state, RNG state, the epochs so far) and calls
``report(metrics, checkpoint_dir)``. Given a checkpoint it resumes where it stopped and reports what an
uninterrupted run would have reported. Batches are shuffled from (seed, epoch), so a resumed trial
sees the same batches.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .adapters import Adapter, AdapterSpec, attached, check_combination, disabled, make_adapter
from .atomic import atomic_path
from .config import ConfigError, DataCfg, KvsweepError, ModelCfg, TrainCfg, position_buckets
from .data import Samples, load_samples, resolve_source
from .evaluate import PositionStats, evaluate, token_nll
from .kvcache import base_layout, bytes_per_token, layer_bytes
from .latent import measure_bytes
from .losses import LossCfg, kl_divergence
from .models import Base, check_seq_len, dims, load_base, model_config, resolve_model

Report = Callable[[dict, "Path | None"], None]
STATE_FILE = "state.pt"


class TrialError(KvsweepError):
    """A trial that cannot go on (a loss that turned NaN or infinite)."""


@dataclass(frozen=True)
class TrialCfg:
    """Everything one trial needs: base, data, adapters, loss schedules, optimisation."""

    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=lambda: DataCfg(train_samples=10_000))
    adapters: tuple[AdapterSpec, ...] = ()
    loss: LossCfg = field(default_factory=LossCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        check_combination(self.adapters)
        position_buckets(self.data.seq_len, self.buckets)
        has_rec = any(s.name == "vdproj" for s in self.adapters)
        if self.loss.rec.peak > 0 and not has_rec and self.loss.lm.peak == 0 and self.loss.kl.peak == 0:
            raise ConfigError("loss schedule: only the reconstruction weight is > 0, but no adapter reconstructs anything (add vdproj)")
        if self.train.epochs > 0:
            if not self.adapters:
                raise ConfigError("adapters: a trial needs at least one adapter to train (epochs 0 evaluates the base alone)")
            if self.data.train_samples == 0:
                raise ConfigError("train_samples must be >= 1 (or 'all') to train; use epochs 0 to only evaluate")
            if isinstance(self.data.train_samples, int) and self.train.batch_size > self.data.train_samples:
                raise ConfigError(f"batch_size {self.train.batch_size} is larger than train_samples "
                                  f"{self.data.train_samples}; valid range 1..{self.data.train_samples}")

    def to_dict(self) -> dict:
        return {
            "model": asdict(self.model),
            "data": asdict(self.data),
            "adapters": [s.to_dict() for s in self.adapters],
            "loss": {"name": self.loss.name, **{k: asdict(getattr(self.loss, k)) for k in ("lm", "rec", "kl")}},
            "train": asdict(self.train),
            "buckets": list(self.buckets) if self.buckets else None,
        }


def bucket_key(lo: int, hi: int) -> str:
    return f"ppl_pos_{lo}_{hi}"


@dataclass
class _State:
    """What a checkpoint holds besides weights: where training is and what it has seen."""

    epoch: int = 0
    step: int = 0
    best_val_ppl: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    best_positions: list = field(default_factory=list)


def autocast(device: torch.device, amp: str, base_dtype: torch.dtype = torch.float32):
    """The precision trials compute in: bf16 autocast on CUDA (``auto``), or the base's own dtype when the
    frozen base is held in bf16/fp16 (the float32 adapters then run under autocast too)."""
    if amp == "off":
        return nullcontext()
    if device.type == "cuda" and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if base_dtype == torch.float32 else base_dtype)
    if amp == "bf16" or base_dtype != torch.float32:
        return torch.autocast(device.type, dtype=torch.bfloat16 if base_dtype == torch.float32 else base_dtype)
    return nullcontext()


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """This epoch's shuffled batches of sample indices, the same for the same (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen)
    return list(order.split(batch_size))


def _save_checkpoint(path: Path, adapters: list[Adapter], opt: torch.optim.Optimizer, state: _State, best: dict | None,
                     previous: Path | None = None) -> None:
    """Write the checkpoint folder atomically; the best weights come from ``best`` or the previous checkpoint."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        torch.save({
            "adapters": [a.state_dict() for a in adapters],
            "optimizer": opt.state_dict(),
            "state": asdict(state),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
        }, tmp / STATE_FILE)
        if best is not None:
            torch.save(best, tmp / "best_adapters.pt")
        else:
            for folder in (path, previous):  # a restarted trial writes into a new folder: carry them over
                if folder is not None and (Path(folder) / "best_adapters.pt").is_file():
                    (tmp / "best_adapters.pt").write_bytes((Path(folder) / "best_adapters.pt").read_bytes())
                    break


def _load_checkpoint(path: Path, adapters: list[Adapter], opt: torch.optim.Optimizer) -> _State:
    ckpt = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
    for a, sd in zip(adapters, ckpt["adapters"], strict=True):
        a.load_state_dict(sd)
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    np.random.set_state(ckpt["rng"]["numpy"])
    return _State(**ckpt["state"])


def prepare(cfg: TrialCfg, *, base: Base | None = None, samples: Samples | None = None,
            log: Callable[[str], None] = print) -> tuple[Base, Samples]:
    """Check the trial against the model (before loading it), then load base and samples if not given."""
    if base is None:
        source = resolve_model(cfg.model)
        resolve_source(cfg.data)
        config = model_config(source)
        check_seq_len(config, cfg.data.seq_len, cfg.model.name)
        for spec in cfg.adapters:  # rank and layer indices against the model, before any weights load
            make_adapter(spec, dims(config))
        if cfg.model.random_init and cfg.model.tokenizer is None:
            raise ConfigError(f"model {cfg.model.name} with random weights has no tokenizer; give one with --tokenizer")
        base = load_base(cfg.model, log=log)
    if base.tokenizer is None and samples is None:
        raise ConfigError(f"model {cfg.model.name} has no tokenizer; give one with --tokenizer")
    if samples is None:
        samples = load_samples(cfg.data, base.tokenizer, log=log)
    if cfg.train.epochs > 0 and cfg.train.batch_size > len(samples.train):
        raise ConfigError(f"batch_size {cfg.train.batch_size} is larger than the {len(samples.train)} train samples; "
                          f"valid range 1..{len(samples.train)}")
    return base, samples


def run_trial(cfg: TrialCfg, report: Report | None = None, *, checkpoint_dir: str | Path | None = None,
              resume_from: str | Path | None = None, base: Base | None = None, samples: Samples | None = None,
              base_stats: PositionStats | None = None, progress: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Train one trial; return its result (status, best and base PPL, KV bytes, parameters, history).

    ``base``, ``samples`` and ``base_stats`` (the base's validation statistics) may be passed in when a
    sweep shares them between trials; otherwise they are loaded and computed here.
    """
    t_start = time.perf_counter()
    report = report or (lambda metrics, ckpt: None)
    base, samples = prepare(cfg, base=base, samples=samples, log=log)
    model, device, tc = base.model, base.device, cfg.train
    base_dtype = next(model.parameters()).dtype
    if base_dtype != torch.float32 and tc.amp == "off":
        raise ConfigError(f"amp 'off' needs a float32 base; the base is {base_dtype} (use amp auto, or dtype float32)")
    ranges = position_buckets(cfg.data.seq_len, cfg.buckets)
    d = dims(base.config)

    torch.manual_seed(tc.seed)
    adapters = [make_adapter(spec, d) for spec in cfg.adapters]
    trainable = [p for a in adapters for p in a.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    layout = base_layout(d.layers, d.hidden)
    for a in adapters:
        layout = a.kv_layout(layout)
    kv_bytes = bytes_per_token(layout, tc.cache_dtype)
    kv_base = bytes_per_token(base_layout(d.layers, d.hidden), tc.cache_dtype)

    with attached(model, adapters):
        # The cache a short latent-cache decode really holds; raises if it differs from the accounting.
        measured = measure_bytes(model, adapters, tc.cache_dtype)
        if base_stats is None:
            with disabled(adapters), autocast(device, tc.amp, base_dtype):
                base_stats = evaluate(model, samples.val, batch_size=tc.eval_batch_size)
        base_buckets = base_stats.buckets(ranges)
        opt = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay) if trainable else None
        if resume_from is not None:
            state = _load_checkpoint(Path(resume_from), adapters, opt)
            log(f"resumed from {resume_from} after epoch {state.epoch}")
            init_val_ppl = state.history[0]["init_val_ppl"] if state.history else math.nan
        else:
            state = _State()
            for a in adapters:  # each measures the base: the other adapters pass through meanwhile
                with disabled([o for o in adapters if o is not a]), autocast(device, tc.amp, base_dtype):
                    a.calibrate(model, samples.train)
            with autocast(device, tc.amp, base_dtype):
                init_stats = evaluate(model, samples.val, batch_size=tc.eval_batch_size)
            init_val_ppl = init_stats.ppl
        constant = {
            "base_val_ppl": base_stats.ppl,
            "init_val_ppl": init_val_ppl,
            "kv_bytes_per_token": kv_bytes,
            "kv_bytes_per_token_measured": measured["measured_bytes_per_token"],
            "kv_ratio": kv_bytes / kv_base,
            "trainable_params": n_trainable,
            "total_params": base.num_params + n_trainable,
        }

        if tc.epochs == 0 and resume_from is None:
            metrics = {"epoch": 0, "train_ppl": math.nan, "val_ppl": init_val_ppl, **constant,
                       **{bucket_key(b["lo"], b["hi"]): b["ppl"] for b in init_stats.buckets(ranges)}}
            state.history.append(metrics)
            state.best_val_ppl, state.best_positions = init_val_ppl, init_stats.buckets(ranges)
            report(metrics, None)
            status = "completed"
        else:
            status = _train(cfg, model, adapters, opt, samples, state, constant, ranges, report, checkpoint_dir, progress, log,
                            Path(resume_from) if resume_from is not None else None)

    best = state.best_positions
    return {
        "status": status,
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val_ppl": state.best_val_ppl,
        "base_val_ppl": base_stats.ppl,
        "init_val_ppl": constant["init_val_ppl"],
        "degradation_pct": 100.0 * (state.best_val_ppl - base_stats.ppl) / base_stats.ppl,
        "kv_bytes_per_token": kv_bytes,
        "kv_bytes_per_token_measured": measured["measured_bytes_per_token"],
        "kv_bytes_per_layer_measured": measured["measured_bytes_per_layer"],
        "kv_bytes_per_token_base": kv_base,
        "kv_ratio": kv_bytes / kv_base,
        "kv_bytes_per_layer": layer_bytes(layout, tc.cache_dtype),
        "trainable_params": n_trainable,
        "total_params": base.num_params + n_trainable,
        "history": state.history,
        "positions": [{**b, "base_ppl": bb["ppl"]} for b, bb in zip(best, base_buckets)],
        "seconds": time.perf_counter() - t_start,
    }


def _train(cfg: TrialCfg, model, adapters: list[Adapter], opt, samples: Samples, state: _State, constant: dict,
           ranges, report: Report, checkpoint_dir, progress: bool, log, resume_from: Path | None = None) -> str:
    tc = cfg.train
    device = next(model.parameters()).device
    base_dtype = next(model.parameters()).dtype  # the base's embedding comes first
    train_ids = torch.from_numpy(np.array(samples.train, dtype=np.int64))  # (N, T), a writable copy
    steps_per_epoch = math.ceil(len(train_ids) / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    ckpt_path = Path(checkpoint_dir) if checkpoint_dir is not None else None
    use_kl = cfg.loss.kl.peak > 0

    if state.bad_epochs >= tc.patience:  # resumed from the checkpoint of an early-stopped trial
        return "early_stopped"
    for epoch in range(state.epoch + 1, tc.epochs + 1):
        t0 = time.perf_counter()
        for a in adapters:
            a.train()
        sums = {"loss": 0.0, "loss_lm": 0.0, "loss_rec": 0.0, "loss_kl": 0.0}
        nll_sum, n_tok = 0.0, 0
        batches = _batches(len(train_ids), tc.batch_size, tc.seed, epoch)
        bar = _progress(batches, epoch, tc.epochs) if progress else batches
        for i, idx in enumerate(bar, 1):
            ids = train_ids[idx].to(device)  # (B, T)
            w = cfg.loss.weights(state.step / total_steps)
            with autocast(device, tc.amp, base_dtype):
                logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
                nll = token_nll(logits, ids)  # (B, T-1) float32
                ce = nll.mean()
                recs = [r for a in adapters if (r := a.reconstruction_loss()) is not None]
                rec = torch.stack(recs).sum() if recs else torch.zeros((), device=device)
                if use_kl:
                    with torch.no_grad(), disabled(adapters):
                        teacher = model(input_ids=ids, use_cache=False).logits
                    kl = kl_divergence(logits[:, :-1], teacher[:, :-1])
                else:
                    kl = torch.zeros((), device=device)
            loss = w["lm"] * ce + w["rec"] * rec + w["kl"] * kl
            if not torch.isfinite(loss):
                raise TrialError(f"loss is {loss.item()} at epoch {epoch}, step {i} of {steps_per_epoch} "
                                 f"(lm {ce.item():.4g}, rec {rec.item():.4g}, kl {kl.item():.4g}); try a lower lr")
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], tc.grad_clip)
                opt.step()
            state.step += 1
            nll_sum += float(nll.detach().double().sum())
            n_tok += nll.numel()
            for k, v in (("loss", loss), ("loss_lm", ce), ("loss_rec", rec), ("loss_kl", kl)):
                sums[k] += float(v.detach())
        for a in adapters:
            a.eval()
        with autocast(device, tc.amp, base_dtype):
            val = evaluate(model, samples.val, batch_size=tc.eval_batch_size)
        state.epoch = epoch
        w_end = cfg.loss.weights(state.step / total_steps)
        metrics = {
            "epoch": epoch,
            "train_ppl": math.exp(nll_sum / n_tok),
            "val_ppl": val.ppl,
            **{k: v / steps_per_epoch for k, v in sums.items()},
            **{f"w_{k}": v for k, v in w_end.items()},
            **constant,
            **{bucket_key(b["lo"], b["hi"]): b["ppl"] for b in val.buckets(ranges)},
            "lr": tc.lr,
            "steps": state.step,
            "seconds": time.perf_counter() - t0,
        }
        improved = val.ppl < state.best_val_ppl
        if improved:
            state.best_val_ppl, state.best_epoch, state.bad_epochs = val.ppl, epoch, 0
            state.best_positions = val.buckets(ranges)
        else:
            state.bad_epochs += 1
        stop = state.bad_epochs >= tc.patience
        metrics.update(best_val_ppl=state.best_val_ppl, early_stopped=stop)
        state.history.append(metrics)
        log(f"epoch {epoch}/{tc.epochs}: train PPL {metrics['train_ppl']:.3f}  val PPL {val.ppl:.3f}  "
            f"(base {constant['base_val_ppl']:.3f}, best {state.best_val_ppl:.3f})  {metrics['seconds']:.1f} s")
        if ckpt_path is not None:
            best = [a.state_dict() for a in adapters] if improved else None
            _save_checkpoint(ckpt_path, adapters, opt, state, best, previous=resume_from)
        report(metrics, ckpt_path)
        if stop:
            log(f"early stop: no better val PPL for {tc.patience} epochs (best {state.best_val_ppl:.3f} at epoch {state.best_epoch})")
            return "early_stopped"
    return "completed"


def _progress(batches, epoch: int, epochs: int):
    from tqdm.auto import tqdm

    return tqdm(batches, desc=f"epoch {epoch}/{epochs}", leave=False, unit="step", disable=None)  # off when not a terminal


def git_revision() -> str | None:
    """The commit of the kvsweep checkout this runs from (with ``+dirty`` for local changes), if any."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def epoch_rows(trial_id: str, history: list[dict]) -> list[dict]:
    from .results import EPOCH_SCHEMA

    return [{"trial_id": trial_id, **{k: m.get(k) for k in EPOCH_SCHEMA.names if k != "trial_id"}} for m in history]


def position_rows(trial_id: str, positions: list[dict]) -> list[dict]:
    return [{
        "trial_id": trial_id, "lo": p["lo"], "hi": p["hi"], "tokens": p["tokens"], "ppl": p["ppl"], "base_ppl": p["base_ppl"],
        "diff": p["ppl"] - p["base_ppl"], "degradation_pct": 100.0 * (p["ppl"] - p["base_ppl"]) / p["base_ppl"],
    } for p in positions]


def run_trial_to_folder(cfg: TrialCfg, out: str | Path, *, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """``kvsweep train``: one trial with a progress bar; writes trial.json, epochs.parquet, positions.parquet."""
    from .atomic import write_json
    from .results import EPOCH_SCHEMA, POSITION_SCHEMA, table, write_parquet

    out = Path(out)
    ckpt = out / "checkpoint"
    resume_from = ckpt if resume and (ckpt / STATE_FILE).is_file() else None
    if resume and resume_from is None:
        log(f"no checkpoint in {ckpt}; starting from the beginning")
    record = {"config": cfg.to_dict(), "git_revision": git_revision()}
    try:
        result = run_trial(cfg, checkpoint_dir=ckpt, resume_from=resume_from, progress=True, log=log)
    except TrialError as e:
        write_json(out / "trial.json", {**record, "status": "error", "error": str(e)})
        raise
    history = result.pop("history")
    trial_id = out.name
    write_json(out / "trial.json", {**record, **result, "final": history[-1] if history else None})
    write_parquet(table(epoch_rows(trial_id, history), EPOCH_SCHEMA), out / "epochs.parquet")
    write_parquet(table(position_rows(trial_id, result["positions"]), POSITION_SCHEMA), out / "positions.parquet")
    log(format_trial(result))
    log(f"wrote {out / 'trial.json'}, epochs.parquet, positions.parquet")
    return {**result, "history": history}


def format_trial(result: dict) -> str:
    """The seed's overall and position-wise tables for one trial against its base."""
    base, best = result["base_val_ppl"], result["best_val_ppl"]
    lines = [
        f"status {result['status']} after {result['epochs_run']} epochs (best epoch {result['best_epoch']})",
        f"KV cache: {result['kv_bytes_per_token']:,} bytes/token ({100 * result['kv_ratio']:.1f}% of the base's "
        f"{result['kv_bytes_per_token_base']:,}); trainable parameters {result['trainable_params']:,} of {result['total_params']:,}",
        "",
        f"| {'model':>8} | {'val PPL':>10} | {'diff':>9} | {'degr. %':>8} |",
        f"|{'-' * 10}|{'-' * 12}|{'-' * 11}|{'-' * 10}|",
        f"| {'base':>8} | {base:>10.4f} | {'':>9} | {'':>8} |",
        f"| {'adapted':>8} | {best:>10.4f} | {best - base:>+9.4f} | {100 * (best - base) / base:>+8.2f} |",
        "",
        f"| {'positions':>10} | {'base PPL':>10} | {'PPL':>10} | {'diff':>9} | {'degr. %':>8} |",
        f"|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 11}|{'-' * 10}|",
    ]
    for p in result["positions"]:
        diff = p["ppl"] - p["base_ppl"]
        lines.append(f"| {str(p['lo']) + '-' + str(p['hi']):>10} | {p['base_ppl']:>10.4f} | {p['ppl']:>10.4f} | {diff:>+9.4f} | "
                     f"{100 * diff / p['base_ppl']:>+8.2f} |")
    return "\n".join(lines)
