"""Fused kernels for the multi-layer indexer KL loss (dense and sparse) and forward-only sparse MLA attention,
with torch references."""

from .indexer_kl import IndexerKLLoss, indexer_kl_loss
from .reference import reference_indexer_kl_loss, sparse_mla_attention_reference
from .sparse_mla import sparse_mla_attention, sparse_mla_flops

__all__ = [
    "indexer_kl_loss", "IndexerKLLoss", "reference_indexer_kl_loss",
    "sparse_mla_attention", "sparse_mla_flops", "sparse_mla_attention_reference",
]
