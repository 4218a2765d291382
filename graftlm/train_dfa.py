"""`python -m graftlm.train_dfa` and `accelerate launch -m graftlm.train_dfa`: the command graftlm.training.dfa, under
the module name users already run and import (an import of graftlm.train_dfa gives graftlm.training.dfa itself)."""

from .training import dfa
from .training.common import command_alias

command_alias(__name__, "graftlm.train_dfa", dfa)
