from .dp_bundle import REQUEST_KEYS, DPBundleTrainTask

__all__ = ["REQUEST_KEYS", "DPBundleTrainTask"]
