"""Pretraining data: formats, errors naming file and line, the token cache, packing, the held-out split and the
resumable, rank-sharded batch order."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from qwenlite.errors import QwenliteError
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.train import data as data_module
from qwenlite.train.data import (
    BatchIterator,
    PackedSequences,
    held_out_batches,
    list_data_files,
    pack_corpus,
    split_sequences,
    tokenize_corpus,
)
from qwenlite.train.tokenizer_train import train_tokenizer

from train_helpers import write_jsonl_corpus


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_tok")
    train_tokenizer([write_jsonl_corpus(root / "c.jsonl")], 320, root / "tok", show_progress=False)
    return root / "tok"


def expected_ids(tokenizer_dir, documents: list[str]) -> list[int]:
    tok = Tokenizer.from_dir(tokenizer_dir)
    eos = tok.token_to_id("<|endoftext|>")
    return [i for doc in documents for i in (*tok.encode(doc), eos)]


def test_text_jsonl_and_parquet_documents_in_order(tmp_path, tokenizer_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path / "data"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("the cat sees the dog.\n\nA second paragraph, same document.\n")
    (root / "b" / "c.jsonl").write_text('{"text": "the owl eats."}\n\n{"text": "", "id": 2}\n{"text": "the fox."}\n')
    pq.write_table(pa.table({"text": ["row one", "", "row three"], "n": [1, 2, 3]}), root / "b" / "d.parquet")
    (root / "notes.csv").write_text("ignored: not a data suffix")
    assert [p.name for p in list_data_files([root])] == ["a.txt", "c.jsonl", "d.parquet"]

    corpus = tokenize_corpus([root], tokenizer_dir, tmp_path / "cache", show_progress=False)
    documents = ["the cat sees the dog.\n\nA second paragraph, same document.\n", "the owl eats.", "the fox.",
                 "row one", "row three"]  # fmt: skip
    assert corpus.tokens.tolist() == expected_ids(tokenizer_dir, documents)
    assert corpus.num_documents == 5 and corpus.tokens.dtype == np.uint32


def test_special_token_strings_in_raw_text_stay_text(tmp_path, tokenizer_dir):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "a <|im_start|> b <|endoftext|> c"}) + "\n")
    corpus = tokenize_corpus([path], tokenizer_dir, tmp_path / "cache", show_progress=False)
    tok = Tokenizer.from_dir(tokenizer_dir)
    ids = corpus.tokens.tolist()
    assert tok.token_to_id("<|im_start|>") not in ids
    assert ids.count(corpus.eos_id) == 1 and ids[-1] == corpus.eos_id  # only the separator
    assert tok.decode(ids[:-1]) == "a <|im_start|> b <|endoftext|> c"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": "no closing quote}\n', r"bad\.jsonl:2: malformed JSON"),
        ('{"text": "ok"}\n\n{"body": "x", "id": 3}\n', r'bad\.jsonl:3: no "text" field \(keys: body, id\)'),
        ('{"text": ["a"]}\n', r'bad\.jsonl:1: "text" must be a string, got list'),
        ('["text"]\n', r"bad\.jsonl:1: expected an object"),
        (b'{"text": "\xff"}\n', r"bad\.jsonl:1: malformed JSON"),
    ],
    ids=["malformed", "missing-text", "not-a-string", "not-an-object", "not-utf8"],
)
def test_bad_jsonl_names_file_and_line_and_keeps_the_cache(tmp_path, tokenizer_dir, content, message):
    good = write_jsonl_corpus(tmp_path / "good.jsonl", documents=5)
    cache = tmp_path / "cache"
    before = tokenize_corpus([good], tokenizer_dir, cache, show_progress=False)
    snapshot = {p.name: p.read_bytes() for p in cache.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(QwenliteError, match=message):
        tokenize_corpus([good, bad], tokenizer_dir, cache, show_progress=False)
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == snapshot  # nothing lost, no temporary left
    assert tokenize_corpus([good], tokenizer_dir, cache, show_progress=False).sha256 == before.sha256


def test_empty_corpus_is_an_error(tmp_path, tokenizer_dir):
    (tmp_path / "a.jsonl").write_text('{"text": ""}\n\n')
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(QwenliteError, match=r"no text in .*a\.jsonl, .*b\.txt: the corpus is empty"):
        tokenize_corpus([tmp_path / "a.jsonl", tmp_path / "b.txt"], tokenizer_dir, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_bad_parquet_and_paths(tmp_path, tokenizer_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "null.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe")
    cases = {
        "nocol.parquet": r'nocol\.parquet: no "text" column \(columns: body\)',
        "null.parquet": r'null\.parquet: row 2: "text" is null',
        "junk.parquet": r"junk\.parquet: not a readable Parquet file",
        "bad.txt": r"bad\.txt:2: not UTF-8 text",
        "missing.jsonl": r"missing\.jsonl: no such file",
    }
    for name, message in cases.items():
        with pytest.raises(QwenliteError, match=message):
            tokenize_corpus([tmp_path / name], tokenizer_dir, tmp_path / "cache", show_progress=False)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(QwenliteError, match=r"x\.csv: unsupported data file"):
        list_data_files([tmp_path / "x.csv"])


def test_second_run_reuses_the_token_cache(tmp_path, tokenizer_dir, monkeypatch):
    corpus_file = write_jsonl_corpus(tmp_path / "c.jsonl", documents=50)
    first = tokenize_corpus([corpus_file], tokenizer_dir, tmp_path / "cache", show_progress=False)
    assert not first.from_cache
    mtime = first.cache_path.stat().st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_module, "_write_cache", no_tokenizing)
    second = tokenize_corpus([corpus_file], tokenizer_dir, tmp_path / "cache", show_progress=False)
    assert second.from_cache and second.cache_path.stat().st_mtime_ns == mtime
    assert np.array_equal(second.tokens, first.tokens) and second.sha256 == first.sha256
    monkeypatch.undo()

    # a changed input file (size or mtime) is tokenized again, into a cache entry of its own
    write_jsonl_corpus(corpus_file, documents=51)
    third = tokenize_corpus([corpus_file], tokenizer_dir, tmp_path / "cache", show_progress=False)
    assert not third.from_cache and third.cache_path != first.cache_path
    # a truncated cache file is not trusted
    with open(third.cache_path, "r+b") as f:
        f.truncate(8)
    os.utime(corpus_file, ns=(corpus_file.stat().st_atime_ns, corpus_file.stat().st_mtime_ns))
    assert not tokenize_corpus([corpus_file], tokenizer_dir, tmp_path / "cache", show_progress=False).from_cache


def test_packing_overlaps_windows_by_one_token():
    tokens = np.arange(23, dtype=np.uint32)
    data = PackedSequences(tokens, seq_len=5)
    assert data.num_sequences == 4  # 22 targets // 5; the tail is dropped
    windows = data.get([0, 3])
    assert windows.dtype == torch.int64 and windows.tolist() == [[0, 1, 2, 3, 4, 5], [15, 16, 17, 18, 19, 20]]
    targets = torch.cat([data.get([i])[0, 1:] for i in range(4)])
    assert targets.tolist() == list(range(1, 21))  # every token after the first is a target once


def test_held_out_split_spreads_over_the_corpus():
    train, held = split_sequences(100, 0.1)
    assert held.tolist() == list(range(9, 100, 10))
    assert sorted([*train, *held]) == list(range(100)) and not set(train) & set(held)
    assert split_sequences(5, 0.01)[1].tolist() == [4]  # at least one
    assert split_sequences(5, 0.0)[1].tolist() == []


def test_too_small_a_corpus_is_an_error(tmp_path, tokenizer_dir):
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "the cat."}\n')
    corpus = tokenize_corpus([path], tokenizer_dir, tmp_path / "cache", show_progress=False)
    with pytest.raises(QwenliteError, match=r"tiny\.jsonl\) has \d+ tokens: too few"):
        pack_corpus(corpus, seq_len=64, val_fraction=0.1)


def test_batches_are_deterministic_resumable_and_sharded_by_rank():
    data = PackedSequences(np.arange(10 * 4 + 1, dtype=np.uint32), seq_len=4)
    train = np.arange(10)
    one = BatchIterator(data, train, batch_size=4, seed=7)
    stream = [one.next() for _ in range(6)]  # 24 windows: 2.4 epochs
    seen = torch.cat(stream)[:20, 0].div(4).long().tolist()
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # each epoch once
    assert seen[:10] != seen[10:20]  # reshuffled per epoch
    again = BatchIterator(data, train, batch_size=4, seed=7)
    again.load_state_dict({"position": 8})
    assert all(torch.equal(again.next(), b) for b in stream[2:])  # restored position, same stream
    # two ranks of batch 2: together, exactly the one-process batches of 4
    ranks = [BatchIterator(data, train, batch_size=2, seed=7, rank=r, world_size=2) for r in range(2)]
    for b in stream:
        assert torch.equal(torch.cat([r.next() for r in ranks]), b)
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


def test_held_out_batches_give_every_rank_the_same_count():
    data = PackedSequences(np.arange(7 * 3 + 1, dtype=np.uint32), seq_len=3)
    held = np.arange(7)
    shares = [list(held_out_batches(data, held, batch_size=2, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shares}) == 1
    weights = torch.cat([w for s in shares for _, w in s])
    assert weights.sum() == 7
    firsts = sorted(int(b[i, 0]) // 3 for s in shares for b, w in s for i in range(len(w)) if w[i])
    assert firsts == list(range(7))
