"""FedTreeLoRA's client tree: one merge tree over clients, cut layer by layer from shallow to deep.

arXiv 2603.13282 (FedTreeLoRA). After warm-up each client k holds LoRA B factors per layer l.

    D^(l)_ij = dist(B_{l,i}, B_{l,j})          a layer's distance (its B tensors concatenated)
    D_ij     = (1/L) sum_l D^(l)_ij             the layer-averaged distance; AHC on D gives tree T
    Omega_l  = {c : c*_{l-1} <= c < min(N, c*_{l-1} + K)},   c*_0 = 1,  K = window
    phi(1)   = tau,   phi(c >= 2) = silhouette(D^(l), cut of T into c clusters)
    c*_l     = argmax_{c in Omega_l} phi(c)   (ties go to the smaller c)

Every partition is a cut of the same tree and c*_l never decreases, so groups nest: a trunk
shared by all clients in shallow layers, branches in deep ones. tau >= 1 keeps one cluster
everywhere (FedTreeLoRA reduces to FedIT). Silhouette needs 2 <= c <= N - 1; the window already
stops below N, so with N = 2 the only candidate is c = 1 (two singletons have no silhouette).

Choices the paper leaves open (defaults follow the same group's FedLEASE code where it has one):
`metric` frobenius (paper's note) or cosine (FedLEASE: 1 - cos); `linkage` average (FedLEASE);
window 2, tau 0.1. Ablation modes: "independent" (one tree per layer on D^(l), best c over
1..N-1, no monotonicity) and "fixed" (cut T at the same c at every layer).

Cluster ids are global: the same set of clients has the same id at every layer, numbered by
first appearance (layers shallow to deep, clients in order). Use np.unique(labels[l]) for a
layer's clusters. Example:

    >>> bs = [{"model.layers.0.q_proj.lora_B": np.eye(2) * s} for s in (1.0, 1.1, 5.0)]
    >>> per, avg = client_distances(bs, layer_index)
    >>> cuts = build_tree_cuts(per, avg, window=2, tau=0.1)
    >>> cuts.counts, cuts.labels.tolist()
    ([2], [[0, 0, 1]])
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.cluster.hierarchy import dendrogram, linkage as scipy_linkage
from scipy.spatial.distance import pdist, squareform
from sklearn.metrics import silhouette_score

from fedlora.jsonio import dumps

METRICS = ("frobenius", "cosine")
MODES = ("tree", "independent", "fixed")
# Methods valid on a precomputed distance matrix (ward also for Euclidean/Frobenius distances).
LINKAGES = ("average", "complete", "single", "weighted", "ward")

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int:
    """'model.layers.12.self_attn.q_proj.lora_B' -> 12 (also '.h.N.', '.blocks.N.', '.layer.N.')."""
    m = _LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"cannot find a layer index in parameter name {name!r}")
    return int(m.group(1))


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly bf16 or on GPU
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def _pairwise(x: np.ndarray, metric: str) -> np.ndarray:
    """[N, P] rows -> [N, N] distances. Cosine: both-zero rows are at 0, one zero row at 1."""
    if metric == "frobenius":
        return squareform(pdist(x, "euclidean"))
    norms = np.linalg.norm(x, axis=1)
    unit = x / np.where(norms > 0, norms, 1.0)[:, None]
    d = 1.0 - unit @ unit.T
    zero = norms == 0
    d[np.ix_(zero, zero)] = 0.0
    d = np.clip((d + d.T) / 2, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    return d


def client_distances(
    b_by_client: Sequence[dict[str, object]],
    layer_of: Callable[[str], int] = layer_index,
    metric: str = "frobenius",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer distances [L, N, N] (layers in increasing index order) and their mean [N, N].

    A layer's distance concatenates that layer's B tensors (e.g. q_proj and v_proj):
    frobenius = ||B_i - B_j||_F, cosine = 1 - <B_i, B_j> / (|B_i| |B_j|). Pass B factors only.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if len(b_by_client) < 1:
        raise ValueError("need at least one client")
    keys = sorted(b_by_client[0])
    if not keys:
        raise ValueError("client 0 has no B tensors")
    shapes = {k: tuple(np.shape(_to_numpy(b_by_client[0][k]))) for k in keys}
    for i, b in enumerate(b_by_client):
        if sorted(b) != keys:
            missing, extra = sorted(set(keys) - set(b)), sorted(set(b) - set(keys))
            raise ValueError(f"client {i} keys differ from client 0: missing {missing[:3]}, extra {extra[:3]}")
        for k in keys:
            if tuple(np.shape(_to_numpy(b[k]))) != shapes[k]:
                raise ValueError(f"client {i}: {k} has shape {np.shape(_to_numpy(b[k]))}, client 0 has {shapes[k]}")
    by_layer: dict[int, list[str]] = {}
    for k in keys:
        by_layer.setdefault(int(layer_of(k)), []).append(k)
    per_layer = []
    for layer in sorted(by_layer):
        rows = np.stack([np.concatenate([_to_numpy(b[k]).ravel() for k in by_layer[layer]]) for b in b_by_client])
        per_layer.append(_pairwise(rows, metric))
    per = np.stack(per_layer)
    return per, per.mean(axis=0)


@dataclass
class TreeCuts:
    """The merge tree and its layer-wise cuts.

    linkage: [N-1, 4] scipy linkage of the layer-averaged distance (the shared tree T).
    labels: [L, N] global cluster id per layer and client. counts: clusters per layer.
    scores: per layer, {candidate c: score} (tau for c = 1, silhouette for 2 <= c <= N-1, None if undefined).
    layer_linkages: [L, N-1, 4] per-layer trees, only in mode "independent".
    """

    linkage: np.ndarray
    labels: np.ndarray
    counts: list[int]
    scores: list[dict]
    params: dict = field(default_factory=dict)
    layer_linkages: np.ndarray | None = None


def _tree(d: np.ndarray, method: str) -> np.ndarray:
    if len(d) < 2:
        return np.zeros((0, 4))
    return scipy_linkage(squareform(d, checks=False), method=method)


def _cut(z: np.ndarray, n: int, c: int) -> list[frozenset]:
    """Exactly c clusters: apply the first n - c merges of z (so cuts at larger c refine smaller ones)."""
    groups: dict[int, frozenset] = {i: frozenset([i]) for i in range(n)}
    for k in range(n - c):
        a, b = int(z[k, 0]), int(z[k, 1])
        groups[n + k] = groups.pop(a) | groups.pop(b)
    return list(groups.values())


def _score(d: np.ndarray, parts: list[frozenset], tau: float) -> float | None:
    n, c = len(d), len(parts)
    if c == 1:
        return float(tau)
    if not 2 <= c <= n - 1:
        return None
    lab = np.empty(n, dtype=int)
    for j, members in enumerate(parts):
        lab[list(members)] = j
    return float(silhouette_score(d, lab, metric="precomputed"))


def _best(d: np.ndarray, z: np.ndarray, cands: range, tau: float) -> tuple[list[frozenset], dict]:
    scores = {c: _score(d, _cut(z, len(d), c), tau) for c in cands}
    best = max(cands, key=lambda c: (-np.inf if scores[c] is None else scores[c], -c))
    return _cut(z, len(d), best), scores


def _check_distances(per_layer: np.ndarray, averaged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    per, avg = np.asarray(per_layer, dtype=np.float64), np.asarray(averaged, dtype=np.float64)
    if per.ndim != 3 or per.shape[1] != per.shape[2] or per.shape[0] < 1:
        raise ValueError(f"per_layer must be [L, N, N] with L >= 1, got shape {per.shape}")
    if avg.shape != per.shape[1:]:
        raise ValueError(f"averaged must be [N, N] = {per.shape[1:]}, got {avg.shape}")
    for name, d in (("per_layer", per), ("averaged", avg)):
        if not np.all(np.isfinite(d)) or np.any(d < 0):
            raise ValueError(f"{name} must be finite and non-negative")
        if not np.allclose(d, np.swapaxes(d, -1, -2), atol=1e-8):
            raise ValueError(f"{name} must be symmetric")
    per, avg = per.copy(), avg.copy()
    per[:, np.arange(per.shape[1]), np.arange(per.shape[1])] = 0.0
    np.fill_diagonal(avg, 0.0)
    return per, avg


def build_tree_cuts(
    per_layer: np.ndarray,
    averaged: np.ndarray,
    window: int = 2,
    tau: float = 0.1,
    linkage: str = "average",
    mode: str = "tree",
    fixed_clusters: int | None = None,
) -> TreeCuts:
    """Cut the client tree at every layer (see the module docstring for the rule and the modes)."""
    per, avg = _check_distances(per_layer, averaged)
    n_layers, n = per.shape[0], per.shape[1]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    if int(window) != window or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window}")
    if mode == "fixed" and (fixed_clusters is None or not 1 <= fixed_clusters <= n):
        raise ValueError(f"mode 'fixed' needs 1 <= fixed_clusters <= N={n}, got {fixed_clusters}")
    z = _tree(avg, linkage)
    parts, scores, layer_z, prev = [], [], [], 1
    for layer in range(n_layers):
        d = per[layer]
        if n == 1:
            p, s = [frozenset([0])], {1: float(tau)}
        elif mode == "tree":
            p, s = _best(d, z, range(prev, min(n, prev + window)), tau)
        elif mode == "fixed":
            p = _cut(z, n, fixed_clusters)
            s = {fixed_clusters: _score(d, p, tau)}
        else:
            layer_z.append(_tree(d, linkage))
            p, s = _best(d, layer_z[-1], range(1, n), tau)
        prev = len(p)
        parts.append(p)
        scores.append(s)
    labels, ids = np.empty((n_layers, n), dtype=int), {}
    for layer, p in enumerate(parts):
        for i in range(n):
            members = next(m for m in p if i in m)
            labels[layer, i] = ids.setdefault(members, len(ids))
    params = {"mode": mode, "window": int(window), "tau": float(tau), "linkage": linkage,
              "fixed_clusters": fixed_clusters}
    return TreeCuts(z, labels, [len(p) for p in parts], scores, params,
                    np.stack(layer_z) if layer_z else None)


def save_tree(cuts: TreeCuts, folder: Path, client_names: Sequence[str] | None = None,
              layer_ids: Sequence[int] | None = None) -> tuple[Path, Path]:
    """Write client_tree.json (tree, cuts, scores, members) and client_tree.png (dendrogram + layer grid)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_layers, n = cuts.labels.shape
    names = list(client_names) if client_names is not None else [f"client {i}" for i in range(n)]
    layers = list(layer_ids) if layer_ids is not None else list(range(n_layers))
    if len(names) != n or len(layers) != n_layers:
        raise ValueError(f"need {n} client names and {n_layers} layer ids, got {len(names)} and {len(layers)}")
    record = {
        "params": cuts.params, "clients": names, "layers": [int(x) for x in layers],
        "linkage": cuts.linkage.tolist(), "counts": [int(c) for c in cuts.counts],
        "labels": cuts.labels.tolist(),
        "scores": [{str(c): s for c, s in sc.items()} for sc in cuts.scores],
        "clusters": [{str(g): [names[i] for i in np.flatnonzero(row == g)] for g in np.unique(row)}
                     for row in cuts.labels],
    }
    if cuts.layer_linkages is not None:
        record["layer_linkages"] = cuts.layer_linkages.tolist()
    json_path, png_path = folder / "client_tree.json", folder / "client_tree.png"
    json_path.write_text(dumps(record, indent=1))  # strict JSON: a NaN score is null
    _draw(cuts, names, layers, png_path)
    return json_path, png_path


def load_tree(path: Path) -> TreeCuts:
    """Read back what save_tree wrote (for resume)."""
    rec = json.loads(Path(path).read_text())
    ll = rec.get("layer_linkages")
    return TreeCuts(np.asarray(rec["linkage"], dtype=float).reshape(-1, 4), np.asarray(rec["labels"], dtype=int),
                    rec["counts"], [{int(c): float("nan") if s is None else s for c, s in sc.items()} for sc in rec["scores"]], rec["params"],
                    None if ll is None else np.asarray(ll, dtype=float))


def _draw(cuts: TreeCuts, names: list[str], layers: list, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, leaves the global backend alone

    n_layers, n = cuts.labels.shape
    fig = Figure(figsize=(4 + 0.35 * n_layers, 1.5 + 0.35 * n), layout="tight")
    ax_t, ax_g = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, max(1.0, n_layers / 8)]})
    if n >= 2:  # leaves sit at y = 10 i + 5, bottom to top
        order = dendrogram(cuts.linkage, orientation="left", no_labels=True, ax=ax_t, color_threshold=0)["leaves"]
    else:
        order = [0]
    ax_t.set_ylim(0, 10 * n)
    ax_t.set_yticks(10 * np.arange(n) + 5, [names[i] for i in order])
    ax_t.set_title(f"client tree ({cuts.params.get('linkage', '')})")
    grid = cuts.labels[:, order].T  # [N (leaf order), L]
    ax_g.imshow(grid % 20, cmap="tab20", vmin=0, vmax=19, aspect="auto", origin="lower", interpolation="nearest",
                extent=(-0.5, n_layers - 0.5, 0, 10 * n))
    if n * n_layers <= 600:
        for r in range(n):
            for c in range(n_layers):
                ax_g.text(c, 10 * r + 5, str(grid[r, c]), ha="center", va="center", fontsize=6)
    ax_g.set_yticks([])
    step = max(1, n_layers // 16)
    ax_g.set_xticks(range(0, n_layers, step), [str(layers[i]) for i in range(0, n_layers, step)])
    ax_g.set_xlabel("layer (shallow -> deep)")
    ax_g.set_title(f"cluster id per layer ({cuts.params.get('mode', '')}); counts " +
                   " ".join(map(str, cuts.counts)), fontsize=8)
    fig.savefig(path, dpi=120)
