"""Fused kernels for the multi-layer indexer KL loss (dense and sparse), with a torch reference."""

from .indexer_kl import IndexerKLLoss, indexer_kl_loss
from .reference import reference_indexer_kl_loss

__all__ = ["indexer_kl_loss", "IndexerKLLoss", "reference_indexer_kl_loss"]
