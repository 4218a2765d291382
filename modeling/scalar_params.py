"""Learned scalars stored with shape (1,), and loading of checkpoints that stored them 0-D.

FSDP (1 and 2) and DeepSpeed ZeRO flatten or shard parameters along a first dimension and fail on 0-D ones, so every
learned scalar (DFA's entropy_balance.log_weight, the GA bridge's alpha_logit and sigma_raw) is a (1,) tensor.
Checkpoints written before held them 0-D, with the same values; both load:
- `module.load_state_dict(old)` (a Trainer resuming, accelerate): a load_state_dict pre-hook reshapes them;
- `from_pretrained(old)`: transformers' loader compares shapes itself and raises on the mismatch (there is no
  per-model hook for it on the releases we support), so LegacyScalarsMixin.from_pretrained retries once with the
  scalars built 0-D, then makes them (1,). A checkpoint that fails both ways raises the first error.
"""

import contextlib
import contextvars
import logging

import torch
from torch import nn

_BUILD_0D = contextvars.ContextVar("graftlm_build_0d_scalars", default=False)


def _reshape_0d(module, state_dict, prefix, *args):
    for name, param in module.named_parameters(recurse=False):
        value = state_dict.get(prefix + name)
        if value is not None and value.ndim == 0 and param.shape == (1,):
            state_dict[prefix + name] = value.reshape(1)


def scalar_parameter(module, value):
    """A learned scalar for `module` as an nn.Parameter of shape (1,) (0-D only while LegacyScalarsMixin loads a
    checkpoint of before); `module.load_state_dict` then also accepts it 0-D."""
    if not getattr(module, "_accepts_0d_scalars", False):
        module.register_load_state_dict_pre_hook(_reshape_0d)
        module._accepts_0d_scalars = True
    return nn.Parameter(torch.full(() if _BUILD_0D.get() else (1,), float(value)))


def promote_scalars(model):
    """Make every 0-D parameter of `model` a (1,) parameter with the same value, dtype, device and requires_grad."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.ndim == 0:
                setattr(module, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))


@contextlib.contextmanager
def _held_logs():
    """Hold back what the handlers of transformers' logger would write (e.g. the load report of a mismatch); yields
    a function that writes the held records after all."""
    held = []

    def holder(handler):
        def hold(record):
            held.append((handler, record))
            return False

        return hold

    filters = [(handler, holder(handler)) for handler in logging.getLogger("transformers").handlers]
    for handler, hold in filters:
        handler.addFilter(hold)

    def release():
        for handler, record in held:
            handler.handle(record)

    try:
        yield release
    finally:
        for handler, hold in filters:
            handler.removeFilter(hold)


class LegacyScalarsMixin:
    """from_pretrained() that also loads checkpoints whose learned scalars are 0-D (see the module docstring)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        with _held_logs() as release:
            try:
                loaded = super().from_pretrained(*args, **kwargs)
            except RuntimeError as error:
                first_error = error
            else:
                first_error = None
        if first_error is None:
            release()
            return loaded
        token = _BUILD_0D.set(True)
        try:
            with _held_logs() as release_retry:
                loaded = super().from_pretrained(*args, **kwargs)
        except Exception:
            release()  # the first attempt's report explains its error; the retry's would only confuse
            raise first_error from None
        finally:
            _BUILD_0D.reset(token)
        release_retry()
        promote_scalars(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded
