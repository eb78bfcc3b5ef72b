"""`gigafactory simulate`: JSON output, tables, the HTML report, and one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gigafactory.errors import UserError
from gigafactory.sim.commands import register


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    # Only our command, so these tests do not depend on other packages' commands.
    a = typer.Typer()
    register(a)

    @a.callback()
    def _root() -> None: ...

    return a


def test_json_output(app: typer.Typer) -> None:
    res = CliRunner().invoke(app, ["simulate", "--gpus", "16384", "--days", "54", "--replicas", "20", "--json",
                                   "--profile", "llama3-h100"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("interruptions_mean", "goodput_mean", "goodput_ci95", "best_checkpoint_interval_s"):
        assert key in out
    assert out["goodput_ci95"][0] <= out["goodput_mean"] <= out["goodput_ci95"][1]
    assert 350 < out["interruptions_mean"] < 580
    assert out["interruptions_per_day"] == pytest.approx(out["interruptions_mean"] / 54)


def test_fixed_interval_and_blocking_mode(app: typer.Typer) -> None:
    args = ["simulate", "--gpus", "4096", "--days", "10", "--replicas", "4", "--json"]
    res = CliRunner().invoke(app, [*args, "--checkpoint-interval", "900", "--checkpoint-mode", "blocking"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["checkpoint_interval_s"] == 900
    assert out["checkpoint_mode"] == "blocking"


def test_table_output(app: typer.Typer) -> None:
    res = CliRunner().invoke(app, ["simulate", "--gpus", "1024", "--days", "5", "--replicas", "4"])
    assert res.exit_code == 0, res.output
    assert "goodput" in res.stdout and "Young/Daly" in res.stdout and "lost GPU-hours by cause" in res.stdout


def test_html_report_is_self_contained(app: typer.Typer, tmp_path: Path) -> None:
    path = tmp_path / "sim.html"
    args = ["simulate", "--gpus", "16384", "--days", "7", "--replicas", "4", "--json", "--report", str(path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc=", text)  # plotly.js inline: works offline
    assert text.count("Plotly.newPlot") == 3  # timeline, interval sweep, lost GPU-hours
    assert "Timeline of replica 0" in text and "Goodput versus checkpoint interval" in text


def test_failure_model_file(app: typer.Typer, tmp_path: Path) -> None:
    good = tmp_path / "modes.json"
    good.write_text(json.dumps([{"name": "gremlin", "scope": "job", "rate_per_day": 2.0}]))
    args = ["simulate", "--gpus", "64", "--days", "10", "--replicas", "50", "--no-maintenance", "--json"]
    res = CliRunner().invoke(app, [*args, "--failure-model", str(good)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["interruptions_mean"] == pytest.approx(20, rel=0.15)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "gremlin", "scope": "job", "rate_per_day": 0}]))
    res = CliRunner().invoke(app, [*args, "--failure-model", str(bad)])
    assert isinstance(res.exception, UserError) and "rate_per_day" in str(res.exception)


@pytest.mark.parametrize(
    "extra",
    [
        ["--gpus", "0"],
        ["--gpus", "-16"],
        ["--gpus", "8", "--days", "0"],
        ["--gpus", "8", "--days", "-2"],
        ["--gpus", "8", "--rate-scale", "-1"],
        ["--gpus", "8", "--days", "1", "--checkpoint-interval", "90000"],
    ],
)
def test_bad_input_is_a_user_error(app: typer.Typer, extra: list[str]) -> None:
    res = CliRunner().invoke(app, ["simulate", *extra])
    assert isinstance(res.exception, UserError), res.output
    assert "\n" not in str(res.exception)


def test_real_command_prints_one_line_and_exits_2() -> None:
    # End to end through gigafactory.cli.main: no traceback, one line on stderr, exit code 2.
    code = "import sys; sys.argv = ['gigafactory', 'simulate', '--gpus', '0']; from gigafactory.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "gpus" in lines[0] and "Traceback" not in proc.stderr
