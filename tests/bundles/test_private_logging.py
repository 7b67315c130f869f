"""Bundles log only what the DP guarantee covers: ε, the DP counters and metrics on held-out data.

The training loss (and any metric computed on training batches) is a function of the training records that
bypasses clipping and noise: thresholding the largest logged per-batch loss detected an outlier record in 20/20
runs at a reported ε = 0.046. These tests read every training variant of every bundle (``train.json`` with any
override file that still runs the trainer) without running it, and fail if a handler of the trainer reads its
output, or if the trainer computes metrics on training batches.
"""

from __future__ import annotations

import importlib
import itertools
import json
import pydoc
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "train.json").exists())
DP_COUNTERS = {"dp_steps", "dp_delta", "dp_noise_multiplier", "dp_sample_rate", "dp_max_grad_norm"}
# arguments of MONAI's logging handlers that read the engine's output, or hand it to user code
OUTPUT_READING_ARGS = ("output_transform", "tag_name", "iteration_print_logger", "iteration_logger",
                       "iteration_event_writer", "epoch_print_logger", "epoch_logger", "epoch_event_writer")
_REF = re.compile(r"@([\w#]+)")


def _train_variants(name: str) -> list[list[str]]:
    """``train.json`` alone and with every combination of the bundle's override files that still trains."""
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / name / "configs"
    others = sorted(p.name for p in configs.glob("*.json")  # overrides: not standalone (no `imports`), not metadata
                    if p.name not in ("train.json", "metadata.json") and "imports" not in json.loads(p.read_text()))
    variants = []
    for r in range(len(others) + 1):
        for combo in itertools.combinations(others, r):
            files = ["train.json", *combo]
            parser = ConfigParser()
            parser.read_config([str(configs / f) for f in files])
            if any("trainer.run()" in str(step) for step in parser.get("run", [])):
                variants.append(files)
    return variants


VARIANTS = [(name, files) for name in BUNDLES for files in _train_variants(name)]


def _parser(name: str, files: list[str]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / name / "configs" / f) for f in files])
    return parser


def _locate(target):
    """The class a ``_target_`` names (``None`` for expressions or names that do not resolve)."""
    if not isinstance(target, str) or target.startswith("$"):
        return None
    if "." in target:
        return pydoc.locate(target)
    from monai.bundle.config_item import ComponentLocator

    modules = ComponentLocator().get_component_module_name(target)
    for module in [modules] if isinstance(modules, str) else modules or []:
        obj = getattr(importlib.import_module(module), target, None)
        if obj is not None:
            return obj
    return None


def _follow(parser, value):
    """Follow ``@id`` references to the raw config they name."""
    seen = set()
    while isinstance(value, str) and value.startswith("@") and value not in seen:
        seen.add(value)
        value = parser.get(value[1:])
    return value


def _handlers(parser, value, seen=None) -> list[dict]:
    """Every handler config (a dict with ``_target_``) that a handler-list value can reach."""
    seen = set() if seen is None else seen
    if isinstance(value, str) and value.startswith(("@", "$")):
        out = []
        for ref in _REF.findall(value):
            if ref not in seen:
                seen.add(ref)
                out += _handlers(parser, parser.get(ref), seen)
        return out
    if isinstance(value, list):
        return [h for v in value for h in _handlers(parser, v, seen)]
    return [value] if isinstance(value, dict) and "_target_" in value else []


def _trainers(parser) -> dict[str, dict]:
    """Config ids of every ``monai.engines.Trainer`` in the config."""
    from monai.engines import Trainer

    found = {}

    def walk(node, path):
        if isinstance(node, dict):
            cls = _locate(node.get("_target_"))
            if isinstance(cls, type) and issubclass(cls, Trainer):
                found[path] = node
            for k, v in node.items():
                walk(v, f"{path}#{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}#{i}")

    walk(parser.get(""), "")
    return found


def training_output_readers(parser, trainer: dict) -> list[str]:
    """What in this trainer's config releases its per-batch output (loss, predictions) or training metrics."""
    from ignite.metrics import Metric
    from monai.handlers import IgniteMetricHandler, MLFlowHandler, StatsHandler, TensorBoardStatsHandler

    problems = [f"trainer `{key}` computes metrics on training batches" for key in ("key_train_metric",
                "additional_metrics") if _follow(parser, trainer.get(key)) not in (None, {}, [])]
    for h in _handlers(parser, trainer.get("train_handlers")):
        cls, target = _locate(h["_target_"]), h["_target_"]
        if isinstance(cls, type) and issubclass(cls, (StatsHandler, TensorBoardStatsHandler, MLFlowHandler)):
            if _follow(parser, h.get("iteration_log", True)) is not False:
                problems.append(f"{target} logs every iteration's output (set `iteration_log: false`)")
            problems += [f"{target} has `{k}`" for k in OUTPUT_READING_ARGS if k in h]
        elif "output_transform" in h:
            problems.append(f"{target} reads the trainer's output (`output_transform`)")
        if isinstance(cls, type) and issubclass(cls, (Metric, IgniteMetricHandler)):
            problems.append(f"{target} is a metric on training batches")
        if h.get("clipped_fraction_key") and not _disabled(parser, h):
            problems.append(f"{target} publishes the fraction of clipped items (`clipped_fraction_key`)")
    return problems


def _disabled(parser, handler: dict) -> bool:
    """A handler's ``_disabled_`` flag as MONAI evaluates it (expressions such as ``$not @flag`` included)."""
    from monai.bundle import ConfigParser

    flag = handler.get("_disabled_", False)
    if isinstance(flag, str) and flag.startswith("$"):
        return bool(ConfigParser({**parser.get(), "_disabled_check": flag}).get_parsed_content("_disabled_check"))
    return flag.lower().strip() == "true" if isinstance(flag, str) else bool(flag)


def _ids(val):
    return "+".join(val) if isinstance(val, list) else str(val)


@pytest.mark.parametrize("name,files", VARIANTS, ids=_ids)
def test_no_training_loss_or_training_metric_is_logged(name, files):
    parser = _parser(name, files)
    trainers = _trainers(parser)
    assert trainers, "no trainer found"
    for path, trainer in trainers.items():
        assert training_output_readers(parser, trainer) == [], path


@pytest.mark.parametrize("name,files", VARIANTS, ids=_ids)
def test_epsilon_counters_and_validation_metrics_are_logged(name, files):
    """Epoch-level logging of the DP counters on the trainer; a held-out key metric on the validator."""
    from monai.handlers import StatsHandler

    parser = _parser(name, files)
    for path, trainer in _trainers(parser).items():
        logged = set()
        for h in _handlers(parser, trainer.get("train_handlers")):
            cls = _locate(h["_target_"])
            if isinstance(cls, type) and issubclass(cls, StatsHandler) and _follow(parser, h.get("epoch_log", True)):
                logged |= set(_follow(parser, h.get("state_attributes")) or [])
        assert DP_COUNTERS <= logged, (path, DP_COUNTERS - logged)
    assert parser.get("validate#evaluator#key_val_metric")


def test_the_checker_catches_what_bundles_used_to_log():
    """The checks above fail on a MONAI model-zoo style trainer: loss and training metric logged."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({
        "key_metric": {"train_acc": {"_target_": "ignite.metrics.Accuracy"}},
        "log_loss": {"_target_": "StatsHandler", "tag_name": "train_loss",
                     "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
        "train": {
            "handlers": ["@log_loss", {"_target_": "TensorBoardStatsHandler", "iteration_log": False},
                         {"_target_": "MLFlowHandler", "iteration_log": False, "state_attributes": ["dp_steps"]},
                         {"_target_": "MeanDice", "output_transform": "$lambda x: x"}],
            "trainer": {"_target_": "monai_dp.engines.DPSupervisedTrainer", "key_train_metric": "@key_metric",
                        "train_handlers": "$@train#handlers + [@extra]"},
        },
        "extra": {"_target_": "StatsHandler"},
    })
    trainers = _trainers(parser)
    assert list(trainers) == ["train#trainer"]
    problems = training_output_readers(parser, trainers["train#trainer"])
    assert any("key_train_metric" in p for p in problems)
    assert sum("StatsHandler logs every iteration" in p for p in problems) == 2  # @log_loss and @extra
    assert any("StatsHandler has `output_transform`" in p for p in problems)
    assert any("MeanDice" in p and "metric on training batches" in p for p in problems)
    assert not any("TensorBoardStatsHandler" in p or "MLFlowHandler" in p for p in problems)


@pytest.mark.parametrize("name", BUNDLES)
def test_the_training_loss_opt_in_is_seen_by_the_checker(name):
    """configs/log_training_loss.json appends a loss logger to a bundle's handlers; the check above names it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / name / "configs" / "train.json"),
                        str(REPO / "configs" / "log_training_loss.json")])
    problems = training_output_readers(parser, _trainers(parser)["train#trainer"])
    assert "StatsHandler has `output_transform`" in problems
    assert len(_handlers(parser, "@train#handlers")) == len(_parser(name, ["train.json"]).get("train#handlers")) + 1


def test_dp_trainer_override_adds_no_training_metric():
    """configs/dp_trainer.json (layered on other bundles) turns off training metrics and adds no output reader."""
    override = json.loads((REPO / "configs" / "dp_trainer.json").read_text())
    assert override.get("train#trainer#key_train_metric", "missing") is None
    assert override.get("train#trainer#additional_metrics", "missing") is None
    assert not any("handlers" in k for k in override)


@pytest.mark.parametrize("name", BUNDLES)
def test_default_validation_and_test_splits_hold_no_training_record_or_patient(name, tmp_path):
    """The synthetic default data: no image, and no patient, of the training split is in validation or test."""
    parser = _parser(name, ["train.json"])
    parser["synthetic_dir"] = str(tmp_path / "synthetic")
    parser["synthetic_items"] = 12
    parser["synthetic_size"] = 16
    splits = parser.get_parsed_content("datalist")
    train = splits["training"]
    assert parser.get("train#dataset#data") == "$@datalist['training']"
    assert parser.get("validate#dataset#data") == "$@datalist['validation']"
    images = {r["image"] for r in train}
    patients = {r["patient_id"] for r in train}
    assert train and patients, "the synthetic records carry patient ids"
    for split in ("validation", "test"):
        assert splits[split], split
        assert not images & {r["image"] for r in splits[split]}, split
        assert not patients & {r["patient_id"] for r in splits[split]}, split


@pytest.mark.parametrize("name", BUNDLES)
def test_the_clipped_fraction_is_logged_only_when_asked(name):
    """`--log_clipped_fraction true` turns on an exact (not noised) count in the logs; the checker names it."""
    assert _parser(name, ["train.json"]).get("log_clipped_fraction") is False
    for off in ("false", "False", 0):  # the command line passes strings: "false" must not turn it on
        parser = _parser(name, ["train.json"])
        parser["log_clipped_fraction"] = off
        assert training_output_readers(parser, _trainers(parser)["train#trainer"]) == [], off
    for on in (True, "true", "True"):
        parser = _parser(name, ["train.json"])
        parser["log_clipped_fraction"] = on
        problems = training_output_readers(parser, _trainers(parser)["train#trainer"])
        assert problems == ["monai_dp.handlers.PrivacyMetricsHandler publishes the fraction of clipped items "
                            "(`clipped_fraction_key`)"], on
    handlers = [h for h in _handlers(parser, "@train#handlers") if h.get("clipped_fraction_key")]
    assert [h["clipped_fraction_key"] for h in handlers] == ["dp_clipped_fraction_NOT_PRIVATE"]
