"""Distributed DP noise for secure aggregation: each site adds a share of the noise, the server sees only the sum.

Every site clips its update (a weight difference) to L2 norm C and adds Gaussian noise of variance σ²C²/t, where t
is the smallest number of sites whose updates the server may sum (``min_sites``, default: all n sites). The sum of
any k >= t sites' updates then carries noise of standard deviation σC·√(k/t) >= σC, which is the central
DP-FedAvg mechanism with sampling rate 1 (:class:`~monai_dp.fl.client_level.ClientLevelDP`, q = 1) or better. The
updates travel encrypted (CKKS, see :mod:`monai_dp.fl.secure_job`) and the server adds ciphertexts only.

What each guarantee covers (honest-but-curious parties, one shared CKKS key held by the sites, none by the server):

* **aggregate** (σ, accounted here each round at q = 1): what the server learns (ciphertexts and, after the
  federation, whatever the sites reveal of the model) and what any coalition of at most k_min − t sites learns from
  the decrypted aggregates, k_min being the fewest sites summed in any round (n when no site ever dropped): a
  coalition of m sites can subtract its own noise shares, and only when k − m >= t honest shares remain in every
  round is the noise left at least σC -- in exact arithmetic; the CKKS error is treated separately
  (:meth:`DistributedNoise.report`, ``ckks_error``).
* **individual update** (σ/√t per round): what anyone who can decrypt a single site's ciphertext learns -- the
  server together with any one site (the key is shared) -- and it holds whatever CKKS does afterwards: every value
  that leaves the site is post-processing of its own noised update.
* the site's sample-level DP-SGD guarantee (its own ε, δ, unit) is unchanged and holds against everyone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from monai_dp.fl.client_level import ClientLevelDP
from monai_dp.privacy.registry import create_accountant
from monai_dp.utils.validation import error_message

__all__ = ["DistributedNoise", "measure_ckks_error"]


def _check_sites(num_sites: int, min_sites: int | None) -> int:
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or not num_sites >= 1:
        raise ValueError(error_message("num_sites", "an int >= 1", num_sites))
    if min_sites is None:
        return num_sites
    if isinstance(min_sites, bool) or not isinstance(min_sites, int) or not 1 <= min_sites <= num_sites:
        raise ValueError(error_message("min_sites", f"an int in [1, num_sites={num_sites}]", min_sites,
                                       "t is the fewest surviving sites whose noise shares must add up to σC."))
    return min_sites


class DistributedNoise:
    """A site's share of the aggregate's noise, and the accounting of the aggregate (the same at every site and at
    the server: it depends on σ, the rounds and nothing else).

    Args:
        num_sites: n, the sites of the federation.
        clip_norm: C, the L2 bound of each site's update (all its tensors together).
        noise_multiplier: σ of the aggregate; or ``target_epsilon`` and ``num_rounds`` to calibrate it (q = 1).
        min_sites: t, the fewest sites whose updates are summed (default n); each share has variance σ²C²/t.
        target_epsilon: the aggregate-level budget; a round that would exceed it is refused (:meth:`allows_round`).
        target_delta: δ (default: min(1e-5, 1 / (10 n)), as ClientLevelDP).
        num_rounds: rounds σ is planned over (with ``target_epsilon``).
        accountant: ``"prv"`` (default), ``"pld"`` or ``"rdp"``.
        noise_seed: seed of the share's generator, for tests only (``None``: the operating system's).
    """

    def __init__(self, num_sites: int, clip_norm: float, noise_multiplier: float | None = None,
                 min_sites: int | None = None, target_epsilon: float | None = None, target_delta: float | None = None,
                 num_rounds: int | None = None, accountant: str = "prv", noise_seed: int | None = None) -> None:
        self.min_sites = _check_sites(num_sites, min_sites)
        self.num_sites = num_sites
        # the aggregate is the central mechanism at q = 1: its accounting, calibration, clipping and checks
        self.central = ClientLevelDP(num_sites, 1.0, clip_norm, noise_multiplier, target_epsilon, target_delta,
                                     num_rounds, accountant, noise_seed)
        self.individual = create_accountant(accountant)  # one site's own update at σ/√t
        self.min_summed: int | None = None  # k_min: the fewest sites summed in a round (None: not known here)

    # ------------------------------------------------------------------ the site's share
    @property
    def noise_multiplier(self) -> float:
        return self.central.noise_multiplier

    @property
    def clip_norm(self) -> float:
        return self.central.clip_norm

    @property
    def delta(self) -> float:
        return self.central.delta

    @property
    def share_std(self) -> float:
        """Standard deviation of one site's noise share per coordinate: σC/√t."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.min_sites)

    def privatize(self, update: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """``update`` clipped to L2 norm C plus N(0, σ²C²/t) per coordinate (float64, key order of ``update``), and
        its norm before clipping."""
        clipped, norm = self.central.clip(update)
        std = self.share_std
        gen = self.central.generator
        noised = {k: v + std * torch.randn(tuple(v.shape), generator=gen, dtype=torch.float64)
                  for k, v in clipped.items()}
        return noised, norm

    # ------------------------------------------------------------------ accounting
    @property
    def rounds(self) -> int:
        return self.central.rounds

    @property
    def target_epsilon(self) -> float | None:
        return self.central.target_epsilon

    def epsilon_after_round(self) -> float:
        return self.central.epsilon_after_round()

    def allows_round(self) -> bool:
        """Whether one more aggregate stays within ``target_epsilon``: asked before every round, the first included."""
        return self.central.allows_round()

    def record_round(self, num_summed: int | None = None) -> None:
        """One round of the aggregate (σ, q = 1) and of an individual update (σ/√t, q = 1); ``num_summed``: the
        sites whose updates the server summed this round (the server knows it; a site does not)."""
        self.central.record_round()
        self.individual.step(self.noise_multiplier / math.sqrt(self.min_sites), 1.0)
        if num_summed is not None:
            k = int(num_summed)
            self.min_summed = k if self.min_summed is None else min(self.min_summed, k)

    def coalition_bound(self) -> int | None:
        """k_min − t: the largest coalition of sites the aggregate guarantee holds against (``None`` when k_min is
        not known here: at a site, which does not see how many updates were summed)."""
        return None if self.min_summed is None else max(self.min_summed - self.min_sites, 0)

    def guarantee(self) -> str:
        n, t, bound = self.num_sites, self.min_sites, self.coalition_bound()
        if bound is None:
            return (f"against the server and any coalition of at most k_min - {t} of the {n} sites (honest but "
                    f"curious), k_min the fewest sites summed in any round (the server's federation report; at most "
                    f"{n - t} when all {n} sites were summed every round)")
        return (f"against the server and any coalition of at most {bound} of the {n} sites (honest but curious): "
                f"k_min = {self.min_summed} sites were summed in the smallest round, t = {t}")

    def get_epsilon(self) -> float:
        """ε of the aggregates so far (the guarantee against the server and coalitions of at most k_min − t sites)."""
        return self.central.get_epsilon()

    def individual_epsilon(self) -> float:
        """ε of one site's updates so far (against anyone who can decrypt a single site's ciphertext)."""
        return float(self.individual.get_epsilon(self.delta)) if self.individual.steps else 0.0

    def epsilon_with_error(self, num_params: int, ckks_error: float) -> tuple[float, float]:
        """(sensitivity, ε) of the aggregates when the decrypted sum may differ from the exact one by
        ``ckks_error`` per coordinate, modelled as a data-dependent shift: sensitivity C + 2·η·√d."""
        if not (isinstance(ckks_error, (int, float)) and ckks_error >= 0 and math.isfinite(ckks_error)):
            raise ValueError(error_message("ckks_error", "a finite number >= 0", ckks_error))
        sensitivity = self.clip_norm + 2.0 * float(ckks_error) * math.sqrt(int(num_params))
        if self.rounds == 0:
            return sensitivity, 0.0
        sigma = self.noise_multiplier * self.clip_norm / sensitivity
        acc = create_accountant(self.central.accountant.name)
        return sensitivity, float(acc.epsilon_after(self.delta, sigma, 1.0, self.rounds))

    def report(self, num_params: int | None = None, ckks_error: float | None = None) -> dict:
        n, t = self.num_sites, self.min_sites
        out = {
            "level": "aggregate (distributed noise, secure aggregation)",
            "guarantee": self.guarantee(), "min_summed": self.min_summed, "coalition_bound": self.coalition_bound(),
            "epsilon": self.get_epsilon(), "delta": self.delta, "target_epsilon": self.central.target_epsilon,
            "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm, "num_sites": n,
            "min_sites": t, "share_std": self.share_std, "rounds": self.rounds,
            "accountant": self.central.accountant.name, "noise_seeded": self.central.noise_seed is not None,
            "individual_update": {
                "guarantee": "against anyone who decrypts one site's update (the server with any one site)",
                "noise_multiplier": self.noise_multiplier / math.sqrt(t), "epsilon": self.individual_epsilon()},
        }
        if num_params is not None and ckks_error is not None:
            sensitivity, eps = self.epsilon_with_error(num_params, ckks_error)
            out["ckks"] = {"max_abs_error_of_sum": float(ckks_error), "num_params": int(num_params),
                           "sensitivity": sensitivity, "epsilon": eps}
        return out

    def state_dict(self) -> dict:
        return {"central": self.central.state_dict(), "individual": self.individual.state_dict(),
                "min_summed": self.min_summed}

    def load_state_dict(self, state: dict) -> None:
        self.central.load_state_dict(state["central"])
        self.individual.load_state_dict(state["individual"])
        self.min_summed = state.get("min_summed")

    def accounting_state(self) -> dict:
        """The accounting only (plain types, JSON): what the server keeps across jobs (:mod:`monai_dp.fl.accounts`)."""
        return {"central": self.central.accounting_state(), "individual": self.individual.state_dict(),
                "min_summed": self.min_summed}

    def load_accounting_state(self, state: dict) -> None:
        """Continue from ``state``: ε composes with its rounds, k_min is the smaller of both."""
        if int(sum(int(e[2]) for e in state["individual"].get("history", []))) < self.individual.steps:
            raise ValueError(error_message("state['individual']", f"at least the {self.individual.steps} rounds "
                                           "accounted", "fewer", "Accounting never goes backwards."))
        self.central.load_accounting_state(state["central"])
        self.individual.load_state_dict(dict(state["individual"], accountant=self.individual.name))
        saved = state.get("min_summed")
        if saved is not None:
            self.min_summed = int(saved) if self.min_summed is None else min(self.min_summed, int(saved))


def measure_ckks_error(context: object, num_sites: int, num_values: int = 8192, value_std: float = 1.0,
                       trials: int = 3, seed: int = 0) -> float:
    """Largest |decrypted − exact| of a sum of ``num_sites`` encrypted vectors, per coordinate (synthetic data).

    Done the way the server aggregates: ciphertexts added, the sum scaled by 1/k (NVFlare's weighted average with
    unit weights) and decrypted; the error of the sum is k times that of the average. ``context`` is a TenSEAL CKKS
    context holding the secret key (a site's).
    """
    import tenseal as ts

    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(int(trials)):
        values = [rng.normal(0.0, value_std, int(num_values)) for _ in range(int(num_sites))]
        total = ts.ckks_vector(context, values[0])
        for v in values[1:]:
            total = total + ts.ckks_vector(context, v)
        mean = np.asarray((total * (1.0 / num_sites)).decrypt())
        worst = max(worst, float(np.abs(mean * num_sites - np.sum(values, axis=0)).max()))
    return worst
