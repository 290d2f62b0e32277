"""In-silico perturbation (panfoma.inference.perturb) on real PBMC cells: a planted effect must rank first, and the
bookkeeping (which cells a perturbation affects, batching) must hold with a real tiny model."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from training_helpers import save_tiny_pretrained

PLANTED = "PTPRC"  # expressed in half of the first 60 cells
OTHERS = ["ZFP36L2", "SRSF2", "PSMC5", "HLA-DMA", "JUNB", "VIM"]


@pytest.fixture(scope="module")
def pbmc(shared_data):
    import anndata as ad

    adata = ad.read_h5ad(shared_data / "pbmc" / "pbmc68k_reduced_counts.h5ad")[:60].copy()
    x = adata[:, PLANTED].X
    adata.obs["state"] = np.where(np.asarray(x.todense() if hasattr(x, "todense") else x).ravel() > 0, "on", "off")
    return adata


@pytest.fixture(scope="module")
def processor():
    from panfoma.tokenization import PanFoMaGeneProcessor

    return PanFoMaGeneProcessor(max_genes=64, n_bins=11)


def _planted_forward(processor):
    """An embedding decided by one gene: (1, 3 * [PTPRC present], small noise from the cell's other genes)."""
    planted = processor.vocab.token_to_id(PLANTED)

    def forward(input_ids, values, attention_mask):
        valid = attention_mask.bool()
        present = ((input_ids == planted) & valid).any(1).float()
        others = (values.float() * valid).sum(1) / valid.sum(1) / 50.0
        return torch.stack([torch.ones_like(present), 3 * present, others], 1)

    return forward


def test_planted_gene_ranks_first(pbmc, processor):
    from panfoma.inference.perturb import perturb_genes

    # Deleting PTPRC in the cells that express it moves them onto the cells that do not.
    result = perturb_genes(None, processor, pbmc, [PLANTED, *OTHERS], mode="delete", target="off", target_key="state",
                           forward_fn=_planted_forward(processor), batch_size=16, progress=False)
    table = result.genes
    assert table.loc[0, "gene"] == PLANTED
    assert table.loc[0, "n_cells"] == int((pbmc.obs["state"] == "on").sum())
    assert table.loc[0, "fraction_toward_target"] == 1.0
    assert table.loc[0, "mean_toward_target"] > 10 * table.loc[1:, "mean_toward_target"].abs().max()
    # Overexpressing it in the other cells moves them toward the "on" state.
    up = perturb_genes(None, processor, pbmc, [*OTHERS, PLANTED], mode="overexpress", target="on",
                       target_key="state", forward_fn=_planted_forward(processor), batch_size=16, progress=False)
    assert up.genes.loc[0, "gene"] == PLANTED
    assert up.genes.loc[0, "n_cells"] == int((pbmc.obs["state"] == "off").sum())
    assert up.cell_shifts.loc[pbmc.obs_names[pbmc.obs["state"] == "on"]].isna().all().all()


def test_bookkeeping_with_a_tiny_model(pbmc, processor, tmp_path):
    from panfoma.inference.perturb import perturb_genes
    from panfoma.inference.embed import load_model_and_processor

    model, processor = load_model_and_processor(save_tiny_pretrained(tmp_path), device="cpu")
    adata = pbmc[:24].copy()
    genes = [PLANTED, "JUNB", "SRSF2"]
    result = perturb_genes(model, processor, adata, genes, mode="delete", batch_size=24, max_genes=64, progress=False)
    encoded = processor(adata, max_genes=64)
    for gene in genes:
        token = processor.vocab.token_to_id(gene)
        expresses = ((encoded["input_ids"] == token) & encoded["attention_mask"].bool()).any(1).numpy()
        shifts = result.cell_shifts[gene].to_numpy()
        assert (~np.isnan(shifts) == expresses).all()
        assert (shifts[expresses] > 0).all()
        assert result.genes.set_index("gene").loc[gene, "n_cells"] == expresses.sum()
    # Batching does not change the result.
    again = perturb_genes(model, processor, adata, genes, mode="delete", batch_size=5, max_genes=64, progress=False)
    np.testing.assert_allclose(again.cell_shifts[genes].to_numpy(), result.cell_shifts[genes].to_numpy(), atol=1e-5)
    # Overexpression applies to every cell; the default gene list is the most frequently expressed genes.
    up = perturb_genes(model, processor, adata, mode="overexpress", n_top_genes=3, max_genes=64, progress=False)
    assert (up.genes["n_cells"] == adata.n_obs).all() and len(up.genes) == 3


def test_cli_perturb(pbmc, tmp_path):
    model = save_tiny_pretrained(tmp_path / "model")
    data = tmp_path / "cells.h5ad"
    pbmc[:20].copy().write_h5ad(data)
    output = tmp_path / "genes.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "panfoma.cli", "perturb", str(model), str(data), "-o", str(output),
               "--genes", f"{PLANTED},JUNB", "--target-key", "state", "--target", "off", "--max-genes", "64",
               "--cell-shifts", str(tmp_path / "cells.csv")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(output)
    assert list(table["gene"]) != [] and set(table["gene"]) == {PLANTED, "JUNB"}
    assert {"mean_shift", "mean_toward_target", "n_cells"} <= set(table.columns)
    assert pd.read_csv(tmp_path / "cells.csv", index_col=0).shape == (20, 2)
    bad = subprocess.run(command[:-2] + ["--target", "nonsense", "--overwrite"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and "--target" in bad.stderr and "Traceback" not in bad.stderr
