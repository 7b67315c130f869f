"""Command line: one entry point, ``monai-dp COMMAND ...`` (the console script) or ``python -m monai_dp COMMAND ...``.

    monai-dp demo   [options]   a DP training run on synthetic images (:mod:`monai_dp.cli.demo`)
    monai-dp ledger COMMAND     the persistent privacy ledger (:mod:`monai_dp.cli.ledger`)
    monai-dp audit  [options]   membership-inference audit of a recipe (:mod:`monai_dp.cli.audit`)
    monai-dp bundle COMMAND     list or export the shipped bundles and configs (:mod:`monai_dp.cli.bundle`)

Each command's module is imported only when it is run: ``monai-dp ledger`` loads neither the audit nor the demo.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

COMMANDS = {"demo": "monai_dp.cli.demo", "ledger": "monai_dp.cli.ledger", "audit": "monai_dp.cli.audit",
            "bundle": "monai_dp.cli.bundle"}
USAGE = "usage: monai-dp {demo,ledger,audit,bundle} [options]   (monai-dp COMMAND --help for its options)"


def main(argv: list[str] | None = None) -> int:
    """Run ``monai-dp`` with ``argv`` (default: ``sys.argv[1:]``); its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
