"""GraftLM: attention and fusion architectures grafted onto stock GPT-2 and BERT checkpoints."""

__version__ = "0.1.0"

from . import registry as _registry

_registry._register_all()
