"""Patient-level LiRA: train many models on random halves of the patients, score every record under each.

:func:`run_lira` trains ``num_models`` models with a *recipe* (any picklable callable
``recipe(train_indices, seed) -> logits of every record``) in parallel worker processes, keeps each finished
model's logits in ``out_dir`` (an interrupted audit resumes where it stopped) and returns the score matrix.
Each patient is in exactly half of the models, so every record has in and out models to compare.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from monai_dp.audit.mia import logit_confidence
from monai_dp.utils.validation import check_positive_int, error_message

__all__ = ["membership_matrix", "run_lira"]

logger = logging.getLogger(__name__)


def membership_matrix(patient_ids: Sequence, num_models: int, seed: int = 0) -> np.ndarray:
    """Boolean (models, records): each patient (with all their records) is in exactly half of the models."""
    num_models = check_positive_int("num_models", num_models)
    if num_models < 4 or num_models % 2:
        raise ValueError(error_message("num_models", "an even number >= 4", num_models))
    ids = np.asarray([str(p) for p in patient_ids])
    _, inverse = np.unique(ids, return_inverse=True)
    rng = np.random.default_rng(seed)
    order = rng.random((num_models, inverse.max() + 1)).argsort(axis=0)
    patient_in = order < num_models // 2
    return patient_in[:, inverse]


def _save_atomic(path: Path, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # workers share the cores instead of each spawning one thread per core


def _train_one(recipe: Callable, train_indices: np.ndarray, seed: int, path: str) -> str:
    result = recipe(train_indices, seed)
    logits, history = result if isinstance(result, tuple) else (result, [])
    _save_atomic(Path(path), logits=np.asarray(logits, dtype=np.float32), train_indices=train_indices, seed=seed,
                 history=np.asarray(history, dtype=np.float64).reshape(-1, 3))
    return path


def run_lira(recipe: Callable, labels: Sequence[int], patient_ids: Sequence, out_dir: str | os.PathLike,
             num_models: int = 64, workers: int = 1, seed: int = 0,
             progress: Callable[[int, int, float], None] | None = None) -> dict[str, np.ndarray]:
    """Train (or resume) the audit's models and return ``scores`` and ``member`` of shape (models, records).

    Args:
        recipe: picklable ``recipe(train_indices, seed)`` returning the ``(records, classes)`` logits of every
            record, or ``(logits, history)`` with the run's accountant history ``[(σ, q, steps), ...]``.
        labels: the label of every record (for the logit-scaled confidence).
        patient_ids: the patient of every record; patients are split into halves, never records.
        out_dir: folder for ``membership.npy`` and one ``model_XXXX.npz`` per finished model.
        workers: parallel worker processes (spawned; each trains whole models).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    member = membership_matrix(patient_ids, num_models, seed)
    saved = out / "membership.npy"
    if saved.exists():
        if not np.array_equal(np.load(saved), member):
            raise ValueError(error_message("out_dir", "a folder of the same audit (records, models, seed)", str(out),
                                           "Use a new folder, or the same patients, num_models and seed."))
    else:
        np.save(saved, member)
    paths = [out / f"model_{m:04d}.npz" for m in range(num_models)]
    todo = [m for m in range(num_models) if not paths[m].exists()]
    if len(todo) < num_models:
        logger.info("LiRA audit: resuming, %d of %d models already trained.", num_models - len(todo), num_models)
    start, done = time.time(), num_models - len(todo)

    def report() -> None:
        elapsed = time.time() - start
        logger.info("LiRA audit: %d/%d models trained (%.0f s).", done, num_models, elapsed)
        if progress is not None:
            progress(done, num_models, elapsed)

    jobs = [(recipe, np.flatnonzero(member[m]), seed * 100_003 + m, str(paths[m])) for m in todo]
    if workers <= 1:
        for job in jobs:
            _train_one(*job)
            done += 1
            report()
    else:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        with ProcessPoolExecutor(max_workers=int(workers), mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(threads,)) as pool:
            for fut in as_completed([pool.submit(_train_one, *job) for job in jobs]):
                fut.result()
                done += 1
                report()
    labels = np.asarray(labels)
    loaded = [np.load(p) for p in paths]
    scores = np.stack([logit_confidence(f["logits"], labels) for f in loaded])
    histories = [[(float(s), float(q), int(n)) for s, q, n in f["history"]] for f in loaded]
    return {"scores": scores, "member": member, "histories": histories}
