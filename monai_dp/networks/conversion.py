"""Make a network trainable with per-sample gradients, and say what was changed.

DP-SGD needs every example's gradient on its own, so nothing in the forward pass may mix examples
of a batch. BatchNorm does (its statistics are batch statistics, and its running buffers are
updated during the forward pass), so it is replaced by GroupNorm, reusing the same affine
``Parameter`` objects so that an optimizer built on the original network keeps working. In-place
activations are made out-of-place: they break hook-based per-sample gradients and make autograd
errors hard to read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from monai_dp.utils.errors import DPIncompatibleModuleError
from monai_dp.utils.validation import check_positive_int

__all__ = ["CompatibilityReport", "find_incompatible_modules", "make_private_compatible"]

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)  # BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm


@dataclass
class CompatibilityReport:
    """What :func:`make_private_compatible` changed: one ``(layer_path, before, after)`` row per change."""

    changes: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.changes)

    def summary(self) -> str:
        """One line: how many layers of each kind were changed."""
        counts: dict[str, int] = {}
        for _, before, after in self.changes:
            key = f"{before.split('(')[0]} -> {after.split('(')[0]}"
            counts[key] = counts.get(key, 0) + 1
        parts = ", ".join(f"{n} x {k}" for k, n in counts.items()) or "no change needed"
        return f"make_private_compatible: {parts}."

    def __str__(self) -> str:
        if not self.changes:
            return "make_private_compatible: no change needed."
        lines = [f"make_private_compatible: {len(self.changes)} change(s):"]
        lines += [f"  {path or '<root>'}: {before} -> {after}" for path, before, after in self.changes]
        return "\n".join(lines)


def _num_groups(num_channels: int, max_groups: int) -> int:
    """The largest divisor of ``num_channels`` that is <= ``max_groups`` and leaves >= 2 channels per group.

    Two channels per group keep the normalisation defined on 1x1 feature maps (the end of DenseNet/ResNet).
    """
    best = 1
    for g in range(1, min(max_groups, num_channels // 2) + 1):
        if num_channels % g == 0:
            best = g
    return best


def _batchnorm_to_groupnorm(bn: nn.Module, max_groups: int) -> nn.GroupNorm:
    channels = int(bn.num_features)
    gn = nn.GroupNorm(_num_groups(channels, max_groups), channels, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        # reuse the Parameter objects: optimizers built on the original network stay valid
        gn.weight, gn.bias = bn.weight, bn.bias
    return gn.to(device=bn.weight.device if bn.affine else None)


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.GroupNorm):
        return f"GroupNorm({m.num_groups}, {m.num_channels})"
    if isinstance(m, _BATCH_NORMS):
        return f"{type(m).__name__}({m.num_features})"
    return type(m).__name__


def _replace_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def find_incompatible_modules(network: nn.Module) -> list[tuple[str, str, str]]:
    """``(layer_path, problem, fix)`` for every layer that mixes examples of a batch."""
    offenders = []
    for path, m in network.named_modules():
        if isinstance(m, _BATCH_NORMS):
            offenders.append((path, f"{type(m).__name__} normalises with batch statistics, which couples examples.",
                              "replace it with GroupNorm (make_private_compatible does this) or build the network with "
                              "norm='group'/'instance'."))
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            offenders.append((path, f"{type(m).__name__}(track_running_stats=True) updates running statistics from the "
                              "batch.", "set track_running_stats=False (make_private_compatible does this)."))
    return offenders


def make_private_compatible(
    network: nn.Module, max_groups: int = 32
) -> tuple[nn.Module, CompatibilityReport]:
    """Convert ``network`` in place so that it trains with per-sample gradients.

    - ``BatchNorm*`` / ``SyncBatchNorm`` become ``GroupNorm`` with the largest group count <= ``max_groups``
      that divides the channels and leaves at least two channels per group (same ``eps``, same affine parameters).
    - ``InstanceNorm*(track_running_stats=True)`` stop tracking running statistics.
    - Modules with ``inplace=True`` (ReLU, LeakyReLU, ELU, Dropout, ...) become out-of-place.

    Returns:
        ``(network, report)``: the same module object, converted, and what changed.

    Raises:
        DPIncompatibleModuleError: if a layer that mixes examples remains, naming each one and its fix.
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"`network` must be a torch.nn.Module, got {type(network).__name__!r}.")
    check_positive_int("max_groups", max_groups)
    report = CompatibilityReport()
    if isinstance(network, _BATCH_NORMS):
        raise DPIncompatibleModuleError([("<root>", "the network itself is a BatchNorm layer.", "wrap it in a network.")])
    for path, m in list(network.named_modules()):
        if not path:
            continue
        if isinstance(m, _BATCH_NORMS):
            gn = _batchnorm_to_groupnorm(m, max_groups)
            _replace_child(network, path, gn)
            report.changes.append((path, _describe(m), _describe(gn)))
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            m.track_running_stats = False
            m.running_mean = m.running_var = None
            m.num_batches_tracked = None
            report.changes.append((path, f"{type(m).__name__}(track_running_stats=True)", "track_running_stats=False"))
    for path, m in network.named_modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            report.changes.append((path, f"{type(m).__name__}(inplace=True)", "inplace=False"))
    offenders = find_incompatible_modules(network)
    if offenders:  # pragma: no cover - the conversion above removes every known offender
        raise DPIncompatibleModuleError(offenders)
    return network, report
