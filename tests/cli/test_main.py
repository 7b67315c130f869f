"""The one entry point: the ``monai-dp`` console script and ``python -m monai_dp`` run :func:`monai_dp.cli.main`."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import monai_dp.__main__
from monai_dp import cli
from monai_dp.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_console_script_and_python_m_run_the_same_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["monai-dp"].partition(":")
    assert getattr(importlib.import_module(module), name) is main is monai_dp.__main__.main


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_command_is_dispatched_with_the_rest_of_the_arguments(command, monkeypatch):
    module = importlib.import_module(cli.COMMANDS[command])
    seen = []
    monkeypatch.setattr(module, "main", lambda argv: seen.append(argv) or 7)
    assert main([command, "--flag", "x"]) == 7
    assert seen == [["--flag", "x"]]


def test_help_lists_the_commands_and_succeeds(capsys):
    assert main(["--help"]) == 0 and main(["-h"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("demo", "ledger", "audit", "bundle"))


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_no_or_unknown_command_is_a_usage_error(argv, capsys):
    assert main(argv) == 2
    assert "usage: monai-dp {demo,ledger,audit,bundle}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "audit"])
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse prints the help and exits 0
        main([command, "--help"])
    assert exit_.value.code == 0 and f"usage: monai-dp {command}" in capsys.readouterr().out


def test_python_m_monai_dp_runs_the_ledger_alone(tmp_path):
    """``python -m monai_dp ledger ...`` in a fresh interpreter works and loads neither the audit nor the demo."""
    ledger = tmp_path / "ledger.db"
    code = """if True:
        import runpy, sys
        sys.argv = ["monai_dp", "ledger", "init", "--ledger", sys.argv[1], "--dataset-id", "ds", "--epsilon", "1",
                    "--delta", "1e-5"]
        try:
            runpy.run_module("monai_dp", run_name="__main__")
        except SystemExit as exit_:
            rc = exit_.code
        print("rc", rc, any(m in sys.modules for m in ("monai_dp.cli.audit", "monai_dp.cli.demo")))
    """
    done = subprocess.run([sys.executable, "-c", code, str(ledger)], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.splitlines()[-1] == "rc 0 False", done.stderr
    assert "Dataset 'ds' registered" in done.stdout and ledger.is_file()
