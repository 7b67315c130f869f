"""The server's aggregate-level privacy account, kept across jobs (invariant 7 and 11 at the federation level).

Client-level DP-FedAvg (:class:`~monai_dp.fl.client_level.ClientLevelDP`) and secure aggregation with distributed
noise (:class:`~monai_dp.fl.secure.DistributedNoise`) account every round of the federation's aggregates. A job that
is submitted again releases more aggregates about the same sites, so its accounting must continue from the earlier
jobs' rounds: the server keeps the account in a file under its NVFlare workspace root (the same folder for every job
on a deployed server, and for every simulator run with the same workspace), one file per ``federation_id``, written
after every round and read when a job starts. A new ``federation_id`` starts a new account, as a new dataset id
does in a site's ledger: use one only for a federation of other sites (other data).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from monai_dp.utils.errors import PrivacyBudgetExhaustedError
from monai_dp.utils.validation import error_message

__all__ = ["ACCOUNTS_FOLDER", "account_file", "federation_id_of", "load_account", "require_round", "save_account"]

logger = logging.getLogger(__name__)

ACCOUNTS_FOLDER = "monai_dp_accounts"  # under the server's workspace root
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _check_id(federation_id: Any) -> str:
    if not isinstance(federation_id, str) or not _ID.match(federation_id):
        raise ValueError(error_message("federation_id", "1 to 128 letters, digits, '.', '_' or '-' (not starting "
                                       "with '.', '_' or '-')", federation_id))
    return federation_id


def federation_id_of(fl_ctx: Any, default: str) -> str:
    """The job's name (NVFlare's job meta ``name``), or ``default`` when the job has none."""
    from nvflare.apis.fl_constant import FLContextKey

    meta = fl_ctx.get_prop(FLContextKey.JOB_META) if fl_ctx is not None else None
    name = meta.get("name") if isinstance(meta, dict) else None
    if not name:
        return default
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name)).lstrip("._-")[:128] or default


def account_file(workspace_root: str, federation_id: str) -> str:
    """``<workspace_root>/monai_dp_accounts/<federation_id>.json``."""
    return os.path.join(os.fspath(workspace_root), ACCOUNTS_FOLDER, f"{_check_id(federation_id)}.json")


def save_account(path: str, federation_id: str, kind: str, state: dict) -> None:
    """Write ``state`` (the mechanism's ``accounting_state()``, plain types) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"federation_id": federation_id, "kind": kind, "state": state}, f, indent=1)
    os.replace(tmp, path)


def load_account(path: str, federation_id: str, kind: str) -> dict | None:
    """The state saved for ``federation_id`` (``None`` when there is none yet: a new account)."""
    if not os.path.isfile(path):
        logger.info("Aggregate-level account of federation_id=%r: new, kept in %s (a new federation_id starts a "
                    "new account).", federation_id, path)
        return None
    with open(path) as f:
        saved = json.load(f)
    if saved.get("federation_id") != federation_id or saved.get("kind") != kind:
        raise ValueError(error_message("account file", f"of federation_id={federation_id!r} and kind={kind!r}",
                                       f"{saved.get('federation_id')!r}, {saved.get('kind')!r} in {path}",
                                       "Give this job its own federation_id."))
    logger.info("Aggregate-level account of federation_id=%r: continued from %s (a new federation_id starts a new "
                "account).", federation_id, path)
    return saved["state"]


def require_round(mechanism: Any, level: str) -> None:
    """Raise :class:`PrivacyBudgetExhaustedError` unless one more round of ``mechanism`` stays within its target."""
    if not mechanism.allows_round():
        raise PrivacyBudgetExhaustedError(
            f"`{level} ε after one more round` must be at most target_epsilon={mechanism.target_epsilon}, got "
            f"{mechanism.epsilon_after_round():.4g} ({mechanism.rounds} rounds accounted so far); no aggregate is "
            "released. Raise the noise_multiplier or the target_epsilon (a new federation_id only for other sites).")
