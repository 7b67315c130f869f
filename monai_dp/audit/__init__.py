from .bounds import TradeOffCurve, gdp_reconstruction_bound, single_point_curve, tradeoff_curve

__all__ = ["TradeOffCurve", "gdp_reconstruction_bound", "single_point_curve", "tradeoff_curve"]
