"""Evaluation reports: one JSON, one Markdown summary and the plots of a task's result.

Owns the report layout: ``tracks.<track>.summary.<metric>.mean`` (and ``.sd``, ``.values``) in
``eval_<task>.json``, the same numbers as a Markdown table in ``eval_<task>.md``, and optional matplotlib plots
(metric bars, NMI over clustering resolution, confusion matrices of the first seed with counts and a colour bar,
`draw_confusion`, also used by `panfoma demo`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd


logger = logging.getLogger(__name__)

def _fmt(stat: dict) -> str:
    mean, sd = stat.get("mean", float("nan")), stat.get("sd", float("nan"))
    if not np.isfinite(mean):
        return "n/a"
    if len(stat.get("values", [])) == 1:
        return f"{mean:.3f} (1 seed)"
    return f"{mean:.3f} ± {sd:.3f}"


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def _markdown(report: dict) -> str:
    task = report["task"]
    lines = [f"# PanFoMa evaluation: {task}", ""]
    lines.append("## Data")
    for key, value in report["data"].items():
        lines.append(f"- **{key}**: {value}")
    if report["data"].get("mode") == "transfer":
        unseen = report["data"].get("unseen_query_types") or {}
        lines.append("- **query types absent from the reference** (their cells cannot be labelled correctly and "
                     "count as errors): " + (", ".join(f"{t} ({n} cells)" for t, n in unseen.items()) or "none"))
    lines += ["", "## Protocol"]
    for key, value in report["protocol"].items():
        lines.append(f"- **{key}**: {value}")
    if report.get("notes"):
        lines += ["", "## Notes"] + [f"- {n}" for n in report["notes"]]
    metrics = report["headline_metrics"]
    lines += ["", f"## Results (mean ± sd over seeds {report['protocol'].get('seeds')})", "",
              "| track | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, track in report["tracks"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(track["summary"].get(m, {})) for m in metrics) + " |")
    if report.get("confound"):
        conf = report["confound"]
        lines += ["", "## Confound check: predicting the study from the embedding",
                  f"- studies per class: {conf['studies_per_class']}",
                  f"- fully confounded (each class from one study, each study one class): **{conf['fully_confounded']}**",
                  f"- protocol: {conf['protocol']}"]
        if conf.get("note"):
            lines.append(f"- {conf['note']}")
        for name, track in conf.get("tracks", {}).items():
            lines.append(f"- {name}: study accuracy {_fmt(track['summary']['study_accuracy'])}, "
                         f"macro-F1 {_fmt(track['summary']['study_macro_f1'])}")
    if task == "gene_programs":
        lines += ["", "## Per family (first seed): similarity AUROC / program AUROC / permutation mean (p)", "",
                  "| family | n | " + " | ".join(report["per_family_first_seed"]) + " |",
                  "|---|---|" + "---|" * len(report["per_family_first_seed"])]
        first = next(iter(report["per_family_first_seed"].values()))
        for fam in first:
            cells = []
            for net in report["per_family_first_seed"].values():
                v = net[fam]
                cells.append("skipped" if "skipped" in v else
                             f"{v['similarity_auroc']:.3f} / {v['program_auroc']:.3f} / {v['permutation_auroc_mean']:.3f} (p={v['permutation_p']:.3f})")
            lines.append(f"| {fam} | {first[fam]['n_genes']} | " + " | ".join(cells) + " |")
    if report.get("command"):
        lines += ["", "## Command", "", f"`{report['command']}`"]
    return "\n".join(lines) + "\n"


def draw_confusion(ax, table: pd.DataFrame, title: str) -> None:
    """Draw a confusion matrix on a matplotlib `ax`: rows are the true types, columns the predicted ones (the union of
    both, so the diagonal is the correct calls); each cell shows its number of cells and is coloured by its share of
    the row (the diagonal is each type's recall), with a colour bar.

    Example:
        >>> import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
        >>> fig, ax = plt.subplots()
        >>> draw_confusion(ax, pd.DataFrame({"B": {"B": 8, "T": 1}, "T": {"T": 5}}), "probe")
        >>> [t.get_text() for t in ax.texts]
        ['8', '0', '1', '5']
    """
    labels = sorted(table.index.union(table.columns), key=str)
    counts = table.reindex(index=labels, columns=labels).fillna(0).to_numpy(dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    size = 8 if len(labels) <= 12 else 6
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{counts[i, j]:.0f}", ha="center", va="center", fontsize=size,
                    color="white" if shares[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=size)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    bar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true type's cells", fontsize=size)


def _plot(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    metrics = [m for m in report["headline_metrics"] if m != "n_programs"]
    tracks = list(report["tracks"])
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(metrics) * len(tracks) / 2), 4))
    width = 0.8 / max(1, len(tracks))
    for t, name in enumerate(tracks):
        summary = report["tracks"][name]["summary"]
        means = [summary.get(m, {}).get("mean", np.nan) for m in metrics]
        sds = [summary.get(m, {}).get("sd", 0.0) for m in metrics]
        ax.bar(np.arange(len(metrics)) + t * width, means, width, yerr=sds, label=name, capsize=3)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(tracks) - 1) / 2)
    ax.set_xticklabels(metrics, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{report['task']}: {report['data'].get('dataset')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"eval_{report['task']}_metrics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path.name)
    if report.get("nmi_by_resolution_first_seed"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, curve in report["nmi_by_resolution_first_seed"].items():
            res = sorted(curve, key=float)
            ax.plot([float(r) for r in res], [curve[r] for r in res], marker="o", label=name)
        ax.set_xlabel("clustering resolution")
        ax.set_ylabel("NMI")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"eval_{report['task']}_nmi_resolution.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    for name, table in (report.get("confusion_first_seed") or {}).items():
        frame = pd.DataFrame(table).fillna(0)  # {predicted: {true: count}} -> rows true, columns predicted
        side = len(frame.index.union(frame.columns))
        fig, ax = plt.subplots(figsize=(2.5 + 0.5 * side, 1.5 + 0.45 * side))
        draw_confusion(ax, frame, f"{name} (seed {report['protocol']['seeds'][0]})")
        fig.tight_layout()
        path = out / f"eval_{report['task']}_confusion_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def write_report(report: dict, output_dir: str | Path, plots: bool = True) -> Path:
    """Write ``eval_<task>.json``, ``eval_<task>.md`` and plots into ``output_dir``; returns the JSON path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        report["plots"] = _plot(report, out)
    json_path = out / f"eval_{report['task']}.json"
    json_path.write_text(json.dumps(report, indent=2, default=_json_default, allow_nan=True))
    (out / f"eval_{report['task']}.md").write_text(_markdown(report))
    logger.info("wrote %s", json_path)
    return json_path


__all__ = ["draw_confusion", "write_report"]
