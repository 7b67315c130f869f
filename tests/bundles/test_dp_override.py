"""configs/dp_trainer.json turns a model-zoo-style bundle's trainer into a DP trainer, nothing else changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

TRAIN = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/models'",
    "device": "cpu",
    "network_def": {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                    "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "norm": "batch"},
    "network": "$@network_def.to(@device)",
    "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
    "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 1e-3},
    "train": {
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": ["image", "label"], "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"]},
            {"_target_": "RandCropByPosNegLabeld", "keys": ["image", "label"], "label_key": "label",
             "spatial_size": [16, 16], "num_samples": 4},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$@train_files", "transform": "@train#preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 2, "shuffle": True,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "handlers": [
            {"_target_": "StatsHandler", "tag_name": "train_loss", "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
            {"_target_": "CheckpointSaver", "save_dir": "@output_dir", "save_dict": {"model": "@network"},
             "save_final": True, "final_filename": "model_final.pt"},
        ],
        "trainer": {"_target_": "SupervisedTrainer", "max_epochs": 2, "device": "@device",
                    "train_data_loader": "@train#dataloader", "network": "@network", "loss_function": "@loss",
                    "optimizer": "@optimizer", "inferer": "@train#inferer", "train_handlers": "@train#handlers"},
    },
    "run": ["$@train#trainer.run()"],
}


@pytest.mark.bundle
def test_model_zoo_style_bundle_trains_with_dp(tmp_path):
    nib = pytest.importorskip("nibabel")
    from monai.bundle import ConfigWorkflow
    from monai.data import create_test_image_2d

    files = []
    for i in range(12):
        img, seg = create_test_image_2d(32, 32, num_objs=3, rad_max=6, num_seg_classes=1, random_state=np.random.RandomState(i))
        ip, lp = tmp_path / f"img{i}.nii.gz", tmp_path / f"seg{i}.nii.gz"
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), str(ip))
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), np.eye(4)), str(lp))
        files.append({"image": str(ip), "label": str(lp)})
    train = dict(TRAIN, train_files=files, bundle_root=str(tmp_path))
    (tmp_path / "train.json").write_text(json.dumps(train))
    workflow = ConfigWorkflow(
        config_file=[str(tmp_path / "train.json"), str(REPO / "configs" / "dp_trainer.json")],
        workflow_type="train", target_epsilon=20.0, target_delta=1e-2, accountant="rdp",
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    from monai_dp.engines import DPSupervisedTrainer

    assert isinstance(trainer, DPSupervisedTrainer)
    workflow.run()
    assert trainer.dp_steps == 2 * 6
    assert 0 < trainer.get_epsilon() <= 20.0
    ckpt = torch.load(tmp_path / "models" / "model_final.pt", weights_only=True)
    # a single-object save_dict is saved as that object's state dict: the plain network weights
    assert not any(k.startswith("_module") for k in ckpt)
    workflow.parser.get_parsed_content("network_def").load_state_dict(ckpt)
