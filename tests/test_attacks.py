"""Byzantine attacks, label flipping, malformed payloads, Byzantine selection, worker momentum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlora.fl.attacks import (
    DEFAULT_GRID,
    MALFORMED_KINDS,
    attack,
    available_attacks,
    baruch_z,
    choose_byzantine,
    flip_labels,
    line_search,
    malformed,
)
from fedlora.fl.momentum import STEP_KEY, momentum_init, momentum_update
from fedlora.fl.payload import PayloadError, decode, encode, spec_of

torch.set_num_threads(1)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])


def cw_median(x: torch.Tensor) -> torch.Tensor:
    """Reference coordinate-wise median (lower median for even n), written with torch.median."""
    return torch.median(x, dim=0).values


def deviation(honest: torch.Tensor, byz: torch.Tensor, agg) -> float:
    return float(torch.linalg.vector_norm(agg(torch.cat([honest, byz])) - honest.mean(0)))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def honest_matrix(h: int = 8, d: int = 20, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    return 1.0 + torch.randn(h, d, generator=g)  # nonzero mean so IPM has something to flip


# --- update attacks ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", available_attacks())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("f", [0, 1, 3])
def test_every_attack_shape_and_dtype(name, dtype, f):
    honest = honest_matrix(5, 7).to(dtype)
    out = attack(name, honest, f, gen(), aggregate=cw_median)
    assert out.shape == (f, 7) and out.dtype == dtype


def test_sign_flip_and_ipm_known_answers():
    assert attack("sign_flip", X, 2, gen()).tolist() == [[-4.0, -5.0, -6.0]] * 2
    assert attack("sign_flip", X, 1, gen(), scale=2.0).tolist() == [[-8.0, -10.0, -12.0]]
    torch.testing.assert_close(attack("ipm", X, 2, gen()), torch.tensor([[-0.4, -0.5, -0.6]] * 2))  # tau=0.1
    torch.testing.assert_close(attack("ipm", X, 1, gen(), tau=3.0), torch.tensor([[-12.0, -15.0, -18.0]]))


def test_alie_known_answers():
    # mean [4, 5, 6], sample std (ddof=1) [3, 3, 3]
    torch.testing.assert_close(attack("alie", X, 1, gen(), z=1.5), torch.tensor([[-0.5, 0.5, 1.5]]))
    # z from Baruch: n = 3 + 2 = 5, s = floor(3.5) - 2 = 1, z = Phi^-1(4/5) = 0.8416212335729143
    z = 0.8416212335729143
    expected = torch.tensor([[4 - 3 * z, 5 - 3 * z, 6 - 3 * z]] * 2)
    torch.testing.assert_close(attack("alie", X, 2, gen()), expected)
    # one honest client: no spread, ALIE sends its vector
    assert attack("alie", X[:1], 1, gen(), z=2.0).tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize(
    "n, f, z",
    [
        (10, 2, 0.2533471031357997),  # s = 4, Phi^-1(0.6)
        (50, 12, 0.5828415072712162),  # s = 14, Phi^-1(0.72)
        (12, 4, 0.6744897501960817),  # s = 3, Phi^-1(0.75)
        (8, 1, 0.0),  # s = 4, Phi^-1(0.5)
    ],
)
def test_baruch_z_known_answers(n, f, z):
    assert baruch_z(n, f) == pytest.approx(z, abs=1e-12)


def test_baruch_z_undefined_raises():
    with pytest.raises(ValueError, match="undefined"):
        baruch_z(2, 0)  # s = 2, (n - s)/n = 0
    with pytest.raises(ValueError, match="undefined"):
        baruch_z(4, 3)  # s = 0, (n - s)/n = 1


def test_gaussian_statistics_and_reproducibility():
    honest = torch.zeros(2, 4000)
    out = attack("gaussian", honest, 4, gen(1), mu=1.0, sigma=2.0)
    assert abs(out.mean().item() - 1.0) < 0.05 and abs(out.std().item() - 2.0) < 0.05
    assert torch.equal(out, attack("gaussian", honest, 4, gen(1), mu=1.0, sigma=2.0))
    assert not torch.equal(out[0], out[1])  # fresh noise per Byzantine client
    with pytest.raises(ValueError, match="Generator"):
        attack("gaussian", honest, 1, None)


def test_mimic_copies_an_honest_row():
    assert torch.equal(attack("mimic", X, 2, gen()), X[[0, 0]])
    assert torch.equal(attack("mimic", X, 1, gen(), worker=2), X[[2]])
    spread = torch.tensor([[0.0, 0.0], [0.1, 0.0], [-0.1, 0.0], [5.0, 0.1]])
    assert torch.equal(attack("mimic", spread, 1, gen(), worker="max_variance"), spread[[3]])
    with pytest.raises(ValueError, match="honest index"):
        attack("mimic", X, 1, gen(), worker=3)


def test_inf_attack():
    assert torch.isinf(attack("inf", X, 2, gen())).all()


@pytest.mark.parametrize("name, base, key", [("optimal_ipm", "ipm", "tau"), ("optimal_alie", "alie", "z")])
def test_optimal_attack_beats_every_grid_value(name, base, key):
    honest, f = honest_matrix(8, 20), 3
    best = deviation(honest, attack(name, honest, f, gen(), aggregate=cw_median), cw_median)
    for value in DEFAULT_GRID:
        fixed = attack(base, honest, f, gen(), **{key: value})
        assert best >= deviation(honest, fixed, cw_median) - 1e-6, value
    assert best > deviation(honest, attack(base, honest, f, gen()), cw_median)  # the default is beaten


def test_optimal_ipm_against_the_mean_grows_tau():
    # For the mean, the deviation is ||mu|| f (1 + tau) / n: increasing, so the search leaves the grid.
    honest, f = honest_matrix(6, 10), 2
    out = attack("optimal_ipm", honest, f, gen(), aggregate=lambda x: x.mean(0))
    tau = -(out[0] @ honest.mean(0)) / honest.mean(0).square().sum()
    assert tau.item() > max(DEFAULT_GRID)


def test_line_search_finds_an_interior_maximum():
    x, y = line_search(lambda t: -((t - 3.7) ** 2), [0, 1, 2, 3, 5, 10], refine=14)
    assert x == pytest.approx(3.7, abs=0.02) and y <= 0
    x, _ = line_search(lambda t: -((t - 3.7) ** 2), [0, 1, 2, 3, 5, 10], refine=0)  # grid only
    assert x == 3.0


def test_attack_option_validation():
    with pytest.raises(ValueError, match="unknown attack"):
        attack("nope", X, 1, gen())
    with pytest.raises(ValueError, match="unknown options"):
        attack("ipm", X, 1, gen(), z=1.0)
    with pytest.raises(ValueError, match="tau"):
        attack("ipm", X, 1, gen(), tau=-1.0)
    with pytest.raises(ValueError, match="sigma"):
        attack("gaussian", X, 1, gen(), sigma=float("nan"))
    with pytest.raises(ValueError, match="aggregate"):
        attack("optimal_alie", X, 1, gen())
    with pytest.raises(ValueError, match="grid"):
        attack("optimal_ipm", X, 1, gen(), aggregate=cw_median, grid=[])
    with pytest.raises(ValueError, match="num_byzantine"):
        attack("sign_flip", X, -1, gen())
    with pytest.raises(ValueError, match="floating"):
        attack("sign_flip", X.long(), 1, gen())


def test_attacks_leave_honest_untouched():
    honest = honest_matrix()
    before = honest.clone()
    for name in available_attacks():
        out = attack(name, honest, 2, gen(), aggregate=cw_median)
        out.add_(1.0)  # the result owns its memory
    assert torch.equal(honest, before)


# --- label flipping, Byzantine selection ---------------------------------------------------------


def test_flip_labels_known_answers():
    labels = np.array([0, 3, 9, 5], dtype=np.int32)
    out = flip_labels(labels, 10)
    assert out.tolist() == [9, 6, 0, 4] and out.dtype == np.int32
    assert np.array_equal(flip_labels(out, 10), labels)  # reverse is an involution
    assert flip_labels(np.array([0, 1, 2]), 3, rule="shift").tolist() == [1, 2, 0]
    assert labels.tolist() == [0, 3, 9, 5]  # input untouched
    assert flip_labels(np.array([], dtype=np.int64), 4).shape == (0,)


def test_flip_labels_validation():
    with pytest.raises(ValueError, match="lie in"):
        flip_labels(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="rule"):
        flip_labels(np.array([0]), 3, rule="random")
    with pytest.raises(ValueError, match="integers"):
        flip_labels(np.array([0.5]), 3)


def test_choose_byzantine_deterministic_sorted_distinct():
    ids = choose_byzantine(20, 6, seed=3)
    assert ids == choose_byzantine(20, 6, seed=3)
    assert ids == sorted(set(ids)) and len(ids) == 6 and all(0 <= i < 20 for i in ids)
    assert len({tuple(choose_byzantine(20, 6, seed=s)) for s in range(5)}) > 1
    assert choose_byzantine(5, 0, seed=0) == [] and choose_byzantine(4, 4, seed=0) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        choose_byzantine(3, 4, seed=0)


# --- malformed payloads --------------------------------------------------------------------------


def _good() -> dict[str, torch.Tensor]:
    g = gen(0)
    return {
        "layers.0.q_proj.lora_A": torch.randn(4, 8, generator=g),
        "layers.0.q_proj.lora_B": torch.randn(8, 4, generator=g),
        "half": torch.randn(3, generator=g).to(torch.bfloat16),
        "count": torch.arange(5, dtype=torch.int64),
    }


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_each_malformed_kind_is_rejected_by_decode(kind):
    good = _good()
    before = {k: v.clone() for k, v in good.items()}
    cap = 4 * len(encode(good))
    decode(encode(good), expected=spec_of(good), max_bytes=cap)  # control: the honest payload passes
    bad = malformed(kind, good)
    blob = bad if isinstance(bad, bytes) else encode(bad)
    with pytest.raises(PayloadError):
        decode(blob, expected=spec_of(good), max_bytes=cap)
    assert all(torch.equal(good[k], before[k]) for k in good)  # input untouched


@pytest.mark.parametrize(
    "kind, message",
    [
        ("nan", "NaN or Inf"),
        ("inf", "NaN or Inf"),
        ("wrong_shape", "shape"),
        ("wrong_dtype", "dtype"),
        ("missing_key", "missing"),
        ("extra_key", "unexpected"),
        ("pickle", "not valid safetensors"),
        ("truncated", "not valid safetensors"),
    ],
)
def test_malformed_kinds_fail_for_the_intended_reason(kind, message):
    good = _good()
    bad = malformed(kind, good)
    blob = bad if isinstance(bad, bytes) else encode(bad)
    with pytest.raises(PayloadError, match=message):
        decode(blob, expected=spec_of(good))


def test_oversized_is_rejected_by_the_cap_and_by_the_key_set():
    good = _good()
    blob = encode(malformed("oversized", good))
    with pytest.raises(PayloadError, match="exceeds"):
        decode(blob, expected=spec_of(good), max_bytes=4 * len(encode(good)))
    with pytest.raises(PayloadError, match="unexpected"):
        decode(blob, expected=spec_of(good))


# --- worker momentum -----------------------------------------------------------------------------


def _run(beta, grads, **kw):
    state = momentum_init({"w": torch.zeros(1)})
    sent = []
    for g in grads:
        out, state = momentum_update(state, {"w": torch.tensor([g])}, beta, **kw)
        sent.append(out["w"].item())
    return sent, state


def test_momentum_known_answers_over_three_steps():
    grads = [2.0, 4.0, -2.0]
    sent, state = _run(0.5, grads)  # m0 = 0: 1, 0.5 + 2, 1.25 - 1
    assert sent == pytest.approx([1.0, 2.5, 0.25])
    assert int(state[STEP_KEY]) == 3
    sent, _ = _run(0.5, grads, bias_correction=True)  # divided by 1 - 0.5^t
    assert sent == pytest.approx([2.0, 2.5 / 0.75, 0.25 / 0.875])
    sent, _ = _run(0.5, grads, init="first")  # m1 = g1: 2, 1 + 2, 1.5 - 1
    assert sent == pytest.approx([2.0, 3.0, 0.5])
    sent, _ = _run(0.9, grads)
    assert sent == pytest.approx([0.2, 0.58, 0.322])


def test_momentum_beta_zero_sends_the_raw_update():
    g = gen(2)
    update = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16)}
    state = momentum_init(update)
    for _ in range(3):
        update = {k: v * 1.5 - 0.25 for k, v in update.items()}
        sent, state = momentum_update(state, update, 0.0)
        assert all(torch.equal(sent[k], update[k]) and sent[k].dtype == update[k].dtype for k in update)
    assert state["b"].dtype == torch.float32  # bf16 updates average in float32


def test_momentum_state_checkpoints_through_a_payload_and_is_not_mutated():
    g = gen(3)
    grads = [{"w": torch.randn(2, 3, generator=g)} for _ in range(4)]
    state = momentum_init(grads[0])
    _, state = momentum_update(state, grads[0], 0.9)
    _, state = momentum_update(state, grads[1], 0.9)
    snapshot = {k: v.clone() for k, v in state.items()}
    restored, _ = decode(encode(state), expected=spec_of(state))
    a, _ = momentum_update(state, grads[2], 0.9)
    b, _ = momentum_update(restored, grads[2], 0.9)
    assert torch.equal(a["w"], b["w"])
    assert all(torch.equal(state[k], snapshot[k]) for k in state)


def test_momentum_validation():
    state = momentum_init({"w": torch.zeros(2)})
    update = {"w": torch.ones(2)}
    for beta in (1.0, -0.1, math.nan, True):
        with pytest.raises(ValueError, match="beta"):
            momentum_update(state, update, beta)
    with pytest.raises(ValueError, match="match"):
        momentum_update(state, {"v": torch.ones(2)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        momentum_update(state, {"w": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="init"):
        momentum_update(state, update, 0.5, init="ones")
    with pytest.raises(ValueError, match="bias_correction"):
        momentum_update(state, update, 0.5, init="first", bias_correction=True)
    with pytest.raises(ValueError, match="reserved"):
        momentum_init({STEP_KEY: torch.zeros(1)})
