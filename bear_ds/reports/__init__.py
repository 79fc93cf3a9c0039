"""Sweeps and reports over saved run outputs (no models, no GPU).

from bear_ds.reports import run_sweep, aggregate, report, results_table
"""

from bear_ds.reports.report import report, results_table
from bear_ds.reports.sweep import SweepError, SweepOutcome, aggregate, expand_grid, run_sweep

__all__ = ["SweepError", "SweepOutcome", "aggregate", "expand_grid", "report", "results_table", "run_sweep"]
