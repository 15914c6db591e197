"""Data: records from local files, the hub or the embedded stdlib corpus, packed into fixed-length token rows.

The pipeline is

    load_records / stdlib_corpus  ->  pack_dataset  ->  build_dataloader
    (Dataset of text or input_ids)    (Dataset of input_ids rows, each exactly seq_len long)
                                                        (PackedLoader: seeded shuffle, rank shards, exact resume)

and `load_packed` chains the first two. Indexer distillation only needs a realistic token stream through the
frozen model, so documents are concatenated with EOS between them and cut into rows; no padding, no masks.

**Embedded default corpus.** When the user gives no data, we train on the Python standard library's own `.py`
sources, read at run time from the running interpreter: real text that every machine has, and none of it is
copied into this repository. Left out: empty files, `site-packages`/`dist-packages` (third-party code), `test`/`tests`/
`idle_test` folders (deliberately odd inputs, some not UTF-8) and any file that does not decode as UTF-8.
Everything else, `idlelib` and `lib2to3` included, is ordinary Python and stays. The split is by file, from a
SHA-256 of the relative path, so every machine with the same Python version gets the same split.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from glob import glob
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, load_dataset
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    TokenizerOrLoader = PreTrainedTokenizerBase | Callable[[], PreTrainedTokenizerBase] | None

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

STDLIB_VALIDATION_FRACTION = 0.02
_STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})

# Extension -> `datasets` packaged builder. A trailing compression suffix (.gz, .zst, ...) is allowed:
# `datasets` decompresses local files transparently.
_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSION_SUFFIXES = frozenset({".gz", ".bz2", ".xz", ".zst", ".lz4"})


# ---------------------------------------------------------------------------------------------- stdlib corpus
def stdlib_corpus(split: str = "train") -> Dataset:
    """The running interpreter's standard library sources as an in-memory Dataset with `path` and `text` columns.

    `split` is "train" (~98% of the files) or "validation" (~2%). Rows are sorted by path relative to the stdlib
    root; which side a file falls on depends only on that path, so the split is the same on every machine and in
    every process (no `hash()` randomisation). The Dataset lives in memory (~12 MB of text): nothing is written
    to the Hugging Face cache.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"The stdlib corpus has splits 'train' and 'validation', got {split!r}.")
    root = Path(sysconfig.get_paths()["stdlib"])
    paths, texts = [], []
    for rel_path, text in _stdlib_sources(root):
        if _in_validation(rel_path) == (split == "validation"):
            paths.append(rel_path)
            texts.append(text)
    if not paths:
        raise FileNotFoundError(
            f"Found no standard library .py sources under {root} for split {split!r} (a zipped or frozen stdlib?). "
            "Pass data files instead."
        )
    return Dataset.from_dict({"path": paths, "text": texts})


def _stdlib_sources(root: Path) -> list[tuple[str, str]]:
    """(POSIX path relative to `root`, UTF-8 text) for every kept `.py` file, sorted by path."""
    sources = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIPPED_DIRS]  # prune: site-packages is huge
        for filename in filenames:
            if not filename.endswith(".py"):
                continue
            path = Path(dirpath, filename)
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # unreadable or, rarely, a latin-1 coding cookie: not worth a special case
            if text.strip():  # many __init__.py files are empty
                sources.append((path.relative_to(root).as_posix(), text))
    return sorted(sources)


def _in_validation(rel_path: str) -> bool:
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < STDLIB_VALIDATION_FRACTION * 2**64


# ------------------------------------------------------------------------------------------------- user data
def load_records(
    files: PathLike | Sequence[PathLike] | None = None,
    hub_name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    *,
    hub_config: str | None = None,
    cache_dir: PathLike | None = None,
) -> Dataset:
    """Load user records holding either text (column `text_field`) or ready token ids (column `input_ids`).

    Args:
        files: a path, a glob (`data/*.jsonl`, `**` allowed) or a list of them. The format comes from the
            extension: `.jsonl`/`.json` (one JSON object per line), `.parquet`, or `.txt` (one file = one
            document), optionally compressed (`.jsonl.gz`, `.txt.zst`, ...). All files must share one format.
        hub_name: a Hugging Face hub dataset name instead of files; needs network access unless it is cached.
        split: the hub split to read. Local files always form a single split: pass other files for validation.
        text_field: the column holding the text.
        hub_config: the hub dataset's configuration name, when it has several (e.g. "wikitext-2-raw-v1").
        cache_dir: where `datasets` caches the converted Arrow files (default: the usual HF datasets cache).

    Raises:
        FileNotFoundError: a path does not exist or a glob matches no file.
        ValueError: an empty or unreadable file, an unknown extension, mixed formats, no records, or neither a
            `text_field` nor an `input_ids` column; the message names the file(s) and the problem.
    """
    if (files is None) == (hub_name is None):
        raise ValueError("Pass exactly one of `files` (local data) or `hub_name` (a hub dataset).")
    cache_dir = None if cache_dir is None else str(cache_dir)

    if hub_name is not None:
        source = f"hub dataset {hub_name!r}" + (f" ({hub_config})" if hub_config else "") + f", split {split!r}"
        try:
            dataset = load_dataset(hub_name, hub_config, split=split, cache_dir=cache_dir)
        except Exception as err:
            raise ValueError(
                f"Could not load {source}: {err}. Hub datasets need network access unless already cached; "
                "offline, pass local files (jsonl, parquet or txt) instead."
            ) from err
    else:
        paths = _resolve_files(files)
        source = str(paths[0]) if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
        dataset = _read_files(paths, cache_dir)

    if text_field not in dataset.column_names and "input_ids" not in dataset.column_names:
        raise ValueError(
            f"{source} has neither a {text_field!r} nor an 'input_ids' column (columns: {dataset.column_names}). "
            "Name the column that holds the text with data.text_field=... (or give records with `input_ids`)."
        )
    if len(dataset) == 0:
        raise ValueError(f"{source} holds no records.")
    return dataset


def _resolve_files(files: PathLike | Sequence[PathLike]) -> list[Path]:
    patterns = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not patterns:
        raise ValueError("`files` is an empty list.")
    paths = []
    for pattern in (os.path.expanduser(p) for p in patterns):
        if any(c in pattern for c in "*?["):
            matches = [Path(m) for m in sorted(glob(pattern, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise FileNotFoundError(f"No data file matches {pattern!r}.")
            paths += matches
        elif Path(pattern).is_file():
            paths.append(Path(pattern))
        elif Path(pattern).is_dir():
            raise ValueError(f"{pattern} is a directory: pass a glob such as {os.path.join(pattern, '*.jsonl')!r}.")
        else:
            raise FileNotFoundError(f"Data file {pattern} does not exist.")
    for path in paths:
        if path.stat().st_size == 0:
            raise ValueError(f"Data file {path} is empty.")
    return paths


def _file_format(path: Path) -> str:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in _FILE_FORMATS:
        raise ValueError(f"Cannot tell the format of {path}: use one of the extensions {sorted(_FILE_FORMATS)}.")
    return _FILE_FORMATS[suffixes[-1]]


def _read_files(paths: list[Path], cache_dir: str | None) -> Dataset:
    formats = {path: _file_format(path) for path in paths}
    if len(set(formats.values())) > 1:
        raise ValueError(f"The data files mix formats ({sorted(set(formats.values()))}); use one format.")
    file_format = formats[paths[0]]
    # A .txt file is one document, so EOS goes between files rather than after every line.
    options = {"sample_by": "document"} if file_format == "text" else {}

    def read(some_paths: list[Path]) -> Dataset:
        data_files = [str(p) for p in some_paths]
        return load_dataset(file_format, data_files=data_files, split="train", cache_dir=cache_dir, **options)

    try:
        return read(paths)
    except Exception as err:
        # `datasets` raises a generic DatasetGenerationError that does not say which file failed: find it.
        for path in paths:
            try:
                read([path])
            except Exception as file_err:
                raise ValueError(f"Could not read {path} as {file_format}: {_root_cause(file_err)}") from file_err
        raise ValueError(f"Could not read the {file_format} files together: {_root_cause(err)}") from err


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------------------- packing
def pack_dataset(
    dataset: Dataset,
    tokenizer: TokenizerOrLoader,
    seq_len: int,
    *,
    text_field: str = "text",
    append_eos: bool = True,
    num_proc: int | None = None,
) -> Dataset:
    """Tokenise and pack records into an in-memory Dataset whose `input_ids` rows are exactly `seq_len` long.

    Documents are concatenated in dataset order, with `tokenizer.eos_token_id` after each one when
    `append_eos`, and the stream is cut into consecutive rows; the ragged tail (< seq_len tokens) is dropped.
    No special tokens other than that EOS are added. Records that already hold `input_ids` are packed verbatim
    (no tokenizer needed, no EOS added: include your own separators); they win over `text_field` when a
    dataset has both. `tokenizer` may be a zero-argument function that returns one (`modeling.LazyTokenizer`):
    it is called only when the records hold text.

    The packed rows live in memory as int32 (4 bytes per token). Tokenisation runs through `dataset.map`, so
    it shows a progress bar, uses `num_proc` worker processes, and is cached when `dataset` is file-backed.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}.")
    if "input_ids" not in dataset.column_names:
        if text_field not in dataset.column_names:
            raise ValueError(
                f"Cannot pack: the dataset has neither {text_field!r} nor 'input_ids' "
                f"(columns: {dataset.column_names})."
            )
        if tokenizer is None:
            raise ValueError(f"The records hold text ({text_field!r}): pass a tokenizer to pack them.")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = tokenizer()
        eos_id = tokenizer.eos_token_id if append_eos else None
        if append_eos and eos_id is None:
            raise ValueError("The tokenizer has no eos_token_id: set one, or pass append_eos=False.")
        dataset = dataset.map(
            _tokenize,
            batched=True,
            remove_columns=dataset.column_names,
            fn_kwargs={"tokenizer": tokenizer, "text_field": text_field, "eos_id": eos_id},
            num_proc=num_proc,
            desc="Tokenising",
        )

    column = dataset.select_columns(["input_ids"]).with_format("arrow")[:].column("input_ids")
    if not _is_integer_list(column.type):
        raise ValueError(f"'input_ids' must hold lists of integer token ids, got Arrow type {column.type}.")
    # Pack globally in Arrow (not per map batch), so only the very last < seq_len tokens are dropped.
    tokens = pc.list_flatten(column)
    num_rows = len(tokens) // seq_len
    if num_rows == 0:
        raise ValueError(
            f"The data holds {len(tokens)} tokens, fewer than one sequence of seq_len={seq_len}: "
            "add data or lower seq_len."
        )
    flat = tokens.slice(0, num_rows * seq_len).combine_chunks().cast(pa.int32())
    logger.info(
        "Packed %d tokens into %d sequences of %d (dropped a tail of %d tokens).",
        len(tokens),
        num_rows,
        seq_len,
        len(tokens) - num_rows * seq_len,
    )
    return Dataset.from_dict({"input_ids": pa.FixedSizeListArray.from_arrays(flat, seq_len)})


def _tokenize(
    batch: dict[str, list[Any]], *, tokenizer: PreTrainedTokenizerBase, text_field: str, eos_id: int | None
) -> dict[str, list[list[int]]]:
    # verbose=False: whole documents are longer than model_max_length, and that is fine before packing.
    encoded = tokenizer(
        [text or "" for text in batch[text_field]],
        add_special_tokens=False,
        return_attention_mask=False,
        verbose=False,
    )
    eos = [] if eos_id is None else [eos_id]
    return {"input_ids": [ids + eos for ids in encoded["input_ids"] if ids]}  # empty documents vanish


def _is_integer_list(arrow_type: pa.DataType) -> bool:
    list_checks = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    return any(check(arrow_type) for check in list_checks) and pa.types.is_integer(arrow_type.value_type)


def load_packed(
    files: PathLike | Sequence[PathLike] | None = None,
    hub_name: str | None = None,
    *,
    seq_len: int,
    tokenizer: TokenizerOrLoader,
    split: str = "train",
    text_field: str = "text",
    max_records: int | None = None,
    hub_config: str | None = None,
    cache_dir: PathLike | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """Records -> packed `input_ids` rows in one call: `load_records` (or the stdlib corpus) then `pack_dataset`.

    With neither `files` nor `hub_name`, the embedded stdlib corpus is used and `split` picks "train" or
    "validation". `max_records` keeps only the first records (before tokenisation), for quick runs and tests.
    """
    if files is None and hub_name is None:
        records, text_field = stdlib_corpus(split), "text"
    else:
        records = load_records(
            files, hub_name, split=split, text_field=text_field, hub_config=hub_config, cache_dir=cache_dir
        )
    if max_records is not None:
        records = records.select(range(min(max_records, len(records))))
    return pack_dataset(records, tokenizer, seq_len, text_field=text_field, num_proc=num_proc)


# ----------------------------------------------------------------------------------------------------- loader
class PackedLoader:
    """Batches `{"input_ids": LongTensor[batch_size, seq_len]}` from a packed Dataset, resumable to the batch.

    - **Order**: epoch `e` uses `torch.randperm` seeded with `seed + e` (or dataset order when not `shuffle`),
      identical on every rank.
    - **Sharding**: rank `r` takes positions `r, r + world_size, ...` of that order, so ranks are disjoint and
      together cover it. `drop_last` trims the order to whole global batches (`batch_size * world_size`), so every
      rank gets the same number of full batches. Otherwise, as in `DistributedSampler`, the order wraps around
      to a multiple of `world_size` (at most `world_size - 1` repeats) and the last batch may be short.
    - **Resume**: `state_dict()` is `(epoch, batches done in it)` plus the layout, the same on every rank. It
      advances when a batch is handed out, so after `load_state_dict` the loader yields exactly the batches that
      had not been handed out yet, in the same order.
    - **Epochs**: iterating yields the rest of the current epoch and moves to the next one; with `infinite`,
      it runs on across epochs forever and the caller counts steps.

    Use one iterator at a time: all iterators share the loader's position.
    """

    def __init__(
        self,
        packed: Dataset,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        infinite: bool = False,
    ) -> None:
        if "input_ids" not in packed.column_names:
            raise ValueError(f"The loader needs an 'input_ids' column, got {packed.column_names}.")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"Need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, rank={rank}, "
                f"world_size={world_size}."
            )
        self._rows = packed.with_format("numpy", columns=["input_ids"])
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.drop_last, self.infinite = shuffle, drop_last, infinite
        self.epoch = 0
        self.batches_done = 0  # batches of `epoch` already handed out
        if len(self) == 0:
            raise ValueError(
                f"{len(self._rows)} packed sequences cannot fill one global batch of "
                f"{batch_size} x {world_size} ranks: add data, lower batch_size, or pass drop_last=False."
            )

    def __len__(self) -> int:
        """Batches per epoch on each rank."""
        num_sequences, global_batch = len(self._rows), self.batch_size * self.world_size
        if self.drop_last:
            return num_sequences // global_batch
        return math.ceil(math.ceil(num_sequences / self.world_size) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            indices = self._rank_indices(self.epoch)
            for step in range(self.batches_done, len(self)):
                # Advance before yielding: a state saved while the caller holds this batch resumes after it.
                self.batches_done += 1
                if self.batches_done == len(self):
                    self.epoch, self.batches_done = self.epoch + 1, 0
                batch = indices[step * self.batch_size : (step + 1) * self.batch_size]
                yield {"input_ids": torch.from_numpy(self._rows[batch.tolist()]["input_ids"]).long()}
            if not self.infinite:
                return

    def _rank_indices(self, epoch: int) -> torch.Tensor:
        num_sequences = len(self._rows)
        if self.shuffle:
            order = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(num_sequences)
        if self.drop_last:
            order = order[: len(self) * self.batch_size * self.world_size]
        else:
            padded = math.ceil(num_sequences / self.world_size) * self.world_size
            order = order[torch.arange(padded) % num_sequences]
        return order[self.rank :: self.world_size]

    def _layout(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "num_sequences": len(self._rows),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and bools (JSON-safe), identical on every rank: rank 0 may save it for all."""
        return {"epoch": self.epoch, "batches_done": self.batches_done, **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the data and layout must match, otherwise the order could not be reproduced."""
        mismatched = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {saved}, now {now}" for k, (saved, now) in mismatched.items())
            raise ValueError(f"Cannot resume the data loader exactly, its layout changed ({details}).")
        if not 0 <= state["batches_done"] < len(self):
            raise ValueError(f"Saved position {state['batches_done']} is outside an epoch of {len(self)} batches.")
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]


def build_dataloader(
    packed: Dataset,
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    drop_last: bool = True,
    infinite: bool = False,
) -> PackedLoader:
    """A `PackedLoader` over `packed` for this rank (see its docstring for order, sharding and resume).

    Training: `infinite=True`, count steps, checkpoint `loader.state_dict()`. Evaluation: `shuffle=False,
    drop_last=False` covers every sequence (repeating at most `world_size - 1` of them to keep ranks in step).
    """
    return PackedLoader(
        packed,
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle=shuffle,
        drop_last=drop_last,
        infinite=infinite,
    )


def load_batches(data_cfg, num_batches: int | None, tokenizer: TokenizerOrLoader,
                 device: torch.device) -> list[torch.Tensor]:
    """The first `num_batches` batches (None: all) of the data a `DataConfig` names, in order, on `device`:
    the evaluation and calibration sets of the eval, search and analyze CLIs."""
    packed = load_packed(files=data_cfg.files, hub_name=data_cfg.hub_name, seq_len=data_cfg.seq_len,
                         tokenizer=tokenizer, split=data_cfg.split, text_field=data_cfg.text_field,
                         max_records=data_cfg.max_records)
    loader = build_dataloader(packed, data_cfg.batch_size, seed=data_cfg.seed, shuffle=False, drop_last=False)
    batches = []
    for batch in loader:
        if num_batches is not None and len(batches) == num_batches:
            break
        batches.append(batch["input_ids"].to(device))
    return batches
