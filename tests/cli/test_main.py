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


def test_top_level_help_lists_every_command_with_one_line_on_stdout():
    done = subprocess.run([sys.executable, "-m", "monai_dp", "--help"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and done.stderr == ""
    lines = done.stdout.splitlines()
    for command, summary in cli.SUMMARIES.items():
        assert sum(line.split() == [command, *summary.split()] for line in lines) == 1, command
    assert set(cli.SUMMARIES) == set(cli.COMMANDS)


def test_no_command_prints_the_command_list_to_stderr(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert all(summary in err for summary in cli.SUMMARIES.values())


def test_demo_help_imports_neither_torch_nor_monai_and_explains_every_option():
    code = """if True:
        import sys
        from monai_dp.cli import main
        try:
            main(["demo", "--help"])
        except SystemExit as exit_:
            print("rc", exit_.code, any(m in sys.modules for m in ("torch", "monai", "opacus")))
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.splitlines()[-1] == "rc 0 False", done.stderr
    options = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  --")]
    assert options == ["--target-epsilon", "--noise-multiplier", "--max-epochs", "--n-train", "--batch-size",
                       "--accountant", "--seed"]
    text = " ".join(done.stdout.split())
    assert "generated training images (q = batch size / this) (default: 1000)" in text
    assert "training stops before it (default: 3)" in text


def test_audit_defaults_are_the_recipe_the_docs_measured(capsys):
    from monai_dp.cli import audit

    doc = (ROOT / "docs" / "audit.md").read_text()
    recipe = "recipe: --epochs 30 --width 32 --lr 0.1 --momentum 0.9 --batch-size 64"
    assert recipe in doc  # the recipe every measured audit in the doc used
    flags = recipe.split(": ", 1)[1].split()
    defaults = audit._parser().parse_args(["--out", "x", "--synthetic"])
    for flag, value in zip(flags[::2], flags[1::2]):
        assert getattr(defaults, flag[2:].replace("-", "_")) == type(getattr(defaults, flag[2:].replace("-", "_")))(
            value), flag
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for text in ("training epochs of each model (default: 30)", "SGD learning rate (default: 0.1)",
                 "SGD momentum (default: 0.9)", "(default: 32)"):
        assert text in " ".join(out.split()), text


@pytest.mark.parametrize(("command", "required"), [("check", True), ("init", True), ("show", False)])
def test_ledger_help_says_whether_dataset_id_is_required(command, required, capsys):
    assert main(["ledger", command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("--dataset-id DATASET_ID the data set (default: all data sets)" in out) is not required
    assert ("[--dataset-id DATASET_ID]" in out) is not required


def test_ctrl_c_in_audit_is_one_line_and_exit_code_130(monkeypatch, capsys, tmp_path):
    from monai_dp.cli import audit

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(audit, "_run", interrupted)
    assert main(["audit", "--out", str(tmp_path), "--synthetic"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == [(f"monai-dp audit: interrupted; the models finished so far are kept in {tmp_path}: "
                                 "rerun the same command to resume.")]


def test_ctrl_c_in_any_command_is_one_line_and_exit_code_130(monkeypatch, capsys):
    module = importlib.import_module(cli.COMMANDS["ledger"])

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "main", interrupted)
    assert main(["ledger", "show", "--ledger", "x.db"]) == 130
    assert capsys.readouterr().err == "monai-dp ledger: interrupted.\n"


def test_a_bad_audit_argument_is_one_line_and_exit_code_2(capsys, tmp_path):
    assert main(["audit", "--out", str(tmp_path), "--synthetic", "--num-models", "2"]) == 2
    assert capsys.readouterr().err == "monai-dp audit: `num_models` must be an even number >= 4, got 2.\n"
