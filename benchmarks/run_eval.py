"""The committed small real evaluation run: all five tasks on ../shared/data.

Usage (from the repository root):

    OMP_NUM_THREADS=1 python benchmarks/run_eval.py [--data-dir ../shared/data] [--out benchmarks/results]
        [--embedding control|model] [--model PATH]

Until a trained PanFoMa checkpoint exists, the cell embedding is a MODEL-FREE CONTROL (a fixed random
projection of log-normalised expression, `random_projection_embedder`) and the gene embedding is a fixed
random vector per gene (`random_gene_vectors`); their tracks are named `control_*`, never `panfoma_*`.
Every baseline and every metric is the real one. With `--embedding model --model PATH`, the
PanFoMa checkpoint is used through `panfoma.training.embed` (cell tasks only).

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

    from panfoma.training.evaluation import clr_normalize

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--embedding", choices=("control", "model"), default="control")
    parser.add_argument("--model", default=None)
    parser.add_argument("--tasks", nargs="+", default=["pancancer", "annotation", "integration", "gene_programs", "multiomic"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import anndata as ad

    from panfoma.training import evaluation as ev

    if not args.data_dir.exists():
        logger.error("data folder %s not found", args.data_dir)
        return 2
    if args.embedding == "model":
        if not args.model:
            parser.error("--embedding model needs --model PATH")
        embed_fn, gene_fn = ev.model_embed_fn(args.model)
        model_name = "panfoma"
    else:
        embed_fn, gene_fn = ev.random_projection_embedder(n_components=64, seed=0), None
        model_name = "control_random_projection"
    command = "python benchmarks/run_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    timings = {}

    def finish(report, subdir):
        report["command"] = command
        report.setdefault("notes", []).insert(0, (
            "Cell embedding = MODEL-FREE CONTROL (fixed random projection of log-normalised expression), "
            "not PanFoMa: no trained checkpoint was available for this run." if model_name != "panfoma"
            else f"PanFoMa checkpoint: {args.model}"))
        ev.write_report(report, args.out / subdir)

    if "pancancer" in args.tasks:
        t0 = time.perf_counter()
        parts = []
        for path in sorted((args.data_dir / "cancer").glob("*.h5ad")):
            part = ev.standardize_gene_names(ad.read_h5ad(path))
            part.obs["dataset"] = path.stem
            part.obs_names = [f"{path.stem}:{n}" for n in part.obs_names]
            parts.append(part)
        cancer = ad.concat(parts, join="inner")
        finish(ev.evaluate_pancancer(cancer, embed_fn, model_name=model_name, study_key="dataset",
                                     dataset_name=f"cancer/*.h5ad (5 studies, {cancer.n_vars} shared genes)"),
               "eval_pancancer")
        timings["pancancer"] = time.perf_counter() - t0

    if "annotation" in args.tasks:
        t0 = time.perf_counter()
        pbmc = ad.read_h5ad(args.data_dir / "pbmc" / "pbmc68k_reduced_counts.h5ad")
        finish(ev.evaluate_annotation(pbmc, embed_fn, model_name=model_name, n_top_genes=500,
                                      dataset_name="pbmc68k_reduced_counts (765 HVGs only)"), "eval_annotation_pbmc68k")
        lung = ev.standardize_gene_names(ad.read_h5ad(args.data_dir / "cancer" / "cellbench_lung_celllines.h5ad"))
        is_query = (lung.obs["batch"] == "sc_dropseq").to_numpy()
        finish(ev.evaluate_annotation(lung[~is_query].copy(), embed_fn, query=lung[is_query].copy(), model_name=model_name,
                                      dataset_name="cellbench lung cell lines: CEL-seq2 (4 batches) -> Drop-seq"),
               "eval_annotation_cellbench_transfer")
        timings["annotation"] = time.perf_counter() - t0

    if "integration" in args.tasks:
        t0 = time.perf_counter()
        lung = ev.standardize_gene_names(ad.read_h5ad(args.data_dir / "cancer" / "cellbench_lung_celllines.h5ad"))
        finish(ev.evaluate_integration(lung, embed_fn, model_name=model_name, seeds=(0, 1, 2),
                                       dataset_name="cellbench lung cell lines (5 batches)"), "eval_integration")
        timings["integration"] = time.perf_counter() - t0

    cite = None
    if "gene_programs" in args.tasks:
        t0 = time.perf_counter()
        cite, _ = load_cite(args.data_dir)
        if gene_fn is not None:
            cite_genes = ev.standardize_gene_names(cite)
            gene_emb, genes = gene_fn(list(cite_genes.var_names))
            report = ev.evaluate_gene_programs(gene_emb, genes, cite_genes, embedding_name="panfoma_gene_embedding",
                                               dataset_name="PBMC CITE-seq 5k+10k (RNA, 400 cells)")
        else:
            genes = list(cite.var_names)
            report = ev.evaluate_gene_programs(ev.random_gene_vectors(genes, 64, seed=0), genes, cite,
                                               embedding_name="control_random_gene_vectors",
                                               dataset_name="PBMC CITE-seq 5k+10k (RNA, 400 cells)")
            report.setdefault("notes", []).append(
                "Gene embedding = MODEL-FREE CONTROL (random vector per gene): expect AUROC ~0.5.")
        finish(report, "eval_gene_programs")
        timings["gene_programs"] = time.perf_counter() - t0

    if "multiomic" in args.tasks:
        t0 = time.perf_counter()
        if cite is None:
            cite, _ = load_cite(args.data_dir)
        report = ev.evaluate_multiomic(cite, embed_fn, model_name=model_name, seeds=(0, 1, 2),
                                       dataset_name="PBMC CITE-seq 5k+10k (400 cells, 2 batches)")
        report.setdefault("notes", []).append(
            "Labels gated from protein markers (CD3/CD4/CD8a/CD14/CD16/CD19/CD56, 2-means thresholds on CLR values): "
            "embeddings that contain protein are favoured by construction; compare RNA+protein tracks with each other.")
        report["data"]["label_source"] = "protein gating (run_eval.gate_protein_labels)"
        finish(report, "eval_multiomic")
        timings["multiomic"] = time.perf_counter() - t0

    (args.out / "eval_timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2))
    logger.info("timings (s): %s", timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
