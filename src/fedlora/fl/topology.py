"""Graphs over clients, their mixing matrices, and the mixing rate rho (config `topology`).

A graph is a symmetric boolean adjacency matrix with a zero diagonal (no self-loops: a client's
own weight is W_ii). A mixing matrix W is row-stochastic with W_ij > 0 only on edges and the
diagonal; client i's next adapter is sum_j W_ij x_j.

Weights:
- Metropolis-Hastings: W_ij = 1 / (1 + max(d_i, d_j)) on an edge, W_ii = 1 - sum_{j != i} W_ij.
  Symmetric and doubly stochastic on every graph, so gossip preserves the mean of the clients.
- uniform neighbour: W_ij = 1 / (1 + d_i) for j in N(i) and j = i. Row-stochastic only; not
  symmetric unless the graph is regular, so it drifts the mean towards well-connected clients.

Graphs (`graph`): ring, torus (2-D, rows x cols = n), complete, kregular, erdos_renyi (each edge
with probability p, re-drawn every round), pairwise (a random perfect matching re-drawn every
round, each pair meeting with probability q), edges (a file). Random draws come from generators
seeded by (seed, round), never from global state. Disconnected draws are allowed: sparse
time-varying graphs are the regime TAD-LoRA targets, and the engine reports them.

Mixing rate. With J = 11^T / n the averaging projector, X the stacked client vectors and
Xbar = J X, one gossip step contracts the disagreement in expectation as
    E || (I - J) W X ||^2  <=  rho || (I - J) X ||^2,
    rho = lambda_max( (I - J) E[W^T (I - J) W] (I - J) ).
For doubly stochastic W this is the second-largest eigenvalue of E[W^T W] (its largest is 1, on
the vector of ones), i.e. rho = 1 - spectral gap of E[W^T W] as in TAD-LoRA (arXiv 2602.00451);
the general form also covers row-stochastic (uniform) weights. rho = 1 means no contraction (a
static disconnected graph). E[.] is exact for static graphs and a Monte Carlo mean over
`samples` seeded draws for random ones.

>>> import numpy as np
>>> w = metropolis_hastings(ring(4))
>>> bool(np.allclose(w.sum(0), 1) and np.allclose(w, w.T))
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.sparse.csgraph import connected_components

from fedlora.config import ConfigError, TopologyConfig

GRAPHS = ("ring", "torus", "complete", "kregular", "erdos_renyi", "pairwise", "edges")
TIME_VARYING = ("erdos_renyi", "pairwise")
WEIGHTS = ("metropolis", "uniform")
_GRAPH_TAG = 3_000_017  # keeps graph draws apart from the engine's other seeded streams


# --- graphs ----------------------------------------------------------------------------------


def _from_edges(n: int, edges) -> np.ndarray:
    adj = np.zeros((n, n), dtype=bool)
    for i, j in edges:
        if i != j:
            adj[i, j] = adj[j, i] = True
    return adj


def ring(n: int) -> np.ndarray:
    """Client i talks to i - 1 and i + 1 (mod n)."""
    return _from_edges(n, [(i, (i + 1) % n) for i in range(n)])


def torus_shape(n: int) -> tuple[int, int]:
    """rows x cols = n with rows the largest divisor <= sqrt(n); ConfigError when rows would be 1."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    if rows < 2:
        raise ConfigError(f"topology.graph=torus needs partition.num_clients = rows x cols with rows, cols >= 2; "
                          f"{n} has no such factorization (use ring, or e.g. {max(4, n + (n % 2))} clients)")
    return rows, n // rows


def torus(n: int) -> np.ndarray:
    """A 2-D torus (wrap-around grid): each client talks to its 4 grid neighbours (fewer if a side is 2)."""
    rows, cols = torus_shape(n)
    edges = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            edges += [(i, r * cols + (c + 1) % cols), (i, ((r + 1) % rows) * cols + c)]
    return _from_edges(n, edges)


def complete(n: int) -> np.ndarray:
    return ~np.eye(n, dtype=bool)


def k_regular(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A k-regular graph: the circulant graph (k // 2 nearest on each side, plus the opposite client
    when k is odd) on a seeded random ordering of the clients. Needs k < n and n * k even."""
    if not 0 <= k < n or (n * k) % 2:
        raise ConfigError(f"topology.k={k}: a k-regular graph on {n} clients needs 0 <= k < {n} and n*k even")
    order = rng.permutation(n)
    edges = [(order[i], order[(i + s) % n]) for i in range(n) for s in range(1, k // 2 + 1)]
    if k % 2:
        edges += [(order[i], order[i + n // 2]) for i in range(n // 2)]
    return _from_edges(n, edges)


def erdos_renyi(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Each of the n(n-1)/2 edges present independently with probability p."""
    upper = np.triu(rng.random((n, n)) < p, k=1)
    return upper | upper.T


def pairwise(n: int, q: float, rng: np.random.Generator) -> np.ndarray:
    """A random perfect matching (one client left out when n is odd); each pair meets with probability q.

    Every client has at most one partner per round: ADF-LoRA's pairwise encounters (arXiv 2511.18291).
    """
    order = rng.permutation(n)
    meets = rng.random(n // 2) < q
    return _from_edges(n, [(order[2 * m], order[2 * m + 1]) for m in range(n // 2) if meets[m]])


def read_edges(path: str | Path, n: int) -> np.ndarray:
    """An undirected edge list: one 'i j' (or 'i,j') per line, client ids from 0; '#' starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"topology.edges_file: {path} does not exist")
    edges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].replace(",", " ").split()
        if not text:
            continue
        try:
            i, j = (int(v) for v in text)
        except ValueError:
            raise ConfigError(f"topology.edges_file {path}, line {number}: expected two client ids 'i j', "
                              f"got {line.strip()!r}") from None
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ConfigError(f"topology.edges_file {path}, line {number}: edge ({i}, {j}) needs two different "
                              f"client ids in [0, {n}) (partition.num_clients={n})")
        edges.append((i, j))
    return _from_edges(n, edges)


def num_components(adj: np.ndarray) -> int:
    return int(connected_components(adj.astype(np.int8), directed=False)[0])


def is_connected(adj: np.ndarray) -> bool:
    return num_components(adj) == 1


# --- mixing matrices -------------------------------------------------------------------------


def metropolis_hastings(adj: np.ndarray) -> np.ndarray:
    """W_ij = 1 / (1 + max(d_i, d_j)) on edges, W_ii = 1 - sum_j W_ij: symmetric, doubly stochastic."""
    deg = adj.sum(1)
    w = np.where(adj, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(1))
    return w


def uniform_neighbour(adj: np.ndarray) -> np.ndarray:
    """W_ij = 1 / (1 + d_i) for j in N(i) and j = i: row-stochastic, not symmetric in general."""
    w = (adj | np.eye(len(adj), dtype=bool)).astype(float)
    return w / w.sum(1, keepdims=True)


def mixing_rate_rho(matrices) -> float:
    """rho = lambda_max((I - J) E[W^T (I - J) W] (I - J)) over the given draws of W (see module doc)."""
    matrices = list(matrices)
    n = len(matrices[0])
    proj = np.eye(n) - np.full((n, n), 1.0 / n)
    expected = sum(w.T @ proj @ w for w in matrices) / len(matrices)
    rho = float(np.linalg.eigvalsh(proj @ expected @ proj)[-1])
    return min(max(rho, 0.0), 1.0)


# --- a configured topology -------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """The graph of round t and its mixing matrix, from config `topology`, n clients and a run seed.

    >>> topo = Topology(TopologyConfig(graph="erdos_renyi", p=0.5), n=5, seed=0)
    >>> topo.adjacency(3).shape, topo.time_varying
    ((5, 5), True)
    """

    cfg: TopologyConfig
    n: int
    seed: int

    def __post_init__(self):
        check_topology(self.cfg, self.n)

    @property
    def time_varying(self) -> bool:
        return self.cfg.graph in TIME_VARYING

    def adjacency(self, round_index: int) -> np.ndarray:
        """The graph used in round `round_index` (static graphs ignore the round)."""
        g, n = self.cfg.graph, self.n
        rng = np.random.default_rng([self.seed, round_index if self.time_varying else 0, _GRAPH_TAG])
        if g == "ring":
            return ring(n)
        if g == "torus":
            return torus(n)
        if g == "complete":
            return complete(n)
        if g == "kregular":
            return k_regular(n, self.cfg.k, rng)
        if g == "erdos_renyi":
            return erdos_renyi(n, self.cfg.p, rng)
        if g == "pairwise":
            return pairwise(n, self.cfg.q, rng)
        return read_edges(self.cfg.edges_file, n)

    def mixing(self, adj: np.ndarray) -> np.ndarray:
        return metropolis_hastings(adj) if self.cfg.weights == "metropolis" else uniform_neighbour(adj)

    def rho(self, samples: int | None = None) -> float:
        """The mixing rate: exact for static graphs, Monte Carlo over rounds 1..samples otherwise."""
        count = (samples or self.cfg.rho_samples) if self.time_varying else 1
        return mixing_rate_rho(self.mixing(self.adjacency(t)) for t in range(1, count + 1))


def check_topology(cfg: TopologyConfig, n: int) -> None:
    """ConfigError naming the key and the fix when `cfg` cannot build a graph on n clients."""
    checks = [
        (cfg.graph in GRAPHS, f"topology.graph: {cfg.graph!r} is not one of {', '.join(GRAPHS)}"),
        (cfg.weights in WEIGHTS, f"topology.weights: {cfg.weights!r} is not one of {', '.join(WEIGHTS)}"),
        (0 <= cfg.p <= 1, f"topology.p={cfg.p} must be an edge probability in [0, 1]"),
        (0 <= cfg.q <= 1, f"topology.q={cfg.q} must be a meeting probability in [0, 1]"),
        (cfg.rho_samples >= 1, "topology.rho_samples must be >= 1"),
        (cfg.graph != "edges" or cfg.edges_file,
         "topology.graph=edges needs topology.edges_file (a text file of 'i j' lines)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.graph == "torus":
        torus_shape(n)
    if cfg.graph == "kregular":
        k_regular(n, cfg.k, np.random.default_rng(0))
