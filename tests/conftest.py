"""Test-session setup shared by every module."""

import os

try:
    import torch
except ImportError:
    torch = None

# Without a CUDA build of torch (CI), the Triton kernels run in Triton's interpreter. The choice
# is made when Triton is imported and its kernels decorated, so it is made here, first.
if torch is not None and not torch.backends.cuda.is_built():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# TensorFlow's bundled LLVM and Triton's collide when TensorFlow is loaded first: Triton 3.9 then
# aborts the process ("Option 'bitcode-mdindex-threshold' registered more than once"); loaded in
# the other order both work. One pytest worker runs TensorFlow tests and then tests that import
# Triton (the kernels, torch.compile), so Triton is loaded first, before any test module.
try:
    import triton  # noqa: F401
except ImportError:
    pass
