"""Tests of the evaluation tasks (panfoma.evaluation: tasks, baselines, metrics, reports).

Metric tests use small constructed embeddings whose scores can be worked out by hand; end-to-end
tests run every task on subsets of ../shared/data (skipped when absent) with the model-free
random-projection control standing in for a trained PanFoMa (the metrics and baselines are real).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("scib", reason='evaluation extra not installed: pip install "panfoma[eval]"')
pytest.importorskip("scanpy", reason='evaluation extra not installed: pip install "panfoma[eval]"')

import anndata as ad  # noqa: E402

import panfoma.evaluation as ev  # noqa: E402
from panfoma.evaluation.baselines import LinearProbe, log_normalize  # noqa: E402
from panfoma.evaluation.gene_sets import default_gene_families  # noqa: E402
from panfoma.evaluation.metrics import (  # noqa: E402
    _pair_auroc,
    classification_metrics,
    family_auroc,
    integration_metrics,
    majority_vote,
)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FAST = {"resolutions": (0.5, 1.0)}


def need_data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the ../shared/data folder is absent in a fresh clone)")
    return path


# ---------------------------------------------------------------------------------------------
# classification metrics, hand-computed
# ---------------------------------------------------------------------------------------------
def test_classification_metrics_match_hand_computation():
    # F1 per class: a: P=1/2, R=1/2 -> 0.5; b: P=2/3, R=1 -> 0.8; c: never predicted -> 0.
    m = classification_metrics(["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_majority_vote_per_patient_and_tie_rule():
    groups, truth, vote = majority_vote(
        ["x", "x", "x", "y", "y"], ["x", "y", "x", "x", "y"], ["p1", "p1", "p1", "p2", "p2"]
    )
    assert list(groups) == ["p1", "p2"]
    assert list(truth) == ["x", "y"]
    assert list(vote) == ["x", "x"]  # p2 is a 1-1 tie: alphabetical first wins, documented rule
    with pytest.raises(ValueError, match="several true labels"):
        majority_vote(["x", "y"], ["x", "y"], ["p1", "p1"])


def test_linear_probe_multiclass_and_validation_selection():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4, size=(4, 6))
    y = np.repeat(np.array(list("abcd")), 40)
    x = centres[np.searchsorted(list("abcd"), y)] + rng.normal(size=(160, 6))
    order = rng.permutation(160)
    x, y = x[order], y[order]
    probe = LinearProbe(c_grid=(0.001, 1.0)).fit(x[:100], y[:100], x[100:130], y[100:130])
    assert set(probe.val_scores_) == {0.001, 1.0}
    assert probe.c_ == max(probe.val_scores_, key=lambda c: (probe.val_scores_[c], -[0.001, 1.0].index(c)))
    assert (probe.predict(x[130:]) == y[130:]).mean() > 0.9  # four classes: liblinear would refuse
    with pytest.raises(ValueError, match="single class"):
        LinearProbe().fit(x[:5], ["a"] * 5)


def test_log_normalize_values_and_log_input_passthrough():
    counts = np.array([[1.0, 3.0, 0.0], [2.0, 2.0, 4.0]])
    out = log_normalize(ad.AnnData(counts), target_sum=10)
    expected = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 10)
    np.testing.assert_allclose(np.asarray(out.X), expected)
    again = log_normalize(out)  # already log-normalised: used as is
    np.testing.assert_allclose(np.asarray(again.X), expected)


# ---------------------------------------------------------------------------------------------
# scIB metrics on constructed embeddings
# ---------------------------------------------------------------------------------------------
def _blobs(n_types=3, n_batches=2, per=30, batch_offset=0.0, seed=0):
    """Cell types far apart; batches either overlapping (offset 0) or shifted far apart."""
    rng = np.random.default_rng(seed)
    emb, labels, batches = [], [], []
    for t in range(n_types):
        for b in range(n_batches):
            centre = np.zeros(5)
            centre[0] = 50.0 * t
            centre[1] = batch_offset * b
            emb.append(centre + rng.normal(size=(per, 5)))
            labels += [f"type{t}"] * per
            batches += [f"batch{b}"] * per
    return np.concatenate(emb), np.array(labels), np.array(batches)


def test_perfectly_mixed_batches_score_avg_batch_near_one():
    emb, labels, batches = _blobs(batch_offset=0.0)
    m = integration_metrics(emb, labels, batches, **FAST)
    assert m["graph_connectivity"] == pytest.approx(1.0)
    assert m["ASW_batch"] > 0.9
    assert m["Avg_batch"] > 0.95
    assert m["NMI"] == pytest.approx(1.0) and m["ARI"] == pytest.approx(1.0)
    assert m["Avg_bio"] == pytest.approx(np.mean([m["NMI"], m["ARI"], m["ASW_label"]]))


def test_perfectly_separated_batches_score_avg_batch_near_zero():
    # 4 batches per type, each a blob 40 units from the others: the type's kNN subgraph falls into 4
    # equal components, so graph connectivity = 1/4 exactly, and silhouettes by batch are ~1.
    emb, labels, batches = _blobs(n_batches=4, per=20, batch_offset=40.0)
    m = integration_metrics(emb, labels, batches, **FAST)
    assert m["graph_connectivity"] == pytest.approx(0.25)
    assert m["ASW_batch"] < 0.1
    assert m["Avg_batch"] == pytest.approx((m["ASW_batch"] + 0.25) / 2)
    assert m["Avg_batch"] < 0.2


def test_label_permuted_embedding_scores_avg_bio_low():
    emb, labels, batches = _blobs(batch_offset=0.0, seed=1)
    true_bio = integration_metrics(emb, labels, batches, **FAST)["Avg_bio"]
    permuted = np.random.default_rng(3).permutation(labels)
    m = integration_metrics(emb, permuted, batches, **FAST)
    assert true_bio > 0.9
    assert m["NMI"] < 0.15 and m["ARI"] < 0.1
    assert abs(m["ASW_label"] - 0.5) < 0.05  # silhouette ~0, scaled to (s + 1) / 2
    assert m["Avg_bio"] < 0.3


def test_asw_label_matches_hand_computed_silhouette():
    # 1-D points a: 0, 1, 2 and b: 10, 11, 12. For a point, a(i) = mean distance within its label,
    # b(i) = mean distance to the other label; s = (b - a) / max(a, b); ASW_label = (mean s + 1) / 2.
    x = np.array([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    labels = np.array(list("aaabbb"))
    s = []
    for i in range(6):
        same = [abs(x[i] - x[j]) for j in range(6) if labels[j] == labels[i] and j != i]
        other = [abs(x[i] - x[j]) for j in range(6) if labels[j] != labels[i]]
        a, b = np.mean(same), np.mean(other)
        s.append((b - a) / max(a, b))
    emb = np.stack([x, np.zeros(6)], axis=1)
    m = integration_metrics(emb, labels, None, n_neighbors=2, resolutions=(0.5,))
    assert m["ASW_label"] == pytest.approx((np.mean(s) + 1) / 2, rel=1e-5)
    assert np.isnan(m["ASW_batch"]) and np.isnan(m["Avg_batch"])  # no batches: no batch metrics


def test_integration_metrics_reject_bad_embeddings():
    with pytest.raises(ValueError, match="n_cells"):
        integration_metrics(np.zeros((5, 2)), ["a"] * 4)
    with pytest.raises(ValueError, match="NaN"):
        integration_metrics(np.full((4, 2), np.nan), ["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="cluster_method"):
        integration_metrics(np.zeros((4, 2)), ["a", "a", "b", "b"], cluster_method="kmeans")


# ---------------------------------------------------------------------------------------------
# gene programs
# ---------------------------------------------------------------------------------------------
def test_pair_auroc_hand_computed():
    sim = np.zeros((4, 4))
    for (i, j), v in {(0, 1): 0.5, (0, 2): 0.9, (0, 3): 0.1, (1, 2): 0.2, (1, 3): 0.3, (2, 3): 0.7}.items():
        sim[i, j] = sim[j, i] = v
    # family {0, 1}: the positive 0.5 beats 0.1, 0.2, 0.3 and loses to 0.9 -> AUROC 3/4
    assert _pair_auroc(sim, np.array([True, True, False, False])) == pytest.approx(0.75)


def test_family_auroc_detects_structure_and_permutation_is_null():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, 16))
    emb[:8] += 6 * rng.normal(size=16)  # genes 0-7 share a direction
    names = [f"G{i}" for i in range(200)]
    sim = ev.cosine_similarity_matrix(emb)
    programs = ev.leiden_gene_programs(sim, n_neighbors=10)
    res = family_auroc(sim, programs, names, {"fam": names[:8], "random": names[100:108], "tiny": ["G1", "nope"]},
                       n_permutations=30)
    assert res["fam"]["similarity_auroc"] > 0.99
    assert res["fam"]["program_auroc"] > 0.9
    assert res["fam"]["permutation_p"] == pytest.approx(1 / 31)
    assert abs(res["fam"]["permutation_auroc_mean"] - 0.5) < 0.1
    assert abs(res["random"]["similarity_auroc"] - 0.5) < 0.15
    assert "skipped" in res["tiny"]


def test_default_gene_families_ribosomal_pattern():
    fams = default_gene_families(["RPL3", "RPS4X", "RPLP0", "RPSA", "RPS6KA1", "RP11-34P13.3", "RPL7L1", "HLA-DRA",
                                  "HLA-A", "B2M", "MKI67", "PCNA"])
    assert fams["ribosomal"] == ["RPL3", "RPS4X", "RPLP0", "RPSA"]
    assert fams["MHC_class_II"] == ["HLA-DRA"]
    assert fams["MHC_class_I"] == ["HLA-A", "B2M"]
    assert fams["cell_cycle_G2M"] == ["MKI67"] and fams["cell_cycle_S"] == ["PCNA"]


def test_gene_programs_rejects_mismatched_embeddings():
    expr = ad.AnnData(np.ones((5, 3)), var=pd.DataFrame(index=["A", "B", "C"]))
    with pytest.raises(ValueError, match="n_genes=3"):
        ev.evaluate_gene_programs(np.zeros((2, 4)), ["A", "B", "C"], expr)
    with pytest.raises(ValueError, match="duplicates"):
        ev.evaluate_gene_programs(np.zeros((3, 4)), ["A", "A", "C"], expr)


# ---------------------------------------------------------------------------------------------
# bad input names the missing column
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def toy_adata():
    rng = np.random.default_rng(0)
    adata = ad.AnnData(rng.poisson(2, size=(40, 30)).astype(np.float32))
    adata.obs["cell_type"] = np.repeat(["a", "b"], 20)
    adata.obs["batch"] = np.tile(["x", "y"], 20)
    return adata


def test_missing_obs_columns_raise_named_errors(toy_adata):
    with pytest.raises(ValueError, match=r"\['patient'\]"):
        ev.evaluate_pancancer(toy_adata, label_key="cell_type", study_key=None)
    with pytest.raises(ValueError, match=r"\['celltype'\]"):
        ev.evaluate_annotation(toy_adata, label_key="celltype")
    with pytest.raises(ValueError, match=r"\['donor'\]"):
        ev.evaluate_integration(toy_adata, batch_key="donor")
    with pytest.raises(ValueError, match="protein_expression"):
        ev.evaluate_multiomic(toy_adata)
    with pytest.raises(ValueError, match="X_missing"):
        ev.evaluate_annotation(toy_adata, embedding_key="X_missing")


def test_unlabelled_cells_and_bad_embedding_shape_are_refused(toy_adata):
    toy_adata.obs["cell_type"] = ["NA"] + ["a"] * 19 + ["b"] * 20
    with pytest.raises(ValueError, match="missing values"):
        ev.evaluate_annotation(toy_adata)
    toy_adata.obs["cell_type"] = np.repeat(["a", "b"], 20)
    with pytest.raises(ValueError, match="shape"):
        ev.evaluate_annotation(toy_adata, lambda a: np.zeros((3, 2)))


# ---------------------------------------------------------------------------------------------
# end to end on real data (small subsets)
# ---------------------------------------------------------------------------------------------
def _subset(adata, n, seed=0):
    idx = np.sort(np.random.default_rng(seed).choice(adata.n_obs, size=min(n, adata.n_obs), replace=False))
    return adata[idx].copy()


CONTROL = ev.random_projection_embedder(32)
SMALL = {"n_top_genes": 500, "n_components": 10, "c_grid": (0.1, 1.0)}


def test_pancancer_end_to_end_patient_grouped(tmp_path):
    parts = []
    for name, n in (("colon_cancer_10x_infercnv.h5ad", 180), ("oligodendroglioma_tirosh2016.h5ad", 120),
                    ("copykat_tnbc.h5ad", 30)):
        part = _subset(ad.read_h5ad(need_data("cancer", name)), n)
        part.obs["dataset"] = name.split(".")[0]
        part.obs_names = [f"{name}:{c}" for c in part.obs_names]
        parts.append(part)
    adata = ad.concat(parts, join="inner")
    calls = []

    def finetune_fn(train, val, label_key, seed):
        # A hook that records what it saw; it predicts the training majority class.
        calls.append((set(train.obs["patient"]), set(val.obs["patient"]), seed))
        majority = train.obs[label_key].value_counts().index[0]
        return lambda test: np.array([majority] * test.n_obs)

    report = ev.evaluate_pancancer(adata, CONTROL, finetune_fn=finetune_fn, model_name="control", n_splits=3,
                                   seeds=(0, 1, 2), output_dir=tmp_path, **SMALL)
    assert report["data"]["excluded_classes"] == {"breast cancer (TNBC)": 1}  # one patient: untestable
    assert set(report["tracks"]) == {"control_linear_probe", "control_finetuned", "baseline_pca_hvg"}
    base = report["tracks"]["baseline_pca_hvg"]["summary"]
    assert len(base["cell_accuracy"]["values"]) == 3
    assert base["cell_accuracy"]["mean"] > 0.9  # two different tumours on two platforms: easy, and confounded
    # fine-tuning hook: train and validation patients are disjoint, and each seed is passed through
    assert all(not (tr & va) for tr, va, _ in calls) and {s for *_, s in calls} == {0, 1, 2}
    assert report["confound"]["fully_confounded"] is True
    assert report["confound"]["tracks"]["baseline_pca_hvg"]["summary"]["study_accuracy"]["mean"] > 0.9
    md = (tmp_path / "eval_pancancer.md").read_text()
    assert "baseline_pca_hvg" in md and "±" in md and "fully confounded" in md
    saved = json.loads((tmp_path / "eval_pancancer.json").read_text())
    assert saved["protocol"]["seeds"] == [0, 1, 2]
    assert (tmp_path / "eval_pancancer_metrics.png").stat().st_size > 0


def test_annotation_stratified_and_transfer_end_to_end(tmp_path):
    pbmc = _subset(ad.read_h5ad(need_data("pbmc", "pbmc68k_reduced_counts.h5ad")), 350)
    report = ev.evaluate_annotation(pbmc, CONTROL, model_name="control", seeds=(0, 1, 2), output_dir=tmp_path, **SMALL)
    base = report["tracks"]["baseline_pca_hvg"]["summary"]
    assert 0.5 < base["accuracy"]["mean"] <= 1.0  # 10 PBMC types from 765 HVGs: well above chance (~0.34)
    assert base["accuracy"]["sd"] > 0  # different seeds, different splits
    assert (tmp_path / "eval_annotation_confusion_baseline_pca_hvg.png").exists()

    lung = ad.read_h5ad(need_data("cancer", "cellbench_lung_celllines.h5ad"))
    ref = _subset(lung[lung.obs["batch"] == "sc_celseq2_5cl_p1"], 150)
    query = _subset(lung[lung.obs["batch"] == "sc_dropseq"], 120)
    report = ev.evaluate_annotation(ref, CONTROL, query=query, model_name="control", seeds=(0, 1, 2), **SMALL)
    assert report["data"]["mode"] == "transfer" and report["data"]["n_query_cells"] == 120
    # Cell lines transfer across protocols for the baseline (validation taken from the reference only).
    assert report["tracks"]["baseline_pca_hvg"]["summary"]["accuracy"]["mean"] > 0.8


def test_integration_end_to_end_and_cli(tmp_path):
    path = need_data("cancer", "cellbench_lung_celllines.h5ad")
    parser = argparse.ArgumentParser()
    ev.add_evaluate_arguments(parser)
    args = parser.parse_args(["integration", str(path), "--random-projection-control", "--output-dir", str(tmp_path),
                              "--max-cells", "250", "--resolutions", "0.5", "1.0"])
    report = ev.run_evaluate(args)
    assert set(report["tracks"]) == {"control_random_projection_zero_shot", "baseline_pca_hvg"}
    for track in report["tracks"].values():
        s = {k: v["mean"] for k, v in track["summary"].items()}
        assert all(0.0 <= s[k] <= 1.0 for k in ("NMI", "ARI", "ASW_label", "ASW_batch", "graph_connectivity"))
        assert s["Avg_batch"] == pytest.approx((s["ASW_batch"] + s["graph_connectivity"]) / 2)
    assert report["tracks"]["baseline_pca_hvg"]["summary"]["NMI"]["mean"] > 0.5  # cell lines are distinct
    assert report["data"]["n_cells_scored"] <= 260
    assert (tmp_path / "eval_integration.md").exists() and (tmp_path / "eval_integration_nmi_resolution.png").exists()


def _load_run_eval():
    spec = importlib.util.spec_from_file_location("run_eval", REPO / "benchmarks" / "run_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gene_programs_end_to_end():
    adata = ad.read_h5ad(need_data("multiome", "pbmc_10k_protein_v3_rna_adt.h5ad"))
    genes = list(adata.var_names)
    report = ev.evaluate_gene_programs(ev.random_gene_vectors(genes, 32), genes, adata, embedding_name="control_random",
                                       seeds=(0,), n_permutations=5, max_genes=800)
    fam = report["per_family_first_seed"]
    # co-expression recovers MHC class II and ribosomal genes in PBMCs; random gene vectors do not
    assert fam["baseline_coexpression"]["MHC_class_II"]["similarity_auroc"] > 0.85
    assert fam["baseline_coexpression"]["ribosomal"]["similarity_auroc"] > 0.85
    assert abs(report["tracks"]["control_random"]["summary"]["mean_similarity_auroc"]["mean"] - 0.5) < 0.1
    assert report["data"]["n_genes_universe"] <= 800


def test_multiomic_end_to_end():
    run_eval = _load_run_eval()
    cite, proteins = run_eval.load_cite(need_data("multiome").parent)
    cite = _subset(cite, 250)
    report = ev.evaluate_multiomic(cite, CONTROL, model_name="control", seeds=(0,), n_protein_components=10,
                                   random_init_embed_fn=ev.random_projection_embedder(32, seed=1), **FAST)
    tracks = report["tracks"]
    assert set(tracks) == {"control_rna+protein", "control_rna_only", "baseline_pca_rna+protein",
                           "baseline_pca_rna_only", "protein_pca_only", "control_random_init_rna+protein",
                           "control_random_init_rna_only"}
    assert report["data"]["batches"] and len(report["data"]["batches"]) == 2
    # labels are protein-gated, so adding the protein block must help the RNA-only control
    assert tracks["control_rna+protein"]["summary"]["Avg_bio"]["mean"] > tracks["control_rna_only"]["summary"]["Avg_bio"]["mean"]


# ---------------------------------------------------------------------------------------------
# the real-model path: a saved PanFoMa checkpoint through model_embed_fn / model_finetune_fn
# ---------------------------------------------------------------------------------------------
def test_annotation_with_a_real_panfoma_checkpoint(tmp_path):
    """A real (tiny, untrained) PanFoMa checkpoint, saved and loaded as a user would, runs the annotation task."""
    from training_helpers import save_tiny_pretrained

    from panfoma.inference.embed import embed_adata, load_model_and_processor

    pbmc = _subset(ad.read_h5ad(need_data("pbmc", "pbmc68k_reduced_counts.h5ad")), 150)
    # Keep classes with enough cells for stratified test/validation splits of 150 cells.
    common = pbmc.obs["cell_type"].value_counts()
    pbmc = pbmc[pbmc.obs["cell_type"].isin(common.index[common >= 12])].copy()
    checkpoint = save_tiny_pretrained(tmp_path / "model", max_genes=64)
    embed_fn, gene_fn = ev.model_embed_fn(str(checkpoint), batch_size=32, device="cpu")

    emb = embed_fn(pbmc)
    model, processor = load_model_and_processor(checkpoint, device="cpu")
    assert emb.shape == (pbmc.n_obs, model.config.hidden_size)
    # the hook is the library path, not a stand-in: same numbers as embed_adata, independent of the batch size
    np.testing.assert_allclose(emb, embed_adata(model, processor, pbmc, batch_size=7, progress=False), atol=1e-5)
    assert np.unique(emb.round(4), axis=0).shape[0] == pbmc.n_obs  # every cell gets its own embedding

    gene_emb, symbols = gene_fn(["CD3E", "LYZ", "NOT_A_GENE_XYZ"])
    assert symbols == sorted(symbols, key=processor.vocab.token_to_id) and set(symbols) == {"CD3E", "LYZ"}
    table = model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_allclose(gene_emb, table[[processor.vocab.token_to_id(s) for s in symbols]])

    seen = []
    finetune = ev.model_finetune_fn(str(checkpoint), tmp_path / "ft", max_steps=2, eval_every=1, device="cpu")

    def recording_finetune(train, val, label_key, seed):
        seen.append((set(train.obs_names), set(val.obs_names)))
        return finetune(train, val, label_key, seed)

    report = ev.evaluate_annotation(pbmc, embed_fn, finetune_fn=recording_finetune, seeds=(0,), output_dir=tmp_path,
                                    **SMALL)
    assert set(report["tracks"]) == {"panfoma_linear_probe", "panfoma_finetuned", "baseline_pca_hvg"}
    assert report["protocol"]["embedding"] == f"embed_fn panfoma:{checkpoint}"
    train_cells, val_cells = seen[0]
    assert train_cells and val_cells and not train_cells & val_cells
    # the fine-tuned model predicts cell types of the training set for every test cell
    predicted = pd.DataFrame(report["confusion_first_seed"]["panfoma_finetuned"]).fillna(0)
    assert set(predicted.columns) <= set(pbmc.obs["cell_type"])
    assert int(predicted.to_numpy().sum()) == report["data"]["n_reference_cells"] - len(train_cells) - len(val_cells)
    assert not (tmp_path / "ft" / "seed0-1").exists()  # fine-tuning checkpoints are cleaned up


def _write_subset(path: Path, adata) -> str:
    adata.write_h5ad(path)
    return str(path)


def test_evaluate_cli_annotation_reaches_the_finetuned_track_and_the_random_init_control(tmp_path):
    """`panfoma evaluate annotation DATA --model CKPT --finetune`: every track, in the documented JSON layout."""
    from training_helpers import save_tiny_pretrained

    pbmc = _subset(ad.read_h5ad(need_data("pbmc", "pbmc68k_reduced_counts.h5ad")), 150)
    common = pbmc.obs["cell_type"].value_counts()
    pbmc = pbmc[pbmc.obs["cell_type"].isin(common.index[common >= 12])].copy()
    data = _write_subset(tmp_path / "pbmc.h5ad", pbmc)
    checkpoint = str(save_tiny_pretrained(tmp_path / "model", max_genes=64))
    parser = argparse.ArgumentParser()
    ev.add_evaluate_arguments(parser)
    args = parser.parse_args(["annotation", data, "--model", checkpoint, "--finetune", "--finetune-steps", "2",
                              "--seeds", "0", "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    report = ev.run_evaluate(args)
    assert set(report["tracks"]) == {"panfoma_linear_probe", "panfoma_random_init", "panfoma_finetuned",
                                     "baseline_pca_hvg"}
    saved = json.loads((tmp_path / "out" / "eval_annotation.json").read_text())
    for track in saved["tracks"].values():
        assert np.isfinite(track["summary"]["macro_f1"]["mean"]) and len(track["summary"]["accuracy"]["values"]) == 1
    assert saved["protocol"]["random_init_control"] == f"embed_fn panfoma_random_init:{checkpoint}"
    assert any("panfoma_finetuned" in note for note in saved["notes"])
    # the control is the same architecture with other weights: same width, different embeddings
    model_embed, _ = ev.model_embed_fn(checkpoint, device="cpu")
    control_embed, _ = ev.model_embed_fn(checkpoint, device="cpu", random_init=True)
    first = pbmc[:8].copy()
    z_model, z_control = model_embed(first), control_embed(first)
    assert z_model.shape == z_control.shape and not np.allclose(z_model, z_control, atol=1e-3)
    assert not (tmp_path / "out" / "finetune" / "seed0-1").exists()  # fine-tuning checkpoints are cleaned up
    with pytest.raises(ValueError, match="--finetune needs --model"):
        ev.run_evaluate(parser.parse_args(["annotation", data, "--finetune", "--output-dir", str(tmp_path / "x")]))


def test_evaluate_cli_pancancer_finetunes_a_preset_model(tmp_path):
    """`--model panfoma-tiny`: a randomly initialised model with the default processor, fine-tuned per fold."""
    parts = []
    for name, n in (("colon_cancer_10x_infercnv.h5ad", 45), ("oligodendroglioma_tirosh2016.h5ad", 45)):
        part = _subset(ad.read_h5ad(need_data("cancer", name)), n)
        part.obs["dataset"] = name.split(".")[0]
        part.obs_names = [f"{name}:{c}" for c in part.obs_names]
        parts.append(ev.standardize_gene_names(part))
    cancer = ad.concat(parts, join="inner")
    detected = np.asarray((cancer.X > 0).sum(axis=0)).ravel()
    cancer = cancer[:, np.sort(np.argsort(-detected)[:300])].copy()  # 300 genes: a fast CPU test, same wiring
    data = _write_subset(tmp_path / "cancer.h5ad", cancer)
    parser = argparse.ArgumentParser()
    ev.add_evaluate_arguments(parser)
    args = parser.parse_args(["pancancer", data, "--model", "panfoma-tiny", "--finetune", "--finetune-steps", "1",
                              "--n-splits", "3", "--seeds", "0", "--output-dir", str(tmp_path / "out"),
                              "--device", "cpu"])
    report = ev.run_evaluate(args)
    # A preset is itself randomly initialised: no separate control, and the notes say so.
    assert set(report["tracks"]) == {"panfoma_linear_probe", "panfoma_finetuned", "baseline_pca_hvg"}
    assert any("itself randomly initialised" in note for note in report["notes"])
    finetuned = report["tracks"]["panfoma_finetuned"]["summary"]
    assert np.isfinite(finetuned["patient_macro_f1"]["mean"]) and finetuned["cell_accuracy"]["values"]


def test_integration_reports_the_random_init_control_beside_the_model():
    lung = _subset(ad.read_h5ad(need_data("cancer", "cellbench_lung_celllines.h5ad")), 120)
    report = ev.evaluate_integration(lung, CONTROL, random_init_embed_fn=ev.random_projection_embedder(32, seed=1),
                                     model_name="control", seeds=(0,), **FAST)
    assert set(report["tracks"]) == {"control_zero_shot", "control_random_init", "baseline_pca_hvg"}
    zero_shot, control = (report["tracks"][t]["summary"]["NMI"]["mean"] for t in ("control_zero_shot",
                                                                                   "control_random_init"))
    assert zero_shot != control  # two different embeddings, scored separately


def test_run_task_skeleton_embeds_once_or_per_seed_subsample_and_reports_the_layout(toy_adata, tmp_path):
    from panfoma.evaluation.skeleton import ModelSources, TaskData, run_task

    seen = []

    def embed_fn(adata):
        seen.append(adata.n_obs)
        return np.asarray(adata.X[:, :4], dtype=np.float32)

    def score(seed, data, embeddings):
        assert embeddings.model.shape == (data.adata.n_obs, 4) and embeddings.control is None
        return {"track_a": {"metric": float(seed)}, "baseline_pca_hvg": {"metric": 1.0}}

    def describe(data, embeddings):
        return {"data": {"n_cells": data.adata.n_obs}, "protocol": {"split": "none"}, "extra": 7}

    common = dict(seeds=(0, 2), prepare=lambda a: TaskData(a[:30].copy()), score=score, describe=describe,
                  headline_metrics=["metric"])
    report = run_task("toy", toy_adata, ModelSources(embed_fn), output_dir=tmp_path, **common)
    assert seen == [30]  # validated cells embedded once, before the seeds
    assert report["tracks"]["track_a"]["summary"]["metric"]["mean"] == 1.0
    assert report["tracks"]["track_a"]["per_seed"] == [{"seed": 0, "metric": 0.0}, {"seed": 2, "metric": 2.0}]
    assert report["protocol"]["seeds"] == [0, 2] and report["protocol"]["embedding"].startswith("embed_fn")
    assert report["protocol"]["random_init_control"] == "not run" and report["extra"] == 7
    assert json.loads((tmp_path / "eval_toy.json").read_text())["tracks"]["track_a"]["summary"]["metric"]["sd"] > 0

    seen.clear()
    run_task("toy", toy_adata, ModelSources(embed_fn), subsample=lambda d, seed: TaskData(d.adata[: 10 + seed]),
             **common)
    assert seen == [10, 12]  # a per-seed subsample is embedded per seed
    with pytest.raises(ValueError, match="at least one seed"):
        run_task("toy", toy_adata, ModelSources(embed_fn), **{**common, "seeds": ()})


def test_model_finetune_fn_rejects_bad_schedule():
    with pytest.raises(ValueError, match="positive integers"):
        ev.model_finetune_fn("unused", "unused", max_steps=0)


def test_run_eval_summary_has_a_random_init_column(tmp_path):
    run_eval = _load_run_eval()

    def track(mean):
        return {"summary": {"macro_f1": {"mean": mean, "sd": 0.01}, "accuracy": {"mean": mean, "sd": 0.0}}}

    report = {"tracks": {"panfoma_linear_probe": track(0.61), "panfoma_random_init": track(0.42),
                         "panfoma_finetuned": track(0.7), "baseline_pca_hvg": track(0.8)}, "date": "2026-11-28 18:00 UTC"}
    (tmp_path / "eval_annotation_pbmc68k").mkdir()
    (tmp_path / "eval_annotation_pbmc68k" / "eval_annotation.json").write_text(json.dumps(report))
    table = run_eval.write_summary(tmp_path).read_text().splitlines()
    assert "| random init |" in table[0]
    row = next(line for line in table if "| macro_f1 |" in line)
    cells = [c.strip() for c in row.split("|")[3:7]]
    assert cells == ["0.610 ± 0.010", "0.700 ± 0.010", "0.420 ± 0.010", "0.800 ± 0.010"]
    assert row.rstrip(" |").endswith("2026-11-28 18:00 UTC")  # the run each row comes from
