"""Accountants by name: the registry, the upper-bound attribute training reads, the old import paths, and the
import graph of the privacy package (no cycle)."""

from __future__ import annotations

import ast
import math
import pathlib
import subprocess
import sys

import pytest

from monai_dp import privacy
from monai_dp.engines.config import DPSettings
from monai_dp.privacy import (
    ACCOUNTANTS,
    DPAccountant,
    GDPAccountant,
    accountant_class,
    accountant_is_upper_bound,
    accountant_names,
    create_accountant,
    register_accountant,
    unregister_accountant,
)
from monai_dp.utils.errors import DPConfigurationError

PRIVACY_DIR = pathlib.Path(privacy.__file__).parent


class ToyAccountant(DPAccountant):
    """ε = steps × q / σ: not a DP analysis, just something distinct to find by name."""

    name = "toy"
    is_upper_bound = False

    @staticmethod
    def compute_epsilon(history, delta):
        return sum(n * q / sigma for sigma, q, n in history)


@pytest.fixture
def toy():
    register_accountant("toy", ToyAccountant)
    yield ToyAccountant
    unregister_accountant("toy")


def test_built_in_names_and_classes():
    assert ACCOUNTANTS == ("rdp", "prv", "gdp", "pld")
    assert accountant_names()[:4] == ACCOUNTANTS
    for name in ACCOUNTANTS:
        cls = accountant_class(name)
        assert cls.name == name and type(create_accountant(name.upper())) is cls


def test_a_registered_accountant_is_created_by_name_and_round_trips(toy):
    assert "toy" in accountant_names() and accountant_class("Toy") is toy
    acc = create_accountant("toy")
    assert type(acc) is toy
    acc.step(2.0, 0.5, 4)
    assert acc.get_epsilon(1e-5) == 1.0 and acc.max_extra_steps(2.0, 1e-5, 2.0, 0.5, 100) == 4
    other = create_accountant("toy")
    other.load_state_dict(acc.state_dict())
    assert other.history == [(2.0, 0.5, 4)] and other.get_epsilon(1e-5) == 1.0
    assert not accountant_is_upper_bound("toy")


def test_unregistered_names_are_gone_and_built_ins_stay(toy):
    unregister_accountant("toy")
    with pytest.raises(ValueError, match=r"`accountant` must be one of \['rdp', 'prv', 'gdp', 'pld'\], got 'toy'\."):
        create_accountant("toy")
    register_accountant("toy", toy)  # for the fixture's teardown
    with pytest.raises(ValueError, match=r"`accountant` must be one of \['toy'\], got 'rdp'\."):
        unregister_accountant("rdp")


@pytest.mark.parametrize("name, cls, err, match", [
    ("rdp", GDPAccountant, ValueError, r"`cls.name` must be 'rdp', the name it is registered under, got 'gdp'\."),
    ("gdp", type("OtherGDP", (GDPAccountant,), {}), ValueError,
     r"`name` must be not a built-in accountant \['rdp', 'prv', 'gdp', 'pld'\], got 'gdp'\. Register"),
    ("Toy", ToyAccountant, ValueError, r"`name` must be a non-empty lower-case str, got 'Toy'\."),
    ("toy", object, TypeError, r"`cls` must be a subclass of DPAccountant, got 'object'\."),
    ("bad", type("Bad", (DPAccountant,), {"name": "bad", "is_upper_bound": 1}), TypeError,
     r"`cls.is_upper_bound` must be a bool, got 'int'\."),
])
def test_register_refuses(name, cls, err, match):
    with pytest.raises(err, match=match):
        register_accountant(name, cls)
    assert accountant_names() == ACCOUNTANTS


def test_upper_bound_attribute_is_what_training_refuses_without_allow_approximate():
    """The settings refuse exactly the accountants whose ε is not an upper bound (``gdp``), and accept them
    when approximate accounting is allowed."""
    assert [accountant_is_upper_bound(n) for n in ACCOUNTANTS] == [True, True, False, True]
    for name in ACCOUNTANTS:
        assert create_accountant(name).is_upper_bound is accountant_is_upper_bound(name)
        kwargs = {"target_epsilon": 1.0, "target_delta": 1e-5, "noise_multiplier": None, "max_grad_norm": 1.0,
                  "accountant": name, "max_physical_batch_size": None}
        if accountant_is_upper_bound(name):
            assert DPSettings(**kwargs).accountant == name
        else:
            with pytest.raises(DPConfigurationError, match="allow_approximate_accounting=True"):
                DPSettings(**kwargs)
        assert DPSettings(**kwargs, allow_approximate_accounting=True).accountant == name


def test_old_import_paths_still_work():
    from monai_dp.privacy import accountant_prv, accountant_rdp, mechanism
    from monai_dp.privacy.accountants import ACCOUNTANTS as OLD_ACCOUNTANTS
    from monai_dp.privacy.accountants import (
        PRV_MAX_GRID,
        RDP_EXTRA_ORDERS,
        Entry,
        PLDAccountant,
        PRVAccountant,
        RDPAccountant,
        _prv_domain,
        _rdp_per_step,
    )
    from monai_dp.privacy.accountants import create_accountant as old_create
    from monai_dp.privacy.pld import (
        Mechanism,
        compose_epsilon,
        max_steps_within_budget,
        privacy_profile,
    )
    from monai_dp.privacy.pld import PLDAccountant as PLDFromPld

    assert OLD_ACCOUNTANTS is ACCOUNTANTS and old_create is create_accountant and Entry is mechanism.Entry
    assert PLDAccountant is PLDFromPld is privacy.PLDAccountant and Mechanism is privacy.Mechanism
    assert PRVAccountant is privacy.PRVAccountant and RDPAccountant is privacy.RDPAccountant
    assert PRV_MAX_GRID == accountant_prv.PRV_MAX_GRID and RDP_EXTRA_ORDERS == accountant_rdp.RDP_EXTRA_ORDERS
    assert _prv_domain is accountant_prv.prv_domain and _rdp_per_step is accountant_rdp.rdp_per_step
    assert compose_epsilon is privacy.compose_epsilon and max_steps_within_budget is privacy.max_steps_within_budget
    assert privacy_profile([Mechanism(1.0, 0.1, 0)], [1.0]) == [0.0] and math.isinf(
        compose_epsilon([Mechanism(0.0, 0.1, 1)], 1e-5))


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        test = node.test if isinstance(node, ast.If) else None
        if test is not None and "TYPE_CHECKING" in ast.unparse(test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _privacy_imports(path: pathlib.Path) -> set[str]:
    """Modules of ``monai_dp.privacy`` that ``path`` imports at run time, at module level or inside functions."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module if node.level == 0 else ".".join(filter(None, ["monai_dp.privacy", node.module]))
            if module == "monai_dp.privacy":
                found |= {f"monai_dp.privacy.{a.name}" for a in node.names
                          if (PRIVACY_DIR / f"{a.name}.py").exists()}
            elif module.startswith("monai_dp.privacy."):
                found.add(module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("monai_dp.privacy.")}
    return found


def test_privacy_package_has_no_import_cycle():
    graph = {f"monai_dp.privacy.{p.stem}": _privacy_imports(p) for p in PRIVACY_DIR.glob("*.py")
             if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(module, path):
        if state.get(module) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, module]))
        if state.get(module) != 2:
            state[module] = 1
            for dep in sorted(graph.get(module, ())):
                visit(dep, [*path, module])
            state[module] = 2

    assert "monai_dp.privacy.mechanism" in graph["monai_dp.privacy.accountant_base"]  # the parser sees imports
    for module in sorted(graph):
        visit(module, [])


def test_every_privacy_module_imports_alone_without_ignite_or_torch_nn():
    modules = sorted(f"monai_dp.privacy.{p.stem}" for p in PRIVACY_DIR.glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] == 'ignite' or m == 'torch.nn' or m.startswith('torch.nn.')]\n"
            "sys.exit(str(bad) if bad else 0)\n")
    for first in modules:  # each module first in a fresh interpreter: an import cycle fails there
        result = subprocess.run([sys.executable, "-c", f"import {first}\n" + code], check=False,
                                capture_output=True, text=True)
        assert result.returncode == 0, (first, result.stdout + result.stderr)
