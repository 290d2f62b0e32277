"""PanFoMa: a lightweight Transformer-Mamba single-cell foundation model (arXiv 2512.03111).

Importing `panfoma` registers the PanFoMa config, models and gene processor with the `transformers` Auto
classes, so `AutoModel.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)` work.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
)

from .configuration_panfoma import PANFOMA_PRESETS, PanFoMaConfig
from .modeling_panfoma import (
    PanFoMaForCellClassification,
    PanFoMaForCellClassificationOutput,
    PanFoMaForPreTraining,
    PanFoMaForPreTrainingOutput,
    PanFoMaModel,
    PanFoMaModelOutput,
    PanFoMaPreTrainedModel,
)
from .selective_scan import available_scan_backends, selective_scan

__version__ = "0.1.0"

AutoConfig.register("panfoma", PanFoMaConfig, exist_ok=True)
AutoModel.register(PanFoMaConfig, PanFoMaModel, exist_ok=True)
AutoModelForPreTraining.register(PanFoMaConfig, PanFoMaForPreTraining, exist_ok=True)
AutoModelForSequenceClassification.register(PanFoMaConfig, PanFoMaForCellClassification, exist_ok=True)

# The processor lives in panfoma.tokenization (it imports the config from here, never the reverse); importing it
# last registers it with AutoFeatureExtractor / AutoProcessor.
from .tokenization import (  # noqa: E402
    PanFoMaDataCollator,
    PanFoMaGeneProcessor,
    PanFoMaGeneVocab,
    register_auto_classes,
)

register_auto_classes()

__all__ = [
    "PANFOMA_PRESETS",
    "PanFoMaConfig",
    "PanFoMaPreTrainedModel",
    "PanFoMaModel",
    "PanFoMaForPreTraining",
    "PanFoMaForCellClassification",
    "PanFoMaModelOutput",
    "PanFoMaForPreTrainingOutput",
    "PanFoMaForCellClassificationOutput",
    "PanFoMaDataCollator",
    "PanFoMaGeneProcessor",
    "PanFoMaGeneVocab",
    "available_scan_backends",
    "selective_scan",
    "__version__",
]
