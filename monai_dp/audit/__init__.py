from .bounds import TradeOffCurve, gdp_reconstruction_bound, single_point_curve, tradeoff_curve
from .lira import membership_matrix, run_lira
from .recipes import ArrayClassifierRecipe
from .report import analyse, write_report
from .synthetic import make_audit_dataset

__all__ = [
    "ArrayClassifierRecipe",
    "TradeOffCurve",
    "analyse",
    "gdp_reconstruction_bound",
    "make_audit_dataset",
    "membership_matrix",
    "run_lira",
    "single_point_curve",
    "tradeoff_curve",
    "write_report",
]
