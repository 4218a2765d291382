"""Compare a rerun of an experiment with the run the README quotes: every number in the two JSON files.

    python experiments/compare_runs.py bench/reported/experiments/dfa_allocation.json \
        bench/results/dfa_allocation_2x64/dfa_allocation.json

Prints how many numbers are equal, the largest absolute difference and the keys that differ most. Wall-clock
figures (keys naming seconds) and paths are listed apart: they are not results. Exits 1 when a result differs by more
than --tolerance (default 0: bit-identical).
"""

import argparse
import json
import sys


def leaves(value, path=""):
    """(path, value) of every leaf of a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quoted", help="the JSON the README quotes")
    parser.add_argument("rerun", help="the JSON of the rerun")
    parser.add_argument("--tolerance", type=float, default=0.0)
    args = parser.parse_args(argv)
    quoted, rerun = (dict(leaves(json.load(open(path)))) for path in (args.quoted, args.rerun))
    timing = {key for key in quoted.keys() | rerun.keys() if "seconds" in key}
    shared = sorted((quoted.keys() & rerun.keys()) - timing)
    numbers = [(key, abs(quoted[key] - rerun[key])) for key in shared if is_number(quoted[key]) and is_number(rerun[key])]
    other = [key for key in shared if not (is_number(quoted[key]) and is_number(rerun[key])) and quoted[key] != rerun[key]]
    largest = max((diff for _, diff in numbers), default=0.0)
    print(f"{len(numbers)} numbers: {sum(diff == 0 for _, diff in numbers)} equal, largest difference {largest:.3g}; "
          f"{len(timing)} wall-clock figures not compared; {len(quoted.keys() ^ rerun.keys())} keys in one file only")
    for key, diff in sorted(numbers, key=lambda item: -item[1])[:10]:
        if diff:
            print(f"  {key}: {quoted[key]} vs {rerun[key]}")
    if other:
        print("  other values that differ:", ", ".join(other[:10]))
    return 1 if largest > args.tolerance else 0


if __name__ == "__main__":
    sys.exit(main())
