"""The run report: ``<out>/report/index.html`` (see :mod:`vbatch.jobs.report.build`)."""

from vbatch.jobs.report.build import DEFAULT_SAMPLES, ReportInfo, build_report

__all__ = ["DEFAULT_SAMPLES", "ReportInfo", "build_report"]
