"""The runs the README quotes (bench/reported/experiments/*.json) stay reproducible by their recorded command: the
offline base that command builds today, from experiments/offline_base.py's defaults and the settings it names, is the
base the quoted run used. A changed default would otherwise send every quoted command to another base, silently."""

import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import offline_base  # noqa: E402
from dfa_allocation import base_setting  # noqa: E402

QUOTED = {path.name: json.loads(path.read_text(encoding="utf-8"))
          for path in sorted((ROOT / "bench" / "reported" / "experiments").glob("*.json"))}
ON_BASE = sorted(name for name, run in QUOTED.items() if run.get("base"))  # the others start from no offline base


def base_settings(command):
    """The offline-base settings a recorded command line asks for: the defaults updated by its --base k=v words."""
    words = shlex.split(command)
    named = []
    if "--base" in words:
        for word in words[words.index("--base") + 1 :]:
            if word.startswith("--"):
                break
            named.append(base_setting(word))
    return {**offline_base.DEFAULTS, **dict(named)}


def test_there_are_quoted_runs_on_the_offline_base():
    assert len(ON_BASE) >= 6


@pytest.mark.parametrize("name", ON_BASE)
def test_quoted_command_builds_the_base_the_run_used(name):
    run = QUOTED[name]
    used = Path(run["base"]).name
    digest = used.rsplit("-corpus", 1)[1]  # the corpus is the running Python's: compared apart from the settings
    assert offline_base.settings_name(base_settings(run["command"]), digest) == used
