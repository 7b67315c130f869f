"""A model-zoo bundle converts with the documented merge and nothing else.

``tests/bundles/zoo_spleen`` mirrors the configs of model-zoo's spleen_ct_segmentation (BatchNorm UNet,
``DiceCELoss(batch=True)``, ``RandCropByPosNegLabeld``, a DDP-wrapping ``multi_gpu_train.json``) at toy sizes. Merged
with ``configs/dp_trainer.json`` it trains with DP through MONAI's own ``ConfigWorkflow``; merged with
``dp_trainer.json`` (evaluation) or ``dp_network.json`` (inference, ``ckpt_export``) every config builds the converted
network, so the trained ``model.pt`` loads strictly everywhere. Overrides are only the toy ones (one epoch, validation
every epoch, no loader workers, the RDP accountant for speed) and the data location.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.bundle, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "zoo_spleen" / "configs"
DP_TRAINER, DP_NETWORK = REPO / "configs" / "dp_trainer.json", REPO / "configs" / "dp_network.json"
N_TRAIN, N_TEST = 8, 2  # train.json holds out the last 2 of imagesTr for validation
TINY = {"train#trainer#max_epochs": 1, "val_interval": 1, "accountant": "rdp", "train#dataloader#num_workers": 0,
        "validate#dataloader#num_workers": 0,
        # TensorBoard handlers kept (their positions matter to multi_gpu_train.json), writing nowhere
        "train#handlers#2#summary_writer": {"_target_": "tests.bundles.test_zoo_spleen.NullSummaryWriter"},
        "validate#handlers#1#summary_writer": {"_target_": "tests.bundles.test_zoo_spleen.NullSummaryWriter"}}


class NullSummaryWriter:
    """Stands in for TensorBoard's SummaryWriter (an optional dependency): accepts every call, writes nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_data(root: Path) -> Path:
    """Task09_Spleen's layout: imagesTr/labelsTr/imagesTs, CT-like intensities, spacing already 1.5 x 1.5 x 2 mm."""
    nib = pytest.importorskip("nibabel")
    from monai.data import create_test_image_3d

    data = root / "Task09_Spleen"
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for i in range(N_TRAIN + 2 + N_TEST):
        rng = np.random.RandomState(i)
        img, seg = create_test_image_3d(24, 24, 20, num_objs=2, rad_max=6, num_seg_classes=1, noise_max=0.2,
                                        random_state=rng)
        split = "Tr" if i < N_TRAIN + 2 else "Ts"
        for kind, arr, dtype in (("images", img * 221 - 57, np.float32), ("labels", seg, np.uint8)):
            if kind == "labels" and split == "Ts":
                continue
            (data / f"{kind}{split}").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr.astype(dtype), affine), str(data / f"{kind}{split}" / f"spleen_{i}.nii.gz"))
    return data


def _workflow(files: list[Path], kind: str, root: Path, data: Path, **override):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=[str(f) for f in files], meta_file=str(CONFIGS / "metadata.json"),
                              logging_file=False, workflow_type=kind, bundle_root=str(root), dataset_dir=str(data),
                              **override)
    workflow.initialize()
    return workflow


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname}:{record.getMessage()}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train.json + dp_trainer.json, trained for one epoch through ConfigWorkflow."""
    root = tmp_path_factory.mktemp("spleen")
    data = _write_data(root)
    records = _Records()
    watched = [logging.getLogger(n) for n in ("monai_dp.losses.checks", "monai_dp.engines.trainer")]
    for lg in watched:
        lg.addHandler(records)
    try:
        workflow = _workflow([CONFIGS / "train.json", DP_TRAINER], "train", root, data, **TINY)
        workflow.run()
        workflow.finalize()
    finally:
        for lg in watched:
            lg.removeHandler(records)
    parser = workflow.parser
    return SimpleNamespace(root=root, data=data, lines=records.lines, trainer=parser.get_parsed_content("train#trainer"),
                           loss=parser.get_parsed_content("loss"), network=parser.get_parsed_content("network"),
                           weights=torch.load(root / "models" / "model.pt", weights_only=True))


def _assert_same_weights(network: nn.Module, weights: dict) -> None:
    state = network.state_dict()
    assert state.keys() == weights.keys()
    for k, v in weights.items():
        torch.testing.assert_close(state[k].cpu(), v, rtol=0, atol=0)


def test_train_with_dp_trainer_json(trained):
    from monai_dp.engines import DPSupervisedTrainer

    trainer = trained.trainer
    assert isinstance(trainer, DPSupervisedTrainer)
    # the zoo's DiceCELoss(batch=True) was switched to per-example, and the user was told what and why
    assert trained.loss.dice.batch is False and trainer.loss_function is trained.loss
    assert any(line.startswith("WARNING:loss_function.dice.batch: True -> False.") for line in trained.lines)
    # the network every config builds (`network`) is the converted one, and it is what was trained
    assert trainer.network is trained.network
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trained.network.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in trained.network.modules())
    assert trainer.dp_steps == 4  # one epoch at q = 2 / 8
    assert 0 < trainer.get_epsilon() <= 8.0
    # model.pt (the validation CheckpointSaver's key-metric file) holds the trained weights, without BN statistics
    _assert_same_weights(trained.network, trained.weights)
    assert not any("running_mean" in k for k in trained.weights)


def test_evaluate_loads_model_strictly(trained):
    files = [CONFIGS / "train.json", CONFIGS / "evaluate.json", DP_TRAINER]
    workflow = _workflow(files, "eval", trained.root, trained.data, **{"validate#dataloader#num_workers": 0})
    workflow.run()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    _assert_same_weights(evaluator.network, trained.weights)  # CheckpointLoader (strict) loaded model.pt
    assert 0.0 <= evaluator.state.metrics["val_mean_dice"] <= 1.0
    assert (trained.root / "eval" / "val_mean_dice_raw.csv").exists()  # the MetricsSaver ran


def test_inference_loads_model_strictly(trained):
    workflow = _workflow([CONFIGS / "inference.json", DP_NETWORK], "infer", trained.root, trained.data,
                         **{"dataloader#num_workers": 0})
    workflow.run()
    _assert_same_weights(workflow.parser.get_parsed_content("network"), trained.weights)
    written = sorted(p.name for p in (trained.root / "eval").rglob("*_trans.nii.gz"))
    assert written == [f"spleen_{i}_trans.nii.gz" for i in range(N_TRAIN + 2, N_TRAIN + 2 + N_TEST)]


def test_ckpt_export_to_torchscript(trained, tmp_path):
    from monai.bundle import ConfigParser, ckpt_export

    files = [str(CONFIGS / "inference.json"), str(DP_NETWORK)]
    out = tmp_path / "model.ts"
    ckpt_export(net_id="network", filepath=str(out), ckpt_file=str(trained.root / "models" / "model.pt"),
                meta_file=str(CONFIGS / "metadata.json"), config_file=files, bundle_root=str(trained.root))
    scripted = torch.jit.load(str(out))
    parser = ConfigParser()
    parser.read_config(files)
    eager = parser.get_parsed_content("network")
    eager.load_state_dict(trained.weights, strict=True)
    eager.eval()
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = eager(x)
        torch.testing.assert_close(scripted(x), expected)
        assert not torch.allclose(expected[:, 0], expected[:, 1])  # a real output, not a constant


def test_unmerged_network_def_does_not_load_dp_weights(trained):
    """Why the merge matters: the bundle's own BatchNorm `network_def` is another network."""
    with pytest.raises(RuntimeError, match="Failed to evaluate") as info:  # initialize's `@checkpointloader(...)`
        _workflow([CONFIGS / "inference.json"], "infer", trained.root, trained.data, **{"dataloader#num_workers": 0})
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "Missing key(s) in state_dict: \"model.0.conv.unit0.adn.N.running_mean\"" in str(info.value.__cause__)


def test_dp_network_json_is_the_network_part_of_dp_trainer_json():
    """inference.json has no `train` section, so it takes dp_network.json; both must build the same network."""
    from monai.bundle import ConfigParser

    network_part = json.loads(DP_NETWORK.read_text())
    trainer_part = json.loads(DP_TRAINER.read_text())
    assert network_part == {k: trainer_part[k] for k in network_part}
    assert "network" in network_part and not any(k.startswith("train") for k in network_part)
    with pytest.raises(KeyError, match="query key: train"):  # why dp_network.json exists
        ConfigParser().read_config([str(CONFIGS / "inference.json"), str(DP_TRAINER)])


def _multi_gpu_worker(rank: int, world: int, port: int, root: str, data: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    multi_gpu = json.loads((CONFIGS / "multi_gpu_train.json").read_text())
    # the zoo config on CPU: gloo instead of NCCL, no CUDA device
    init = [s.replace("backend='nccl'", "backend='gloo'") for s in multi_gpu["initialize"] if "torch.cuda" not in s]
    override = dict(TINY, device="$torch.device('cpu')", initialize=init, **{
        "network#device_ids": None, "train#trainer#epoch_length": 1})
    # dp_trainer.json before multi_gpu_train.json: the zoo's DistributedDataParallel wrap comes back
    files = [CONFIGS / "train.json", DP_TRAINER, CONFIGS / "multi_gpu_train.json"]
    workflow = _workflow(files, "train", Path(root), Path(data), **override)
    workflow.run()
    trainer, network = (workflow.parser.get_parsed_content(k) for k in ("train#trainer", "network"))
    torch.save({"ddp": isinstance(network, nn.parallel.DistributedDataParallel),
                "unwrapped": trainer.network is getattr(network, "module", None),
                "optimizer": type(trainer.optimizer).__name__, "steps": trainer.dp_steps,
                "weights": {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}},
               f"{root}/rank{rank}.pt")
    workflow.finalize()


@pytest.mark.distributed
def test_multi_gpu_train_two_processes(tmp_path):
    """multi_gpu_train.json on two gloo processes: DDP unwrapped, the distributed DP optimizer, one model."""
    import torch.multiprocessing as mp

    data = _write_data(tmp_path)
    mp.spawn(_multi_gpu_worker, args=(2, _free_port(), str(tmp_path), str(data)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0, r1):
        assert r["ddp"] and r["unwrapped"]
        assert r["optimizer"] == "PrivateNoiseDistributedDPOptimizer"
    assert r0["steps"] == r1["steps"] == 1  # epoch_length 1: one DP step, then validation
    for k, v in r0["weights"].items():
        torch.testing.assert_close(r1["weights"][k], v, rtol=0, atol=0)  # one model on every rank
    saved = torch.load(tmp_path / "models" / "model.pt", weights_only=True)  # written by rank 0's CheckpointSaver
    network = _converted_network()
    network.load_state_dict(saved, strict=True)
    _assert_same_weights(network, r0["weights"])


def _converted_network() -> nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(DP_NETWORK)])
    return parser.get_parsed_content("network")
