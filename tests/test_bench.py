"""Tests of the PanFoMaBench builder (panfoma.data: studies, reader, qc, splits, writer, card, builder).

The main fixture builds a real mini PanFoMaBench from the five studies in ../shared/data/cancer
(hg19 symbols, GRCh38 symbols, Ensembl IDs, one non-integer Smart-seq2 study); expected values are
recomputed independently from the `.h5ad` files with anndata, not read back from the builder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata
import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from panfoma.tokenization.vocabulary import PanFoMaGeneVocab  # noqa: E402
from panfoma.data import (  # noqa: E402
    SPLITS,
    PanFoMaBenchQCConfig,
    PanFoMaBenchStudy,
    add_build_bench_arguments,
    build_bench,
    load_bench,
    read_study_table,
    run_build_bench,
    write_synthetic_study,
)
from panfoma.data.writer import SplitWriter  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cancer"
FILES = {
    "colon_10x": "colon_cancer_10x_infercnv.h5ad",
    "oligo_tirosh2016": "oligodendroglioma_tirosh2016.h5ad",
    "tnbc_copykat": "copykat_tnbc.h5ad",
    "atc_numbat": "numbat_atc2.h5ad",
    "lung_cellbench": "cellbench_lung_celllines.h5ad",
}
STUDY_TABLE = f"""\
studies:
  - {{name: colon_10x, path: {DATA / FILES['colon_10x']}, cancer_type: colorectal cancer, tissue: colon,
     license: none stated, source: broadinstitute/inferCNV_examples}}
  - {{name: oligo_tirosh2016, path: {DATA / FILES['oligo_tirosh2016']}, cancer_type: oligodendroglioma,
     tissue: brain, cell_type_column: cell_type, license: BSD-3-Clause}}
  - {{name: tnbc_copykat, path: {DATA / FILES['tnbc_copykat']}, cancer_type: breast cancer (TNBC),
     tissue: breast, license: GPL-2.0}}
  - {{name: atc_numbat, path: {DATA / FILES['atc_numbat']}, cancer_type: anaplastic thyroid carcinoma,
     tissue: thyroid, license: MIT}}
  - {{name: lung_cellbench, path: {DATA / FILES['lung_cellbench']}, cancer_type: lung adenocarcinoma,
     tissue: cell line, cell_type_column: cell_type, license: MIT}}
"""


def _need_data():
    missing = [f for f in FILES.values() if not (DATA / f).is_file()]
    if missing:
        pytest.skip(f"real data not available: {DATA} lacks {missing} (it sits beside the checkout in CI)")


def _file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def real_bench(tmp_path_factory):
    """(table path, output folder) of the real mini PanFoMaBench, built once for the module."""
    _need_data()
    root = tmp_path_factory.mktemp("realbench")
    table = root / "studies.yaml"
    table.write_text(STUDY_TABLE)
    out = build_bench(table, root / "panfomabench", seed=0)
    return table, out


@pytest.fixture(scope="module")
def real_tables(real_bench):
    """Every split of the real build, read straight from Parquet (pandas frames)."""
    _, out = real_bench
    return {split: pq.read_table(sorted((out / "data").glob(f"{split}-*.parquet"))).to_pandas()
            for split in SPLITS}


@pytest.fixture(scope="module")
def vocab():
    return PanFoMaGeneVocab.from_default()


# ------------------------------------------------------------------------------------------ real data
def test_real_bench_loads_with_load_dataset_normal_and_streaming(real_bench, real_tables, tmp_path, monkeypatch):
    _, out = real_bench
    cache = tmp_path / "hf_cache"  # a private cache: no cross-talk with other builds named the same
    monkeypatch.chdir(out.parent)
    ds = datasets.load_dataset("panfomabench", cache_dir=str(cache))  # bare name, folder in the CWD
    assert set(ds) == set(SPLITS)
    for split in SPLITS:
        assert ds[split].num_rows == len(real_tables[split]) > 0
    features = ds["train"].features
    for column in ("cancer_type", "tissue", "cell_type"):
        assert isinstance(features[column], datasets.ClassLabel)
    assert features["cancer_type"].names == sorted(
        ["colorectal cancer", "oligodendroglioma", "breast cancer (TNBC)", "anaplastic thyroid carcinoma",
         "lung adenocarcinoma"])
    assert "unknown" in features["cell_type"].names and "A549" in features["cell_type"].names
    assert features["gene_ids"] == datasets.List(datasets.Value("int32"))
    assert features["counts"] == datasets.List(datasets.Value("float32"))

    streamed = datasets.load_dataset(str(out), streaming=True)
    for split in SPLITS:
        rows = list(streamed[split])
        assert len(rows) == ds[split].num_rows
        assert [r["cell_id"] for r in rows] == ds[split]["cell_id"]
    assert isinstance(streamed["test"].features["cell_type"], datasets.ClassLabel)

    # `idx` is unique over all splits (the collator seeds from it), in input order within a split.
    every_idx = np.concatenate([frame["idx"].to_numpy() for frame in real_tables.values()])
    assert np.unique(every_idx).size == every_idx.size
    assert all(np.all(np.diff(frame["idx"].to_numpy()) > 0) for frame in real_tables.values())

    # The schema the collator relies on, row by row.
    for split, frame in real_tables.items():
        assert frame["cell_id"].is_unique
        for ids, counts, n_genes, n_counts in zip(frame["gene_ids"], frame["counts"], frame["n_genes"],
                                                  frame["n_counts"]):
            assert len(ids) == len(counts) == n_genes > 0
            assert np.all(np.diff(ids) > 0) and ids[0] >= 4  # sorted, unique, no special tokens
            assert np.all(counts > 0)
            assert n_counts == pytest.approx(float(np.sum(counts, dtype=np.float64)), rel=1e-5)


def test_load_bench_refuses_a_missing_folder_instead_of_a_stale_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PanFoMaBench folder"):
        load_bench(tmp_path / "panfomabench")


def test_no_patient_crosses_splits_and_stratification(real_bench, real_tables):
    _, out = real_bench
    patients = {split: set(frame["patient"]) for split, frame in real_tables.items()}
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]
    # Patients are namespaced by study; the real ids come from the h5ad obs.
    colon = anndata.read_h5ad(DATA / FILES["colon_10x"], backed="r")
    raw_patients = {f"colon_10x:{p}" for p in colon.obs["patient"].astype(str)}
    built = set().union(*patients.values())
    assert {p for p in built if p.startswith("colon_10x:")} <= raw_patients
    # Types with >= 3 patients are in every split; single-patient types only in train.
    names = datasets.load_dataset(str(out), split="test", cache_dir=str(out.parent / "c")).features["cancer_type"].names
    for split, frame in real_tables.items():
        present = {names[c] for c in frame["cancer_type"].unique()}
        assert {"colorectal cancer", "oligodendroglioma", "lung adenocarcinoma"} <= present
        if split != "train":
            assert not present & {"breast cancer (TNBC)", "anaplastic thyroid carcinoma"}
    studies = json.loads((out / "studies.json").read_text())
    assert studies["splits"]["test"]["patients"] == sorted(patients["test"])


def test_qc_counts_add_up_and_match_an_independent_computation(real_bench, real_tables):
    _, out = real_bench
    report = json.loads((out / "qc_report.json").read_text())
    built = {}
    for frame in real_tables.values():
        for study, n in frame["study"].value_counts().items():
            built[study] = built.get(study, 0) + n
    total_in = 0
    for study, entry in report["studies"].items():
        n_obs = anndata.read_h5ad(DATA / FILES[study], backed="r").n_obs
        assert entry["cells_in"] == n_obs
        assert entry["cells_in"] == entry["cells_out"] + sum(s["removed"] for s in entry["steps"])
        assert entry["cells_out"] == built[study]
        total_in += n_obs
    totals = report["totals"]
    assert totals["cells_in"] == total_in
    assert totals["cells_in"] == totals["cells_out"] + sum(totals["removed"].values())
    assert totals["cells_out"] == sum(len(f) for f in real_tables.values())

    # Mitochondrial step recomputed with anndata from the raw colon file: hg19 names its
    # mitochondrial genes MT-*, and no colon cell fails min_genes=200 (checked here too).
    colon = anndata.read_h5ad(DATA / FILES["colon_10x"])
    X = colon.X.tocsr()
    n_genes = np.diff(X.indptr)
    is_mito = colon.var_names.str.startswith("MT-")
    fraction = np.asarray(X[:, is_mito].sum(1)).ravel() / np.asarray(X.sum(1)).ravel()
    steps = {s["step"]: s for s in report["studies"]["colon_10x"]["steps"]}
    assert steps["min_genes"]["removed"] == int((n_genes < 200).sum()) == 0
    passed_1_2 = n_genes >= 200
    assert steps["doublet_n_genes"]["removed"] + steps["doublet_n_counts"]["removed"] == 0
    assert steps["max_mito_fraction"]["removed"] == int((passed_1_2 & (fraction > 0.2)).sum()) > 0
    # Smart-seq2 study: no MT- gene measured, so the mito step can remove nothing there.
    assert {s["step"]: s for s in report["studies"]["oligo_tirosh2016"]["steps"]}["max_mito_fraction"]["removed"] == 0
    card = (out / "README.md").read_text()
    assert "| **total** | 2691 |" in card
    assert "Personal and sensitive information" in card


def test_gene_standardisation_merges_studies(real_bench, real_tables, vocab):
    _, out = real_bench
    info = json.loads((out / "studies.json").read_text())
    assert info["vocab_hash"] == vocab.hash
    assert f"vocab_hash: {vocab.hash}" in (out / "README.md").read_text()
    measured = {s["name"]: set(s["measured_gene_ids"]) for s in info["studies"]}
    shared = set.intersection(*measured.values())
    assert len(shared) > 5000  # Ensembl-ID study and the three symbol builds share a large core
    for gene in ("ACTB", "GAPDH", "B2M"):
        assert vocab.token_to_id(gene) in shared
    lung, colon = measured["lung_cellbench"], measured["colon_10x"]
    assert len(lung & colon) > 0.8 * len(lung)
    # "missing, not zero": MT- genes were not measured by the Smart-seq2 study, and no cell of it
    # holds one, while they are measured (and present in cells) in the 10x studies.
    mito_ids = {i for i, t in enumerate(vocab.tokens) if t.startswith("MT-")}
    assert not mito_ids & measured["oligo_tirosh2016"] and mito_ids & measured["tnbc_copykat"]
    # Every stored gene of a study is one the study measured.
    for frame in real_tables.values():
        for study, ids in zip(frame["study"], frame["gene_ids"]):
            assert set(ids.tolist()) <= measured[study]

    # Values: ACTB of one lung cell (Ensembl column) and one colon cell (symbol column) equal the raw matrix.
    for study, gene_label, gene_token in (("lung_cellbench", "ENSG00000075624", "ACTB"),
                                          ("colon_10x", "GAPDH", "GAPDH")):
        adata = anndata.read_h5ad(DATA / FILES[study])
        col = list(adata.var_names).index(gene_label)
        frame = next(f for f in real_tables.values() if (f["study"] == study).any())
        row = frame[frame["study"] == study].iloc[0]
        barcode = row["cell_id"].split(":", 1)[1]
        raw = adata[barcode].X.toarray().ravel()
        ids = row["gene_ids"].tolist()
        assert row["counts"][ids.index(vocab.token_to_id(gene_token))] == raw[col] > 0


def test_non_integer_smartseq2_counts_are_kept_unrounded(real_bench, real_tables):
    _, out = real_bench
    report = json.loads((out / "qc_report.json").read_text())
    assert report["studies"]["oligo_tirosh2016"]["count_kind"] == "non_integer_counts"
    assert report["studies"]["colon_10x"]["count_kind"] == "integer_counts"
    values = np.concatenate([np.concatenate(f.loc[f["study"] == "oligo_tirosh2016", "counts"].tolist())
                             for f in real_tables.values() if (f["study"] == "oligo_tirosh2016").any()])
    assert np.any(values != np.round(values))


def test_rebuild_is_idempotent(real_bench):
    table, out = real_bench
    before = _file_digests(out)
    build_bench(table, out, seed=0, overwrite=True)
    assert _file_digests(out) == before
    assert not list(out.parent.glob(".panfomabench.*"))


# ------------------------------------------------------------------------------------------ small inputs
def _small_studies(tmp_path: Path, vocab, n_cells=(300, 200), transform=None) -> list[PanFoMaBenchStudy]:
    """Synthetic count studies over real vocabulary genes (with MT- genes), written to tmp_path."""
    rng = np.random.default_rng(1)
    genes = sorted(set(rng.choice(vocab.genes, 600, replace=False)) | {"ACTB", "GAPDH", "MT-CO1", "MT-ND1"})
    studies = []
    for i, n in enumerate(n_cells):
        path = write_synthetic_study(tmp_path / f"s{i}.h5ad", n, genes=genes, n_patients=6, mean_genes_per_cell=150,
                                     seed=i, chunk_size=128)
        if transform is not None:
            adata = anndata.read_h5ad(path)
            adata.X = transform(adata.X)
            adata.write_h5ad(path)
        studies.append(PanFoMaBenchStudy(name=f"syn{i}", path=str(path), cancer_type=f"type{i}", tissue="t",
                                         cell_type_column="cell_type"))
    return studies


SMALL_QC = PanFoMaBenchQCConfig(min_genes=20)


def test_interrupted_build_leaves_no_output(tmp_path, vocab, monkeypatch):
    studies = _small_studies(tmp_path, vocab)
    out = tmp_path / "panfomabench"
    calls = {"n": 0}
    original = SplitWriter.write

    def failing_write(self, table):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash mid-write")
        return original(self, table)

    monkeypatch.setattr(SplitWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_bench(studies, out, qc=SMALL_QC, row_group_size=50, chunk_size=64)
    assert calls["n"] == 3
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0.h5ad", "s1.h5ad"]

    # A crash while replacing an existing build keeps the old build intact.
    monkeypatch.setattr(SplitWriter, "write", original)
    build_bench(studies, out, qc=SMALL_QC)
    before = _file_digests(out)
    calls["n"] = 0
    monkeypatch.setattr(SplitWriter, "write", failing_write)
    with pytest.raises(RuntimeError):
        build_bench(studies, out, qc=SMALL_QC, overwrite=True, row_group_size=50, chunk_size=64)
    assert _file_digests(out) == before
    assert not list(tmp_path.glob(".panfomabench.*"))


def test_dense_matrix_layer_and_gene_column_give_the_same_cells(tmp_path, vocab):
    """Counts in a dense layer under log-normalised X, gene names in a var column: same rows as the plain file."""
    (plain,) = _small_studies(tmp_path, vocab, n_cells=(150,))
    reference = build_bench([plain], tmp_path / "ref", qc=SMALL_QC)
    adata = anndata.read_h5ad(plain.path)
    counts = adata.X.toarray()
    variant = anndata.AnnData(X=np.log1p(counts), obs=adata.obs.copy(),
                              var=adata.var.assign(symbol=np.asarray(adata.var_names)))
    variant.var_names = [f"feature{i}" for i in range(variant.n_vars)]
    variant.layers["counts"] = counts  # dense on disk
    variant.uns["x_kind"] = "log1p normalised"
    variant.write_h5ad(tmp_path / "variant.h5ad")
    study = PanFoMaBenchStudy(name=plain.name, path=str(tmp_path / "variant.h5ad"), cancer_type=plain.cancer_type,
                              tissue=plain.tissue, cell_type_column="cell_type", layer="counts", gene_column="symbol")
    out = build_bench([study], tmp_path / "variant", qc=SMALL_QC)
    for split in SPLITS:
        expected = pq.read_table(sorted((reference / "data").glob(f"{split}-*.parquet")))
        got = pq.read_table(sorted((out / "data").glob(f"{split}-*.parquet")))
        assert got.equals(expected), split
    # Reading X (log1p) instead of the counts layer is refused.
    study.layer = None
    with pytest.raises(ValueError, match="does not hold counts"):
        build_bench([study], tmp_path / "x", qc=SMALL_QC)


def test_existing_output_needs_overwrite(tmp_path, vocab):
    studies = _small_studies(tmp_path, vocab, n_cells=(120,))
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        build_bench(studies, tmp_path / "out", qc=SMALL_QC)


def test_log_normalised_input_is_refused_unless_allowed(tmp_path, vocab):
    def log_normalise(X):
        X = X.tocsr().astype(np.float32)
        totals = np.asarray(X.sum(1)).ravel()
        X = X.multiply(1e4 / totals[:, None]).tocsr()
        X.data = np.log1p(X.data)
        return X

    studies = _small_studies(tmp_path, vocab, transform=log_normalise)
    with pytest.raises(ValueError, match="allow_non_counts") as error:
        build_bench(studies, tmp_path / "out", qc=SMALL_QC)
    assert "syn0" in str(error.value) and "log-normalized" in str(error.value)
    assert not (tmp_path / "out").exists()

    for study in studies:
        study.allow_non_counts = True
    out = build_bench(studies, tmp_path / "out", qc=SMALL_QC)
    report = json.loads((out / "qc_report.json").read_text())
    steps = {s["step"]: s for s in report["studies"]["syn0"]["steps"]}
    assert report["studies"]["syn0"]["count_kind"] == "log_normalized"
    assert steps["max_mito_fraction"]["skipped"] == "non-count input"
    assert steps["doublet_n_counts"]["skipped"] == "non-count input"
    assert "skipped" not in steps["min_genes"]


def test_normalised_and_negative_input_refused(tmp_path, vocab):
    def cp10k(X):  # normalised, not logged: large non-integer values with constant totals
        X = X.tocsr().astype(np.float64)
        return X.multiply(1e4 / np.asarray(X.sum(1)))

    studies = _small_studies(tmp_path, vocab, n_cells=(150,), transform=lambda X: cp10k(X).tocsr().astype(np.float32))
    with pytest.raises(ValueError, match="normalized"):
        build_bench(studies, tmp_path / "out", qc=SMALL_QC)

    def centred(X):
        X = X.tocsr().astype(np.float32)
        X.data -= 3.0
        return X

    (tmp_path / "centred").mkdir()
    studies = _small_studies(tmp_path / "centred", vocab, n_cells=(150,), transform=centred)
    with pytest.raises(ValueError, match="negative values"):
        build_bench(studies, tmp_path / "out", qc=SMALL_QC)


def test_held_out_study_split_and_cli(tmp_path, vocab):
    studies = _small_studies(tmp_path, vocab, n_cells=(300, 200, 150))
    table = tmp_path / "studies.csv"
    rows = ["name,path,cancer_type,tissue,patient_column,cell_type_column,license"]
    rows += [f"{s.name},{Path(s.path).name},{s.cancer_type},{s.tissue},patient,cell_type,CC0" for s in studies]
    table.write_text("\n".join(rows) + "\n")
    parser = add_build_bench_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(table), "-o", str(tmp_path / "bench"), "--min-genes", "20", "--seed", "3",
                              "--held-out-study", "syn2"])
    assert run_build_bench(args) == 0
    ds = load_bench(tmp_path / "bench", cache_dir=str(tmp_path / "c"))
    assert set(ds) == {"train", "validation", "test", "held_out_study"}
    assert set(ds["held_out_study"]["study"]) == {"syn2"}
    assert not {"syn2"} & set().union(*(set(ds[s]["study"]) for s in SPLITS))
    report = json.loads((tmp_path / "bench" / "qc_report.json").read_text())
    assert ds["held_out_study"].num_rows == report["studies"]["syn2"]["cells_out"]
    assert report["params"]["seed"] == 3 and report["params"]["qc"]["min_genes"] == 20

    # `python -m panfoma.data.builder` is wired to the same parser.
    result = subprocess.run([sys.executable, "-m", "panfoma.data.builder", "--help"], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--held-out-study" in result.stdout and "--max-mito-fraction" in result.stdout


def test_seed_changes_patient_assignment_not_content(tmp_path, vocab):
    studies = _small_studies(tmp_path, vocab, n_cells=(400,))
    outs = [build_bench(studies, tmp_path / f"b{seed}", qc=SMALL_QC, seed=seed) for seed in (0, 1, 2)]
    assignments = []
    for out in outs:
        info = json.loads((out / "studies.json").read_text())
        assignments.append(tuple(tuple(info["splits"][s]["patients"]) for s in SPLITS))
        assert sum(info["splits"][s]["cells"] for s in SPLITS) == info["studies"][0]["cells_out"]
    assert len(set(assignments)) > 1


def test_study_table_parsing_and_errors(tmp_path):
    table = tmp_path / "t.yaml"
    table.write_text(textwrap.dedent("""\
        - {name: a, path: sub/a.h5ad, cancer_type: x, tissue: y, allow_non_counts: true, layer: counts}
        - {study: b, path: /abs/b.h5ad, cancer_type: x, tissue: y, cell_type_column: ct}
    """))
    a, b = read_study_table(table)
    assert a.path == str(tmp_path / "sub" / "a.h5ad") and a.allow_non_counts is True and a.layer == "counts"
    assert b.name == "b" and b.path == "/abs/b.h5ad" and b.cell_type_column == "ct" and b.patient_column == "patient"
    csv = tmp_path / "t.csv"
    csv.write_text("name,path,cancer_type,tissue,allow_non_counts\na,a.h5ad,x,y,maybe\n")
    with pytest.raises(ValueError, match="allow_non_counts must be true/false"):
        read_study_table(csv)
    csv.write_text("name,path,cancer_type,tissue,patient\na,a.h5ad,x,y,p\n")
    with pytest.raises(ValueError, match="unknown column"):
        read_study_table(csv)
    csv.write_text("name,path,tissue\na,a.h5ad,y\n")
    with pytest.raises(ValueError, match="cancer_type"):
        read_study_table(csv)
    with pytest.raises(ValueError, match="may only contain"):
        PanFoMaBenchStudy(name="a b", path="x", cancer_type="c", tissue="t").validate()
    with pytest.raises(ValueError, match="max_mito_fraction"):
        PanFoMaBenchQCConfig(max_mito_fraction=1.5).validate()


def test_bad_study_columns_and_layers_are_reported(tmp_path, vocab):
    (study,) = _small_studies(tmp_path, vocab, n_cells=(100,))
    study.patient_column = "donor"
    with pytest.raises(ValueError, match="patient column 'donor' not in obs"):
        build_bench([study], tmp_path / "o", qc=SMALL_QC)
    study.patient_column, study.layer = "patient", "counts"
    with pytest.raises(ValueError, match="layer 'counts' not found"):
        build_bench([study], tmp_path / "o", qc=SMALL_QC)
    with pytest.raises(ValueError, match="split_fractions"):
        build_bench([study], tmp_path / "o", split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="held_out_studies"):
        build_bench([study], tmp_path / "o", held_out_studies=["nope"])


# ------------------------------------------------------------------------------------------ slow tier
# The RSS sampler is the benchmarks' (benchmarks/_rss.py), so the test and the benchmarks measure alike.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _rss import PEAK_RSS_SAMPLER as _SAMPLER  # noqa: E402

_RSS_SCRIPT = _SAMPLER + """
import json, sys
from panfoma.data.builder import build_bench, PanFoMaBenchStudy, PanFoMaBenchQCConfig
from panfoma.tokenization.vocabulary import PanFoMaGeneVocab
PanFoMaGeneVocab.from_default()
sampler = _PeakRSS()
sampler.start()
study = PanFoMaBenchStudy(name="syn", path=sys.argv[1], cancer_type="c", tissue="t", cell_type_column="cell_type")
build_bench([study], sys.argv[2], qc=PanFoMaBenchQCConfig(min_genes=50))
print(json.dumps({"base_mib": sampler.base, "peak_mib": sampler.stop()}))
"""


@pytest.mark.slow
def test_200k_cells_bounded_peak_memory(tmp_path, vocab):
    rng = np.random.default_rng(0)
    genes = sorted(set(rng.choice(vocab.genes, 3000, replace=False)) | {"ACTB", "MT-CO1"})
    growth = {}
    for n in (50_000, 200_000):
        path = write_synthetic_study(tmp_path / f"syn{n}.h5ad", n, genes=genes, n_patients=20, mean_genes_per_cell=120)
        result = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(tmp_path / f"out{n}")],
                                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                timeout=1800)
        assert result.returncode == 0, result.stderr[-2000:]
        rss = json.loads(result.stdout.strip().splitlines()[-1])
        growth[n] = rss["peak_mib"] - rss["base_mib"]
        report = json.loads((tmp_path / f"out{n}" / "qc_report.json").read_text())
        assert report["totals"]["cells_in"] == n
        path.unlink()
    # 4x the cells must not mean ~4x the memory: only small per-cell arrays (~30 B/cell) grow.
    assert growth[200_000] < 400, growth
    assert growth[200_000] - growth[50_000] < 60, growth
