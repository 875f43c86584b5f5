"""Graphs, mixing matrices and the mixing rate rho (fl/topology.py): known answers and properties."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.config import ConfigError, TopologyConfig, load_config
from fedlora.fl.preflight import preflight
from fedlora.fl.topology import (GRAPHS, Topology, complete, erdos_renyi, is_connected, k_regular,
                                 metropolis_hastings, mixing_rate_rho, num_components, pairwise, read_edges, ring,
                                 torus, torus_shape, uniform_neighbour)

SETTINGS = [  # (config, n): every generator, several sizes and densities
    (TopologyConfig(graph="ring"), 7), (TopologyConfig(graph="ring"), 2),
    (TopologyConfig(graph="torus"), 12), (TopologyConfig(graph="torus"), 4),
    (TopologyConfig(graph="complete"), 6), (TopologyConfig(graph="kregular", k=3), 8),
    (TopologyConfig(graph="kregular", k=4), 9), (TopologyConfig(graph="erdos_renyi", p=0.5), 10),
    (TopologyConfig(graph="erdos_renyi", p=0.02), 10), (TopologyConfig(graph="erdos_renyi", p=1.0), 5),
    (TopologyConfig(graph="pairwise", q=0.3), 9), (TopologyConfig(graph="pairwise", q=1.0), 6),
]


def _edges_file(tmp_path, text: str):
    path = tmp_path / "edges.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _disagreement(x: np.ndarray) -> float:
    """Consensus distance: mean over clients of ||x_i - mean||^2 (clients are rows)."""
    return float(((x - x.mean(0)) ** 2).sum() / len(x))


@pytest.mark.parametrize("cfg,n", SETTINGS, ids=lambda v: getattr(v, "graph", str(v)))
def test_graphs_are_simple_and_undirected(cfg, n):
    topo = Topology(cfg, n, seed=0)
    for t in range(1, 30):
        adj = topo.adjacency(t)
        assert adj.shape == (n, n) and adj.dtype == bool
        assert np.array_equal(adj, adj.T) and not adj.diagonal().any()


@pytest.mark.parametrize("cfg,n", SETTINGS, ids=lambda v: getattr(v, "graph", str(v)))
def test_metropolis_hastings_symmetric_doubly_stochastic(cfg, n):
    """For every generated graph (many seeds and rounds): W = W^T, rows and columns sum to 1, W >= 0,
    and W_ij > 0 only on edges and the diagonal."""
    for seed in range(8):
        topo = Topology(cfg, n, seed=seed)
        for t in range(1, 12):
            adj = topo.adjacency(t)
            w = metropolis_hastings(adj)
            np.testing.assert_allclose(w, w.T, atol=0, rtol=0)
            np.testing.assert_allclose(w.sum(0), 1, atol=1e-12)
            np.testing.assert_allclose(w.sum(1), 1, atol=1e-12)
            assert (w >= 0).all()
            assert not (w[~(adj | np.eye(n, dtype=bool))]).any()


def test_metropolis_hastings_known_answer():
    """Path 0-1-2: degrees (1, 2, 1); W_01 = W_12 = 1/3, W_00 = W_22 = 2/3, W_11 = 1/3."""
    adj = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)
    expected = np.array([[2, 1, 0], [1, 1, 1], [0, 1, 2]]) / 3
    np.testing.assert_allclose(metropolis_hastings(adj), expected, atol=1e-15)


def test_uniform_is_row_stochastic_not_symmetric():
    adj = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)
    w = uniform_neighbour(adj)
    np.testing.assert_allclose(w.sum(1), 1)
    np.testing.assert_allclose(w[0], [0.5, 0.5, 0]) and np.testing.assert_allclose(w[1], [1 / 3] * 3)
    assert not np.allclose(w, w.T)


def test_complete_graph_uniform_weights_average_in_one_step():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5))
    w = uniform_neighbour(complete(7))
    np.testing.assert_allclose(w @ x, np.tile(x.mean(0), (7, 1)), rtol=0, atol=1e-14)
    assert _disagreement(w @ x) < 1e-28
    assert mixing_rate_rho([w]) == pytest.approx(0, abs=1e-12)


def test_generators_known_shapes():
    assert ring(5).sum(1).tolist() == [2] * 5 and is_connected(ring(5))
    assert torus_shape(12) == (3, 4) and torus(12).sum(1).tolist() == [4] * 12
    assert torus(4).sum(1).tolist() == [2] * 4  # 2 x 2: up = down and left = right
    assert k_regular(8, 3, np.random.default_rng(0)).sum(1).tolist() == [3] * 8
    assert erdos_renyi(6, 0.0, np.random.default_rng(0)).sum() == 0
    assert erdos_renyi(6, 1.0, np.random.default_rng(0)).sum() == 30
    assert pairwise(7, 1.0, np.random.default_rng(0)).sum(1).tolist().count(0) == 1  # odd n: one left out
    assert (pairwise(10, 0.5, np.random.default_rng(1)).sum(1) <= 1).all()


def test_time_varying_graphs_redrawn_and_seeded():
    topo = Topology(TopologyConfig(graph="erdos_renyi", p=0.3), 10, seed=3)
    assert topo.time_varying
    draws = [topo.adjacency(t) for t in range(1, 6)]
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])
    again = Topology(TopologyConfig(graph="erdos_renyi", p=0.3), 10, seed=3)
    assert all(np.array_equal(a, again.adjacency(t)) for t, a in enumerate(draws, 1))
    other = Topology(TopologyConfig(graph="erdos_renyi", p=0.3), 10, seed=4)
    assert not all(np.array_equal(a, other.adjacency(t)) for t, a in enumerate(draws, 1))
    static = Topology(TopologyConfig(graph="kregular", k=2), 10, seed=3)
    assert not static.time_varying and np.array_equal(static.adjacency(1), static.adjacency(7))


def test_sparse_draws_are_often_disconnected():
    topo = Topology(TopologyConfig(graph="erdos_renyi", p=0.05), 10, seed=0)
    components = [num_components(topo.adjacency(t)) for t in range(1, 50)]
    assert all(c > 1 for c in components)  # the hard regime: allowed, and detectable


def test_rho_static_known_answers():
    # MH on a ring of n: eigenvalues 1/3 + 2/3 cos(2 pi k / n); rho = max over k != 0 of their squares.
    for n in (4, 5, 8):
        lam = [1 / 3 + 2 / 3 * np.cos(2 * np.pi * k / n) for k in range(1, n)]
        assert Topology(TopologyConfig(graph="ring"), n, 0).rho() == pytest.approx(max(v * v for v in lam))
    assert Topology(TopologyConfig(graph="complete"), 6, 0).rho() == pytest.approx(0, abs=1e-12)  # MH: W = J
    disconnected = np.zeros((4, 4), dtype=bool)
    assert mixing_rate_rho([metropolis_hastings(disconnected)]) == pytest.approx(1.0)


def test_rho_decreases_with_density():
    rhos = [Topology(TopologyConfig(graph="erdos_renyi", p=p), 10, 0).rho(400) for p in (0.5, 0.2, 0.05, 0.02)]
    assert all(a < b for a, b in zip(rhos, rhos[1:])) and 0 < rhos[0] and rhos[-1] < 1


def test_repeated_mixing_decays_at_rho_rate_static():
    """No training, a static connected graph: the consensus distance decays like rho^t (log-slope)."""
    rng = np.random.default_rng(0)
    for cfg, n in [(TopologyConfig(graph="ring"), 9), (TopologyConfig(graph="kregular", k=3), 10),
                   (TopologyConfig(graph="torus"), 12)]:
        topo = Topology(cfg, n, seed=1)
        w, rho = topo.mixing(topo.adjacency(1)), topo.rho()
        x = rng.normal(size=(n, 16))
        dist = []
        for _ in range(60):
            x = w @ x
            dist.append(_disagreement(x))
        slope = np.polyfit(np.arange(30, 60), np.log(dist[30:]), 1)[0]
        assert slope == pytest.approx(np.log(rho), rel=0.02), cfg.graph
        assert all(d2 <= rho * d1 * (1 + 1e-4) for d1, d2 in zip(dist, dist[1:]))  # the one-step bound


def test_repeated_mixing_decays_at_rho_rate_time_varying():
    """ER(p) re-drawn every round, no training. The clients are exchangeable, so E[W^T (I-J) W] is
    rho (I - J) on the disagreement space and E[D_t+1 | D_t] = rho D_t exactly: the Monte Carlo mean
    of D_t over 400 independent runs must follow rho^t (log-slope within 5%)."""
    n, steps, runs = 10, 10, 400
    topo_cfg = TopologyConfig(graph="erdos_renyi", p=0.3)
    rho = Topology(topo_cfg, n, seed=10_000).rho(3000)
    rng = np.random.default_rng(0)
    mean = np.zeros(steps + 1)
    for run in range(runs):
        topo = Topology(topo_cfg, n, seed=run)
        x = rng.normal(size=(n, 8))
        x /= np.sqrt(_disagreement(x))  # D_0 = 1
        mean[0] += 1
        for t in range(1, steps + 1):
            x = topo.mixing(topo.adjacency(t)) @ x
            mean[t] += _disagreement(x)
    mean /= runs
    slope = np.polyfit(np.arange(steps + 1), np.log(mean), 1)[0]
    assert slope == pytest.approx(np.log(rho), rel=0.05)
    assert 0.1 < rho < 0.6  # a non-trivial rate for p = 0.3 on 10 clients


def test_edges_file(tmp_path):
    path = _edges_file(tmp_path, "# a path\n0 1\n1,2\n\n2 3  # last\n1 0\n")
    adj = read_edges(path, 5)
    assert adj.sum() == 6 and num_components(adj) == 2  # client 4 is isolated
    topo = Topology(TopologyConfig(graph="edges", edges_file=path), 5, 0)
    assert np.array_equal(topo.adjacency(3), adj)


@pytest.mark.parametrize("text,match", [("0 5\n", r"\[0, 5\)"), ("1 1\n", "two different"), ("0 1 2\n", "line 1")])
def test_edges_file_errors_name_the_line(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        read_edges(_edges_file(tmp_path, text), 5)


@pytest.mark.parametrize("overrides,match", [
    (["topology.graph=star"], "topology.graph"),
    (["topology.weights=max"], "topology.weights"),
    (["topology.p=1.5"], "topology.p"),
    (["topology.q=-0.1"], "topology.q"),
    (["topology.graph=edges"], "topology.edges_file"),
    (["topology.graph=torus", "partition.num_clients=7"], "torus"),
    (["topology.graph=kregular", "topology.k=3", "partition.num_clients=5"], "topology.k=3"),
    (["topology.graph=kregular", "topology.k=5", "partition.num_clients=5"], "topology.k=5"),
    (["topology.rho_samples=0"], "topology.rho_samples"),
])
def test_bad_topology_config_names_the_key(overrides, match):
    """Graph and weight names fail in load_config; the rest in preflight (fl/topology.check_topology)."""
    with pytest.raises(ConfigError, match=match):
        preflight(load_config(None, overrides))


def test_every_graph_name_builds(tmp_path):
    """Every name in GRAPHS dispatches to its own generator (none falls through to the edge file)."""
    expected = {"ring": ring(6), "torus": torus(6), "complete": complete(6)}
    edges = _edges_file(tmp_path, "0 1\n1 2\n")
    for graph in GRAPHS:
        adj = Topology(TopologyConfig(graph=graph, k=2, p=1.0, q=1.0, edges_file=edges), 6, 0).adjacency(1)
        assert adj.shape == (6, 6) and np.array_equal(adj, adj.T) and not adj.diagonal().any()
        if graph in expected:
            assert np.array_equal(adj, expected[graph]), graph
        elif graph == "kregular":
            assert (adj.sum(1) == 2).all()
        elif graph == "erdos_renyi":  # p = 1 draws every edge
            assert np.array_equal(adj, complete(6))
        elif graph == "pairwise":  # q = 1: every client meets exactly one other
            assert (adj.sum(1) == 1).all()
        else:
            assert int(adj.sum()) == 4
