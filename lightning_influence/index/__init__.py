"""A compressed, preconditioned training-gradient index: train once, query many (docs/method.md, section 7).

* :class:`IndexOptions` / :class:`Compression` (``projection``): per layer, truncation in the EK-FAC
  eigenbasis, the preconditioner's placement and a seeded Kronecker random projection.
* :func:`build_index` / :class:`IndexWriter` (``builder``): one pass over the training data (or the
  EK-FAC pass itself) writing sharded safetensors with an identity (``store``).
* :class:`GradientIndex` (``gradient_index``): scores and top-k by one matmul per shard, cosine
  scores, and exact two-stage rescoring.
"""

from lightning_influence.index.builder import IndexWriter, PassFeed, build_index
from lightning_influence.index.gradient_index import GradientIndex
from lightning_influence.index.projection import Compression, IndexOptions
from lightning_influence.errors import GradientIndexError

__all__ = ["IndexOptions", "Compression", "IndexWriter", "PassFeed", "build_index", "GradientIndex", "GradientIndexError"]
