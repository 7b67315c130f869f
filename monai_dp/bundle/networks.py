"""The network a bundle's ``network_def`` builds: the DP-compatible form of the configured network.

Every config of a bundle (train, evaluate, inference, multi-GPU) and every tool that builds ``network_def``
on its own (MONAI Label, ``monai.bundle ckpt_export``, ``verify_net_in_out``) must get the network that was
trained, so that the saved weights load strictly. Training converts the network (BatchNorm becomes GroupNorm,
whose ``state_dict`` has no running statistics); loading those weights with ``strict=False`` into the
unconverted network silently keeps BatchNorm with default statistics: a different model.
"""

from __future__ import annotations

import logging

from torch import nn

from monai_dp.networks import make_private_compatible

__all__ = ["private_network"]

logger = logging.getLogger(__name__)


def private_network(network: nn.Module, max_groups: int = 32) -> nn.Module:
    """``network`` converted in place by :func:`monai_dp.networks.make_private_compatible`, and returned.

    Use it as a bundle's ``network_def``::

        "network_def": {"_target_": "monai_dp.bundle.networks.private_network",
                        "network": {"_target_": "ResNet", ...}}

    The changes are logged at INFO level (one line; nothing when none was needed).
    """
    network, report = make_private_compatible(network, max_groups=max_groups)
    if len(report):
        logger.info("%s", report.summary())
    return network
