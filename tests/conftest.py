"""Test setup: no hub access, a private kvsweep cache, tiny GPT-NeoX models built in code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before transformers or datasets are imported anywhere: an accidental download fails at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Every test session gets its own cache, one for all its pytest-xdist workers (they build `tiny` once, under its
# lock); set KVSWEEP_TEST_CACHE to reuse one between runs.
if os.environ.get("KVSWEEP_TEST_CACHE"):
    os.environ["KVSWEEP_CACHE"] = os.environ["KVSWEEP_TEST_CACHE"]
elif os.environ.get("PYTEST_XDIST_TESTRUNUID"):  # the same in every worker of one run
    os.environ["KVSWEEP_CACHE"] = os.path.join(tempfile.gettempdir(), f"kvsweep-test-cache-{os.environ['PYTEST_XDIST_TESTRUNUID']}")
    os.makedirs(os.environ["KVSWEEP_CACHE"], exist_ok=True)
else:
    os.environ["KVSWEEP_CACHE"] = tempfile.mkdtemp(prefix="kvsweep-test-cache-")

import pytest  # noqa: E402

pytest.register_assert_rewrite(f"{__package__}.sweeps")  # its helpers' assertions show their values too
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KVSWEEP_SHARED_DATA", ROOT.parent / "shared" / "data"))
PYTHIA_TOKENIZER = SHARED_DATA / "pythia-tokenizer" / "tokenizer.json"
WIKITEXT_VALID = SHARED_DATA / "wikitext-2-raw" / "wiki.valid.raw"

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n"
) * 40


def neox_model(*, layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 320, positions: int = 256, seed: int = 0):
    """A small random GPT-NeoX of Pythia's family, frozen, float32."""
    from kvsweep.models import freeze, neox_config
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    return freeze(GPTNeoXForCausalLM(neox_config(layers=layers, hidden=hidden, heads=heads, intermediate=4 * hidden, vocab=vocab, positions=positions)))


def small_base():
    """``neox_model()`` as a loaded base (no tokenizer), for trials trained without a model folder."""
    from kvsweep.models import Base, ModelSource

    return Base(model=neox_model(), tokenizer=None, name="small", source=ModelSource("local", "small"), model_path=None)


def pattern_samples(n_train: int = 24, n_val: int = 6, seq_len: int = 32, n_test: int = 0, eval_len: int | None = None):
    """A learnable pattern for ``small_base``: token i+1 = token i + 1 (mod 320), from random starts; validation and
    test samples of ``eval_len`` tokens (default ``seq_len``), no test set unless ``n_test``."""
    import numpy as np

    from kvsweep.data import Samples

    rng = np.random.default_rng(0)
    n, e = n_train + n_val + n_test, eval_len or seq_len
    starts = rng.integers(0, 320, size=(n, 1))
    ids = ((starts + np.arange(max(seq_len, e))) % 320).astype(np.int32)  # (n, max(seq_len, eval_len))
    return Samples(train=ids[:n_train, :seq_len], val=ids[n_train:n_train + n_val, :e], test=ids[n_train + n_val:, :e])


@pytest.fixture(scope="session")
def small_tokenizer():
    """A byte-level BPE of 320 entries trained on SAMPLE_TEXT (EOS id 0, padding id 1)."""
    from kvsweep.tiny import train_tokenizer

    return train_tokenizer([SAMPLE_TEXT], 320)


@pytest.fixture
def small_model():
    return neox_model()


@pytest.fixture(scope="session")
def pythia_tokenizer_path() -> Path:
    if not PYTHIA_TOKENIZER.is_file():
        pytest.skip(f"offline Pythia tokenizer not found at {PYTHIA_TOKENIZER}")
    return PYTHIA_TOKENIZER


@pytest.fixture(scope="session")
def wikitext_valid() -> Path:
    if not WIKITEXT_VALID.is_file():
        pytest.skip(f"offline WikiText-2 validation text not found at {WIKITEXT_VALID}")
    return WIKITEXT_VALID


@pytest.fixture(scope="session")
def tiny_folder():
    """The tiny preset, built once per test session (about a minute and a half on 2 cores)."""
    from kvsweep.tiny import ensure_tiny

    return ensure_tiny()


@pytest.fixture(scope="session")
def smoke_sweep(tiny_folder, tmp_path_factory) -> Path:
    """The results folder of one finished ``sweeps/vdproj.py --smoke-test`` (4 V-DProj trials on tiny, 2 epochs), run once
    per test session, for all its pytest-xdist workers; tests that change anything copy it first. Its console output is
    ``CONSOLE`` beside the folder."""
    from .sweeps import shared_sweep

    return shared_sweep("smoke", storage_factory=tmp_path_factory)


@pytest.fixture
def frozen_vdproj():
    """A training-free method for the tests that ask for it: V-DProj at its init, without trainable parameters."""
    from kvsweep.adapters import ADAPTERS, register_adapter
    from kvsweep.adapters.vdproj import VDProj

    @register_adapter("frozen_vdproj")
    class FrozenVDProj(VDProj):
        aliases = {}

        def build(self) -> None:
            super().build()
            for p in self.parameters():
                p.requires_grad_(False)

    yield FrozenVDProj
    ADAPTERS.pop("frozen_vdproj")
