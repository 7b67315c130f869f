"""Accountants by name: the built-in ones, any registered with :func:`register_accountant`, and whether each
name's ε is a guaranteed upper bound (what training checks before it accepts an accountant)."""

from __future__ import annotations

from monai_dp.privacy.accountant_base import DPAccountant
from monai_dp.privacy.accountant_gdp import GDPAccountant
from monai_dp.privacy.accountant_pld import PLDAccountant
from monai_dp.privacy.accountant_prv import PRVAccountant
from monai_dp.privacy.accountant_rdp import RDPAccountant
from monai_dp.utils.validation import check_choice, error_message

__all__ = ["ACCOUNTANTS", "accountant_class", "accountant_is_upper_bound", "accountant_names", "create_accountant",
           "register_accountant", "unregister_accountant"]

_BUILT_IN: tuple[type[DPAccountant], ...] = (RDPAccountant, PRVAccountant, GDPAccountant, PLDAccountant)
ACCOUNTANTS = tuple(cls.name for cls in _BUILT_IN)  # the built-in names; accountant_names() adds registered ones
_REGISTRY: dict[str, type[DPAccountant]] = {cls.name: cls for cls in _BUILT_IN}


def register_accountant(name: str, cls: type[DPAccountant]) -> type[DPAccountant]:
    """Make ``create_accountant(name)`` build ``cls``; returns ``cls``.

    ``cls`` must subclass :class:`DPAccountant` with ``cls.name == name`` (lower case; the name is saved in its
    state and checked on load) and a bool ``is_upper_bound``. Built-in names cannot be replaced.
    """
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(error_message("name", "a non-empty lower-case str", name))
    if not (isinstance(cls, type) and issubclass(cls, DPAccountant)):
        raise TypeError(error_message("cls", "a subclass of DPAccountant", getattr(cls, "__name__", type(cls).__name__)))
    if cls.name != name:
        raise ValueError(error_message("cls.name", f"{name!r}, the name it is registered under", cls.name))
    if not isinstance(cls.is_upper_bound, bool):
        raise TypeError(error_message("cls.is_upper_bound", "a bool", type(cls.is_upper_bound).__name__))
    if name in ACCOUNTANTS and _REGISTRY[name] is not cls:
        raise ValueError(error_message("name", f"not a built-in accountant {list(ACCOUNTANTS)}", name,
                                       "Register the accountant under a name of its own."))
    _REGISTRY[name] = cls
    return cls


def unregister_accountant(name: str) -> None:
    """Remove an accountant added by :func:`register_accountant` (built-in ones stay)."""
    name = check_choice("accountant", name, tuple(n for n in _REGISTRY if n not in ACCOUNTANTS))
    del _REGISTRY[name]


def accountant_names() -> tuple[str, ...]:
    """Every name :func:`create_accountant` accepts: the built-in ones first, then the registered ones."""
    return tuple(_REGISTRY)


def accountant_class(name: str) -> type[DPAccountant]:
    """The accountant class registered under ``name`` (case-insensitive)."""
    return _REGISTRY[check_choice("accountant", name, accountant_names())]


def accountant_is_upper_bound(name: str) -> bool:
    """Whether the ε of accountant ``name`` is a guaranteed upper bound (``False`` for an approximation: ``"gdp"``)."""
    return accountant_class(name).is_upper_bound


def create_accountant(name: str) -> DPAccountant:
    """A new, empty accountant: ``"rdp"``, ``"prv"``, ``"gdp"``, ``"pld"`` or a registered name (case-insensitive)."""
    return accountant_class(name)()
