"""Command line: one entry point, ``monai-dp COMMAND ...`` (the console script) or ``python -m monai_dp COMMAND ...``.

    monai-dp demo   [options]   a DP training run on synthetic images (:mod:`monai_dp.cli.demo`)
    monai-dp ledger COMMAND     the persistent privacy ledger (:mod:`monai_dp.cli.ledger`)
    monai-dp audit  [options]   membership-inference audit of a recipe (:mod:`monai_dp.cli.audit`)
    monai-dp bundle COMMAND     list or export the shipped bundles and configs (:mod:`monai_dp.cli.bundle`)

Each command's module is imported only when it is run: ``monai-dp ledger`` loads neither the audit nor the demo.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "EXIT_INTERRUPTED", "DefaultsHelpFormatter", "help_text", "main"]

COMMANDS = {"demo": "monai_dp.cli.demo", "ledger": "monai_dp.cli.ledger", "audit": "monai_dp.cli.audit",
            "bundle": "monai_dp.cli.bundle"}
SUMMARIES = {
    "demo": "a DP training run on generated images, stopped at its privacy budget (about 15 s on 2 idle CPU cores)",
    "ledger": "a dataset's total privacy budget across runs: init, show, export, check, verify, backup, ...",
    "audit": "membership-inference audit of a training recipe (per patient, against the DP bound), or --self-audit",
    "bundle": "list the shipped MONAI bundles and configs, or export one",
}
USAGE = "usage: monai-dp {demo,ledger,audit,bundle} [options]   (monai-dp COMMAND --help for its options)"
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """argparse help with ``(default: X)`` after the options whose default is a value (not ``None``, off or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return text
        value = f"{default:.4g}" if isinstance(default, float) else "%(default)s"
        return f"{text} (default: {value})" if text else f"default: {value}"


def help_text() -> str:
    """The usage line, then every command with one line."""
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "Differentially private training for MONAI.", "", "commands:"]
    lines += [f"  {name:<{width}}  {SUMMARIES[name]}" for name in COMMANDS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``monai-dp`` with ``argv`` (default: ``sys.argv[1:]``); its exit code (130 after Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(help_text(), file=sys.stderr)
        return 2
    try:
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    except KeyboardInterrupt:
        print(f"monai-dp {argv[0]}: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
