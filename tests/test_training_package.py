"""graftlm.training: the module paths users already run and import (graftlm.train_<arch>) still work, and the one
data-reading module reads texts and records the same way for every command, with errors naming file and record."""

import json
import subprocess
import sys

import pytest

from graftlm.training.data import load_records, read_text


def test_train_aliases_run_as_scripts():
    """`python -m graftlm.train_bsbr` (the README's `accelerate launch -m graftlm.train_bsbr`) and
    `python -m graftlm.train_scaffold` parse their command's own options."""
    flags = {"graftlm.train_bsbr": "--trainable", "graftlm.train_scaffold": "--adapter"}
    runs = {alias: subprocess.Popen([sys.executable, "-m", alias, "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for alias in flags}  # both at once
    for alias, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        assert out.startswith(f"usage: {alias} ") and flags[alias] in out


def test_train_aliases_are_the_package_modules():
    import graftlm.train_bridge
    import graftlm.train_scaffold
    from graftlm.training import bridge, scaffold
    from graftlm.train_scaffold import ScaffoldSession

    assert graftlm.train_scaffold is scaffold and ScaffoldSession is scaffold.ScaffoldSession
    assert graftlm.train_bridge is bridge  # so patching graftlm.train_bridge.load_bridge reaches bridge.main


def test_text_of_a_jsonl_file_is_its_field_joined(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_text(data) == "one\ntwo"
    (tmp_path / "plain.txt").write_text('{"text": "kept as is"}\n')
    assert read_text(tmp_path / "plain.txt") == '{"text": "kept as is"}\n'
    data.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    with pytest.raises(ValueError, match=r"corpus.jsonl: record 1 has no 'text' field \(it has \['body'\]\)"):
        read_text(data)
    with pytest.raises(ValueError, match=r"corpus.jsonl: record 0 has no 'body' field"):
        read_text(data, text_field="body")


def test_records_from_csv_json_and_lists(tmp_path):
    columns = ("src", "tgt")
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('src,tgt,note\n"two\nlines",42,x\n')  # a quoted newline; numbers stay text
    assert load_records(csv_file, columns) == [{"src": "two\nlines", "tgt": "42"}]
    json_file = tmp_path / "pairs.json"
    json_file.write_text(json.dumps([{"src": "a", "tgt": "b", "extra": 1}]))
    assert load_records(json_file, columns) == [{"src": "a", "tgt": "b"}]
    json_file.write_text(json.dumps({"src": "a", "tgt": "b"}))
    with pytest.raises(ValueError, match="must hold a JSON list of records"):
        load_records(json_file, columns)
    cases = {
        "a list": ([["a", "b"]], "record 0 is a list, expected an object with 'src' and 'tgt'"),
        "a number": ([{"src": "a", "tgt": 3}], "record 0 field 'tgt' is not text: 3"),
        "blank": ([{"src": "a", "tgt": " "}], "record 0 has an empty 'tgt'"),
        "nothing": ([], "the training data holds no pairs"),
    }
    for name, (records, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            load_records(records, columns, what="pairs", non_empty=("tgt",))
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("src\ttgt\na\tb\n")
    with pytest.raises(ValueError, match=r"pairs.tsv: expected a \.jsonl, \.json, \.csv file"):
        load_records(tsv, columns)


def test_bridge_pairs_are_text_and_a_blank_cell_is_refused(tmp_path):
    from graftlm.training.bridge import load_pairs

    data = tmp_path / "pairs.csv"
    data.write_text("question,answer\nwhat is 6 x 7,42\n")
    pairs = load_pairs(data, src_column="question", tgt_column="answer")
    assert pairs.column_names == ["src", "tgt"] and pairs[0] == {"src": "what is 6 x 7", "tgt": "42"}
    data.write_text("src,tgt\nhello,\n")
    with pytest.raises(ValueError, match=r"pairs.csv: record 0 has an empty 'tgt'"):
        load_pairs(data)
