"""Run the kernel tests in Triton's interpreter where torch has no CUDA build (CI), compiled on the
GPU otherwise. Import this before anything imports the kernels: the interpreter is chosen when
``@triton.jit`` runs."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.backends.cuda.is_built():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def device() -> str:
    return "cpu" if INTERPRET else "cuda"


@pytest.fixture(scope="module", name="launch")
def launch_fixture():
    """The launchers, with NaN-poisoned outputs (a skipped tile fails loudly)."""
    triton = pytest.importorskip("triton")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (a CPU-only torch sets it)")
    from sparse_attention.torch.kernels import launch as L

    if INTERPRET and not getattr(triton.runtime.interpreter._patch_lang_tensor, "_sparse_attention_fix", False):
        pytest.skip("the kernels module was imported before TRITON_INTERPRET=1 was set")
    L.POISON_OUTPUTS = True
    yield L
    L.POISON_OUTPUTS = False
