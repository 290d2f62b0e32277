"""Gene vocabulary, gene-name standardisation, binning processor and data collator of PanFoMa."""

from .binning import DEFAULT_N_BINS, quantile_bins
from .collator import IGNORE_INDEX, PanFoMaCollatorEpochCallback, PanFoMaDataCollator
from .encoding import EncodedCell, encode_cells, pad_encoded
from .processing_panfoma import PanFoMaGeneProcessor
from .vocabulary import (
    DEFAULT_MIN_MATCH_FRACTION,
    SPECIAL_TOKENS,
    GeneMapping,
    GeneMappingReport,
    PanFoMaGeneVocab,
    check_match_fraction,
)


def register_auto_classes() -> None:
    """Register `PanFoMaGeneProcessor` with `AutoFeatureExtractor` and `AutoProcessor` for `PanFoMaConfig`.

    Idempotent; `import panfoma` calls it so `AutoProcessor.from_pretrained(<folder>)` works.
    """
    from transformers import AutoFeatureExtractor, AutoProcessor

    from panfoma.configuration_panfoma import PanFoMaConfig

    AutoFeatureExtractor.register(PanFoMaConfig, PanFoMaGeneProcessor, exist_ok=True)
    AutoProcessor.register(PanFoMaConfig, PanFoMaGeneProcessor, exist_ok=True)


__all__ = [
    "DEFAULT_MIN_MATCH_FRACTION",
    "DEFAULT_N_BINS",
    "SPECIAL_TOKENS",
    "EncodedCell",
    "IGNORE_INDEX",
    "PanFoMaCollatorEpochCallback",
    "PanFoMaDataCollator",
    "GeneMapping",
    "GeneMappingReport",
    "PanFoMaGeneProcessor",
    "PanFoMaGeneVocab",
    "check_match_fraction",
    "encode_cells",
    "pad_encoded",
    "quantile_bins",
    "register_auto_classes",
]
