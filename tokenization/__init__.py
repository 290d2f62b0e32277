"""Gene vocabulary, gene-name standardisation, binning processor and data collator of PanFoMa."""

from .vocabulary import (
    DEFAULT_MIN_MATCH_FRACTION,
    SPECIAL_TOKENS,
    GeneMapping,
    GeneMappingReport,
    PanFoMaGeneVocab,
    check_match_fraction,
)

__all__ = [
    "DEFAULT_MIN_MATCH_FRACTION",
    "SPECIAL_TOKENS",
    "GeneMapping",
    "GeneMappingReport",
    "PanFoMaGeneVocab",
    "check_match_fraction",
]
