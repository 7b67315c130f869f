"""Which modules keep the rows of a batch independent: the allow-list ghost clipping relies on.

Ghost clipping (:mod:`monai_dp.networks.ghost`) computes each item's gradient norm from every layer's input
and output gradient *row by row*, and its clipped sum by weighting the rows. That bounds an item's
contribution by ``C`` only if row ``i`` of every activation depends on row ``i`` of the input alone. One
module that mixes rows (``x - x.mean(0)``, a batch statistic, attention across the batch) makes each row's
"gradient" depend on the other rows, and adding one item then moves the clipped sum by far more than ``C``.

A module's forward code cannot be inspected, so the rule is an allow-list: a module is accepted only if its
class is listed here (its forward read and found row-wise: torch layers, and MONAI blocks and networks whose
forward only calls their submodules and row-wise functions), or is a subclass that overrides none of the
methods that forward relies on, or was declared by the user with :func:`register_row_independent`. A module
must also carry no hooks and no per-instance ``forward``. Some classes are accepted only in some settings
(``Softmax(dim>=1)``, ``BatchNorm`` in eval mode with running statistics...); the check is therefore run on
every call, since ``train()``/``eval()`` change it. A probe on a real batch (:mod:`monai_dp.networks.row_probe`)
is the second line of defence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from monai.inferers import SimpleInferer
from monai.networks.blocks import acti_norm, activation, convolutions, dynunet_block, segresnet_block
from monai.networks.blocks import squeeze_and_excitation as se
from monai.networks.blocks import upsample
from monai.networks.layers import simplelayers
from monai.networks.nets import basic_unet, densenet, dynunet, efficientnet, resnet, segresnet, senet, unet
from torch import nn

from monai_dp.networks.heads import FeatureClassifier
from monai_dp.networks.scattering import WaveletScattering2D
from monai_dp.utils.validation import error_message

__all__ = ["find_row_mixing_modules", "register_row_independent"]

_MIX_FIX = ("use per-sample gradients (`grad_sample_mode='per_sample'`, `PerSampleGradients`), which compute every "
            "row on its own; or, if its forward() treats every row on its own, declare the class with "
            "`monai_dp.networks.register_row_independent`.")


def _dim_at_least_one(attr: str) -> Callable[[nn.Module], str | None]:
    def check(m: nn.Module) -> str | None:
        dim = getattr(m, attr)
        if isinstance(dim, int) and dim >= 1:
            return None
        return (f"{type(m).__name__}({attr}={dim!r}) works across dimension 0 (the rows), or, with a negative "
                "dimension, does for some input shapes.")
    return check


def _running_stats_in_eval(m: nn.Module) -> str | None:
    if not m.training and m.running_mean is not None:
        return None
    return f"{type(m).__name__} in train mode normalises with batch statistics, which mixes the rows."


# class -> (methods its forward relies on, besides forward; condition on the instance or None)
_TORCH: dict[type, tuple[tuple[str, ...], Callable | None]] = {}
for _c in (nn.Identity, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.Upsample,
           nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
           nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
           nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.Hardtanh,
           nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Threshold,
           nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
           nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.LPPool1d,
           nn.LPPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
           nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
           nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
           nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
           nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d):
    _TORCH[_c] = ((), None)
for _c in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    _TORCH[_c] = (("_conv_forward",), None)
for _c in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    _TORCH[_c] = (("_output_padding",), None)
for _c in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):  # per-sample statistics in both modes
    _TORCH[_c] = (("_apply_instance_norm", "_handle_no_batch_input", "_get_no_batch_dim", "_check_input_dim"), None)
for _c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    _TORCH[_c] = (("_check_input_dim",), _running_stats_in_eval)
for _c in (nn.Softmax, nn.LogSoftmax, nn.Softmin):
    _TORCH[_c] = ((), _dim_at_least_one("dim"))
_TORCH[nn.Flatten] = ((), _dim_at_least_one("start_dim"))
_TORCH[nn.Unflatten] = ((), _dim_at_least_one("dim"))
_TORCH[nn.Sequential] = (("__iter__",), None)


def _skip_dim(m: nn.Module) -> str | None:
    return None if m.mode != "cat" else _dim_at_least_one("dim")(m)


# MONAI classes whose forward (and the listed helpers) were read in monai 1.6 and found row-wise: they call
# their submodules (checked on their own) and per-row functions (cat/stack on dim >= 1, interpolate, pad,
# flatten/view keeping dim 0, per-row drop-connect masks, SiLU)
_MONAI: dict[type, tuple[tuple[str, ...], Callable | None]] = {
    acti_norm.ADN: (("__iter__",), None), convolutions.Convolution: (("__iter__",), None),
    convolutions.ResidualUnit: ((), None), dynunet_block.UnetBasicBlock: ((), None),
    dynunet_block.UnetOutBlock: ((), None), dynunet_block.UnetResBlock: ((), None),
    dynunet_block.UnetUpBlock: ((), None), segresnet_block.ResBlock: ((), None),
    se.ChannelSELayer: ((), None), se.SEBlock: ((), None), upsample.UpSample: (("__iter__",), None),
    simplelayers.SkipConnection: ((), _skip_dim), activation.Swish: ((), None),
    activation.MemoryEfficientSwish: ((), None), activation.Mish: ((), None),
    basic_unet.BasicUNet: ((), None), basic_unet.Down: (("__iter__",), None),
    basic_unet.TwoConv: (("__iter__",), None), basic_unet.UpCat: ((), None),
    densenet.DenseNet: ((), None), densenet._DenseBlock: (("__iter__",), None), densenet._DenseLayer: ((), None),
    densenet._Transition: (("__iter__",), None), dynunet.DynUNet: ((), None), dynunet.DynUNetSkipLayer: ((), None),
    efficientnet.EfficientNet: ((), None), efficientnet.MBConvBlock: ((), None), resnet.ResNet: ((), None),
    resnet.ResNetBlock: ((), None), resnet.ResNetBottleneck: ((), None),
    segresnet.SegResNet: (("encode", "decode"), None), senet.SENet: (("features", "logits"), None),
    unet.UNet: ((), None),
    FeatureClassifier: ((), None), WaveletScattering2D: (("_low",), None),
}

# the functions as read, so that a class patched later no longer matches
_KNOWN: dict[type, tuple[dict[str, Any], Callable | None]] = {
    cls: ({n: getattr(cls, n) for n in ("forward", *helpers)}, cond)
    for cls, (helpers, cond) in {**_TORCH, **_MONAI}.items()
}
_DECLARED: dict[type, Callable] = {}
_SIMPLE_CALL = SimpleInferer.__call__  # calls network(inputs) on the whole batch
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def register_row_independent(cls: type) -> type:
    """Declare that ``cls.forward`` treats every row of its input on its own (usable as a class decorator).

    Use it for your own modules, after reading their ``forward``: no statistic over dimension 0, no attention
    or ``cat``/``stack``/``view`` across it, no state carried between rows. Ghost clipping then accepts the
    class (still subject to the probe on the first batch). Subclasses that override ``forward`` are not covered.
    """
    if not isinstance(cls, type):
        raise TypeError(error_message("cls", "a class (the module's class, not an instance)", type(cls).__name__))
    _DECLARED[cls] = cls.forward if issubclass(cls, nn.Module) else cls.__call__
    return cls


def _matches(cls: type, extra: Iterable[type]) -> tuple[bool, Callable | None]:
    """Whether ``cls`` is a known row-wise class (or a subclass overriding nothing its forward relies on)."""
    for base in cls.__mro__:
        if base in _KNOWN:
            methods, cond = _KNOWN[base]
            return all(getattr(cls, n) is f for n, f in methods.items()), cond
        if base in _DECLARED or base in extra:
            declared = _DECLARED.get(base, base.forward if issubclass(base, nn.Module) else base.__call__)
            return (cls.forward if issubclass(cls, nn.Module) else cls.__call__) is declared, None
    return False, None


def _module_problem(m: nn.Module, extra: tuple[type, ...]) -> str | None:
    cls = type(m)
    if any(getattr(m, d, None) for d in _HOOK_DICTS):
        return f"{cls.__name__} carries forward/backward hooks, which can mix the rows."
    if "forward" in m.__dict__:
        return f"{cls.__name__} has a forward() set on the instance, which is not known to keep rows independent."
    if cls.__call__ is not nn.Module.__call__:
        return f"{cls.__name__} overrides __call__, which is not known to keep rows independent."
    if cls.forward is nn.Module.forward:  # ModuleList, ModuleDict, plain holders: cannot be called
        return None
    known, cond = _matches(cls, extra)
    if not known:
        return (f"{cls.__name__} is not known to keep the rows of a batch independent: its forward() could mix "
                "rows (a batch statistic, attention across the batch), which voids ghost clipping's bound of C "
                "per item.")
    return cond(m) if cond is not None else None


def find_row_mixing_modules(network: nn.Module, inferer: Any = None,
                            row_independent: Iterable[type] = ()) -> list[tuple[str, str, str]]:
    """``(layer_path, problem, fix)`` for every module not known to keep rows independent (empty: all known).

    Args:
        network: the network; every module in it is checked, containers included (their own forward counts).
        inferer: the inferer that calls the network: ``None`` or MONAI's ``SimpleInferer`` are known.
        row_independent: further classes declared row-wise for this check only.
    """
    extra = tuple(row_independent)
    offenders = []
    for path, m in network.named_modules():
        problem = _module_problem(m, extra)
        if problem is not None:
            offenders.append((path or "<root>", problem, _MIX_FIX))
    hooks = nn.modules.module
    if any(getattr(hooks, f"_global{d}", None) for d in _HOOK_DICTS):
        offenders.append(("<global module hooks>", "module hooks registered for every module can mix the rows.",
                          "remove them (torch.nn.modules.module.register_module_*_hook) while training."))
    if inferer is not None and not (type(inferer).__call__ is _SIMPLE_CALL or _declared_callable(inferer, extra)):
        offenders.append(("<inferer>", f"{type(inferer).__name__} is not known to call the network on the whole "
                          "batch without mixing rows.", "use SimpleInferer for training, or " + _MIX_FIX))
    return offenders


def _declared_callable(obj: Any, extra: tuple[type, ...]) -> bool:
    cls = type(obj)
    return any(b in _DECLARED or b in extra for b in cls.__mro__) and _matches(cls, extra)[0]
