"""GRPO (synth/grpo.py): the loss and advantages against numpy, limit cases, and learning on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_same_tensors, base_snapshot
from fedlora.model.lora import adapter_state, load_adapter_state
from fedlora.synth.generator import (RewardComposer, RewardConfig, TableGenerator,
                                     completion_logprobs, encode_texts, lora_training, pad_id)
from fedlora.synth.grpo import GRPOConfig, group_advantages, grpo_loss, grpo_step, refine
from test_synth_generator import fitted_toy, toy_table

t64 = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731


def _numpy_loss(logp, old, ref, adv, mask, eps, beta, normalize):
    ratio = np.exp(logp - old)
    sur = np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps, 1 + eps) * adv[:, None])
    per = sur - beta * (np.exp(ref - logp) - (ref - logp) - 1)
    if normalize == "sequence":
        return -np.mean((per * mask).sum(1) / mask.sum(1))
    return -(per * mask).sum() / mask.sum()


# --- loss and advantages -------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_grpo_loss_matches_numpy(normalize):
    rng = np.random.default_rng(0)
    logp, old, ref = (rng.normal(-2, 0.5, (3, 5)) for _ in range(3))
    adv = np.array([1.0, -0.5, 2.0])
    mask = np.array([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=float)  # right-aligned
    got = grpo_loss(t64(logp), t64(old), t64(ref), t64(adv), t64(mask), 0.2, 0.1, normalize)
    assert float(got) == pytest.approx(_numpy_loss(logp, old, ref, adv, mask, 0.2, 0.1, normalize), rel=1e-12)


def test_loss_at_ratio_one_without_kl_is_minus_the_mean_advantage():
    adv, logp = t64([0.5, -1.5, 2.0]), torch.randn(3, 4, dtype=torch.float64)
    mask = t64([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    seq = grpo_loss(logp, logp, None, adv, mask, beta=0.0)
    tok = grpo_loss(logp, logp, None, adv, mask, beta=0.0, normalize="token")
    assert float(seq) == pytest.approx(-(0.5 - 1.5 + 2.0) / 3)
    assert float(tok) == pytest.approx(-(4 * 0.5 - 2 * 1.5 + 1 * 2.0) / 7)  # token-weighted
    # the KL term vanishes where the policy equals the reference, and is >= 0 elsewhere
    assert float(grpo_loss(logp, logp, logp, adv, mask, beta=5.0)) == pytest.approx(float(seq))
    assert float(grpo_loss(logp, logp, logp + 0.3, adv, mask, beta=5.0)) > float(seq)


def test_clipping_is_active_outside_the_trust_region():
    old = torch.zeros(4, 1, dtype=torch.float64)
    logp = torch.log(t64([[1.5], [0.5], [1.5], [0.5]])).requires_grad_(True)
    adv = t64([1.0, -1.0, -1.0, 1.0])
    loss = grpo_loss(logp, old, None, adv, torch.ones(4, 1), clip_eps=0.2, beta=0.0)
    # per sequence: min(rho A, clip(rho) A) = 1.2, -0.8 (clipped), -1.5, 0.5 (not clipped)
    assert float(loss.detach()) == pytest.approx(-(1.2 - 0.8 - 1.5 + 0.5) / 4)
    loss.backward()
    grad = logp.grad.squeeze(1).tolist()
    assert grad[0] == 0 and grad[1] == 0  # clipped: no gradient pushes further out
    assert grad[2] == pytest.approx(1.5 / 4) and grad[3] == pytest.approx(-0.5 / 4)  # -d(rho A)/dlogp / G


def test_loss_rejects_bad_options():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="normalize"):
        grpo_loss(x, x, x, torch.zeros(2), x, normalize="batch")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(x, x, None, torch.zeros(2), x, beta=0.1)


def test_group_advantages_known_answers():
    r = np.array([1.0, 3.0, 2.0, 2.0, 0.0, 1.0, 5.0])
    with pytest.raises(ValueError, match="groups of 2"):
        group_advantages(r, 2)
    adv = group_advantages(r[:6], 2, eps=0.0)
    # groups (1, 3) and (0, 1): +-1 / sqrt(2) (Bessel std sqrt(2) and sqrt(0.5)); equal rewards: 0
    np.testing.assert_allclose(adv, [-1 / np.sqrt(2), 1 / np.sqrt(2), 0, 0, -1 / np.sqrt(2), 1 / np.sqrt(2)])
    g = np.random.default_rng(1).normal(size=12)
    want = [(x - x.mean()) / (x.std(ddof=1) + 1e-4) for x in g.reshape(3, 4)]
    np.testing.assert_allclose(group_advantages(g, 4), np.concatenate(want))
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(r[:6], 1)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="reference"):
        GRPOConfig(reference="sft")


# --- on the tiny model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    return fitted_toy()  # its own model and generator: the tests here move them


def test_old_logprobs_are_the_samplers_own(setup):
    """completion_logprobs at temperature T scores tokens exactly as generate sampled them."""
    model, tok = setup["model"], setup["tok"]
    prompts = encode_texts(tok, ["label is good,", "age is 41, housing is rent,"])
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id(tok)] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    eos = tok.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                         max_new_tokens=8, pad_token_id=pad_id(tok), eos_token_id=eos,
                         output_scores=True, return_dict_in_generate=True)
    new = out.sequences[:, width:]
    want = torch.stack([torch.log_softmax(s.float(), -1).gather(1, new[:, [k]]).squeeze(1)
                        for k, s in enumerate(out.scores)], 1)
    rows = [r[: r.index(eos) + 1] if eos in r else r for r in new.tolist()]
    with torch.no_grad():
        got, m = completion_logprobs(model, prompts, rows, pad_id(tok), temperature=0.7)
    for i, r in enumerate(rows):  # right-aligned here, left-aligned in generate's scores
        assert m[i, -len(r):].all() and not m[i, : m.shape[1] - len(r)].any()
        torch.testing.assert_close(got[i, -len(r):], want[i, : len(r)], atol=1e-4, rtol=1e-4)


def test_grpo_raises_the_composed_reward_and_moves_only_the_generator():
    """Concordia's reward (valid row + utility 'housing is own', no copy penalty) rises under GRPO.

    On the two-age toy table: with the default 40 ages too few samples are valid rows for a
    validity-gated reward to move in 10 steps (see `toy_table`).
    """
    s = fitted_toy(toy_table(ages=[25, 45]))
    model, tok, gen = s["model"], s["tok"], s["gen"]
    start = {k: v.clone() for k, v in gen.state.items()}
    reward = RewardComposer(gen.codec, s["table"].frame, lambda rows: (rows["housing"] == "own").to_numpy(float),
                            RewardConfig(copy_weight=0.0))  # 40 rows x 3 columns: every valid row is a copy

    def sampled():
        return reward(gen.sample(model, tok, 64, np.random.default_rng(5)).texts)

    before = sampled()
    stats = refine(gen, model, tok, reward, GRPOConfig(steps=10, lr=1e-3, group_size=8, prompts_per_step=4),
                   np.random.default_rng(3))
    after = sampled()
    # measured: reward 0.86 -> 1.81, validity 0.47 -> 0.89 (refine rng 3); rng 4-7: 1.66-1.85, 0.81-0.92
    assert len(stats) == 10 and after.reward.mean() > before.reward.mean() + 0.5, (before.reward, after.reward)
    assert after.valid.mean() > before.valid.mean() + 0.15
    assert all(np.isfinite(x.kl) and x.kl >= 0 and x.clip_fraction == 0 and 0 <= x.validity <= 1 for x in stats)
    assert any(not torch.equal(start[k], gen.state[k]) for k in start)
    assert_same_tensors(adapter_state(model), s["task"])  # the task adapter is back
    assert_same_tensors(base_snapshot(model), s["base"])  # base weights never move


def test_micro_batches_give_the_same_update(setup):
    s = setup
    model, tok = s["model"], s["tok"]
    prompts = [s["gen"].codec.prompt(np.random.default_rng(k)) for k in range(2)]
    reward = lambda texts: np.array([len(t) % 7 for t in texts], dtype=float)  # noqa: E731
    results = []
    for normalize in ("sequence", "token"):
        for micro in (1, 16):
            load_adapter_state(model, s["gen"].state)
            cfg = GRPOConfig(group_size=8, micro_batch_size=micro, normalize=normalize, max_new_tokens=12)
            # plain SGD: the update is linear in the gradient, so accumulation error stays at float level
            # (AdamW's first step is ~lr * sign(g) and amplifies it where |g| is near its eps)
            with lora_training(model) as params:
                sgd = torch.optim.SGD(params, lr=1e-2)
                stats = grpo_step(model, tok, prompts, reward, cfg, np.random.default_rng(0), sgd)
            results.append((adapter_state(model), stats.loss, stats.kl))
        (a, la, ka), (b, lb, kb) = results[-2:]
        assert la == pytest.approx(lb, abs=1e-6) and ka == pytest.approx(kb, rel=1e-5)
        assert max(float((a[k] - s["gen"].state[k]).abs().max()) for k in a) > 1e-4  # the step did move
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    load_adapter_state(model, s["task"])


def test_fitted_reference_starts_at_zero_kl_and_iterations_clip(setup):
    s = setup
    gen = TableGenerator(s["table"])
    gen.load_state_dict(s["gen"].state_dict() | {f"reference.{k}": v for k, v in s["gen"].state.items()},
                        codec=s["gen"].codec)
    gen.max_new_tokens = s["gen"].max_new_tokens
    reward = RewardComposer(gen.codec, s["table"].frame)
    one = refine(gen, s["model"], s["tok"], reward, GRPOConfig(steps=1, reference="fitted"), np.random.default_rng(0))
    assert one[0].kl == pytest.approx(0.0, abs=1e-9)  # before the first update the policy is the reference
    more = refine(gen, s["model"], s["tok"], reward, GRPOConfig(steps=1, reference="fitted", iterations=4, lr=1e-2),
                  np.random.default_rng(0))
    assert more[0].kl > 0 and more[0].clip_fraction > 0  # later updates reuse the samples; ratios leave [0.8, 1.2]
    assert_same_tensors(adapter_state(s["model"]), s["task"])
    bare = TableGenerator(s["table"])
    bare.load_state_dict(s["gen"].state_dict(), codec=s["gen"].codec)
    bare.reference = None
    with pytest.raises(ValueError, match="reference='fitted'"):
        refine(bare, s["model"], s["tok"], reward, GRPOConfig(reference="fitted"), np.random.default_rng(0))


def test_grpo_step_rejects_empty_prompts_and_bad_rewards(setup):
    model, tok = setup["model"], setup["tok"]
    cfg = GRPOConfig(group_size=2, max_new_tokens=4)
    with lora_training(model):
        with pytest.raises(ValueError, match="at least one prompt"):
            grpo_step(model, tok, [], lambda t: np.zeros(len(t)), cfg, np.random.default_rng(0))
        with pytest.raises(ValueError, match="finite rewards"):
            grpo_step(model, tok, ["label is good,"], lambda t: np.zeros(len(t) + 1), cfg, np.random.default_rng(0))
