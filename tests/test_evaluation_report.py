"""What a reader of an evaluation report sees: confusion matrices with counts and a colour bar, and a transfer report
that names the query types the reference lacks (real CellBench cells, one cell line held out of the reference)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")


def test_confusion_matrix_shows_counts_on_the_union_of_labels_and_a_colour_bar():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from panfoma.evaluation.report import draw_confusion

    # {predicted: {true: count}}, as the tasks store it: "NK" is predicted but never true, "Mono" true but never called.
    table = pd.DataFrame({"B": {"B": 8, "Mono": 2}, "NK": {"T": 3}, "T": {"T": 5}}).fillna(0)
    fig, ax = plt.subplots()
    draw_confusion(ax, table, "probe")
    labels = ["B", "Mono", "NK", "T"]
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    numbers = np.array([int(t.get_text()) for t in ax.texts]).reshape(4, 4)
    expected = np.array([[8, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 3, 5]])
    np.testing.assert_array_equal(numbers, expected)
    colour_bars = [a for a in fig.axes if a is not ax]
    assert len(colour_bars) == 1 and "share" in colour_bars[0].get_ylabel()
    shares = ax.images[0].get_array()
    assert shares[3, 3] == pytest.approx(5 / 8) and shares[2].sum() == 0  # coloured by the row's share
    plt.close(fig)


def test_transfer_report_names_the_query_types_absent_from_the_reference(shared_data, tmp_path):
    import anndata as ad

    from panfoma.evaluation.baselines import random_projection_embedder
    from panfoma.evaluation.tasks import evaluate_annotation

    lung = ad.read_h5ad(shared_data / "cancer" / "cellbench_lung_celllines.h5ad")
    rng = np.random.default_rng(0)
    reference = lung[(lung.obs["batch"] == "sc_celseq2_5cl_p1").to_numpy()
                     & (lung.obs["cell_type"] != "H1975").to_numpy()]
    reference = reference[np.sort(rng.choice(reference.n_obs, 150, replace=False))].copy()
    query = lung[(lung.obs["batch"] == "sc_dropseq").to_numpy()]
    query = query[np.sort(rng.choice(query.n_obs, 120, replace=False))].copy()
    held_out = int((query.obs["cell_type"] == "H1975").sum())
    assert held_out > 0
    report = evaluate_annotation(reference, random_projection_embedder(32), query=query, model_name="control",
                                 seeds=(0,), n_top_genes=500, n_components=10, c_grid=(1.0,), output_dir=tmp_path)
    assert report["data"]["unseen_query_types"] == {"H1975": held_out}
    markdown = (tmp_path / "eval_annotation.md").read_text()
    assert f"query types absent from the reference** (their cells cannot be labelled correctly and count as " \
           f"errors): H1975 ({held_out} cells)" in markdown
    plots = sorted(p.name for p in tmp_path.glob("eval_annotation_confusion_*.png"))
    assert "eval_annotation_confusion_baseline_pca_hvg.png" in plots


def test_evaluate_announces_its_stages(shared_data, tmp_path):
    import os
    import subprocess
    import sys

    import anndata as ad

    pbmc = ad.read_h5ad(shared_data / "pbmc" / "pbmc68k_reduced_counts.h5ad")
    pbmc[np.sort(np.random.default_rng(0).choice(pbmc.n_obs, 300, replace=False))].copy().write_h5ad(tmp_path / "c.h5ad")
    command = [sys.executable, "-m", "panfoma.cli", "evaluate", "annotation", str(tmp_path / "c.h5ad"),
               "--random-projection-control", "--output-dir", str(tmp_path / "eval"), "--seeds", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    stages = [line.split("panfoma.evaluation.command: ", 1)[1] for line in done.stderr.splitlines()
              if "panfoma.evaluation.command: stage " in line]
    assert [s.split(":")[0] for s in stages] == [f"stage {n} of 4" for n in range(1, 5)], stages
    assert (tmp_path / "eval" / "eval_annotation.json").is_file()
