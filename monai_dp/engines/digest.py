"""The weights digest, for the engines and handlers that import it from here (it lives in :mod:`monai_dp.utils.digest`,
where the networks layer can use it too)."""

from monai_dp.utils.digest import state_dict_digest, weights_digest

__all__ = ["state_dict_digest", "weights_digest"]
