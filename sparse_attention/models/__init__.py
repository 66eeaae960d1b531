"""The paper's model (``SparseTransformer``) and its attention patterns (needs torch for the model).

from sparse_attention.models import SparseTransformer, SparseTransformerConfig, paper_patterns

cfg = SparseTransformerConfig(n_ctx=12288, d_model=512, n_head=8, n_layer=30,
                              patterns=paper_patterns("fixed", stride=128, c=32))
model = SparseTransformer(cfg)
"""

from ..patterns import Custom, Group, Merged, Mode, PerHead, Spec, as_spec, paper_patterns

__all__ = [
    "Custom",
    "Group",
    "Merged",
    "Mode",
    "PerHead",
    "SparseTransformer",
    "SparseTransformerConfig",
    "Spec",
    "as_spec",
    "paper_patterns",
]


def __getattr__(name):
    # The model needs torch; the patterns do not.
    if name in ("SparseTransformer", "SparseTransformerConfig"):
        from . import sparse_transformer

        return getattr(sparse_transformer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
