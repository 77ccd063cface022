"""kvsweep.models: Pythia architectures, tokenizers, local folders, name resolution, offline hub errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPTNeoXForCausalLM

from .conftest import neox_model
from kvsweep.config import ConfigError, MissingFileError, ModelCfg
from kvsweep.models import (
    PYTHIA_ARCHS,
    Base,
    HubUnavailableError,
    ModelSource,
    check_seq_len,
    load_base,
    load_base_tokenizer,
    load_tokenizer,
    pythia_config,
    resolve_device,
    resolve_model,
)

PUBLISHED_PYTHIA_PARAMS = {
    "70m": 70_426_624,
    "160m": 162_322_944,
    "410m": 405_334_016,
    "1b": 1_011_781_632,
    "1.4b": 1_414_647_808,
    "2.8b": 2_775_208_960,
    "6.9b": 6_857_302_016,
    "12b": 11_846_072_320,
}


def _quiet(_: str) -> None:
    pass


def _assert_frozen(model: torch.nn.Module) -> None:
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training
    assert not any(m.training for m in model.modules())


# --- Pythia architectures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pythia_70m_random() -> Base:
    return load_base(ModelCfg(name="pythia-70m", random_init=True), log=_quiet)


def test_random_pythia_70m_has_pythias_architecture(pythia_70m_random: Base) -> None:
    base = pythia_70m_random
    config = base.config
    assert isinstance(base.model, GPTNeoXForCausalLM)
    assert base.num_params == 70_426_624
    assert config.num_hidden_layers == 6
    assert config.hidden_size == 512
    assert config.num_attention_heads == 8
    assert config.intermediate_size == 2048
    assert config.rope_parameters["partial_rotary_factor"] == 0.25
    assert config.use_parallel_residual is True
    assert config.tie_word_embeddings is False
    assert config.vocab_size == 50304
    assert config.max_position_embeddings == 2048 == base.max_positions
    assert base.model.get_input_embeddings().weight.data_ptr() != base.model.get_output_embeddings().weight.data_ptr()


def test_random_pythia_70m_is_frozen_without_path_or_tokenizer(pythia_70m_random: Base) -> None:
    base = pythia_70m_random
    _assert_frozen(base.model)
    assert base.model_path is None
    assert base.tokenizer is None
    assert base.source == ModelSource("pythia-random", "70m")
    assert base.device == torch.device("cpu")
    assert next(base.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("name", ["pythia-70m", "EleutherAI/pythia-70m", "pythia-70m-deduped", "EleutherAI/pythia-70m-deduped", "Pythia-70M"])
def test_random_init_names_resolve_to_the_70m_architecture(name: str) -> None:
    assert resolve_model(ModelCfg(name=name, random_init=True)) == ModelSource("pythia-random", "70m")


@pytest.mark.parametrize("size", list(PUBLISHED_PYTHIA_PARAMS))
def test_pythia_table_matches_published_parameter_counts(size: str) -> None:
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(pythia_config(size))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PYTHIA_PARAMS[size]


def test_pythia_table_lists_every_published_size() -> None:
    assert list(PYTHIA_ARCHS) == list(PUBLISHED_PYTHIA_PARAMS)


def test_pythia_config_rejects_unknown_size() -> None:
    with pytest.raises(ConfigError, match="valid sizes: 70m, 160m"):
        pythia_config("5m")


# --- tokenizers ------------------------------------------------------------------------------------


def test_random_pythia_with_pythia_tokenizer(pythia_tokenizer_path: Path) -> None:
    base = load_base(ModelCfg(name="pythia-70m", random_init=True, tokenizer=str(pythia_tokenizer_path)), log=_quiet)
    tok = base.tokenizer
    assert tok is not None
    assert tok("Hello world")["input_ids"] == [12092, 1533]
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id is not None
    assert len(tok) <= base.config.vocab_size
    assert base.model_path is None
    _assert_frozen(base.model)


def test_load_tokenizer_from_file(pythia_tokenizer_path: Path) -> None:
    tok = load_tokenizer(str(pythia_tokenizer_path))
    assert tok.encode("Hello world") == [12092, 1533]
    assert tok.eos_token == "<|endoftext|>"
    assert tok.pad_token == "<|padding|>"


def test_load_tokenizer_from_saved_folder(small_tokenizer, tmp_path: Path) -> None:
    small_tokenizer.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    text = "The quick brown fox"
    assert tok.encode(text) == small_tokenizer.encode(text)
    assert tok.eos_token_id == small_tokenizer.eos_token_id


def test_load_tokenizer_missing_path(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="tokenizer"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_tokenizer_larger_than_model_vocab_is_rejected(pythia_tokenizer_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "vocab64"
    neox_model(vocab=64).save_pretrained(folder)
    with pytest.raises(ConfigError, match="tokenizer") as err:
        load_base(ModelCfg(name=str(folder), tokenizer=str(pythia_tokenizer_path)), log=_quiet)
    assert "64" in str(err.value)


def test_missing_tokenizer_option_raises(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="tokenizer"):
        load_base(ModelCfg(name="pythia-70m", random_init=True, tokenizer=str(tmp_path / "missing.json")), log=_quiet)


# --- local folders ---------------------------------------------------------------------------------


@pytest.fixture
def saved_folder(small_model: GPTNeoXForCausalLM, small_tokenizer, tmp_path: Path) -> Path:
    folder = tmp_path / "saved"
    small_model.save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)
    return folder


def test_local_folder_loads_frozen_with_tokenizer_and_same_logits(
    saved_folder: Path, small_model: GPTNeoXForCausalLM, small_tokenizer
) -> None:
    base = load_base(ModelCfg(name=str(saved_folder)), log=_quiet)
    _assert_frozen(base.model)
    assert base.model_path == str(saved_folder.resolve())
    assert base.source.kind == "local"
    assert base.tokenizer is not None
    text = "Pack my box with five dozen liquor jugs."
    assert base.tokenizer.encode(text) == small_tokenizer.encode(text)
    ids = torch.tensor([small_tokenizer.encode(text)])
    with torch.no_grad():
        expected = small_model(ids).logits
        got = base.model(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_local_folder_bfloat16(saved_folder: Path) -> None:
    base = load_base(ModelCfg(name=str(saved_folder), dtype="bfloat16"), log=_quiet)
    assert all(p.dtype == torch.bfloat16 for p in base.model.parameters())
    _assert_frozen(base.model)


def test_local_folder_without_tokenizer_has_none(small_model: GPTNeoXForCausalLM, tmp_path: Path) -> None:
    small_model.save_pretrained(tmp_path / "m")
    base = load_base(ModelCfg(name=str(tmp_path / "m")), log=_quiet)
    assert base.tokenizer is None
    assert base.model_path == str((tmp_path / "m").resolve())


def test_folder_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="config.json"):
        load_base(ModelCfg(name=str(tmp_path / "empty")), log=_quiet)


def test_path_to_a_file_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="is a file"):
        load_base(ModelCfg(name=str(f)), log=_quiet)


def test_non_gpt_neox_folder_is_rejected(tmp_path: Path) -> None:
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="GPT-NeoX"):
        load_base(ModelCfg(name=str(tmp_path / "gpt2")), log=_quiet)


# --- bad names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "random_init"), [("pythia-5m", True), ("pythia-5m", False), ("gpt9", False)])
def test_unknown_preset_lists_valid_ones(name: str, random_init: bool) -> None:
    with pytest.raises(ConfigError) as err:
        load_base(ModelCfg(name=name, random_init=random_init), log=_quiet)
    message = str(err.value)
    assert "70m" in message and "12b" in message, message


def test_unknown_preset_names_tiny_among_valid_presets() -> None:
    with pytest.raises(ConfigError, match="valid presets: tiny"):
        resolve_model(ModelCfg(name="gpt9"))


@pytest.mark.parametrize("name", ["./nope", "/nonexistent/dir", "~/kvsweep-surely-not-a-folder", "../nope"])
def test_missing_folder(name: str) -> None:
    with pytest.raises(MissingFileError, match="not found"):
        load_base(ModelCfg(name=name), log=_quiet)


@pytest.mark.parametrize("name", ["tiny", "tiny:corpus.txt", "openai-community/gpt2", "gpt2", "EleutherAI/gpt-neox-20b"])
def test_random_init_needs_a_pythia_name(name: str) -> None:
    with pytest.raises(ConfigError, match="random_init"):
        resolve_model(ModelCfg(name=name, random_init=True))


def test_random_init_error_lists_pythia_sizes() -> None:
    with pytest.raises(ConfigError, match="pythia-70m, pythia-160m"):
        resolve_model(ModelCfg(name="openai-community/gpt2", random_init=True))


def test_hub_names_resolve_without_network() -> None:
    assert resolve_model(ModelCfg(name="pythia-70m")) == ModelSource("hub", "EleutherAI/pythia-70m", "main")
    assert resolve_model(ModelCfg(name="pythia-1.4b-deduped", revision="step1000")) == ModelSource(
        "hub", "EleutherAI/pythia-1.4b-deduped", "step1000"
    )
    assert resolve_model(ModelCfg(name="someone/some-model")) == ModelSource("hub", "someone/some-model", "main")


# --- hub unreachable -------------------------------------------------------------------------------


def _skip_if_cached(repo: str, revision: str) -> None:
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str):
        pytest.skip(f"{repo}@{revision} is in the local hub cache")


@pytest.mark.parametrize(
    ("cfg", "revision"),
    [
        (ModelCfg(name="EleutherAI/pythia-70m"), "main"),
        (ModelCfg(name="pythia-70m"), "main"),
        (ModelCfg(name="pythia-70m", revision="step143000"), "step143000"),
    ],
)
def test_hub_unreachable_raises_quickly_with_alternatives(cfg: ModelCfg, revision: str) -> None:
    _skip_if_cached("EleutherAI/pythia-70m", revision)
    start = time.monotonic()
    with pytest.raises(HubUnavailableError) as err:
        load_base(cfg, log=_quiet)
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "EleutherAI/pythia-70m" in message
    assert revision in message
    assert "tiny" in message
    assert "local folder" in message


# --- sequence length and device --------------------------------------------------------------------


def test_check_seq_len_beyond_positions() -> None:
    with pytest.raises(ConfigError, match=r"2\.\.2048") as err:
        check_seq_len(pythia_config("70m"), 4096, "x")
    assert "4096" in str(err.value) and "model x's" in str(err.value)


@pytest.mark.parametrize("seq_len", [2, 128, 2048])
def test_check_seq_len_within_positions(seq_len: int) -> None:
    check_seq_len(pythia_config("70m"), seq_len, "pythia-70m")


def test_check_seq_len_just_beyond() -> None:
    with pytest.raises(ConfigError):
        check_seq_len(pythia_config("70m"), 2049, "pythia-70m")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_resolve_device_cuda_without_cuda(device: str) -> None:
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_device(device)


def test_resolve_device_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_load_base_on_cuda_without_cuda() -> None:
    with pytest.raises(ConfigError, match="device"):
        load_base(ModelCfg(name="pythia-70m", random_init=True, device="cuda"), log=_quiet)


# --- hub unreachable, offline mode off: a quick probe instead of retries ------------------------------
#
# These run `kvsweep eval` in a subprocess with HF_HUB_OFFLINE unset and HF_ENDPOINT on loopback: a port
# that accepts connections but never answers, or a closed port. Nothing leaves this machine: the hub's
# endpoint is loopback, telemetry is off, proxies are unset and the hub cache is a fresh folder.


@pytest.fixture
def silent_endpoint():
    """``http://127.0.0.1:PORT`` that accepts connections (the kernel's backlog) and never answers."""
    import socket

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.fixture
def closed_endpoint():
    """``http://127.0.0.1:PORT`` where nothing listens: connections are refused."""
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def _online_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="*", no_proxy="*",
               HF_HUB_DISABLE_IMPLICIT_TOKEN="1", HF_HUB_DISABLE_XET="1", DO_NOT_TRACK="1")
    return env


def _kvsweep(args: list[str], env: dict[str, str]) -> tuple[int, str, str, float]:
    import subprocess
    import sys

    # the interpreter's start and imports (torch, transformers, datasets) are not the command's wait for the hub
    code = ("import time, sys, datasets, kvsweep.baseline; from kvsweep.cli import main; t0 = time.monotonic(); rc = main(sys.argv[1:]); "
            "print(f'kvsweep-seconds {time.monotonic() - t0:.3f}', file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    seconds = float(proc.stderr.rsplit("kvsweep-seconds", 1)[1].split()[0])
    return proc.returncode, proc.stdout, proc.stderr.rsplit("kvsweep-seconds", 1)[0], seconds


@pytest.mark.parametrize("which", ["silent", "closed"])
def test_unreachable_hub_endpoint_fails_within_seconds(which, silent_endpoint, closed_endpoint, tmp_path) -> None:
    endpoint = silent_endpoint if which == "silent" else closed_endpoint
    rc, _, err, seconds = _kvsweep(["eval", "--model", "EleutherAI/pythia-70m"], _online_env(endpoint, tmp_path / "hf"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and lines[-1].startswith("kvsweep: error: "), err
    assert "EleutherAI/pythia-70m" in lines[-1] and endpoint in lines[-1] and "--model tiny" in lines[-1]
    assert seconds < 8, f"took {seconds:.1f} s"


def test_unreachable_hub_dataset_fails_within_seconds(silent_endpoint, tmp_path, small_tokenizer) -> None:
    folder = tmp_path / "m"
    neox_model().save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)
    rc, _, err, seconds = _kvsweep(["eval", "--model", str(folder), "--data", "someone/some-dataset"],
                                   _online_env(silent_endpoint, tmp_path / "hf"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and lines[-1].startswith("kvsweep: error: "), err
    assert "someone/some-dataset" in lines[-1] and silent_endpoint in lines[-1] and "local file" in lines[-1]
    assert seconds < 8, f"took {seconds:.1f} s"


def test_unreachable_hub_falls_back_to_the_cached_model(silent_endpoint, tmp_path, small_tokenizer) -> None:
    from .conftest import SAMPLE_TEXT

    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--someone--small-neox"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    neox_model().save_pretrained(snapshot)
    small_tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    env = _online_env(silent_endpoint, hf_home)
    env["KVSWEEP_CACHE"] = str(tmp_path / "kvsweep-cache")
    rc, out, err, seconds = _kvsweep(["eval", "--model", "someone/small-neox", "--data", str(text), "--seq-len", "32"], env)
    assert rc == 0, err
    assert "Overall perplexity" in out
    assert seconds < 15, f"took {seconds:.1f} s"


def test_hub_probe_counts_any_http_reply_and_gives_up_on_silence(silent_endpoint, closed_endpoint) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from kvsweep.hub import hub_reachable

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert hub_reachable(f"http://127.0.0.1:{server.server_port}", timeout=2.0)
    finally:
        server.shutdown()
        server.server_close()
    start = time.monotonic()
    assert not hub_reachable(silent_endpoint, timeout=1.0)
    assert not hub_reachable(closed_endpoint, timeout=1.0)
    assert time.monotonic() - start < 3.5


def test_the_tokenizer_of_a_base_comes_without_its_weights(small_tokenizer, pythia_tokenizer_path: Path, tmp_path: Path) -> None:
    """What a sweep's driver loads (``load_base_tokenizer``): the tokenizer ``load_base`` gives, checked against the
    config, with the weights never read: a folder whose weights are unreadable still gives it."""
    folder = tmp_path / "model"
    neox_model().save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)
    text = "The quick brown fox"
    assert load_base_tokenizer(ModelCfg(name=str(folder)), log=_quiet).encode(text) == load_base(
        ModelCfg(name=str(folder)), log=_quiet).tokenizer.encode(text)
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    with pytest.raises(Exception):
        load_base(ModelCfg(name=str(folder)), log=_quiet)
    assert load_base_tokenizer(ModelCfg(name=str(folder)), log=_quiet).encode(text) == small_tokenizer.encode(text)
    assert load_base_tokenizer(ModelCfg(name="pythia-70m", random_init=True), log=_quiet) is None  # no tokenizer given
    given = load_base_tokenizer(ModelCfg(name="pythia-70m", random_init=True, tokenizer=str(pythia_tokenizer_path)), log=_quiet)
    assert given.encode("Hello world") == [12092, 1533]
    with pytest.raises(ConfigError, match="do not belong together"):  # 50k entries against the folder's 320
        load_base_tokenizer(ModelCfg(name=str(folder), tokenizer=str(pythia_tokenizer_path)), log=_quiet)
