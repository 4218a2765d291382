"""`python -m graftlm.train_scaffold` and `accelerate launch -m graftlm.train_scaffold`: the command graftlm.training.scaffold, under
the module name users already run and import (an import of graftlm.train_scaffold gives graftlm.training.scaffold itself)."""

from .training import scaffold
from .training.common import command_alias

command_alias(__name__, "graftlm.train_scaffold", scaffold)
