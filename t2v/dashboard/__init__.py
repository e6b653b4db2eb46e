"""A read-only web dashboard of the run log: nights, per-stage time and memory, failures, clips.

`make_server(Dashboard(runlog, store))` gives a stdlib HTTP server; the page's charts use Chart.js,
vendored under `static/` (see `static/VENDORED.md`) so the page works on machines with no internet.
"""

from t2v.dashboard.server import Dashboard, make_server

__all__ = ["Dashboard", "make_server"]
