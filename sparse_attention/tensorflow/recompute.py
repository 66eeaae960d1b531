"""``recompute=True`` for tf tensors: keep only the inputs, run the forward pass again for gradients.

A ``tf.custom_gradient`` around the call: the forward pass runs without recording intermediates
(eagerly) or with no backward consumer of them (graphs), and the gradient function recomputes
the call under a ``tf.GradientTape``. The same code serves TF1-style graphs (``tf.gradients``),
eager execution and ``tf.function`` (XLA included); the gradients equal those of a plain call.
"""

from __future__ import annotations

import tensorflow as tf

from ..frontend import framework_of


def recompute_call(fn, name, args, kwargs):
    """``fn(*args, **kwargs)`` with its activations recomputed in the backward pass."""
    pos = [i for i, a in enumerate(args) if framework_of(a) == "tensorflow"]
    keys = [key for key, a in kwargs.items() if framework_of(a) == "tensorflow"]
    if not pos and not keys:
        return fn(*args, **kwargs)

    def call(tensors):
        a, kw = list(args), dict(kwargs)
        for i, t in zip(pos, tensors[: len(pos)]):
            a[i] = t
        for key, t in zip(keys, tensors[len(pos) :]):
            kw[key] = t
        return fn(*a, **kw)

    @tf.custom_gradient
    def checkpointed(*tensors):
        out = call(tensors)

        def grad(dy):
            # Inputs that depend on dy: the recomputation can neither run early nor be merged with
            # the forward ops by graph optimisers (which would keep the activations alive).
            with tf.control_dependencies([dy]):
                again = [tf.identity(t) for t in tensors]
            with tf.GradientTape() as tape:
                tape.watch(again)
                out2 = call(again)
            grads = tape.gradient(out2, again, output_gradients=dy)
            return [tf.zeros_like(t) if g is None and t.dtype.is_floating else g for g, t in zip(grads, tensors)]

        return out, grad

    with tf.name_scope(name):
        tensors = [tf.convert_to_tensor(args[i]) for i in pos] + [tf.convert_to_tensor(kwargs[key]) for key in keys]
        return checkpointed(*tensors)
