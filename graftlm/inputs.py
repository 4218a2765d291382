"""Checks of what users hand to graftlm, each where it is read: flag values (argparse types with their range),
text files, model folders (config.json and safetensors weights) and tokenizers. Every check raises an error
that names the input and what is wrong with it."""

import argparse
import json
import math
from pathlib import Path


def bounded(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a `kind` (int or float) number within [low, high] (an end is open where told), e.g.
    `--top-p` -> bounded(float, 0, 1, low_open=True); its error reads "must be in (0, 1], got 2"."""
    if high is None:
        interval = f"{'>' if low_open else '>='} {low}"
    else:
        interval = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {interval}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


POSITIVE_INT = bounded(int, 1)
NON_NEGATIVE_INT = bounded(int, 0)
POSITIVE = bounded(float, 0, low_open=True)
UNIT_INTERVAL = bounded(float, 0, 1)


def text_argument(text):
    """An argparse type: text that is not empty or blank (a prompt)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty")
    return text


def read_text(path):
    """The text of a UTF-8 file; an error naming the file when it is missing, not UTF-8, or empty."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#x} at offset {err.start})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def read_jsonl(path):
    """[(line number, record)] of a UTF-8 JSON Lines file, blank lines skipped; a line that is not JSON is an error
    naming the file and the line."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err})") from None
    return records


def check_model_folder(name_or_path):
    """A model given as a path that cannot be a Hub id exists. In a local model folder, config.json parses and names
    only torch dtypes, and every .safetensors file has a whole header and covers its data (not empty, truncated or
    overwritten). Hub ids are left to the Hub."""
    from safetensors import SafetensorError, safe_open

    folder = Path(name_or_path)
    if not folder.exists() and (folder.is_absolute() or str(name_or_path).startswith(".") or len(folder.parts) > 2):
        raise ValueError(f"model folder {folder} does not exist")  # and cannot be a Hub id (namespace/name)
    if not folder.is_dir():
        return
    config = folder / "config.json"
    if config.is_file():
        try:
            _check_dtypes(json.loads(config.read_text(encoding="utf-8")), config)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{config} is not valid JSON ({err})") from None
    for weights in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{weights} is damaged (empty, truncated or not safetensors): {err}") from None


def _check_dtypes(config, path):
    """config.json's dtype (and torch_dtype) fields, in sub-configs too, name a torch dtype or "auto"."""
    import torch

    for key, value in config.items():
        if isinstance(value, dict):
            _check_dtypes(value, path)
        elif key in ("dtype", "torch_dtype") and isinstance(value, str) and value != "auto":
            if not isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
                raise ValueError(f"{path}: {key} {value!r} is not a torch dtype (e.g. float32, float16, bfloat16)")


def check_tokenizer(tokenizer, vocab_size, where):
    """A tokenizer that has a vocabulary and whose ids all index the model's embeddings (`vocab_size` rows);
    `where` names it in the error ("the tokenizer of FOLDER")."""
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise ValueError(f"{where} has no vocabulary (no tokenizer files): add tokenizer.json, or vocab.json and "
                         "merges.txt, from the checkpoint's tokenizer")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"{where} has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}: token ids "
                         f"from {vocab_size} on would index no embedding")
    return tokenizer
