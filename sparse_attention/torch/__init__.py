"""PyTorch back end: the dense reference and the block-sparse path for torch tensors."""

from .blocksparse import blocksparse_attention
from .reference import dense_attention

__all__ = ["blocksparse_attention", "dense_attention"]
