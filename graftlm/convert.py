"""The one convert -> model card -> export (-> upload) path: `graftlm convert <arch>`, the demo and the bench run it.

Each architecture's converter module (named by its registry row) provides
- add_arguments(parser): the options of `graftlm convert <name>`;
- convert_from_args(args) -> (model, {subfolder: tokenizer}, card_builder(repo_id), report), where report is a
  conversion.common.ConversionReport and card_builder returns (card template name, YAML metadata, body fields);
- model_from_args(args) -> (model, report): the same conversion without tokenizers or card;
- example_arguments(gpt2, second_gpt2, bert, shape) -> the arguments that convert stock checkpoints the demo, bench
  and tests build (a GPT-2, a second GPT-2 that may be the same folder, a BERT) at a shape: a dict with
  chunk_size, cross_attn_layers and controls (whether to add the optional decoding controls).
This module adds the export options every conversion shares and runs the export.
"""

import argparse
import importlib

from . import registry
from .export import add_hub_arguments, check_output_args, export_model, push_from_args


def converter(name):
    """The converter module of the architecture `graftlm convert <name>` names."""
    return importlib.import_module(registry.by_name(name).converter)


def add_arguments(parser, name):
    """The options of `graftlm convert <name>`: the converter's own, then the export's."""
    converter(name).add_arguments(parser)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of torch's generator for the weights a conversion draws (Bridged's projection and "
                             "cross-attention, Scaffolded's fusers; the others start at zero or as copies): the same "
                             "seed writes the same weights in any process")
    group = parser.add_argument_group("export")
    group.add_argument("--output-dir", required=True, help="folder to write the Hub-ready export into")
    group.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    add_hub_arguments(group)
    group.add_argument("--license", metavar="ID",
                       help="Hub licence identifier for the model card (default: the source checkpoints' licence as "
                            "the converter knows it: mit for GPT-2 conversions, other for Bridged, whose weights "
                            "carry both sources' licences)")
    parser.set_defaults(arch=name)


def convert_and_export(args):
    """Convert with torch seeded by --seed, write the card and export to args.output_dir (checked before anything is
    converted), upload with --push-to-hub; returns (the export folder, the conversion's report)."""
    import torch

    check_output_args(args)
    with torch.random.fork_rng(devices=[]):  # seeded here only: the caller's generator is left as it was
        torch.manual_seed(args.seed)
        model, tokenizers, card_builder, report = converter(args.arch).convert_from_args(args)
    template, metadata, fields = card_builder(args.push_to_hub or str(args.output_dir))
    if args.license and args.license != metadata.get("license"):
        metadata = {key: value for key, value in metadata.items() if key not in ("license_name", "license_link")}
        metadata["license"] = args.license
    folder = export_model(
        model, args.output_dir, tokenizers=tokenizers, card=(template, metadata, fields), overwrite=args.overwrite
    )
    push_from_args(folder, args)
    return folder, report


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"{self.prog}: {message}")


def _parse(name, arguments, export=True):
    parser = _RaisingParser(prog=f"graftlm convert {name}", allow_abbrev=False)
    if export:
        add_arguments(parser, name)
    else:
        converter(name).add_arguments(parser)
    return parser.parse_args([str(argument) for argument in arguments])


def convert(name, arguments):
    """`graftlm convert <name> <arguments>` as a function, for code that converts (demo, bench): returns the export
    folder; bad arguments raise ValueError naming them."""
    return convert_and_export(_parse(name, arguments))[0]


def example_arguments(name, gpt2, second_gpt2, bert, shape):
    """The converter's arguments for stock checkpoints the demo, bench and tests build (see the module docstring)."""
    return converter(name).example_arguments(str(gpt2), str(second_gpt2), str(bert), shape)


def converted(name, arguments):
    """The converter's (model, tokenizers, card builder, report) for `graftlm convert <name>`'s own arguments (no
    export options), for code that exports on its own terms (the tests' integration matrix)."""
    return converter(name).convert_from_args(_parse(name, arguments, export=False))


def converted_model(name, arguments):
    """(model, report) for `graftlm convert <name>`'s own arguments, without tokenizers: the bench's models."""
    return converter(name).model_from_args(_parse(name, arguments, export=False))
