"""Run Python in a fresh process in which graftlm cannot be imported, as a Hub user without our package would.

Used by the demo (to prove an export loads through its own remote code) and by the tests.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

_BLOCK_GRAFTLM = (
    "import sys\n"
    "for _name in ('graftlm', 'modeling', 'configuration', 'conversion'):\n"
    "    sys.modules[_name] = None  # any import of these now raises ImportError\n"
)


def run_without_graftlm(code, workdir, timeout=600, python=None):
    """Run `code` in a fresh interpreter (cwd `workdir`, Hub offline) and return its last stdout line parsed as JSON.

    python: the interpreter (default: this one), e.g. one of an environment with another transformers release."""
    workdir = Path(workdir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "hf_modules"))
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [python or sys.executable, "-c", _BLOCK_GRAFTLM + textwrap.dedent(code)],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"fresh process failed with exit code {result.returncode}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
