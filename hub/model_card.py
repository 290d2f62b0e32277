"""Model cards for PanFoMa checkpoints, generated from the config, the processor, the data and the metrics.

`generate_model_card` fills `templates/model_card.md` (a `string.Template`, so no Jinja is needed) and returns
the README text; `save_model_card` writes it next to a saved model. The YAML front matter is built with
`huggingface_hub.ModelCardData` (so `model-index` has the Hub's exact schema) and checked to round-trip
through `huggingface_hub.ModelCard` before it is returned.

Example:
    >>> from panfoma import PanFoMaConfig
    >>> from panfoma.hub.model_card import generate_model_card
    >>> card = generate_model_card(PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=1000),
    ...                            metrics={"accuracy": 0.91}, repo_id="me/panfoma-tiny")
    >>> card.startswith("---") and "model-index" in card
    True
"""

from __future__ import annotations

import json
import logging
import math
import string
from collections.abc import Mapping, Sequence
from numbers import Number
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card.md"
DEFAULT_TAGS = ("panfoma", "single-cell", "scRNA-seq", "biology", "transcriptomics", "cancer", "mamba",
                "foundation-model")
#: Free-text task type for `model-index`; the Hub has no single-cell task, and cells given as gene-expression
#: vectors are closest to tabular classification.
DEFAULT_TASK_TYPE = "tabular-classification"
DEFAULT_TASK_NAME = "Cell classification"

PANFOMA_BIBTEX = """@inproceedings{huang2026panfoma,
  title     = {PanFoMa: A Lightweight Foundation Model and Benchmark for Pan-Cancer},
  author    = {Huang, Xiaoshui and Zhu, Tianlin and Zuo, Yifan and Xia, Xue and Wu, Zonghan and
               Yan, Jiebin and Hua, Dingli and Xu, Zongyi and Fang, Yuming and Zhang, Jian},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2026},
  eprint    = {2512.03111},
  archivePrefix = {arXiv},
  primaryClass  = {q-bio.GN},
  url       = {https://arxiv.org/abs/2512.03111}
}"""

# (config attribute, label) pairs of the architecture table, in reading order.
_ARCHITECTURE_ROWS = (
    ("hidden_size", "Hidden size D"),
    ("num_attention_heads", "Attention heads"),
    ("intermediate_size", "Feed-forward size"),
    ("num_encoder_layers", "Encoder depth (one shared block, applied L times)"),
    ("num_mamba_layers", "Bidirectional Mamba layers"),
    ("gene_chunk_size", "Genes per chunk M"),
    ("max_genes", "Genes sampled per cell in pretraining"),
    ("state_size", "Mamba state size"),
    ("expand", "Mamba expansion"),
    ("conv_kernel", "Mamba conv kernel"),
    ("time_step_rank", "Mamba dt rank"),
    ("pooling", "Cell embedding pooling"),
    ("vocab_size", "Gene vocabulary size (incl. special tokens)"),
    ("n_bins", "Expression bins"),
    ("vocab_hash", "Gene vocabulary hash"),
)

# Entries of the processor's `to_dict()` the card leaves out: the vocabulary file name (the file ships in the
# repository and is identified by `vocab_hash`) and the class name written twice (`processor_class` stays).
_PROCESSOR_SKIP_KEYS = ("vocab_file", "feature_extractor_type")


# ---------------------------------------------------------------------------------------------- helpers
def count_parameters(config_or_model) -> dict[str, int]:
    """Parameter counts of a PanFoMa model, without allocating its weights.

    Given a config, the backbone (`PanFoMaModel`) is built on the `meta` device (no memory, milliseconds even
    for large presets); given a model, its own parameters are counted. Shared parameters count once (the
    encoder block is one module applied L times).

    Returns:
        `{"total": ..., "embeddings": ..., "non_embedding": ...}` where embeddings are the gene and value tables.
    """
    import torch

    if isinstance(config_or_model, torch.nn.Module):
        model = config_or_model
    else:
        from panfoma import PanFoMaModel

        with torch.device("meta"):
            model = PanFoMaModel(config_or_model)
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": total, "embeddings": embeddings, "non_embedding": total - embeddings}


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _md_escape(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: Sequence[tuple[str, Any]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_md_escape(k)} | {_md_escape(v)} |" for k, v in rows]
    return "\n".join(lines)


def _processor_settings(processor) -> dict[str, Any]:
    """Scalar settings of a gene processor, read from its `to_dict()` (or a mapping of the same shape).

    Reading `to_dict()` rather than a list of attribute names means the card shows exactly what
    `save_pretrained` writes, and a setting added to the processor appears in the card without an edit here.
    """
    if processor is None:
        return {}
    source = dict(processor) if isinstance(processor, Mapping) else dict(processor.to_dict())
    return {k: v for k, v in source.items()
            if k not in _PROCESSOR_SKIP_KEYS and isinstance(v, (str, Number, bool, type(None)))}


def describe_dataset_folder(path: str | Path) -> dict[str, Any]:
    """Name and split sizes of a built PanFoMaBench-style folder, read from Parquet metadata (no data loaded).

    Splits are found the way `datasets.load_dataset(path)` finds them: the `configs` data files of the README
    card (what the PanFoMaBench builder writes) when present, else `datasets`' default file-name patterns.
    """
    import pyarrow.parquet as pq
    from datasets.data_files import EmptyDatasetError, get_data_patterns

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"training_data folder {path} does not exist; pass a built dataset folder or a dict.")
    patterns: dict[str, list[str]] = {}
    card = path / "README.md"
    if card.is_file():
        from huggingface_hub import DatasetCard

        configs = DatasetCard(card.read_text()).data.to_dict().get("configs") or []
        default = next((c for c in configs if c.get("config_name") == "default"), configs[0] if configs else None)
        for item in (default or {}).get("data_files", []) if isinstance(default, dict) else []:
            if isinstance(item, dict) and "split" in item:
                paths = item.get("path", [])
                patterns[str(item["split"])] = [paths] if isinstance(paths, str) else list(paths)
    if not patterns:
        try:
            patterns = {str(k): list(v) for k, v in get_data_patterns(str(path)).items()}
        except EmptyDatasetError:
            patterns = {}
    splits: dict[str, int] = {}
    for split, split_patterns in patterns.items():
        files = sorted({f for pattern in split_patterns for f in path.glob(pattern) if f.suffix == ".parquet"})
        if files:
            splits[split] = sum(pq.read_metadata(f).num_rows for f in files)
    if not splits:
        raise ValueError(f"no Parquet shards found under {path}; is it a built PanFoMaBench folder?")
    return {"name": path.name, "splits": splits}


def _normalise_training_data(training_data) -> dict[str, Any] | None:
    if training_data is None:
        return None
    if isinstance(training_data, (str, Path)):
        return describe_dataset_folder(training_data)
    if not isinstance(training_data, Mapping):
        raise TypeError(
            "training_data must be a dict (keys: name, repo_id, splits, description, ...) or the path of a built "
            f"dataset folder; got {type(training_data).__name__}."
        )
    data = dict(training_data)
    if "name" not in data and "repo_id" not in data:
        raise ValueError("training_data needs a 'name' (or a Hub 'repo_id'), e.g. {'name': 'PanFoMaBench'}.")
    splits = data.get("splits", {})
    if not isinstance(splits, Mapping) or not all(isinstance(v, int) and v >= 0 for v in splits.values()):
        raise ValueError(f"training_data['splits'] must map split name -> number of cells, got {splits!r}.")
    return data


def _eval_results(metrics, training_data: dict | None, model_name: str):
    """`metrics` (dict name -> value, or a list of dicts with task/dataset/split) -> `EvalResult` list."""
    from huggingface_hub import EvalResult

    if metrics is None:
        return None
    dataset_name = (training_data or {}).get("name") or (training_data or {}).get("repo_id") or "unspecified"
    dataset_type = (training_data or {}).get("repo_id") or dataset_name
    if isinstance(metrics, Mapping):
        metrics = [{"name": k, "value": v} for k, v in metrics.items()]
    if not isinstance(metrics, Sequence) or isinstance(metrics, str):
        raise TypeError("metrics must be a dict {name: value} or a list of dicts with 'name' and 'value'.")
    results = []
    for item in metrics:
        if not isinstance(item, Mapping) or "name" not in item or "value" not in item:
            raise ValueError(f"each metric needs 'name' and 'value', got {item!r}.")
        value = item["value"]
        if not isinstance(value, Number) or isinstance(value, bool) or not math.isfinite(float(value)):
            raise ValueError(f"metric {item['name']!r} must be a finite number, got {value!r}.")
        results.append(EvalResult(
            task_type=item.get("task_type", DEFAULT_TASK_TYPE),
            task_name=item.get("task", DEFAULT_TASK_NAME),
            dataset_type=item.get("dataset_type", dataset_type),
            dataset_name=item.get("dataset", dataset_name),
            dataset_split=item.get("split", "test"),
            metric_type=item.get("type", str(item["name"]).lower().replace(" ", "_").replace("-", "_")),
            metric_name=str(item["name"]),
            metric_value=float(value),
        ))
    return results


# ------------------------------------------------------------------------------------------ the card
def generate_model_card(
    config,
    *,
    processor=None,
    training_data=None,
    metrics=None,
    base_model: str | None = None,
    model=None,
    model_name: str | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    extra_tags: Sequence[str] = (),
    summary: str | None = None,
) -> str:
    """Write the README.md model card of a PanFoMa checkpoint.

    Args:
        config: the model's `PanFoMaConfig` (or a `PretrainedConfig` of a PanFoMa model).
        processor: the gene processor (`PanFoMaGeneProcessor`) or a dict of its settings; its binning settings
            (n_bins, max_genes, vocab hash...) go into the card.
        training_data: a dict `{"name", "repo_id", "splits": {split: n_cells}, "description", "url"}` or the
            path of a built PanFoMaBench folder (split sizes read from its Parquet metadata).
        metrics: `{"accuracy": 0.9, "macro_f1": 0.8}` or a list of dicts with `name`, `value` and optional
            `task`, `task_type`, `dataset`, `split`; written as `model-index` and as a table.
        base_model: Hub id of the checkpoint this one was fine-tuned from.
        model: the model itself, to count its parameters exactly (else the backbone is counted on `meta`).
        model_name / repo_id: names used in the title, `model-index` and the usage snippet.
        license: SPDX id for the front matter.
        extra_tags: more Hub tags.
        summary: one paragraph under the title (default: generated from the config).

    Returns:
        The card text (YAML front matter + Markdown). The front matter round-trips through
        `huggingface_hub.ModelCard`.

    Example:
        >>> from panfoma import PanFoMaConfig
        >>> text = generate_model_card(PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=500))
        >>> "## Citation" in text
        True
    """
    from huggingface_hub import ModelCard, ModelCardData

    if getattr(config, "model_type", None) != "panfoma":
        raise TypeError(f"config must be a PanFoMaConfig (model_type 'panfoma'), got {type(config).__name__}.")
    repo_id = repo_id or "your-namespace/panfoma-model"
    model_name = model_name or repo_id.split("/")[-1]
    data = _normalise_training_data(training_data)
    eval_results = _eval_results(metrics, data, model_name)
    counts = count_parameters(model if model is not None else config)

    tags = list(dict.fromkeys([*DEFAULT_TAGS, *extra_tags]))
    datasets = [data["repo_id"]] if data and data.get("repo_id") else None
    card_data = ModelCardData(
        library_name="transformers", license=license, tags=tags, datasets=datasets, base_model=base_model,
        model_name=model_name, eval_results=eval_results, pipeline_tag="feature-extraction",
        metrics=sorted({r.metric_type for r in eval_results}) if eval_results else None,
    )
    front_matter = card_data.to_yaml().strip()

    arch_rows = [(label, getattr(config, key)) for key, label in _ARCHITECTURE_ROWS
                 if getattr(config, key, None) is not None]
    architectures = ", ".join(getattr(config, "architectures", None) or ["PanFoMaModel"])
    values = dict(
        front_matter=front_matter,
        model_name=model_name,
        repo_id=repo_id,
        summary=summary or (
            f"A PanFoMa single-cell foundation model ({_human(counts['total'])} parameters, hidden size "
            f"{config.hidden_size}, {config.num_mamba_layers} bidirectional Mamba layers) that embeds cells from "
            "their raw gene-expression counts (arXiv:2512.03111)."
        ),
        architectures=architectures,
        parameter_summary=(
            f"{counts['total']:,} in the backbone ({counts['embeddings']:,} in the gene and value embedding "
            f"tables, {counts['non_embedding']:,} in the network)"
            + ("" if model is None else "; counted on this checkpoint, heads included")
        ),
        base_model_line=f"- **Fine-tuned from**: [{base_model}](https://huggingface.co/{base_model})\n"
        if base_model else "",
        architecture_table=_table(arch_rows, ("Hyperparameter", "Value")).split("\n", 2)[2],
        hidden_size=config.hidden_size,
        training_data_section=_training_data_section(data),
        processor_section=_processor_section(processor, config),
        evaluation_section=_evaluation_section(eval_results),
        bibtex=PANFOMA_BIBTEX,
    )
    text = string.Template(TEMPLATE_PATH.read_text()).substitute(values)
    _check_round_trip(text, card_data, ModelCard)
    return text


def _training_data_section(data: dict | None) -> str:
    if data is None:
        return "Not recorded. (Pass `training_data=` to `generate_model_card` to describe it.)"
    name = data.get("name") or data["repo_id"]
    lines = [f"- **Dataset**: {name}" + (f" ([{data['repo_id']}](https://huggingface.co/datasets/"
                                          f"{data['repo_id']}))" if data.get("repo_id") else "")]
    if data.get("url"):
        lines.append(f"- **Source**: {data['url']}")
    if data.get("description"):
        lines.append(f"- **Description**: {data['description']}")
    splits = data.get("splits") or {}
    if splits:
        lines.append(f"- **Cells**: {sum(splits.values()):,} in {len(splits)} split(s), split by patient "
                     "(no patient in two splits) unless stated otherwise")
        lines += ["", _table([(k, f"{v:,}") for k, v in splits.items()], ("Split", "Cells"))]
    return "\n".join(lines)


def _processor_section(processor, config) -> str:
    settings = _processor_settings(processor)
    settings.setdefault("n_bins", config.n_bins)
    settings.setdefault("max_genes", config.max_genes)
    if getattr(config, "vocab_hash", None):
        settings.setdefault("vocab_hash", config.vocab_hash)
    intro = (
        "Each cell's expressed genes are binned per cell: bin 0 is zero expression and bins 1..n_bins-1 are "
        "quantiles of the cell's nonzero values, which makes the input invariant to library size and to "
        "log-normalisation. " + ("The processor is saved in this repository (`AutoProcessor`)."
                                 if processor is not None else
                                 "No processor was saved with this checkpoint; settings below are the model's.")
    )
    if settings.get("vocab_hash") and getattr(config, "vocab_hash", None) and \
            settings["vocab_hash"] != config.vocab_hash:
        raise ValueError(
            f"processor vocab_hash {settings['vocab_hash']} differs from the model's {config.vocab_hash}: the "
            "card would describe a processor that misaligns genes. Save the processor the model was trained with."
        )
    return intro + "\n\n" + _table(sorted(settings.items()), ("Setting", "Value"))


def _evaluation_section(eval_results) -> str:
    if not eval_results:
        return "No evaluation results were recorded for this checkpoint."
    rows = [(f"{r.task_name} / {r.dataset_name} ({r.dataset_split})", f"{r.metric_name}: {r.metric_value:.4f}")
            for r in eval_results]
    return ("Scores of this checkpoint (also in the `model-index` metadata). Compare them with the PCA + "
            "logistic-regression baseline on the same split.\n\n" + _table(rows, ("Task / data (split)", "Score")))


def _check_round_trip(text: str, card_data, model_card_cls) -> None:
    """Parse the card back with huggingface_hub and check the metadata survived unchanged."""
    parsed = model_card_cls(text)
    expected = card_data.to_dict()
    got = parsed.data.to_dict()
    if json.dumps(got, sort_keys=True, default=str) != json.dumps(expected, sort_keys=True, default=str):
        raise RuntimeError(f"model card metadata does not round-trip: wrote {expected}, read back {got}.")


def save_model_card(save_directory: str | Path, config=None, **kwargs) -> Path:
    """Generate the card for a saved model folder and write it as `README.md` (config read from the folder).

    Keyword arguments are those of `generate_model_card`. Returns the README path.
    """
    save_directory = Path(save_directory)
    if config is None:
        from panfoma import PanFoMaConfig

        if not (save_directory / "config.json").is_file():
            raise ValueError(f"{save_directory} has no config.json; call model.save_pretrained(...) first.")
        config = PanFoMaConfig.from_pretrained(save_directory)
    path = save_directory / "README.md"
    path.write_text(generate_model_card(config, **kwargs))
    logger.info("wrote model card %s", path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Write the card of a size preset: `python -m panfoma.hub.model_card panfoma-small -o README.md`."""
    import argparse

    from panfoma import PANFOMA_PRESETS, PanFoMaConfig

    parser = argparse.ArgumentParser(description="Generate the model card of a PanFoMa size preset.")
    parser.add_argument("preset", choices=sorted(PANFOMA_PRESETS))
    parser.add_argument("-o", "--output", required=True, help="README.md path to write")
    args = parser.parse_args(argv)
    config = PanFoMaConfig.from_preset(args.preset)
    config.architectures = ["PanFoMaModel"]
    text = generate_model_card(
        config, model_name=args.preset, repo_id=f"your-namespace/{args.preset}",
        training_data={"name": "PanFoMaBench", "description": (
            "the pan-cancer single-cell corpus of the paper (33 cancer types, about 3.5 million cells), rebuilt "
            "locally from public studies with the `panfoma` dataset builder; split by patient")},
        summary=(
            f"The `{args.preset}` size preset of PanFoMa ({_human(count_parameters(config)['total'])} parameters "
            "with the default gene vocabulary). This card describes the architecture and the training recipe; "
            "train it with `panfoma pretrain --preset " + args.preset + "` (no trained weights are published)."
        ),
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["generate_model_card", "save_model_card", "count_parameters", "describe_dataset_folder",
           "PANFOMA_BIBTEX"]
