"""Each `panfoma` command: its one-line help, the module whose adder defines its options (imported only when the
command is parsed, so `panfoma --help` loads none of them), and its handler, which runs the cheap input checks of
`panfoma.cli.inputs`, then imports the library and calls the command's function and prints its summary. The flags
every command shares are added by `panfoma.cli.options`; errors are turned into messages by `panfoma.cli.main`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .inputs import PanFoMaUsageError, check_layer, check_model, prepare_input
from .options import without_cli_options

def _print(text: str) -> None:
    """Console output of the CLI (rich when installed)."""
    try:
        from rich.console import Console

        Console().print(text, markup=False, highlight=False)
    except ImportError:
        sys.stdout.write(text + "\n")


def _import_library() -> None:
    """Import panfoma's API and register its Auto classes: under the command line `import panfoma` defers them to
    their first use (so `--help` needs no torch), and a command's first call may be a transformers Auto class.
    Commands call this after their cheap checks, so a mistake is reported in a fraction of a second."""
    getattr(importlib.import_module("panfoma"), "_import_public_api", lambda: None)()


def _cmd_demo(args: argparse.Namespace) -> int:
    _import_library()
    from panfoma.training.demo import format_summary, run_demo_cli

    _print(format_summary(run_demo_cli(args)))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    _import_library()
    from panfoma.training.pretrain import run_pretrain

    return run_pretrain(args, without_cli_options(args._argv))


def _cmd_finetune(args: argparse.Namespace) -> int:
    check_model(args.model, "model", presets_allowed=True)  # a preset: fine-tuning from random initialisation
    _import_library()
    from panfoma.training.finetune import run_finetune

    result = run_finetune(args)
    lines = [f"fine-tuned model saved to {result.output_dir}"]
    for split, metrics in (("validation", result.validation_metrics), ("test", result.test_metrics)):
        if metrics:
            lines.append(f"{split:<11} accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}")
    _print("\n".join(lines))
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    if not str(args.output).endswith(".h5ad"):
        raise PanFoMaUsageError(f"--output {args.output}: the output is an .h5ad file; name it e.g. cells.panfoma.h5ad")
    from panfoma.data.soma import is_soma_experiment

    with tempfile.TemporaryDirectory(prefix="panfoma-input-") as workdir:
        if is_soma_experiment(args.input):  # a TileDB-SOMA experiment: --layer is its X layer (default 'raw')
            source = args.input
        else:
            source = prepare_input(args.input, "input", Path(workdir))
            check_layer(source, args.layer)
        check_model(args.model, "model")
        _import_library()
        import h5py
        from anndata.io import read_elem

        from panfoma.inference.embed import embed_file, embedding_metadata_key

        path = embed_file(args.model, source, args.output, batch_size=args.batch_size, all_genes=args.all_genes,
                          max_genes=args.max_genes, layer=args.layer, gene_names=args.gene_names, device=args.device,
                          precision=args.precision, drop_empty_cells=args.drop_empty_cells, key=args.key,
                          overwrite=args.overwrite)
    uns_key = embedding_metadata_key(args.key)
    with h5py.File(path, "r") as handle:  # report the precision really used (auto resolves per machine)
        metadata = read_elem(handle["uns"][uns_key])
    lines = [f"wrote obsm[{args.key!r}] ({metadata['precision']}) and uns[{uns_key!r}] to {path}"]
    if metadata.get("n_dropped_cells", 0):
        dropped = [str(name) for name in metadata["dropped_cells"]]
        lines.append(f"dropped {len(dropped)} cell(s) without expression in vocabulary genes (NaN rows in "
                     f"obsm[{args.key!r}], listed in uns[{uns_key!r}]['dropped_cells']): "
                     + ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""))
    _print("\n".join(lines))
    return 0


def _cmd_build_bench(args: argparse.Namespace) -> int:
    _import_library()
    from panfoma.data.builder import run_build_bench

    return run_build_bench(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if getattr(args, "model", None):
        check_model(args.model, "--model", presets_allowed=True)
    with tempfile.TemporaryDirectory(prefix="panfoma-input-") as workdir:
        args.data = [prepare_input(p, "data", Path(workdir)) for p in args.data]
        if getattr(args, "query", None):
            args.query = [prepare_input(p, "--query", Path(workdir)) for p in args.query]
        _import_library()
        from panfoma.evaluation.command import run_evaluate

        run_evaluate(args)
    _print(f"evaluation report written to {args.output_dir}")
    return 0


def _cmd_annotate(args: argparse.Namespace) -> int:
    if not str(args.output).endswith(".h5ad"):
        raise PanFoMaUsageError(f"--output {args.output}: the output is an .h5ad file; name it e.g. query.annotated.h5ad")
    if args.classifier is None and (args.reference is None or args.model is None):
        raise PanFoMaUsageError("give --reference REF.h5ad and --model MODEL (kNN label transfer), or --classifier "
                                "CHECKPOINT (a fine-tuned classifier)")
    with tempfile.TemporaryDirectory(prefix="panfoma-input-") as workdir:
        query = prepare_input(args.query, "query", Path(workdir))
        reference = prepare_input(args.reference, "--reference", Path(workdir)) if args.reference else None
        check_layer(query, args.layer)
        if reference:
            check_layer(reference, args.reference_layer, "--reference-layer")
        if args.classifier:
            check_model(args.classifier, "--classifier")
        else:
            check_model(args.model, "--model", presets_allowed=True)
        _import_library()
        from panfoma.inference.annotate import annotate_file

        output, result = annotate_file(
            query, args.output, reference_h5ad=reference, label_key=args.label_key, model=args.model,
            classifier=args.classifier, report_path=args.report, overwrite=args.overwrite,
            n_neighbors=args.n_neighbors, min_confidence=args.min_confidence, backend=args.backend,
            batch_size=args.batch_size, max_genes=args.max_genes, layer=args.layer,
            reference_layer=args.reference_layer, device=args.device, precision=args.precision)
    _print(result.report.summary())
    _print(f"wrote obs['panfoma_label'], obs['panfoma_label_confidence'] to {output}")
    return 0


def _cmd_perturb(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="panfoma-input-") as workdir:
        source = prepare_input(args.input, "input", Path(workdir))
        check_layer(source, args.layer)
        check_model(args.model, "model", presets_allowed=True)
        _import_library()
        from panfoma.inference.perturb import perturb_file

        split = lambda text: [part.strip() for part in text.split(",") if part.strip()] if text else None  # noqa: E731
        result = perturb_file(args.model, source, args.output, cell_shifts_path=args.cell_shifts,
                              overwrite=args.overwrite, device=args.device, genes=split(args.genes), mode=args.mode,
                              n_top_genes=args.n_top_genes, target=args.target, target_key=args.target_key,
                              source=split(args.source), batch_size=args.batch_size, max_genes=args.max_genes,
                              layer=args.layer)
    shown = result.genes.head(10).to_string(index=False, float_format=lambda v: f"{v:.4f}")
    _print(f"{result.mode}: {len(result.genes)} genes ranked"
           + (f" by the move toward the {result.target_description}" if result.target_description else
              " by the mean embedding shift") + f"\n{shown}\nwrote {args.output}")
    return 0


def _cmd_gene_embeddings(args: argparse.Namespace) -> int:
    if args.attention and not args.data:
        raise PanFoMaUsageError("--attention needs cells: add --data cells.h5ad")
    layer_choice = args.attention_layer
    if layer_choice != "mean":
        try:
            layer_choice = int(layer_choice)
        except ValueError:
            raise PanFoMaUsageError(f"--attention-layer {layer_choice}: give an encoder application number (0-based, "
                                    "negative from the end, e.g. -1) or 'mean'") from None
    with tempfile.TemporaryDirectory(prefix="panfoma-input-") as workdir:
        data = prepare_input(args.data, "--data", Path(workdir)) if args.data else None
        if data:
            check_layer(data, args.layer)
        check_model(args.model, "model", presets_allowed=True)
        _import_library()
        from panfoma.inference.gene_embeddings import gene_embeddings_file

        genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None
        paths = gene_embeddings_file(args.model, args.output, data=data, attention_output=args.attention, genes=genes,
                                     states=args.states, min_cells=args.min_cells,
                                     attention_genes=args.attention_genes, attention_layer=layer_choice,
                                     batch_size=args.batch_size, max_genes=args.max_genes, layer=args.layer,
                                     device=args.device, overwrite=args.overwrite)
    kind = f"context-aware ({args.states} states averaged per gene)" if args.data else "context-free input"
    _print(f"wrote {kind} gene embeddings to {paths['genes']}"
           + (f"; attention gene-gene matrix to {paths['attention']} (counts: {paths['attention_counts']})"
              if "attention" in paths else ""))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    _import_library()
    from panfoma.hub.push import run_push

    return run_push(args)


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="PanFoMa model folder (with its processor) or Hub id")
    parser.add_argument("input", help="input .h5ad (raw counts in X, or --layer); read backed. .csv/.tsv and .loom "
                        "files are read with anndata's readers; a TileDB-SOMA experiment folder or URI (CELLxGENE "
                        "Census layout: X layer 'raw' or --layer, Ensembl IDs in var 'feature_id' or --gene-names; "
                        "needs pip install 'panfoma[soma]') is read by cell range and the output holds obs + obsm")
    parser.add_argument("-o", "--output", required=True, help="output .h5ad (the input plus obsm[KEY]); may be the input")
    parser.add_argument("--batch-size", type=int, default=64, help="cells per forward pass")
    parser.add_argument("--all-genes", action="store_true", help="use every expressed gene of each cell")
    parser.add_argument("--max-genes", type=int, default=None,
                        help="cap on the genes per cell (default: every expressed gene)")
    parser.add_argument("--layer", default=None, help="read counts from adata.layers[LAYER] (default: X)")
    parser.add_argument("--gene-names", default=None, help="adata.var column holding gene names (default var_names)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        # The choices restate embed.PRECISIONS: importing that module imports torch, which --help must not.
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="auto (default): bf16 autocast where the device runs bf16 natively (CUDA GPUs with bf16; CPUs with "
             "AVX512-BF16, AMX-BF16 or Arm BF16), fp32 elsewhere (emulated bf16 is slower than fp32); speed and "
             "agreement with fp32 in benchmarks/bench_precision.py. fp32 is the exact float32 forward. The "
             "precision used is recorded in uns")
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="same as --precision bf16")
    parser.add_argument("--drop-empty-cells", action="store_true",
                        help="embed the other cells when some have no expression in any vocabulary gene (their rows "
                             "are NaN and they are listed); without it such a cell stops the run")
    parser.add_argument("--key", default="X_panfoma", help="obsm key (default X_panfoma)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")



@dataclass(frozen=True)
class Command:
    help: str
    module: str  # where the argument adder lives; imported only when the command is parsed
    adder: str
    handler: Callable[[argparse.Namespace], int]
    compute: bool = True  # gets --threads
    atomic_output: bool = True  # an interrupted run leaves nothing behind

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Define the command's own options on `parser` (the shared ones come from `panfoma.cli.options`)."""
        getattr(importlib.import_module(self.module), self.adder)(parser)


COMMANDS: dict[str, Command] = {
    "demo": Command("run the whole path end to end on a small real dataset (the first command to try)",
                    "panfoma.training.demo", "add_demo_arguments", _cmd_demo, atomic_output=False),
    "pretrain": Command("masked-value pretraining with Accelerate", "panfoma.training.pretrain",
                        "add_pretrain_arguments", _cmd_pretrain, atomic_output=False),
    "finetune": Command("fine-tune a cell-type / cancer-type classifier with transformers.Trainer",
                        "panfoma.training.finetune", "add_finetune_arguments", _cmd_finetune, atomic_output=False),
    "embed": Command("write cell embeddings (obsm['X_panfoma']) into an .h5ad", __name__, "add_embed_arguments",
                     _cmd_embed),
    "build-bench": Command("build a PanFoMaBench-style dataset from .h5ad studies", "panfoma.data.builder",
                           "add_build_bench_arguments", _cmd_build_bench),
    "evaluate": Command("evaluate embeddings on the paper's tasks against baselines", "panfoma.evaluation.command",
                        "add_evaluate_arguments", _cmd_evaluate),
    "annotate": Command("label a query .h5ad from an annotated reference (kNN on cell embeddings) or a fine-tuned "
                        "classifier", "panfoma.inference.annotate", "add_annotate_arguments", _cmd_annotate),
    "perturb": Command("in-silico perturbation: delete or overexpress genes, rank them by the embedding shift or the "
                       "move toward a target state", "panfoma.inference.perturb", "add_perturb_arguments",
                       _cmd_perturb),
    "gene-embeddings": Command("gene embedding tables (context-free, or context-aware over cells) and the attention "
                               "gene-gene matrix", "panfoma.inference.gene_embeddings",
                               "add_gene_embeddings_arguments", _cmd_gene_embeddings),
    "push": Command("push a model folder (model + processor + card) or a dataset folder to the Hub", "panfoma.hub.push",
                    "add_push_arguments", _cmd_push, compute=False),
}
