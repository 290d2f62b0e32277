"""Does pretraining help? Frozen-embedding probes on held-out data along a pretraining run, beside the random-init
control and the PCA baseline.

Usage (from the repository root; the time budget is set by --steps, see the README for the committed run):

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/pretraining_curve.py [--steps 300] [--overwrite]

1. Corpus: every real file of ../shared/data EXCEPT the held-out ones: PBMC68k, the oligodendroglioma study and the
   CellBench Drop-seq cells (the CellBench CEL-seq2 cells stay in the corpus, without labels; pretraining never
   reads a label). Built with `panfoma.data.build_bench` into `<output-dir>/bench`.
2. Pretraining (`panfoma.training.pretrain.pretrain`, the package defaults for the objective) of a width-256 model
   with checkpoints at 25 / 50 / 75 / 100% of the steps.
3. At 0% (the random-init control: the same seed's initial weights) and at every checkpoint, the frozen
   `pooler_output` of the held-out cells (every expressed gene, capped at the top `--max-genes` by expression) is
   probed on three tasks, seeds 0-2:
   * `pbmc68k`: 10 cell types, stratified 70/15/15 cell split;
   * `cellbench_transfer`: 5 lung cancer cell lines, probe trained on CEL-seq2 cells (500 sampled), tested on
     the Drop-seq cells (held out of pretraining);
   * `oligodendroglioma`: 6 cell groups (malignant cells of four patients, oligodendrocytes, microglia),
     stratified 70/15/15.
   The probe is the same for every representation: standardise, PCA to 50 dimensions (fitted on the probe's
   training cells), logistic regression with C chosen on the validation cells. The baseline is that probe on
   log-normalised highly variable genes (`HVGPCABaseline` features), so only the representation differs.
4. Output: `benchmarks/results/pretraining_curve.json` (every number, the loss and its shortcut floors) and
   `pretraining_curve.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
logger = logging.getLogger("pretraining_curve")

MODEL_OVERRIDES = dict(hidden_size=256, num_attention_heads=4, intermediate_size=512, state_size=16,
                       num_encoder_layers=2, num_mamba_layers=2, gene_chunk_size=256, hidden_dropout_prob=0.1)
PRETRAIN_MAX_GENES = 512
BATCH_SIZE = 16
LEARNING_RATE = 1e-3
SEED = 0
HELD_OUT_STUDIES = ("pbmc68k_reduced_counts", "oligodendroglioma_tirosh2016")
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------------------------------------- data
def corpus_rows(data_dir: Path, work: Path):
    """Study rows of the pretraining corpus: all files but the held-out ones; CellBench without Drop-seq."""
    import anndata as ad
    from pretrain_eval_model import study_rows

    rows = []
    for row in study_rows(data_dir):
        if row.name in HELD_OUT_STUDIES:
            continue
        if row.name == "cellbench_lung_celllines":
            adata = ad.read_h5ad(row.path)
            path = work / "cellbench_celseq2_only.h5ad"
            adata[adata.obs["batch"].astype(str) != "sc_dropseq"].copy().write_h5ad(path)
            row.path = str(path)
        rows.append(row)
    return rows


def held_out_tasks(data_dir: Path) -> dict:
    """name -> (AnnData, function seed -> (train, val, test) row indices)."""
    import anndata as ad
    import scipy.sparse as sp
    from sklearn.model_selection import train_test_split

    def read(path):
        adata = ad.read_h5ad(data_dir / path)
        adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
        return adata

    def stratified(adata):
        y = adata.obs["cell_type"].astype(str).to_numpy()

        def split(seed):
            idx = np.arange(adata.n_obs)
            train, rest = train_test_split(idx, test_size=0.3, stratify=y, random_state=seed)
            val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
            return train, val, test
        return split

    cellbench = read("cancer/cellbench_lung_celllines.h5ad")
    rng = np.random.default_rng(SEED)
    dropseq = np.flatnonzero(cellbench.obs["batch"].astype(str) == "sc_dropseq")
    celseq = rng.choice(np.flatnonzero(cellbench.obs["batch"].astype(str) != "sc_dropseq"), 500, replace=False)
    cellbench = cellbench[np.sort(np.concatenate([celseq, dropseq]))].copy()
    is_test = (cellbench.obs["batch"].astype(str) == "sc_dropseq").to_numpy()
    y_cb = cellbench.obs["cell_type"].astype(str).to_numpy()

    def transfer(seed):
        reference = np.flatnonzero(~is_test)
        train, val = train_test_split(reference, test_size=0.15, stratify=y_cb[reference], random_state=seed)
        return train, val, np.flatnonzero(is_test)

    pbmc = read("pbmc/pbmc68k_reduced_counts.h5ad")
    oligo = read("cancer/oligodendroglioma_tirosh2016.h5ad")
    return {"pbmc68k": (pbmc, stratified(pbmc)), "cellbench_transfer": (cellbench, transfer),
            "oligodendroglioma": (oligo, stratified(oligo))}


# ---------------------------------------------------------------------------------------------- probe
def probe_scores(features: np.ndarray, adata, split) -> dict:
    """Macro-F1 / accuracy (mean, sd over seeds) of standardise -> PCA(50) -> logistic regression."""
    import warnings

    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from panfoma.evaluation.metrics import classification_metrics

    y = adata.obs["cell_type"].astype(str).to_numpy()
    per_seed = []
    for seed in SEEDS:
        train, val, test = split(seed)
        n_comp = int(min(50, features.shape[1], len(train) - 1))

        def model(c):
            return make_pipeline(StandardScaler(), PCA(n_comp, random_state=seed), StandardScaler(),
                                 LogisticRegression(C=c, max_iter=1000, random_state=seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            best = max((0.01, 0.1, 1.0), key=lambda c: classification_metrics(
                y[val], model(c).fit(features[train], y[train]).predict(features[val]))["macro_f1"])
            fit = np.concatenate([train, val])
            pred = model(best).fit(features[fit], y[fit]).predict(features[test])
        per_seed.append(classification_metrics(y[test], pred))
    out = {}
    for metric in ("macro_f1", "accuracy"):
        values = [s[metric] for s in per_seed]
        out[metric] = {"mean": float(np.mean(values)), "sd": float(np.std(values)), "per_seed": values}
    return out


def baseline_features(adata) -> np.ndarray:
    """Log-normalised highly variable genes (the features `HVGPCABaseline` projects), dense."""
    from panfoma.evaluation.baselines import HVGPCABaseline, log_normalize

    lognorm = log_normalize(adata)
    base = HVGPCABaseline(input_is_lognorm=True)
    base.fit(lognorm)
    return base._dense_hvg(lognorm)


def embed(model, processor, adata, max_genes: int) -> np.ndarray:
    from panfoma.inference.embed import embed_adata

    return embed_adata(model, processor, adata, batch_size=32, max_genes=max_genes, progress=False)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "pretraining-curve")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps of 16 cells (default %(default)s)")
    parser.add_argument("--max-genes", type=int, default=1024,
                        help="top-expressed genes per held-out cell when embedding (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild the corpus and retrain")
    parser.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                        help="PanFoMaConfig override for an experiment (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.data_dir.is_dir():
        logger.error("data folder %s not found", args.data_dir)
        return 2

    import torch
    from safetensors.torch import load_file

    from panfoma import PanFoMaForPreTraining
    from panfoma.tokenization import PanFoMaGeneProcessor
    from panfoma.data import PanFoMaBenchQCConfig, build_bench
    from panfoma.training.pretrain import load_pretraining_config, pretrain, read_metrics

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    bench, model_dir = out / "bench", out / "model"
    if args.overwrite and model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    if not bench.exists() or args.overwrite:
        build_bench(corpus_rows(args.data_dir, out), bench,
                    qc=PanFoMaBenchQCConfig(min_genes=100, max_mito_fraction=0.3), split_fractions=(0.95, 0.05, 0.0),
                    seed=SEED, overwrite=True, name="pretraining-curve corpus (../shared/data minus held-out)")
    overrides = dict(MODEL_OVERRIDES)
    for item in args.model_override:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    save_every = max(1, args.steps // 4)
    cfg = load_pretraining_config(
        None, dataset=str(bench), output_dir=str(model_dir), preset="panfoma-small", model_overrides=overrides,
        max_genes=PRETRAIN_MAX_GENES, per_device_batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
        warmup_steps=max(1, args.steps // 20), max_steps=args.steps, logging_steps=10, eval_steps=0, save_steps=save_every,
        save_total_limit=10, seed=SEED, cpu=True, resume="auto", progress=True,
    )
    timing = out / "train_seconds.json"
    if (model_dir / "model.safetensors").is_file() and timing.is_file():
        logger.info("%s holds a finished run: probing it (pass --overwrite to retrain)", model_dir)
    else:
        t0 = time.perf_counter()
        pretrain(cfg)
        timing.write_text(json.dumps({"train_seconds": time.perf_counter() - t0}))
    train_seconds = json.loads(timing.read_text())["train_seconds"]

    processor = PanFoMaGeneProcessor.from_pretrained(model_dir)
    processor.max_genes = None
    final = PanFoMaForPreTraining.from_pretrained(model_dir)
    torch.manual_seed(SEED)  # the same initial weights as the pretraining run (set_seed(SEED) before building)
    control = PanFoMaForPreTraining(final.config)
    states = {0: control.state_dict()}
    for checkpoint in sorted((model_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:])):
        states[int(checkpoint.name[5:])] = load_file(checkpoint / "model.safetensors")
    states[args.steps] = final.state_dict()

    tasks = held_out_tasks(args.data_dir)
    results = {"baseline_pca_hvg": {}, "curve": {}}
    for name, (adata, split) in tasks.items():
        results["baseline_pca_hvg"][name] = probe_scores(baseline_features(adata), adata, split)
    for step, state in sorted(states.items()):
        model = PanFoMaForPreTraining(final.config)
        model.load_state_dict(state)
        backbone = model.panfoma.eval()
        results["curve"][step] = {name: probe_scores(embed(backbone, processor, adata, args.max_genes), adata, split)
                                  for name, (adata, split) in tasks.items()}
        logger.info("step %d: %s", step, {k: round(v["macro_f1"]["mean"], 3) for k, v in results["curve"][step].items()})

    records = read_metrics(model_dir)
    last = [r for r in records if "loss" in r][-5:]
    loss_keys = sorted({k for r in last for k in r if k.endswith("_loss") or k.startswith("floor_") or k == "loss"})
    summary = {
        "command": "OMP_NUM_THREADS={} python benchmarks/pretraining_curve.py {}".format(
            os.environ.get("OMP_NUM_THREADS", ""), " ".join(argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "model_overrides": overrides, "pretrain_max_genes": PRETRAIN_MAX_GENES, "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE, "steps": args.steps, "embedding_max_genes": args.max_genes,
        "objective": {k: getattr(final.config, k) for k in ("mvm_loss_weight", "mse_loss_weight", "mvc_loss_weight")},
        "final_losses_and_floors": {k: float(np.mean([r[k] for r in last if k in r])) for k in loss_keys},
        "loss_curve": [{k: r[k] for k in ["step", *loss_keys] if k in r} for r in records if "loss" in r],
        **results,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "pretraining_curve.json").write_text(json.dumps(summary, indent=2))
    plot(summary, args.results_dir / "pretraining_curve.png")
    logger.info("wrote %s", args.results_dir / "pretraining_curve.json")
    return 0


def plot(summary: dict, path: Path) -> None:
    """Probe macro-F1 against pretraining progress, one panel per task, PCA baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["baseline_pca_hvg"])
    curve = {int(step): scores for step, scores in summary["curve"].items()}  # JSON keys are strings
    steps = sorted(curve)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2))
    for ax, task in zip(np.atleast_1d(axes), tasks):
        means = [curve[s][task]["macro_f1"]["mean"] for s in steps]
        sds = [curve[s][task]["macro_f1"]["sd"] for s in steps]
        pct = [100 * s / summary["steps"] for s in steps]
        ax.errorbar(pct, means, yerr=sds, marker="o", label="PanFoMa (0% = random init)")
        ax.axhline(summary["baseline_pca_hvg"][task]["macro_f1"]["mean"], ls="--", color="grey", label="PCA + LR")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("% of pretraining steps")
        ax.set_ylabel("held-out probe macro-F1")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"PanFoMa width {summary['model_overrides']['hidden_size']}, {summary['steps']} steps, "
                 f"{summary['train_seconds'] / 60:.0f} min of training (wall clock, 2 threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
