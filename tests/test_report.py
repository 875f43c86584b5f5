"""report.html: built from a run's files, self-contained, escaped, rebuilt by `fedlora report`, and
opened in a real browser (headless Chromium) with no console errors and its charts present."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from fedlora.cli import main
from fedlora.experiment import compare, run
from fedlora.report import charts
from fedlora.report.html import build_report, markdown_to_html, write_report
from fedlora.robustness import robustness_sweep

from browser import chromium_path, open_report
from conftest import make_config


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A tiny compare of a global, a personalized (FedTreeLoRA) and a local-only method, 2 seeds."""
    out = tmp_path_factory.mktemp("report")
    cfg = make_config("fl.rounds=2", output_dir=out)
    return compare(cfg, ["fedit", "fedtree", "local"], seeds=[0, 1], quiet=True)


def _without_time(page: str) -> str:
    return re.sub(r"page built [0-9: -]+", "", page)


def test_compare_writes_a_report_with_every_section(compared):
    page = (compared / "report.html").read_text(encoding="utf-8")
    for heading in ("Scores", "Communication", "FedTreeLoRA client tree", "Each run", "Data and partition", "Config"):
        assert f"<h2>{heading}</h2>" in page, heading
    assert page.count("<svg") >= 4  # accuracy and AUROC by round, client spread, bytes
    assert "fedtree-seed1" in page and "scored with" in page and "highest likelihood" in page
    table = json.loads((compared / "comparison.json").read_text())
    assert all(f"<td>{row['method']}</td>" in page for row in table)


def test_the_page_is_self_contained(compared):
    page = (compared / "report.html").read_text(encoding="utf-8")
    links = [x for x in re.findall(r'(?:src|href)="([^"]*)"', page) if not x.startswith("#")]  # "#": in the page
    assert links and all(link.startswith("data:") for link in links), [x[:40] for x in links if not x.startswith("data:")]
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "two elements share an id"
    assert not re.search(r"<script|<link|@import|url\((?!#)", page)  # nothing to run, nothing to fetch


def test_fedlora_report_rebuilds_the_same_page(compared, tmp_path, capsys):
    copy = shutil.copytree(compared, tmp_path / "copy")
    first = (copy / "report.html").read_text(encoding="utf-8")
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    assert str(copy / "report.html") in capsys.readouterr().out
    # the directory name is in the title; everything else must match the page the run wrote
    rebuilt = (copy / "report.html").read_text(encoding="utf-8")
    assert _without_time(rebuilt) == _without_time(first.replace(compared.name, "copy"))


def test_a_dp_run_shows_epsilon_by_round(tmp_path):
    out = run(make_config("dp.enabled=true", "fl.rounds=2", output_dir=tmp_path), quiet=True)
    page = (out / "report.html").read_text(encoding="utf-8")
    summary = json.loads((out / "summary.json").read_text())
    assert "<h2>Differential privacy</h2>" in page and "epsilon spent by round" in page
    assert f"{summary['dp']['epsilon']:.3f}" in page


def test_report_of_a_non_run_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_a_killed_run_still_gets_a_page(tmp_path):
    """Only config.yaml and a metrics.jsonl cut mid-line: the finished rounds are drawn."""
    rows = [{"client": 0, "round": 1, "accuracy": 0.5, "method": "fedit"},
            {"client": "server", "round": 1, "bytes_up": 10, "bytes_down": 10, "method": "fedit"}]
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"client": 1, "rou')
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "<h2>Scores</h2>" in page and page.count("<svg") >= 2


def test_user_text_is_escaped(tmp_path):
    """Class names and config values come from users' files: never markup in the page."""
    evil = "<script>alert(1)</script>"
    (tmp_path / "config.yaml").write_text(f"data:\n  target: '{evil}'\n")
    (tmp_path / "partition.json").write_text(json.dumps(
        [{"client": 0, "train": 3, "val": 1, "test": 1, "train_classes": {evil: 3}}]))
    page = build_report(tmp_path)
    assert evil not in page and "&lt;script&gt;" in page


def test_markdown_tables_headings_and_bold():
    out = markdown_to_html("# Sweep\n\nnote <b>\n\n| a | b |\n|---|---|\n| 1 | **2** |\n")
    assert "<h3>Sweep</h3>" in out and '<p class="note">note &lt;b&gt;</p>' in out
    assert "<th>a</th><th>b</th>" in out and "<td>1</td><td><b>2</b></td>" in out and "---" not in out


def test_robustness_sweep_report_has_the_heat_map(tmp_path):
    cfg = make_config("partition.num_clients=4", "fl.rounds=1", output_dir=tmp_path)
    out = robustness_sweep(cfg, ["sign_flip"], ["mean", "median"], [0, 1], [None], [0], quiet=True)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2>Robustness</h2>" in page and "robustness heat map" in page and "<td>median</td>" in page


# --- charts: known answers on hand-made rows -----------------------------------------------------

def _rows(method, values, glob=None):
    rows = [{"client": c, "round": r, "accuracy": v, "method": method}
            for r, per_client in enumerate(values, start=1) for c, v in enumerate(per_client)]
    rows += [{"client": "global", "round": r, "accuracy": g, "method": method} for r, g in enumerate(glob or [], 1)]
    rows += [{"client": "server", "round": r, "bytes_up": 1e6, "bytes_down": 1e6, "epsilon": 0.5 * r}
             for r in range(1, len(values) + 1)]
    return rows


def test_methods_by_round_starts_at_zero_shot_and_averages_clients():
    zero = [{"client": c, "round": 0, "accuracy": 0.2, "method": "zero-shot"} for c in range(2)]
    per_seed = [{"zero-shot": zero, "fedit": _rows("fedit", [[0.4, 0.6], [0.8, 1.0]], glob=[0.5, 0.7])}]
    fig = charts.methods_by_round(per_seed)
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].lines}
    assert lines["fedit (clients' own test)"] == ([0, 1, 2], [0.2, 0.5, 0.9])
    assert lines["fedit (global test)"][1] == [0.5, 0.7]  # zero-shot had no global row: no round 0
    charts.to_svg(fig)


def test_charts_with_nothing_to_draw_are_none():
    per_seed = [{"zero-shot": [{"client": 0, "round": 0, "accuracy": float("nan")}]}]
    assert charts.methods_by_round(per_seed) is None
    assert charts.client_spread(per_seed) is None
    assert charts.bytes_by_round(per_seed) is None and charts.epsilon_by_round(per_seed) is None


def test_cumulative_bytes_and_epsilon():
    per_seed = [{"fedit": _rows("fedit", [[0.5], [0.5], [0.5]])}]
    (line,) = charts.bytes_by_round(per_seed).axes[0].lines
    assert list(line.get_ydata()) == [2.0, 4.0, 6.0]
    (line,) = charts.epsilon_by_round(per_seed).axes[0].lines
    assert list(line.get_ydata()) == [0.5, 1.0, 1.5]


# --- a real browser -------------------------------------------------------------------------------

@pytest.mark.browser
def test_report_renders_in_headless_chromium(compared, tmp_path):
    if chromium_path() is None:
        if os.environ.get("FEDLORA_REQUIRE_BROWSER"):
            pytest.fail("FEDLORA_REQUIRE_BROWSER is set but no Chromium was found (apt-get install chromium)")
        pytest.skip("no Chromium on this machine (.ci/run installs it)")
    shot = tmp_path / "report.png"
    page = open_report(compared / "report.html", shot)
    assert page["errors"] == [] and page["requests"] == []
    assert page["svg"] >= 4 and page["img"] >= 3 and page["broken_img"] == 0
    assert page["title"] == f"fedlora report: {compared.name}"
    assert shot.stat().st_size > 20_000
    keep = os.environ.get("FEDLORA_SCREENSHOT_DIR")  # CI keeps it for a maintainer to look at
    if keep:
        shutil.copy(shot, os.path.join(keep, "report.png"))
