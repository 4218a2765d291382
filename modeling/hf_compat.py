"""What GraftLM's remote code needs to know about the transformers release it runs on.

An exported folder runs on the transformers of whoever downloads it, so this file is exported with the modeling
files and reads the facts that differ between releases from the running one, instead of assuming one:

- the name of the cache: `past_key_values` up to 5.23, `cache` from 5.24 on (model arguments, model outputs and
  GPT-2's own modules; 5.24 keeps the old name as a deprecated alias until 5.40). CACHE_NAME is the running
  release's name, read from its own output class; forwards accept either name and return the running one.
- the generate() arguments that reach every forward: GENERATE_KWARGS (see check_forward_kwargs).
- the supported range: SUPPORTED_TRANSFORMERS, the range pyproject.toml declares (a test keeps them equal). Under
  a release outside it, importing this module logs a warning once per process, naming the range and the running
  version.
"""

import dataclasses

import transformers
from packaging.version import Version
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

# One logger name for every copy of this file (each export loads its own), so that warning_once warns once per process.
logger = logging.get_logger("graftlm.remote_code")

TRANSFORMERS_FLOOR = "5.23"  # the oldest release the tests run on
TRANSFORMERS_BELOW = "6"  # the next major release, excluded
SUPPORTED_TRANSFORMERS = f">={TRANSFORMERS_FLOOR},<{TRANSFORMERS_BELOW}"

CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def transformers_supported(version=None):
    """Whether `version` (default: the running transformers) lies in SUPPORTED_TRANSFORMERS."""
    version = Version(Version(version or transformers.__version__).base_version)  # 5.25.0.dev0 counts as 5.25.0
    return Version(TRANSFORMERS_FLOOR) <= version < Version(TRANSFORMERS_BELOW)


def warn_if_unsupported():
    """Warn, once per process (however many exports are loaded), when the running transformers is outside
    SUPPORTED_TRANSFORMERS."""
    if not transformers_supported():
        logger.warning_once(
            f"This GraftLM model's code supports transformers {SUPPORTED_TRANSFORMERS}, but transformers "
            f"{transformers.__version__} is installed: it may fail or compute something else. Install a supported "
            f"release: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        )


def pick_cache(cache, past_key_values):
    """The cache a forward was given under either name (`cache` from 5.24, `past_key_values` before)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


# generate() arguments that transformers' decoding loops (_sample, _beam_search: `**model_kwargs`) hand on to every
# forward call, e.g. `tokenizer` for stop_strings. Stock models swallow them in **kwargs.
GENERATE_KWARGS = frozenset({"tokenizer", "assistant_tokenizer"})


def check_forward_kwargs(model, kwargs, accepted=()):
    """Ignore the generate() arguments (GENERATE_KWARGS) and `accepted`; any other keyword argument a forward did not
    name is misspelt: TypeError naming it."""
    unknown = sorted(set(kwargs) - GENERATE_KWARGS - set(accepted))
    if unknown:
        raise TypeError(f"{type(model).__name__}.forward got unknown argument(s): {', '.join(unknown)}")


def cache_kwargs(cache):
    """{name: cache} for a transformers function, module or output class of the running release."""
    return {CACHE_NAME: cache}


def cache_of(output):
    """The cache a transformers output carries, under the running release's name."""
    return getattr(output, CACHE_NAME)


def output_flags(config, output_attentions=None, output_hidden_states=None, return_dict=None):
    """(output_attentions, output_hidden_states, return_dict) as transformers' models read them: each value passed to
    the call, else the config's (`config.output_attentions`, `config.output_hidden_states`, `config.return_dict`)."""
    passed = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states,
              "return_dict": return_dict}
    return tuple(getattr(config, name) if value is None else value for name, value in passed.items())


def returned(output, return_dict):
    """The output as transformers' models return it: the ModelOutput, or with return_dict=False its tuple of the
    fields that are set (ModelOutput.to_tuple, as GPT-2 returns)."""
    return output if return_dict else output.to_tuple()


warn_if_unsupported()
