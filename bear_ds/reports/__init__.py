"""Reports over saved run outputs: plots and results.md (no models, no GPU).

from bear_ds.reports import report, results_table
"""

from bear_ds.reports.report import report, results_table

__all__ = ["report", "results_table"]
