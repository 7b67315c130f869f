"""``monai-dp bundle``: list and export the shipped bundles and config pieces; never overwrite without --force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monai_dp.cli import bundle as cli_bundle
from monai_dp.cli import main

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/metadata.json"))


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_list_names_every_bundle_and_config_piece(capsys):
    assert main(["bundle", "list"]) == 0
    bundles_line, configs_line = capsys.readouterr().out.splitlines()
    assert bundles_line.split()[1:] == BUNDLES and len(BUNDLES) >= 4
    configs = sorted([p.stem for p in (REPO / "configs").glob("*.json")] + ["metadata_schema"])
    assert configs_line.split()[1:] == configs and {"dp_trainer", "log_training_loss"} <= set(configs)
    assert not set(BUNDLES) & set(configs), "a bundle and a config piece must not share a name"


@pytest.mark.parametrize("name", BUNDLES)
def test_export_copies_configs_docs_and_license_and_nothing_a_run_left(name, tmp_path, capsys):
    source = REPO / "bundles" / name
    expected = {p.relative_to(source).as_posix() for p in source.glob("configs/*") if p.suffix in (".json", ".conf")}
    expected |= {"LICENSE", "docs/README.md"}
    (tmp_path / "out").mkdir()
    assert main(["bundle", "export", name, str(tmp_path / "out")]) == 0
    dest = tmp_path / "out" / name
    assert capsys.readouterr().out.strip() == str(dest)
    assert _files(dest) == expected
    for rel in expected:
        assert (dest / rel).read_bytes() == (source / rel).read_bytes(), rel
    assert "Apache License" in (dest / "LICENSE").read_text() and "Version 2.0" in (dest / "LICENSE").read_text()


def test_export_leaves_out_what_a_run_wrote_into_the_source_bundle(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "configs" / "schema").mkdir(parents=True)
    src = data / "bundles" / "b"
    for rel in ("configs/metadata.json", "docs/README.md", "LICENSE", "models/model.pt", "eval/metrics.csv",
                "models/privacy_ledger.db", "configs/notes.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    monkeypatch.setattr(cli_bundle, "data_root", lambda: data)
    assert main(["bundle", "export", "b", str(tmp_path / "out")]) == 0
    assert _files(tmp_path / "out" / "b") == {"configs/metadata.json", "docs/README.md", "LICENSE"}


def test_export_of_a_config_piece_writes_name_json(tmp_path):
    assert main(["bundle", "export", "dp_trainer", str(tmp_path / "spleen" / "configs")]) == 0
    written = tmp_path / "spleen" / "configs" / "dp_trainer.json"
    assert written.read_bytes() == (REPO / "configs" / "dp_trainer.json").read_bytes()
    assert json.loads(written.read_text())["train#trainer#_target_"] == "monai_dp.engines.DPSupervisedTrainer"
    assert main(["bundle", "export", "metadata_schema", str(tmp_path)]) == 0
    assert (tmp_path / "metadata_schema.json").read_bytes() == \
        (REPO / "configs" / "schema" / "metadata_schema.json").read_bytes()


def test_an_unknown_name_is_refused_naming_it_and_the_choices(tmp_path, capsys):
    assert main(["bundle", "export", "spleen_ct_segmentation", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "`NAME` must be one of the bundles" in err and "got 'spleen_ct_segmentation'" in err
    assert all(repr(name) in err for name in BUNDLES + ["dp_trainer"])
    assert "monai-dp bundle list" in err and list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_empty_is_refused_and_kept_as_it_was(tmp_path, capsys):
    name = BUNDLES[0]
    dest = tmp_path / name
    (dest / "configs").mkdir(parents=True)
    (dest / "configs" / "train.json").write_text("my edited config")
    (dest / "models").mkdir()
    (dest / "models" / "model.pt").write_bytes(b"weights")
    assert main(["bundle", "export", name, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"`destination` must be absent or an empty folder, got {str(dest)!r}" in err and "--force" in err
    assert _files(dest) == {"configs/train.json", "models/model.pt"}
    assert (dest / "configs" / "train.json").read_text() == "my edited config"

    # --force replaces the shipped files and keeps every other file
    assert main(["bundle", "export", name, str(tmp_path), "--force"]) == 0
    assert (dest / "configs" / "train.json").read_bytes() == (REPO / "bundles" / name / "configs" /
                                                              "train.json").read_bytes()
    assert (dest / "models" / "model.pt").read_bytes() == b"weights"


def test_an_existing_config_file_is_refused_without_force(tmp_path, capsys):
    (tmp_path / "dp_trainer.json").write_text("{}")
    assert main(["bundle", "export", "dp_trainer", str(tmp_path)]) == 2
    assert "`destination` must be absent, got" in capsys.readouterr().err
    assert (tmp_path / "dp_trainer.json").read_text() == "{}"
    assert main(["bundle", "export", "dp_trainer", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "dp_trainer.json").read_bytes() == (REPO / "configs" / "dp_trainer.json").read_bytes()


def test_an_empty_destination_folder_is_used(tmp_path):
    (tmp_path / BUNDLES[0]).mkdir()
    assert main(["bundle", "export", BUNDLES[0], str(tmp_path)]) == 0
    assert (tmp_path / BUNDLES[0] / "configs" / "metadata.json").is_file()


def test_a_file_where_the_bundle_folder_goes_is_refused_even_with_force(tmp_path, capsys):
    (tmp_path / BUNDLES[0]).write_text("a file")
    assert main(["bundle", "export", BUNDLES[0], str(tmp_path), "--force"]) == 2
    assert "`destination` must be a folder" in capsys.readouterr().err
    assert (tmp_path / BUNDLES[0]).read_text() == "a file"


OFFLINE = {key: "http://127.0.0.1:9" for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}


def _export_with_schema(name: str, tmp_path: Path) -> tuple[Path, Path]:
    assert main(["bundle", "export", name, str(tmp_path)]) == 0
    assert main(["bundle", "export", "metadata_schema", str(tmp_path)]) == 0
    return tmp_path / name / "configs" / "metadata.json", tmp_path / "metadata_schema.json"


def _drop_version(meta: Path) -> None:
    broken = json.loads(meta.read_text())
    del broken["version"]
    meta.write_text(json.dumps(broken))


@pytest.mark.filterwarnings("ignore:No hash value provided")  # MONAI: the schema file is given, not downloaded
@pytest.mark.parametrize("name", BUNDLES)
def test_exported_bundle_passes_verify_metadata_offline_with_the_exported_schema(name, tmp_path, monkeypatch):
    """A proxy that refuses every connection makes any download fail; without ``version`` the metadata must fail
    against the same schema, so the check is real."""
    from monai.bundle import verify_metadata

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    meta, schema = _export_with_schema(name, tmp_path)
    verify_metadata(meta_file=str(meta), filepath=str(schema))
    _drop_version(meta)
    with pytest.raises(ValueError, match="'version' is a required property"):
        verify_metadata(meta_file=str(meta), filepath=str(schema))


@pytest.mark.slow  # a fresh interpreter imports MONAI: 6-40 s on a shared 2-core machine
def test_the_documented_offline_verify_command_succeeds_on_an_exported_bundle(tmp_path):
    """``python -m monai.bundle verify_metadata --meta_file ... --filepath <exported schema>``, with no network."""
    meta, schema = _export_with_schema(BUNDLES[0], tmp_path)
    env = {**os.environ, **OFFLINE, "NO_PROXY": "", "no_proxy": ""}

    def verify():
        cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta), "--filepath",
               str(schema)]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    done = verify()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "metadata is verified with no error" in done.stdout + done.stderr
    _drop_version(meta)
    done = verify()
    assert done.returncode != 0 and "'version' is a required property" in done.stdout + done.stderr
