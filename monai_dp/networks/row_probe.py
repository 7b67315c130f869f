"""A probe on a real batch: do a network's rows stay independent? (second line of defence for ghost clipping)

The allow-list (:mod:`monai_dp.networks.row_independence`) decides from class names; a class declared
row-wise by mistake, a patched function or a mixing step written inline would pass it. The probe takes the
first ``k`` rows of a real batch and runs the network three times (no gradient, float as the network is, in
train mode, from one saved random state so that dropout draws the same masks): as is; with every row but the
first replaced; with every row but the last replaced. The kept row's input and output of *every* module call
must not change. Comparing every module, not only the network output, also catches mixing whose effect on
the output is hidden at the current weights (e.g. behind a zero-initialised layer) but not on the gradient.

Limits: it sees one batch and the current weights, so mixing that only shows for other data is missed; this
is why the allow-list comes first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["probe_row_independence"]

_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
_FIX = ("use per-sample gradients (`grad_sample_mode='per_sample'`, `PerSampleGradients`), which compute every "
        "row on its own.")


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _perturbed(x: torch.Tensor, keep: int, seed: int) -> torch.Tensor:
    """``x`` with every row but ``keep`` changed: noise of the batch's scale (floats) or rows rolled (others)."""
    out = x.clone()
    others = [i for i in range(x.shape[0]) if i != keep]
    if x.is_floating_point():
        gen = torch.Generator().manual_seed(seed)
        scale = float(x.float().std()) if x.numel() > 1 else 1.0
        noise = torch.randn((len(others), *x.shape[1:]), generator=gen, dtype=torch.float64)
        out[others] = x[others] + (noise * (scale if scale > 0 else 1.0)).to(dtype=x.dtype, device=x.device)
    else:
        out[others] = x[others].roll(1, 0) if len(others) > 1 else x[others]
    return out


class _Recorder:
    """Forward pre-hooks and hooks on every module: the kept row of every input and output, in call order."""

    def __init__(self, network: nn.Module, rows: int):
        self.rows, self.keep, self.calls, self.handles = rows, 0, [], []
        for path, m in network.named_modules():
            self.handles.append(m.register_forward_pre_hook(self._pre(path)))
            self.handles.append(m.register_forward_hook(self._post(path)))

    def _row(self, value):
        return [t.detach()[self.keep].clone() if t.ndim and t.shape[0] == self.rows else None
                for t in _tensors(value)]  # keep: a slice of rows (a view, copied once)

    def _pre(self, path):
        def hook(_m, args):
            self.calls.append((path, "input", self._row(args)))
        return hook

    def _post(self, path):
        def hook(_m, _args, output):
            self.calls.append((path, "output", self._row(output)))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _run(network, inferer, x, recorder, keep, rng_states) -> list:
    recorder.keep, recorder.calls = keep, []
    torch.set_rng_state(rng_states[0])
    if rng_states[1] is not None:
        torch.cuda.set_rng_state(rng_states[1], x.device)
    out = inferer(x, network) if inferer is not None else network(x)
    recorder.calls.append(("<root>", "network output", recorder._row(out)))
    return recorder.calls


def _select(calls: list, j: int) -> list:
    """Row ``j`` of the kept rows of a recorded run."""
    return [(p, w, [None if t is None else t[j] for t in ts]) for p, w, ts in calls]


def _changed(base: list, other: list) -> tuple[list[tuple[str, str, float, float]], bool]:
    """``[(path, where, diff, tol)]`` for every kept-row tensor that changed; ``True`` if the calls differ."""
    if [(p, w, len(t)) for p, w, t in base] != [(p, w, len(t)) for p, w, t in other]:
        return [], True
    out = []
    for (path, where, ts), (_, _, us) in zip(base, other):
        for t, u in zip(ts, us):
            if t is None or u is None or not t.is_floating_point():
                if t is not None and u is not None and not torch.equal(t, u):
                    out.append((path, where, float("inf"), 0.0))
                continue
            if t.shape != u.shape:
                out.append((path, where, float("inf"), 0.0))
                continue
            if torch.equal(t, u):  # the usual case on a CPU: bit for bit the same
                continue
            diff = float((t - u).abs().max())
            tol = _RTOL.get(t.dtype, 1e-2) * max(float(t.abs().max()), 1e-6)  # float16/bfloat16: 1e-2
            if not diff <= tol:
                out.append((path, where, diff, tol))
    return out, False


def _culprits(changes: list[tuple[str, str, float, float]]) -> list[tuple[str, str, float, float]]:
    """``(path, what, diff, tol)`` for the innermost modules that mix rows.

    A module mixes rows if its kept-row input did not change but its output, or the input it passed to one of
    its children, did (then the mixing is written inline in its forward).
    """
    inputs_changed = {p for p, w, _, _ in changes if w == "input"}
    flagged: dict[str, tuple[str, float, float]] = {}
    for path, where, diff, tol in changes:
        if where == "output" and path not in inputs_changed:
            flagged.setdefault(path, ("output", diff, tol))
        elif where == "input" and path:
            parent = path.rpartition(".")[0]
            if parent not in inputs_changed:
                flagged.setdefault(parent, (f"input to `{path}`", diff, tol))
    innermost = [p for p in flagged if not any(q != p and (p == "" or q.startswith(p + ".")) for q in flagged)]
    return [(p, *flagged[p]) for p in innermost]


def _passes(network, inferer, x, seed) -> tuple[list, bool]:
    """The three passes: ``(changes, calls_differ)`` of the kept rows 0 and ``k - 1`` when the others change."""
    k = x.shape[0]
    cuda = x.device.type == "cuda"
    recorder = _Recorder(network, k)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if cuda else []):
            states = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if cuda else None)
            base = _run(network, inferer, x, recorder, slice(0, k, k - 1), states)  # rows 0 and k - 1
            first, differ_first = _changed(_select(base, 0), _select(_run(
                network, inferer, _perturbed(x, 0, seed), recorder, slice(0, 1), states), 0))
            last, differ_last = _changed(_select(base, 1), _select(_run(
                network, inferer, _perturbed(x, k - 1, seed + 1), recorder, slice(k - 1, k), states), 0))
    finally:
        recorder.remove()
    return first + last, differ_first or differ_last


def probe_row_independence(network: nn.Module, inputs: torch.Tensor, inferer: Callable | None = None,
                           rows: int = 4, seed: int = 0) -> list[tuple[str, str, str]]:
    """``(layer_path, problem, fix)`` for the modules found to mix rows on ``inputs[:rows]`` (empty: none found).

    The network's mode, parameters, buffers and the global random state are left as they were.
    """
    k = min(int(rows), int(inputs.shape[0]))
    if k < 2:
        return []
    params = list(network.parameters())
    x = inputs[:k].detach()
    if x.is_floating_point() and params:
        x = x.to(params[0].dtype)
    buffers = {n: b.detach().clone() for n, b in network.named_buffers()}
    try:
        changes, calls_differ = _passes(network, inferer, x, seed)
    except Exception as e:  # noqa: BLE001 - a network that cannot run on the probe's rows is not verified
        return [("<root>", f"the row-independence probe could not run the network on {k} rows of the first batch "
                 f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}).",
                 "use per-sample gradients, or a `probe_rows` the network accepts.")]
    finally:
        with torch.no_grad():
            for n, b in network.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
    if calls_differ:
        return [("<root>", "the sequence of module calls changed when other rows of the batch changed (control "
                 "flow that depends on the whole batch mixes the rows).", _FIX)]
    if any(p == "" and w == "input" for p, w, _, _ in changes):
        return [("<inferer>", "the network's input row changed when other rows changed: the inferer mixes rows.",
                 _FIX)]
    offenders = []
    for path, what, diff, tol in _culprits(changes) or ([("", "output", *changes[0][2:])] if changes else []):
        name = type(network.get_submodule(path)).__name__
        offenders.append((path or "<root>", f"{name} mixes the rows of a batch: on {k} rows of the first batch, "
                          f"changing the other rows changed one row's {what} by {diff:.3g} (tolerance {tol:.3g}).",
                          _FIX))
    return offenders
