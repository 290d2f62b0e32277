"""Build the gene vocabulary that `panfoma.tokenization` ships (tokenization/data/gene_vocab.json.gz).

Sources (read, never copied into the repository; only derived facts end up in the output):
- HGNC "custom downloads" export of approved symbols with alias/previous symbols and Ensembl gene IDs
  (HGNC, https://www.genenames.org; export of about July 2023, one row per alias/previous pair).
- GENCODE / CELLxGENE gene table (Ensembl gene ID, symbol, version, length, biotype), used only to add
  Ensembl IDs that HGNC does not list but whose GENCODE symbol is an approved HGNC symbol.

Usage:
    python scripts/build_gene_vocab.py \
        --hgnc ../shared/data/genes/hgnc_symbols_2023-07.csv.gz \
        --gencode ../shared/data/genes/gencode_genes_homo_sapiens.csv.gz \
        --out tokenization/data/gene_vocab.json.gz

The output is deterministic (sorted keys, fixed gzip mtime), so rebuilding from the same tables gives a
byte-identical file and the same vocabulary hash.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import pandas as pd

logger = logging.getLogger("build_gene_vocab")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GENES_DIR = REPO_ROOT.parent / "shared" / "data" / "genes"
ENSEMBL_HUMAN_GENE = re.compile(r"^ENSG\d{11}$")
SPECIAL_TOKENS = ["<pad>", "<cls>", "<mask>", "<unk>"]  # must match tokenization/vocabulary.py


def build(hgnc_path: Path, gencode_path: Path | None) -> dict:
    """Read the HGNC (and optional GENCODE) table and return the vocabulary payload as a dict."""
    table = pd.read_csv(hgnc_path, dtype=str, keep_default_na=False, index_col=0)
    needed = {"HGNC ID", "Status", "Approved symbol", "Alias symbol", "Previous symbol", "Ensembl gene ID"}
    missing = needed - set(table.columns)
    if missing:
        raise ValueError(f"{hgnc_path} lacks the HGNC columns {sorted(missing)}; is it an HGNC export?")
    # Withdrawn entries have no current gene behind them; they cannot be tokens.
    approved = table[table["Status"] == "Approved"]
    genes = sorted(set(approved["Approved symbol"]))
    index = {symbol: i for i, symbol in enumerate(genes)}

    ensembl: dict[str, set[int]] = defaultdict(set)
    previous: dict[str, set[int]] = defaultdict(set)
    alias: dict[str, set[int]] = defaultdict(set)
    for row in approved[["Approved symbol", "Alias symbol", "Previous symbol", "Ensembl gene ID"]].itertuples(
        index=False
    ):
        gene = index[row[0]]
        if row[1]:
            alias[row[1].strip()].add(gene)
        if row[2]:
            previous[row[2].strip()].add(gene)
        if row[3]:
            if not ENSEMBL_HUMAN_GENE.match(row[3]):
                raise ValueError(f"unexpected Ensembl gene ID {row[3]!r} for {row[0]} in {hgnc_path}")
            ensembl[row[3]].add(gene)

    n_gencode_added = 0
    if gencode_path is not None:
        gencode = pd.read_csv(gencode_path, header=None, dtype=str, keep_default_na=False)
        # Columns: Ensembl gene ID, symbol, version, length, biotype (no header in the CELLxGENE table).
        for ensembl_id, symbol in zip(gencode[0], gencode[1]):
            if ensembl_id in ensembl or symbol not in index or not ENSEMBL_HUMAN_GENE.match(ensembl_id):
                continue  # HGNC's own Ensembl link always wins
            ensembl[ensembl_id].add(index[symbol])
            n_gencode_added += 1

    def as_lists(mapping: dict[str, set[int]]) -> dict[str, list[int]]:
        return {key: sorted(values) for key, values in sorted(mapping.items())}

    logger.info(
        "%d approved genes, %d Ensembl IDs (%d from GENCODE), %d previous symbols, %d aliases",
        len(genes), len(ensembl), n_gencode_added, len(previous), len(alias),
    )
    return {
        "format": "panfoma-gene-vocab",
        "format_version": 1,
        "source": {
            "hgnc": f"HGNC (https://www.genenames.org) export {hgnc_path.name}",
            "gencode": None if gencode_path is None else f"GENCODE/CELLxGENE gene table {gencode_path.name}",
            "built_by": "scripts/build_gene_vocab.py",
            "n_ensembl_from_gencode": n_gencode_added,
        },
        "special_tokens": SPECIAL_TOKENS,
        "genes": genes,
        "ensembl": as_lists(ensembl),
        "previous": as_lists(previous),
        "alias": as_lists(alias),
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hgnc", type=Path, default=DEFAULT_GENES_DIR / "hgnc_symbols_2023-07.csv.gz")
    parser.add_argument("--gencode", type=Path, default=DEFAULT_GENES_DIR / "gencode_genes_homo_sapiens.csv.gz")
    parser.add_argument("--no-gencode", action="store_true", help="use the HGNC table only")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tokenization" / "data" / "gene_vocab.json.gz")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    payload = build(args.hgnc, None if args.no_gencode else args.gencode)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip header, hence the file, byte-identical across rebuilds.
    with open(args.out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
        handle.write(text.encode("utf-8"))
    logger.info("wrote %s (%.0f KiB)", args.out, args.out.stat().st_size / 1024)


if __name__ == "__main__":
    main()
