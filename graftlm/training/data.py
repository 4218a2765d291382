"""What the training commands read: a training text (`train dfa`, `train bsbr`) cut into token windows, and records
of named text columns (`train bridge`'s source/target pairs, `train scaffold`'s prompt/completion pairs) from a
.jsonl/.json/.csv file, a `datasets` name or a list of dicts. Every error names the file (or dataset) and the
record."""

import csv
import io
import json
from pathlib import Path

import torch

from ..inputs import read_jsonl
from ..inputs import read_text as read_text_file

DATA_SUFFIXES = (".jsonl", ".json", ".csv")


def read_text(path, text_field="text"):
    """The training text: a UTF-8 file, or the `text_field` of every record of a .jsonl file joined by newlines."""
    if Path(path).suffix.lower() != ".jsonl":
        return read_text_file(path)
    return "\n".join(record[text_field] for record in load_records(path, (text_field,), what="texts"))


def load_records(source, columns, split="train", dataset_config=None, what="records", flags=None, non_empty=()):
    """[{column: text}] of every record of `source`, with just `columns`: a list of dicts, a .jsonl/.json/.csv file,
    or a `datasets` name (its `split`, `dataset_config`). `what` names the records in errors ("pairs"), `flags` the
    options that choose other columns; a column in `non_empty` may not be blank."""
    records, origin = _read_records(source, split, dataset_config, what)
    if not records:
        raise ValueError(f"{origin} holds no {what}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{origin}: record {i} is a {type(record).__name__}, expected an object with "
                             f"{' and '.join(map(repr, columns))}")
    present = {key for record in records for key, value in record.items() if isinstance(key, str) and value is not None}
    absent = ", ".join(repr(column) for column in columns if column not in present)
    if absent:
        raise ValueError(f"{origin} has no column(s) {absent}: record 0 has no {absent}, nor does any other; its "
                         f"columns are {sorted(present)}" + (f" (choose others with {flags})" if flags else ""))
    for i, record in enumerate(records):
        for column in columns:
            value = record.get(column)
            if value is None:
                raise ValueError(f"{origin}: record {i} has no {column!r} field (it has {list(record)})")
            if not isinstance(value, str):
                raise ValueError(f"{origin}: record {i} field {column!r} is not text: {value!r}")
            if column in non_empty and not value.strip():
                raise ValueError(f"{origin}: record {i} has an empty {column!r}")
    return [{column: record[column] for column in columns} for record in records]


def _read_records(source, split, dataset_config, what):
    """(records, how errors name the source)."""
    if isinstance(source, (list, tuple)):
        return list(source), "the training data"
    path = Path(source)
    if not path.is_file():
        if path.suffix.lower() in DATA_SUFFIXES:
            raise ValueError(f"data file {source} does not exist")
        return _load_dataset(str(source), split, dataset_config)
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(f"{path}: expected a {', '.join(DATA_SUFFIXES)} file")
    if not path.read_bytes().strip():
        raise ValueError(f"data file {source} is empty: it holds no {what}")
    if suffix == ".jsonl":
        return [record for _, record in read_jsonl(path)], str(source)
    text = read_text_file(path)
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline=""))), str(source)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of records")
    return records, str(source)


def _load_dataset(name, split, dataset_config):
    import datasets

    origin = f"dataset {name!r} ({f'configuration {dataset_config!r}, ' if dataset_config else ''}split {split!r})"
    try:
        return list(datasets.load_dataset(name, dataset_config, split=split)), origin
    except Exception as err:  # unknown name, no network, bad split: say which, whatever datasets raised
        raise ValueError(f"cannot load {origin}: {type(err).__name__}: {err}") from err


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive, non-overlapping windows of `seq_len` tokens; labels are the inputs (the model shifts them)."""

    def __init__(self, ids, seq_len):
        self.blocks = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        block = self.blocks[i]
        return {"input_ids": block, "attention_mask": torch.ones_like(block), "labels": block}


def split_blocks(ids, seq_len, eval_fraction):
    """(train, eval) TokenBlocks: the last `eval_fraction` of the tokens is held out."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    cut = int(ids.numel() * (1.0 - eval_fraction))
    train, held_out = TokenBlocks(ids[:cut], seq_len), TokenBlocks(ids[cut:], seq_len)
    if len(train) == 0:
        raise ValueError(f"the text has {ids.numel()} tokens: too few for one training window of {seq_len}")
    if eval_fraction > 0 and len(held_out) == 0:
        raise ValueError(f"the held-out {eval_fraction:.0%} of the text is shorter than one window of {seq_len} tokens")
    return train, held_out
