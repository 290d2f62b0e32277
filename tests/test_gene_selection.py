"""Gene selection under a cap (`select_genes` / `encode_cells`): random sampling for pretraining, a
deterministic top-k by expression for inference."""

from __future__ import annotations

import numpy as np
import pytest

from panfoma.tokenization.encoding import encode_cells, select_genes


def test_top_selection_keeps_the_k_most_expressed_with_ties_broken_by_token_id():
    expressed = np.arange(8)
    expression = np.array([5.0, 1.0, 9.0, 2.0, 5.0, 5.0, 7.0, 0.5])
    chosen = select_genes(expressed, max_genes=4, rng=np.random.default_rng(0), shuffle=False,
                          gene_selection="top", expression=expression)
    # 9 (pos 2), 7 (pos 6), then three genes tie at 5 (pos 0, 4, 5): the lowest positions win the last slot.
    assert chosen.tolist() == [0, 2, 4, 6]


def test_top_selection_ignores_the_generator_and_random_selection_does_not():
    expressed = np.arange(50)
    expression = np.random.default_rng(1).gamma(1.0, size=50)
    tops = [select_genes(expressed, max_genes=10, rng=np.random.default_rng(seed), shuffle=False,
                         gene_selection="top", expression=expression).tolist() for seed in range(5)]
    assert all(t == tops[0] for t in tops)
    assert sorted(expression[tops[0]]) == sorted(np.sort(expression)[-10:])
    randoms = {tuple(select_genes(expressed, max_genes=10, rng=np.random.default_rng(seed), shuffle=False))
               for seed in range(5)}
    assert len(randoms) > 1


def test_encode_cells_top_selection_is_independent_of_input_column_order():
    rng = np.random.default_rng(0)
    genes = rng.choice(np.arange(4, 400), size=60, replace=False)
    counts = rng.poisson(2.0, size=60).astype(float)
    counts[:5] = 0.0  # explicit zeros are never selected
    counts[10:14] = 3.0  # a tie across the cut
    k = 20
    encoded = []
    for order in (np.arange(60), rng.permutation(60), rng.permutation(60)):
        cell = encode_cells(np.array([0, 60]), genes[order], counts[order], n_bins=5, max_genes=k,
                            rngs=[np.random.default_rng(order[0])], shuffle=False, gene_selection="top")[0]
        encoded.append(cell)
    for cell in encoded[1:]:
        np.testing.assert_array_equal(cell.input_ids, encoded[0].input_ids)
        np.testing.assert_array_equal(cell.values, encoded[0].values)
    kept = encoded[0].input_ids
    value_of = dict(zip(genes.tolist(), counts.tolist()))
    kept_values = np.array([value_of[g] for g in kept.tolist()])
    dropped_values = np.array([v for g, v in value_of.items() if g not in set(kept.tolist())])
    assert kept.size == k and kept_values.min() >= dropped_values.max()
    # at the cut, tied genes with the lowest token ids are kept
    cut = kept_values.min()
    tied = sorted(g for g, v in value_of.items() if v == cut)
    assert [g for g in tied if g in set(kept.tolist())] == tied[: int((kept_values == cut).sum())]


def test_default_selection_is_still_random_sampling_and_unknown_rules_are_refused():
    genes, counts = np.arange(4, 104), np.arange(1, 101, dtype=float)
    cell = encode_cells(np.array([0, 100]), genes, counts, n_bins=5, max_genes=10,
                        rngs=[np.random.default_rng(3)], shuffle=False)[0]
    assert not set(cell.input_ids.tolist()) == set(range(94, 104))  # not the top 10
    with pytest.raises(ValueError, match="gene_selection must be one of"):
        encode_cells(np.array([0, 100]), genes, counts, n_bins=5, max_genes=10, rngs=[np.random.default_rng(0)],
                     gene_selection="highest")
