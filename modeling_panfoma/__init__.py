"""PanFoMa: a lightweight Transformer-Mamba single-cell foundation model (arXiv 2512.03111)."""

from .configuration_panfoma import PANFOMA_PRESETS, PanFoMaConfig

__version__ = "0.1.0"

__all__ = ["PanFoMaConfig", "PANFOMA_PRESETS", "__version__"]
