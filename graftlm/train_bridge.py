"""`python -m graftlm.train_bridge` and `accelerate launch -m graftlm.train_bridge`: the command graftlm.training.bridge, under
the module name users already run and import (an import of graftlm.train_bridge gives graftlm.training.bridge itself)."""

from .training import bridge
from .training.common import command_alias

command_alias(__name__, "graftlm.train_bridge", bridge)
