"""kvsweep.config: every bad value raises ConfigError naming its field; buckets; the cache folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvsweep import config as kconfig
from kvsweep.config import (
    SEED_BUCKETS,
    ConfigError,
    DataCfg,
    EvalCfg,
    KvsweepError,
    ModelCfg,
    cache_dir,
    default_bucket_bounds,
    parse_bounds,
    parse_count,
    position_buckets,
)


def test_config_error_is_a_value_error_and_a_kvsweep_error() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, KvsweepError)


# --- ModelCfg --------------------------------------------------------------------------------------


def test_model_cfg_defaults() -> None:
    cfg = ModelCfg()
    assert (cfg.name, cfg.revision, cfg.random_init, cfg.tokenizer) == ("tiny", None, False, None)
    assert (cfg.device, cfg.dtype, cfg.seed) == ("auto", "float32", 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_model_cfg_accepts_each_dtype(dtype: str) -> None:
    assert ModelCfg(dtype=dtype).dtype == dtype


@pytest.mark.parametrize("dtype", ["fp32", "float64", "bf16", "Float32", ""])
def test_model_cfg_rejects_bad_dtype(dtype: str) -> None:
    with pytest.raises(ConfigError, match="dtype"):
        ModelCfg(dtype=dtype)


@pytest.mark.parametrize("device", ["auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"])
def test_model_cfg_accepts_each_device_form(device: str) -> None:
    assert ModelCfg(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "tpu", "", "cpu:0"])
def test_model_cfg_rejects_bad_device(device: str) -> None:
    with pytest.raises(ConfigError, match="device"):
        ModelCfg(device=device)


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_model_cfg_rejects_empty_name(name: str) -> None:
    with pytest.raises(ConfigError, match="model"):
        ModelCfg(name=name)


@pytest.mark.parametrize("revision", ["", "  "])
def test_model_cfg_rejects_empty_revision(revision: str) -> None:
    with pytest.raises(ConfigError, match="revision"):
        ModelCfg(revision=revision)


def test_model_cfg_accepts_a_revision() -> None:
    assert ModelCfg(name="pythia-70m", revision="step143000").revision == "step143000"


def test_model_cfg_is_frozen() -> None:
    cfg = ModelCfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dtype = "float16"  # type: ignore[misc]


# --- DataCfg ---------------------------------------------------------------------------------------


def test_data_cfg_defaults() -> None:
    cfg = DataCfg()
    assert (cfg.seq_len, cfg.train_samples, cfg.val_samples, cfg.val_fraction, cfg.seed) == (128, 0, "all", 0.1, 0)


@pytest.mark.parametrize("seq_len", [2, 3, 128, 2048])
def test_data_cfg_accepts_seq_len(seq_len: int) -> None:
    assert DataCfg(seq_len=seq_len).seq_len == seq_len


@pytest.mark.parametrize("seq_len", [1, 0, -5, 2.0, 128.0, "128", True, None])
def test_data_cfg_rejects_bad_seq_len(seq_len: object) -> None:
    with pytest.raises(ConfigError, match="seq_len"):
        DataCfg(seq_len=seq_len)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("all", "all"),
        ("ALL", "all"),
        (" all ", "all"),
        (0, 0),
        ("0", 0),
        (1, 1),
        (500, 500),
        ("500", 500),
        ("1,000", 1000),
        ("1_000", 1000),
        (" 42 ", 42),
    ],
)
def test_train_samples_accepted_forms(value: object, expected: object) -> None:
    assert DataCfg(train_samples=value).train_samples == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("all", "all"), ("All", "all"), (1, 1), ("1", 1), ("1,000", 1000), ("12,345", 12345), (64, 64)],
)
def test_val_samples_accepted_forms(value: object, expected: object) -> None:
    assert DataCfg(val_samples=value).val_samples == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-1, "-1", -100, "abc", "", "1.5", 1.5, "ten", True, None, "all of them"])
def test_train_samples_rejects_bad_values(value: object) -> None:
    with pytest.raises(ConfigError, match="train_samples"):
        DataCfg(train_samples=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, "0", -1, "-3", "abc", "", 2.0, False, None])
def test_val_samples_rejects_bad_values(value: object) -> None:
    with pytest.raises(ConfigError, match="val_samples"):
        DataCfg(val_samples=value)  # type: ignore[arg-type]


def test_parse_count_names_the_field() -> None:
    with pytest.raises(ConfigError, match="my_field"):
        parse_count("my_field", "garbage")
    with pytest.raises(ConfigError, match="my_field must be >= 1"):
        parse_count("my_field", 0)
    assert parse_count("my_field", 0, allow_zero=True) == 0


@pytest.mark.parametrize("fraction", [1e-6, 0.1, 0.5, 1.0, 1])
def test_val_fraction_accepted(fraction: float) -> None:
    assert DataCfg(val_fraction=fraction, test_fraction=0).val_fraction == fraction


@pytest.mark.parametrize("fraction", [0.0, 0, -0.1, 1.0001, 2.0, float("nan"), float("inf")])
def test_val_fraction_rejects_values_outside_0_1(fraction: float) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        DataCfg(val_fraction=fraction)


@pytest.mark.parametrize("train_samples", [1, "all", "10"])
def test_val_fraction_one_leaves_no_training_windows(train_samples: object) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        DataCfg(val_fraction=1.0, train_samples=train_samples)  # type: ignore[arg-type]


def test_val_fraction_one_allowed_without_training_samples() -> None:
    assert DataCfg(val_fraction=1.0, test_fraction=0, train_samples=0).val_fraction == 1.0


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1, 2.0, float("nan"), "0.1", True])
def test_test_fraction_rejects_values_outside_0_1(fraction: object) -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        DataCfg(test_fraction=fraction)  # type: ignore[arg-type]


def test_val_and_test_fractions_share_the_file() -> None:
    assert DataCfg(val_fraction=0.5, test_fraction=0.5, train_samples=0).test_fraction == 0.5
    with pytest.raises(ConfigError, match="leave no windows for training"):
        DataCfg(val_fraction=0.5, test_fraction=0.5, train_samples=10)
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction must be <= 1"):
        DataCfg(val_fraction=0.95, test_fraction=0.1)


@pytest.mark.parametrize(("value", "expected"), [("all", "all"), (0, 0), ("0", 0), (7, 7)])
def test_test_samples_may_be_zero(value: object, expected: object) -> None:
    assert DataCfg(test_samples=value).test_samples == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "expected"), [(None, None), (2, 2), (2048, 2048), ("2048", 2048), ("MAX", "max"), ("max", "max")])
def test_eval_seq_len_accepted_forms(value: object, expected: object) -> None:
    cfg = DataCfg(seq_len=128, eval_seq_len=value)  # type: ignore[arg-type]
    assert cfg.eval_seq_len == expected
    if expected != "max":
        assert cfg.eval_len == (expected or 128)


@pytest.mark.parametrize("value", [1, 0, -3, 2.5, "long", True, ""])
def test_eval_seq_len_rejects_bad_values(value: object) -> None:
    with pytest.raises(ConfigError, match="eval_seq_len"):
        DataCfg(eval_seq_len=value)  # type: ignore[arg-type]


def test_eval_seq_len_max_is_the_models_maximum_once_known() -> None:
    cfg = DataCfg(eval_seq_len="max")
    with pytest.raises(ConfigError, match="with_max_positions"):
        cfg.eval_len
    assert cfg.with_max_positions(2048).eval_len == 2048 and DataCfg(eval_seq_len=64).with_max_positions(2048).eval_len == 64
    assert EvalCfg(data=cfg.with_max_positions(2048)).bucket_ranges[-4:] == [(128, 256), (256, 512), (512, 1024), (1024, 2048)]


@pytest.mark.parametrize("seed", [-1, -100, 1.0, "0", True, None])
def test_data_cfg_rejects_bad_seed(seed: object) -> None:
    with pytest.raises(ConfigError, match="seed"):
        DataCfg(seed=seed)  # type: ignore[arg-type]


def test_data_cfg_accepts_seed_zero_and_positive() -> None:
    assert DataCfg(seed=0).seed == 0
    assert DataCfg(seed=12345).seed == 12345


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_data_cfg_rejects_equal_splits(split: str) -> None:
    with pytest.raises(ConfigError, match="train_split and val_split"):
        DataCfg(train_split=split, val_split=split)


def test_data_cfg_accepts_distinct_splits() -> None:
    cfg = DataCfg(train_split="train", val_split="test", test_split="heldout")
    assert (cfg.train_split, cfg.val_split, cfg.test_split) == ("train", "test", "heldout")
    with pytest.raises(ConfigError, match="val_split and test_split must differ"):
        DataCfg(val_split="test")


def test_data_cfg_encoding_defaults_to_utf8_and_is_normalised() -> None:
    assert DataCfg().encoding == "utf-8"
    assert DataCfg(encoding="latin1").encoding == DataCfg(encoding="ISO-8859-1").encoding == "iso8859-1"
    assert DataCfg(encoding="UTF8").encoding == "utf-8"


@pytest.mark.parametrize("encoding", ["klingon-8", "", "rot13", "base64", None, 8])
def test_data_cfg_rejects_an_unknown_encoding_naming_the_field(encoding: object) -> None:
    with pytest.raises(ConfigError, match="encoding") as err:
        DataCfg(encoding=encoding)  # type: ignore[arg-type]
    assert "utf-8" in str(err.value)  # an example of a valid value


@pytest.mark.parametrize(("source", "expected"), [("tiny", "all"), ("tiny:my.txt", "all"), ("wikitext-2", 10_000),
                                                  ("wikitext-103", 10_000), ("corpus.txt", 10_000), ("someone/data", 10_000)])
def test_default_train_samples_by_source(source: str, expected: object) -> None:
    assert kconfig.default_train_samples(source) == expected


def test_calibration_samples_counts_data_aware_inits_only() -> None:
    from kvsweep.adapters import AdapterSpec

    specs = [AdapterSpec.parse("vdproj", rank=8, init="pca", calib_samples=12), AdapterSpec.parse("ka_gated")]
    assert kconfig.calibration_samples(s.options for s in specs) == 12
    assert kconfig.calibration_samples([AdapterSpec.parse("vdproj", rank=8).options, AdapterSpec.parse("ka_residual").options]) == 0
    assert kconfig.calibration_samples([]) == 0


@pytest.mark.parametrize("source", ["", "  "])
def test_data_cfg_rejects_empty_source(source: str) -> None:
    with pytest.raises(ConfigError, match="data"):
        DataCfg(source=source)


# --- EvalCfg ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, "8", True, None])
def test_eval_cfg_rejects_bad_batch_size(batch_size: object) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        EvalCfg(batch_size=batch_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch_size", [1, 8, 1024])
def test_eval_cfg_accepts_batch_size(batch_size: int) -> None:
    assert EvalCfg(batch_size=batch_size).batch_size == batch_size


def test_eval_cfg_default_bucket_ranges_are_the_seed_buckets() -> None:
    assert EvalCfg().bucket_ranges == [(0, 16), (16, 32), (32, 64), (64, 96), (96, 128)]


def test_eval_cfg_bucket_ranges_follow_seq_len_and_custom_bounds() -> None:
    assert EvalCfg(data=DataCfg(seq_len=64)).bucket_ranges == [(0, 16), (16, 32), (32, 64)]
    assert EvalCfg(buckets=(0, 64, 128)).bucket_ranges == [(0, 64), (64, 128)]


def test_eval_cfg_validates_buckets_against_seq_len() -> None:
    # with seq_len 32 positions run 0..30; a bucket starting at 32 holds none
    with pytest.raises(ConfigError, match="buckets"):
        EvalCfg(data=DataCfg(seq_len=32), buckets=(0, 16, 32, 64))
    with pytest.raises(ConfigError, match="buckets"):
        EvalCfg(buckets=(0, 32, 16))


# --- position buckets ------------------------------------------------------------------------------


def test_seed_buckets_constant() -> None:
    assert SEED_BUCKETS == (0, 16, 32, 64, 96, 128)


def test_default_buckets_for_128_are_the_seed_buckets() -> None:
    assert default_bucket_bounds(128) == (0, 16, 32, 64, 96, 128)
    assert position_buckets(128) == [(0, 16), (16, 32), (32, 64), (64, 96), (96, 128)]


@pytest.mark.parametrize(
    ("seq_len", "bounds"),
    [
        (2, (0, 2)),
        (16, (0, 16)),
        (17, (0, 17)),  # positions 0..15: a bucket starting at 16 would be empty
        (18, (0, 16, 18)),  # positions 0..16: [16, 18) holds position 16
        (32, (0, 16, 32)),
        (64, (0, 16, 32, 64)),
        (96, (0, 16, 32, 64, 96)),
        (100, (0, 16, 32, 64, 96, 100)),
        (129, (0, 16, 32, 64, 96, 129)),  # positions 0..127: a bucket at 128 would be empty
        (130, (0, 16, 32, 64, 96, 128, 130)),
        (256, (0, 16, 32, 64, 96, 128, 256)),
        (512, (0, 16, 32, 64, 96, 128, 256, 512)),
        (2048, (0, 16, 32, 64, 96, 128, 256, 512, 1024, 2048)),
    ],
)
def test_default_bucket_bounds_shorter_and_longer_samples(seq_len: int, bounds: tuple[int, ...]) -> None:
    assert default_bucket_bounds(seq_len) == bounds


def test_default_buckets_are_valid_and_cover_every_position() -> None:
    for seq_len in range(2, 1100):
        buckets = position_buckets(seq_len)
        positions = range(seq_len - 1)  # predictions sit at positions 0 .. seq_len-2
        assert buckets[0][0] == 0 and buckets[-1][1] == seq_len, seq_len
        for (_, hi), (lo, _) in zip(buckets, buckets[1:]):
            assert hi == lo, (seq_len, buckets)  # contiguous
        for lo, hi in buckets:
            assert lo < hi and any(lo <= p < hi for p in positions), (seq_len, lo, hi)


def test_position_buckets_custom_bounds() -> None:
    assert position_buckets(128, (0, 64, 128)) == [(0, 64), (64, 128)]
    assert position_buckets(128, [10, 20]) == [(10, 20)]  # a list works too
    # the last bucket may reach past the last position as long as it holds one
    assert position_buckets(128, (0, 126, 1000)) == [(0, 126), (126, 1000)]


@pytest.mark.parametrize("bounds", [(0, 16, 16, 32), (0, 32, 16), (5, 5), (0, 64, 32, 128)])
def test_position_buckets_rejects_non_increasing_bounds(bounds: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="strictly increasing"):
        position_buckets(128, bounds)


def test_position_buckets_rejects_negative_start() -> None:
    with pytest.raises(ConfigError, match=">= 0"):
        position_buckets(128, (-1, 16, 128))


@pytest.mark.parametrize("bounds", [(), (0,), (64,)])
def test_position_buckets_needs_two_bounds(bounds: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="at least two bounds"):
        position_buckets(128, bounds)


@pytest.mark.parametrize("bounds", [(0, 16.0, 128), (0, "16", 128), (0, True, 128)])
def test_position_buckets_rejects_non_integers(bounds: tuple[object, ...]) -> None:
    with pytest.raises(ConfigError, match="integers"):
        position_buckets(128, bounds)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seq_len", "bounds"),
    [
        (128, (0, 127, 200)),  # positions 0..126
        (128, (0, 64, 128, 256)),
        (16, (0, 16, 32)),  # positions 0..14
        (2, (0, 1, 2)),  # one position: 0
    ],
)
def test_position_buckets_rejects_a_bucket_without_positions(seq_len: int, bounds: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="holds no prediction") as err:
        position_buckets(seq_len, bounds)
    assert f"0..{seq_len - 2}" in str(err.value)


def test_position_buckets_accepts_a_last_bucket_at_the_last_position() -> None:
    assert position_buckets(128, (0, 126, 127)) == [(0, 126), (126, 127)]
    assert position_buckets(2, (0, 1)) == [(0, 1)]


@pytest.mark.parametrize(
    ("text", "bounds"),
    [
        ("0,16,32,64,96,128", (0, 16, 32, 64, 96, 128)),
        (" 0, 16 ,32 ", (0, 16, 32)),
        ("0 64 128", (0, 64, 128)),
        ("0,,64,", (0, 64)),
        ("", ()),
    ],
)
def test_parse_bounds(text: str, bounds: tuple[int, ...]) -> None:
    assert parse_bounds(text) == bounds


@pytest.mark.parametrize("text", ["0,16,x", "0;16;32", "a,b", "0,1.5,3", "[0,16]"])
def test_parse_bounds_rejects_garbage(text: str) -> None:
    with pytest.raises(ConfigError, match="buckets"):
        parse_bounds(text)


def test_parse_bounds_then_validate_empty_text() -> None:
    with pytest.raises(ConfigError, match="buckets"):
        position_buckets(128, parse_bounds(""))


# --- cache folder ----------------------------------------------------------------------------------


def test_cache_dir_honours_kvsweep_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVSWEEP_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"


def test_cache_dir_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KVSWEEP_CACHE", "~/kv")
    assert cache_dir() == tmp_path / "kv"


@pytest.mark.parametrize("value", [None, ""])
def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str | None) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("KVSWEEP_CACHE", raising=False)
    else:
        monkeypatch.setenv("KVSWEEP_CACHE", value)
    assert cache_dir() == tmp_path / ".cache" / "kvsweep"
