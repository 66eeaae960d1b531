"""TensorFlow back end: the dense reference and the block-sparse path for tf tensors.

Imported by ``sparse_attention`` only when a tf tensor arrives; it needs TensorFlow, not torch.
"""

from .attention import blocksparse_attention, dense_attention, reshape_rows

__all__ = ["blocksparse_attention", "dense_attention", "reshape_rows"]
