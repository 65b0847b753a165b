"""The static HTML report of the labs (``archlab report``): an index of every claim and one page per lab."""

from archlab.report.site import build_report, collect, read_result

__all__ = ["build_report", "collect", "read_result"]
