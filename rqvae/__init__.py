"""rqvae: item embeddings -> code tuples.

Takes a float array (N, D) and returns int64 codes (N, L) in [0, K); knows nothing of semantic IDs, datasets or
the generator. Two methods with one interface (``encode``, ``decode``, ``save``):

- :class:`RQVAE`: MLP encoder -> ``vector_quantize_pytorch.ResidualVQ`` -> MLP decoder (TIGER), fitted with
  Lightning;
- :class:`ResidualKMeans`: k-means level after level on the residuals (scikit-learn).

``fit_codebooks(embeddings, RQVAEConfig(...) | RQKMeansConfig(...))`` fits either and codes the items;
``load_quantizer(path)`` reads a saved one back.
"""

from rqvae.balance import balanced_last_level
from rqvae.fit import FitResult, fit_codebooks, load_quantizer, method_name
from rqvae.kmeans import ResidualKMeans, RQKMeansConfig
from rqvae.model import RQVAE, RQVAEConfig, RQVAEOutput
from rqvae.stats import CodeStats, LevelStats, code_stats

__all__ = [
    "RQVAE",
    "CodeStats",
    "FitResult",
    "LevelStats",
    "RQKMeansConfig",
    "RQVAEConfig",
    "RQVAEOutput",
    "ResidualKMeans",
    "balanced_last_level",
    "code_stats",
    "fit_codebooks",
    "load_quantizer",
    "method_name",
]
