"""``kvsweep train``/``eval`` and the sweeps' arguments on input a user gets wrong or leaves out: an earlier
trial's folder, text in another encoding, the default number of train samples, evaluate-only trials."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from kvsweep import config as kconfig
from kvsweep.train import loop as ktrain  # where the loop looks up what these tests replace
from kvsweep.cli import build_parser, main, trial_cfg
from kvsweep.sweepargs import sweep_cfg, sweep_parser

from .conftest import SAMPLE_TEXT, neox_model

LATIN1_TEXT = "Café crème brûlée à la française, naïve façade. " * 60


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, small_tokenizer) -> Path:
    """A small GPT-NeoX saved with its tokenizer, as ``--model FOLDER`` loads it."""
    folder = tmp_path_factory.mktemp("model")
    neox_model().save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE_TEXT * 4)
    return path


def _train_args(model_folder: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_folder), "--data", str(corpus), "--seq-len", "32", "--train-samples", "all",
            "--adapter", "vdproj", "--rank", "16", "--epochs", "1", "--lr", "1e-3", "--out", str(out), *extra]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvsweep: error: "), err
    return lines[0]


# --- an earlier trial's folder ---------------------------------------------------------------------


@pytest.mark.parametrize("earlier", ["trial.json", "checkpoint"])
def test_train_refuses_an_earlier_trials_folder_before_loading_the_model(earlier, tmp_path, capsys, monkeypatch):
    out = tmp_path / "trial"
    out.mkdir()
    if earlier == "trial.json":
        (out / "trial.json").write_text('{"status": "completed"}')
    else:
        (out / "checkpoint").mkdir()
        (out / "checkpoint" / "state.pt").write_bytes(b"weights")
    monkeypatch.setattr(ktrain, "load_base", lambda *a, **k: pytest.fail("loaded the model before refusing --out"))
    code = main(["train", "--model", "tiny", "--adapter", "ka_gated", "--out", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert str(out) in line and "--resume" in line and "--overwrite" in line
    if earlier == "trial.json":
        assert (out / "trial.json").read_text() == '{"status": "completed"}'
    else:
        assert (out / "checkpoint" / "state.pt").read_bytes() == b"weights"


def test_train_overwrite_replaces_an_earlier_trial_and_its_checkpoint(model_folder, corpus, tmp_path, capsys):
    out = tmp_path / "trial"
    assert main(_train_args(model_folder, corpus, out)) == 0
    old = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    (out / "trial.json").write_text('{"status": "completed", "epochs_run": 7}')
    assert main(_train_args(model_folder, corpus, out, "--overwrite", "--seed", "1")) == 0
    rec = json.loads((out / "trial.json").read_text())
    assert rec["epochs_run"] == 1 and rec["status"] == "completed" and rec["config"]["train"]["seed"] == 1
    new = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    assert new.keys() == old.keys()
    for name in ("adapters.safetensors", "best_adapters.safetensors"):  # nothing of the earlier trial carried over
        assert new[name] != old[name], name


def test_train_into_an_empty_or_new_folder_needs_no_flag(model_folder, corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_train_args(model_folder, corpus, empty)) == 0
    assert main(_train_args(model_folder, corpus, tmp_path / "new" / "trial")) == 0


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--adapter", "ka_gated", "--out", str(tmp_path), "--resume", "--overwrite"])
    assert e.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


# --- text that is not UTF-8 ------------------------------------------------------------------------


@pytest.fixture
def latin1_file(tmp_path) -> Path:
    path = tmp_path / "latin1.txt"
    path.write_bytes(LATIN1_TEXT.encode("latin-1"))
    return path


def test_eval_of_latin1_text_is_one_line_naming_file_offset_and_encoding(model_folder, latin1_file, capsys):
    code = main(["eval", "--model", str(model_folder), "--data", str(latin1_file), "--seq-len", "32"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    offset = LATIN1_TEXT.encode("latin-1").index("é".encode("latin-1"))
    assert str(latin1_file) in line and f"offset {offset}" in line and "--encoding" in line
    assert main(["eval", "--model", str(model_folder), "--data", str(latin1_file), "--seq-len", "32", "--encoding", "latin-1"]) == 0


def test_train_of_binary_bytes_in_a_txt_is_one_line(model_folder, tmp_path, capsys):
    path = tmp_path / "data.txt"
    path.write_bytes(SAMPLE_TEXT.encode() + b"\x89PNG\r\n\x1a\n\xff\xfe\x00" + SAMPLE_TEXT.encode())
    code = main(_train_args(model_folder, path, tmp_path / "out"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and str(path) in line and f"offset {len(SAMPLE_TEXT.encode())}" in line and "--encoding" in line


def test_train_reads_jsonl_in_the_given_encoding(model_folder, tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    rows = [json.dumps({"text": LATIN1_TEXT}, ensure_ascii=False) for _ in range(3)]
    path.write_bytes("\n".join(rows).encode("latin-1"))
    args = _train_args(model_folder, path, tmp_path / "out")
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "line 1" in line and "--encoding" in line
    assert main([*args, "--encoding", "latin-1"]) == 0


def test_unknown_encoding_is_a_config_error_naming_the_field(capsys):
    assert main(["eval", "--encoding", "klingon-8"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "encoding" in line and "klingon-8" in line


def test_sweeps_take_an_encoding():
    a = sweep_parser("a sweep", "vdproj").parse_args(["--data", "corpus.txt", "--encoding", "latin-1"])
    assert sweep_cfg(a, "vdproj").data.encoding == codecs.lookup("latin-1").name
    assert sweep_cfg(sweep_parser("a sweep", "vdproj").parse_args([]), "vdproj").data.encoding == "utf-8"


# --- default train samples, evaluate-only trials ---------------------------------------------------


@pytest.mark.parametrize("source, expected", [("tiny", "all"), ("tiny:corpus.txt", "all"), ("wikitext-2", 10_000),
                                              ("corpus.txt", 10_000), ("someone/dataset", 10_000)])
def test_train_and_sweeps_share_the_default_train_samples(source, expected):
    assert kconfig.default_train_samples(source) == expected
    a = build_parser().parse_args(["train", "--data", source, "--adapter", "ka_gated", "--out", "x"])
    assert trial_cfg(a).data.train_samples == expected
    s = sweep_parser("a sweep", "vdproj").parse_args(["--data", source])
    assert sweep_cfg(s, "vdproj").data.train_samples == expected


def test_train_on_tiny_loads_all_its_train_samples(tiny_folder):
    a = build_parser().parse_args(["train", "--model", "tiny", "--data", "tiny", "--adapter", "ka_gated", "--out", "x"])
    _, samples = ktrain.prepare(trial_cfg(a), log=lambda m: None)
    assert 0 < len(samples.train) < 10_000 and samples.info["train_samples"] == len(samples.train)


def test_epochs_zero_without_calibration_asks_for_no_train_samples(model_folder, corpus, tmp_path):
    # corpus.txt has far fewer than 10,000 windows: an evaluate-only trial must not ask for them
    out = tmp_path / "out"
    assert main(["train", "--model", str(model_folder), "--data", str(corpus), "--seq-len", "32", "--adapter", "vdproj",
                 "--rank", "16", "--epochs", "0", "--out", str(out)]) == 0
    rec = json.loads((out / "trial.json").read_text())
    assert rec["epochs_run"] == 0 and rec["config"]["data"]["train_samples"] == 0


def test_epochs_zero_pca_loads_only_its_calibration_samples(model_folder, corpus, monkeypatch):
    seen: list[int] = []
    real = ktrain.load_samples

    def spy(*a, **k):
        s = real(*a, **k)
        seen.append(len(s.train))
        return s

    monkeypatch.setattr(ktrain, "load_samples", spy)
    a = build_parser().parse_args(["train", "--model", str(model_folder), "--data", str(corpus), "--seq-len", "32", "--adapter",
                                   "vdproj", "--rank", "16", "--init", "pca", "--calib-samples", "5", "--epochs", "0", "--out", "x"])
    ktrain.prepare(trial_cfg(a), log=lambda m: None)
    assert seen == [5]


def test_epochs_zero_pca_on_fewer_windows_than_calib_samples_uses_them_all(model_folder, corpus, tmp_path):
    out = tmp_path / "out"
    # about 36 train windows of 32 tokens, fewer than the default calib_samples of 64
    assert main(["train", "--model", str(model_folder), "--data", str(corpus), "--seq-len", "32", "--adapter", "vdproj",
                 "--rank", "16", "--init", "pca", "--epochs", "0", "--out", str(out)]) == 0
    assert json.loads((out / "trial.json").read_text())["epochs_run"] == 0


def test_epochs_zero_pca_calibrates_on_the_samples_a_trained_run_calibrates_on(model_folder, corpus, tmp_path):
    common = ["--model", str(model_folder), "--data", str(corpus), "--seq-len", "32", "--train-samples", "20",
              "--adapter", "vdproj", "--rank", "8", "--init", "pca", "--calib-samples", "6", "--lr", "1e-3"]
    assert main(["train", *common, "--epochs", "0", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *common, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    init = [json.loads((tmp_path / n / "trial.json").read_text())["init_val_ppl"] for n in ("a", "b")]
    assert init[0] == pytest.approx(init[1], rel=1e-6)


def test_epochs_zero_pca_without_train_windows_is_a_clear_error(model_folder, tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text(SAMPLE_TEXT[:100])  # one window of 32 tokens: all of it validation
    code = main(["train", "--model", str(model_folder), "--data", str(path), "--seq-len", "32", "--eval-seq-len", "32", "--test-fraction", "0", "--adapter", "vdproj",
                 "--rank", "16", "--init", "pca", "--epochs", "0", "--out", str(tmp_path / "out")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "calibrat" in line and "no windows" in line


def test_epochs_zero_pca_with_zero_train_samples_is_refused_before_loading(capsys, monkeypatch):
    monkeypatch.setattr(ktrain, "load_base", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    code = main(["train", "--model", "tiny", "--adapter", "vdproj", "--rank", "8", "--init", "pca",
                 "--epochs", "0", "--train-samples", "0", "--out", "x"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "train_samples" in line and "calib" in line
