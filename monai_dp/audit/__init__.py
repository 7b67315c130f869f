from .bounds import (
    TradeOffCurve,
    gdp_reconstruction_bound,
    single_point_curve,
    tradeoff_curve,
)
from .canary import dirac_canary_scores, empirical_epsilon, estimate_mu
from .lira import membership_matrix, run_lira
from .one_run import dirac_one_run_audit, one_run_epsilon, one_run_p_value
from .recipes import ArrayClassifierRecipe
from .report import analyse, write_report
from .synthetic import make_audit_dataset

__all__ = [
    "ArrayClassifierRecipe",
    "TradeOffCurve",
    "analyse",
    "dirac_canary_scores",
    "dirac_one_run_audit",
    "empirical_epsilon",
    "estimate_mu",
    "gdp_reconstruction_bound",
    "make_audit_dataset",
    "membership_matrix",
    "one_run_epsilon",
    "one_run_p_value",
    "run_lira",
    "single_point_curve",
    "tradeoff_curve",
    "write_report",
]
