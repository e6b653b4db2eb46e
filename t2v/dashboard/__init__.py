"""A web dashboard of the run log: nights, per-stage time and memory, failures, clips, and a running
night as it goes (each job's step, the estimated end, the memory timeline). It writes nothing of its own;
like `t2v runs`, it closes the rows of processes that died, so a killed night reads as interrupted.

`make_server(Dashboard(runlog, store))` gives a stdlib HTTP server; the page's charts use Chart.js,
vendored under `static/` (see `static/VENDORED.md`) so the page works on machines with no internet.
"""

from t2v.dashboard.server import Dashboard, make_server

__all__ = ["Dashboard", "make_server"]
