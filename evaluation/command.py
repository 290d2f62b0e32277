"""The ``panfoma evaluate TASK`` command: its flags, reading the inputs, running one task, writing its report.

Owns only the command-line surface; the tasks themselves are `panfoma.evaluation.tasks` and the model hooks
`panfoma.evaluation.model_hooks`, so the Python API and the command run the same code. Those modules (torch,
transformers, pandas) are imported when a task runs, so building the parser (`panfoma evaluate --help`) imports
none of them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from panfoma.training.finetune import DEFAULT_HEAD_LEARNING_RATE, DEFAULT_LEARNING_RATE
from .metrics import DEFAULT_RESOLUTIONS

logger = logging.getLogger(__name__)

TASKS = ("pancancer", "annotation", "integration", "gene_programs", "multiomic")
#: The stages of a run, in order; progress messages number them ("stage 3 of 4: ...").
STAGES = ("read", "model", "task", "report")


def _stage(number: int, text: str) -> None:
    logger.info("stage %d of %d: %s", number, len(STAGES), text)


def add_evaluate_arguments(parser) -> None:
    """Add ``TASK`` sub-commands and their options to an ``argparse`` parser (the ``evaluate`` command).

    Wiring in the console script::

        sub = subparsers.add_parser("evaluate", help="evaluate on the paper's tasks")
        add_evaluate_arguments(sub); sub.set_defaults(func=run_evaluate)
    """
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")

    def common(p, label_default: str):
        p.add_argument("data", nargs="+", help=".h5ad file(s); several files are concatenated (shared genes)")
        source = p.add_mutually_exclusive_group()
        source.add_argument("--model", help="PanFoMa checkpoint (directory or Hub id) to embed cells with, or a preset "
                            "name (panfoma-tiny/-small/-base: randomly initialised, default processor)")
        source.add_argument("--embedding-key", help="use a precomputed adata.obsm key instead of a model")
        source.add_argument("--random-projection-control", action="store_true",
                            help="use the model-free random-projection control instead of a model (smoke runs)")
        p.add_argument("--output-dir", required=True, help="folder for eval_<task>.json/.md and plots")
        p.add_argument("--label-key", default=label_default)
        p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (>= 3 where there is training)")
        p.add_argument("--study-from-file", action="store_true",
                       help="set obs['dataset'] to each input file's name before concatenating")
        p.add_argument("--standardize-genes", action="store_true",
                       help="map var_names to HGNC symbols (PanFoMa vocabulary) before concatenating")
        p.add_argument("--batch-size", type=int, default=64, help="embedding batch size (--model)")
        p.add_argument("--drop-empty-cells", action="store_true",
                       help="leave out cells without expression in any vocabulary gene (counted in the report); "
                       "without it such a cell stops a --model run")
        p.add_argument("--device", default=None, help="device for --model (default: cuda if available)")
        p.add_argument("--no-random-init-control", dest="random_init_control", action="store_false",
                       help="skip the panfoma_random_init track (a randomly initialised model of the same config, "
                       "beside --model in every zero-shot table)")

    def finetune_options(p):
        p.add_argument("--finetune", action="store_true",
                       help="add the panfoma_finetuned track: fine-tune --model on each split's training cells")
        p.add_argument("--finetune-steps", type=int, default=None,
                       help="optimiser steps per fine-tuning (default: the panfoma finetune recipe's epochs and "
                       "early stopping)")
        p.add_argument("--finetune-learning-rate", type=float, default=DEFAULT_LEARNING_RATE,
                       help=f"backbone peak learning rate (default {DEFAULT_LEARNING_RATE:g})")
        p.add_argument("--finetune-head-learning-rate", type=float, default=DEFAULT_HEAD_LEARNING_RATE,
                       help="classifier head / input embedding peak learning rate (default: "
                       + ("--finetune-learning-rate" if DEFAULT_HEAD_LEARNING_RATE is None
                          else f"{DEFAULT_HEAD_LEARNING_RATE:g}") + ")")
        p.add_argument("--finetune-output-dir", default=None,
                       help="temporary fine-tuning checkpoints (default: OUTPUT_DIR/finetune; removed after each run)")

    p = tasks.add_parser("pancancer", help="cancer-type classification, patient-grouped")
    common(p, "cancer_type")
    finetune_options(p)
    p.add_argument("--patient-key", default="patient")
    p.add_argument("--study-key", default="dataset")
    p.add_argument("--group-by", choices=("patient", "study"), default="patient")
    p.add_argument("--n-splits", type=int, default=5)
    p.add_argument("--min-groups-per-class", type=int, default=3)

    p = tasks.add_parser("annotation", help="cell-type annotation (stratified split or reference -> query)")
    common(p, "cell_type")
    finetune_options(p)
    p.add_argument("--query", nargs="+", default=None, help="query .h5ad file(s): transfer mode")
    p.add_argument("--query-batches", nargs="+", default=None,
                   help="instead of --query: cells whose --batch-key is one of these form the query")
    p.add_argument("--batch-key", default="batch")

    for name, helptext in (("integration", "scIB batch integration"), ("multiomic", "RNA + protein integration")):
        p = tasks.add_parser(name, help=helptext)
        common(p, "cell_type")
        p.add_argument("--batch-key", default="batch")
        p.add_argument("--resolutions", type=float, nargs="+", default=list(DEFAULT_RESOLUTIONS))
        p.add_argument("--cluster-method", choices=("leiden", "louvain"), default="leiden")
        p.add_argument("--max-cells", type=int, default=None)
        if name == "multiomic":
            p.add_argument("--protein-key", default="protein_expression")

    p = tasks.add_parser("gene_programs", help="gene programs from gene embeddings vs co-expression")
    common(p, "cell_type")
    p.add_argument("--gene-embeddings", default=None,
                   help=".npz with arrays 'embeddings' (n_genes, d) and 'genes' (n_genes,); default: the model's")
    p.add_argument("--n-permutations", type=int, default=20)
    p.add_argument("--max-genes", type=int, default=3000)


def _read_inputs(paths: Sequence[str], study_from_file: bool, standardize: bool):
    import anndata as ad

    from .skeleton import standardize_gene_names

    parts = []
    for path in paths:
        part = ad.read_h5ad(path)
        if standardize:
            part = standardize_gene_names(part)
        if study_from_file:
            part.obs["dataset"] = Path(path).name.split(".")[0]
        part.obs_names = [f"{Path(path).stem}:{n}" for n in part.obs_names]
        parts.append(part)
    if len(parts) == 1:
        return parts[0]
    shared = parts[0].var_names
    for part in parts[1:]:
        shared = shared.intersection(part.var_names)
    if len(shared) < 500:
        raise ValueError(f"The input files share only {len(shared)} genes; pass --standardize-genes to map IDs to symbols.")
    logger.info("concatenating %d files on %d shared genes", len(parts), len(shared))
    return ad.concat([p[:, shared] for p in parts], join="inner", merge="same")


def _drop_empty_cells(adata, model: str | None, what: str):
    """``adata`` without the cells the model's processor (the default one without a model) finds empty, and a note."""
    from panfoma.tokenization import PanFoMaGeneProcessor

    if model:
        from panfoma.inference.embed import config_and_processor

        processor = config_and_processor(model)[1]
    else:
        processor = PanFoMaGeneProcessor()
    empty = processor.empty_cells(adata)
    if not empty.any():
        return adata, None
    names = list(adata.obs_names[empty])
    logger.warning("%s: dropping %d cell(s) without expression in vocabulary genes, e.g. %s", what, len(names),
                   names[:5])
    note = (f"--drop-empty-cells: {len(names)} {what} cell(s) without expression in any vocabulary gene were left "
            f"out: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    return adata[~empty].copy(), note


def run_evaluate(args) -> dict:
    """Run the task selected by ``add_evaluate_arguments``' parser; returns the report dict."""
    from .baselines import random_gene_vectors, random_projection_embedder
    from .model_hooks import model_tracks
    from .report import write_report
    from .skeleton import require_obs_columns
    from .tasks import (
        evaluate_annotation,
        evaluate_gene_programs,
        evaluate_integration,
        evaluate_multiomic,
        evaluate_pancancer,
    )

    wants_finetune = getattr(args, "finetune", False)
    if wants_finetune and not getattr(args, "model", None):
        raise ValueError("--finetune needs --model (the checkpoint or preset to fine-tune).")
    _stage(1, f"reading {', '.join(args.data)}")
    adata = _read_inputs(args.data, args.study_from_file, args.standardize_genes)
    _stage(2, f"loading {args.model}" if getattr(args, "model", None) else "preparing the embedding")
    embed_fn = gene_fn = None
    tracks_kwargs: dict = {}
    notes: list[str] = []
    drop_notes: list[str] = []
    if getattr(args, "drop_empty_cells", False):
        adata, note = _drop_empty_cells(adata, getattr(args, "model", None), "input")
        drop_notes += [note] if note else []
    if getattr(args, "model", None):
        tracks = model_tracks(
            args.model, random_init_control=getattr(args, "random_init_control", True), finetune=wants_finetune,
            finetune_output_dir=getattr(args, "finetune_output_dir", None) or Path(args.output_dir) / "finetune",
            finetune_steps=getattr(args, "finetune_steps", None),
            finetune_learning_rate=getattr(args, "finetune_learning_rate", DEFAULT_LEARNING_RATE),
            finetune_head_learning_rate=getattr(args, "finetune_head_learning_rate", DEFAULT_HEAD_LEARNING_RATE),
            batch_size=args.batch_size, device=args.device,
        )
        embed_fn, gene_fn, notes = tracks.embed_fn, tracks.gene_fn, tracks.notes
        if args.task != "gene_programs":
            tracks_kwargs["random_init_embed_fn"] = tracks.random_init_embed_fn
        if args.task in ("pancancer", "annotation"):
            tracks_kwargs["finetune_fn"] = tracks.finetune_fn
    elif getattr(args, "random_projection_control", False):
        embed_fn = random_projection_embedder()
    model_name = "control_random_projection" if getattr(args, "random_projection_control", False) else "panfoma"
    # The report is written once, below, after the command line is recorded in it.
    kwargs = {"embedding_key": args.embedding_key, "output_dir": None,
              "dataset_name": ",".join(Path(p).name for p in args.data), **tracks_kwargs}
    if args.seeds:
        kwargs["seeds"] = args.seeds
    command = "panfoma " + " ".join(sys.argv[1:]) if sys.argv and "evaluate" in sys.argv else f"panfoma evaluate {args.task}"
    _stage(3, f"{args.task}: embedding the cells, fitting the tracks and baselines over the seeds")
    if args.task == "pancancer":
        report = evaluate_pancancer(adata, embed_fn, model_name=model_name, label_key=args.label_key, patient_key=args.patient_key,
                                    study_key=args.study_key or None, group_by=args.group_by, n_splits=args.n_splits,
                                    min_groups_per_class=args.min_groups_per_class, **kwargs)
    elif args.task == "annotation":
        query = None
        if args.query:
            query = _read_inputs(args.query, False, args.standardize_genes)
            if getattr(args, "drop_empty_cells", False):
                query, note = _drop_empty_cells(query, getattr(args, "model", None), "query")
                drop_notes += [note] if note else []
        elif args.query_batches:
            require_obs_columns(adata, [args.batch_key], "annotation --query-batches")
            in_query = adata.obs[args.batch_key].astype(str).isin(args.query_batches).to_numpy()
            if not in_query.any() or in_query.all():
                raise ValueError(f"--query-batches {args.query_batches} must select some but not all cells.")
            adata, query = adata[~in_query].copy(), adata[in_query].copy()
        report = evaluate_annotation(adata, embed_fn, model_name=model_name, query=query, label_key=args.label_key, **kwargs)
    elif args.task == "integration":
        report = evaluate_integration(adata, embed_fn, model_name=model_name, label_key=args.label_key, batch_key=args.batch_key,
                                      resolutions=args.resolutions, cluster_method=args.cluster_method,
                                      max_cells=args.max_cells, **kwargs)
    elif args.task == "multiomic":
        report = evaluate_multiomic(adata, embed_fn, model_name=model_name, label_key=args.label_key, batch_key=args.batch_key,
                                    protein_key=args.protein_key, resolutions=args.resolutions,
                                    cluster_method=args.cluster_method, **kwargs)
    elif args.task == "gene_programs":
        if args.gene_embeddings:
            payload = np.load(args.gene_embeddings, allow_pickle=False)
            if "embeddings" not in payload or "genes" not in payload:
                raise ValueError(f"{args.gene_embeddings} must hold arrays 'embeddings' and 'genes'.")
            gene_emb, genes, name = payload["embeddings"], payload["genes"].astype(str), "gene_embeddings_file"
        elif gene_fn is not None:
            gene_emb, genes = gene_fn(list(adata.var_names))
            name = "panfoma_gene_embedding"
        elif args.random_projection_control:
            genes = list(adata.var_names)
            gene_emb, name = random_gene_vectors(genes), "random_gene_vectors_control"
        else:
            raise ValueError("gene_programs needs --model, --gene-embeddings FILE.npz or --random-projection-control.")
        kwargs.pop("embedding_key")
        report = evaluate_gene_programs(gene_emb, genes, adata, n_permutations=args.n_permutations,
                                        max_genes=args.max_genes, embedding_name=name, **kwargs)
    else:
        raise ValueError(f"Unknown task {args.task!r}; choose one of {TASKS}.")
    report["command"] = command
    if notes or drop_notes:
        report.setdefault("notes", [])[:0] = notes + drop_notes
    _stage(4, f"writing the report to {args.output_dir}")
    write_report(report, args.output_dir)
    return report


__all__ = ["TASKS", "add_evaluate_arguments", "run_evaluate"]
