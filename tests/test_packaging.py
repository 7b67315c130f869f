"""Packaging: license, dependency floors, extras, and a wheel that ships the bundles and shared configs."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from monai_dp.cli import bundle as cli_bundle

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
BUNDLES = sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/metadata.json"))


def _requirement(requirements: list[str], name: str) -> Requirement:
    found = [Requirement(r) for r in requirements if Requirement(r).name == name]
    assert len(found) == 1, f"{name} must be listed once in {requirements}"
    return found[0]


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"{req} must have a lower bound"
    return max(floors)


def test_license_is_an_spdx_expression_with_the_apache_text_at_the_root_and_in_every_bundle():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.strip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 170  # the full text, not a notice
    for name in BUNDLES:  # model-zoo's verify_bundle requires a LICENSE in every bundle
        assert (REPO / "bundles" / name / "LICENSE").read_text() == text, name


def test_the_build_backend_supports_the_spdx_license_fields():
    build = _requirement(PYPROJECT["build-system"]["requires"], "setuptools")
    assert _floor(build) >= Version("77"), "`license = \"...\"` and `license-files` need setuptools 77"
    # the wheel test below builds without isolation, with the setuptools the `test` extra installs
    assert _floor(_requirement(PROJECT["optional-dependencies"]["test"], "setuptools")) >= _floor(build)


def test_dependency_floors_are_at_least_what_the_installed_monai_requires():
    """MONAI 1.6.1 requires torch>=2.8: a lower floor here lets pip pick a torch that MONAI refuses."""
    ours = {name: _floor(_requirement(PROJECT["dependencies"], name)) for name in ("torch", "numpy")}
    for req in map(Requirement, importlib.metadata.requires("monai") or []):
        if req.name in ours and req.marker is None:
            assert ours[req.name] >= _floor(req), f"monai needs {req}; pyproject says {req.name}>={ours[req.name]}"
    assert ours["torch"] >= Version("2.8")


def test_logging_extras_exist_and_the_test_extra_installs_them():
    extras = PROJECT["optional-dependencies"]
    test = {Requirement(r).name for r in extras["test"]}
    for extra, package in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        assert [Requirement(r).name for r in extras[extra]] == [package]
        assert package in test, f"tests of MONAI's handlers need {package}: add it to the `test` extra"


def _copy_source(dest: Path) -> Path:
    """What a source distribution holds, copied without run outputs, caches or git files."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("monai_dp", "bundles", "configs"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    return dest


def _shipped_data() -> set[str]:
    """The data files the wheel must hold, as the CLI selects them from the repository."""
    files = {f"bundles/{name}/{rel.as_posix()}" for name in BUNDLES for rel in cli_bundle.bundle_files(name, REPO)}
    files |= {f"configs/{p.name}" for p in (REPO / "configs").glob("*.json")}
    files |= {f"configs/{rel}" for rel in cli_bundle.SCHEMA.values()}
    return files


def test_wheel_ships_the_bundles_and_configs_and_the_installed_cli_exports_from_it(tmp_path):
    (tmp_path / "src").mkdir()
    source = _copy_source(tmp_path / "src")
    # run outputs left in a bundle folder must not ship
    (source / "bundles" / BUNDLES[0] / "models").mkdir(exist_ok=True)
    (source / "bundles" / BUNDLES[0] / "models" / "model.pt").write_bytes(b"weights")
    (source / "bundles" / BUNDLES[0] / "eval").mkdir(exist_ok=True)
    (source / "bundles" / BUNDLES[0] / "eval" / "metrics.json").write_text("{}")
    out = tmp_path / "wheel"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    done = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(source), "-w",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "is absent from the `packages` configuration" not in done.stdout + done.stderr
    (wheel,) = out.glob("monai_dp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    data = {n.removeprefix("monai_dp/_data/") for n in names if n.startswith("monai_dp/_data/")}
    assert data == _shipped_data()
    assert {f"bundles/{b}/LICENSE" for b in BUNDLES} <= data and "configs/dp_trainer.json" in data
    assert "configs/schema/metadata_schema.json" in data and "configs/log_training_loss.json" in data
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    py = {n for n in names if n.endswith(".py")}
    assert py == {p.relative_to(REPO).as_posix() for p in (REPO / "monai_dp").rglob("*.py")}, "every module ships"

    # install it apart from the checkout and export from the installed copy
    site = tmp_path / "site"
    done = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = tmp_path / "run"
    run.mkdir()
    code = ("import monai_dp, sys; from monai_dp.cli.bundle import data_root; print(data_root()); "
            "sys.exit(monai_dp.cli.main(['bundle', 'export', sys.argv[1], 'out']))")
    done = subprocess.run([sys.executable, "-c", "import monai_dp.cli;" + code, BUNDLES[0]], cwd=run, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.splitlines()[0]) == site / "monai_dp" / "_data"
    exported = {p.relative_to(run / "out" / BUNDLES[0]).as_posix() for p in (run / "out").rglob("*") if p.is_file()}
    assert exported == {rel.as_posix() for rel in cli_bundle.bundle_files(BUNDLES[0], REPO)}
    assert "models/model.pt" not in exported


def test_source_distribution_holds_what_the_wheel_is_built_from(tmp_path):
    """``python -m build`` builds the wheel from the sdist: the data must be in it too."""
    (tmp_path / "src").mkdir()
    source = _copy_source(tmp_path / "src")
    code = "from setuptools import build_meta; import sys; print(build_meta.build_sdist(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sdist")], cwd=source, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (sdist,) = (tmp_path / "sdist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    assert _shipped_data() <= members
    assert {"LICENSE", "setup.py", "pyproject.toml"} <= members
