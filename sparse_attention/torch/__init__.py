"""PyTorch back end: the dense reference and the block-sparse path for torch tensors.

Modules, bottom to top: :mod:`.reference` (dense masked attention, the dtype rule), the engines
:mod:`.gather` (plain PyTorch) and :mod:`.kernels` (Triton), :mod:`.dispatch` (which engine,
autograd, custom ops for ``torch.compile``), :mod:`.merged` (``local | strided`` in one head),
:mod:`.interface` (the public entry points), :mod:`.decode` (static caches and
:func:`blocksparse_decode`, a decode step's attention), then :mod:`.nn` (layers) and
:mod:`.baselines` (SDPA and FlexAttention under the same pattern specs).
"""

from .decode import blocksparse_decode
from .dispatch import fused_unsupported_reasons, register_layout
from .interface import blocksparse_attention, blocksparse_attention_bhtd, merged_local_strided_bhtd
from .reference import dense_attention, reshape_rows

__all__ = [
    "blocksparse_attention",
    "blocksparse_attention_bhtd",
    "blocksparse_decode",
    "dense_attention",
    "fused_unsupported_reasons",
    "merged_local_strided_bhtd",
    "register_layout",
    "reshape_rows",
]
