"""`panfoma demo` in its reduced size: every step runs and leaves a loadable model, a plot and a summary."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest


def test_quick_demo_on_generated_cohort(tmp_path, caplog):
    from transformers import AutoModel, AutoModelForSequenceClassification

    from panfoma.training.demo import format_summary, run_demo

    with caplog.at_level(logging.INFO, logger="panfoma.training.demo"):
        result = run_demo(tmp_path / "demo", size="quick", source="synthetic", progress=False)
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage ")]
    assert [m.split(":")[0] for m in stages] == [f"stage {n} of 5" for n in range(1, 6)]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    # Outputs stay out of version control wherever the folder is, and the model folder holds the final model only.
    assert (tmp_path / "demo" / ".gitignore").read_text().splitlines()[-1] == "*"
    assert not list(result.model_dir.glob("checkpoint-*"))
    # One confusion matrix per track over the test cells; the fine-tuned one (labels predicted again through the
    # classifier route) agrees with the Trainer's test score up to bf16-vs-fp32 rounding of at most one cell.
    n_test = summary["cells"]["test"]
    assert result.confusion_plot.is_file() and result.confusion_plot.name == "confusion.png"
    for track, table in summary["confusion"].items():
        assert sum(n for column in table.values() for n in column.values()) == n_test, track
        correct = sum(column.get(predicted, 0) for predicted, column in table.items())
        assert abs(correct / n_test - summary["test"][track]["accuracy"]) <= 1 / n_test + 1e-9, track
    assert summary["source"] == "synthetic" and summary["split"] == "patient"
    # The reported macro-F1 is the package's one macro-F1 of the very predictions in the confusion table (the
    # fine-tuned table comes from a second prediction pass, so only the two frozen-feature tracks are exact).
    from panfoma.evaluation.metrics import classification_metrics

    for track in ("panfoma_linear_probe", "pca_logreg_baseline"):
        pairs = [(true, predicted) for predicted, column in summary["confusion"][track].items()
                 for true, n in column.items() for _ in range(int(n))]
        recomputed = classification_metrics([t for t, _ in pairs], [p for _, p in pairs])
        assert summary["test"][track]["macro_f1"] == pytest.approx(recomputed["macro_f1"]), track
    assert result.plot.is_file() and result.plot.suffix == ".png"
    backbone = AutoModel.from_pretrained(result.model_dir)
    classifier = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert type(backbone).__name__ == "PanFoMaModel"
    assert sorted(classifier.config.id2label.values()) == ["B cell", "T cell", "malignant", "myeloid"]
    import anndata as ad

    embedded = ad.read_h5ad(tmp_path / "demo" / "embeddings.h5ad")
    assert embedded.obsm["X_panfoma"].shape == (embedded.n_obs, backbone.config.hidden_size)
    text = format_summary(result)
    assert "PCA(50) + logistic regression" in text and "macro-F1" in text
    # The generated cohort is easy: the baseline must see the cell-type programmes (checks the data, the split
    # and the baseline code together).
    assert summary["test"]["pca_logreg_baseline"]["accuracy"] > 0.8
    with pytest.raises(FileExistsError, match="overwrite"):
        run_demo(tmp_path / "demo", size="quick", source="synthetic")


def test_pbmc_counts_recovered_exactly_from_scanpys_bundled_data(shared_data):
    pytest.importorskip("scanpy")
    import anndata as ad

    from panfoma.training.demo import pbmc_counts

    recovered = pbmc_counts()
    published = ad.read_h5ad(shared_data / "pbmc" / "pbmc68k_reduced_counts.h5ad")
    assert list(recovered.obs_names) == list(published.obs_names)
    assert list(recovered.var_names) == list(published.var_names)
    assert abs(recovered.X - published.X).max() == 0
    assert recovered.obs["cell_type"].nunique() == 10
    assert np.array_equal(recovered.obs["cell_type"].to_numpy(), published.obs["cell_type"].astype(str).to_numpy())
