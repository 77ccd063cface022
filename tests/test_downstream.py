"""kvsweep downstream: lm-evaluation-harness on the base and on trials' adapters, downstream.parquet, the report's section."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import ROOT, neox_model

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from kvsweep.adapters import AdapterSpec, attached, make_adapter  # noqa: E402
from kvsweep.config import ConfigError, MissingFileError  # noqa: E402
from kvsweep.downstream import DownstreamCfg, KvsweepLM  # noqa: E402
from kvsweep.models import Base, ModelSource, dims  # noqa: E402
from kvsweep.results.downstream import DOWNSTREAM_SCHEMA, DownstreamRow, downstream_table, merge_downstream  # noqa: E402

TASKS = ROOT / "tests" / "data" / "lm_eval"


@pytest.fixture
def small(small_tokenizer):
    return Base(model=neox_model(), tokenizer=small_tokenizer, name="small", source=ModelSource("local", "small"), model_path=None)


def _adapters(base, *specs):
    torch.manual_seed(1)
    return [make_adapter(AdapterSpec.parse(name, **opts), dims(base.config)).eval() for name, opts in specs]


def _loglikelihood(model, adapters, tok, ctx: str, cont: str) -> float:
    """log p(cont | ctx) with the adapted training-time forward, written out."""
    c, t = tok(ctx)["input_ids"], tok(cont)["input_ids"]
    ids = torch.tensor([c + t])
    with attached(model, adapters), torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    return float(sum(logp[len(c) - 1 + i, t[i]] for i in range(len(t))))


def test_scoring_requests_run_the_adapted_forward(small):
    adapters = _adapters(small, ("vdproj", {"rank": 8, "init": "random"}))
    lm = KvsweepLM(small, adapters, batch_size=2)
    pairs = [("The quick brown fox", " jumps over"), ("Pack my box with", " five dozen"), ("How vexingly", " quick")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    want = [_loglikelihood(small.model, adapters, small.tokenizer, c, t) for c, t in pairs]
    np.testing.assert_allclose([g[0] for g in got], want, rtol=1e-5)
    base = KvsweepLM(small, [], batch_size=2).loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                                                            disable_tqdm=True)
    assert all(abs(g[0] - b[0]) > 1e-4 for g, b in zip(got, base))  # the adapters change the scores
    assert not any(a.attached for a in adapters)  # attached for each batch only


def _greedy(model, adapters, tok, ctx: str, n: int) -> list[int]:
    ids = tok(ctx)["input_ids"]
    out: list[int] = []
    with attached(model, adapters), torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("specs", [
    (("vdproj", {"rank": 8, "init": "random"}),),
    (("quant", {"bits": 4, "group": 8, "window": 0}),),
], ids=["vdproj", "quant"])
def test_generation_decodes_on_the_latent_cache_as_the_training_forward_would(small, specs):
    adapters = _adapters(small, *specs)
    lm = KvsweepLM(small, adapters, batch_size=3, cache_dtype="float32")
    contexts = ["The quick brown fox", "Pack my box", "Sphinx of black quartz, judge"]  # left-padded together by lm-eval
    got = lm.generate_until([Instance("generate_until", {}, (c, {"until": ["\n\n\n"], "max_gen_toks": 6}), i)
                             for i, c in enumerate(contexts)], disable_tqdm=True)
    assert lm._decoder is not None  # generation went through the latent decoder
    for c, g in zip(contexts, got):
        want = small.tokenizer.decode(_greedy(small.model, adapters, small.tokenizer, c, 6))
        assert g == want.split("\n\n\n")[0]


def test_generation_stops_at_a_stop_string(small):
    lm = KvsweepLM(small, [], batch_size=1, cache_dtype="float32")
    full = lm.generate_until([Instance("generate_until", {}, ("The quick", {"until": ["\x00never"], "max_gen_toks": 8}), 0)],
                             disable_tqdm=True)[0]
    assert len(full) > 2
    stop = full[1:3]
    cut = lm.generate_until([Instance("generate_until", {}, ("The quick", {"until": [stop], "max_gen_toks": 8}), 0)],
                            disable_tqdm=True)[0]
    assert stop not in cut and full.startswith(cut) and len(cut) < len(full)


def _row(trial, task="t", metric="acc", value=0.5, fewshot=None, limit=None):
    return trial, DownstreamRow(sweep="s", task=task, metric=metric, value=value, stderr=0.1, samples=10, num_fewshot=fewshot,
                                limit=limit, kv_bytes_per_token=100, methods="", higher_is_better=True,
                                lm_eval_version="0.4", evaluated_at="2026-01-01T00:00:00+00:00")


def test_a_later_evaluation_replaces_the_same_rows_and_keeps_the_others():
    old = downstream_table([_row(None), _row("a"), _row("a", task="u"), _row("a", fewshot=5)])
    new = downstream_table([_row("a", value=0.9), _row("b")])
    merged = merge_downstream(old, new).to_pylist()
    assert merged[-2:] == new.to_pylist()
    kept = {(r["trial_id"], r["task"], r["num_fewshot"], r["value"]) for r in merged[:-2]}
    assert kept == {(None, "t", None, 0.5), ("a", "u", None, 0.5), ("a", "t", 5, 0.5)}
    assert merge_downstream(None, new).schema == DOWNSTREAM_SCHEMA


@pytest.mark.parametrize("kw, message", [
    ({"tasks": ()}, "at least one"), ({"tasks": ("a",), "batch_size": 0}, "batch_size"),
    ({"tasks": ("a",), "limit": 0}, "limit"), ({"tasks": ("a",), "num_fewshot": -1}, "num_fewshot"),
])
def test_bad_settings_are_refused_in_one_line(kw, message):
    with pytest.raises(ConfigError, match=message):
        DownstreamCfg(**kw)


def test_unknown_tasks_and_folders_are_named(tmp_path):
    from kvsweep.downstream import task_manager

    with pytest.raises(MissingFileError, match="include_path"):
        DownstreamCfg(tasks=("a",), include_path=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="kvsweep_cloze"):
        task_manager(DownstreamCfg(tasks=("kvsweep_clozee",), include_path=str(TASKS)))


def test_unknown_trials_are_refused_before_any_model_loads(tmp_path):
    from kvsweep.downstream import run_downstream
    from kvsweep.latent.trial import UnknownTrialError
    from kvsweep.report.synthetic import write_synthetic

    src = write_synthetic(tmp_path / "r", 6, seed=3)
    with pytest.raises(UnknownTrialError, match="nope"):
        run_downstream(src, DownstreamCfg(tasks=("piqa",)), trials=["nope"])
    with pytest.raises(MissingFileError, match="neither"):
        run_downstream(tmp_path, DownstreamCfg(tasks=("piqa",)))


def _synthetic_with_downstream(tmp_path):
    from kvsweep.report.synthetic import write_synthetic

    src = write_synthetic(tmp_path / "r", 24, seed=3)
    trials = pq.read_table(src / "trials.parquet").to_pylist()
    done = [t for t in trials if t["status"] == "completed" and math.isfinite(t["best_val_ppl"] or math.nan)][:6]
    stopped = next(t for t in trials if t["status"] == "asha_stopped")
    rows = [_row(None, task="piqa", value=0.62)] + [_row(None, task="lambada_openai", metric="perplexity", value=30.0)]
    for k, t in enumerate(done):
        rows.append(_row(t["trial_id"], task="piqa", value=0.5 + 0.01 * k))
        rows.append(_row(t["trial_id"], task="lambada_openai", metric="perplexity", value=40.0 + k))
    rows.append(_row(stopped["trial_id"], task="piqa", value=0.1))  # no front candidate: left out, and said so
    table = downstream_table(rows)
    pq.write_table(table.replace_schema_metadata({b"kvsweep_schema": b"4"}), src / "downstream.parquet")
    return src, done


def test_the_report_draws_scores_against_kv_bytes_with_the_base(tmp_path):
    from kvsweep.report import analyze, build_report, load_all
    from kvsweep.report.downstream import settings

    src, done = _synthetic_with_downstream(tmp_path)
    an = analyze(load_all([str(src)]))
    found, left = settings(an)
    items = {(s.task, s.metric): s for s in found}
    assert set(items) == {("piqa", "acc"), ("lambada_openai", "perplexity")}
    piqa = items[("piqa", "acc")]
    assert piqa.scores[0].point == -1 and piqa.scores[0].value.mean == pytest.approx(0.62)
    points = [s for s in piqa.scores if s.point >= 0]
    assert sum(s.value.n for s in points) == len(done)  # every evaluated trial, grouped into its point
    assert [s.kv for s in points] == sorted(s.kv for s in points)
    out = build_report([str(src)], tmp_path / "rep")
    md = (out / "report.md").read_text()
    assert "## Downstream tasks" in md and "piqa acc" in md and "lambada_openai perplexity" in md
    assert len(left) == 1 and "Left out: 1 evaluated trial that is no front candidate" in md and left[0] in md
    assert (out / "downstream.png").stat().st_size > 1000


def test_a_report_without_downstream_rows_has_no_such_section(tmp_path):
    from kvsweep.report import build_report
    from kvsweep.report.synthetic import write_synthetic

    out = build_report([str(write_synthetic(tmp_path / "r", 12, seed=3))], tmp_path / "rep")
    assert "Downstream" not in (out / "report.md").read_text() and not (out / "downstream.png").exists()


@pytest.mark.slow
def test_downstream_on_a_train_folder_offline_writes_rows_for_the_base_and_the_trial(tiny_folder, tmp_path, monkeypatch, capsys):
    """The local YAML tasks (a loglikelihood, a multiple-choice and a generation task) on tiny, through the command."""
    from kvsweep.cli import main

    monkeypatch.chdir(ROOT)  # the tasks' data_files are relative to the repository root
    out = tmp_path / "q"
    assert main(["train", "--model", "tiny", "--data", "tiny", "--adapter", "quant", "--quant.bits", "4", "--epochs", "0",
                 "--val-samples", "4", "--test-samples", "4", "--eval-seq-len", "128", "--out", str(out)]) == 0
    tasks = "kvsweep_cloze,kvsweep_choice,kvsweep_complete"
    assert main(["downstream", str(out), "--tasks", tasks, "--include-path", str(TASKS), "--device", "cpu", "--limit", "4"]) == 0
    printed = capsys.readouterr().out
    rows = pq.read_table(out / "downstream.parquet").to_pylist()
    got = {(r["trial_id"], r["task"], r["metric"]) for r in rows}
    for who in (None, "q"):
        assert {(who, "kvsweep_cloze", "acc"), (who, "kvsweep_cloze", "perplexity"), (who, "kvsweep_choice", "acc"),
                (who, "kvsweep_complete", "exact_match")} <= got
    assert all(r["samples"] == 4 and r["limit"] == 4 for r in rows)
    kv = {r["trial_id"]: r["kv_bytes_per_token"] for r in rows}
    trial = json.loads((out / "trial.json").read_text())
    assert kv["q"] == trial["kv_bytes_per_token"] < kv[None]
    assert "kvsweep_choice" in printed and f"wrote {out / 'downstream.parquet'}" in printed  # a rerun: merge_downstream's test


@pytest.mark.slow
def test_downstream_on_a_sweeps_front_and_its_report(smoke_sweep, tmp_path, monkeypatch):
    from kvsweep.downstream import front_trials, run_downstream
    from kvsweep.report import build_report

    monkeypatch.chdir(ROOT)
    results = tmp_path / "vdproj-smoke"
    shutil.copytree(smoke_sweep, results)  # the session's sweep stays as it is
    cfg = DownstreamCfg(tasks=("kvsweep_choice",), include_path=str(TASKS), limit=4, device="cpu")
    path, rows = run_downstream(results, cfg)
    front = front_trials(results)
    assert front and path == results / "downstream.parquet"
    assert {r["trial_id"] for r in rows.to_pylist()} == {None, *front}
    trials = {r["trial_id"]: r for r in pq.read_table(results / "trials.parquet").to_pylist()}
    for r in rows.to_pylist():
        want = trials[r["trial_id"]]["kv_bytes_per_token"] if r["trial_id"] else trials[front[0]]["kv_bytes_per_token_base"]
        assert r["kv_bytes_per_token"] == want and r["sweep"] == "vdproj-smoke"
    md = (build_report([str(results)], tmp_path / "rep") / "report.md").read_text()
    section = md.split("## Downstream tasks", 1)[1].split("\n## ", 1)[0]
    assert "kvsweep_choice acc" in section and "| base " in section and sum(line.startswith("| kvsweep_choice acc (limit 4) ") for line in section.splitlines()) == len(front) + 1
