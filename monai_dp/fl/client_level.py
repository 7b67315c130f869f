"""Client-level DP for federations of many sites: DP-FedAvg (McMahan et al., 2018), noise added at the server.

Each round every site is sampled independently with probability q (Poisson, from the server's own generator);
each sampled site's update is clipped to L2 norm ``clip_norm`` C (over all its tensors together); the server adds
Gaussian noise N(0, σ²C²) to the sum of the clipped updates and divides by the *expected* number of sampled sites
q·K (a fixed denominator: one site moves the average by at most C / (qK)). Every round (sampled sites or not) is
one step of the Poisson-subsampled Gaussian mechanism, accounted with the project's accountants.

The guarantee protects a **whole site** (all of its patients together), not a patient: it bounds what the model
reveals about whether a site took part. It makes sense with tens of sites or more (the noise σC/(qK) shrinks with
the number of sites K); with a handful of sites the noise needed drowns the updates. For patient-level guarantees
at each site use site-level DP-SGD (:class:`~monai_dp.fl.algo.DPMonaiAlgo`); the two compose.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from monai_dp.privacy.calibration import calibrate_noise_multiplier
from monai_dp.privacy.registry import create_accountant
from monai_dp.utils.randomness import os_seed
from monai_dp.utils.validation import error_message

__all__ = ["ClientLevelDP"]

logger = logging.getLogger(__name__)


class ClientLevelDP:
    """The DP-FedAvg mechanism and its accounting (no NVFlare needed; see :class:`ClientLevelDPAggregator`).

    Args:
        num_sites: K, the number of sites in the federation.
        sample_rate: q, the probability that a site takes part in a round.
        clip_norm: C, the L2 bound of each site's update.
        noise_multiplier: σ; or give ``target_epsilon`` and ``num_rounds`` to calibrate it.
        target_epsilon: the federation's client-level budget ε; rounds that would exceed it are refused.
        target_delta: δ (default: min(1e-5, 1 / (10 K))).
        num_rounds: rounds σ is planned over (with ``target_epsilon``).
        accountant: ``"prv"`` (default), ``"pld"`` or ``"rdp"``.
        noise_seed: seed of the noise and sampling generator, for tests only (``None``: the operating system's).
    """

    def __init__(self, num_sites: int, sample_rate: float, clip_norm: float, noise_multiplier: float | None = None,
                 target_epsilon: float | None = None, target_delta: float | None = None,
                 num_rounds: int | None = None, accountant: str = "prv", noise_seed: int | None = None) -> None:
        if isinstance(num_sites, bool) or not isinstance(num_sites, int) or not num_sites >= 1:
            raise ValueError(error_message("num_sites", "an int >= 1", num_sites))
        if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
            raise ValueError(error_message("sample_rate", "in (0, 1]", sample_rate))
        if not (isinstance(clip_norm, (int, float)) and clip_norm > 0 and math.isfinite(clip_norm)):
            raise ValueError(error_message("clip_norm", "a finite number > 0", clip_norm))
        self.num_sites, self.sample_rate, self.clip_norm = num_sites, float(sample_rate), float(clip_norm)
        self.delta = min(1e-5, 1 / (10 * num_sites)) if target_delta is None else float(target_delta)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        if noise_multiplier is None:
            if self.target_epsilon is None or num_rounds is None:
                raise ValueError(error_message("noise_multiplier", "given, or target_epsilon and num_rounds to "
                                               "calibrate it", None))
            noise_multiplier = calibrate_noise_multiplier(self.target_epsilon, self.delta, self.sample_rate,
                                                          int(num_rounds), accountant)
        if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0):
            raise ValueError(error_message("noise_multiplier", "a number > 0", noise_multiplier,
                                           "σ = 0 adds no noise and gives no privacy."))
        self.noise_multiplier = float(noise_multiplier)
        self.accountant = create_accountant(accountant)
        self.noise_seed = noise_seed
        if noise_seed is not None:
            logger.warning("Client-level DP with a fixed noise_seed=%d: noise and sampling are reproducible by "
                           "whoever knows the seed (tests only).", noise_seed)
        self.generator = torch.Generator().manual_seed(os_seed() if noise_seed is None else int(noise_seed))

    # ------------------------------------------------------------------ the mechanism
    def sample_sites(self, sites: Sequence[str]) -> list[str]:
        """Each site independently with probability q (the result may be empty: the round still counts)."""
        draws = torch.rand(len(sites), generator=self.generator)
        return [site for site, u in zip(sites, draws.tolist()) if u < self.sample_rate]

    def clip(self, update: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """``update`` scaled to L2 norm at most C (over all tensors together), and its norm before clipping."""
        tensors = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in update.items()}
        norm = float(torch.sqrt(sum((t * t).sum() for t in tensors.values()))) if tensors else 0.0
        if not math.isfinite(norm):
            raise ValueError(error_message("update", "finite", f"an update of norm {norm}"))
        factor = self.clip_norm / max(norm, self.clip_norm)
        return {k: t * factor for k, t in tensors.items()}, norm

    def aggregate(self, clipped: Sequence[Mapping[str, torch.Tensor]],
                  template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(Σ clipped updates + N(0, σ²C²)) / (qK), per tensor of ``template`` (its keys, in order, and shapes).

        The noise is drawn for every tensor of ``template`` in its key order, also when no site was sampled.
        """
        denominator = self.sample_rate * self.num_sites
        std = self.noise_multiplier * self.clip_norm
        out = {}
        for name, ref in template.items():
            total = torch.zeros(tuple(ref.shape), dtype=torch.float64)
            for update in clipped:
                total += update[name]
            noise = torch.randn(tuple(ref.shape), generator=self.generator, dtype=torch.float64) * std
            out[name] = ((total + noise) / denominator).to(torch.as_tensor(ref).dtype)
        return out

    # ------------------------------------------------------------------ accounting
    @property
    def rounds(self) -> int:
        return self.accountant.steps

    def get_epsilon(self, delta: float | None = None) -> float:
        return float(self.accountant.get_epsilon(self.delta if delta is None else float(delta)))

    def epsilon_after_round(self) -> float:
        """ε after the rounds so far and one more."""
        return float(self.accountant.epsilon_after(self.delta, self.noise_multiplier, self.sample_rate, 1))

    def allows_round(self) -> bool:
        """Whether one more round stays within ``target_epsilon`` (always, without a target); asked before every
        round, the first included (a target below one round's ε releases nothing)."""
        if self.target_epsilon is None:
            return True
        return self.epsilon_after_round() <= self.target_epsilon

    def record_round(self) -> None:
        self.accountant.step(self.noise_multiplier, self.sample_rate)

    def report(self) -> dict:
        return {"level": "site (client-level DP-FedAvg)", "epsilon": self.get_epsilon(), "delta": self.delta,
                "target_epsilon": self.target_epsilon, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "clip_norm": self.clip_norm, "num_sites": self.num_sites,
                "rounds": self.rounds, "accountant": self.accountant.name,
                "noise_seeded": self.noise_seed is not None}

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(), "generator": self.generator.get_state()}

    def accounting_state(self) -> dict:
        """The accountant's state only (plain types, JSON): what the server keeps across jobs
        (:mod:`monai_dp.fl.accounts`); the generator stays seeded anew."""
        return {"accountant": self.accountant.state_dict()}

    def load_accounting_state(self, state: dict) -> None:
        self.load_state_dict({"accountant": state["accountant"], "generator": self.generator.get_state()})

    def load_state_dict(self, state: dict) -> None:
        acc = dict(state["accountant"], accountant=self.accountant.name)
        if int(sum(int(e[2]) for e in acc.get("history", []))) < self.rounds:
            raise ValueError(error_message("state['accountant']", f"at least the {self.rounds} rounds accounted",
                                           "fewer", "Accounting never goes backwards."))
        self.accountant.load_state_dict(acc)
        self.generator.set_state(state["generator"])
