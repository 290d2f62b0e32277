"""Model card generation: metadata round trip, the numbers in the card, data/processor sections, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from panfoma import PanFoMaConfig, PanFoMaForCellClassification, PanFoMaModel
from panfoma.hub.model_card import (
    count_parameters,
    describe_dataset_folder,
    generate_model_card,
    main,
    save_model_card,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> PanFoMaConfig:
    return PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=300, gene_chunk_size=24, num_mamba_layers=3,
                                     **overrides)


def table_value(text: str, label: str) -> str:
    match = re.search(rf"^\| {re.escape(label)} \| (.*?) \|$", text, re.MULTILINE)
    assert match, f"row {label!r} missing from the card"
    return match.group(1)


def test_metadata_round_trips_through_huggingface_hub():
    from huggingface_hub import ModelCard

    metrics = [{"name": "accuracy", "value": 0.8125, "task": "Cancer type classification", "split": "validation"},
               {"name": "macro-F1", "value": 0.5}]
    text = generate_model_card(tiny_config(), metrics=metrics, base_model="someone/panfoma-small",
                               training_data={"name": "PanFoMaBench", "repo_id": "someone/bench",
                                              "splits": {"train": 10}}, repo_id="me/tiny")
    card = ModelCard(text)
    results = {(r.task_name, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("Cancer type classification", "validation", "accuracy"): 0.8125,
                       ("Cell classification", "test", "macro_f1"): 0.5}
    assert card.data.base_model == "someone/panfoma-small"
    assert card.data.datasets == ["someone/bench"]
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.model_name == "tiny"
    # The YAML written again from the parsed data is the YAML that was written.
    assert ModelCard(text).data.to_yaml() == card.data.to_yaml()


def test_parameter_count_matches_an_instantiated_model():
    config = tiny_config()
    counts = count_parameters(config)  # built on the meta device
    model = PanFoMaModel(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    expected_embeddings = model.embeddings.gene_embeddings.weight.numel() + sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
        and m is not model.embeddings.gene_embeddings)
    assert counts["embeddings"] == expected_embeddings
    text = generate_model_card(config)
    assert f"{counts['total']:,} in the backbone" in text
    # With a model (a classification head here) the card counts that model's parameters, head included.
    classifier = PanFoMaForCellClassification(tiny_config(num_labels=3))
    text = generate_model_card(classifier.config, model=classifier)
    assert f"{sum(p.numel() for p in classifier.parameters()):,} in the backbone" in text
    assert sum(p.numel() for p in classifier.parameters()) > counts["total"]


def test_architecture_table_reflects_the_config():
    config = tiny_config(num_encoder_layers=5, max_genes=1234)
    text = generate_model_card(config)
    assert table_value(text, "Genes per chunk M") == "24"
    assert table_value(text, "Bidirectional Mamba layers") == "3"
    assert table_value(text, "Encoder depth (one shared block, applied L times)") == "5"
    assert table_value(text, "Genes sampled per cell in pretraining") == "1234"
    assert table_value(text, "Hidden size D") == str(config.hidden_size)


def test_training_data_from_a_built_folder_matches_load_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    for split, n in (("train", 7), ("validation", 2), ("test", 3)):
        table = pa.table({"gene_ids": [[1, 2]] * n, "label": list(range(n))})
        pq.write_table(table, tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    info = describe_dataset_folder(tmp_path)
    loaded = datasets.load_dataset(str(tmp_path))
    assert info["splits"] == {split: loaded[split].num_rows for split in loaded}
    text = generate_model_card(tiny_config(), training_data=tmp_path)
    assert table_value(text, "train") == "7" and table_value(text, "test") == "3"
    assert "12 in 3 split(s)" in text
    # A card with `configs` (what the PanFoMaBench builder writes) decides the splits, as for load_dataset.
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n"
        "  - split: heldout\n    path: data/test-*.parquet\n---\n"
    )
    loaded = datasets.load_dataset(str(tmp_path))
    info = describe_dataset_folder(tmp_path)
    assert info["splits"] == {split: loaded[split].num_rows for split in loaded} == {"train": 7, "heldout": 3}


def test_processor_settings_and_vocab_hash_in_card():
    from panfoma.tokenization import PanFoMaGeneProcessor

    processor = PanFoMaGeneProcessor(max_genes=999, n_bins=21)
    config = PanFoMaConfig.from_preset("panfoma-tiny", **processor.model_config_kwargs())
    text = generate_model_card(config, processor=processor)
    assert table_value(text, "max_genes") == "999"
    assert table_value(text, "n_bins") == "21"
    assert table_value(text, "vocab_hash") == processor.vocab_hash
    assert "The processor is saved in this repository" in text
    # Every scalar setting the processor saves is in the card (keys come from `to_dict()`, not a list here).
    for key, value in processor.to_dict().items():
        if key not in ("vocab_file", "feature_extractor_type") and isinstance(value, (str, int, float, bool)):
            assert table_value(text, key) == str(value), key


def test_vocab_mismatch_between_processor_and_model_is_refused():
    config = tiny_config(vocab_hash="aaaa")
    with pytest.raises(ValueError, match="vocab_hash bbbb differs from the model's aaaa"):
        generate_model_card(config, processor={"vocab_hash": "bbbb", "n_bins": 51})


def test_bad_inputs_get_specific_errors(tmp_path):
    config = tiny_config()
    with pytest.raises(ValueError, match="finite number"):
        generate_model_card(config, metrics={"accuracy": float("nan")})
    with pytest.raises(ValueError, match="finite number"):
        generate_model_card(config, metrics={"accuracy": "high"})
    with pytest.raises(TypeError, match="dict"):
        generate_model_card(config, metrics=0.9)
    with pytest.raises(ValueError, match="'name' and 'value'"):
        generate_model_card(config, metrics=[{"value": 1.0}])
    with pytest.raises(ValueError, match="needs a 'name'"):
        generate_model_card(config, training_data={"splits": {"train": 3}})
    with pytest.raises(ValueError, match="split name -> number of cells"):
        generate_model_card(config, training_data={"name": "x", "splits": {"train": -1}})
    with pytest.raises(TypeError, match="training_data must be"):
        generate_model_card(config, training_data=42)
    with pytest.raises(ValueError, match="does not exist"):
        generate_model_card(config, training_data=tmp_path / "absent")
    with pytest.raises(ValueError, match="no Parquet shards"):
        generate_model_card(config, training_data=tmp_path)
    from transformers import BertConfig

    with pytest.raises(TypeError, match="PanFoMaConfig"):
        generate_model_card(BertConfig())


def test_card_has_use_limitations_and_citation():
    text = generate_model_card(tiny_config())
    for heading in ("## Intended use", "## Limitations and biases", "## Citation", "## Training data",
                    "## Processor and binning", "## Evaluation"):
        assert heading in text
    assert "confounded with study" in text and "Not the official weights" in text
    bibtex = re.search(r"```bibtex\n(.*?)```", text, re.DOTALL).group(1)
    for surname in ("Huang", "Zhu", "Zuo", "Xia", "Wu", "Yan", "Hua", "Xu", "Fang", "Zhang"):
        assert f"{surname}," in bibtex
    assert "2512.03111" in bibtex and "AAAI" in bibtex and "2026" in bibtex


def test_save_model_card_reads_the_saved_config(tmp_path):
    model = PanFoMaModel(tiny_config())
    model.save_pretrained(tmp_path / "m")
    path = save_model_card(tmp_path / "m", metrics={"accuracy": 0.5})
    assert path == tmp_path / "m" / "README.md"
    assert table_value(path.read_text(), "Genes per chunk M") == "24"
    with pytest.raises(ValueError, match="no config.json"):
        save_model_card(tmp_path)


@pytest.mark.parametrize("preset", ["panfoma-small", "panfoma-base"])
def test_committed_preset_cards_are_up_to_date(preset, tmp_path):
    committed = REPO_ROOT / "model_cards" / preset / "README.md"
    main([preset, "-o", str(tmp_path / "README.md")])
    assert committed.read_text() == (tmp_path / "README.md").read_text(), (
        f"model_cards/{preset}/README.md is stale: regenerate it with "
        f"`python -m panfoma.hub.model_card {preset} -o model_cards/{preset}/README.md`"
    )
