"""``monai-dp ledger``: register data sets in a privacy ledger and read its account.

    monai-dp ledger init --ledger PATH --dataset-id ID --epsilon E --delta D [--unit record|patient]
    monai-dp ledger show --ledger PATH [--dataset-id ID]
    monai-dp ledger export --ledger PATH [--dataset-id ID] [--format json|markdown] [--output FILE]
    monai-dp ledger check --ledger PATH --dataset-id ID --noise-multiplier S --sample-rate Q --steps N
    monai-dp ledger verify --ledger PATH [--expect-head HEX]
    monai-dp ledger backup --ledger PATH --output FILE
    monai-dp ledger release --ledger PATH RUN
    monai-dp ledger migrate --ledger OLD --output NEW
    monai-dp ledger fingerprint --datalist FILE [--key training]

``show``, ``export``, ``verify`` and ``backup`` only read the ledger (they work on a read-only file or folder).
Exit codes: 0 success, 3 the budget refuses the run (``check``), 4 the ledger fails its integrity check, 2 any
other error (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

from monai_dp.cli.ledger_text import account_text
from monai_dp.utils.errors import LedgerIntegrityError, PrivacyBudgetExhaustedError
from monai_dp.utils.validation import error_message

__all__ = ["main"]

EXIT_ERROR = 2
EXIT_BUDGET = 3
EXIT_INTEGRITY = 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-dp ledger", description="Persistent privacy ledger (SQLite).")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str, dataset_required: bool = False, dataset: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--ledger", required=True, help="the ledger file (its folder must exist)")
        if dataset:
            p.add_argument("--dataset-id", required=dataset_required,
                           help="the data set" if dataset_required else "the data set (default: all data sets)")
        return p

    init = command("init", "register a data set and its total budget (ε, δ)", dataset_required=True)
    init.add_argument("--epsilon", type=float, required=True)
    init.add_argument("--delta", type=float, required=True)
    init.add_argument("--unit", default="record", choices=["record", "patient"], help="the protected unit")
    init.add_argument("--description", default="")
    command("show", "print the account: budgets, ε spent, runs")
    export = command("export", "write the account as JSON or markdown")
    export.add_argument("--format", default="json", choices=["json", "markdown"])
    export.add_argument("--output", help="file to write (default: stdout)")
    check = command("check", "how many steps of a planned run fit the budget now (reserves nothing)",
                    dataset_required=True)
    check.add_argument("--noise-multiplier", type=float, required=True)
    check.add_argument("--sample-rate", type=float, required=True)
    check.add_argument("--steps", type=int, required=True, help="planned steps")
    check.add_argument("--unit", default="record", choices=["record", "patient"])
    check.add_argument("--group-size", type=int, help="records per patient, for a record-level run on a "
                       "patient-level budget")
    verify = command("verify", "check the ledger's hash chain, tables and triggers; print its head", dataset=False)
    verify.add_argument("--expect-head", help="a head copied earlier (run report, export): it must be in the chain")
    command("backup", "copy the ledger with SQLite's online backup API (its -wal included), verified",
            dataset=False).add_argument("--output", dest="new_file", required=True,
                                        help="the new file (never overwritten)")
    release = command("release", "mark a running run whose process died (e.g. on another host) interrupted",
                      dataset=False)
    release.add_argument("run_id", type=int, metavar="RUN", help="the run's id (`monai-dp ledger show`)")
    command("migrate", "write a schema-1 ledger as a new hash-chained ledger (the old file is not changed)",
            dataset=False).add_argument("--output", dest="new_file", required=True, help="the new ledger file")
    fp = sub.add_parser("fingerprint", help="the dataset id of a MONAI datalist (JSON)")
    fp.add_argument("--datalist", required=True)
    fp.add_argument("--key", default="training", help="the list in the datalist (default: training)")
    fp.add_argument("--keys", nargs="+", default=None, help="identifying keys (default: patient_id image label)")
    return parser


def _init(args) -> str:
    from monai_dp.privacy.ledger import PrivacyLedger

    with PrivacyLedger(args.ledger) as ledger:
        new = ledger.init_dataset(args.dataset_id, args.epsilon, args.delta, args.unit, args.description)
    what = "registered" if new else "was already registered (nothing changed)"
    return (f"Dataset {args.dataset_id!r} {what} in {args.ledger} with budget ε = {args.epsilon:g}, "
            f"δ = {args.delta:g} ({args.unit}-level).\n")


def _export(args) -> str:
    from monai_dp.privacy.ledger import PrivacyLedger

    with PrivacyLedger(args.ledger, read_only=True) as ledger:
        account = ledger.export(args.dataset_id)
    if args.command == "show" or args.format == "markdown":
        return account_text(account, markdown=args.command == "export")
    return json.dumps(account, indent=2, ensure_ascii=False) + "\n"


def _check(args) -> str:
    from monai_dp.privacy.ledger import PrivacyLedger

    with PrivacyLedger(args.ledger, create=False) as ledger:
        plan = ledger.check_run(args.dataset_id, args.noise_multiplier, args.sample_rate, args.steps, args.unit,
                                args.group_size)
    fits = "all" if plan.allowed_steps == plan.planned_steps else "only"
    return (f"{fits} {plan.allowed_steps} of {plan.planned_steps} steps fit the budget of {plan.dataset_id!r} "
            f"(ε = {plan.budget_epsilon:g}, δ = {plan.budget_delta:g}): ε {plan.spent_epsilon:.4g} now, "
            f"{plan.epsilon_after:.4g} after them.\n")


def _verify(args) -> str:
    from monai_dp.privacy.ledger import PrivacyLedger

    with PrivacyLedger(args.ledger, read_only=True) as ledger:
        state = ledger.verify(args.expect_head)
    text = (f"Ledger {args.ledger} is intact: {state.events} events in its hash chain, {state.datasets} data set(s), "
            f"{state.runs} run(s).\nhead {state.head}\n")
    if state.expected_at is not None:
        text += (f"The expected head is event {state.expected_at} of {state.events}: the ledger holds everything "
                 f"it held then, and {state.events - state.expected_at} event(s) since.\n")
    return text


def _backup(args) -> str:
    from monai_dp.privacy.ledger import PrivacyLedger

    with PrivacyLedger(args.ledger, read_only=True) as ledger:
        state = ledger.backup(args.new_file)
    return (f"Backed up {args.ledger} to {args.new_file} (online backup, verified: {state.events} events, "
            f"{state.runs} run(s)).\nhead {state.head}\n")


def _release(args) -> str:
    from monai_dp.privacy.ledger import PrivacyLedger

    with PrivacyLedger(args.ledger, create=False) as ledger:
        run = ledger.interrupt_run(args.run_id)
        head = ledger.head()
    return (f"Run {run['run_id']} on dataset {run['dataset_id']!r} (by {run['user']}@{run['host']}, pid {run['pid']}) "
            f"marked interrupted: it counts the {run['steps_taken']} step(s) it claimed, and if its process is still "
            f"alive it cannot claim another.\nhead {head}\n")


def _migrate(args) -> str:
    from monai_dp.privacy.ledger_migrate import migrate_ledger

    state = migrate_ledger(args.ledger, args.new_file)
    return (f"Migrated {args.ledger} (schema version 1, unchanged) to {args.new_file}: {state.datasets} data set(s), "
            f"{state.runs} run(s), chained as they were. Train on {args.new_file} from now on.\nhead {state.head}\n")


def _fingerprint(args) -> str:
    from monai_dp.privacy.fingerprint import DEFAULT_KEYS, dataset_fingerprint

    data = json.loads(Path(args.datalist).read_text())
    if isinstance(data, dict) and args.key not in data:
        raise ValueError(error_message("--key", f"a list in {args.datalist}, one of {sorted(data)}", args.key))
    records = data[args.key] if isinstance(data, dict) else data
    return dataset_fingerprint(records, tuple(args.keys or DEFAULT_KEYS)) + "\n"


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return EXIT_ERROR if exit_.code else 0
    handlers = {"init": _init, "show": _export, "export": _export, "check": _check, "verify": _verify,
                "backup": _backup, "release": _release, "migrate": _migrate, "fingerprint": _fingerprint}
    try:
        text = handlers[args.command](args)
        if getattr(args, "output", None):
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
    except PrivacyBudgetExhaustedError as err:
        print(err, file=sys.stderr)
        return EXIT_BUDGET
    except LedgerIntegrityError as err:
        print(f"monai-dp ledger {args.command}: {err}", file=sys.stderr)
        return EXIT_INTEGRITY
    except (ValueError, TypeError, OSError, RuntimeError, sqlite3.Error) as err:
        print(f"monai-dp ledger {args.command}: {err}", file=sys.stderr)
        return EXIT_ERROR
    return 0
