"""sweeps/families.py: its union of grids is valid on tiny and Pythia-70M, holds each budget of the base's cache to the
byte, and its smoke test runs as users run it, ending with a report whose leaderboard holds every family."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from kvsweep.adapters import bind_adapters, kv_layout_of, make_adapter
from kvsweep.config import SweepCfg
from kvsweep.kvcache import base_layout, bytes_per_token
from kvsweep.models import dims, pythia_config
from kvsweep.tune import model_dims, trial_cfg, validate_space
from kvsweep.tune.space import grid_points

from .sweeps import ONE_AT_A_TIME, ROOT, env


def families():
    spec = importlib.util.spec_from_file_location("families_sweep", ROOT / "sweeps" / "families.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def share(point: dict, d, sweep: SweepCfg) -> float:
    """The point's KV bytes/token over the base's (fp16)."""
    adapters = [make_adapter(spec, d) for spec in trial_cfg(point, sweep).adapters]
    bind_adapters(adapters)
    layout = kv_layout_of(adapters, base_layout(d.layers, d.hidden))
    return bytes_per_token(layout) / bytes_per_token(base_layout(d.layers, d.hidden))


def test_the_smoke_space_is_valid_on_tiny():
    sweep = SweepCfg(name="families")
    space = families().search_space(model_dims(sweep), True, [0])
    assert len(validate_space(space, sweep)) == len(grid_points(space)) >= 10


def test_the_full_space_holds_each_budget_on_pythia_70m():
    fam = families()
    d = dims(pythia_config("70m"))
    sweep = SweepCfg(name="families")  # trial configs only: the methods' specs, checked against d below
    points = grid_points(fam.search_space(d, False, [0]))
    by = {}
    for p in points:
        names = tuple(s.name for s in trial_cfg(p, sweep).adapters)
        by.setdefault(names, []).append(share(p, d, sweep))
    assert set(by) == {("vdproj",), ("lowrank",), ("quant",), ("lowrank", "quant")}
    assert sorted(set(by[("vdproj",)])) == sorted(fam.BUDGETS)  # K and V at b x d: exactly the budget
    assert sorted(set(by[("lowrank",)])) == sorted(fam.BUDGETS)  # every group size, exactly each budget
    # quant: the bits' share plus fp16 scale and zero point per group of 32 values (K per channel, V per token)
    assert sorted(set(by[("quant",)])) == pytest.approx([(bits + 32 / 32) / 16 for bits in (2, 4, 8)])
    # quant on a joint latent of rank d/2: half the bits' share, plus the metadata of the code's groups
    assert sorted(set(by[("lowrank", "quant")])) == pytest.approx([0.5 * (bits + 1) / 16 for bits in (2, 4)])
    groups = {p["lowrank.group"] for p in points if p.get("lowrank.group")}
    assert groups == {1, 2, 4, 8}  # per head, grouped and joint
    assert {p["epochs"] for p in points if p.get("lowrank.init") == "svd"} == {0}  # SVD inits are the training-free baselines


@pytest.mark.slow
def test_the_smoke_study_runs_and_its_report_ranks_every_family(tmp_path):
    storage = tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "families.py"), "--smoke-test", "--storage", str(storage),
                           "--report-dir", str(tmp_path / "reports"), *ONE_AT_A_TIME], capture_output=True, text=True, env=env(), timeout=900,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    trials = pq.read_table(storage / "families-smoke" / "trials.parquet").to_pylist()
    assert {t["family"] for t in trials} == {"vdproj", "lowrank", "quant", "lowrank+quant"}
    assert all(t["status"] in ("completed", "asha_stopped", "early_stopped") for t in trials), [t["error"] for t in trials]
    free = [t for t in trials if t["variant"].endswith("/ training-free")]
    assert free and all(t["max_epochs"] == 0 and t["epochs_run"] == 0 and t["status"] == "completed" for t in free)
    md = (tmp_path / "reports" / "families-smoke" / "report.md").read_text()
    board = md[md.index("## Families and the leaderboard"):md.index("## Fronts per variant")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in board.splitlines() if line.startswith("|") and "≤" in line]
    best = {(r[0], r[1]): r[2] for r in rows}  # (budget, family) -> its point
    assert all(best[("≤ 50%", fam)] != "—" for fam in ("vdproj", "lowrank", "quant", "lowrank+quant")), board
    assert best[("≤ 25%", "lowrank")] != "—" and best[("≤ 12.5%", "vdproj")] == "—"  # the smoke test's budgets: 50% and 25%
