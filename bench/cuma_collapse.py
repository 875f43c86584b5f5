"""Mean collapse (issue 19): does CuMA's profile-routed mixture of LoRA experts keep the groups'
outcome distributions apart where one dense adapter (FedIT) learns their average?

Data: German Credit with a derived `age_band` (18-25, 26-35, 36+; written to a temporary CSV, the
library is not touched), prompts of the 7 columns of configs/german_credit.yaml plus the band,
digits number format (the same test prompt text whoever fits the serializer). Per seed, each
partition is prepared once and every method of it runs on the same splits and initial adapters:

- central: one client holding all training rows (partition.num_clients=1) with 4 x local steps
  per round, the total steps of the 4-client federation (the `centralized` method would match
  steps too, but it trains plain LoRA only): FedIT, MoE semantic-only (cuma.use_profile=false),
  CuMA routed on the band (cuma.profile_source=columns);
- local: one client per band (partition.scheme=column), each training alone (method `local`);
- mixed: 4 clients, Dirichlet label skew (alpha 0.5), bands mixed: FedIT, semantic-only, CuMA;
- by-group: the local partition, federated: FedIT, semantic-only, CuMA (profile_source=client),
  CuMA with personal routers.

Scored after the last round only, on the global test rows (identical in every setting of a seed)
grouped by band: accuracy per group, its mean and worst group, and the paper's distributional
fit, per group EMD = |predicted share of class 1 - true share| (two classes, unit distance), mean
and max. Decisions: raw argmax of the label log-likelihoods (the tables' first rows) and the
calibrated one (eval.calibration=both fitted on at most --cal-rows validation rows: pooled under
a global adapter, the client's own under a personal one). Personal methods score group g with the
adapter of the client holding g; a CuMA with client profiles routes group g's rows on client g's
profile (the library gives the global test the mean profile). Per seed, paired differences CuMA -
FedIT and CuMA - semantic-only, with a 95% t interval over seeds.

    python bench/cuma_collapse.py                   # 3 seeds, SmolLM2-135M: about an hour on 2 cores
    python bench/cuma_collapse.py --quick           # tiny model, 1 seed, 1 round: a smoke run
    python bench/cuma_collapse.py --render --write  # the section of docs/benchmarks.md from the results
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round_time import machine_info, markdown_table, write_section

from fedlora import Simulator, load_config, load_model, prepare
from fedlora.config import PartitionConfig
from fedlora.data import load_table
from fedlora.data.derived import read_german_credit
from fedlora.fl.scoring import Scorer, fit_all
from fedlora.fl.splits import cap_rows
from fedlora.model.cuma import cuma_controller, set_profile, set_profile_lookup
from fedlora.model.cuma_io import ProfileEncoder
from fedlora.model.lora import load_adapter_state

RESULTS = Path(__file__).resolve().parent / "results" / "cuma_collapse.json"
TITLE = "CuMA: mean collapse on German Credit groups ({n} seeds)"
TARGET, BAND = "creditability", "age_band"
FEATURES = ["status_of_existing_checking_account", "duration_in_month", "credit_history", "purpose",
            "credit_amount", "savings_account_and_bonds", "age_in_years"]  # configs/german_credit.yaml
CANDIDATES = (BAND, "personal_status_and_sex")
MIXED_CLIENTS = 4
SECONDS_PER_STEP, SECONDS_PER_ROW = 2.5, 0.1  # SmolLM2-135M, fp32, 2 cores, batch 8 (bench/round_time)

FEDIT = ("FedIT", ["fl.method=fedit"])
SEMANTIC = ("MoE semantic-only", ["fl.method=cuma", "cuma.use_profile=false"])
CUMA_CLIENT = ("CuMA (client profile)", ["fl.method=cuma", "cuma.profile_source=client"])
PERSONAL = ("CuMA (client profile, personal routers)", [*CUMA_CLIENT[1], "fl.method_args.personal_routers=true"])


def cuma_columns(group: str):
    return ("CuMA (profile columns)", ["fl.method=cuma", "cuma.profile_source=columns", f"cuma.profile_columns=[{group}]"])


def settings(group: str, local_steps: int) -> dict[str, tuple[list[str], list]]:
    """setting -> (partition overrides, jobs); 'local' and 'by-group' share one partition."""
    column = ["partition.scheme=column", f"partition.column={group}"]
    return {
        "central": (["partition.scheme=iid", "partition.num_clients=1",
                     f"train.local_steps={MIXED_CLIENTS * local_steps}"], [FEDIT, SEMANTIC, cuma_columns(group)]),
        "local": (column, [("local", ["fl.method=local"])]),
        "mixed": (["partition.scheme=dirichlet", f"partition.num_clients={MIXED_CLIENTS}",
                   f"partition.alpha={PartitionConfig().alpha}"], [FEDIT, SEMANTIC, cuma_columns(group)]),
        "by-group": (column, [FEDIT, SEMANTIC, CUMA_CLIENT, PERSONAL]),
    }


SETTING_TEXT = {
    "central": "one client holding every training row, 4 x the local steps per round",
    "local": "one client per group, each training alone",
    "mixed": f"{MIXED_CLIENTS} clients, Dirichlet label skew (alpha {PartitionConfig().alpha}), groups mixed",
    "by-group": "one client per group (partition.scheme=column), federated; personal routers scored per group's client",
}
PAIRS = {"central": [("CuMA (profile columns)", r) for r in ("FedIT", "MoE semantic-only")],
         "mixed": [("CuMA (profile columns)", r) for r in ("FedIT", "MoE semantic-only")],
         "by-group": [(c, r) for c in (CUMA_CLIENT[0], PERSONAL[0]) for r in ("FedIT", "MoE semantic-only")]}


def banded_csv(folder: Path) -> Path:
    frame = read_german_credit()
    frame[BAND] = pd.cut(frame["age_in_years"], [0, 25, 35, 200], labels=["18-25", "26-35", "36+"]).astype(str)
    path = folder / "german_credit_banded.csv"
    frame.to_csv(path, index=False)
    return path


def group_check(frame: pd.DataFrame, folds: int = 5) -> dict:
    """Per candidate grouping and group: rows, bad-class rate, and the out-of-fold accuracy and log
    loss of one pooled logistic regression (features + group) against one fitted on that group alone."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    def logreg(cols):
        cat = [c for c in cols if not pd.api.types.is_numeric_dtype(frame[c])]
        num = [c for c in cols if c not in cat]
        return make_pipeline(ColumnTransformer([("c", OneHotEncoder(handle_unknown="ignore"), cat),
                                                ("n", StandardScaler(), num)]), LogisticRegression(max_iter=1000))

    y = (frame[TARGET] == "bad").to_numpy(int)
    out = {}
    for cand in CANDIDATES:
        groups, cols = frame[cand].astype(str).to_numpy(), list(dict.fromkeys([*FEATURES, cand]))
        prob = {"pooled": np.zeros(len(y)), "own": np.zeros(len(y))}
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=0).split(frame, y):
            prob["pooled"][test] = logreg(cols).fit(frame.iloc[train], y[train]).predict_proba(frame.iloc[test])[:, 1]
            for g in np.unique(groups):
                tr, te = train[groups[train] == g], test[groups[test] == g]
                prob["own"][te] = logreg(FEATURES).fit(frame.iloc[tr], y[tr]).predict_proba(frame.iloc[te])[:, 1]
        rows = {}
        for g in np.unique(groups):
            m = groups == g
            rows[g] = {"n": int(m.sum()), "bad_rate": float(y[m].mean()),
                       **{f"{k}_acc": float(((p[m] > 0.5) == y[m]).mean()) for k, p in prob.items()},
                       **{f"{k}_logloss": float(log_loss(y[m], p[m], labels=[0, 1])) for k, p in prob.items()}}
        rates = [r["bad_rate"] for r in rows.values()]
        gain = sum(r["n"] * (r["own_acc"] - r["pooled_acc"]) for r in rows.values()) / len(y)
        out[cand] = {"groups": rows, "bad_rate_spread": max(rates) - min(rates), "own_minus_pooled_acc": gain}
    return out


@contextmanager
def client_profile(fed, cid: int):
    """Under profile_source=client, route on client `cid`'s profile instead of the lookup's mean z."""
    ctl, cu = cuma_controller(fed.model), fed.cfg.cuma
    if ctl is None or not cu.use_profile or cu.experts < 2 or cu.profile_source != "client":
        yield
        return
    z = ProfileEncoder(fed.model, fed.tokenizer)([cu.client_profile.format(client=cid)])[0]
    lookup = ctl.lookup
    set_profile_lookup(fed.model, None)
    set_profile(fed.model, z)
    try:
        yield
    finally:
        set_profile(fed.model, None)
        set_profile_lookup(fed.model, lookup)


class Probe(Simulator):
    """The simulator with its last-round evaluation replaced by the benchmark's: decisions on the
    global-test rows of each group, while CuMA and its profile lookup are still attached."""

    test_index: np.ndarray
    groups: np.ndarray
    cal_rows: int
    scored: dict

    def evaluate(self, state, timer):
        with timer("eval"):
            self.scored = self.score_groups(state)
        return []

    def _val(self, cid: int):
        val = self.fed.clients[cid].val
        rng = np.random.default_rng([self.seed, 12, cid])  # the same rows for every method
        return val.subset(cap_rows(np.arange(len(val)), math.ceil(self.cal_rows / self.fed.num_clients), rng))

    def score_groups(self, state) -> dict:
        fed, method, scorer = self.fed, self.method, Scorer(self.fed)
        owner = {c.name.split("=", 1)[-1]: i for i, c in enumerate(fed.partition.clients)}  # scheme=column
        cal = None
        if not method.personalized:
            load_adapter_state(fed.model, method.global_adapter(state.server))
            cf = scorer.content_free_scores()
            cal = scorer.global_set([scorer.calibration_set(self._val(i), cf) for i in range(fed.num_clients)])
        out = {}
        for g in sorted(set(self.groups)):
            cid = owner.get(g)
            if method.personalized:
                load_adapter_state(fed.model, method.personal_adapter(state.server, state.clients[cid]))
                cal = scorer.calibration_set(self._val(cid))
            data = fed.global_test.subset(self.test_index[self.groups == g])
            lookup = getattr(cuma_controller(fed.model), "lookup", None)
            before = getattr(lookup, "misses", 0)
            with client_profile(fed, cid) if cid is not None else nullcontext():
                raw = scorer.scores(data)
            decided = {"raw": raw}
            if cal is not None:
                decided["cal"] = fit_all(scorer.kind, cal)[scorer.kind].apply(raw)
            out[g] = {"n": len(data), "true_share": float(np.mean(data.labels == 1)),
                      "profile_misses": getattr(lookup, "misses", 0) - before,  # rows routed on the mean z
                      **{k: {"acc": float(np.mean(s.argmax(1) == data.labels)),
                             "pred_share": float(np.mean(s.argmax(1) == 1))} for k, s in decided.items()}}
        return out


def summarize(groups: dict) -> dict:
    out = {}
    for kind in ("raw", "cal"):
        if all(kind in g for g in groups.values()):
            acc = [g[kind]["acc"] for g in groups.values()]
            emd = [abs(g[kind]["pred_share"] - g["true_share"]) for g in groups.values()]
            out[kind] = {"mean_acc": float(np.mean(acc)), "worst_acc": float(min(acc)),
                         "mean_emd": float(np.mean(emd)), "max_emd": float(max(emd))}
    return out


def run_seed(seed: int, args, base: list[str], model, tok, table) -> tuple[list[dict], object]:
    runs, reference = [], None
    chosen = {s: v for s, v in settings(args.group, args.local_steps).items() if s in args.settings}
    for part in dict.fromkeys(tuple(p) for p, _ in chosen.values()):  # one Federation per partition
        fed = prepare(load_config("german_credit", [*base, *part, f"seed={seed}"]), model, tok, table)
        model = fed.model  # wrapped with LoRA once, reused as experiment.reseed does
        reference = fed.global_rows if reference is None else reference
        assert np.array_equal(fed.global_rows, reference), "the global test must be the same in every setting"
        index = cap_rows(np.arange(len(fed.global_test)), args.eval_rows, np.random.default_rng([seed, 11]))
        groups = table.frame[args.group].iloc[fed.global_rows[index]].astype(str).to_numpy()
        for setting, (overrides, jobs) in chosen.items():
            if tuple(overrides) != part:
                continue
            for label, job in jobs:
                cfg = load_config("german_credit", [*base, *part, *job, f"seed={seed}"])
                assert (cfg.data, cfg.partition) == (fed.cfg.data, fed.cfg.partition)
                sim = Probe(replace(fed, cfg=cfg), cfg.fl.method, seed=seed)
                sim.test_index, sim.groups, sim.cal_rows = index, groups, args.cal_rows
                started = time.perf_counter()
                sim.run()
                run = {"seed": seed, "setting": setting, "method": label, "wall_s": time.perf_counter() - started,
                       "steps": cfg.fl.rounds * cfg.train.local_steps * fed.num_clients,
                       "groups": sim.scored, "summary": summarize(sim.scored)}
                raw = run["summary"]["raw"]
                print(f"seed {seed} | {setting} | {label}: {run['steps']} steps, {run['wall_s']:.0f} s; raw mean acc "
                      f"{raw['mean_acc']:.3f}, worst {raw['worst_acc']:.3f}, mean EMD {raw['mean_emd']:.3f}", flush=True)
                runs.append(run)
    return runs, model


def estimate(args, n_groups: int, n_test: int) -> tuple[int, int]:
    """(training steps, scored rows) of the whole run."""
    clients = {"central": 1, "local": n_groups, "mixed": MIXED_CLIENTS, "by-group": n_groups}
    steps = rows = 0
    for setting, (overrides, jobs) in settings(args.group, args.local_steps).items():
        if setting in args.settings:
            per_client = MIXED_CLIENTS * args.local_steps if setting == "central" else args.local_steps
            steps += len(jobs) * args.rounds * per_client * clients[setting]
            rows += len(jobs) * (min(n_test, args.eval_rows or n_test) + args.cal_rows)
    return steps * len(args.seeds_list), rows * len(args.seeds_list)


def stat(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± " + (f"{np.std(values, ddof=1):.3f}" if len(values) > 1 else "–")


def paired_cell(d: list[float]) -> str:
    """mean ± std [95% t interval] of per-seed paired differences."""
    from scipy import stats

    if len(d) < 2:
        return f"{np.mean(d):+.3f}"
    mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    half = stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    return f"{mean:+.3f} ± {sd:.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


def paired(runs: list[dict]) -> list[list[str]]:
    by = {(r["setting"], r["method"], r["seed"]): r["summary"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    rows = []
    for setting, pairs in PAIRS.items():
        for a, b, kind in ((a, b, kind) for a, b in pairs for kind in ("raw", "cal")):
            both = [s for s in seeds if kind in by.get((setting, a, s), {}) and kind in by.get((setting, b, s), {})]
            if both:
                rows.append([setting, f"{a} − {b}", kind, *(paired_cell(
                    [by[setting, a, s][kind][m] - by[setting, b, s][kind][m] for s in both])
                    for m in ("worst_acc", "mean_emd")), str(len(both))])
    return rows


def report(kept: dict) -> str:
    cfg, runs = kept["config"], kept["runs"]
    setup = (f"Model `{cfg['model']}`, groups: `{cfg['group']}`, seeds {sorted({r['seed'] for r in runs})}, "
             f"{cfg['rounds']} rounds of {cfg['local_steps']} local steps (batch 8, lr 0.003, LoRA r=8 on q/v; "
             f"CuMA: 8 experts, top-2), {cfg['max_rows'] or 'all'} table rows, global-test rows scored per seed: "
             f"{cfg['eval_rows'] or 'all'}. `raw`: argmax of the label log-likelihoods; `cal`: eval.calibration="
             f"both fitted on at most {cfg['cal_rows']} validation rows. EMD of a group: |predicted share of class "
             "`good` - true share|. Overrides of configs/german_credit.yaml: `" + " ".join(kept["overrides"]) + "`.")
    check = [[cand, g, str(v["n"]), f"{v['bad_rate']:.3f}", f"{v['pooled_acc']:.3f}", f"{v['own_acc']:.3f}",
              f"{v['pooled_logloss']:.3f}", f"{v['own_logloss']:.3f}"]
             for cand, c in kept["group_check"].items() for g, v in c["groups"].items()]
    spread = "; ".join(f"`{c}`: bad-rate spread {v['bad_rate_spread']:.3f}, per-group minus pooled LR accuracy "
                       f"{v['own_minus_pooled_acc']:+.3f}" for c, v in kept["group_check"].items())
    parts = [f"Command: `{kept['command']}`; run on {kept['date']}, {kept['wall_min']:.0f} min.", kept["machine"], setup,
             "**Group check** (all 1000 rows, 5-fold out-of-fold logistic regression on the prompt's columns; "
             f"row-weighted over groups: {spread})\n\n" + markdown_table(
                 ["grouping", "group", "rows", "bad rate", "pooled LR acc", "per-group LR acc",
                  "pooled LR log loss", "per-group LR log loss"], check)]
    header = ["method", "decision", "steps", "mean acc", "worst-group acc", "mean EMD", "max EMD"]
    for setting in [s for s in SETTING_TEXT if s in {r["setting"] for r in runs}]:
        rows = []
        for method in dict.fromkeys(r["method"] for r in runs if r["setting"] == setting):
            mine = [r for r in runs if (r["setting"], r["method"]) == (setting, method)]
            for kind in ("raw", "cal"):
                if all(kind in r["summary"] for r in mine):
                    rows.append([method, kind, str(mine[0]["steps"]), *(stat([r["summary"][kind][m] for r in mine])
                                 for m in ("mean_acc", "worst_acc", "mean_emd", "max_emd"))])
        parts.append(f"**{setting}**: {SETTING_TEXT[setting]} (mean ± std over seeds)\n\n" + markdown_table(header, rows))
    parts.append("**Paired differences** (per seed, same partitions and initial adapters: mean ± std "
                 "[95% t interval])\n\n" + markdown_table(["setting", "difference", "decision", "Δ worst-group acc",
                                                            "Δ mean EMD", "seeds"], paired(runs)))
    # the hand-written reading follows the section's end marker in docs/benchmarks.md
    return "\n\n".join(parts) + "\n"


def overrides(args, csv: Path) -> list[str]:
    """The dotted overrides of configs/german_credit.yaml shared by every run."""
    out = [f"model.name={args.model}", f"data.source={csv}", f"data.target={TARGET}",
           f"data.columns=[{', '.join(dict.fromkeys([*FEATURES, args.group]))}]", "data.number_format=digits",
           f"data.max_rows={args.max_rows or 'null'}", f"fl.rounds={args.rounds}", "fl.eval_every=0",
           "fl.checkpoint=false", f"train.local_steps={args.local_steps}", "eval.max_examples=null",
           "eval.zero_shot=false", "eval.baseline=none", f"eval.calibration={'both' if args.cal_rows else 'none'}"]
    if args.quick:  # one thread: a tiny model's small ops run ten times slower when 2 threads share a busy CPU
        out.append("model.num_threads=1")
    return out


def run_all(args, out: Path, command: str) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedlora-cuma-") as tmp:
        csv = banded_csv(Path(tmp))
        base = overrides(args, csv)
        cfg = load_config("german_credit", base)
        table = load_table(cfg.data, seed=0)  # one table for every seed, as experiment.reseed does
        steps, rows = estimate(args, table.frame[args.group].nunique(),
                               round(cfg.data.global_test_fraction * len(table.frame)))
        print(f"{steps} training steps (batch 8) and about {rows} scored rows: on SmolLM2-135M (fp32, 2 cores) "
              f"about {(steps * SECONDS_PER_STEP + rows * SECONDS_PER_ROW) / 60:.0f} min at {SECONDS_PER_STEP} s "
              f"per step and {SECONDS_PER_ROW} s per row (CuMA steps cost more)", flush=True)
        check = group_check(pd.read_csv(csv))
        for cand, c in check.items():
            print(f"group check {cand}: " + "; ".join(
                f"{g} n={v['n']} bad={v['bad_rate']:.2f} pooled/own LR acc {v['pooled_acc']:.3f}/{v['own_acc']:.3f}"
                for g, v in c["groups"].items()), flush=True)
        kept = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
                "config": {k: getattr(args, k) for k in ("model", "group", "rounds", "local_steps", "max_rows",
                                                         "eval_rows", "cal_rows", "settings", "seeds_list")},
                "overrides": [f"data.source=<german-credit + {BAND}: a temporary CSV>" if o.startswith("data.source=")
                              else o for o in base],
                "estimate": {"steps": steps, "scored_rows": rows}, "group_check": check, "runs": []}
        model, tok = load_model(cfg.model)
        for seed in args.seeds_list:
            runs, model = run_seed(seed, args, base, model, tok, table)
            kept["runs"] += runs
            kept["wall_min"] = (time.perf_counter() - started) / 60
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(kept, indent=1) + "\n")  # after every seed: a partial run is kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--max-rows", type=int, default=None, help="subsample the table (default: all 1000 rows)")
    p.add_argument("--eval-rows", type=int, default=None, help="global-test rows scored per seed (default: all)")
    p.add_argument("--cal-rows", type=int, default=48, help="validation rows for calibration (0: raw only)")
    p.add_argument("--settings", default="central,local,mixed,by-group")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--group", default=BAND, choices=CANDIDATES)
    p.add_argument("--quick", action="store_true", help="tiny model, 1 seed, 1 round, 1 step, 200 rows")
    p.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS.name}; --quick: a temporary file)")
    p.add_argument("--render", action="store_true", help="run nothing: the section from the kept results")
    p.add_argument("--write", action="store_true", help="write the section to docs/benchmarks.md")
    args = p.parse_args()
    if args.quick:
        args.model, args.seeds, args.rounds, args.local_steps, args.max_rows = "tiny", 1, 1, 1, 200
        args.cal_rows = min(args.cal_rows, 16)
    out = args.out or (Path(tempfile.gettempdir()) / "cuma_collapse-quick.json" if args.quick else RESULTS)
    args.settings, args.seeds_list = args.settings.split(","), list(range(args.seeds))
    if set(args.settings) - set(SETTING_TEXT):
        p.error(f"unknown settings {sorted(set(args.settings) - set(SETTING_TEXT))}; choose from {list(SETTING_TEXT)}")
    if not args.render:
        run_all(args, out, "python bench/cuma_collapse.py " + " ".join(sys.argv[1:]))
    kept = json.loads(out.read_text())
    text = report(kept)
    print(text)
    if args.write:
        write_section("cuma_collapse", TITLE.format(n=len({r["seed"] for r in kept["runs"]})), text)


if __name__ == "__main__":
    main()
