"""Fused kernels: the multi-layer indexer KL loss (dense and sparse, over tokens or compressed entries), the indexer's top-k selection and
forward-only sparse MLA attention, each with a torch path and a materialising reference."""

from .compressed import CompressedIndexerKL
from .indexer_kl import IndexerKLLoss, indexer_kl_loss
from .indexer_topk import indexer_logits, indexer_logits_flops, indexer_topk
from .reference import (reference_compressed_indexer_kl_loss, reference_indexer_kl_loss,
                        sparse_mla_attention_reference)
from .sparse_mla import sparse_mla_attention, sparse_mla_flops

__all__ = [
    "indexer_kl_loss", "IndexerKLLoss", "reference_indexer_kl_loss",
    "CompressedIndexerKL", "reference_compressed_indexer_kl_loss",
    "indexer_logits", "indexer_topk", "indexer_logits_flops",
    "sparse_mla_attention", "sparse_mla_flops", "sparse_mla_attention_reference",
]
