"""CPU precision (issue 7, item 6): bf16 autocast vs fp32 for embedding, end to end.

Reports, measured in one run:
- speed: forward (embedding) cells/s of the model in fp32 and under `torch.autocast("cpu", torch.bfloat16)`, at
  the pretraining size, interleaved repeats (median) -> the speed-up;
- agreement of the cell embeddings (`pooler_output`) of the same cells in both precisions: per-cell cosine
  similarity (median, 5th percentile, minimum), the mean overlap of the k nearest neighbours (cosine) of every
  cell, and the fraction of cells whose dynamic gene order (GDS sort) is identical;
- a recommendation: bf16 as the `embed` default only where the speed-up is real AND the agreement holds
  (median cosine after removing the mean embedding >= 0.99 and kNN overlap >= 0.9). The raw cosine alone is
  not enough: an untrained model gives all cells nearly the same embedding (cell-to-cell cosine ~1, reported).

Cells: real cells from ../shared/data/multiome (encoded with `PanFoMaGeneProcessor`) when present, else
generated cells with cluster structure. The model is randomly initialised (seeded) unless `--model PATH` gives a
trained checkpoint; a trained model's agreement is the one that matters, so re-run with it once one exists.

Usage (from the repository root):

    python benchmarks/bench_precision.py [--quick] [--threads N] [--model PATH] [--out results/precision.json]
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import (  # noqa: E402
    SHARED_DATA,
    build_model,
    common_argparser,
    make_inputs,
    print_table,
    setup_threads,
    tune_glibc_malloc,
    write_json,
)

FULL = dict(preset="panfoma-base", genes=3072, batch=1, repeats=3, cells=64, max_genes=3072, k=10, batch_cells=4)
QUICK = dict(preset="panfoma-tiny", genes=96, batch=2, repeats=2, cells=24, max_genes=64, k=5, batch_cells=8)
COSINE_THRESHOLD, KNN_THRESHOLD, SPEEDUP_THRESHOLD = 0.99, 0.9, 1.2


def load_cells(config, n_cells: int, max_genes: int, seed: int = 0) -> tuple[list[dict], str]:
    """Encoded cells as a list of single-cell input dicts (no padding), and where they came from."""
    path = SHARED_DATA / "multiome" / "pbmc_10k_protein_v3_rna_adt.h5ad"
    if path.exists() and config.vocab_size > 1000:
        try:
            import anndata

            from panfoma.tokenization import PanFoMaGeneProcessor
        except ImportError:
            anndata = None
        if anndata is not None:
            adata = anndata.read_h5ad(path)[:n_cells]
            processor = PanFoMaGeneProcessor(max_genes=max_genes, n_bins=config.n_bins, seed=seed)
            batch = processor(adata, return_tensors="pt", drop_empty_cells=True)
            cells = []
            for i in range(batch["input_ids"].shape[0]):
                keep = batch["attention_mask"][i].bool()
                cells.append({k: batch[k][i][keep].unsqueeze(0) for k in ("input_ids", "values", "attention_mask")})
            return cells, f"real: {path.name} (first {len(cells)} cells, max_genes={max_genes})"
    # Generated cells with structure: 6 groups, each expressing its own gene programme plus shared genes.
    rng = np.random.default_rng(seed)
    programmes = [rng.choice(np.arange(4, config.vocab_size), size=max_genes, replace=False) for _ in range(6)]
    cells = []
    for i in range(n_cells):
        programme = programmes[i % 6]
        genes = rng.choice(programme, size=max(8, max_genes * 3 // 4), replace=False)
        values = np.clip(rng.poisson(3, size=genes.size) + (genes % 7 == i % 6) * 20, 1, config.n_bins - 1)
        cells.append({"input_ids": torch.as_tensor(genes).view(1, -1), "values": torch.as_tensor(values).view(1, -1),
                      "attention_mask": torch.ones(1, genes.size, dtype=torch.long)})
    return cells, f"generated: {n_cells} cells in 6 gene programmes"


def embed(model, cells: list[dict], precision: str, batch_cells: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cell embeddings (n, d) and per-cell gene orders, cells batched with right padding."""
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    pooled, orders = [], []
    for start in range(0, len(cells), batch_cells):
        group = cells[start : start + batch_cells]
        width = max(c["input_ids"].shape[1] for c in group)
        batch = {}
        for key, pad in (("input_ids", model.config.pad_token_id), ("values", model.config.value_pad_id),
                         ("attention_mask", 0)):
            batch[key] = torch.cat([torch.nn.functional.pad(c[key], (0, width - c[key].shape[1]), value=pad)
                                    for c in group])
        with torch.no_grad(), context:
            out = model.model(**batch, return_dict=True)
        pooled.append(out.pooler_output.float().numpy())
        for i, c in enumerate(group):
            orders.append(out.gene_order[i, : c["input_ids"].shape[1]].numpy())
    return np.concatenate(pooled), orders


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean fraction of each cell's k nearest neighbours (cosine) shared between embeddings a and b."""
    def neighbours(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    na, nb = neighbours(a), neighbours(b)
    return float(np.mean([len(set(na[i]) & set(nb[i])) / k for i in range(len(a))]))


def main(argv=None) -> dict:
    parser = common_argparser(__doc__.splitlines()[0], "precision.json")
    parser.add_argument("--model", default=None, help="a saved PanFoMa checkpoint (default: random init, seeded)")
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)
    if args.tuned_malloc:
        tune_glibc_malloc()
    sizes = QUICK if args.quick else FULL
    model = build_model("panfoma", sizes["preset"], quick=args.quick).eval()
    if args.model:
        from panfoma import PanFoMaModel

        model.model = PanFoMaModel.from_pretrained(args.model).eval()
        model.config = model.model.config
    config = model.config

    # Speed: interleave the two precisions so machine noise hits both alike.
    inputs = make_inputs(config.vocab_size, config.n_bins, sizes["batch"], sizes["genes"])
    contexts = {"fp32": nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    times = {"fp32": [], "bf16": []}
    for round_index in range(sizes["repeats"] + 1):
        for precision, context in contexts.items():
            t0 = time.perf_counter()
            with torch.no_grad(), context():
                model(**inputs)
            if round_index:  # round 0 is the warm-up
                times[precision].append(time.perf_counter() - t0)
    median = {p: statistics.median(t) for p, t in times.items()}
    speedup = median["fp32"] / median["bf16"]
    print(f"forward {sizes['genes']} genes: fp32 {median['fp32']:.2f}s, bf16 {median['bf16']:.2f}s -> {speedup:.2f}x",
          flush=True)

    # Agreement on the same cells.
    cells, source = load_cells(config, sizes["cells"], sizes["max_genes"])
    emb32, order32 = embed(model, cells, "fp32", sizes["batch_cells"])
    emb16, order16 = embed(model, cells, "bf16", sizes["batch_cells"])
    cosine = np.sum(emb32 * emb16, 1) / (np.linalg.norm(emb32, axis=1) * np.linalg.norm(emb16, axis=1))
    # Raw cosines are near 1 whenever all cells share a large common component (e.g. an untrained model), so
    # also compare after removing the fp32 mean embedding, and give the cell-to-cell cosine as the yardstick.
    centre = emb32.mean(0, keepdims=True)
    c32, c16 = emb32 - centre, emb16 - centre
    centred = np.sum(c32 * c16, 1) / (np.linalg.norm(c32, axis=1) * np.linalg.norm(c16, axis=1)).clip(min=1e-12)
    unit = emb32 / np.linalg.norm(emb32, axis=1, keepdims=True)
    between = (unit @ unit.T)[np.triu_indices(len(unit), k=1)]
    relative_error = np.linalg.norm(emb16 - emb32, axis=1) / np.linalg.norm(c32, axis=1).clip(min=1e-12)
    overlap = knn_overlap(emb32, emb16, sizes["k"])
    same_order = float(np.mean([np.array_equal(a, b) for a, b in zip(order32, order16)]))
    position_agreement = float(np.mean([np.mean(a == b) for a, b in zip(order32, order16)]))
    agreement = {
        "cells": len(cells),
        "source": source,
        "cosine_median": float(np.median(cosine)),
        "cosine_p05": float(np.percentile(cosine, 5)),
        "cosine_min": float(cosine.min()),
        "centred_cosine_median": float(np.median(centred)),
        "centred_cosine_min": float(centred.min()),
        "between_cell_cosine_median": float(np.median(between)),
        "relative_error_median": float(np.median(relative_error)),
        "knn_k": sizes["k"],
        "knn_overlap": overlap,
        "identical_gene_order_fraction": same_order,
        "gene_order_position_agreement": position_agreement,
    }
    holds = agreement["centred_cosine_median"] >= COSINE_THRESHOLD and overlap >= KNN_THRESHOLD
    recommend = holds and speedup >= SPEEDUP_THRESHOLD
    reason = (f"speed-up {speedup:.2f}x (needs >= {SPEEDUP_THRESHOLD}), median centred cosine "
              f"{agreement['centred_cosine_median']:.4f} (needs >= {COSINE_THRESHOLD}), kNN@{sizes['k']} overlap "
              f"{overlap:.3f} (needs >= {KNN_THRESHOLD})")
    rows = [
        ["fp32 forward", f"{sizes['batch'] / median['fp32']:.3g} cells/s", "-"],
        ["bf16 autocast forward", f"{sizes['batch'] / median['bf16']:.3g} cells/s", f"{speedup:.2f}x fp32"],
        ["cosine(fp32, bf16) per cell", f"median {agreement['cosine_median']:.4f}",
         f"p5 {agreement['cosine_p05']:.4f}, min {agreement['cosine_min']:.4f}"],
        ["centred cosine (fp32 mean removed)", f"median {agreement['centred_cosine_median']:.4f}",
         f"min {agreement['centred_cosine_min']:.4f}; cell-to-cell cosine median "
         f"{agreement['between_cell_cosine_median']:.4f}; |bf16-fp32| / |fp32 - mean| median "
         f"{agreement['relative_error_median']:.3f}"],
        [f"kNN overlap (k={sizes['k']})", f"{overlap:.3f}", f"{len(cells)} cells, {source.split(':')[0]}"],
        ["identical GDS gene order", f"{100 * same_order:.0f}% of cells",
         f"{100 * position_agreement:.1f}% of positions"],
        ["bf16 as embed default?", "yes" if recommend else "no", reason],
    ]
    print(f"\nbf16 autocast vs fp32 on CPU ({sizes['preset']}, {threads} threads, "
          f"{'trained: ' + args.model if args.model else 'random init'})")
    table = print_table(rows, ["what", "value", "detail"])
    payload = {"benchmark": "precision", "quick": args.quick, "preset": sizes["preset"], "model": args.model,
               "genes": sizes["genes"], "batch": sizes["batch"], "seconds": times, "median_s": median,
               "speedup": speedup, "agreement": agreement, "recommend_bf16_default": recommend, "reason": reason,
               "table": table}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
