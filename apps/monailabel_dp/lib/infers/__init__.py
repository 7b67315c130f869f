from .dp_bundle import dp_bundle_infer_task

__all__ = ["dp_bundle_infer_task"]
