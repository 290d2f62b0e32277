"""Fine-tuning with the stock transformers.Trainer: the README example, `finetune` on real data, metrics, splits."""

from __future__ import annotations

import numpy as np
import pytest

from panfoma.training.finetune import compute_classification_metrics, finetune, prepare_splits
from training_helpers import CELL_TYPES, save_tiny_pretrained, write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    return write_tiny_dataset(root / "bench"), save_tiny_pretrained(root / "pretrained")


def test_readme_trainer_example_runs(tiny, tmp_path):
    dataset_dir, pretrained_dir = str(tiny[0]), str(tiny[1])
    # ---- the README example, verbatim except for paths and a short schedule ----
    from datasets import load_dataset
    from transformers import Trainer, TrainingArguments

    from panfoma import PanFoMaForCellClassification
    from panfoma.tokenization import PanFoMaDataCollator, PanFoMaGeneProcessor

    ds = load_dataset(dataset_dir)
    labels = ds["train"].features["cell_type"].names
    processor = PanFoMaGeneProcessor.from_pretrained(pretrained_dir)
    model = PanFoMaForCellClassification.from_pretrained(pretrained_dir, id2label=dict(enumerate(labels)))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(str(tmp_path / "out"), remove_unused_columns=False, max_steps=3,
                               per_device_train_batch_size=8, report_to="none", use_cpu=True),
        train_dataset=ds["train"], eval_dataset=ds["validation"], processing_class=processor,
        data_collator=PanFoMaDataCollator(processor, mlm=False, label_column="cell_type"),
    )
    trainer.train()
    # ---- end of the example ----
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"]) and trainer.state.global_step == 3
    trainer.save_model(str(tmp_path / "saved"))
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert reloaded.config.id2label == dict(enumerate(CELL_TYPES))
    assert (tmp_path / "saved" / "gene_vocab.json").is_file()  # processing_class saved beside the model


def test_compute_metrics_matches_hand_computed_values():
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    labels = np.array([0, 1, 2, 2, -100])  # the last cell is ignored
    metrics = compute_classification_metrics((logits, labels))
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    # per-class F1: class 0 = 1, class 1 = 2/3 (P 1/2, R 1), class 2 = 2/3 (P 1, R 1/2)
    assert metrics["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_patient_split_keeps_patients_apart_and_cell_split_stratifies(tiny):
    import datasets

    dataset_dict = datasets.load_dataset(str(tiny[0]))
    splits, names = prepare_splits(dataset_dict, "cell_type", "patient", seed=1)
    assert names == CELL_TYPES
    patients = {k: set(v["patient"]) for k, v in splits.items()}
    assert not patients["train"] & patients["test"] and not patients["train"] & patients["validation"]
    assert not patients["validation"] & patients["test"]
    assert sum(len(v) for v in splits.values()) == sum(len(v) for v in dataset_dict.values())
    cell_splits, _ = prepare_splits(dataset_dict, "cell_type", "cell", seed=1)
    assert set(cell_splits["test"]["cell_type"]) == set(range(3))
    with pytest.raises(ValueError, match="no column 'tumour_stage'"):
        prepare_splits(dataset_dict, "tumour_stage")
    with pytest.raises(TypeError, match="must be a datasets.ClassLabel"):
        prepare_splits(dataset_dict, "patient")


def test_finetune_on_real_pbmc_data_saves_a_labelled_classifier(shared_data, tmp_path, tiny):
    from transformers import AutoModelForSequenceClassification

    from panfoma.training.bench import PanFoMaBenchQCConfig, PanFoMaBenchStudy, build_bench

    study = PanFoMaBenchStudy(name="pbmc", path=str(shared_data / "pbmc" / "pbmc68k_reduced_counts.h5ad"),
                              cancer_type="healthy", tissue="blood", cell_type_column="cell_type")
    bench = build_bench([study], tmp_path / "pbmc_bench", qc=PanFoMaBenchQCConfig(min_genes=50))
    result = finetune(tiny[1], bench, tmp_path / "classifier", split_by="cell", max_steps=4,
                      per_device_train_batch_size=16, per_device_eval_batch_size=64, progress=False)
    assert len(result.label_names) == 10 and "Dendritic" in result.label_names
    for metrics in (result.validation_metrics, result.test_metrics):
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier")
    assert model.config.id2label[9] == result.label_names[9] and model.config.num_labels == 10
    card = (tmp_path / "classifier" / "README.md").read_text()
    assert "model-index" in card and "macro_f1" in card
    with pytest.raises(ValueError, match="needs train and validation splits"):
        finetune(tiny[1], bench, tmp_path / "x", split_by="dataset")
