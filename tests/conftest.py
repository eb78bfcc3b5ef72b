import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, check: bool = False, timeout: float = 600, env: dict | None = None):
    """Run `gigafactory ARGS` in a subprocess, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "gigafactory", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"gigafactory {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def cli_here(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """`gigafactory ARGS` through gigafactory.cli.main in this process, for user errors (no interpreter and torch
    start-up per call; each command keeps one `cli` call in a fresh process): (exit code, stdout, stderr)."""

    def call(*args: str) -> tuple[int, str, str]:
        from gigafactory.cli import main

        monkeypatch.setattr(sys, "argv", ["gigafactory", *args])
        capsys.readouterr()
        env = dict(os.environ)  # commands may set variables for their own process (train: OMP_WAIT_POLICY)
        try:
            main()
            code = 0
        except SystemExit as ex:
            code = int(ex.code or 0)
        finally:
            os.environ.clear()
            os.environ.update(env)
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_run(path)` makes `path` a run directory holding the `tiny` preset's prepared data (tokenizer, personas,
    token arrays of the built-in corpus), prepared once per session: that takes ~2 s, longer than a short run."""
    from gigafactory.train.config import make_config
    from gigafactory.train.loop import Trainer

    src = tmp_path_factory.mktemp("tiny_run") / "run"
    made = Trainer(make_config(model="tiny", run_dir=src, steps=1, dtype="fp32"), quiet=True)
    if made.lock is not None:
        made.lock.release()

    def new(run: Path) -> Path:
        run.mkdir(parents=True)
        shutil.copytree(src / "data", run / "data")
        for name in ("tokenizer.json", "personas.json"):
            shutil.copy(src / name, run / name)
        return run

    return new


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray instance for the whole test session (2 CPUs), shut down at the end."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
