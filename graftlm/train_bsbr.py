"""`python -m graftlm.train_bsbr` and `accelerate launch -m graftlm.train_bsbr`: the command graftlm.training.bsbr, under
the module name users already run and import (an import of graftlm.train_bsbr gives graftlm.training.bsbr itself)."""

from .training import bsbr
from .training.common import command_alias

command_alias(__name__, "graftlm.train_bsbr", bsbr)
