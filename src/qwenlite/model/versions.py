"""The weights' version: one counter that moves whenever the tensors a model's modules hold may have been swapped or
moved, so that what is derived from them (model/runner.py's decode plan: pointers into the weights) re-checks itself
only then, not at every token.

It moves on every module, parameter or buffer registered anywhere in the process (torch's global registration hooks:
a module swapped by quantization or LoRA, a Parameter assigned, `load_state_dict(assign=True)`, a model built or
copied), on `.to()` / `.half()` / `.float()` of a whole model (Qwen3_5ForCausalLM._apply calls `weights_changed`) and
on `set_fast`. What it cannot see: a tensor's storage replaced behind its Parameter (`p.data = ...`), `.to()` of a
part of a model, or a `fast` flag set by hand: call `weights_changed()` after those. Changing values in place (an
optimizer step, `copy_`) needs nothing: the C step reads the tensors' memory as it is.
"""

from __future__ import annotations

import itertools

from torch.nn.modules import module as torch_module

_counter = itertools.count(1)
_version = 0


def weights_version() -> int:
    """The current version: equal to an earlier reading only if no weights were swapped or moved since."""
    return _version


def weights_changed(*_args: object) -> None:
    """Move the version (also the registration hooks' signature: their arguments are not needed)."""
    global _version
    _version = next(_counter)


torch_module.register_module_module_registration_hook(weights_changed)
torch_module.register_module_parameter_registration_hook(weights_changed)
torch_module.register_module_buffer_registration_hook(weights_changed)
