"""Command line: ``monai-dp demo``, ``monai-dp ledger ...``, ``monai-dp audit ...`` (or ``python -m monai_dp ...``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "monai_dp.demo", "ledger": "monai_dp.ledger_cli", "audit": "monai_dp.audit_cli"}
    if not argv or argv[0] not in commands:
        print("usage: monai-dp {demo,ledger,audit} [options]   (monai-dp COMMAND --help for its options)", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
