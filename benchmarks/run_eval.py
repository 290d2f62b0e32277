"""The committed small real evaluation run: all five tasks on ../shared/data, PanFoMa beside PCA baselines.

Usage (from the repository root):

    OMP_NUM_THREADS=1 python benchmarks/run_eval.py --model runs/eval-model/model [--finetune-steps N]
        [--data-dir ../shared/data] [--out benchmarks/results] [--tasks pancancer annotation ...]
    OMP_NUM_THREADS=1 python benchmarks/run_eval.py            # no model: the MODEL-FREE CONTROL (smoke run)

With `--model PATH` (a PanFoMa folder with its processor, e.g. the one `benchmarks/pretrain_eval_model.py`
writes, or a preset name such as `panfoma-small` for a randomly initialised model), the PanFoMa hooks come from
`panfoma.evaluation.model_tracks` -- the same wiring as `panfoma evaluate --model ... --finetune`: every
cell task gets the PanFoMa zero-shot track (frozen `pooler_output` embeddings over every expressed gene: a linear
probe for the supervised tasks, scIB metrics for integration and multi-omic) and the `panfoma_random_init` control
beside it (same config and processor, random weights); gene programs use its gene-token embeddings. The PBMC
annotation also gets a fine-tuned track (`model_finetune_fn`: fine-tuned as a classifier with the package's recipe,
or for `--finetune-steps` optimiser steps, on the training cells, best validation macro-F1 kept); `--finetune-steps
0` skips it. Tracks are named
`panfoma_*`.

Without `--model`, the cell embedding is a MODEL-FREE CONTROL (a fixed random projection of log-normalised
expression, `random_projection_embedder`) and the gene embedding a fixed random vector per gene
(`random_gene_vectors`); their tracks are named `control_*`, never `panfoma_*`. Every baseline and every
metric is the real one in both modes.

Data choices (all files are tiny public datasets, see ../shared/data/README.md):
- pan-cancer: the five cancer/ studies, genes standardised to HGNC symbols and intersected, study =
  file; classes with < 3 patients (TNBC, ATC: one patient each) are excluded by the protocol.
- annotation: pbmc68k (stratified) and the CellBench lung cell lines (reference = 4 CEL-seq2 batches,
  query = Drop-seq: a protocol transfer).
- integration: CellBench lung cell lines (5 batches, 5 cell lines).
- gene programs: the two PBMC CITE-seq files (RNA), concatenated.
- multi-omic: the same CITE-seq cells; their cell types are not in the files, so labels are gated from
  protein markers (documented in the report): protein-containing embeddings are favoured by
  construction, so compare like with like (model RNA+protein vs PCA RNA+protein).
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
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("run_eval")


def gate_protein_labels(adata, protein_names) -> np.ndarray:
    """Coarse PBMC types from CLR protein levels: a marker is 'high' above the midpoint of 1-D 2-means."""
    from sklearn.cluster import KMeans

    from panfoma.evaluation.baselines import clr_normalize

    clr = pd.DataFrame(clr_normalize(adata.obsm["protein_expression"]), columns=[n.split("_")[0] for n in protein_names])

    def high(marker: str) -> np.ndarray:
        values = clr[marker].to_numpy()[:, None]
        centres = np.sort(KMeans(2, n_init=10, random_state=0).fit(values).cluster_centers_.ravel())
        return values.ravel() > centres.mean()

    cd3, cd4, cd8, cd14, cd16, cd19, cd56 = (high(m) for m in ("CD3", "CD4", "CD8a", "CD14", "CD16", "CD19", "CD56"))
    labels = np.full(adata.n_obs, "other", dtype=object)
    labels[cd56 & ~cd3] = "NK"
    labels[cd16 & ~cd3 & ~cd56 & ~cd14] = "CD16 monocyte"
    labels[cd14 & ~cd3] = "CD14 monocyte"
    labels[cd19 & ~cd3] = "B"
    labels[cd3 & cd8 & ~cd4] = "CD8 T"
    labels[cd3 & cd4 & ~cd8] = "CD4 T"
    return labels.astype(str)


def load_cite(data_dir: Path):
    import anndata as ad

    parts = []
    for name in ("pbmc_5k_protein_v3_rna_adt.h5ad", "pbmc_10k_protein_v3_rna_adt.h5ad"):
        part = ad.read_h5ad(data_dir / "multiome" / name)
        part.obsm["protein_expression"] = pd.DataFrame(
            part.obsm["protein_expression"], index=part.obs_names, columns=list(part.uns["protein_names"])
        )
        part.obs_names = [f"{name.split('_protein')[0]}:{n}" for n in part.obs_names]
        part.obsm["protein_expression"].index = part.obs_names
        parts.append(part)
    proteins = [p for p in parts[0].obsm["protein_expression"].columns if p in set(parts[1].obsm["protein_expression"].columns)]
    genes = parts[0].var_names.intersection(parts[1].var_names)
    protein = pd.concat([p.obsm["protein_expression"][proteins] for p in parts])
    for p in parts:
        del p.obsm["protein_expression"]
    cite = ad.concat([p[:, genes] for p in parts], join="inner")
    cite.obsm["protein_expression"] = protein.loc[cite.obs_names].to_numpy(dtype=np.float64)
    cite.obs["cell_type"] = gate_protein_labels(cite, proteins)
    return cite, proteins


# (results folder, headline metric, tracks to show in the summary: label -> track name pattern)
SUMMARY_ROWS = (
    ("eval_pancancer", "pan-cancer (patient-grouped CV)", ("patient_macro_f1", "cell_macro_f1")),
    ("eval_annotation_pbmc68k", "annotation PBMC68k (stratified)", ("macro_f1", "accuracy")),
    ("eval_annotation_cellbench_transfer", "annotation CEL-seq2 -> Drop-seq", ("macro_f1", "accuracy")),
    ("eval_integration", "batch integration (CellBench)", ("Avg_bio", "Avg_batch")),
    ("eval_gene_programs", "gene programs (PBMC CITE-seq RNA)", ("mean_similarity_auroc",)),
    ("eval_multiomic", "multi-omic RNA+protein (CITE-seq)", ("Avg_bio",)),
)


def _track_kind(task: str, name: str) -> str | None:
    """Which summary column a track belongs to (None: not shown)."""
    if name.endswith("_finetuned"):
        return "fine-tuned"
    if "_random_init" in name:
        if task == "eval_multiomic":
            return "random init" if name.endswith("_rna+protein") else None
        return "random init"
    if task == "eval_multiomic":
        return {"baseline_pca_rna+protein": "baseline"}.get(name, "zero-shot" if name.endswith("_rna+protein") else None)
    if task == "eval_gene_programs":
        if name == "baseline_coexpression":
            return "baseline"
        return None if name.startswith("baseline") else "zero-shot"
    if name == "baseline_pca_hvg":
        return "baseline"
    return "zero-shot" if name.endswith(("_linear_probe", "_zero_shot")) else None


def write_summary(out: Path) -> Path:
    """`eval_summary.md`: one row per task and headline metric, model tracks beside the baseline (mean ± sd), with the
    date of the run each row comes from (tasks may be re-run separately, with `--tasks`)."""
    kinds = ("zero-shot", "fine-tuned", "random init", "baseline")
    lines = ["| task | metric | model zero-shot | model fine-tuned | random init | baseline | tracks | run |",
             "|---|---|---|---|---|---|---|---|"]
    for subdir, title, metrics in SUMMARY_ROWS:
        files = sorted((out / subdir).glob("eval_*.json"))
        if not files:
            continue
        report = json.loads(files[0].read_text())
        columns: dict[str, tuple[str, dict]] = {}
        for name, track in report["tracks"].items():
            kind = _track_kind(subdir, name)
            if kind is not None and kind not in columns:
                columns[kind] = (name, track["summary"])
        for metric in metrics:
            def cell(kind: str) -> str:
                if kind not in columns or metric not in columns[kind][1]:
                    return "not run"
                stat = columns[kind][1][metric]
                return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"

            names = " / ".join(columns[k][0] for k in kinds if k in columns)
            run = report.get("date", "?")
            lines.append(f"| {title} | {metric} | " + " | ".join(cell(k) for k in kinds) + f" | {names} | {run} |")
    path = out / "eval_summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _model_note(model: str) -> str:
    """What the checkpoint is, read from the pretraining summary next to it when there is one."""
    summary_path = Path(model).resolve().parent / "pretrain_summary.json"
    note = f"PanFoMa checkpoint: {model}."
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        note += (f" Pretrained from random initialisation by benchmarks/pretrain_eval_model.py: "
                 f"{summary['model']['parameters']:,} parameters, {summary['schedule']['steps']} steps of "
                 f"{summary['schedule']['batch_size']} cells on the {summary['bench']['splits'].get('train')} train "
                 f"cells of all ../shared/data files (masked-value loss {summary['loss_first'][1]:.3f} -> "
                 f"{summary['loss_last'][1]:.3f}). The evaluated cells were in that unlabelled pretraining set "
                 "(self-supervised, no labels); a pipeline demonstration, not the paper's model.")
    return note


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--model", default=None,
                        help="PanFoMa folder (model + processor): its tracks replace the model-free control")
    parser.add_argument("--embedding", choices=("control", "model"), default=None,
                        help="kept for older command lines: 'model' needs --model; default: model iff --model")
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="fine-tuned track of the PBMC annotation: optimiser steps (default: the fine-tuning "
                        "recipe's epochs and early stopping, panfoma.training.finetune.DEFAULT_*); 0 skips it; needs --model")
    parser.add_argument("--finetune-learning-rate", type=float, default=None,
                        help="fine-tuned track: backbone peak lr (default: panfoma.training.finetune's)")
    parser.add_argument("--no-random-init-control", dest="random_init_control", action="store_false",
                        help="skip the panfoma_random_init control tracks")
    parser.add_argument("--batch-size", type=int, default=64, help="embedding batch size (--model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["pancancer", "annotation", "integration", "gene_programs", "multiomic"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import anndata as ad
    import torch

    import panfoma.evaluation as ev

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if not args.data_dir.exists():
        logger.error("data folder %s not found", args.data_dir)
        return 2
    if args.embedding == "model" and not args.model:
        parser.error("--embedding model needs --model PATH")
    use_model = args.model is not None and args.embedding != "control"
    if args.finetune_steps is not None and args.finetune_steps < 0:
        parser.error("--finetune-steps must be >= 0")
    finetune_fn = control_fn = None
    track_notes: list[str] = []
    if use_model:
        from panfoma.training.finetune import DEFAULT_LEARNING_RATE

        tracks = ev.model_tracks(args.model, random_init_control=args.random_init_control,
                                 finetune=args.finetune_steps != 0, finetune_output_dir=REPO / "runs" / "eval-finetune",
                                 finetune_steps=args.finetune_steps or None,
                                 finetune_learning_rate=args.finetune_learning_rate or DEFAULT_LEARNING_RATE,
                                 batch_size=args.batch_size)
        embed_fn, gene_fn, control_fn, finetune_fn = (tracks.embed_fn, tracks.gene_fn, tracks.random_init_embed_fn,
                                                      tracks.finetune_fn)
        track_notes = tracks.notes
        model_name = "panfoma"
        model_note = _model_note(args.model)
    else:
        embed_fn, gene_fn = ev.random_projection_embedder(n_components=64, seed=0), None
        model_name = "control_random_projection"
        model_note = ("Cell embedding = MODEL-FREE CONTROL (fixed random projection of log-normalised expression), "
                      "not PanFoMa: no checkpoint was given to this run.")
    seeds = tuple(args.seeds)
    command = "python benchmarks/run_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    timings = {}
    date = time.strftime("%Y-%m-%d %H:%M %Z")

    def finish(report, subdir, *notes):
        report["command"] = command
        report["date"] = date
        report.setdefault("notes", [])[:0] = [model_note, *track_notes, *notes]
        out = args.out / subdir
        if out.is_dir():
            # A previous run may have had other tracks (e.g. the control's confusion plots): start clean.
            for old in out.glob("eval_*"):
                old.unlink()
        ev.write_report(report, out)

    def embedded(adata, what: str):
        """`adata` with the cell embeddings in obsm["X_eval"] (and the random-init control's in
        obsm["X_eval_random_init"]), computed once and shared by the tasks using them."""
        t0 = time.perf_counter()
        adata.obsm["X_eval"] = embed_fn(adata)
        if control_fn is not None:
            adata.obsm["X_eval_random_init"] = control_fn(adata)
        timings[f"embed_{what}"] = time.perf_counter() - t0
        return adata

    control_key = "X_eval_random_init" if control_fn is not None else None

    shared_note = ("The cell embedding was computed once per dataset (all its cells, before any split) and read "
                   "from obsm['X_eval']: frozen embeddings need no training, so no test information enters them.")

    if "pancancer" in args.tasks:
        t0 = time.perf_counter()
        parts = []
        for path in sorted((args.data_dir / "cancer").glob("*.h5ad")):
            part = ev.standardize_gene_names(ad.read_h5ad(path))
            part.obs["dataset"] = path.stem
            part.obs_names = [f"{path.stem}:{n}" for n in part.obs_names]
            parts.append(part)
        cancer = ad.concat(parts, join="inner")
        finish(ev.evaluate_pancancer(cancer, embed_fn, random_init_embed_fn=control_fn, model_name=model_name,
                                     study_key="dataset", seeds=seeds,
                                     dataset_name=f"cancer/*.h5ad (5 studies, {cancer.n_vars} shared genes)"),
               "eval_pancancer")
        timings["pancancer"] = time.perf_counter() - t0

    lung = None
    if "annotation" in args.tasks:
        t0 = time.perf_counter()
        pbmc = ad.read_h5ad(args.data_dir / "pbmc" / "pbmc68k_reduced_counts.h5ad")
        notes = []
        finish(ev.evaluate_annotation(pbmc, embed_fn, random_init_embed_fn=control_fn, finetune_fn=finetune_fn,
                                      model_name=model_name, n_top_genes=500,
                                      seeds=seeds, dataset_name="pbmc68k_reduced_counts (765 HVGs only)"),
               "eval_annotation_pbmc68k", *notes)
        timings["annotation_pbmc68k"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lung = embedded(ev.standardize_gene_names(ad.read_h5ad(args.data_dir / "cancer" / "cellbench_lung_celllines.h5ad")),
                        "lung")
        is_query = (lung.obs["batch"] == "sc_dropseq").to_numpy()
        notes = [shared_note]
        if finetune_fn is not None:
            notes.append("No fine-tuned track here: fine-tuning on ~1,000 cells with ~5,000 detected genes each does "
                         "not fit this run's CPU budget (it does for the PBMC annotation).")
        finish(ev.evaluate_annotation(lung[~is_query].copy(), embedding_key="X_eval", query=lung[is_query].copy(),
                                      random_init_embedding_key=control_key,
                                      model_name=model_name, seeds=seeds,
                                      dataset_name="cellbench lung cell lines: CEL-seq2 (4 batches) -> Drop-seq"),
               "eval_annotation_cellbench_transfer", *notes)
        timings["annotation_cellbench"] = time.perf_counter() - t0

    if "integration" in args.tasks:
        t0 = time.perf_counter()
        if lung is None:
            lung = embedded(ev.standardize_gene_names(
                ad.read_h5ad(args.data_dir / "cancer" / "cellbench_lung_celllines.h5ad")), "lung")
        finish(ev.evaluate_integration(lung, embedding_key="X_eval", random_init_embedding_key=control_key,
                                       model_name=model_name, seeds=seeds,
                                       dataset_name="cellbench lung cell lines (5 batches)"),
               "eval_integration", shared_note,
               *(["No fine-tuned track: no fine-tuned embedding model was trained in this run."] if use_model else []))
        timings["integration"] = time.perf_counter() - t0

    cite = None
    if "gene_programs" in args.tasks:
        t0 = time.perf_counter()
        cite, _ = load_cite(args.data_dir)
        if gene_fn is not None:
            cite_genes = ev.standardize_gene_names(cite)
            gene_emb, genes = gene_fn(list(cite_genes.var_names))
            report = ev.evaluate_gene_programs(gene_emb, genes, cite_genes, embedding_name="panfoma_gene_embedding",
                                               seeds=seeds, dataset_name="PBMC CITE-seq 5k+10k (RNA, 400 cells)")
            notes = ["Gene embedding = the model's input gene-token embeddings (Emb_id), as trained by the short "
                     "pretraining."]
        else:
            genes = list(cite.var_names)
            report = ev.evaluate_gene_programs(ev.random_gene_vectors(genes, 64, seed=0), genes, cite,
                                               embedding_name="control_random_gene_vectors", seeds=seeds,
                                               dataset_name="PBMC CITE-seq 5k+10k (RNA, 400 cells)")
            notes = ["Gene embedding = MODEL-FREE CONTROL (random vector per gene): expect AUROC ~0.5."]
        finish(report, "eval_gene_programs", *notes)
        timings["gene_programs"] = time.perf_counter() - t0

    if "multiomic" in args.tasks:
        t0 = time.perf_counter()
        if cite is None:
            cite, _ = load_cite(args.data_dir)
        report = ev.evaluate_multiomic(cite, embed_fn, random_init_embed_fn=control_fn, model_name=model_name, seeds=seeds,
                                       dataset_name="PBMC CITE-seq 5k+10k (400 cells, 2 batches)")
        report["data"]["label_source"] = "protein gating (run_eval.gate_protein_labels)"
        finish(report, "eval_multiomic",
               "Labels gated from protein markers (CD3/CD4/CD8a/CD14/CD16/CD19/CD56, 2-means thresholds on CLR values): "
               "embeddings that contain protein are favoured by construction; compare RNA+protein tracks with each other.")
        timings["multiomic"] = time.perf_counter() - t0

    write_summary(args.out)
    # Merged with earlier runs (e.g. one task re-run with other settings): each entry names its own command.
    timing_path = args.out / "eval_timings.json"
    previous = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    previous = {k: v for k, v in previous.items() if isinstance(v, dict) and "seconds" in v}
    previous.update({k: {"seconds": round(v, 1), "command": command, "date": date} for k, v in timings.items()})
    timing_path.write_text(json.dumps(previous, indent=2))
    logger.info("timings (s): %s", timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
