"""The ``kvsweep`` command as a user runs it: tables printed, eval.json written, clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from kvsweep.cli import main
from kvsweep.config import KvsweepError


@pytest.mark.slow
def test_eval_tiny_prints_the_seed_tables_and_writes_eval_json(tiny_folder, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "kvsweep.cli", "eval", "--model", "tiny", "--data", "tiny", "--out", str(out)],
        capture_output=True, text=True, env=os.environ.copy(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Overall perplexity:" in proc.stdout and "Position-wise perplexity" in proc.stdout
    for label in ("0-16", "16-32", "32-64", "64-96", "96-128"):
        assert f" {label} " in proc.stdout
    rec = json.loads((out / "eval.json").read_text())
    assert {"val_ppl", "test_ppl", "tokens", "nll_sum", "positions", "model", "model_path"} <= rec.keys()
    assert rec["model"] == "tiny" and rec["model_path"] == str(tiny_folder)
    assert rec["val_ppl"] == pytest.approx(math.exp(rec["nll_sum"] / rec["tokens"]))
    # by default at the model's maximum context, 2,048 tokens; buckets doubling beyond the seed's to the end
    assert rec["eval_seq_len"] == 2048 and " 1024-2048 " in proc.stdout and rec["test_ppl"] > 1
    assert [(p["lo"], p["hi"]) for p in rec["positions"]] == [(0, 16), (16, 32), (32, 64), (64, 96), (96, 128), (128, 256),
                                                                (256, 512), (512, 1024), (1024, 2048)]
    assert sum(p["tokens"] for p in rec["positions"]) == rec["tokens"] == rec["val_samples"] * 2047
    assert sum(p["nll_sum"] for p in rec["positions"]) == pytest.approx(rec["nll_sum"])
    assert f"{rec['val_ppl']:.4f}" in proc.stdout


def test_eval_random_pythia_on_wikitext(tmp_path, pythia_tokenizer_path, wikitext_valid, capsys):
    code = main(["eval", "--model", "pythia-70m", "--random-init", "--tokenizer", str(pythia_tokenizer_path),
                 "--data", str(wikitext_valid), "--val-samples", "4", "--seq-len", "64", "--out", str(tmp_path)])
    assert code == 0
    rec = json.loads((tmp_path / "eval.json").read_text())
    assert rec["model_path"] is None and rec["tokens"] == 4 * 63
    assert [(p["lo"], p["hi"]) for p in rec["positions"]] == [(0, 16), (16, 32), (32, 64)]
    assert rec["val_ppl"] > 1000  # random weights over a 50k vocabulary


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gpt9"], "unknown preset"),
        (["--model", "./no/such/folder"], "not found"),
        (["--model", "EleutherAI/pythia-70m"], "--model tiny"),
        (["--data", "no-such-file.txt"], "file not found"),
        (["--data", "tiny", "--seq-len", "4096"], "valid range: 2..2048"),
        (["--data", "tiny", "--eval-seq-len", "4096"], "eval_seq_len 4096 is beyond"),
        (["--eval-seq-len", "long"], "eval_seq_len must be"),
        (["--test-fraction", "1.5"], "test_fraction"),
        (["--buckets", "0,32,16"], "strictly increasing"),
        (["--seq-len", "64", "--buckets", "0,16,64,96"], "holds no prediction"),
        (["--model", "pythia-70m", "--random-init"], "--tokenizer"),
        (["--val-samples", "0"], "val_samples"),
        (["--dtype", "float32", "--device", "tpu"], "device"),
    ],
)
def test_bad_input_is_a_clear_error_before_work_starts(args, message, capsys, monkeypatch):
    from kvsweep import tiny

    monkeypatch.setattr(tiny, "build_tiny", lambda *a, **k: pytest.fail("started building before checking input"))
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsweep: error:") and message in err


def test_too_many_samples_names_both_counts(tmp_path, capsys, small_tokenizer):
    folder = tmp_path / "m"
    from .conftest import SAMPLE_TEXT, neox_model

    neox_model().save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    assert main(["eval", "--model", str(folder), "--data", str(text), "--seq-len", "32", "--val-samples", "999"]) == 2
    err = capsys.readouterr().err
    assert "999 validation samples" in err and "ask for at most" in err


@pytest.fixture
def saved_model(tmp_path, small_tokenizer):
    from .conftest import neox_model

    folder = tmp_path / "m"
    neox_model().save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)
    return folder


def test_eval_of_a_file_evaluates_the_whole_file_and_says_so(saved_model, tmp_path, capsys, small_tokenizer):
    from kvsweep.data import to_windows, tokenize_stream

    from .conftest import SAMPLE_TEXT

    text = tmp_path / "test.txt"
    text.write_text(SAMPLE_TEXT * 3)
    n = len(to_windows(tokenize_stream([text.read_text()], small_tokenizer), 32))
    assert main(["eval", "--model", str(saved_model), "--data", str(text), "--seq-len", "32", "--out", str(tmp_path / "a")]) == 0
    line = f"evaluated windows 0..{n - 1} of {n} (the whole file)"
    assert line in capsys.readouterr().out
    rec = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert rec["val_samples"] == n and rec["tokens"] == n * 31
    assert rec["evaluated"]["windows"] == [0, n] and rec["evaluated"]["total_windows"] == n
    assert rec["evaluated"]["whole_file"] is True and rec["evaluated"]["text"] == line
    assert rec["test"] is None and rec["test_ppl"] is None  # the whole file is validation: no test set
    # an explicit --val-fraction evaluates a trial's validation range and its test range, the last 0.1 of the windows
    assert main(["eval", "--model", str(saved_model), "--data", str(text), "--seq-len", "32", "--val-fraction", "0.25",
                 "--out", str(tmp_path / "b")]) == 0
    hi = n - round(n * 0.1)
    lo = hi - round(n * 0.25)
    printed = capsys.readouterr().out
    assert f"evaluated windows {lo}..{hi - 1} of {n} (0.25 of the file, before its last 0.1)" in printed
    assert f"evaluated windows {hi}..{n - 1} of {n} (the last 0.1 of the file)" in printed
    rec = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert rec["val_samples"] == hi - lo and rec["evaluated"]["windows"] == [lo, hi] and rec["evaluated"]["whole_file"] is False
    assert rec["test_samples"] == n - hi and rec["test"]["evaluated"]["windows"] == [hi, n] and rec["test_ppl"] == rec["test"]["ppl"] > 1


def test_eval_of_a_source_with_splits_evaluates_its_validation_and_test_splits(tiny_folder, capsys, tmp_path):
    assert main(["eval", "--model", "tiny", "--data", "tiny", "--val-samples", "4", "--test-samples", "2", "--eval-seq-len",
                 "512", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "eval.json").read_text())
    n, m = rec["evaluated"]["total_windows"], rec["test"]["evaluated"]["total_windows"]
    assert rec["evaluated"]["split"] == "validation" and rec["evaluated"]["windows"] == [0, n]
    assert rec["test"]["evaluated"]["split"] == "test" and rec["eval_seq_len"] == 512 and rec["tokens"] == 4 * 511
    assert [p["lo"] for p in rec["test"]["positions"]] == [0, 16, 32, 64, 96, 128, 256]
    printed = capsys.readouterr().out
    assert f"evaluated 4 samples of windows 0..{n - 1} of {n} (the validation split of tiny)" in printed
    assert f"evaluated 2 samples of windows 0..{m - 1} of {m} (the test split of tiny)" in printed


def test_method_flags_come_from_the_registry_and_the_older_flags_are_aliases():
    from kvsweep.args import adapter_specs
    from kvsweep.cli import build_parser

    def specs(*argv):
        return adapter_specs(build_parser().parse_args(["train", "--out", "x", *argv]))

    new = specs("--vdproj.rank", "16", "--vdproj.init", "pca", "--no-vdproj.bias", "--vdproj.calib-samples", "5",
                "--ka_gated.layers", "0,1")
    old = specs("--adapter", "vdproj", "--rank", "16", "--init", "pca", "--no-bias", "--calib-samples", "5",
                "--adapter", "ka_gated", "--ka-layers", "0,1")
    assert new == old and [s.name for s in new] == ["vdproj", "ka_gated"]
    assert new[0].options.bias is False and new[0].options.calib_samples == 5 and new[1].options.layers == (0, 1)
    # methods in registry order unless --adapter names several in an order of its own
    assert [s.name for s in specs("--adapter", "ka_gated", "--vdproj.rank", "8")] == ["vdproj", "ka_gated"]
    assert [s.name for s in specs("--adapter", "ka_gated", "--adapter", "vdproj", "--rank", "8")] == ["ka_gated", "vdproj"]
    with pytest.raises(KvsweepError, match="--vdproj.rank or --rank"):
        specs("--adapter", "vdproj")
    with pytest.raises(KvsweepError, match="cannot be combined"):
        specs("--ka_gated.layers", "0", "--ka_residual.layers", "1")
    with pytest.raises(SystemExit):
        specs("--vdproj.init", "svd")  # not one of its choices
