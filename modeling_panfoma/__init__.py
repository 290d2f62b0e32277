"""PanFoMa: a lightweight Transformer-Mamba single-cell foundation model (arXiv 2512.03111).

Importing `panfoma` registers the PanFoMa config, models and gene processor with the `transformers` Auto
classes, so `AutoModel.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)` work.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"
_public_api_imported = False


def _import_public_api() -> None:
    """Import the public API into this module (torch and transformers: seconds) and register the Auto classes."""
    global _public_api_imported
    if _public_api_imported:
        return
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

    AutoConfig.register("panfoma", PanFoMaConfig, exist_ok=True)
    AutoModel.register(PanFoMaConfig, PanFoMaModel, exist_ok=True)
    AutoModelForPreTraining.register(PanFoMaConfig, PanFoMaForPreTraining, exist_ok=True)
    AutoModelForSequenceClassification.register(PanFoMaConfig, PanFoMaForCellClassification, exist_ok=True)

    # The processor lives in panfoma.tokenization (it imports the config from here, never the reverse); importing it
    # last registers it with AutoFeatureExtractor / AutoProcessor.
    from .tokenization import (
        PanFoMaDataCollator,
        PanFoMaGeneProcessor,
        PanFoMaGeneVocab,
        register_auto_classes,
    )

    register_auto_classes()
    globals().update({name: value for name, value in locals().items() if name in __all__})
    _public_api_imported = True


def _started_as_command_line() -> bool:
    """Whether this process is the `panfoma` command (console script or `python -m panfoma.cli`).

    The command imports the public API when a command runs, so `panfoma --help` answers without loading torch.
    """
    script = _os.path.splitext(_os.path.basename(_sys.argv[0]))[0] if _sys.argv else ""
    interpreter_argv = list(getattr(_sys, "orig_argv", ()))
    run_module = interpreter_argv[interpreter_argv.index("-m") + 1] if "-m" in interpreter_argv[:-1] else ""
    return script in ("panfoma", "panfoma-script") or run_module == "panfoma.cli"


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


if _started_as_command_line():

    def __getattr__(name: str):
        """PEP 562: the first use of a public name imports the API (the command line's lazy start)."""
        if not name.startswith("__"):
            _import_public_api()
            if name in globals():
                return globals()[name]
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

else:
    _import_public_api()
