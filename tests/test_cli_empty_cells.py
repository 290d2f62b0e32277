"""`--drop-empty-cells` on `panfoma embed` and `panfoma evaluate`, run as a user runs them (CLI subprocess).

Input: real PBMC cells from ../shared/data with one cell's counts set to zero (a cell with no expression in any
vocabulary gene). Without the flag the run stops with one line naming the flag (exit 2, no traceback, nothing
written); with it the cell is left out, the rest is processed, and the dropped cell is reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PBMC = DATA / "pbmc" / "pbmc68k_reduced_counts.h5ad"
CLI = [sys.executable, "-m", "panfoma.cli"]
EMPTY_ROW = 5


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_flag_named(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("panfoma") and "--drop-empty-cells" in last and "no expression" in last, last
    assert "drop_empty_cells=" not in last, last  # the flag, not the Python keyword


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    if not PBMC.exists():
        pytest.skip(f"real data not found at {PBMC} (the ../shared/data folder is absent in a fresh clone)")
    from training_helpers import save_tiny_pretrained

    folder = tmp_path_factory.mktemp("empty_cells")
    pbmc = ad.read_h5ad(PBMC)
    pbmc = pbmc[np.sort(np.random.default_rng(0).choice(pbmc.n_obs, 150, replace=False))].copy()
    common = pbmc.obs["cell_type"].value_counts()
    pbmc = pbmc[pbmc.obs["cell_type"].isin(common.index[common >= 12])].copy()
    keep = np.ones(pbmc.n_obs, dtype=np.float32)
    keep[EMPTY_ROW] = 0
    counts = (sp.diags(keep) @ sp.csr_matrix(pbmc.X, dtype=np.float32)).tocsr()  # row EMPTY_ROW: all zero
    counts.eliminate_zeros()
    pbmc.X = counts
    path = folder / "pbmc_with_empty_cell.h5ad"
    pbmc.write_h5ad(path)
    model = save_tiny_pretrained(folder / "model", max_genes=64)
    return path, model, str(pbmc.obs_names[EMPTY_ROW]), pbmc.n_obs


def test_embed_refuses_an_empty_cell_naming_the_flag_and_drops_it_with_the_flag(inputs, tmp_path):
    path, model, empty_name, n_cells = inputs
    refused = run_cli("embed", str(model), str(path), "-o", "out.h5ad", "--max-genes", "64", cwd=tmp_path)
    assert_flag_named(refused)
    assert not list(tmp_path.iterdir())  # nothing written, no partial file

    done = run_cli("embed", str(model), str(path), "-o", "out.h5ad", "--max-genes", "64", "--drop-empty-cells",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "dropped 1 cell(s)" in done.stdout and empty_name in done.stdout, done.stdout
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    embedding = written.obsm["X_panfoma"]
    assert written.n_obs == n_cells and embedding.shape[0] == n_cells
    assert np.isnan(embedding[EMPTY_ROW]).all()
    assert np.isfinite(np.delete(embedding, EMPTY_ROW, axis=0)).all()
    meta = written.uns["panfoma"]
    assert meta["n_dropped_cells"] == 1 and list(meta["dropped_cells"]) == [empty_name]


@pytest.mark.slow
def test_evaluate_refuses_an_empty_cell_naming_the_flag_and_leaves_it_out_with_the_flag(inputs, tmp_path):
    pytest.importorskip("scanpy", reason='evaluation extra not installed: pip install "panfoma[eval]"')
    path, model, empty_name, n_cells = inputs
    command = ["evaluate", "annotation", str(path), "--model", str(model), "--seeds", "0",
               "--no-random-init-control", "--device", "cpu"]
    assert_flag_named(run_cli(*command, "--output-dir", "refused", cwd=tmp_path))

    done = run_cli(*command, "--output-dir", "out", "--drop-empty-cells", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "eval_annotation.json").read_text())
    assert report["data"]["n_reference_cells"] == n_cells - 1
    assert any("--drop-empty-cells" in note and empty_name in note for note in report["notes"])
    assert np.isfinite(report["tracks"]["panfoma_linear_probe"]["summary"]["macro_f1"]["mean"])
