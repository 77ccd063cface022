"""Samples: documents joined by EOS, windows, deterministic disjoint selection, the tokenized cache."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvsweep import data as kdata
from kvsweep.config import ConfigError, DataCfg, MissingFileError
from kvsweep.data import DataError, load_samples, resolve_source, to_windows, tokenize_stream

from .conftest import SAMPLE_TEXT


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE_TEXT * 3)
    return path


def _rows(ids: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in ids}


def test_documents_are_joined_by_eos_and_cut_into_windows(small_tokenizer):
    docs = ["alpha beta gamma", "delta epsilon", "zeta"]
    stream = tokenize_stream(docs, small_tokenizer)
    eos = small_tokenizer.eos_token_id
    expected: list[int] = []
    for i, d in enumerate(docs):
        if i:
            expected.append(eos)
        expected += small_tokenizer(d, add_special_tokens=False)["input_ids"]
    assert stream.tolist() == expected
    windows = to_windows(stream, 4)  # (n_windows, 4): consecutive, non-overlapping, remainder dropped
    assert windows.shape == (len(expected) // 4, 4)
    assert windows.reshape(-1).tolist() == expected[: windows.size]


def test_single_file_gives_disjoint_train_val_and_test_ranges(text_file, small_tokenizer):
    cfg = DataCfg(source=str(text_file), seq_len=16, train_samples="all", val_samples="all", val_fraction=0.25, test_fraction=0.2)
    s = load_samples(cfg, small_tokenizer, log=lambda m: None)
    lo, hi = s.info["val_range"]
    n = s.info["eval_windows"]
    assert s.info["test_range"] == [hi, n] and s.info["train_range"] == [0, lo]
    assert len(s.val) == hi - lo == round(n * 0.25) and len(s.test) == n - hi == round(n * 0.2)
    assert len(s.train) == lo
    # the samples are exactly the file's windows, in their ranges: train, then validation, then test
    stream = tokenize_stream([text_file.read_text()], small_tokenizer)
    windows = to_windows(stream, 16)
    np.testing.assert_array_equal(s.train, windows[:lo])
    np.testing.assert_array_equal(s.val, windows[lo:hi])
    np.testing.assert_array_equal(s.test, windows[hi:n])  # (the text repeats, so only the window indices are disjoint)


def test_single_file_evaluated_at_a_longer_length_keeps_the_ranges_apart_in_tokens(text_file, small_tokenizer):
    cfg = DataCfg(source=str(text_file), seq_len=16, eval_seq_len=40, train_samples="all", val_samples="all", test_samples="all")
    s = load_samples(cfg, small_tokenizer, log=lambda m: None)
    assert s.train.shape[1] == 16 and s.val.shape[1] == s.test.shape[1] == s.eval_len == 40
    stream = tokenize_stream([text_file.read_text()], small_tokenizer)
    lo, hi = s.info["val_range"]
    n = s.info["eval_windows"]
    assert n == len(stream) // 40 and len(s.val) == round(n * 0.1) and len(s.test) == round(n * 0.1)
    np.testing.assert_array_equal(s.val, to_windows(stream, 40)[lo:hi])
    np.testing.assert_array_equal(s.test, to_windows(stream, 40)[hi:n])
    train_tokens = len(s.train) * 16
    assert train_tokens <= lo * 40 < train_tokens + 16  # every train window ends before validation starts
    np.testing.assert_array_equal(s.train.reshape(-1), stream[:train_tokens])


def test_without_a_test_set_the_ranges_stay_and_test_is_empty(text_file, small_tokenizer):
    with_test = load_samples(DataCfg(source=str(text_file), seq_len=16, train_samples="all"), small_tokenizer, log=lambda m: None)
    no_test = load_samples(DataCfg(source=str(text_file), seq_len=16, train_samples="all", test_samples=0), small_tokenizer,
                           log=lambda m: None)
    np.testing.assert_array_equal(with_test.train, no_test.train)  # the test range is kept out of training either way
    np.testing.assert_array_equal(with_test.val, no_test.val)
    assert len(with_test.test) > 0 and no_test.test.shape == (0, 16) and no_test.info["test_samples"] == 0
    with pytest.raises(DataError, match=r"test samples.*raise test_fraction"):
        load_samples(DataCfg(source=str(text_file), seq_len=16, test_samples=10**4), small_tokenizer, log=lambda m: None)


def test_selection_is_deterministic_and_seeded(text_file, small_tokenizer):
    def pick(seed):
        cfg = DataCfg(source=str(text_file), seq_len=16, train_samples=20, val_samples=10, test_samples=5, seed=seed, val_fraction=0.3)
        return load_samples(cfg, small_tokenizer, log=lambda m: None)

    a, b, c = pick(0), pick(0), pick(1)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert a.train.shape == (20, 16) and a.val.shape == (10, 16)
    assert not np.array_equal(a.train, c.train)
    lo = a.info["val_range"][0]
    windows = to_windows(tokenize_stream([text_file.read_text()], small_tokenizer), 16)
    hi = a.info["val_range"][1]
    assert _rows(a.train) <= _rows(windows[:lo])  # train only from the train range
    assert _rows(a.val) <= _rows(windows[lo:hi])  # validation only from the validation range
    assert _rows(a.test) <= _rows(windows[hi:]) and not np.array_equal(a.test, c.test)  # test too, picked by the seed


def test_train_val_and_test_come_from_the_three_splits_of_tiny(small_tokenizer):
    cfg = DataCfg(source="tiny", seq_len=32, eval_seq_len=64, train_samples=50, val_samples=20, test_samples=10)
    s = load_samples(cfg, small_tokenizer, log=lambda m: None)
    from kvsweep.corpus import tiny_corpus

    corpus = tiny_corpus()
    assert s.train.shape == (50, 32) and s.val.shape == (20, 64) and s.test.shape == (10, 64)
    assert _rows(s.val) <= _rows(to_windows(tokenize_stream(corpus["validation"], small_tokenizer), 64))
    assert _rows(s.test) <= _rows(to_windows(tokenize_stream(corpus["test"], small_tokenizer), 64))
    assert _rows(s.train) <= _rows(to_windows(tokenize_stream(corpus["train"], small_tokenizer), 32))
    assert not _rows(s.val) & _rows(s.test)
    assert (s.info["val_split"], s.info["test_split"], s.info["train_split"]) == ("validation", "test", "train")


def test_tiny_corpus_splits_hold_disjoint_whole_topics():
    from pydoc_data.topics import topics

    from kvsweep.corpus import tiny_corpus

    c = tiny_corpus()
    assert c["train"] and c["validation"] and c["test"]
    docs = {part: set(c[part]) for part in c}
    assert not docs["train"] & docs["validation"] and not docs["train"] & docs["test"] and not docs["validation"] & docs["test"]
    assert set().union(*docs.values()) == set(topics.values())  # every topic whole, in exactly one split
    total = sum(map(len, topics.values()))
    held = {part: sum(map(len, c[part])) / total for part in ("validation", "test")}
    assert 0.1 <= held["validation"] < 0.2 and 0.05 <= held["test"] <= 0.1


def test_a_tiny_corpus_file_is_cut_into_three_parts(tmp_path):
    from kvsweep.corpus import tiny_corpus

    path = tmp_path / "corpus.txt"
    lines = [f"line {i:03d} " + "x" * 20 + "\n" for i in range(100)]  # lines of one length: the cuts fall on lines 80, 90
    path.write_text("".join(lines))
    c = tiny_corpus(str(path))
    assert "".join(c["train"] + c["validation"] + c["test"]) == "".join(lines)
    assert c["validation"][0].startswith("line 080 ") and c["test"][0].startswith("line 090 ")


def test_a_hub_source_without_a_test_split_says_how_to_leave_it_out(small_tokenizer, monkeypatch):
    def documents(source, split, text_field):
        if split == "test":
            raise DataError("data: cannot load split 'test' of someone/dataset from the Hugging Face hub: no such split")
        return [SAMPLE_TEXT]

    monkeypatch.setattr(kdata, "load_documents", documents)
    cfg = DataCfg(source="someone/dataset", seq_len=16, val_samples=4)
    with pytest.raises(DataError, match="--test-samples 0"):
        load_samples(cfg, small_tokenizer, log=lambda m: None)
    s = load_samples(DataCfg(source="someone/dataset", seq_len=16, val_samples=4, test_samples=0), small_tokenizer, log=lambda m: None)
    assert s.val.shape == (4, 16) and s.test.shape == (0, 16) and s.info["test_split"] is None


def test_cache_is_reused_without_a_second_tokenization(text_file, small_tokenizer, monkeypatch):
    cfg = DataCfg(source=str(text_file), seq_len=24, train_samples=10, val_samples=5, seed=3)
    first = load_samples(cfg, small_tokenizer, log=lambda m: None)

    def fail(*a, **k):
        raise AssertionError("tokenized a second time")

    monkeypatch.setattr(kdata, "tokenize_stream", fail)
    monkeypatch.setattr(kdata, "load_documents", fail)
    second = load_samples(cfg, small_tokenizer, log=lambda m: None)
    assert not first.info["cache_hit"] and second.info["cache_hit"]
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.val, second.val)
    # another seed selects from the same cached windows; the mapped windows are not copied into memory
    third = load_samples(DataCfg(source=str(text_file), seq_len=24, train_samples=10, val_samples=5, seed=4), small_tokenizer)
    assert third.info["cache_hit"]
    w = kdata.load_windows(resolve_source(cfg), None, "text", small_tokenizer, 24)
    assert w.cache_hit and not w.ids.flags.owndata and w.path.suffix == ".arrow"


def test_cache_key_changes_with_content_seq_len_and_tokenizer(text_file, small_tokenizer):
    src = resolve_source(DataCfg(source=str(text_file)))
    a = kdata.load_windows(src, None, "text", small_tokenizer, 16, log=lambda m: None)
    assert kdata.load_windows(src, None, "text", small_tokenizer, 32, log=lambda m: None).path != a.path
    from kvsweep.tiny import train_tokenizer

    other = train_tokenizer([SAMPLE_TEXT], 300)
    assert kdata.load_windows(src, None, "text", other, 16, log=lambda m: None).path != a.path
    time.sleep(0.01)
    text_file.write_text(SAMPLE_TEXT * 4)
    assert kdata.load_windows(src, None, "text", small_tokenizer, 16, log=lambda m: None).path != a.path


def test_jsonl_and_parquet_rows_are_documents(tmp_path, small_tokenizer):
    docs = ["first document " * 30, "second one " * 40, "third " * 50]
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    pqf = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": docs}), pqf)
    expected = to_windows(tokenize_stream(docs, small_tokenizer), 8)
    a = load_samples(DataCfg(source=str(jl), seq_len=8, val_fraction=1.0, test_fraction=0), small_tokenizer, log=lambda m: None)
    b = load_samples(DataCfg(source=str(pqf), seq_len=8, val_fraction=1.0, test_fraction=0, text_field="body"), small_tokenizer,
                     log=lambda m: None)
    np.testing.assert_array_equal(a.val, expected)
    np.testing.assert_array_equal(b.val, expected)
    with pytest.raises(DataError, match="text_field"):
        load_samples(DataCfg(source=str(pqf), seq_len=8, val_fraction=1.0, test_fraction=0), small_tokenizer)


def test_too_few_tokens_names_both_counts(text_file, small_tokenizer):
    windows = to_windows(tokenize_stream([text_file.read_text()], small_tokenizer), 64)
    n_val = round(len(windows) * 0.1)
    cfg = DataCfg(source=str(text_file), seq_len=64, val_samples=n_val + 5)
    with pytest.raises(DataError) as e:
        load_samples(cfg, small_tokenizer, log=lambda m: None)
    msg = str(e.value)
    assert f"{n_val:,} windows" in msg and f"{n_val + 5:,} validation samples" in msg and "val_fraction" in msg
    with pytest.raises(DataError, match="train samples"):
        load_samples(DataCfg(source=str(text_file), seq_len=64, train_samples=10**6), small_tokenizer, log=lambda m: None)


def test_bad_sources(tmp_path):
    with pytest.raises(MissingFileError):
        resolve_source(DataCfg(source=str(tmp_path / "missing.txt")))
    with pytest.raises(MissingFileError):
        resolve_source(DataCfg(source="./nowhere/file.jsonl"))
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_source(DataCfg(source="wikitext-7"))
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(ConfigError, match="suffix"):
        resolve_source(DataCfg(source=str(tmp_path / "x.bin")))
    with pytest.raises(ConfigError, match="folder"):
        resolve_source(DataCfg(source=str(tmp_path)))
    assert resolve_source(DataCfg(source="wikitext-2")).config_name == "wikitext-2-raw-v1"
    assert resolve_source(DataCfg(source="someone/dataset")).kind == "hub"


def test_hub_dataset_while_offline_is_a_clear_error(small_tokenizer):
    t0 = time.monotonic()
    with pytest.raises(DataError, match="local file") as e:
        load_samples(DataCfg(source="wikitext-2", val_samples=10), small_tokenizer, log=lambda m: None)
    assert "Salesforce/wikitext" in str(e.value)
    assert time.monotonic() - t0 < 60


def test_pythia_tokenizer_encodes_hello_world(pythia_tokenizer_path):
    from kvsweep.models import load_tokenizer

    tok = load_tokenizer(str(pythia_tokenizer_path))
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [12092, 1533]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0


def test_wikitext_flows_through_the_pipeline(wikitext_valid, pythia_tokenizer_path):
    from kvsweep.models import load_tokenizer

    tok = load_tokenizer(str(pythia_tokenizer_path))
    cfg = DataCfg(source=str(wikitext_valid), seq_len=128, eval_seq_len=2048, train_samples=1000, val_samples="all")
    s = load_samples(cfg, tok, log=lambda m: None)
    assert s.info["total_tokens"] == 251_183  # one document, so no EOS is added
    n = 251_183 // 2048  # 122 windows of 2048 tokens: 12 validation, 12 test, the tokens before them train
    assert s.info["val_range"] == [n - 24, n - 12] and s.info["test_range"] == [n - 12, n]
    assert s.train.shape == (1000, 128) and s.val.shape == (12, 2048) and s.test.shape == (12, 2048)
    assert s.info["train_range"] == [0, (n - 24) * 16]
    assert s.val.max() < 50_304
    text = tok.decode(s.val[0].tolist())
    assert isinstance(text, str) and len(text) > 100


# --- encodings ---------------------------------------------------------------------------------------

LATIN1 = "Größe und Maß, déjà vu, naïve façade.\n" * 30


def test_latin1_text_is_a_data_error_naming_file_offset_and_encoding(tmp_path, small_tokenizer):
    path = tmp_path / "latin1.txt"
    path.write_bytes(LATIN1.encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_samples(DataCfg(source=str(path), seq_len=8), small_tokenizer, log=lambda m: None)
    msg = str(e.value)
    offset = LATIN1.encode("latin-1").index(b"\xf6")  # the first non-ASCII byte: "ö"
    assert str(path) in msg and f"offset {offset}" in msg and "0xf6" in msg and "--encoding" in msg and "utf-8" in msg
    s = load_samples(DataCfg(source=str(path), seq_len=8, encoding="latin-1"), small_tokenizer, log=lambda m: None)
    expected = to_windows(tokenize_stream([LATIN1], small_tokenizer), 8)
    lo, hi = s.info["val_range"]
    np.testing.assert_array_equal(s.val, expected[lo:hi])


def test_binary_bytes_in_a_text_file_name_the_offset(tmp_path, small_tokenizer):
    path = tmp_path / "mixed.txt"
    head = (SAMPLE_TEXT * 2).encode()
    path.write_bytes(head + b"\xff\xd8\xff\xe0" + SAMPLE_TEXT.encode())
    with pytest.raises(DataError, match=rf"offset {len(head)}\b") as e:
        load_samples(DataCfg(source=str(path), seq_len=8), small_tokenizer, log=lambda m: None)
    assert f"line {(SAMPLE_TEXT * 2).count(chr(10)) + 1}" in str(e.value)


def test_jsonl_decoding_error_names_the_line(tmp_path, small_tokenizer):
    path = tmp_path / "docs.jsonl"
    good = json.dumps({"text": "plain ascii " * 20}) + "\n"
    bad = json.dumps({"text": "déjà vu " * 20}, ensure_ascii=False) + "\n"
    raw = (good * 2).encode() + bad.encode("latin-1") + good.encode()
    path.write_bytes(raw)
    with pytest.raises(DataError) as e:
        load_samples(DataCfg(source=str(path), seq_len=8, val_fraction=1.0, test_fraction=0), small_tokenizer, log=lambda m: None)
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and f"offset {raw.index(bytes([0xe9]))}" in msg and "--encoding" in msg
    s = load_samples(DataCfg(source=str(path), seq_len=8, val_fraction=1.0, test_fraction=0, encoding="cp1252"), small_tokenizer,
                     log=lambda m: None)
    assert len(s.val) > 0


def test_malformed_json_line_is_a_data_error_naming_the_line(tmp_path, small_tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "unterminated\n')
    with pytest.raises(DataError, match=r"line 2"):
        load_samples(DataCfg(source=str(path), seq_len=8, val_fraction=1.0, test_fraction=0), small_tokenizer, log=lambda m: None)


def test_cache_key_changes_with_the_encoding(tmp_path, small_tokenizer):
    path = tmp_path / "ascii.txt"
    path.write_text(SAMPLE_TEXT)  # the same documents in either encoding, but another decoding
    a = kdata.load_windows(resolve_source(DataCfg(source=str(path))), None, "text", small_tokenizer, 16, log=lambda m: None)
    b = kdata.load_windows(resolve_source(DataCfg(source=str(path), encoding="latin-1")), None, "text", small_tokenizer, 16,
                           log=lambda m: None)
    assert a.path != b.path and not b.cache_hit


def test_train_used_selects_the_first_of_the_same_samples(text_file, small_tokenizer):
    cfg = DataCfg(source=str(text_file), seq_len=16, train_samples=20, val_samples=5, seed=2)
    full = load_samples(cfg, small_tokenizer, log=lambda m: None)
    few = load_samples(cfg, small_tokenizer, log=lambda m: None, train_used=6)
    np.testing.assert_array_equal(few.train, full.train[:6])
    np.testing.assert_array_equal(few.val, full.val)
    none = load_samples(cfg, small_tokenizer, log=lambda m: None, train_used=0)
    assert none.train.shape == (0, 16)
    # more than the source has: all of them, no error
    many = load_samples(DataCfg(source=str(text_file), seq_len=16, train_samples=10_000), small_tokenizer,
                        log=lambda m: None, train_used=10_000)
    assert len(many.train) == many.info["train_range"][1]


def test_train_used_from_a_source_without_train_windows_is_a_clear_error(tmp_path, small_tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("one two three four five six seven eight nine ten")  # one window of 32 tokens: validation
    with pytest.raises(DataError, match="no windows"):
        load_samples(DataCfg(source=str(path), seq_len=32, train_samples="all", test_fraction=0), small_tokenizer, log=lambda m: None,
                     train_used=4)
