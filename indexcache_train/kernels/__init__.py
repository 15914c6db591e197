"""Fused kernels for the multi-layer indexer KL loss (dense and sparse), with a torch reference, and for the
indexer's top-k selection."""

from .indexer_kl import IndexerKLLoss, indexer_kl_loss
from .indexer_topk import indexer_logits, indexer_logits_flops, indexer_topk
from .reference import reference_indexer_kl_loss

__all__ = ["indexer_kl_loss", "IndexerKLLoss", "reference_indexer_kl_loss", "indexer_logits", "indexer_topk",
           "indexer_logits_flops"]
