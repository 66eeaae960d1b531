"""The original ``recomputable`` decorator: recompute a function's activations in the backward pass.

    @recomputable("my_attention")
    def my_attention(q, k, v, heads): ...

    y = my_attention(q, k, v, 4, recompute=True)   # activations freed after the forward pass

With ``recompute=True`` the call runs through activation checkpointing of the tensors'
framework (``torch.utils.checkpoint`` for torch tensors; for tf tensors a ``tf.custom_gradient``
that reruns the call under a ``GradientTape``):
only the inputs are kept, and the forward pass runs again during the backward pass. Gradients
are identical to ``recompute=False``. Calls without tensors that need gradients run plainly.
"""

from __future__ import annotations

import functools

from .frontend import framework_of


def _first_tensor_framework(args, kwargs):
    for x in list(args) + list(kwargs.values()):
        fw = framework_of(x)
        if fw is not None:
            return fw
    return None


def recomputable(name: str):
    """Decorate ``fn`` so that it takes a ``recompute=False`` keyword (see the module docstring)."""
    if not isinstance(name, str):
        raise TypeError(f"recomputable takes the function's name, as in @recomputable('attention'); got {name!r}")

    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, recompute=False, **kwargs):
            if not isinstance(recompute, bool):
                raise TypeError(f"recompute must be True or False, got {recompute!r}")
            if not recompute:
                return fn(*args, **kwargs)
            fw = _first_tensor_framework(args, kwargs)
            if fw == "torch":
                from .torch.recompute import checkpoint_call

                return checkpoint_call(fn, args, kwargs)
            if fw == "tensorflow":
                from .tensorflow.recompute import recompute_call

                return recompute_call(fn, name, args, kwargs)
            return fn(*args, **kwargs)

        wrapper.recompute_name = name
        return wrapper

    return decorator
