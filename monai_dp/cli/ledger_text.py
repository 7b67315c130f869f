"""The privacy ledger's account as text: plain (``monai-dp ledger show``) or markdown (``export --format markdown``).

Rendered from :meth:`PrivacyLedger.export <monai_dp.privacy.ledger.PrivacyLedger.export>` (a dict), so this
module imports nothing from the ledger.
"""

from __future__ import annotations

__all__ = ["account_text", "format_account", "run_warnings"]

SEEDED_NOISE = "reproducible noise: not private against someone who knows the seed"


def run_warnings(run: dict) -> list[str]:
    """What a reader of the account must know about a run's guarantee (seeded noise, sampling other than Poisson)."""
    notes = []
    if run.get("noise_seeded") == 1:
        notes.append(SEEDED_NOISE)
    elif run.get("noise_seeded") is None:
        notes.append("noise seeding not recorded (run migrated from a ledger of schema version 1)")
    sampling = run.get("sampling", "poisson")
    if sampling == "unrecorded":
        notes.append("sampling not recorded (run migrated from a ledger of schema version 1)")
    elif sampling != "poisson":
        notes.append(f"sampling {sampling!r}, not Poisson: the ε charged assumes Poisson sampling")
    return notes


def _table(headers: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                *("| " + " | ".join(r) + " |" for r in rows)]
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    return ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in [headers, *rows]]


def _dataset_lines(d: dict, markdown: bool) -> list[str]:
    headers = ["run", "status", "user@host", "started", "finished", "steps", "reserved", "noise_multiplier",
               "sample_rate", "max_grad_norm", "unit", "group_size", "sampling", "note"]
    title = (f"Dataset {d['dataset_id']} ({d['unit']}-level): budget ε = {d['budget_epsilon']:g}, "
             f"δ = {d['budget_delta']:g}")
    running = sum(r["status"] == "running" for r in d["runs"])
    spent = (f"Spent: ε = {d['spent_epsilon']:.4g} of {d['budget_epsilon']:g}, PLD composition of "
             f"{len(d['runs'])} run(s) at δ = {d['budget_delta']:g} (not a sum of ε's)")
    if running:
        spent += f"; with the reservations of {running} running run(s): ε = {d['committed_epsilon']:.4g}"
    lines = ["", f"## {title}" if markdown else title, "",
             f"Registered {d['created_at']} by {d['created_by']}. {d['description']}".rstrip(), spent, ""]
    rows = [[str(r["run_id"]), r["status"], f"{r['user']}@{r['host']}", r["started_at"], r["finished_at"] or "",
             str(r["steps_taken"]), str(r["reserved_steps"]), f"{r['noise_multiplier']:g}",
             f"{r['sample_rate']:g}", f"{r['max_grad_norm']:g}", r["unit"], str(r["group_size"]), r["sampling"],
             r["note"]] for r in d["runs"]]
    lines += _table(headers, rows, markdown) if rows else ["No runs yet."]
    notes = [f"run {r['run_id']}: {note}" for r in d["runs"] for note in run_warnings(r)]
    if notes:
        lines += ["", *(f"- {n}" if markdown else f"  {n}" for n in notes)]
    return lines


def format_account(path: str, head: str, events: int, datasets: list[dict], markdown: bool) -> str:
    """The account of ``datasets`` (:meth:`PrivacyLedger.summary`) with the head of the ledger's hash chain."""
    lines = [f"# Privacy ledger `{path}`\n" if markdown else f"Privacy ledger {path}",
             (f"Hash chain head: {head} ({events} events); keep a copy to check the ledger against it later with "
              "`monai-dp ledger verify --expect-head`.")]
    if not datasets:
        lines.append("No data set registered.")
    for d in datasets:
        lines += _dataset_lines(d, markdown)
    return "\n".join(lines) + "\n"


def account_text(account: dict, markdown: bool = False) -> str:
    """The account :meth:`PrivacyLedger.export <monai_dp.privacy.ledger.PrivacyLedger.export>` returned, as text."""
    return format_account(account["ledger"], account["head"], account["events"], account["datasets"], markdown)
