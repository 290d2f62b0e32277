"""The dataset card (`README.md`) of a PanFoMaBench build, rendered from `templates/dataset_card.md`.

The YAML header carries `configs` (split -> Parquet files), `dataset_info` (features, split sizes) and the
vocabulary hash; the body holds the split, QC and study tables, so the card states what the build did.
"""

from __future__ import annotations

import json
import string
from importlib import resources
from pathlib import Path
from typing import Any

from .splits import HELD_OUT_SPLIT, SPLITS

_CARD_TEMPLATE = "dataset_card.md"


def _yaml_dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_card(*, name: str, features, split_rows: dict[str, int], split_bytes: dict[str, int],
                 qc_report: dict, studies_info: list[dict], vocab_hash: str, params: dict,
                 split_patients: dict[str, list[str]]) -> str:
    present = [s for s in list(SPLITS) + [HELD_OUT_SPLIT] if split_rows.get(s)]
    header = {
        "pretty_name": name,
        "license": "other",
        "tags": ["single-cell", "scRNA-seq", "cancer", "panfoma"],
        "task_categories": ["tabular-classification"],
        "size_categories": [_size_category(sum(split_rows.values()))],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": f"data/{s}-*.parquet"} for s in present]}],
        "dataset_info": {
            "features": features._to_yaml_list(),
            "splits": [{"name": s, "num_bytes": split_bytes[s], "num_examples": split_rows[s]} for s in present],
            "download_size": sum(split_bytes[s] for s in present),
            "dataset_size": sum(split_bytes[s] for s in present),
        },
        "vocab_hash": vocab_hash,
    }
    totals = qc_report["totals"]
    step_names = [s["step"] for s in next(iter(qc_report["studies"].values()))["steps"]]
    qc_rows = []
    for study_name, entry in qc_report["studies"].items():
        removed = {s["step"]: (f"{s['removed']} (skipped: {s['skipped']})" if s.get("skipped") else s["removed"])
                   for s in entry["steps"]}
        qc_rows.append([study_name, entry["cells_in"], *[removed[s] for s in step_names], entry["cells_out"]])
    qc_rows.append(["**total**", totals["cells_in"], *[totals["removed"][s] for s in step_names], totals["cells_out"]])
    study_rows = [[s["name"], s["cancer_type"], s["tissue"], s["file"], s["count_kind"], s["cells_out"],
                   s["n_patients"], s["n_measured_genes"], s["license"], s["source"] or "-"] for s in studies_info]
    split_table = _markdown_table(
        ["split", "cells", "patients", "Parquet bytes"],
        [[s, split_rows[s], len(split_patients.get(s, [])), split_bytes[s]] for s in present])
    genes = qc_report["genes"]
    qc = params["qc"]
    substitutions = {
        "name": name,
        "n_cells": f"{sum(split_rows.values()):,}",
        "n_studies": len(studies_info),
        "n_cancer_types": len(features["cancer_type"].names),
        "n_patients": sum(len(v) for v in split_patients.values()),
        "split_table": split_table,
        "qc_table": _markdown_table(["study", "cells in", *step_names, "cells out"], qc_rows),
        "study_table": _markdown_table(
            ["study", "cancer type", "tissue", "file", "values", "cells", "patients", "measured genes", "licence",
             "source"], study_rows),
        "min_genes": qc["min_genes"], "doublet_nmads": qc["doublet_nmads"],
        "max_mito_fraction": qc["max_mito_fraction"], "min_cells_per_gene": qc["min_cells_per_gene"],
        "genes_measured": genes["measured_in_any_study"], "genes_removed": genes["removed_min_cells"],
        "genes_kept": genes["kept"], "vocab_hash": vocab_hash, "seed": params["seed"],
        "split_fractions": ", ".join(f"{k} {v}" for k, v in params["split_fractions"].items()),
        "held_out": ", ".join(params["held_out_studies"]) or "none",
        "cancer_types": ", ".join(features["cancer_type"].names),
        "licences": ", ".join(sorted({s["license"] for s in studies_info})),
    }
    template = resources.files(__package__).joinpath("templates", _CARD_TEMPLATE).read_text(encoding="utf-8")
    body = string.Template(template).substitute(substitutions)
    return "---\n" + _yaml_dump(header) + "---\n\n" + body


def _size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < bound:
            return label
    return "10M<n<100M"


def json_dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n", encoding="utf-8")


