"""The one synthetic-data generator: a generated cohort of count cells, for tests, the demo and benchmarks.

Generative model (one `SyntheticCohort`, drawn once from the seed): genes have lognormal base weights; each
cell type up-weights its own programme of marker genes (`marker_fold`); patients belong to cancer types and
shift library size (a mild batch effect). A cell draws `reads` gene ids *with replacement* from its cell type's
gene distribution; its counts are the multiplicities (UMI-like: mostly 1-3, markers higher), so detected genes
per cell come out near `genes_per_cell` (the read depth that gives it is solved once). Sampling is O(reads)
per cell and needs no sort: sorted uniforms come from cumulative exponential gaps and index a quantised
inverse-CDF table, so the genes of a row arrive already ascending and duplicates are adjacent. Cells are made
in chunks (`iter_chunks`), so memory stays bounded whatever the number of cells.

Outputs, all from the same chunks: `synthetic_adata` (an in-memory AnnData; the demo's cohort),
`write_synthetic_study` (a CSR `.h5ad` streamed to disk: builder tests, scale benchmarks) and
`write_synthetic_dataset` (a PanFoMaBench-shaped Parquet folder without running the builder: training tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

CELL_TYPES: tuple[str, ...] = ("T cell", "B cell", "myeloid", "malignant")
CANCER_TYPES: tuple[str, ...] = ("lung adenocarcinoma", "colorectal cancer", "melanoma")
# Resolution of the quantised inverse CDF: a gene with weight p owns ~p * size slots.
_TABLE_MIN, _TABLE_MAX = 1 << 16, 1 << 22


@dataclass
class SyntheticChunk:
    """One chunk of generated cells: CSR counts (cells x genes, rows sorted) and per-cell label codes."""

    counts: "object"  # scipy.sparse.csr_matrix, float32
    cell_type: np.ndarray  # int, index into SyntheticCohort.cell_types
    patient: np.ndarray  # int, index into SyntheticCohort.patients
    start: int  # position of the chunk's first cell in the cohort


class SyntheticCohort:
    """The drawn parameters of a generated cohort and the chunked cell sampler (see module docstring).

    Args:
        n_genes: number of genes (matrix columns).
        genes_per_cell: target mean of detected genes per cell (at most ~60% of `n_genes`).
        n_patients: patients; patient p has cancer type `cancer_types[p % len(cancer_types)]`.
        cell_types / cancer_types: label names.
        markers_per_type: programme size of each cell type (default: 5% of the genes, at least 5).
        marker_fold: weight multiplier of a cell type's programme genes.
        seed: seeds everything; the same arguments give the same cells.

    Example:
        >>> cohort = SyntheticCohort(n_genes=500, genes_per_cell=100, seed=0)
        >>> chunk = next(cohort.iter_chunks(64))
        >>> chunk.counts.shape, bool(60 < chunk.counts.getnnz(axis=1).mean() < 140)
        ((64, 500), True)
    """

    def __init__(self, n_genes: int, *, genes_per_cell: int = 300, n_patients: int = 8,
                 cell_types: Sequence[str] = CELL_TYPES, cancer_types: Sequence[str] = CANCER_TYPES,
                 markers_per_type: int | None = None, marker_fold: float = 8.0, seed: int = 0):
        if n_genes < 2 or genes_per_cell < 1 or n_patients < 1 or not cell_types or not cancer_types:
            raise ValueError("need n_genes >= 2, genes_per_cell >= 1, n_patients >= 1 and non-empty label lists.")
        if genes_per_cell > 0.6 * n_genes:
            raise ValueError(f"genes_per_cell={genes_per_cell} is more than 60% of n_genes={n_genes}: sampling reads "
                             "with replacement cannot reach it; use more genes or fewer genes per cell.")
        self.n_genes, self.genes_per_cell, self.seed = int(n_genes), int(genes_per_cell), int(seed)
        self.cell_types, self.cancer_types = list(cell_types), list(cancer_types)
        self.patients = [f"P{p}" for p in range(n_patients)]
        self.patient_cancer = np.arange(n_patients) % len(self.cancer_types)
        rng = np.random.default_rng([self.seed, 0])
        base = rng.lognormal(0.0, 1.0, self.n_genes)
        markers = markers_per_type or max(5, self.n_genes // 20)
        weights = np.tile(base, (len(self.cell_types), 1))
        for k in range(len(self.cell_types)):
            weights[k, rng.choice(self.n_genes, min(markers, self.n_genes), replace=False)] *= marker_fold
        self.probabilities = weights / weights.sum(1, keepdims=True)  # (types, genes)
        self.patient_depth = rng.lognormal(0.0, 0.15, n_patients)
        size = int(min(_TABLE_MAX, max(_TABLE_MIN, 64 * self.n_genes)))
        # Inverse-CDF tables (types, size): slot j holds the gene whose CDF interval contains (j + 0.5) / size.
        self.tables = np.stack([np.searchsorted(np.cumsum(p), (np.arange(size) + 0.5) / size).clip(0, self.n_genes - 1)
                                for p in self.probabilities]).astype(np.int32)
        self.reads_per_cell = self._solve_reads()

    def _solve_reads(self) -> float:
        """Reads per cell whose expected number of distinct genes is `genes_per_cell` (bisection)."""
        def distinct(m: float) -> float:
            return float(np.mean((1.0 - np.exp(-m * self.probabilities)).sum(1)))

        low, high = float(self.genes_per_cell), float(self.genes_per_cell) * 64
        for _ in range(60):
            middle = 0.5 * (low + high)
            low, high = (middle, high) if distinct(middle) < self.genes_per_cell else (low, middle)
        return 0.5 * (low + high)

    def iter_chunks(self, n_cells: int, chunk_size: int = 10_000) -> Iterator[SyntheticChunk]:
        """Yield the cohort's first `n_cells` cells, `chunk_size` at a time (chunk i depends only on the seed and i)."""
        import scipy.sparse as sp

        if n_cells < 0 or chunk_size < 1:
            raise ValueError(f"need n_cells >= 0 and chunk_size >= 1, got {n_cells} and {chunk_size}.")
        size = self.tables.shape[1]
        for number, start in enumerate(range(0, n_cells, chunk_size)):
            rng = np.random.default_rng([self.seed, 1, number])
            n = min(chunk_size, n_cells - start)
            cell_type = rng.integers(0, len(self.cell_types), n)
            patient = rng.integers(0, len(self.patients), n)
            depth = self.reads_per_cell * self.patient_depth[patient] * rng.lognormal(0.0, 0.2, n)
            reads = np.maximum(1, rng.poisson(depth)).astype(np.int64)
            read_offsets = np.concatenate([[0], np.cumsum(reads)])  # (n + 1,)
            # Sorted uniforms per cell without sorting: cumulative sums of exponential gaps, each cell's sum
            # normalised by its total (reads + 1 gaps per cell).
            gaps = rng.exponential(1.0, int(read_offsets[-1] + n))
            cumulative = np.cumsum(gaps)
            gap_offsets = read_offsets + np.arange(n + 1)  # (n + 1,) start of each cell's gaps
            before = np.concatenate([[0.0], cumulative])[gap_offsets[:-1]]
            total = cumulative[gap_offsets[1:] - 1] - before
            row = np.repeat(np.arange(n), reads)
            position = np.delete(cumulative, gap_offsets[1:] - 1)  # drop each cell's last gap: (sum reads,)
            uniform = (position - before[row]) / total[row]
            genes = self.tables[cell_type[row], np.minimum((uniform * size).astype(np.int64), size - 1)]
            # Genes come out ascending within a row: a new entry starts where the gene or the row changes.
            new = np.ones(genes.size, dtype=bool)
            new[1:] = (genes[1:] != genes[:-1]) | (row[1:] != row[:-1])
            starts = np.flatnonzero(new)
            values = np.diff(np.append(starts, genes.size)).astype(np.float32)
            indptr = np.concatenate([[0], np.cumsum(np.bincount(row[starts], minlength=n))])
            counts = sp.csr_matrix((values, genes[starts].astype(np.int32), indptr), shape=(n, self.n_genes))
            yield SyntheticChunk(counts=counts, cell_type=cell_type, patient=patient, start=start)


def vocabulary_genes(n_genes: int, *, mito: int = 2) -> list[str]:
    """`n_genes` real gene symbols of the default vocabulary, evenly spaced, the first `mito` of them `MT-` genes.

    Example:
        >>> genes = vocabulary_genes(100)
        >>> len(genes), genes[0].startswith("MT-")
        (100, True)
    """
    from panfoma.tokenization import PanFoMaGeneVocab

    vocab = PanFoMaGeneVocab.from_default()
    mitochondrial = sorted(g for g in vocab.genes if g.startswith("MT-"))[:mito]
    others = [g for g in vocab.genes if not g.startswith("MT-")]
    step = max(1, len(others) // max(1, n_genes - len(mitochondrial)))
    return mitochondrial + others[::step][: n_genes - len(mitochondrial)]


def synthetic_adata(n_cells: int, genes: Sequence[str], *, seed: int = 0, chunk_size: int = 10_000, **cohort):
    """An in-memory AnnData of generated cells (CSR float32 counts; obs `cell_type`, `patient`, `cancer_type`).

    `**cohort` goes to `SyntheticCohort` (`genes_per_cell`, `n_patients`, `cell_types`, `cancer_types`, ...).

    Example:
        >>> adata = synthetic_adata(50, vocabulary_genes(300), genes_per_cell=60)
        >>> adata.shape, sorted(adata.obs)
        ((50, 300), ['cancer_type', 'cell_type', 'patient'])
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    generator = SyntheticCohort(len(genes), seed=seed, **cohort)
    chunks = list(generator.iter_chunks(n_cells, chunk_size))
    cell_type = np.concatenate([c.cell_type for c in chunks]) if chunks else np.zeros(0, dtype=int)
    patient = np.concatenate([c.patient for c in chunks]) if chunks else np.zeros(0, dtype=int)
    counts = sp.vstack([c.counts for c in chunks], format="csr") if chunks else sp.csr_matrix((0, len(genes)))
    obs = pd.DataFrame(_obs_columns(generator, cell_type, patient), index=[f"cell{i}" for i in range(n_cells)])
    adata = ad.AnnData(X=counts.astype(np.float32), obs=obs)
    adata.var_names = pd.Index([str(g) for g in genes])
    return adata


def _obs_columns(cohort: SyntheticCohort, cell_type: np.ndarray, patient: np.ndarray,
                 cancer_type: str | None = None) -> dict:
    import pandas as pd

    cancer = (np.full(patient.size, cancer_type, dtype=object) if cancer_type is not None
              else np.asarray(cohort.cancer_types, dtype=object)[cohort.patient_cancer[patient]])
    return {"cell_type": pd.Categorical(np.asarray(cohort.cell_types, dtype=object)[cell_type]),
            "patient": pd.Categorical(np.asarray(cohort.patients, dtype=object)[patient]),
            "cancer_type": pd.Categorical(cancer)}


def write_synthetic_study(path: str | Path, n_cells: int, *, genes: Sequence[str], n_patients: int = 8,
                          mean_genes_per_cell: int = 300, chunk_size: int = 10_000, seed: int = 0,
                          cancer_type: str | None = "synthetic cancer", **cohort) -> Path:
    """Write generated cells as a CSR `.h5ad`, streamed to disk chunk by chunk (memory bounded by `chunk_size`).

    `cancer_type` labels every cell (one study = one cancer type); None keeps the cohort's per-patient types.
    `uns["x_kind"]` says raw counts. `**cohort` goes to `SyntheticCohort`.

    Example:
        >>> write_synthetic_study("/tmp/syn.h5ad", 1000, genes=vocabulary_genes(2000))  # doctest: +SKIP
    """
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    path = Path(path)
    generator = SyntheticCohort(len(genes), genes_per_cell=mean_genes_per_cell, n_patients=n_patients, seed=seed,
                                **cohort)
    cell_types = np.zeros(n_cells, dtype=np.int64)
    patients = np.zeros(n_cells, dtype=np.int64)
    with h5py.File(path, "w") as handle:
        handle.attrs["encoding-type"] = "anndata"
        handle.attrs["encoding-version"] = "0.1.0"
        group = handle.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = (n_cells, len(genes))
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(65536,))
        indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(65536,))
        indptr = group.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        nnz = 0
        for chunk in generator.iter_chunks(n_cells, chunk_size):
            block = chunk.counts
            stop = chunk.start + block.shape[0]
            data.resize((nnz + block.nnz,))
            indices.resize((nnz + block.nnz,))
            data[nnz:] = block.data
            indices[nnz:] = block.indices
            indptr[chunk.start + 1:stop + 1] = nnz + block.indptr[1:]
            nnz += block.nnz
            cell_types[chunk.start:stop] = chunk.cell_type
            patients[chunk.start:stop] = chunk.patient
        obs = pd.DataFrame(_obs_columns(generator, cell_types, patients, cancer_type),
                           index=[f"cell{i}" for i in range(n_cells)])
        write_elem(handle, "obs", obs)
        write_elem(handle, "var", pd.DataFrame(index=pd.Index([str(g) for g in genes])))
        write_elem(handle, "uns", {"x_kind": "raw_counts", "gene_id_type": "symbol"})
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(handle, key, {})
    return path


def write_synthetic_dataset(folder: str | Path, splits: dict[str, int] | None = None, *, n_genes: int = 300,
                            first_token: int = 4, genes_per_cell: int = 45, n_patients: int = 6, seed: int = 0,
                            drop_columns: Sequence[str] = (), **cohort) -> Path:
    """A PanFoMaBench-shaped Parquet folder of generated cells, without running the builder (for training tests).

    Genes are the vocabulary token ids `first_token .. first_token + n_genes - 1` (the default vocabulary's first
    real genes); columns `idx` (unique over all splits), `cell_id`, `gene_ids`, `counts`, `n_counts`, `n_genes`,
    `patient`, and `ClassLabel`s `cell_type` and `cancer_type`. `drop_columns` leaves columns out (to test errors).

    Example:
        >>> import tempfile
        >>> folder = write_synthetic_dataset(tempfile.mkdtemp(), {"train": 20, "validation": 8})
        >>> sorted(p.name for p in (folder / "data").iterdir())
        ['train-00000-of-00001.parquet', 'validation-00000-of-00001.parquet']
    """
    import datasets

    folder = Path(folder)
    splits = {"train": 40, "validation": 12, "test": 12} if splits is None else dict(splits)
    generator = SyntheticCohort(n_genes, genes_per_cell=genes_per_cell, n_patients=n_patients, seed=seed, **cohort)
    features = datasets.Features({
        "idx": datasets.Value("int64"), "cell_id": datasets.Value("string"),
        "gene_ids": datasets.List(datasets.Value("int32")), "counts": datasets.List(datasets.Value("float32")),
        "n_counts": datasets.Value("float32"), "n_genes": datasets.Value("int32"),
        "patient": datasets.Value("string"),
        "cell_type": datasets.ClassLabel(names=generator.cell_types),
        "cancer_type": datasets.ClassLabel(names=generator.cancer_types),
    })
    kept = datasets.Features({k: v for k, v in features.items() if k not in drop_columns})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    chunk = next(generator.iter_chunks(sum(splits.values()), max(1, sum(splits.values()))), None)
    start = 0
    for split, n in splits.items():
        block = chunk.counts[start:start + n]
        rows = {
            "idx": list(range(start, start + n)),
            "cell_id": [f"synthetic:cell{i}" for i in range(start, start + n)],
            "gene_ids": [(first_token + block.indices[block.indptr[i]:block.indptr[i + 1]]).tolist() for i in range(n)],
            "counts": [block.data[block.indptr[i]:block.indptr[i + 1]].tolist() for i in range(n)],
            "n_counts": np.asarray(block.sum(1)).ravel().astype(np.float32).tolist(),
            "n_genes": np.diff(block.indptr).astype(np.int32).tolist(),
            "patient": [f"synthetic:{generator.patients[p]}" for p in chunk.patient[start:start + n]],
            "cell_type": chunk.cell_type[start:start + n].tolist(),
            "cancer_type": generator.patient_cancer[chunk.patient[start:start + n]].tolist(),
        }
        table = {k: v for k, v in rows.items() if k in kept}
        datasets.Dataset.from_dict(table, features=kept).to_parquet(
            str(folder / "data" / f"{split}-00000-of-00001.parquet"))
        start += n
    return folder


__all__ = [
    "CANCER_TYPES",
    "CELL_TYPES",
    "SyntheticChunk",
    "SyntheticCohort",
    "synthetic_adata",
    "vocabulary_genes",
    "write_synthetic_dataset",
    "write_synthetic_study",
]
