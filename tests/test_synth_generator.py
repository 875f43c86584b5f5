"""GReaT codec (synth/great.py), the client's table generator and its reward (synth/generator.py).

The model tests use the tiny Llama with its (tied) embeddings scaled by 10: at the stock scale
(std 0.02) the final RMSNorm bounds every logit to about +-1.3, so no LoRA can make the tiny model
put real probability on any token and it cannot learn the row format at all.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import assert_same_tensors, base_snapshot
from fedlora.config import DataConfig, LoraConfig
from fedlora.data.tables import ColumnInfo, Table, load_table
from fedlora.model import build_tiny_lm, wrap_lora
from fedlora.model.lora import adapter_state, init_adapter_state, load_adapter_state
from fedlora.synth.generator import (GeneratorConfig, RewardComposer, RewardConfig, SampleResult, TableGenerator,
                                     swapped_adapter)
from fedlora.synth.great import REASONS, GreatCodec


def toy_table(n: int = 40, seed: int = 0, ages: list[float] | None = None) -> Table:
    """housing (categorical), age (numeric: integers 20-59, or drawn from `ages`), label.

    The tiny model learns the row format of the default table but few of its 40 ages (about 10 %
    of its samples are valid rows); with two ages about half are, and GRPO can raise that.
    """
    r = np.random.default_rng(seed)
    housing = r.choice(["own", "rent"], n)  # draw order kept: the default table's rows never change
    age = r.integers(20, 60, n).astype(float) if ages is None else r.choice(np.asarray(ages, dtype=float), n)
    frame = pd.DataFrame({"housing": housing, "age": age, "label": r.choice(["good", "bad"], n)})
    frame = frame.astype({"housing": object, "label": object})  # as load_table stores categories
    return Table("toy", frame, "label", [ColumnInfo("housing", "categorical"), ColumnInfo("age", "numeric")],
                 ["bad", "good"], "tabular")


def peaked_tiny(seed: int = 0):
    model, tok = build_tiny_lm(seed)  # embeddings x10: a LoRA can teach it text
    cfg = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    return wrap_lora(model, cfg, seed=0), tok


def task_state(model, seed: int = 11):
    """A non-trivial 'task adapter' (B != 0), standing in for the federated task LoRA."""
    state = init_adapter_state(model, seed)
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen) * 0.01 if k.endswith("lora_B") else v) for k, v in state.items()}


FIT = GeneratorConfig(steps=300, lr=3e-3)


def fitted_toy(table: Table | None = None) -> dict:
    """A peaked tiny model holding a task adapter, and a generator fitted on `table` (the toy table)."""
    torch.set_num_threads(1)
    model, tok = peaked_tiny()
    task = task_state(model)
    load_adapter_state(model, task)
    base = base_snapshot(model)
    table = toy_table() if table is None else table
    gen = TableGenerator(table)
    result = gen.fit(model, tok, table.frame, FIT, np.random.default_rng(1))
    return dict(model=model, tok=tok, task=task, base=base, table=table, gen=gen, result=result)


@pytest.fixture(scope="module")
def fitted():
    return fitted_toy()


# --- codec -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["breast-cancer", "german-credit"])
def test_codec_round_trip_on_builtins(source):
    table = load_table(DataConfig(source=source))
    codec = GreatCodec(table, table.frame)
    rng = np.random.default_rng(0)
    rows = table.frame.iloc[rng.choice(len(table.frame), 60, replace=False)]
    parsed = [codec.parse(codec.serialize(row, rng)) for _, row in rows.iterrows()]
    assert [reason for _, reason in parsed] == [None] * len(rows)
    back = codec.to_frame([r for r, _ in parsed])
    assert list(back.columns) == list(table.frame.columns)
    assert dict(back.dtypes) == dict(table.frame.dtypes)
    for col in table.frame.columns:
        want, got = rows[col].reset_index(drop=True), back[col]
        if pd.api.types.is_float_dtype(want):  # 4 significant digits: the built-ins carry no more
            np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=5e-4)
        else:
            assert got.tolist() == want.tolist(), col


def test_values_with_commas_and_booleans_round_trip():
    table = load_table(DataConfig(source="german-credit"))
    codec = GreatCodec(table, table.frame)
    row = table.frame[table.frame["telephone"].str.contains(", ")].iloc[0]
    text = codec.serialize(row, np.random.default_rng(3))
    assert "telephone is yes, registered under the customers name" in text and "foreign worker is " in text
    parsed, reason = codec.parse(text)
    assert reason is None and parsed["telephone"] == row["telephone"] and parsed["foreign_worker"] is True


def test_column_order_varies_and_every_column_is_written():
    table = toy_table()
    codec = GreatCodec(table, table.frame)
    rng = np.random.default_rng(0)
    texts = [codec.serialize(table.frame.iloc[0], rng) for _ in range(20)]
    orders = {tuple(p.split(" is ")[0] for p in t.split(", ")) for t in texts}
    assert len(orders) > 1 and all(set(o) == {"housing", "age", "label"} for o in orders)


def _crafted() -> GreatCodec:
    frame = pd.DataFrame({
        "age": [30.0, 50.0, np.nan], "rate": [0.5, 1.5, 1.0], "phone": ["none", "yes, registered", "none"],
        "flag": pd.array([True, False, True], dtype="boolean"), "y": ["no", "yes", "no"]})
    cols = [ColumnInfo("age", "numeric"), ColumnInfo("rate", "numeric"), ColumnInfo("phone", "categorical"),
            ColumnInfo("flag", "boolean")]
    return GreatCodec(Table("t", frame, "y", cols, ["no", "maybe", "yes"], "tabular"), frame)


GOOD = "age is 40, rate is 1.25, phone is yes, registered, flag is no, y is maybe"


@pytest.mark.parametrize("text,reason", [
    ("", "malformed"),
    ("garbage", "malformed"),
    ("age is 40, rate is 1, and so on", "malformed"),
    ("colour is red, " + GOOD, "unknown_column"),
    (GOOD + ", age is 41", "duplicate_column"),
    ("age is 40, rate is 1, flag is no, y is no", "missing_column"),
    (GOOD.replace("age is 40", "age is forty"), "bad_number"),
    (GOOD.replace("age is 40", "age is 1e400"), "bad_number"),
    (GOOD.replace("age is 40", "age is 40.5"), "bad_number"),  # an integer column
    (GOOD.replace("age is 40", "age is 53"), "out_of_range"),  # 30..50 widened by 10 % of 20: 28..52
    (GOOD.replace("rate is 1.25", "rate is -0.2"), "out_of_range"),
    (GOOD.replace("yes, registered", "pilot"), "unknown_category"),
    (GOOD.replace("flag is no", "flag is perhaps"), "unknown_category"),
    (GOOD.replace("y is maybe", "y is never"), "unknown_category"),
])
def test_every_parse_failure_has_its_reason(text, reason):
    assert reason in REASONS
    assert _crafted().parse(text) == (None, reason)


def test_parse_accepts_the_margin_missing_cells_and_schema_classes():
    codec = _crafted()
    row, reason = codec.parse(GOOD)
    assert reason is None
    assert row == {"age": 40.0, "rate": 1.25, "phone": "yes, registered", "flag": False, "y": "maybe"}
    assert codec.parse(GOOD.replace("age is 40", "age is 51.0"))[1] is None  # inside the 10 % margin
    assert codec.parse(GOOD.replace("age is 40", "age is unknown"))[0]["age"] != 40  # age has missing cells
    assert np.isnan(codec.parse(GOOD.replace("age is 40", "age is unknown"))[0]["age"])
    assert codec.parse(GOOD.replace("rate is 1.25", "rate is unknown"))[1] == "bad_number"  # rate has none
    assert codec.valid_fraction("age is 40, rate is 9, flag is no") == pytest.approx(2 / 5)


def test_spec_is_json_and_rebuilds_the_same_codec():
    codec = _crafted()
    again = GreatCodec.from_spec(json.loads(json.dumps(codec.spec)))
    for text in (GOOD, GOOD.replace("age is 40", "age is 53"), "garbage"):
        assert again.parse(text) == codec.parse(text)


def test_prompt_start_value_comes_from_the_clients_marginal():
    table = toy_table(200)
    client = table.frame[table.frame["label"] == "good"].iloc[:30].copy()
    client.loc[client.index[:10], "label"] = "bad"  # this client's marginal: 10 bad, 20 good
    codec = GreatCodec(table, client)
    rng = np.random.default_rng(0)
    prompts = [codec.prompt(rng) for _ in range(3000)]
    assert set(prompts) == {"label is good,", "label is bad,"}
    assert np.mean([p == "label is bad," for p in prompts]) == pytest.approx(1 / 3, abs=0.03)
    only_good = GreatCodec(table, table.frame[table.frame["label"] == "good"])
    assert {only_good.prompt(rng) for _ in range(50)} == {"label is good,"}  # 'bad' is a class, not in its rows
    anywhere = GreatCodec(table, client, start="random")
    starts = [anywhere.prompt(rng) for _ in range(300)]
    assert {s.split(" is ")[0] for s in starts} == {"housing", "age", "label"}
    ages = {float(s[len("age is "):-1]) for s in starts if s.startswith("age")}
    assert ages <= set(client["age"])


def test_bad_inputs_raise_clear_errors():
    table = toy_table()
    with pytest.raises(ValueError, match="empty frame"):
        GreatCodec(table, table.frame.iloc[:0])
    with pytest.raises(ValueError, match="start must be one of"):
        GreatCodec(table, table.frame, start="first")
    with pytest.raises(ValueError, match="steps"):
        GeneratorConfig(steps=0)
    with pytest.raises(ValueError, match="no state yet"):
        TableGenerator(table).sample(None, None, 3, np.random.default_rng(0))


# --- the generator on the tiny model ---------------------------------------------------------------


def test_fit_lowers_the_loss_and_touches_only_its_own_state(fitted):
    f = fitted
    losses = f["result"].losses
    assert len(losses) == FIT.steps and np.mean(losses[-20:]) < losses[0] - 3
    fresh = TableGenerator(f["table"])
    fresh.codec, fresh.state = f["gen"].codec, init_adapter_state(f["model"], 0)
    rng = lambda: np.random.default_rng(9)  # noqa: E731
    before = fresh.nll(f["model"], f["tok"], f["table"].frame, rng())
    after = f["gen"].nll(f["model"], f["tok"], f["table"].frame, rng())
    assert after < before - 3
    assert_same_tensors(adapter_state(f["model"]), f["task"])  # the task adapter came back
    assert_same_tensors(base_snapshot(f["model"]), f["base"])
    assert f["gen"].max_new_tokens >= 8


def test_sample_is_seeded_reports_validity_and_leaves_global_rng_alone(fitted):
    f = fitted
    gen, model, tok = f["gen"], f["model"], f["tok"]
    state = torch.random.get_rng_state()
    a = gen.sample(model, tok, 48, np.random.default_rng(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = gen.sample(model, tok, 48, np.random.default_rng(5))
    c = gen.sample(model, tok, 48, np.random.default_rng(6))
    assert a.texts == b.texts and a.texts != c.texts
    assert all(t.startswith(("label is good,", "label is bad,")) for t in a.texts)
    assert a.validity_rate == pytest.approx(np.mean([r is None for r in a.reasons]))
    assert 0 < a.validity_rate < 1 and len(a.frame) == sum(r is None for r in a.reasons)
    assert dict(a.frame.dtypes) == dict(f["table"].frame.dtypes)
    assert set(a.reason_counts()) <= set(REASONS) and sum(a.reason_counts().values()) == 48 - len(a.frame)
    assert_same_tensors(adapter_state(model), f["task"])
    with pytest.raises(ValueError, match="must be >= 1"):
        gen.sample(model, tok, 0, np.random.default_rng(5))


def test_swapped_adapter_restores_exactly_also_on_error_and_nested(fitted):
    model = fitted["model"]
    before = adapter_state(model)
    other, third = init_adapter_state(model, 3), task_state(model, 5)
    with pytest.raises(RuntimeError, match="boom"), swapped_adapter(model, other):
        with swapped_adapter(model, third):
            assert_same_tensors(adapter_state(model), third)
        assert_same_tensors(adapter_state(model), other)
        raise RuntimeError("boom")
    assert_same_tensors(adapter_state(model), before)


def test_state_dict_and_safetensors_file_round_trip(fitted, tmp_path):
    f = fitted
    tensors = f["gen"].state_dict()
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    assert {k.split(".", 1)[0] for k in tensors} == {"adapter", "reference"}
    path = tmp_path / "gen.safetensors"
    f["gen"].save(path)
    loaded = TableGenerator.load(path, f["table"])
    assert_same_tensors(loaded.state, f["gen"].state)
    assert loaded.max_new_tokens == f["gen"].max_new_tokens
    rng = lambda: np.random.default_rng(4)  # noqa: E731
    assert (loaded.sample(f["model"], f["tok"], 8, rng()).texts
            == f["gen"].sample(f["model"], f["tok"], 8, rng()).texts)
    again = TableGenerator(f["table"])
    again.load_state_dict(tensors, codec=f["gen"].codec.spec)
    assert_same_tensors(again.state, f["gen"].state)
    with pytest.raises(ValueError, match="codec"):
        TableGenerator(f["table"]).load_state_dict(tensors)


# --- reward ------------------------------------------------------------------------------------------


def _reward_setup(mode="linear"):
    table = toy_table()
    codec = GreatCodec(table, table.frame)
    seen = []

    def utility(rows):
        seen.append(len(rows))
        return np.where(rows["housing"] == "own", 0.25, -0.25)

    cfg = RewardConfig(copy_threshold=0.02, copy_mode=mode)
    return table, codec, RewardComposer(codec, table.frame, utility, cfg), seen


def test_reward_known_answers_copy_far_invalid_partial():
    table, codec, reward, seen = _reward_setup()
    real = table.frame.iloc[0]
    copy = codec.serialize(real, np.random.default_rng(0))
    far = dict(real)  # an age no real row of this housing and label has, far from the nearest
    same = table.frame[(table.frame.housing == real.housing) & (table.frame.label == real.label)]
    gaps = {a: np.abs(same.age - a).min() for a in range(20, 60)}
    far["age"] = float(max(gaps, key=gaps.get))
    far_text = codec.serialize(far, np.random.default_rng(0))
    out = reward([copy, far_text, "garbage", "label is good, housing is own"])
    u = 0.25 if real.housing == "own" else -0.25
    assert seen == [2]  # utility sees the valid rows only
    assert out.valid.tolist() == [True, True, False, False]
    assert out.dcr[0] == 0 and out.penalty[0] == 1.0 and out.copies.tolist() == [True, False, False, False]
    assert out.dcr[1] == pytest.approx(max(gaps.values()) / (table.frame.age.max() - table.frame.age.min()) / 3)
    assert out.dcr[1] > 0.02  # so no penalty
    np.testing.assert_allclose(out.reward, [u + 1.0 - 1.0, u + 1.0, 0.0, 0.5 * 2 / 3])
    assert out.reasons == [None, None, "malformed", "missing_column"]


def test_reward_copy_penalty_modes_and_bad_utility():
    _, codec, linear, _ = _reward_setup("linear")
    _, _, step, _ = _reward_setup("step")
    dcr = np.array([0.0, 0.005, 0.01, 0.019, 0.02, 0.5])
    np.testing.assert_allclose(linear.copy_penalty(dcr), [1.0, 0.75, 0.5, 0.05, 0.0, 0.0])
    np.testing.assert_allclose(step.copy_penalty(dcr), [1, 1, 1, 1, 0, 0])
    table = toy_table()
    bad = RewardComposer(codec, table.frame, lambda rows: np.zeros(len(rows) + 1))
    with pytest.raises(ValueError, match="utility must return 1 finite"):
        bad([codec.serialize(table.frame.iloc[0], np.random.default_rng(0))])
    with pytest.raises(ValueError, match="copy_mode"):
        RewardConfig(copy_mode="soft")
    with pytest.raises(ValueError, match="real rows"):
        RewardComposer(codec, table.frame.iloc[:0])


def test_copy_penalty_on_german_credit_fires_for_a_copy_not_for_a_far_row():
    table = load_table(DataConfig(source="german-credit", max_rows=200))
    client = table.frame.iloc[:100]
    codec = GreatCodec(table, client)
    reward = RewardComposer(codec, client)
    rng = np.random.default_rng(0)
    far = client.iloc[0].copy()
    for col in ("duration_in_month", "credit_amount", "age_in_years"):  # swap ends of the range
        far[col] = client[col].max() if far[col] < client[col].median() else client[col].min()
    far["purpose"] = next(v for v in client["purpose"].unique() if v != far["purpose"])
    out = reward([codec.serialize(client.iloc[0], rng), codec.serialize(far, rng)])
    assert out.valid.all() and out.copies.tolist() == [True, False]
    assert out.reward[0] == pytest.approx(0.0) and out.reward[1] == pytest.approx(1.0)


def test_sample_result_validity_of_crafted_texts():
    table = toy_table()
    gen = TableGenerator(table)
    gen.codec, gen.state = GreatCodec(table, table.frame), {}
    res = gen.parse(["label is good, housing is own, age is 30", "label is good, age is 30", "x"])
    assert isinstance(res, SampleResult) and res.validity_rate == pytest.approx(1 / 3)
    assert res.reason_counts() == {"malformed": 1, "missing_column": 1} and len(res.frame) == 1
