"""``monai-dp bundle``: the bundles and shared configs that ship with the package.

    monai-dp bundle list                      the bundles and config pieces that can be exported
    monai-dp bundle export NAME DIR [--force]

``export`` copies bundle NAME (``configs/``, ``docs/``, ``LICENSE``) to ``DIR/NAME``, ready for
``python -m monai.bundle run --bundle_root DIR/NAME ...``; for a shared config piece (``configs/NAME.json``, e.g.
``dp_trainer`` to merge into a model-zoo bundle, or ``metadata_schema``, the schema that
``python -m monai.bundle verify_metadata --filepath`` needs offline) it writes ``DIR/NAME.json``. Nothing is
overwritten unless ``--force`` is given; with it, the shipped files replace their copies and every other file in
the destination is kept.

The files come from ``monai_dp/_data`` in an installed wheel, or from the repository (``bundles/``, ``configs/``)
in a source checkout or an editable install. Exit codes: 0 success, 2 error (message on stderr).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from monai_dp.utils.validation import error_message

__all__ = ["BUNDLE_FILES", "SCHEMA", "bundle_files", "config_files", "data_root", "export", "main", "names"]

# what a bundle ships, relative to bundles/<name>/ (setup.py ships the same patterns; tests/test_packaging.py
# checks that the wheel holds exactly these files)
BUNDLE_FILES = ("LICENSE", "configs/*.json", "configs/*.conf", "docs/*.md")
# shared config pieces are configs/*.json (exported by their stem, e.g. dp_trainer), plus the schema:
SCHEMA = {"metadata_schema": "schema/metadata_schema.json"}
EXIT_ERROR = 2


def data_root() -> Path:
    """The folder that holds ``bundles/`` and ``configs/``: ``monai_dp/_data`` when installed, else the repository."""
    package = Path(__file__).resolve().parents[1]
    for root in (package / "_data", package.parent):
        if (root / "bundles").is_dir() and (root / "configs" / "schema").is_dir():
            return root
    raise RuntimeError(error_message("monai_dp's data folder", "monai_dp/_data or a source checkout with bundles/",
                                     str(package), "Reinstall monai_dp from a wheel or a full checkout."))


def config_files(root: Path | None = None) -> dict[str, str]:
    """The config pieces that can be exported: name -> file relative to ``configs/``."""
    root = data_root() if root is None else root
    return {**{p.stem: p.name for p in (root / "configs").glob("*.json")}, **SCHEMA}


def names(root: Path | None = None) -> tuple[list[str], list[str]]:
    """The bundles (folders with ``configs/metadata.json``) and the config pieces that can be exported."""
    root = data_root() if root is None else root
    bundles = sorted(p.parent.parent.name for p in (root / "bundles").glob("*/configs/metadata.json"))
    return bundles, sorted(config_files(root))


def bundle_files(name: str, root: Path | None = None) -> list[Path]:
    """The shipped files of bundle ``name``, relative to its folder (no run outputs such as ``models/``)."""
    folder = (data_root() if root is None else root) / "bundles" / name
    found = {p.relative_to(folder) for pattern in BUNDLE_FILES for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def _refuse_overwrite(dest: Path, force: bool, constraint: str) -> None:
    if force or not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return
    what = "a folder that is not empty" if dest.is_dir() else "a file"
    raise FileExistsError(error_message("destination", constraint, str(dest),
                                        f"It is {what}: choose another DIR, or pass --force to replace the shipped "
                                        "files in it (other files there are kept)."))


def export(name: str, directory: str | Path, force: bool = False) -> Path:
    """Copy bundle ``name`` to ``directory/name``, or config piece ``name`` to ``directory/name.json``; the path."""
    root = data_root()
    bundles, configs = names(root)
    if name not in bundles and name not in configs:
        raise ValueError(error_message("NAME", f"one of the bundles {bundles} or the configs {configs}", name,
                                       "`monai-dp bundle list` lists them."))
    directory = Path(directory)
    if name in configs:
        dest = directory / f"{name}.json"
        _refuse_overwrite(dest, force, "absent")
        if dest.is_dir():
            raise FileExistsError(error_message("destination", "a file", f"{dest} (a folder)", "Choose another DIR."))
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "configs" / config_files(root)[name], dest)
        return dest
    dest = directory / name
    _refuse_overwrite(dest, force, "absent or an empty folder")
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(error_message("destination", "a folder", f"{dest} (a file)", "Choose another DIR."))
    for rel in bundle_files(name, root):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "bundles" / name / rel, dest / rel)
    return dest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-dp bundle", description="The bundles and configs shipped with "
                                     "monai_dp.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the bundles and config pieces")
    exp = sub.add_parser("export", help="copy a bundle to DIR/NAME, or a config piece to DIR/NAME.json")
    exp.add_argument("name", metavar="NAME", help="a bundle or config piece (`monai-dp bundle list`)")
    exp.add_argument("directory", metavar="DIR", help="the folder to export into (created if absent)")
    exp.add_argument("--force", action="store_true", help="replace the shipped files where they exist; other "
                     "files in the destination are kept")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``monai-dp bundle`` with ``argv``; its exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            bundles, configs = names()
            print("bundles:  " + " ".join(bundles))
            print("configs:  " + " ".join(configs))
            return 0
        dest = export(args.name, args.directory, force=args.force)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"monai-dp bundle: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(dest)
    return 0
