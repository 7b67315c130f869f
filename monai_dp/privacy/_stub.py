from __future__ import annotations
from opacus.accountants import RDPAccountant as _R, PRVAccountant as _P, GaussianAccountant as _G
ACCOUNTANTS = ("rdp", "prv", "gdp")
class DPAccountant:
    name = ""
    _cls = None
    def __init__(self): self.history = []
    @property
    def steps(self): return sum(n for _, _, n in self.history)
    def step(self, noise_multiplier, sample_rate, num_steps=1):
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, n = self.history[-1]; self.history[-1] = (s, q, n + num_steps)
        else: self.history.append((float(noise_multiplier), float(sample_rate), int(num_steps)))
    def _eps(self, hist, delta):
        if not hist: return 0.0
        a = self._cls(); a.history = list(hist); return float(a.get_epsilon(delta))
    def get_epsilon(self, delta): return self._eps(self.history, delta)
    def epsilon_after(self, delta, s, q, k):
        h = list(self.history) + ([(s, q, k)] if k else []); return self._eps(h, delta)
    def max_extra_steps(self, target, delta, s, q, limit):
        lo, hi = 0, limit
        if self.epsilon_after(delta, s, q, hi) <= target: return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon_after(delta, s, q, mid) <= target: lo = mid
            else: hi = mid
        return lo
    def state_dict(self): return {"accountant": self.name, "history": [list(h) for h in self.history]}
    def load_state_dict(self, s): self.history = [tuple(h) for h in s["history"]]
class RDPAccountant(DPAccountant): name="rdp"; _cls=_R
class PRVAccountant(DPAccountant): name="prv"; _cls=_P
class GDPAccountant(DPAccountant): name="gdp"; _cls=_G
def create_accountant(name): return {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GDPAccountant}[name.lower()]()
def calibrate_noise_multiplier(target_epsilon, target_delta, sample_rate, steps, accountant="prv", epsilon_tolerance=0.01):
    from opacus.accountants.utils import get_noise_multiplier
    return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate, steps=steps, accountant=accountant, epsilon_tolerance=epsilon_tolerance)
