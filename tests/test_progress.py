"""Progress: plain lines, one per round, when output is not a terminal; one rich display on a terminal.

pytest's captured output is not a terminal, so `fedlora run` under capsys is the log-file case.
"""

from __future__ import annotations

import io
import re

from rich.console import Console

from fedlora.cli import main
from fedlora.report import progress as progress_mod
from fedlora.report.progress import RoundProgress, track_steps

ROWS = [{"client": 0, "train_loss": 0.5}, {"client": "server", "bytes_up": 2000, "bytes_down": 2000}]


def test_run_output_is_plain_one_line_per_round_and_names_the_run_dir_once(tmp_path, capsys, caplog):
    code = main(["run", "tiny", "--set", f"output_dir={tmp_path}", "--set", "fl.rounds=3",
                 "--set", "train.local_steps=2", "--set", "eval.max_examples=8"])
    assert code == 0
    out, err = capsys.readouterr()
    text = out + err + caplog.text
    assert "\r" not in text and "\x1b[" not in text  # no carriage returns, no escape codes
    rounds = re.findall(r"^\[fedit\] round (\d+) \|", err, flags=re.MULTILINE)
    assert rounds == ["1", "2", "3"]  # one line per round, nothing per step
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert text.count(str(run_dir)) == 1 and f"results: {run_dir}" in out


def test_quiet_prints_no_round_lines(tmp_path, capsys):
    assert main(["run", "tiny", "--set", f"output_dir={tmp_path}", "--set", "fl.rounds=1", "--quiet"]) == 0
    assert "round 1" not in "".join(capsys.readouterr())


def test_plain_console_writes_exact_lines():
    buf = io.StringIO()
    bar = RoundProgress("fedit", 2, console=Console(file=buf, width=80))
    assert track_steps([1, 2, 3], "round 1 client 0") == [1, 2, 3]  # no display on screen: untouched
    bar.update(1, ROWS)
    bar.update(2, ROWS)
    bar.close()
    assert buf.getvalue().splitlines() == ["[fedit] round 1 | loss 0.500 | 4 kB sent | 0.0s",
                                           "[fedit] round 2 | loss 0.500 | 4 kB sent | 0.0s"]


def test_terminal_gets_one_display_with_a_step_row_and_keeps_the_round_lines():
    buf = io.StringIO()
    bar = RoundProgress("fedit", 2, console=Console(file=buf, width=80, force_terminal=True))
    try:
        assert progress_mod._LIVE == [bar]
        assert list(track_steps(range(4), "round 1 client 0")) == [0, 1, 2, 3]
        assert len(bar._bar.tasks) == 2  # the step row joined the round bar's display: no nested bar
        bar.update(1, ROWS)
    finally:
        bar.close()
    bar.close()  # twice is harmless (the finally in run_method and an error path may both call it)
    assert progress_mod._LIVE == []
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert "[fedit] round 1 | loss 0.500" in plain and "\x1b[" in buf.getvalue()
