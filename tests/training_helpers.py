"""Small shared builders for the training tests (tiny datasets and tiny saved models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: The tiny PanFoMaConfig of the model contract tests (test_modeling, test_modules): 3 chunks of 8 genes at 24 genes.
CONTRACT_CONFIG = dict(vocab_size=60, n_bins=11, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                       num_encoder_layers=2, num_mamba_layers=2, gene_chunk_size=8, state_size=4, expand=2,
                       hidden_dropout_prob=0.0, classifier_dropout=0.0)

TINY_MODEL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, state_size=4, num_encoder_layers=2,
                  num_mamba_layers=2, gene_chunk_size=32)
CELL_TYPES = ["B cell", "T cell", "malignant"]


def write_tiny_dataset(folder: Path, n_train: int = 40, n_validation: int = 12, n_test: int = 12, seed: int = 0,
                       drop_columns: tuple[str, ...] = ()) -> Path:
    """A PanFoMaBench-shaped Parquet folder (no builder run): train/validation/test, 3 cell types.

    Each cell type expresses its own block of 30 genes strongly, so a classifier has something to learn.
    Token ids are real ids of the default vocabulary (4 .. 304).
    """
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({
        "idx": datasets.Value("int64"), "cell_id": datasets.Value("string"),
        "gene_ids": datasets.List(datasets.Value("int32")), "counts": datasets.List(datasets.Value("float32")),
        "patient": datasets.Value("string"), "cell_type": datasets.ClassLabel(names=CELL_TYPES),
    })
    start = 0
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        rows = {k: [] for k in features}
        for i in range(n):
            label = int(rng.integers(0, len(CELL_TYPES)))
            background = rng.choice(np.arange(100, 304), size=int(rng.integers(20, 50)), replace=False)
            marker = 4 + 30 * label + rng.choice(30, size=20, replace=False)
            genes = np.unique(np.concatenate([background, marker]))
            counts = rng.poisson(1.0, genes.size).astype(np.float32) + 1
            counts[np.isin(genes, marker)] += 8
            rows["idx"].append(start + i)
            rows["cell_id"].append(f"tiny:cell{start + i}")
            rows["gene_ids"].append(genes.astype(np.int32).tolist())
            rows["counts"].append(counts.tolist())
            rows["patient"].append(f"tiny:P{(start + i) % 6}")
            rows["cell_type"].append(label)
        start += n
        table = {k: v for k, v in rows.items() if k not in drop_columns}
        feats = datasets.Features({k: v for k, v in features.items() if k not in drop_columns})
        datasets.Dataset.from_dict(table, features=feats).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


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
