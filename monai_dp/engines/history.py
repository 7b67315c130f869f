"""A model's privacy history travels with its weights.

A DP model file carries the accounting of the training that produced its weights: a bundle saves its ``model.pt``
with ``save_dict={"model": network, "privacy": PrivacyHistory(network)}`` (MONAI Label's inferer, MONAI's
``CheckpointLoader`` and ``ckpt_export --key_in_ckpt model`` read the ``"model"`` entry and ignore the rest).

A trainer notes the digest of its network's weights when it is built. Before its first step it looks again: weights
that changed since (a ``CheckpointLoader`` on ``STARTED``, as MONAI Label inserts for a retrain) and whose
accounting the trainer does not hold are looked up by their digest in the files its ``privacy_history`` names
(a model file, a trainer checkpoint, or a folder of them) and in what a ``PrivacyHistory`` loaded; the history
found is composed before the trainer's own steps. Weights with no history found are refused, unless the trainer
was told ``initial_weights="public"`` (weights trained on no private data, e.g. a public pretrained model).
"""

from __future__ import annotations

import glob
import logging
import os
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from monai_dp.engines.digest import state_dict_digest, weights_digest
from monai_dp.utils.errors import DPConfigurationError
from monai_dp.utils.validation import error_message

__all__ = ["INITIAL_WEIGHTS", "InitialWeightsCheck", "PrivacyHistory", "find_history", "history_sources"]

logger = logging.getLogger("monai_dp.engines.trainer")

INITIAL_WEIGHTS = ("accounted", "public")
_TRAINERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # network -> weakref to its DP trainer


def register_network(network: torch.nn.Module, trainer: Any) -> None:
    """Remember which DP trainer trains ``network`` (a weak reference: nothing is kept alive by it)."""
    _TRAINERS[network] = weakref.ref(trainer)


def _trainer_of(network: torch.nn.Module) -> Any:
    ref = _TRAINERS.get(network)
    trainer = None if ref is None else ref()
    if trainer is None:
        raise RuntimeError(error_message(
            "PrivacyHistory.network", "the network of a DPSupervisedTrainer", type(network).__name__,
            "Build the trainer with this network before a checkpoint saves its privacy history."))
    return trainer


class PrivacyHistory:
    """The accounting of ``network``'s weights, for a checkpoint's ``save_dict`` / ``load_dict``.

    ``state_dict()`` is the state of the budget of the DP trainer that trains ``network`` (plain types), with the
    digest of the weights saved beside it. ``load_state_dict(state)`` hands ``state`` to that trainer as the history
    of weights it may be given: composed before its first step if the network then holds those weights.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        if not isinstance(network, torch.nn.Module):
            raise TypeError(error_message("network", "a torch.nn.Module", type(network).__name__))
        self.network = network

    def state_dict(self) -> dict:
        state = _trainer_of(self.network).privacy.state_dict()
        state["model_digest"] = weights_digest(self.network)
        return state

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "accountant" not in state:
            raise ValueError(error_message("privacy history", "a dict with an 'accountant' entry",
                                           type(state).__name__))
        _trainer_of(self.network).initial_weights_check.loaded.append((dict(state), "a loaded PrivacyHistory"))


def history_sources(privacy_history: Any) -> list[str]:
    """The files named by ``privacy_history`` (a path, a folder or a list of them), ``model.pt`` files first."""
    if privacy_history is None:
        return []
    items = [privacy_history] if isinstance(privacy_history, (str, os.PathLike)) else privacy_history
    if not isinstance(items, Iterable):
        raise TypeError(error_message("privacy_history", "a path, a folder or a list of them",
                                      type(privacy_history).__name__))
    files: list[str] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(error_message("privacy_history item", "a path", type(item).__name__))
        path = os.fspath(item)
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "*.pt")), key=lambda f: (os.path.basename(f) != "model.pt",
                                                                               -os.path.getmtime(f), f))
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
    return files


def _pairs(content: Any) -> list[tuple[Any, dict]]:
    """(weights, privacy state) pairs a checkpoint holds: a model file's, a trainer checkpoint's."""
    if not isinstance(content, dict):
        return []
    out = []
    weights = content.get("model")
    for privacy in (content.get("privacy"), (content.get("trainer") or {}).get("privacy")
                    if isinstance(content.get("trainer"), dict) else None):
        if isinstance(privacy, dict) and "accountant" in privacy:
            out.append((weights, privacy))
    return out


def _matches(weights: Any, privacy: dict, digest: str) -> bool:
    if isinstance(weights, dict) and weights:
        try:
            return state_dict_digest(weights) == digest
        except (TypeError, RuntimeError):
            return False
    return privacy.get("model_digest") == digest


def find_history(digest: str, files: Sequence[str], loaded: Sequence[tuple[dict, str]] = ()) -> tuple[dict, str] | None:
    """The privacy state saved with weights of ``digest`` and where it was found; ``None`` if nowhere."""
    for state, source in loaded:
        if state.get("model_digest") == digest:
            return state, source
    for path in files:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - not a checkpoint (or not one torch reads safely): no history
            logger.debug("Privacy history: skipping %s (%s).", path, err)
            continue
        for weights, privacy in _pairs(content):
            if _matches(weights, privacy, digest):
                return privacy, path
    return None


class InitialWeightsCheck:
    """What a trainer knows of its starting weights, and the check before its first step (see the module).

    Args:
        network: the trainer's network, whose weights are noted now.
        initial_weights: ``"accounted"`` or ``"public"`` (see ``DPSupervisedTrainer``).
        privacy_history: files or folders where the history of loaded weights is looked up.
    """

    def __init__(self, network: torch.nn.Module, initial_weights: str, privacy_history: Any) -> None:
        self.initial_digest = weights_digest(network)
        self.initial_weights, self.privacy_history = initial_weights, privacy_history
        self.loaded: list[tuple[dict, str]] = []  # (privacy state, source) handed in by a loaded PrivacyHistory
        self.done = False

    def __call__(self, network: torch.nn.Module, optimizer: Any, budget: Any) -> None:
        """Compose the history of weights changed since construction, or raise :class:`DPConfigurationError`."""
        if self.done:
            return
        self._check(network, optimizer, budget)
        self.done = True

    def _check(self, network: torch.nn.Module, optimizer: Any, budget: Any) -> None:
        current = weights_digest(network)
        if current == self.initial_digest or current in budget.loaded_digests:
            return
        if weights_digest(network, optimizer) in budget.loaded_digests:
            return  # resumed with network and optimizer from the checkpoint that holds this accounting
        if self.initial_weights == "public":
            logger.warning("initial_weights='public': the weights loaded after the trainer was built (digest %s) "
                           "are declared to carry no private training; ε counts this job's steps only.", current)
            budget.prior.append({"source": "initial_weights='public'", "steps": 0, "model_digest": current})
            return
        files = history_sources(self.privacy_history)
        found = find_history(current, files, self.loaded)
        if found is None:
            where = (f"looked in {', '.join(files)}" if files else "no privacy_history given"
                     if self.privacy_history is None else f"no checkpoint at privacy_history={self.privacy_history!r}")
            raise DPConfigurationError(error_message(
                "network", "the weights the trainer was built with, or weights whose privacy history is known",
                f"weights loaded after construction (digest {current}) with no history found ({where})",
                "A retrain continues their privacy: save the model with its accounting (save_dict "
                "{'model': network, 'privacy': PrivacyHistory(network)}) and pass its file or folder as "
                "`privacy_history`; or, for weights trained on no private data, pass initial_weights='public'."))
        state, source = found
        before = budget.get_epsilon()
        budget.compose_prior(state, source)
        logger.info("Privacy history: the weights continue %d earlier steps (%s); ε composes: %.4g -> %.4g at "
                    "δ = %.3g.", budget.prior_steps, source, before, budget.get_epsilon(), budget.delta)
