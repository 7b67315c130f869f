"""Domain errors of monai_dp."""

from __future__ import annotations

__all__ = [
    "DPConfigurationError",
    "DPIncompatibleModuleError",
    "DatasetError",
    "LedgerIntegrityError",
    "NonFiniteGradientError",
    "PrivacyBudgetExhaustedError",
]


class PrivacyBudgetExhaustedError(RuntimeError):
    """Raised when the privacy budget does not allow the requested (or even one more) step."""


class DPConfigurationError(ValueError):
    """Raised when a trainer setting would void the differential-privacy guarantee."""


class DPIncompatibleModuleError(ValueError):
    """Raised when a network holds layers that cannot train with per-sample gradients.

    ``offenders`` is a list of ``(layer_path, problem, fix)`` triples; the message lists them all.
    """

    def __init__(self, offenders: list[tuple[str, str, str]]):
        self.offenders = list(offenders)
        lines = [f"  - `{path}`: {problem} Fix: {fix}" for path, problem, fix in self.offenders]
        super().__init__(
            f"`network` must be compatible with per-sample gradients, got {len(self.offenders)} "
            "incompatible layer(s):\n" + "\n".join(lines)
        )


class DatasetError(ValueError):
    """Raised when a dataset cannot be used as given; the message names the file, the record and the problem."""


class LedgerIntegrityError(RuntimeError):
    """Raised when a privacy ledger fails its integrity check (hash chain, tables, triggers, emptied file).

    The message names the ledger file and what changed (which table, row and column); nothing is trained on it.
    """


class NonFiniteGradientError(RuntimeError):
    """Raised when an item's loss or gradient is NaN or infinite; nothing of that step was applied."""
