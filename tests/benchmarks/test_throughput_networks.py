"""benchmarks/throughput.py measures the networks the bundles build, read from their configs, not copies of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from monai_dp.networks import make_private_compatible

ROOT = Path(__file__).resolve().parents[2]


BENCHMARK = "throughput"


@pytest.fixture(scope="module")
def throughput(benchmark_module):
    return benchmark_module


def _architecture(net: torch.nn.Module) -> list:
    modules = [(name, type(m).__name__) for name, m in net.named_modules()]
    return modules + [(k, tuple(v.shape)) for k, v in net.state_dict().items()]


def _bundle_network_def(bundles_dir: Path, bundle: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(bundles_dir / bundle / "configs" / "train.json"))
    return parser.get_parsed_content("network_def")  # what the bundle trains (converted for DP)


@pytest.mark.parametrize("bundle", ["dp_classification_2d", "dp_classification_3d", "dp_segmentation_2d",
                                    "dp_segmentation_3d"])
def test_bundle_rows_measure_the_network_the_bundle_builds(throughput, bundle):
    (label, (build, dims, task)), = [(k, v) for k, v in throughput.NETWORKS.items() if f"({bundle})" in k]
    expected = _bundle_network_def(ROOT / "bundles", bundle)
    assert _architecture(make_private_compatible(build())[0]) == _architecture(expected)
    assert dims == (3 if bundle.endswith("3d") else 2)
    assert task == ("cls" if "classification" in bundle else "seg")
    assert "model-zoo" not in label


def test_rows_follow_a_changed_bundle(throughput, tmp_path):
    """A bundle whose network changes changes the benchmark's row with it."""
    bundle = "dp_classification_3d"
    shutil.copytree(ROOT / "bundles" / bundle / "configs", tmp_path / bundle / "configs")
    path = tmp_path / bundle / "configs" / "train.json"
    config = json.loads(path.read_text())
    config["network_def"]["network"]["block_config"] = [*config["network_def"]["network"]["block_config"], 2]
    path.write_text(json.dumps(config))
    _, (build, _, _) = throughput._bundle_entry(bundle, tmp_path)
    changed = make_private_compatible(build())[0]
    assert _architecture(changed) == _architecture(_bundle_network_def(tmp_path, bundle))
    assert _architecture(changed) != _architecture(_bundle_network_def(ROOT / "bundles", bundle))
