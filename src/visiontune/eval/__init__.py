"""Evaluation: metrics, parameter counts, speed and memory measurement, plots and Markdown reports."""

from visiontune.eval.memory import PeakMemory
from visiontune.eval.metrics import compute_metrics
from visiontune.eval.params import count_parameters
from visiontune.eval.plots import plot_comparison, plot_confusion, plot_history
from visiontune.eval.report import compare_table, format_count, write_report, write_run_artifacts
from visiontune.eval.speed import measure_speed
from visiontune.eval.summary import load_run_metrics, summarize_run

__all__ = [
    "PeakMemory",
    "compare_table",
    "compute_metrics",
    "count_parameters",
    "format_count",
    "load_run_metrics",
    "measure_speed",
    "plot_comparison",
    "plot_confusion",
    "plot_history",
    "summarize_run",
    "write_report",
    "write_run_artifacts",
]
