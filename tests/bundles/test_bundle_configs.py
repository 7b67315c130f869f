"""Bundle configs without training: the network every config builds, rank-filtered multi-GPU handlers, MONAI
Label's request dict through the segmentation preprocessing, inference on a folder, run outputs under models/."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/metadata.json"))
SEGMENTATION = [b for b in BUNDLES if "segmentation" in b]
TINY_DATA = {"synthetic_items": 10, "synthetic_size": 16}


def _parser(root: Path, files: list[str], **override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(root / "configs" / f) for f in files])
    parser.update({"bundle_root": str(root), **override})
    return parser


def _copy(name: str, tmp_path: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(REPO / "bundles" / name, root, ignore=shutil.ignore_patterns("models", "eval"))
    return root


# ------------------------------------------------------------------------------------------- network_def
@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.parametrize("files", [["train.json"], ["inference.json"], ["train.json", "evaluate.json"],
                                   ["train.json", "multi_gpu_train.json"]], ids="+".join)
def test_network_def_is_the_trained_network(name, files):
    """The state dict of `network_def` (what MONAI Label and ckpt_export build) is that of the trained `network`."""
    from monai_dp.networks import find_incompatible_modules

    parser = _parser(REPO / "bundles" / name, files, device="cpu")
    net_def = parser.get_parsed_content("network_def")
    assert find_incompatible_modules(net_def) == []
    trained = _parser(REPO / "bundles" / name, ["train.json"], device="cpu").get_parsed_content("network")
    assert {k: v.shape for k, v in net_def.state_dict().items()} == \
        {k: v.shape for k, v in trained.state_dict().items()}
    net_def.load_state_dict(trained.state_dict(), strict=True)


# ------------------------------------------------------------------------------------------- multi-GPU
@pytest.mark.parametrize("name", ["dp_classification_2d", "dp_segmentation_3d"])
def test_multi_gpu_handlers_are_rank_filtered_and_validation_is_sharded(name, tmp_path, monkeypatch):
    import monai_dp.bundle.distributed as mdist
    from monai.data import DistributedSampler
    from monai.handlers import CheckpointSaver, StatsHandler, ValidationHandler

    from monai_dp.handlers import PrivacyReportHandler

    kinds = {}
    for rank in (0, 1):
        monkeypatch.setattr(mdist, "rank_world", lambda rank=rank: (rank, 2))
        root = _copy(name, tmp_path / f"rank{rank}")
        parser = _parser(root, ["train.json", "multi_gpu_train.json"], device="cpu", **TINY_DATA,
                         **{"validate#sampler#num_replicas": 2, "validate#sampler#rank": rank,
                            "validate#dataset#data": "$@datalist['training'][:5]"})  # odd: shards of 3 and 2
        for i in (0, 1):  # the config's own imports of the rank filter
            parser.get_parsed_content(f"initialize#{i}")
        train = parser.get_parsed_content("train#trainer#train_handlers")
        val = parser.get_parsed_content("validate#evaluator#val_handlers")
        kinds[rank] = ([type(h) for h in train], [type(h) for h in val])
        loader = parser.get_parsed_content("validate#dataloader")
        assert isinstance(loader.sampler, DistributedSampler)
        kinds[f"shard{rank}"] = list(loader.sampler)
        kinds["validation"] = len(parser.get_parsed_content("validate#dataset"))
    assert kinds[0] == ([ValidationHandler, StatsHandler, PrivacyReportHandler, CheckpointSaver],
                        [StatsHandler, CheckpointSaver])
    assert kinds[1] == ([ValidationHandler], []), "rank 1 validates its shard but writes and logs nothing"
    # the two shards cover the validation set once (no padding with repeated items: even_divisible=False)
    assert sorted(kinds["shard0"] + kinds["shard1"]) == list(range(kinds["validation"]))


def test_rank_filter_keeps_handlers_added_later():
    """A CheckpointLoader that MONAI Label inserts into train#handlers runs on every rank."""
    from monai.handlers import CheckpointLoader, StatsHandler

    import monai_dp.bundle.distributed as mdist

    handlers = [CheckpointLoader(load_path="x.pt", load_dict={"m": torch.nn.Linear(1, 1)}), StatsHandler()]
    assert mdist.handlers_for_rank(handlers) == handlers  # rank 0 of a single-process run
    with pytest.MonkeyPatch.context() as m:
        m.setattr(mdist, "rank_world", lambda: (3, 4))
        assert mdist.handlers_for_rank(handlers) == handlers[:1]
        with pytest.raises(TypeError, match="`main_rank_only` must be a list of handler class names"):
            mdist.handlers_for_rank(handlers, "StatsHandler")


# ------------------------------------------------------------------------------------------- MONAI Label request
def _nifti(path: Path, shape: tuple[int, ...], spacing: float, mask: bool = False) -> str:
    nib = pytest.importorskip("nibabel")
    affine = np.diag([spacing] * 3 + [1.0])
    values = np.random.default_rng(0).random(shape)
    values = (values > 0.5).astype(np.uint8) if mask else values.astype(np.float32)
    nib.save(nib.Nifti1Image(values, affine), str(path))
    return str(path)


@pytest.mark.parametrize("name", SEGMENTATION)
def test_monai_label_request_dict_through_inference_preprocessing(name, tmp_path):
    """MONAI Label's infer task hands `{"image": path, "image_path": path}`; MONAI 1.6's Spacingd would call
    `"...".update()` on `image_path`. The preprocessing resamples the image and keeps `image_path` as given."""
    dims = 3 if name.endswith("3d") else 2
    path = _nifti(tmp_path / "ct.nii.gz", (12,) * dims, spacing=2.0)
    preprocessing = _parser(REPO / "bundles" / name, ["inference.json"]).get_parsed_content("preprocessing")
    out = preprocessing({"image": path, "image_path": path})
    assert out["image_path"] == path
    assert tuple(out["image"].shape[1:]) == (23,) * dims  # 2 mm resampled to the bundle's 1 mm
    train_pre = _parser(REPO / "bundles" / name, ["train.json"]).get_parsed_content("validate#preprocessing")
    label = _nifti(tmp_path / "seg.nii.gz", (12,) * dims, spacing=2.0, mask=True)
    out = train_pre({"image": path, "label": label, "image_path": path, "label_path": label})
    assert (out["image_path"], out["label_path"]) == (path, label)


# ------------------------------------------------------------------------------------------- inference inputs
@pytest.mark.parametrize("name", ["dp_classification_3d", "dp_segmentation_3d"])
def test_inference_reads_a_folder_of_images_or_a_datalist(name, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    files = [_nifti(folder / f"case{i}.nii.gz", (16, 16, 16), 1.0) for i in (1, 0)]
    (folder / "notes.txt").write_text("not an image")
    datalist = _parser(REPO / "bundles" / name, ["inference.json"], dataset_dir=str(folder)).get_parsed_content(
        "datalist")
    assert datalist == [{"image": f} for f in sorted(files)]
    # a data set folder (dataset.json): its test split, as before
    root = _copy(name, tmp_path)
    parser = _parser(root, ["inference.json"], **TINY_DATA)
    test = parser.get_parsed_content("datalist")
    spec = json.loads((root / "models" / "synthetic_data" / "dataset.json").read_text())
    assert test and {Path(r["image"]).name for r in test} <= {r["image"] for r in spec["test"] + spec["training"]}
    assert all("label" in r for r in test)


def test_inference_folder_without_images_is_refused(tmp_path):
    from monai_dp.bundle.datalists import inference_datalist

    with pytest.raises(ValueError, match=r"`dataset_dir` must be a folder with images matching \['\*.png'\]"):
        inference_datalist(tmp_path, "classification", 2, 2, image_glob="*.png")


# ------------------------------------------------------------------------------------------- run outputs
@pytest.mark.parametrize("name", BUNDLES)
def test_run_outputs_default_under_models_and_eval(name, tmp_path):
    """What a run writes (synthetic data, the model's metadata) lies under models/; configs/ stays as released."""
    root = _copy(name, tmp_path)
    released = (root / "configs" / "metadata.json").read_text()
    top_level = {p.name for p in root.iterdir()}
    parser = _parser(root, ["train.json"], **TINY_DATA)
    for key in ("ckpt_dir", "synthetic_dir", "run_meta_file", "data_root"):
        value = Path(parser.get_parsed_content(key)).resolve()
        assert value.is_relative_to(root / "models"), (key, value)
    assert (root / "models" / "metadata.json").read_text() != "" and (root / "configs" / "metadata.json").read_text() \
        == released
    assert Path(_parser(root, ["inference.json"]).get_parsed_content("output_dir")).resolve() == root / "eval"
    assert {p.name for p in root.iterdir()} == top_level | {"models"}


@pytest.mark.parametrize("name", BUNDLES)
def test_synthetic_cache_follows_the_overrides(name, tmp_path):
    """A changed `--synthetic_items` (or size) gives a data set of that many items, not the cached one."""
    root = _copy(name, tmp_path)
    counts = []
    for items in (10, 14, 10):
        splits = _parser(root, ["train.json"], synthetic_items=items, synthetic_size=16).get_parsed_content("datalist")
        counts.append(sum(len(v) for v in splits.values()))
    assert counts == [10, 14, 10]
    assert [p.name for p in (root / "models").iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_synthetic_refresh_never_replaces_a_foreign_dataset(tmp_path):
    from monai_dp.data import make_synthetic_dataset

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match=r"`out_dir` must be a folder of a synthetic data set"):
        make_synthetic_dataset(tmp_path / "mine", "classification", 2, num_items=4, size=16, refresh=True)
    assert json.loads((tmp_path / "mine" / "dataset.json").read_text()) == {"training": []}


@pytest.mark.parametrize("name", BUNDLES)
def test_git_ignores_what_a_run_writes(name, tmp_path):
    """The bundle's own .gitignore (it travels with an exported bundle) ignores what a run writes, not configs/."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    root = _copy(name, tmp_path)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    outputs = ["models/model.pt", "models/metadata.json", "eval/metrics.csv", "models/synthetic_data/dataset.json",
               "models/privacy_report.md"]
    ignored = subprocess.run(["git", "check-ignore", *outputs, "configs/metadata.json", "docs/README.md"], cwd=root,
                             capture_output=True, text=True).stdout
    assert sorted(ignored.split()) == sorted(outputs)


# ------------------------------------------------------------------------------------------- metadata names
@pytest.mark.parametrize("meta", [REPO / "bundles" / b / "configs" / "metadata.json" for b in BUNDLES]
                         + [REPO / "tests" / "bundles" / "zoo_spleen" / "configs" / "metadata.json"],
                         ids=lambda p: p.parent.parent.name)
def test_metadata_uses_no_name_monai_deprecates(meta):
    """MONAI warns on every run about (and renames) the ids in its DEPRECATED_ID_MAPPING."""
    from monai.bundle.utils import DEPRECATED_ID_MAPPING

    assert DEPRECATED_ID_MAPPING, "MONAI no longer deprecates any metadata id: drop this test"
    meta_ids = set(json.loads(meta.read_text()))
    assert not meta_ids & set(DEPRECATED_ID_MAPPING), f"rename {meta_ids & set(DEPRECATED_ID_MAPPING)} in {meta}"
