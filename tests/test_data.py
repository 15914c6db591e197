"""The data layer: stdlib corpus split, file loading, packing, and the resumable sharded loader (CPU, fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from indexcache_train import data
from indexcache_train.data import build_dataloader, load_packed, load_records, pack_dataset, stdlib_corpus

DOCS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int\n    y: int\n", "import os\nprint(os.sep)\n"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained on a few strings: covers any text, downloads nothing."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(DOCS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _packed(num_sequences: int, seq_len: int = 4) -> Dataset:
    """Row i is [i*seq_len, ..., i*seq_len + seq_len - 1], so a batch's first column tells the row ids."""
    ids = list(range(num_sequences * seq_len))
    return pack_dataset(Dataset.from_dict({"input_ids": [ids]}), None, seq_len)


def _row_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["input_ids"][:, 0] // batch["input_ids"].shape[1]).tolist()


# ----------------------------------------------------------------------------------------------- stdlib corpus
def test_stdlib_split_is_deterministic_disjoint_and_non_empty():
    train, val = stdlib_corpus("train"), stdlib_corpus("validation")
    train_paths, val_paths = list(train["path"]), list(val["path"])
    assert train_paths and val_paths and not set(train_paths) & set(val_paths)
    assert train_paths == sorted(train_paths) and val_paths == sorted(val_paths)
    assert 0.005 < len(val_paths) / (len(train_paths) + len(val_paths)) < 0.05
    assert all(text for text in val["text"])
    skipped = {"site-packages", "dist-packages", "test", "tests"}
    assert not any(skipped & set(path.split("/")) for path in train_paths + val_paths)

    # The split must not depend on Python's per-process hash randomisation.
    code = "from indexcache_train.data import stdlib_corpus; print('\\n'.join(stdlib_corpus('validation')['path']))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.split() == val_paths


def test_stdlib_unknown_split():
    with pytest.raises(ValueError, match="'train' and 'validation'"):
        stdlib_corpus("test")


def test_load_packed_defaults_to_stdlib(tokenizer):
    packed = load_packed(seq_len=64, tokenizer=tokenizer, split="validation", max_records=2)
    assert len(packed) > 0 and len(packed[0]["input_ids"]) == 64


# ------------------------------------------------------------------------------------------------ user data
@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "txt"])
def test_load_records_formats(tmp_path, fmt):
    files = []
    for i, doc in enumerate(DOCS):
        path = tmp_path / f"part{i}.{fmt}"
        if fmt == "jsonl":
            _write_jsonl(path, [{"text": doc, "meta": i}])
        elif fmt == "parquet":
            pq.write_table(pa.table({"text": [doc], "meta": [i]}), path)
        else:
            path.write_text(doc)
        files.append(path)

    # A list, a glob and a single path all work; a .txt file is one document.
    by_list = load_records(files, cache_dir=tmp_path / "cache")
    by_glob = load_records(str(tmp_path / f"*.{fmt}"), cache_dir=tmp_path / "cache")
    assert by_list["text"] == by_glob["text"] == DOCS
    assert load_records(files[1], cache_dir=tmp_path / "cache")["text"] == [DOCS[1]]


def test_custom_text_field(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"content": doc} for doc in DOCS])
    packed = load_packed(path, seq_len=8, tokenizer=tokenizer, text_field="content", cache_dir=tmp_path / "cache")
    assert len(packed) > 0


def test_input_ids_records_pack_without_tokenizer(tmp_path):
    rows = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6, 7, 8]}]
    path = _write_jsonl(tmp_path / "ids.jsonl", rows)
    packed = load_packed(path, seq_len=3, tokenizer=None, cache_dir=tmp_path / "cache")
    assert packed["input_ids"] == [[1, 2, 3], [4, 5, 6]]  # verbatim, no EOS added; the tail [7, 8] is dropped


def test_packing_keeps_order_and_exact_lengths(tokenizer):
    seq_len, eos = 5, tokenizer.eos_token_id
    stream = [t for doc in DOCS for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]]
    packed = pack_dataset(Dataset.from_dict({"text": DOCS}), tokenizer, seq_len)
    rows = packed["input_ids"]
    assert len(rows) == len(stream) // seq_len
    assert all(len(row) == seq_len for row in rows)
    assert [t for row in rows for t in row] == stream[: len(rows) * seq_len]
    assert eos in stream[: len(rows) * seq_len]  # documents are separated by EOS

    no_eos = pack_dataset(Dataset.from_dict({"text": DOCS}), tokenizer, seq_len, append_eos=False)
    assert eos not in [t for row in no_eos["input_ids"] for t in row]


# ------------------------------------------------------------------------------------------------ clear errors
def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"\*.parquet"):
        load_records(str(tmp_path / "*.parquet"))


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        load_records(tmp_path / "empty.jsonl")


def test_unreadable_file_is_named(tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="bad.jsonl as json"):
        load_records([good, bad], cache_dir=tmp_path / "cache")


def test_unknown_extension(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="data.csv"):
        load_records(tmp_path / "data.csv")


def test_no_text_or_input_ids_column(tmp_path):
    path = _write_jsonl(tmp_path / "other.jsonl", [{"body": "hello"}])
    with pytest.raises(ValueError, match=r"other.jsonl has neither a 'text' nor an 'input_ids' column.*'body'"):
        load_records(path, cache_dir=tmp_path / "cache")


def test_too_little_data_for_one_sequence(tokenizer):
    with pytest.raises(ValueError, match=r"holds 3 tokens, fewer than one sequence of seq_len=4"):
        pack_dataset(Dataset.from_dict({"input_ids": [[1, 2, 3]]}), None, 4)


def test_text_without_tokenizer():
    with pytest.raises(ValueError, match="pass a tokenizer"):
        pack_dataset(Dataset.from_dict({"text": DOCS}), None, 4)


def test_hub_failure_is_explained(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub")

    monkeypatch.setattr(data, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"hub dataset 'someone/corpus'.*network access.*local files"):
        load_records(hub_name="someone/corpus")


# ------------------------------------------------------------------------------------------------------ loader
def test_batches_are_long_tensors_of_seq_len():
    batch = next(iter(build_dataloader(_packed(8, seq_len=4), 2, seed=0)))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 4)


def test_ranks_are_disjoint_and_cover_the_data():
    packed = _packed(24)
    seen = []
    for rank in range(2):
        loader = build_dataloader(packed, 3, seed=7, rank=rank, world_size=2)
        assert len(loader) == 4
        seen.append([i for batch in loader for i in _row_ids(batch)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))


def test_drop_last_false_covers_everything_in_step():
    packed = _packed(11)
    loaders = [build_dataloader(packed, 4, seed=0, rank=r, world_size=2, drop_last=False) for r in range(2)]
    per_rank = [[_row_ids(batch) for batch in loader] for loader in loaders]
    assert [len(b) for b in per_rank[0]] == [len(b) for b in per_rank[1]] == [4, 2]  # ranks stay in step
    assert set(i for batches in per_rank for b in batches for i in b) == set(range(11))


def test_same_seed_same_order_different_seed_differs():
    packed = _packed(32)

    def order(seed: int) -> list[list[int]]:
        return [_row_ids(batch) for batch in build_dataloader(packed, 4, seed=seed)]

    assert order(3) == order(3)
    assert order(3) != order(4)


def test_finite_loader_reshuffles_each_epoch():
    loader = build_dataloader(_packed(32), 4, seed=0)
    first, second = [[_row_ids(b) for b in loader] for _ in range(2)]
    assert len(first) == len(second) == 8 and first != second
    assert loader.state_dict()["epoch"] == 2


def test_resume_yields_exactly_the_remaining_batches():
    packed = _packed(20)
    # 2 ranks x batch 3 -> 3 batches per epoch per rank; 7 batches in crosses two epoch boundaries.
    loaders = [build_dataloader(packed, 3, seed=11, rank=r, world_size=2, infinite=True) for r in range(2)]
    iterators = [iter(loader) for loader in loaders]
    for it in iterators:
        list(islice(it, 7))
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    assert states[0] == states[1]  # rank 0 can save the state for everyone
    expected = [[_row_ids(b) for b in islice(it, 8)] for it in iterators]

    for rank in range(2):
        resumed = build_dataloader(packed, 3, seed=11, rank=rank, world_size=2, infinite=True)
        resumed.load_state_dict(states[0])
        assert [_row_ids(b) for b in islice(resumed, 8)] == expected[rank]


def test_resume_rejects_a_changed_layout():
    state = build_dataloader(_packed(16), 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="batch_size: saved 4, now 2"):
        build_dataloader(_packed(16), 2, seed=0).load_state_dict(state)


def test_too_few_sequences_for_a_global_batch():
    with pytest.raises(ValueError, match="3 packed sequences cannot fill one global batch of 2 x 2"):
        build_dataloader(_packed(3), 2, seed=0, world_size=2)
