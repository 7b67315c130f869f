"""The MONAI Label app (apps/monailabel_dp) driven through a real ``monailabel start_server`` over REST.

Annotations are uploaded with ``PUT /datastore/label``, training is started with ``POST /train/<model>`` and
followed with ``GET /train/``, inference with ``POST /infer/<model>``, the privacy state read from ``GET /info``.
Needs ``monailabel`` (not in the test extra: see docs/monailabel.md for the install); skipped without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monailabel", reason="monailabel is not installed (see docs/monailabel.md for the install)")
nib = pytest.importorskip("nibabel")

from monai.data import create_test_image_3d, partition_dataset

from monai_dp.engines.digest import state_dict_digest
from monai_dp.privacy.fingerprint import dataset_fingerprint_of_records
from monai_dp.privacy.pld import compose_epsilon

pytestmark = [pytest.mark.label, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MODEL = "dp_segmentation_3d"
BUDGET = 4.0
SIGMA = 1.5  # N = 4 training records, batch 2: q = 0.5, one epoch = 2 steps; 2 runs fit in ε = 4, a third does not
TRAIN = {"max_epochs": 1, "val_split": 0.2, "device": "cpu", "multi_gpu": False, "batch_size": 2,
         "patch_size": [16, 16, 16], "num_samples": 1, "noise_multiplier": SIGMA}
DEADLINE_S = 300  # a bound on waiting, not the expected time (about 2 minutes on 2 CPU cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read(), r.headers.get("content-type", "")


def _json(url: str, method: str = "GET", payload: dict | None = None):
    body = None if payload is None else json.dumps(payload).encode()
    data, _ = _request(url, method, body, {"Content-Type": "application/json"})
    return json.loads(data)


def _put_label(base: str, image_id: str, path: Path) -> dict:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{{}}\r\n--{boundary}--\r\n".encode()
    data, _ = _request(f"{base}/datastore/label?image={image_id}&tag=final", "PUT", body,
                       {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return json.loads(data)


def _write_studies(root: Path) -> tuple[Path, dict]:
    """Five 32^3 images in the studies folder; their masks kept aside, to be saved as annotations over REST."""
    studies, masks = root / "studies", root / "annotations"
    studies.mkdir()
    masks.mkdir()
    labels = {}
    for i in range(5):
        img, seg = create_test_image_3d(32, 32, 32, num_objs=2, rad_max=8, noise_max=0.2, num_seg_classes=1,
                                        random_state=np.random.RandomState(i))
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), studies / f"img_{i}.nii.gz")
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), np.eye(4)), masks / f"img_{i}.nii.gz")
        labels[f"img_{i}"] = masks / f"img_{i}.nii.gz"
    return studies, labels


def _wait(predicate, what: str, deadline: float, interval: float = 0.5):
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(interval)


def _info_or_none(base: str):
    try:
        return _json(f"{base}/info/")
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


def _tasks(base: str) -> list:
    """Every training task (GET /train/?all=true); retried on the 500 of the race described in :func:`_train`."""
    for _ in range(50):
        try:
            return _json(f"{base}/train/?all=true")
        except urllib.error.HTTPError as e:
            if e.code == 404:  # no training task yet
                return []
            if e.code != 500:
                raise
        time.sleep(0.2)
    pytest.fail("GET /train/ kept answering 500")


def _train(base: str, deadline: float, **overrides) -> dict:
    """POST /train/<model>, then poll GET /train/ until that task is no longer running; return the task."""
    known = {t["id"] for t in _tasks(base)}
    try:
        task_id = _json(f"{base}/train/{MODEL}", "POST", {**TRAIN, **overrides})["id"]
    except urllib.error.HTTPError as e:
        # monailabel 0.8.5 can answer 500 ("dictionary changed size during iteration") when it serialises the
        # new task while its thread updates it; the task was started all the same
        assert e.code == 500, e
        task_id = _wait(lambda: [t["id"] for t in _tasks(base) if t["id"] not in known], "the new task", deadline)[0]

    def finished():
        mine = [t for t in _tasks(base) if t["id"] == task_id]
        return mine[0] if mine and mine[0]["status"] not in ("SUBMITTED", "RUNNING") else None

    return _wait(finished, "the training task", deadline, interval=1.0)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def server(tmp_path):
    """``monailabel start_server`` on a free loopback port, serving a copy of the app (its folders stay in tmp)."""
    app = tmp_path / "app"
    shutil.copytree(REPO / "apps" / "monailabel_dp", app, ignore=shutil.ignore_patterns("model", "logs", "bin"))
    studies, labels = _write_studies(tmp_path)
    port = _free_port()
    exe = Path(sys.executable).parent / "monailabel"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "monailabel.main"]
    cmd += ["start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
            "--conf", "models", MODEL, "--conf", "bundles", str(REPO / "bundles"),
            "--conf", "target_epsilon", str(BUDGET), "--conf", "target_delta", "1e-5"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 90
            _wait(lambda: proc.poll() is not None or _info_or_none(base), "the server to answer /info", deadline)
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            yield {"base": base, "app": app, "labels": labels, "log": tmp_path / "server.log"}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

def test_train_infer_and_budget_through_rest(server):
    base, deadline = server["base"], time.monotonic() + DEADLINE_S
    weights = server["app"] / "model" / MODEL / "models" / "model.pt"

    privacy = _json(f"{base}/info/")["privacy"][MODEL]
    assert (privacy["epsilon_budget"], privacy["delta"], privacy["privacy_unit"]) == (BUDGET, 1e-5, "record")
    assert privacy["epsilon_spent"] == 0 and privacy["runs"] == [] and not privacy["exhausted"]

    # an untrained model serves nothing (MONAI Label answers 500; the reason is in the server's log)
    with pytest.raises(urllib.error.HTTPError, match="500"):
        _request(f"{base}/infer/{MODEL}?image=img_0&output=image", "POST", b"{}", {"Content-Type": "application/json"})
    _wait(lambda: f"Model '{MODEL}' has no trained weights yet" in server["log"].read_text(), "the reason",
          time.monotonic() + 20)

    # the user's annotations, saved through MONAI Label, are what is trained on
    for image_id, path in server["labels"].items():
        assert _put_label(base, image_id, path)["label"] == image_id

    task = _train(base, deadline)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    assert weights.exists()
    served = torch.load(weights, map_location="cpu", weights_only=True)  # what MONAI Label's inferer loads
    assert served["privacy"]["model_digest"] == state_dict_digest(served["model"]), "model.pt carries its accounting"
    bundle_copy = weights.parents[1]  # the bundle's own datalist is replaced: it generated no synthetic images
    assert not [p for p in bundle_copy.rglob("*.nii*")], sorted(map(str, bundle_copy.rglob("*.nii*")))
    first = _json(f"{base}/info/")["privacy"][MODEL]
    assert [r["status"] for r in first["runs"]] == ["finished"]
    run = first["runs"][0]
    assert run["noise_multiplier"] == SIGMA and run["sample_rate"] == 0.5 and run["steps_taken"] >= 1
    labelled = _json(f"{base}/datastore/?output=train")  # the final labels, as MONAI Label hands them to trainers
    assert sorted(Path(r["label"]).read_bytes() for r in labelled) == sorted(p.read_bytes() for p in server["labels"].values())
    trained = partition_dataset(labelled, ratios=[0.8, 0.2], shuffle=False)[0]  # BundleTrainTask's split
    assert f"records={dataset_fingerprint_of_records(trained)} n=4" in run["note"]
    expected = compose_epsilon([(SIGMA, 0.5, run["charged_steps"])], 1e-5)
    assert first["epsilon_spent"] == pytest.approx(expected, rel=1e-6)
    assert first["epsilon_left"] == pytest.approx(BUDGET - expected, rel=1e-6)
    assert first["last_training"]["steps"] == run["steps_taken"]  # the model's own report (accountant: prv)
    assert first["last_training"]["epsilon"] == pytest.approx(expected, rel=0.02)

    # inference through REST returns a label of the image's shape
    data, _ = _request(f"{base}/infer/{MODEL}?image=img_0&output=image", "POST", b"{}",
                           {"Content-Type": "application/json"})
    seg = Path(server["app"].parent / "pred.nii.gz")
    seg.write_bytes(data)
    pred = np.asarray(nib.load(seg).dataobj)
    assert pred.shape[-3:] == (32, 32, 32) and set(np.unique(pred)) <= {0, 1}

    # a retrain continues from model.pt and composes with the first run in the ledger
    task = _train(base, deadline)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    second = _json(f"{base}/info/")["privacy"][MODEL]
    assert [r["status"] for r in second["runs"]] == ["finished", "finished"]
    steps = sum(r["charged_steps"] for r in second["runs"])
    assert second["epsilon_spent"] == pytest.approx(compose_epsilon([(SIGMA, 0.5, steps)], 1e-5), rel=1e-6)
    assert second["epsilon_spent"] > first["epsilon_spent"]
    # ... and the weights' own history composes too: the model's report counts the steps of both runs
    assert second["last_training"]["steps"] == sum(r["steps_taken"] for r in second["runs"])
    assert second["last_training"]["epsilon"] == pytest.approx(second["epsilon_spent"], rel=0.02)

    # the budget allows no further step: refused with a clear message, nothing trained, weights unchanged
    before = _sha(weights)
    task = _train(base, deadline)
    details = "\n".join(task.get("details", []))
    assert task["status"] == "ERROR"
    assert "PrivacyBudgetExhaustedError" in details, details
    assert _sha(weights) == before
    third = _json(f"{base}/info/")["privacy"][MODEL]
    assert third["runs"] == second["runs"] and third["epsilon_spent"] == second["epsilon_spent"]
    assert third["last_training"] == second["last_training"]
