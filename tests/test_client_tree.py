"""FedTreeLoRA client tree: distances, windowed layer-wise cuts, ablation modes, saved artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedlora.fl.client_tree import build_tree_cuts, client_distances, layer_index, load_tree, save_tree

PLANTED_2 = [{0, 1, 2}, {3, 4, 5}]
PLANTED_3 = [{0, 1, 2}, {3, 4}, {5}]


def _key(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.self_attn.{proj}.lora_B"


def planted(seed: int, n_layers: int = 6, noise: float = 0.01) -> list[dict[str, np.ndarray]]:
    """6 clients, 2 projections of B [16, 4] per layer. Layers 0-1: one shared base; 2-3: bases for
    {0,1,2} and {3,4,5}; 4-5: bases for {0,1,2}, {3,4}, {5}. Plus small per-client noise."""
    rng = np.random.default_rng(seed)
    third = n_layers // 3
    out = [dict() for _ in range(6)]
    for layer in range(n_layers):
        groups = [set(range(6))] if layer < third else PLANTED_2 if layer < 2 * third else PLANTED_3
        for proj in ("q_proj", "v_proj"):
            for g in groups:
                base = rng.standard_normal((16, 4))
                for i in g:
                    out[i][_key(layer, proj)] = base + noise * rng.standard_normal((16, 4))
    return out


def partition(row: np.ndarray) -> set[frozenset]:
    return {frozenset(np.flatnonzero(row == g).tolist()) for g in np.unique(row)}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("metric", ["frobenius", "cosine"])
def test_planted_groups_recovered_monotone_and_nested(seed, metric):
    per, avg = client_distances(planted(seed), layer_index, metric=metric)
    assert per.shape == (6, 6, 6) and avg.shape == (6, 6)
    np.testing.assert_allclose(avg, per.mean(axis=0))
    cuts = build_tree_cuts(per, avg, window=2, tau=0.1)
    assert cuts.counts == [1, 1, 2, 2, 3, 3]
    assert cuts.linkage.shape == (5, 4)
    want = [{frozenset(range(6))}] * 2 + [{frozenset(g) for g in PLANTED_2}] * 2 + [{frozenset(g) for g in PLANTED_3}] * 2
    assert [partition(row) for row in cuts.labels] == want
    assert all(a <= b for a, b in zip(cuts.counts, cuts.counts[1:]))
    for shallow, deep in zip(cuts.labels, cuts.labels[1:]):  # every deeper cluster sits inside one shallower one
        for g in np.unique(deep):
            assert len(np.unique(shallow[deep == g])) == 1
    # Global ids: the same set of clients keeps its id from layer to layer.
    assert cuts.labels[4, 0] == cuts.labels[2, 0] and cuts.labels[1, 0] == cuts.labels[0, 0]
    # Scores: c = 1 scores tau, the chosen count has the best score among the window.
    assert cuts.scores[0][1] == 0.1 and set(cuts.scores[4]) == {2, 3}
    for s, c in zip(cuts.scores, cuts.counts):
        assert s[c] == max(s.values())


def test_window_limits_growth_per_layer():
    # All planted splits at once in layer 0 would want c=3, but window 1 keeps c at c_0 = 1 forever.
    per, avg = client_distances(planted(0), layer_index)
    assert build_tree_cuts(per, avg, window=1).counts == [1] * 6
    # A deep split right after an all-shared layer: window 2 lets the count grow by at most 1 per layer.
    per2 = np.stack([per[0], per[5], per[5]])
    assert build_tree_cuts(per2, per2.mean(axis=0), window=2).counts == [1, 2, 3]


@pytest.mark.parametrize("tau", [1.0, 1.5, 10.0])
def test_large_tau_keeps_one_cluster_everywhere(tau):
    """Silhouette <= 1, so tau >= 1 never lets a split win: FedTreeLoRA reduces to FedIT."""
    per, avg = client_distances(planted(1), layer_index)
    cuts = build_tree_cuts(per, avg, window=3, tau=tau)
    assert cuts.counts == [1] * 6 and (cuts.labels == 0).all()


@pytest.mark.parametrize("c", [1, 2, 4, 6])
def test_fixed_gives_exactly_c_everywhere(c):
    per, avg = client_distances(planted(2), layer_index)
    cuts = build_tree_cuts(per, avg, mode="fixed", fixed_clusters=c)
    assert cuts.counts == [c] * 6
    assert all(len(np.unique(row)) == c for row in cuts.labels)
    assert (cuts.labels == cuts.labels[0]).all()  # the same cut of the same tree at every layer
    if c == 6:
        assert cuts.scores[0][6] is None  # silhouette undefined for N singletons


def test_independent_can_decrease_but_tree_cannot():
    # Layer 0 has two groups, layer 1 has all clients identical (up to noise).
    bs = planted(3)
    per, avg = client_distances(bs, layer_index)
    per2 = np.stack([per[2], per[0]])
    avg2 = per2.mean(axis=0)
    ind = build_tree_cuts(per2, avg2, mode="independent")
    assert ind.counts == [2, 1]
    assert ind.layer_linkages is not None and ind.layer_linkages.shape == (2, 5, 4)
    assert partition(ind.labels[0]) == {frozenset(g) for g in PLANTED_2}
    tree = build_tree_cuts(per2, avg2, mode="tree")
    assert tree.counts[0] == 2 and tree.counts[1] >= 2  # window {2, 3}: on noise either may win


def test_distances_known_values_2x2():
    e11, e12 = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 1.0], [0.0, 0.0]])
    bs = [{"model.layers.0.q.lora_B": e11}, {"model.layers.0.q.lora_B": e12}, {"model.layers.0.q.lora_B": 2 * e11}]
    fro, _ = client_distances(bs, layer_index, "frobenius")
    cos, _ = client_distances(bs, layer_index, "cosine")
    np.testing.assert_allclose(fro[0], [[0, np.sqrt(2), 1], [np.sqrt(2), 0, np.sqrt(5)], [1, np.sqrt(5), 0]])
    np.testing.assert_allclose(cos[0], [[0, 1, 0], [1, 0, 1], [0, 1, 0]], atol=1e-12)


def test_layer_distance_concatenates_projections_and_averages_layers():
    a = np.array([[1.0, 0.0], [0.0, 0.0]])
    b = np.array([[0.0, 0.0], [0.0, 1.0]])
    c0 = {"model.layers.0.q.lora_B": a, "model.layers.0.v.lora_B": a, "model.layers.3.q.lora_B": a}
    c1 = {"model.layers.0.q.lora_B": b, "model.layers.0.v.lora_B": a, "model.layers.3.q.lora_B": a}
    fro, fro_avg = client_distances([c0, c1], layer_index, "frobenius")
    cos, cos_avg = client_distances([c0, c1], layer_index, "cosine")
    assert fro.shape == (2, 2, 2)  # layers 0 and 3, in index order
    assert fro[0, 0, 1] == pytest.approx(np.sqrt(2)) and fro[1, 0, 1] == 0.0
    assert cos[0, 0, 1] == pytest.approx(0.5)  # cos = 1 / (sqrt2 * sqrt2)
    assert fro_avg[0, 1] == pytest.approx(np.sqrt(2) / 2) and cos_avg[0, 1] == pytest.approx(0.25)


def test_cosine_zero_vectors_and_torch_input():
    z = torch.zeros(2, 2)
    one = torch.ones(2, 2, dtype=torch.bfloat16)
    cos, _ = client_distances([{"layers.0.B": z}, {"layers.0.B": z.clone()}, {"layers.0.B": one}], metric="cosine")
    np.testing.assert_allclose(cos[0], [[0, 0, 1], [0, 0, 1], [1, 1, 0]])
    fro, _ = client_distances([{"layers.0.B": z}, {"layers.0.B": one}])
    assert fro[0, 0, 1] == pytest.approx(2.0)


def test_two_clients_always_one_cluster_in_tree_mode():
    """N = 2: the window stops below N, and 2 singletons have no silhouette, so c = 1 throughout."""
    bs = [{_key(0, "q_proj"): np.zeros((4, 2))}, {_key(0, "q_proj"): 100 * np.ones((4, 2))}]
    per, avg = client_distances(bs)
    cuts = build_tree_cuts(per, avg, window=5, tau=-1.0)
    assert cuts.counts == [1] and cuts.scores == [{1: -1.0}]
    ind = build_tree_cuts(per, avg, mode="independent")
    assert ind.counts == [1]
    fixed = build_tree_cuts(per, avg, mode="fixed", fixed_clusters=2)
    assert fixed.counts == [2] and fixed.scores == [{2: None}]


def test_one_client():
    per, avg = client_distances([{_key(0, "q_proj"): np.ones((2, 2)), _key(1, "q_proj"): np.ones((2, 2))}])
    cuts = build_tree_cuts(per, avg)
    assert cuts.counts == [1, 1] and cuts.linkage.shape == (0, 4)


def test_layer_index():
    assert layer_index("model.layers.12.self_attn.q_proj.lora_B") == 12
    assert layer_index("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight") == 0
    assert layer_index("transformer.h.7.attn.c_attn.lora_B") == 7
    with pytest.raises(ValueError, match="layer index"):
        layer_index("lm_head.lora_B")


def test_bad_inputs_raise_clear_errors():
    ok = {_key(0, "q_proj"): np.ones((4, 2)), _key(1, "q_proj"): np.ones((4, 2))}
    with pytest.raises(ValueError, match="keys differ"):
        client_distances([ok, {_key(0, "q_proj"): np.ones((4, 2))}])
    with pytest.raises(ValueError, match="shape"):
        client_distances([ok, {**ok, _key(1, "q_proj"): np.ones((4, 3))}])
    with pytest.raises(ValueError, match="metric"):
        client_distances([ok, ok], metric="l1")
    with pytest.raises(ValueError, match="at least one client"):
        client_distances([])
    per, avg = client_distances(planted(0), layer_index)
    with pytest.raises(ValueError, match="window"):
        build_tree_cuts(per, avg, window=0)
    with pytest.raises(ValueError, match="mode"):
        build_tree_cuts(per, avg, mode="flat")
    with pytest.raises(ValueError, match="linkage"):
        build_tree_cuts(per, avg, linkage="centroid")
    with pytest.raises(ValueError, match="fixed_clusters"):
        build_tree_cuts(per, avg, mode="fixed")
    with pytest.raises(ValueError, match="fixed_clusters"):
        build_tree_cuts(per, avg, mode="fixed", fixed_clusters=7)
    with pytest.raises(ValueError, match="averaged"):
        build_tree_cuts(per, avg[:5, :5])
    with pytest.raises(ValueError, match="symmetric"):
        asym = per.copy()
        asym[0, 0, 1] += 1.0
        build_tree_cuts(asym, avg)


@pytest.mark.parametrize("mode", ["tree", "independent"])
def test_save_tree_writes_json_and_png(tmp_path, mode):
    per, avg = client_distances(planted(4), layer_index)
    cuts = build_tree_cuts(per, avg, mode=mode)
    names = [f"hospital-{i}" for i in range(6)]
    json_path, png_path = save_tree(cuts, tmp_path / "run", client_names=names, layer_ids=range(6))
    rec = json.loads(json_path.read_text())
    assert rec["counts"] == cuts.counts and rec["labels"] == cuts.labels.tolist()
    assert rec["params"]["mode"] == mode and rec["clients"] == names
    assert sorted(m for ms in rec["clusters"][-1].values() for m in ms) == sorted(names)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = load_tree(json_path)
    np.testing.assert_array_equal(back.labels, cuts.labels)
    np.testing.assert_allclose(back.linkage, cuts.linkage)
    assert back.counts == cuts.counts and back.scores == cuts.scores
    with pytest.raises(ValueError, match="client names"):
        save_tree(cuts, tmp_path, client_names=["a"])
