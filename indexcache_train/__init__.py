"""IndexCache for DeepSeek Sparse Attention models: keep the lightning indexer on a few F layers and let
the S layers reuse their top-k."""

from .adapters import apply_indexcache, get_adapter
from .pattern import OFFICIAL_OFFSET, PAPER_OFFSET, IndexCachePattern
from .sparse_forward import use_sparse_forward

__all__ = ["IndexCachePattern", "apply_indexcache", "use_sparse_forward", "get_adapter", "PAPER_OFFSET",
           "OFFICIAL_OFFSET"]
__version__ = "0.1.0"
