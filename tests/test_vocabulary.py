"""Tests of the gene vocabulary and gene-name standardisation (panfoma.tokenization.vocabulary)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from panfoma.tokenization import SPECIAL_TOKENS, PanFoMaGeneVocab, check_match_fraction

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HGNC_TABLE = SHARED_DATA / "genes" / "hgnc_symbols_2023-07.csv.gz"
GENCODE_TABLE = SHARED_DATA / "genes" / "gencode_genes_homo_sapiens.csv.gz"
H5AD_FILES = sorted(SHARED_DATA.glob("**/*.h5ad")) if SHARED_DATA.is_dir() else []


@pytest.fixture(scope="module")
def vocab() -> PanFoMaGeneVocab:
    return PanFoMaGeneVocab.from_default()


def test_special_tokens_have_fixed_ids(vocab):
    assert SPECIAL_TOKENS == ("<pad>", "<cls>", "<mask>", "<unk>")
    assert [vocab.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert vocab.id_to_token(4) == vocab.genes[0]
    assert vocab.genes == sorted(vocab.genes)
    assert len(vocab) == len(vocab.genes) + 4


def test_hash_is_sha256_of_ordered_tokens(vocab):
    expected = hashlib.sha256("\n".join(["<pad>", "<cls>", "<mask>", "<unk>"] + vocab.genes).encode()).hexdigest()
    assert vocab.hash == expected[:16]
    swapped = list(vocab.genes)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(ValueError, match="sorted"):
        PanFoMaGeneVocab(swapped)
    assert PanFoMaGeneVocab(vocab.genes[1:]).hash != vocab.hash


def test_token_lookup_errors(vocab):
    with pytest.raises(KeyError, match="standardize"):
        vocab.token_to_id("cd3e")  # exact lookup only; standardisation handles case
    with pytest.raises(IndexError):
        vocab.id_to_token(len(vocab))
    assert "CD3E" in vocab and "cd3e" not in vocab and 5 not in vocab


@pytest.mark.parametrize(
    "name, expected, source",
    [
        ("CD3E", "CD3E", "direct"),
        ("cd3e", "CD3E", "direct"),
        ("  CD3E ", "CD3E", "direct"),
        ("C1ORF112", "C1orf112", "direct"),  # HGNC's spelling is returned, whatever the input case
        ("ENSG00000198851", "CD3E", "ensembl"),
        ("ENSG00000198851.9", "CD3E", "ensembl"),  # version suffix stripped
        ("NCRNA00181", "A1BG-AS1", "previous"),
        ("SEPT9", "SEPTIN9", "previous"),  # hg19-era name
        ("MARCH1", "MARCHF1", "previous"),
        ("FWP007", "A2M", "alias"),
        ("ACAT2", "ACAT2", "direct"),  # approved symbol wins over SOAT2's alias ACAT2
        ("ABC1", "ABCA1", "previous"),  # previous symbol of ABCA1 wins over HEATR6's alias ABC1
        ("2F1", None, "ambiguous"),  # alias of both KLRG1 and SLC25A5
        ("RP11-34P13.3", None, "unmapped"),
        ("xENSG00000198851", None, "unmapped"),  # anchored pattern
        ("ENSG00000198851.9.1", None, "unmapped"),
        ("ENSG000001988510", None, "unmapped"),
        ("nan", None, "invalid"),
        ("NA", None, "invalid"),
        ("", None, "invalid"),
        (None, None, "invalid"),
        (float("nan"), None, "invalid"),
        (17, None, "invalid"),
        ("42", None, "invalid"),
        (3.0, None, "invalid"),
    ],
)
def test_standardize_rules(vocab, name, expected, source):
    mapping = vocab.standardize([name])
    assert mapping.symbols == [expected]
    assert mapping.sources == [source]
    assert mapping.ids[0] == (vocab.token_to_id(expected) if expected else -1)
    assert mapping.ids.dtype == np.int64


def test_report_counts_and_duplicates(vocab):
    names = ["CD3E", "ENSG00000198851", "cd3e", "SEPT9", "2F1", "nan", "RP11-34P13.3", "MALAT1"]
    report = vocab.standardize(pd.Index(names)).report
    assert report.n_input == 8
    assert report.n_matched == 5
    assert (report.n_direct, report.n_via_ensembl, report.n_via_alias_or_previous) == (3, 1, 1)
    assert (report.n_ambiguous, report.n_invalid, report.n_unmapped) == (1, 1, 1)
    assert report.n_duplicates_after_mapping == 2  # three names for CD3E
    assert report.match_fraction == pytest.approx(5 / 8)
    text = str(report)
    assert "62.5%" in text and "ambiguous" in text and "RP11-34P13.3" in text


def test_detected_id_type(vocab):
    ens = ["ENSG00000198851", "ENSG00000075624.17", "ENSG00000251562"]
    sym = ["CD3E", "ACTB", "MALAT1"]
    assert vocab.standardize(ens * 10).report.detected_id_type == "ensembl"
    assert vocab.standardize(sym * 10).report.detected_id_type == "symbol"
    assert vocab.standardize(ens * 5 + sym * 5).report.detected_id_type == "mixed"
    assert vocab.standardize([str(i) for i in range(30)]).report.detected_id_type == "unknown"
    assert vocab.standardize([]).report.detected_id_type == "unknown"


def test_low_match_fraction_raises_with_helpful_message(vocab):
    integers = vocab.standardize(list(range(100)))
    with pytest.raises(ValueError, match=r"(?s)Detected ID type: 'unknown'.*integers.*var_names"):
        integers.report.check()
    mouse_ens = vocab.standardize([f"ENSMUSG{i:011d}" for i in range(50)])
    assert mouse_ens.report.detected_id_type == "ensembl"
    with pytest.raises(ValueError, match="non-human Ensembl"):
        check_match_fraction(mouse_ens.report)
    half = vocab.standardize(["CD3E", "ACTB", "junk1", "junk2"]).report
    assert half.check(0.5) is half  # 50% passes the default threshold exactly
    with pytest.raises(ValueError, match=r"2 of 4 gene names \(50.0%\).*below the required 60%"):
        half.check(0.6)
    with pytest.raises(ValueError, match="min_match_fraction"):
        half.check(1.5)
    with pytest.raises(ValueError, match="no gene names"):
        vocab.standardize([]).report.check()


def test_title_case_names_warn_about_mouse_data(vocab, caplog):
    with caplog.at_level(logging.WARNING, logger="panfoma.tokenization.vocabulary"):
        vocab.standardize(["Actb", "Cd3e", "Malat1", "Gapdh"] * 10)
    assert "mouse" in caplog.text


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_save_load_round_trip(vocab, tmp_path, suffix):
    path = vocab.save(tmp_path / f"vocab{suffix}")
    loaded = PanFoMaGeneVocab.from_file(path)
    assert loaded.tokens == vocab.tokens and loaded.hash == vocab.hash
    names = ["cd3e", "ENSG00000198851.3", "SEPT9", "FWP007", "2F1", "x"]
    assert loaded.standardize(names).symbols == vocab.standardize(names).symbols
    # A tampered file (a gene renamed) is refused because the stored hash no longer matches.
    payload = json.loads(gzip.decompress(path.read_bytes()) if suffix.endswith(".gz") else path.read_text())
    payload["genes"][5] = payload["genes"][5] + "_X"
    payload["genes"].sort()
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="corrupted"):
        PanFoMaGeneVocab.from_file(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="not a PanFoMa gene vocabulary"):
        PanFoMaGeneVocab.from_file(tmp_path / "other.json")


@pytest.mark.skipif(not HGNC_TABLE.is_file(), reason=f"HGNC table not found at {HGNC_TABLE} (../shared/data absent)")
def test_shipped_vocabulary_is_what_the_script_builds(vocab):
    table = pd.read_csv(HGNC_TABLE, dtype=str, keep_default_na=False, index_col=0)
    approved = sorted(set(table.loc[table["Status"] == "Approved", "Approved symbol"]))
    assert vocab.genes == approved
    spec = importlib.util.spec_from_file_location("build_gene_vocab", REPO / "scripts" / "build_gene_vocab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rebuilt = PanFoMaGeneVocab._from_payload(module.build(HGNC_TABLE, GENCODE_TABLE), "rebuilt")
    assert rebuilt.hash == vocab.hash
    names = list(table["Alias symbol"].iloc[::997]) + list(table["Ensembl gene ID"].iloc[::991])
    assert rebuilt.standardize(names).symbols == vocab.standardize(names).symbols


@pytest.mark.skipif(not H5AD_FILES, reason=f"no .h5ad files under {SHARED_DATA} (../shared/data absent)")
@pytest.mark.parametrize("path", H5AD_FILES, ids=lambda p: p.name)
def test_real_gene_names_resolve(vocab, path):
    import anndata

    adata = anndata.read_h5ad(path, backed="r")
    try:
        names, id_type = list(adata.var_names), adata.uns.get("gene_id_type")
    finally:
        adata.file.close()
    report = vocab.standardize(names).report
    assert report.detected_id_type == id_type
    assert report.n_matched + report.n_ambiguous + report.n_invalid + report.n_unmapped == len(names)
    # hg19 Cell Ranger 2 files carry ~15k clone-based lncRNA names (RP11-...) with no HGNC symbol, so
    # about 60% is what a correct mapping gives there; curated or Ensembl-ID tables map > 80%.
    assert report.match_fraction > 0.6, str(report)
    if id_type == "ensembl" or len(names) < 20000:
        assert report.match_fraction > 0.8, str(report)
    report.check()


# ---------------------------------------------------------------------------------------------- species, genomes
MOUSE_SYMBOLS = ["Cd3e", "Actb", "Gapdh", "Malat1", "Ptprc", "Cd19", "Lyz2", "Nkg7", "Gm12345", "Ms4a1"]


def test_mouse_symbols_are_refused_never_mapped(vocab):
    mapping = vocab.standardize(MOUSE_SYMBOLS)
    assert mapping.report.detected_species == "mouse"
    assert mapping.report.n_matched == 0 and mapping.report.n_other_species == len(MOUSE_SYMBOLS)
    assert set(mapping.sources) == {"other_species"} and not mapping.mapped.any()
    with pytest.raises(ValueError, match=r"(?s)look like mouse genes.*'Cd3e'.*human orthologs.*upper-case"):
        mapping.report.check(0.0)  # even with no match threshold: a species mismatch is never accepted
    # The same genes upper-cased are human symbols and map.
    assert vocab.standardize([n.upper() for n in MOUSE_SYMBOLS]).report.detected_species == "human"


def test_human_orf_symbols_are_not_mistaken_for_mouse(vocab):
    names = ["C1orf112", "C2orf69", "CXorf38", "C1orf50", "CD3E", "ACTB"]
    report = vocab.standardize(names).report
    assert report.detected_species == "human" and report.n_other_species == 0
    report.check()


@pytest.mark.parametrize("prefix", ["GRCh38_", "hg19_", "GRCh38-", "GRCh37_", "hg38__"])
def test_cell_ranger_genome_prefixes_are_stripped(vocab, prefix):
    names = ["CD3E", "ACTB", "GAPDH", "ENSG00000075624", "MALAT1"]
    mapping = vocab.standardize([prefix + n for n in names])
    assert mapping.symbols == vocab.standardize(names).symbols
    assert sum(mapping.report.genome_prefixes.values()) == len(names) and mapping.report.n_other_species == 0
    mapping.report.check()


def test_barnyard_names_map_the_human_genes_and_report_the_mouse_ones(vocab):
    human = ["CD3E", "ACTB", "GAPDH", "MALAT1", "CD19", "NOT-A-GENE"]
    names = [f"GRCh38_{n}" for n in human] + [f"mm10___{n}" for n in MOUSE_SYMBOLS]
    mapping = vocab.standardize(names)
    report = mapping.report
    assert mapping.symbols[:5] == ["CD3E", "ACTB", "GAPDH", "MALAT1", "CD19"]
    assert mapping.symbols[5:] == [None] * (1 + len(MOUSE_SYMBOLS))
    assert report.genome_prefixes == {"GRCh38": len(human), "mm10": len(MOUSE_SYMBOLS)}
    assert report.n_other_species == len(MOUSE_SYMBOLS) and report.detected_species == "mixed"
    # Judged on its human names: 5 of 6 matched, although the mouse half makes 5 of 16 names overall.
    assert report.match_fraction == pytest.approx(5 / 6)
    report.check()
    assert "mm10 10 (another species: dropped)" in str(report)
    assert report.n_matched + report.n_ambiguous + report.n_invalid + report.n_unmapped + report.n_other_species \
        == len(names)


def test_mouse_only_genome_prefix_is_refused_with_the_reason(vocab):
    with pytest.raises(ValueError, match="non-human genome"):
        vocab.standardize([f"mm10___{n}" for n in MOUSE_SYMBOLS]).report.check()


def test_a_lone_prefix_look_alike_is_left_alone(vocab):
    # Stripping applies only when most names carry a genome prefix.
    mapping = vocab.standardize(["CD3E", "ACTB", "GAPDH", "hg19_CD19"])
    assert mapping.symbols[:3] == ["CD3E", "ACTB", "GAPDH"] and mapping.symbols[3] is None
    assert mapping.report.genome_prefixes == {}
