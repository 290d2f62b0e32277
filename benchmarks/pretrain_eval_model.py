"""Pretrain the small PanFoMa that the committed evaluation run (`run_eval.py --model`) uses.

Usage (from the repository root; ~6 minutes of training on one CPU thread):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/pretrain_eval_model.py \
        [--data-dir ../shared/data] [--output-dir runs/eval-model] [--steps 500] [--overwrite]

Steps:

1. A PanFoMaBench-style dataset is built with `panfoma.data.build_bench` from EVERY real file in
   ../shared/data (8 studies, ~3.8k cells): the five cancer/ studies (cancer type and tissue read from each
   file's obs; patient = its `patient` column; cell types where the file has them), the PBMC 68k subset and the
   two PBMC CITE-seq files (healthy blood; patient = the file's `batch`, one donor per file). Output:
   `<output-dir>/bench` (git-ignored: `runs/` is in .gitignore).
2. A small PanFoMa (hidden 64, 2 shared encoder blocks, 2 bidirectional Mamba layers, max_genes 512,
   gene chunks of 256; ~2.9M parameters, most of them the gene-embedding table) is pretrained from random
   initialisation with `panfoma.training.pretrain.pretrain` (masked value modelling) on the bench's train split
   (90% of patients; the other 10% give the validation loss), for `--steps` optimiser steps of 16 cells (~2.7
   epochs), sized to stay well inside ~15 minutes on 2 CPU cores shared with other jobs. One thread: with two
   threads, a second 2-thread job on the same 2 cores slowed the steps 10-50x (oversubscription), and a
   hidden-128 / 1,024-gene model measured ~30x slower per step than this one. Output: `<output-dir>/model`
   (model + processor + card + `metrics.jsonl`, the loss curve), `<output-dir>/pretrain_summary.json`, and a copy
   of the summary with a loss plot in `--results-dir` (`eval_model_pretraining.{json,png}`).

This is a pipeline demonstration: a from-scratch model trained for minutes on ~3k cells. It cannot stand for
the paper's model (pretrained on ~3.5M cells); the evaluation reports it beside PCA baselines, which it is
expected to lose to.

QC: the bench defaults except `min_genes=100` (the PBMC 68k file holds only 765 highly variable genes, so
`min_genes=200` would remove its cells for a reason unrelated to cell quality) and `max_mito_fraction=0.3`
(tumour cells run high: 0.2 removed half of the colon study; 0.3 removes 194 of its 624 cells).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("pretrain_eval_model")

# Model and schedule of the committed run (see the module docstring).
MODEL_OVERRIDES = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, state_size=8,
                       num_encoder_layers=2, num_mamba_layers=2, gene_chunk_size=256, hidden_dropout_prob=0.1)
MAX_GENES = 512
BATCH_SIZE = 16
LEARNING_RATE = 1e-3
DEFAULT_STEPS = 500
SEED = 0


def _single_value(adata, column: str, fallback: str) -> str:
    """The one value of `obs[column]` in a single-study file, `fallback` where the source has none ("NA")."""
    values = sorted(set(adata.obs[column].astype(str)) - {"NA", "nan", ""}) if column in adata.obs else []
    if len(values) > 1:
        raise ValueError(f"obs[{column!r}] has several values {values}; expected one per study file.")
    return values[0] if values else fallback


def study_rows(data_dir: Path):
    """One `PanFoMaBenchStudy` per real file; columns chosen from each file's obs (README of ../shared/data)."""
    import anndata as ad

    from panfoma.data import PanFoMaBenchStudy

    licenses = {
        "colon_cancer_10x_infercnv": ("none stated", "broadinstitute/inferCNV_examples"),
        "oligodendroglioma_tirosh2016": ("BSD-3-Clause", "broadinstitute/infercnv (Tirosh et al. 2016)"),
        "copykat_tnbc": ("GPL-2.0", "navinlabcode/copykat"),
        "numbat_atc2": ("MIT", "kharchenkolab/numbat"),
        "cellbench_lung_celllines": ("MIT", "LuyiTian/sc_mixology (CellBench)"),
        "pbmc68k_reduced_counts": ("BSD-3-Clause", "scverse/scanpy pbmc68k_reduced"),
        "pbmc_5k_protein_v3_rna_adt": ("BSD-3-Clause", "scverse/scvi-tools test data (10x pbmc_5k_protein_v3)"),
        "pbmc_10k_protein_v3_rna_adt": ("BSD-3-Clause", "scverse/scvi-tools test data (10x pbmc_10k_protein_v3)"),
    }
    files = (sorted((data_dir / "cancer").glob("*.h5ad")) + [data_dir / "pbmc" / "pbmc68k_reduced_counts.h5ad"]
             + sorted((data_dir / "multiome").glob("*.h5ad")))
    rows = []
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the data folder {data_dir}.")
        adata = ad.read_h5ad(path, backed="r")
        try:
            patient_values = set(adata.obs["patient"].astype(str))
            # The CITE-seq files have no patient id; each file is one donor, named by its batch.
            patient_column = "batch" if patient_values <= {"NA"} else "patient"
            cell_types = set(adata.obs["cell_type"].astype(str)) if "cell_type" in adata.obs else {"NA"}
            cell_type_column = None if cell_types <= {"NA"} else "cell_type"
            cancer = _single_value(adata, "cancer_type", "none (healthy donor)")
            tissue = _single_value(adata, "tissue", "unknown")
        finally:
            adata.file.close()
        license_, source = licenses.get(path.stem, ("see ../shared/data/README.md", ""))
        rows.append(PanFoMaBenchStudy(name=path.stem, path=str(path), cancer_type=cancer, tissue=tissue,
                                      patient_column=patient_column, cell_type_column=cell_type_column,
                                      license=license_, source=source))
    return rows


def write_report(run_dir: Path, results_dir: Path) -> Path:
    """Copy the run's summary (loss curve included) to `results_dir` and plot the curve; return the JSON path."""
    summary = json.loads((run_dir / "pretrain_summary.json").read_text())
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "eval_model_pretraining.json"
    path.write_text(json.dumps(summary, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss-curve plot")
        return path
    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps, losses = zip(*summary["loss_curve"])
    ax.plot(steps, losses, marker=".", label="train (mean over 10 steps)")
    if summary["eval_loss_curve"]:
        eval_steps, eval_losses = zip(*summary["eval_loss_curve"])
        ax.plot(eval_steps, eval_losses, marker="o", label="validation patients")
    ax.set_xlabel("optimiser step (16 cells)")
    ax.set_ylabel("masked-value cross-entropy")
    ax.set_title("PanFoMa eval model pretraining", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results_dir / "eval_model_pretraining_loss.png", dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "eval-model")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="optimiser steps (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild the bench and retrain from scratch")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results",
                        help="where the summary JSON and the loss-curve plot are copied")
    parser.add_argument("--report-only", action="store_true",
                        help="only (re)write the summary and plot of an existing run into --results-dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from panfoma.data import PanFoMaBenchQCConfig, build_bench
    from panfoma.training.pretrain import load_pretraining_config, pretrain, read_metrics

    if not args.data_dir.is_dir():
        logger.error("data folder %s not found", args.data_dir)
        return 2
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    out = args.output_dir
    if args.report_only:
        logger.info("wrote %s", write_report(out, args.results_dir))
        return 0
    bench = out / "bench"
    model_dir = out / "model"
    if args.overwrite and model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    t0 = time.perf_counter()
    if not bench.exists() or args.overwrite:
        build_bench(study_rows(args.data_dir), bench, qc=PanFoMaBenchQCConfig(min_genes=100, max_mito_fraction=0.3),
                    split_fractions=(0.9, 0.1, 0.0), seed=SEED, overwrite=True,
                    name="PanFoMaBench-mini (../shared/data)")
    build_s = time.perf_counter() - t0
    studies = json.loads((bench / "studies.json").read_text())

    cfg = load_pretraining_config(
        None, dataset=str(bench), output_dir=str(model_dir), preset="panfoma-small", model_overrides=MODEL_OVERRIDES,
        max_genes=MAX_GENES, per_device_batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, warmup_steps=20,
        max_steps=args.steps, logging_steps=10, eval_steps=100, max_eval_batches=8, save_steps=0, seed=SEED,
        cpu=True, resume="never", progress=True,
    )
    t1 = time.perf_counter()
    pretrain(cfg)
    train_s = time.perf_counter() - t1
    records = read_metrics(model_dir)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    # The last step is evaluated twice (periodic + final, same fixed masks): keep one record per step.
    evals = sorted({r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}.items())
    if len(losses) < 2:
        raise RuntimeError(f"pretraining logged {len(losses)} loss values; expected a curve.")
    summary = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/pretrain_eval_model.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "threads": torch.get_num_threads(),
        "bench": {"path": str(bench), "splits": {k: v["cells"] for k, v in studies["splits"].items()},
                  "studies": len(studies["studies"]), "build_seconds": round(build_s, 1)},
        "model": {"preset": "panfoma-small", "overrides": MODEL_OVERRIDES, "max_genes": MAX_GENES,
                  "parameters": None},
        "schedule": {"steps": args.steps, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE, "seed": SEED},
        "train_seconds": round(train_s, 1),
        "loss_first": losses[0], "loss_last": losses[-1],
        "loss_curve": losses, "eval_loss_curve": evals,
    }
    from panfoma import PanFoMaForPreTraining

    summary["model"]["parameters"] = int(sum(p.numel() for p in PanFoMaForPreTraining.from_pretrained(
        model_dir).parameters()))
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out, args.results_dir)
    logger.info("loss %.4f (step %d) -> %.4f (step %d); eval loss %s; %.0f s", losses[0][1], losses[0][0],
                losses[-1][1], losses[-1][0], evals, train_s)
    if losses[-1][1] >= losses[0][1]:
        logger.error("the training loss did not go down (%.4f -> %.4f)", losses[0][1], losses[-1][1])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
