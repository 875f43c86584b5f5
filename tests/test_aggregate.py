"""Robust aggregation: known answers, reference implementations, and one contract suite over every rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from fedlora.fl.aggregate import (  # noqa: E402
    PRE,
    RULE,
    aggregate_tensors,
    arc,
    arc_k,
    available,
    bucketing,
    build_chain,
    centered_clipping,
    clip,
    geometric_median,
    krum,
    mda,
    meamed,
    mean,
    median,
    multi_krum,
    nnm,
    trimmed_mean,
)

X3 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)  # ByzFL's KAT matrix
RULES = available(RULE)
# Options that make a rule's contract meaningful at the test scale (tau is absolute).
TEST_OPTIONS = {"centered_clipping": {"tau": 1.0, "iterations": 5}}


def col(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).unsqueeze(1)


def run(name: str, x: torch.Tensor, f: int, **options):
    chain = build_chain([{name: options or TEST_OPTIONS.get(name, {})}], f)
    return chain(x, chain.init(x.shape[1], x.dtype))[0]


def test_registry_lists_every_rule_and_preaggregator():
    assert RULES == sorted(
        ["centered_clipping", "geometric_median", "krum", "mda", "meamed", "mean", "median", "multi_krum", "trimmed_mean"]
    )
    assert available(PRE) == ["arc", "bucketing", "clip", "nnm"]


# ---------------------------------------------------------------- known answers


def test_mean_known_answers():
    assert mean(X3).tolist() == [4.0, 5.0, 6.0]
    assert mean(col(1, 2, 3), torch.tensor([1.0, 1.0, 2.0])).tolist() == [9 / 4]


def test_median_known_answers():
    assert median(X3).tolist() == [4.0, 5.0, 6.0]
    assert median(col(1, 2, 10, 20)).tolist() == [6.0]  # midpoint for even n


def test_trimmed_mean_known_answers():
    assert trimmed_mean(X3, 1).tolist() == [4.0, 5.0, 6.0]
    x = torch.tensor([[0.0, -50.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [100.0, 4.0]], dtype=torch.float64)
    assert trimmed_mean(x, 1).tolist() == [2.0, 2.0]


def test_meamed_known_answer():
    # median 2.5; the 3 values closest to it are 1, 2, 3
    assert meamed(col(1, 2, 3, 100), 1).tolist() == [2.0]


def test_geometric_median_known_answers():
    # collinear and symmetric: the minimiser is the middle point (ByzFL's 3.787.. is its T=3 iterate)
    assert torch.allclose(geometric_median(X3), torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64))
    # equilateral triangle: the minimiser is the centroid (Fermat point)
    tri = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3.0)]], dtype=torch.float64)
    assert torch.allclose(geometric_median(tri), tri.mean(0), atol=1e-5)


def test_krum_and_multi_krum_known_answers():
    x = col(0, 1, 2, 4, 100)  # f=1: 2 neighbours; scores 5, 2, 5, 13, huge
    assert krum(x, 1).tolist() == [1.0]
    assert multi_krum(x, 1, m=2).tolist() == [0.5]  # x1, then x0 (ties with x2; lower index wins)
    assert multi_krum(x, 1).tolist() == [1.75]  # m = n - f = 4: drops only 100


def test_mda_known_answer():
    assert mda(col(0, 1, 2, 10), 1).tolist() == [1.0]
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [6.0, 5.0]], dtype=torch.float64)
    assert mda(x, 2).tolist() == [1 / 3, 1 / 3]


def test_mda_chunking_does_not_change_the_answer():
    x = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(mda(x, 3, chunk=5), mda(x, 3))


def test_centered_clipping_known_answers_and_history():
    x = col(0, 1, 10)
    chain = build_chain([{"centered_clipping": {"tau": 2.0}}], f=1)
    state = chain.init(1, torch.float64)
    before = {k: v.clone() for k, v in state.items()}
    v1, state1 = chain(x, state)
    assert v1.item() == pytest.approx(4 / 3)  # median 1; clipped diffs -1, 0, 2
    assert all(torch.equal(before[k], state[k]) for k in state)  # state in, new state out
    v2, state2 = chain(x, state1)
    assert v2.item() == pytest.approx(13 / 9)  # from v = 4/3: diffs -4/3, -1/3, 2 (clipped)
    assert int(state2["0.centered_clipping.rounds"]) == 2
    # from v = 0 (ByzFL's start): diffs 0, 1, 10 clipped to 0, 1, 1
    assert centered_clipping(x, torch.zeros(1, dtype=torch.float64), tau=1.0).item() == pytest.approx(2 / 3)
    zeros = build_chain([{"centered_clipping": {"tau": 1.0, "first_round": "zeros"}}], f=1)
    assert zeros(x)[0].item() == pytest.approx(2 / 3)


def test_nnm_known_answer():
    expected = [[2.5, 3.5, 4.5], [2.5, 3.5, 4.5], [5.5, 6.5, 7.5]]
    assert torch.allclose(nnm(X3, 1), torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(nnm(X3, 0), X3.mean(0).expand(3, 3))


def test_bucketing_known_answer():
    x = torch.arange(10.0, dtype=torch.float64).reshape(5, 2)
    out = bucketing(x, 2, torch.Generator().manual_seed(3))
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(3))
    expected = torch.stack([x[perm[0:2]].mean(0), x[perm[2:4]].mean(0), x[perm[4:]].mean(0)])
    assert torch.equal(out, expected)
    again = bucketing(x, 2, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # seeded: reproducible
    with pytest.raises(ValueError, match="Generator"):
        bucketing(x, 2, None)


def test_clip_known_answer():
    expected = [[0.53452248, 1.06904497, 1.60356745], [0.91168461, 1.13960576, 1.36752692],
                [1.00514142, 1.14873305, 1.29232469]]  # ByzFL Clipping(2)
    assert torch.allclose(clip(X3, 2.0), torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(clip(X3, 100.0), X3)


def test_arc_known_answer():
    expected = X3.clone()
    expected[2] = torch.tensor([4.41004009, 5.04004582, 5.67005155], dtype=torch.float64)  # ByzFL ARC(1)
    assert torch.allclose(arc(X3, 1), expected)
    assert torch.equal(arc(X3, 0), X3)  # k = 0: nothing clipped
    assert [arc_k(3, 1), arc_k(10, 3), arc_k(10, 0), arc_k(7, 3)] == [1, 4, 0, 3]


# ---------------------------------------------------------------- reference implementations


@pytest.mark.parametrize("n", [7, 8])
def test_median_matches_torch(n):
    x = torch.randn(n, 50, generator=torch.Generator().manual_seed(n))
    ref = torch.median(x, dim=0).values if n % 2 else torch.quantile(x, 0.5, dim=0)
    assert torch.allclose(median(x), ref)


@pytest.mark.parametrize("n,f", [(5, 1), (10, 2), (10, 4)])
def test_trimmed_mean_and_meamed_match_references(n, f):
    from scipy import stats

    x = torch.randn(n, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * n + f))
    assert np.allclose(trimmed_mean(x, f).numpy(), stats.trim_mean(x.numpy(), f / n, axis=0))
    ref = []
    for column in x.T.tolist():  # per coordinate: the n - f values closest to the median
        med = float(np.median(column))
        ref.append(np.mean(sorted(column, key=lambda v: abs(v - med))[: n - f]))
    assert np.allclose(meamed(x, f).numpy(), ref)


def test_geometric_median_matches_scipy():
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(9, 4, dtype=torch.float64, generator=g), 20 + torch.zeros(3, 4, dtype=torch.float64)])
    pts = x.numpy()

    def objective(z):
        return np.linalg.norm(pts - z, axis=1).sum()

    def gradient(z):
        diff = z - pts
        return (diff / np.linalg.norm(diff, axis=1, keepdims=True)).sum(0)

    ref = minimize(objective, pts.mean(0), jac=gradient, method="BFGS", options={"gtol": 1e-10}).x
    ours = geometric_median(x, f=3).numpy()
    assert objective(ours) <= objective(ref) + 1e-8
    assert np.linalg.norm(ours - ref) < 1e-4


# ---------------------------------------------------------------- contract suite over every rule


def honest_and_outliers(n=11, f=3, d=6, sign=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    honest = 5.0 + torch.randn(n - f, d, dtype=torch.float64, generator=g)
    outliers = torch.full((f, d), sign * 1e6, dtype=torch.float64)
    return torch.cat([outliers, honest]), honest


@pytest.mark.parametrize("name", RULES)
def test_contract_permutation_invariance(name):
    x = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(run(name, x, 2), run(name, x[perm], 2), atol=1e-10)


@pytest.mark.parametrize("name", RULES)
def test_contract_identical_inputs(name):
    v = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(run(name, v.expand(7, 3).clone(), 2), v, atol=1e-12)


REDUCES_TO_MEAN_AT_F0 = {"mean", "trimmed_mean", "meamed", "multi_krum", "mda", "centered_clipping"}


@pytest.mark.parametrize("name", RULES)
def test_contract_f0_is_the_mean_only_where_it_should(name):
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 5.0], [9.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    options = {"tau": 1e9} if name == "centered_clipping" else {}
    chain = build_chain([{name: options}], f=0)
    state = chain.init(2, torch.float64)
    if name == "centered_clipping":  # history from a previous mean; any start gives the mean with huge tau
        state["0.centered_clipping.v"], state["0.centered_clipping.rounds"] = x.mean(0), torch.tensor(1)
    out = chain(x, state)[0]
    assert torch.allclose(out, x.mean(0)) == (name in REDUCES_TO_MEAN_AT_F0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", RULES)
def test_contract_breakdown(name, sign):
    x, honest = honest_and_outliers(sign=sign)
    center = honest.mean(0)
    spread = (honest - center).norm(dim=1).max()
    error = (run(name, x, 3) - center).norm()
    if name == "mean":
        assert error > 1e4  # the test has power: the plain mean breaks
    else:
        assert error < 10 * spread, f"{name}: error {error:.3g} vs spread {spread:.3g}"


@pytest.mark.parametrize("pre", [["arc"], ["nnm"], ["arc", "nnm"], [{"clip": {"threshold": 20.0}}]])
@pytest.mark.parametrize("name", ["trimmed_mean", "geometric_median", "krum", "meamed"])
def test_breakdown_with_preaggregators(pre, name):
    x, honest = honest_and_outliers()
    center = honest.mean(0)
    spread = (honest - center).norm(dim=1).max()
    out, _ = build_chain([*pre, name], f=3)(x)
    assert (out - center).norm() < 10 * spread


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", RULES)
def test_contract_dtype_and_device(name, dtype):
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    chain = build_chain([{name: TEST_OPTIONS.get(name, {})}], f=2)
    out, state = chain(x, chain.init(4))
    assert out.dtype == dtype and out.device == x.device and out.shape == (4,)
    if dtype == torch.bfloat16:  # computed in float32, cast back
        assert torch.allclose(out.float(), chain(x.float())[0].to(dtype).float())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", RULES)
def test_contract_device(name, device):
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)).to(device)
    chain = build_chain([{"bucketing": {"s": 1}}, {name: TEST_OPTIONS.get(name, {})}], f=2)
    out, state = chain(x, chain.init(4, device=device), generator=torch.Generator().manual_seed(0))
    assert out.device == x.device
    assert all(v.device.type in (device, "cpu") for v in state.values())


@pytest.mark.parametrize("name", RULES)
def test_contract_invalid_f(name):
    with pytest.raises(ValueError, match="f"):
        build_chain([name], f=-1)
    with pytest.raises(ValueError):
        build_chain([name], f=1.5)
    if name == "mean":
        build_chain([name], f=3).validate(6)  # mean has no condition on f
        return
    chain = build_chain([name], f=3)
    with pytest.raises(ValueError, match=rf"{name} needs n > 2f"):
        chain.validate(6)
    with pytest.raises(ValueError, match=rf"{name} needs"):
        chain(torch.randn(6, 2))


# ---------------------------------------------------------------- chains and validation messages


def test_chain_arc_nnm_trimmed_mean():
    chain = build_chain(["arc", "nnm", "trimmed_mean"], f=2)
    assert chain.names == ["arc", "nnm", "trimmed_mean"]
    chain.validate(5)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    expected = trimmed_mean(nnm(arc(x, 2), 2), 2)
    assert torch.allclose(chain(x, chain.init(8))[0], expected)
    with pytest.raises(ValueError, match=r"arc needs n > 2f \(n=4, f=2\)"):
        chain.validate(4)


def test_validation_messages():
    with pytest.raises(ValueError, match=r"^krum needs n > 2f \+ 2 \(n=5, f=2\)$"):
        build_chain(["krum"], f=2).validate(5)
    build_chain(["krum"], f=2).validate(7)
    with pytest.raises(ValueError, match=r"multi_krum needs m <= n"):
        build_chain([{"multi_krum": {"m": 9}}], f=1).validate(8)
    with pytest.raises(ValueError, match=r"mda needs C\(n, f\) <= max_subsets=20000 \(n=30, f=5\)"):
        build_chain(["mda"], f=5).validate(30)
    build_chain([{"mda": {"max_subsets": 200_000}}], f=5).validate(30)
    with pytest.raises(ValueError, match=r"krum needs n > 2f \+ 2 \(n=5 after bucketing, f=2\)"):
        build_chain([{"bucketing": {"s": 2}}, "krum"], f=2).validate(10)
    with pytest.raises(ValueError, match="unknown aggregator 'fedavg'; registered: arc, bucketing"):
        build_chain(["fedavg"], f=0)
    with pytest.raises(ValueError, match="last item of a chain must be a rule"):
        build_chain(["median", "nnm"], f=0)
    with pytest.raises(ValueError, match="only pre-aggregators may precede"):
        build_chain(["median", "mean"], f=0)
    with pytest.raises(ValueError, match="bad options for krum"):
        build_chain([{"krum": {"tau": 1}}], f=0)
    with pytest.raises(ValueError, match="threshold must be a positive"):
        build_chain([{"clip": {"threshold": -1}}, "mean"], f=0)
    with pytest.raises(ValueError, match="at least a rule"):
        build_chain([], f=0)


def test_chain_with_bucketing_needs_generator_and_is_reproducible():
    chain = build_chain([{"bucketing": {"s": 2}}, "median"], f=1)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="Generator"):
        chain(x)
    a, _ = chain(x, generator=torch.Generator().manual_seed(5))
    b, _ = chain(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_non_finite_rows_are_refused():
    x = torch.zeros(5, 2)
    x[3, 1] = float("nan")
    x[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite values in rows \[1, 3\]"):
        build_chain(["median"], f=1)(x)


# ---------------------------------------------------------------- dicts of tensors and weights


def payloads(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"b.lora_B": torch.randn(3, 2, generator=g), "a.lora_A": torch.randn(4, generator=g).to(torch.float64)}
            for _ in range(n)]


def test_aggregate_tensors_round_trips_structure():
    ps = payloads()
    out, state = aggregate_tensors(build_chain(["mean"], f=0), ps)
    assert set(out) == set(ps[0])
    for k in ps[0]:
        assert out[k].shape == ps[0][k].shape and out[k].dtype == ps[0][k].dtype
        assert torch.allclose(out[k], torch.stack([p[k] for p in ps]).mean(0).to(out[k].dtype))
    med, _ = aggregate_tensors(build_chain(["median"], f=2), ps)
    assert torch.allclose(med["b.lora_B"], torch.stack([p["b.lora_B"] for p in ps]).median(0).values)


def test_aggregate_tensors_state_and_weights():
    ps = payloads()
    chain = build_chain([{"centered_clipping": {"tau": 0.5}}], f=1)
    _, state = aggregate_tensors(chain, ps)
    assert state["0.centered_clipping.v"].shape == (10,)
    _, state = aggregate_tensors(chain, ps, state=state)
    assert int(state["0.centered_clipping.rounds"]) == 2
    w = [1.0, 1.0, 1.0, 1.0, 1e9]  # a client inflating its example count
    weighted, _ = aggregate_tensors(build_chain(["mean"], f=0), ps, weights=w)
    assert torch.allclose(weighted["a.lora_A"], ps[4]["a.lora_A"], atol=1e-6)
    robust, _ = aggregate_tensors(build_chain(["trimmed_mean"], f=1), ps, weights=w)
    plain, _ = aggregate_tensors(build_chain(["trimmed_mean"], f=1), ps)
    assert all(torch.equal(robust[k], plain[k]) for k in plain)  # robust rules ignore weights
    with pytest.raises(ValueError, match="weights"):
        aggregate_tensors(build_chain(["mean"], f=0), ps, weights=[1.0, -1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="pre-aggregator changes n"):
        aggregate_tensors(build_chain(["bucketing", "mean"], f=0), ps, weights=[1.0] * 5,
                          generator=torch.Generator().manual_seed(0))


def test_aggregate_tensors_rejects_mismatched_payloads():
    ps = payloads()
    ps[2] = {**ps[2], "c": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"payload 2 keys differ.*extra \['c'\]"):
        aggregate_tensors(build_chain(["mean"], f=0), ps)
    ps = payloads()
    ps[1]["b.lora_B"] = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"payload 1\['b.lora_B'\] is \(2, 3\)"):
        aggregate_tensors(build_chain(["mean"], f=0), ps)
