"""Every bundle trains with DP, evaluates and infers through MONAI's bundle runner, on CPU with tiny overrides."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/metadata.json"))
SCHEMA = REPO / "configs" / "schema" / "metadata_schema.json"
TINY = {
    "dp_classification_2d": {"synthetic_items": 40, "synthetic_size": 32, "image_size": [32, 32], "batch_size": 8},
    "dp_classification_3d": {"synthetic_items": 30, "synthetic_size": 16, "image_size": [16, 16, 16], "batch_size": 6},
    "dp_segmentation_2d": {"synthetic_items": 20, "synthetic_size": 48, "patch_size": [32, 32], "batch_size": 4},
    "dp_segmentation_3d": {"synthetic_items": 14, "synthetic_size": 32, "patch_size": [16, 16, 16], "batch_size": 3},
}


# the metric each bundle's evaluate.json writes, and its value for a model that learnt nothing about the input
# classes (2 balanced classes: accuracy 0.5 and AUC 0.5)
EVAL_METRIC = {"classification": "val_auc", "segmentation": "val_mean_dice"}


def test_bundles_are_discovered_and_each_has_tiny_overrides():
    assert len(BUNDLES) >= 4 and set(BUNDLES) == set(TINY), "give every bundle under bundles/ tiny CPU overrides"


def _copy(name: str, tmp_path: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(REPO / "bundles" / name, root, ignore=shutil.ignore_patterns("models", "eval"))
    return root


def _files_outside_outputs(root: Path) -> dict[str, str]:
    """Every file of a bundle folder outside ``models/`` and ``eval/``, with a hash of its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in ("models", "eval")}


def _parsed(root: Path, files: list[str], config_id: str, **override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(root / "configs" / f) for f in files])
    parser.update({"bundle_root": str(root), **override})
    return parser.get_parsed_content(config_id)


def _input_shape(name: str) -> tuple[int, ...]:
    tiny = TINY[name]
    return (2, 1, *tiny["image_size"]) if "classification" in name else (1, 1, *tiny["patch_size"])


def _run(root: Path, files: list[str], **override):
    from monai.bundle import run

    config_file = [str(root / "configs" / f) for f in files]
    run(config_file=config_file if len(config_file) > 1 else config_file[0], bundle_root=str(root),
        logging_file=str(root / "configs" / "logging.conf"), **override)


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_metadata_and_net_in_out(name):
    from monai.bundle import verify_metadata, verify_net_in_out

    configs = REPO / "bundles" / name / "configs"
    verify_metadata(meta_file=str(configs / "metadata.json"), filepath=str(SCHEMA))
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "train.json"), device="cpu", n=2)


@pytest.mark.parametrize("name", BUNDLES)
def test_monai_label_ids_exist(name):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "train.json"))
    for key in ("train#trainer#max_epochs", "train#dataset#data", "train#handlers", "validate#dataset#data",
                "target_epsilon", "target_delta", "noise_multiplier", "max_grad_norm", "accountant", "dataset_dir"):
        assert key in parser, key
    assert parser["train#trainer#_target_"] == "monai_dp.engines.DPSupervisedTrainer"
    assert isinstance(parser["train#handlers"], list)


@pytest.mark.bundle
@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLES)
def test_train_evaluate_infer(name, tmp_path):
    from monai.bundle import verify_metadata

    root = _copy(name, tmp_path)
    source_files = _files_outside_outputs(root)
    initial = tmp_path / "initial_weights.pt"
    init_steps = json.loads((root / "configs" / "train.json").read_text())["initialize"]
    save_initial = f"$torch.save({{k: v.clone() for k, v in @network.state_dict().items()}}, {str(initial)!r})"
    _run(root, ["train.json"], max_epochs=1, target_epsilon=5.0, initialize=[*init_steps, save_initial], **TINY[name])
    report = json.loads((root / "models" / "privacy_report.json").read_text())
    assert 0 < report["epsilon"] <= 5.0 and report["steps"] > 0 and report["unit"] == "record"
    meta = json.loads((root / "models" / "metadata.json").read_text())  # the model's metadata, beside it
    assert meta["privacy"]["epsilon"] == report["epsilon"]
    verify_metadata(meta_file=str(root / "models" / "metadata.json"), filepath=str(SCHEMA))
    ckpt = torch.load(root / "models" / "checkpoint_final.pt", weights_only=True)
    history = ckpt["trainer"]["privacy"]["accountant"]["history"]
    assert sum(int(n) for *_, n in history) == report["steps"], "the checkpoint's accounting is the reported one"
    # the saved model is the trained network: finite, and moved away from its initial weights
    trained = torch.load(root / "models" / "model.pt", weights_only=True)["model"]  # beside it: "privacy"
    before = torch.load(initial, weights_only=True)
    common = [k for k in trained if k in before and trained[k].shape == before[k].shape and trained[k].is_floating_point()]
    assert len(common) >= len(trained) // 2, "the model file holds the bundle's network"
    assert all(torch.isfinite(trained[k]).all() for k in trained)
    assert any(not torch.equal(trained[k], before[k]) for k in common), "DP training did not change the weights"

    tiny_eval = {k: v for k, v in TINY[name].items() if k != "batch_size"}
    _run(root, ["train.json", "evaluate.json"], **tiny_eval)
    rows = dict((r[0], r[1]) for r in csv.reader(open(root / "eval" / "metrics.csv")) if len(r) >= 2)
    metric = EVAL_METRIC["classification" if "classification" in name else "segmentation"]
    assert metric in rows, rows
    assert 0.0 <= float(rows[metric]) <= 1.0  # NaN fails too: the metric was computed

    tiny_infer = {k: v for k, v in TINY[name].items() if k not in ("batch_size",)}
    _run(root, ["inference.json"], **tiny_infer)
    if "classification" in name:
        rows = list(csv.reader(open(root / "eval" / "predictions.csv")))
        assert rows and all(abs(sum(float(x) for x in r[1:]) - 1) < 1e-4 for r in rows)
    else:
        assert list((root / "eval").glob("*_seg.nii.gz"))
    # train, evaluate and infer wrote under models/ and eval/ only: configs, docs and every other file are as copied
    assert _files_outside_outputs(root) == source_files

    # every config's `network_def` is the trained network: the weights load strictly (MONAI Label, ckpt_export)
    for files in (["inference.json"], ["train.json", "evaluate.json"]):
        net = _parsed(root, files, "network_def", **tiny_infer)
        net.load_state_dict(trained, strict=True)
    _check_ckpt_export(name, root, tmp_path, trained, tiny_infer)
    # inference on a folder of images (no dataset.json), as model-zoo inference configs glob one
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((root / "models" / "synthetic_data").glob("img*.nii.gz"))[:2]:
        shutil.copy(f, images / f.name)
    _run(root, ["inference.json"], dataset_dir=str(images), output_dir=str(tmp_path / "from_folder"), **tiny_infer)
    if "classification" in name:
        assert len(list(csv.reader(open(tmp_path / "from_folder" / "predictions.csv")))) == 2
    else:
        assert len(list((tmp_path / "from_folder").glob("*_seg.nii.gz"))) == 2
        # MONAI Label's request: the path also under `image_path` (MONAI's Spacingd calls .update() on it)
        image = str(images / sorted(p.name for p in images.iterdir())[0])
        _run(root, ["inference.json"], datalist=[{"image": image, "image_path": image}],
             output_dir=str(tmp_path / "from_request"), **tiny_infer)
        assert len(list((tmp_path / "from_request").glob("*_seg.nii.gz"))) == 1
    assert _files_outside_outputs(root) == source_files


def _check_ckpt_export(name: str, root: Path, tmp_path: Path, trained: dict, override: dict) -> None:
    """``monai.bundle ckpt_export`` of ``inference.json``'s network: TorchScript that computes the trained model."""
    from monai.bundle import ckpt_export

    ts_file = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_file), ckpt_file=str(root / "models" / "model.pt"),
                key_in_ckpt="model",
                meta_file=str(root / "configs" / "metadata.json"), config_file=str(root / "configs" / "inference.json"),
                bundle_root=str(root), **override)
    exported = torch.jit.load(str(ts_file)).eval()
    net = _parsed(root, ["inference.json"], "network_def", **override)
    net.load_state_dict(trained, strict=True)
    x = torch.rand(_input_shape(name), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net.eval()(x))


@pytest.mark.bundle
@pytest.mark.slow
def test_segmentation_masks_keep_the_input_affine(tmp_path):
    nib = pytest.importorskip("nibabel")
    from monai.data import create_test_image_3d

    data = tmp_path / "data"
    data.mkdir()
    affine = np.diag([2.0, 1.5, 1.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    records = []
    for i in range(8):
        img, seg = create_test_image_3d(24, 24, 24, num_objs=2, rad_max=7, num_seg_classes=1,
                                        random_state=np.random.RandomState(i))
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), str(data / f"i{i}.nii.gz"))
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), affine), str(data / f"l{i}.nii.gz"))
        records.append({"image": f"i{i}.nii.gz", "label": f"l{i}.nii.gz"})
    (data / "dataset.json").write_text(json.dumps({"training": records[:6], "test": records[6:]}))
    root = _copy("dp_segmentation_3d", tmp_path)
    _run(root, ["train.json"], max_epochs=1, dataset_dir=str(data), patch_size=[16, 16, 16], batch_size=3,
         target_delta=1e-3)
    _run(root, ["inference.json"], dataset_dir=str(data), patch_size=[16, 16, 16])
    out = sorted((root / "eval").glob("*_seg.nii.gz"))
    assert len(out) == 2
    for f in out:
        saved = nib.load(str(f))
        np.testing.assert_allclose(saved.affine, affine, atol=1e-4)
        assert saved.shape[:3] == (24, 24, 24)


@pytest.mark.bundle
@pytest.mark.distributed
@pytest.mark.slow
def test_multi_gpu_config_runs_under_torchrun_on_cpu(tmp_path):
    """multi_gpu_train.json with two processes (gloo on CPU here, NCCL on GPUs): one DP run, one report."""
    import subprocess
    import sys

    root = _copy("dp_segmentation_2d", tmp_path)
    data = tmp_path / "data"
    # generate the data once, before the two processes start
    from monai_dp.data import make_synthetic_dataset

    make_synthetic_dataset(str(data), "segmentation", 2, num_items=20, size=48)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle", "run",
           "--config_file", f"['{root}/configs/train.json','{root}/configs/multi_gpu_train.json']",
           "--bundle_root", str(root), "--dataset_dir", str(data), "--max_epochs", "1", "--patch_size", "[32,32]",
           "--batch_size", "4", "--logging_file", f"{root}/configs/logging.conf"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((root / "models" / "privacy_report.json").read_text())
    assert report["steps"] == int(1 / report["sample_rate"]) and report["epsilon"] > 0
    # rank 0 alone logs (ε, the validation metric) and writes; rank 1 trains and validates its shard
    logs = proc.stdout + proc.stderr
    assert logs.count("Metrics -- epsilon") == 1 and logs.count("Metrics -- val_mean_dice") == 1, logs[-3000:]
    assert json.loads((root / "models" / "metadata.json").read_text())["privacy"]["epsilon"] == report["epsilon"]


@pytest.mark.bundle
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dp_classification_2d", "dp_segmentation_3d"])
def test_patient_level_from_the_command_line(name, tmp_path):
    """`--privacy_unit patient`: the synthetic data has two records per patient; patients are sampled and counted."""
    root = _copy(name, tmp_path)
    tiny = dict(TINY[name], batch_size=max(2, TINY[name]["batch_size"] // 2))
    _run(root, ["train.json"], max_epochs=1, target_epsilon=5.0, privacy_unit="patient", **tiny)
    report = json.loads((root / "models" / "privacy_report.json").read_text())
    datalist = json.loads((root / "models" / "synthetic_data" / "dataset.json").read_text())
    assert report["unit"] == "patient" and report["patient_level"] is None
    assert report["patients"]["max"] == 2
    assert report["num_units"] == report["patients"]["num_patients"] < len(datalist["training"])
    assert 0 < report["epsilon"] <= 5.0
    md = (root / "models" / "privacy_report.md").read_text()
    assert "patient-level DP-SGD" in md


@pytest.mark.bundle
@pytest.mark.slow
def test_second_bundle_run_is_refused_by_the_ledger(tmp_path, capsys):
    """Run a bundle twice on the same data with a ledger: the second run is refused, naming what was spent."""
    from monai_dp.__main__ import main
    from monai_dp.utils.errors import PrivacyBudgetExhaustedError

    name = "dp_classification_2d"
    root = _copy(name, tmp_path)
    ledger = tmp_path / "ledger.db"
    over = dict(TINY[name], max_epochs=1, target_epsilon=3.0, ledger=str(ledger), dataset_id="synthetic-lesions")
    assert main(["ledger", "init", "--ledger", str(ledger), "--dataset-id", "synthetic-lesions", "--epsilon", "3",
                 "--delta", "1e-3"]) == 0
    _run(root, ["train.json"], target_delta=1e-3, **over)
    first = json.loads((root / "models" / "privacy_report.json").read_text())
    assert first["ledger"]["spent_before"] == 0.0 and first["ledger"]["status"] in ("finished", "stopped")
    with pytest.raises(RuntimeError) as err:  # MONAI's runner wraps the error raised in the config expression
        _run(root, ["train.json"], target_delta=1e-3, **over)
    cause = err.value.__cause__
    assert isinstance(cause, PrivacyBudgetExhaustedError), repr(cause)
    assert "synthetic-lesions" in str(cause) and "spent ε = 2.9" in str(cause) and "Runs that spent it" in str(cause)
    capsys.readouterr()
    assert main(["ledger", "show", "--ledger", str(ledger), "--dataset-id", "synthetic-lesions"]) == 0
    shown = capsys.readouterr().out
    assert "synthetic-lesions" in shown


def _tiny_fashion_npz(tmp_path):
    """60 / 20 / 20 random 28 x 28 images whose class is a bright row, as a Fashion-MNIST npz."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 60), ("val", 20), ("test", 20)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):  # a class-dependent bright row, so there is something to learn
            images[i, 2 + 2 * c, :] = 255
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    npz = tmp_path / "fashion.npz"
    np.savez(npz, **arrays)
    return npz


@pytest.mark.bundle
@pytest.mark.slow
def test_fashion_mnist_recipe_trains_on_scattering_features_and_evaluates(tmp_path):
    """configs/fashion_mnist.json over train.json: features precomputed once, linear head trained with DP."""
    npz = _tiny_fashion_npz(tmp_path)
    root = _copy("dp_classification_2d", tmp_path)
    files = ["train.json", "fashion_mnist.json"]
    # fixed noise and sampling seeds (tests only, recorded as such): with 4 noisy steps on 60 records the
    # accuracy below is a draw; unseeded this test failed in 4 and 5 of 10 runs (at e04acef and now)
    _run(root, files, dataset_dir=str(npz), max_epochs=2, batch_size=30, max_physical_batch_size=16,
         target_epsilon=8.0, learning_rate=1.0, **{"train#trainer#noise_seed": 0, "train#trainer#sampling_seed": 0})
    report = json.loads((root / "models" / "privacy_report.json").read_text())
    assert 0 < report["epsilon"] <= 8.0 and report["steps"] == 4
    state = torch.load(root / "models" / "model.pt", weights_only=True)["model"]  # beside it: "privacy"
    assert state["net.2.weight"].shape == (10, 81 * 7 * 7)  # FeatureClassifier: GroupNorm, Flatten, Linear
    _run(root, files + ["evaluate.json"], dataset_dir=str(npz))
    rows = dict((r[0], r[1]) for r in csv.reader(open(root / "eval" / "metrics.csv")) if len(r) >= 2)
    # 10 balanced classes, 20 test images: one class for all (a broken model or metric) scores ~0.1; 7 of 20 right
    # by chance has probability ~0.002. The bright row makes the classes easy (0.65 measured at ε = 8).
    assert float(rows["val_accuracy"]) > 0.3, rows


@pytest.mark.bundle
@pytest.mark.slow
def test_fashion_mnist_projected_recipe_charges_its_release_and_evaluates(tmp_path):
    """configs/fashion_mnist_projected.json: the statistics release is composed into ε, charged to the bundle's
    ledger before the training run, and the saved model (statistics included) evaluates."""
    from monai_dp.privacy.ledger import PrivacyLedger

    npz = _tiny_fashion_npz(tmp_path)
    root = _copy("dp_classification_2d", tmp_path)
    files = ["train.json", "fashion_mnist.json", "fashion_mnist_projected.json"]
    _run(root, files, dataset_dir=str(npz), max_epochs=2, batch_size=30, max_physical_batch_size=16,
         target_epsilon=8.0, learning_rate=1.0, projection_components=200,
         **{"train#trainer#noise_seed": 0, "train#trainer#sampling_seed": 0})
    report = json.loads((root / "models" / "privacy_report.json").read_text())
    assert 0 < report["epsilon"] <= 8.0 and report["steps"] == 5  # the release and 4 DP-SGD steps
    assert [p["kind"] for p in report["prior"]] == ["feature statistics"]
    ledger = PrivacyLedger(str(root / "models" / "privacy_ledger.db"))
    runs = ledger.spent(ledger.dataset_ids()[0]).runs
    assert [(r["sample_rate"], r["steps_taken"]) for r in runs][0] == (1.0, 1) and len(runs) == 2
    state = torch.load(root / "models" / "model.pt", weights_only=True)["model"]
    assert state["linear.weight"].shape == (10, 200) and bool(state["fitted"])
    _run(root, files + ["evaluate.json"], dataset_dir=str(npz), projection_components=200)
    rows = dict((r[0], r[1]) for r in csv.reader(open(root / "eval" / "metrics.csv")) if len(r) >= 2)
    # evaluate.json rebuilt the network unfitted (its forward raises) and ran on the saved statistics; with 60
    # records the release's noise swamps them, so accuracy is measured on real data (benchmarks/fashion_mnist.py)
    assert "val_accuracy" in rows
