"""Small shared builders for the training tests (tiny datasets and tiny saved models)."""

from __future__ import annotations

from pathlib import Path


#: The tiny PanFoMaConfig of the model contract tests (test_modeling, test_modules): 3 chunks of 8 genes at 24 genes.
CONTRACT_CONFIG = dict(vocab_size=60, n_bins=11, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                       num_encoder_layers=2, num_mamba_layers=2, gene_chunk_size=8, state_size=4, expand=2,
                       hidden_dropout_prob=0.0, classifier_dropout=0.0)

TINY_MODEL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, state_size=4, num_encoder_layers=2,
                  num_mamba_layers=2, gene_chunk_size=32)
CELL_TYPES = ["B cell", "T cell", "malignant"]


def write_tiny_dataset(folder: Path, n_train: int = 40, n_validation: int = 12, n_test: int = 12, seed: int = 0,
                       drop_columns: tuple[str, ...] = ()) -> Path:
    """A PanFoMaBench-shaped Parquet folder (no builder run) from the package's one synthetic generator.

    train/validation/test, 3 cell types with their own marker programmes (a classifier has something to learn),
    6 patients; token ids are real ids of the default vocabulary (4 .. 303).
    """
    from panfoma.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(folder, {"train": n_train, "validation": n_validation, "test": n_test},
                                   n_genes=300, genes_per_cell=45, n_patients=6, cell_types=CELL_TYPES, seed=seed,
                                   drop_columns=drop_columns)


def save_tiny_pretrained(folder: Path, max_genes: int = 64, **overrides) -> Path:
    """Save an untrained tiny `PanFoMaForPreTraining` + processor (default vocabulary) to `folder`."""
    from panfoma import PanFoMaConfig, PanFoMaForPreTraining
    from panfoma.tokenization import PanFoMaGeneProcessor

    processor = PanFoMaGeneProcessor(max_genes=max_genes, n_bins=11)
    config = PanFoMaConfig.from_preset("panfoma-tiny", **processor.model_config_kwargs(),
                                       **{**TINY_MODEL, **overrides})
    PanFoMaForPreTraining(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
