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


def _in_memory_splits(patients_per_split, n=12, seed=0):
    """A DatasetDict whose `idx` restarts at 0 in every split (as separate builds would write it)."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({
        "idx": datasets.Value("int64"), "gene_ids": datasets.List(datasets.Value("int32")),
        "counts": datasets.List(datasets.Value("float32")), "patient": datasets.Value("string"),
        "cell_type": datasets.ClassLabel(names=CELL_TYPES),
    })
    splits = {}
    for split, patients in patients_per_split.items():
        splits[split] = datasets.Dataset.from_dict({
            "idx": list(range(n)), "gene_ids": [sorted(rng.choice(np.arange(4, 200), 10, replace=False).tolist())
                                                for _ in range(n)],
            "counts": [[1.0] * 10] * n, "patient": [patients[i % len(patients)] for i in range(n)],
            "cell_type": [i % 3 for i in range(n)],
        }, features=features)
    return datasets.DatasetDict(splits)


def test_single_donor_data_fall_back_to_a_stratified_cell_split_with_unique_idx(caplog):
    single = _in_memory_splits({"train": ["donor1"]}, n=30)
    with caplog.at_level("WARNING", logger="panfoma.training.finetune"):
        splits, _ = prepare_splits(single, "cell_type", "dataset", seed=0)
    assert "single donor" in caplog.text and "split_by='cell'" in caplog.text
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [20, 5, 5]
    assert set(splits["test"]["cell_type"]) == {0, 1, 2}  # stratified
    caplog.clear()
    with caplog.at_level("WARNING", logger="panfoma.training.finetune"):
        prepare_splits(single, "cell_type", "patient", seed=0)
    assert "single donor" in caplog.text
    # Several donors: no silent fallback, the group split is required.
    with pytest.raises(ValueError, match="needs train and validation splits"):
        prepare_splits(_in_memory_splits({"train": ["a", "b", "c"]}), "cell_type", "dataset")
    # Concatenated splits whose idx restarts at 0: renumbered, so no two cells share a random stream.
    several = _in_memory_splits({"train": ["a", "b"], "validation": ["c"], "test": ["d", "e"]})
    splits, _ = prepare_splits(several, "cell_type", "patient", seed=0)
    idx = np.concatenate([splits[s]["idx"] for s in ("train", "validation", "test")])
    assert idx.size == 36 and np.unique(idx).size == 36


def test_finetune_on_real_single_donor_pbmc_reports_the_saved_models_test_metrics(shared_data, tmp_path, tiny):
    import torch
    from transformers import AutoModelForSequenceClassification

    from panfoma.tokenization import PanFoMaDataCollator, PanFoMaGeneProcessor
    from panfoma.data import PanFoMaBenchQCConfig, PanFoMaBenchStudy, build_bench, load_bench
    from panfoma.evaluation.metrics import classification_metrics

    study = PanFoMaBenchStudy(name="pbmc", path=str(shared_data / "pbmc" / "pbmc68k_reduced_counts.h5ad"),
                              cancer_type="healthy", tissue="blood", cell_type_column="cell_type")
    bench = build_bench([study], tmp_path / "pbmc_bench", qc=PanFoMaBenchQCConfig(min_genes=50))
    # One donor: the default split_by="dataset" falls back to a stratified cell split.
    # fp32 and every expressed gene, so the recomputation below sees exactly the inputs the Trainer scored.
    result = finetune(tiny[1], bench, tmp_path / "classifier", max_steps=4, per_device_train_batch_size=16,
                      per_device_eval_batch_size=64, progress=False, max_genes=None, bf16=False)
    assert len(result.label_names) == 10 and "Dendritic" in result.label_names
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier").eval()
    assert model.config.id2label[9] == result.label_names[9] and model.config.num_labels == 10
    # The reported test metrics are those of the saved model on the held-out cells (every expressed gene).
    splits, _ = prepare_splits(load_bench(bench), "cell_type", "cell", seed=0)
    processor = PanFoMaGeneProcessor.from_pretrained(tmp_path / "classifier")
    batch = PanFoMaDataCollator(processor, mlm=False, label_column="cell_type", max_genes=None)(list(splits["test"]))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], values=batch["values"],
                       attention_mask=batch["attention_mask"]).logits
    expected = classification_metrics(batch["labels"].numpy(), logits.argmax(-1).numpy())
    assert result.test_metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert result.test_metrics["macro_f1"] == pytest.approx(expected["macro_f1"])
    card = (tmp_path / "classifier" / "README.md").read_text()
    assert "model-index" in card and "macro_f1" in card


def test_a_preset_name_fine_tunes_a_random_init_model(tiny, tmp_path):
    from panfoma.training.finetune import load_classifier

    model, processor = load_classifier("panfoma-tiny", CELL_TYPES, seed=0)
    again, _ = load_classifier("panfoma-tiny", CELL_TYPES, seed=0)
    assert model.config.id2label == dict(enumerate(CELL_TYPES)) and model.config.num_labels == 3
    assert model.config.hidden_size == 64 and model.config.vocab_size == processor.vocab_size
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert a.equal(b), name  # the same seed gives the same initial weights, head included


def test_load_classifier_reports_in_one_line_and_names_missing_backbone_weights(tmp_path, caplog):
    import logging

    from safetensors.torch import load_file, save_file

    from panfoma.training.finetune import load_classifier

    folder = save_tiny_pretrained(tmp_path / "pretrained")
    with caplog.at_level(logging.INFO):
        model, _ = load_classifier(str(folder), CELL_TYPES)
    text = caplog.text
    assert "loaded as a classifier" in text and "UNEXPECTED" not in text and "MISSING" not in text
    assert "not in the checkpoint" not in text  # nothing of the backbone is missing
    assert model.config.num_labels == len(CELL_TYPES)

    # a checkpoint whose backbone lost a weight: that is a real problem and is named
    weights = load_file(folder / "model.safetensors")
    lost = next(key for key in weights if "gene_embeddings" in key)
    del weights[lost]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.INFO):
        load_classifier(str(folder), CELL_TYPES)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not in the checkpoint" in message and "gene_embeddings" in message for message in warnings)
