"""The engine that runs stages: the runner and the objects it owns (card, residency, attempts, the live
record of the night), and the hooks drills and benchmarks hand it."""

from t2v.engine.card import Card
from t2v.engine.drills import Drills
from t2v.engine.hooks import Event, Hooks
from t2v.engine.live import LiveRecorder
from t2v.engine.residency import Residency
from t2v.engine.runner import StageRunner

__all__ = ["Card", "Drills", "Event", "Hooks", "LiveRecorder", "Residency", "StageRunner"]
