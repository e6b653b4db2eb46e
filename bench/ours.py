"""Our side of bench/nightly_throughput.py: `flows.nightly.nightly`, Prefect included, measured through
the hooks its runner offers.

The flow makes its runner itself, so the hooks reach it the way they reach a worker's flow run:
`T2V_HOOKS` names `recording_hooks` here, which hands out the hooks of the recording under way. They
are the night's `Timeline` (bench/timeline.py), a component loader that remembers what it loaded (for
the pinning records) and this machine's codec. Beside them, outside the runner: the garbage collector's
pauses (`gc.callbacks`) and the pinning's figures, from the runner's log line about it (no hook covers
the pinning).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from bench.night import log
from bench.session import Session
from bench.timeline import Timeline

_RECORDING: list = []
"""The hooks of the recording under way in this process (`recording`)."""


def recording_hooks():
    """$T2V_HOOKS while `recording`: the hooks of the recording under way (none: empty hooks)."""
    from t2v.engine import Hooks

    return _RECORDING[-1] if _RECORDING else Hooks()


@contextmanager
def recording(hooks) -> Iterator[None]:
    """Every run started in this process inside gets `hooks` (through $T2V_HOOKS)."""
    before = os.environ.get("T2V_HOOKS")
    os.environ["T2V_HOOKS"] = f"{__name__}:recording_hooks"
    _RECORDING.append(hooks)
    try:
        yield
    finally:
        _RECORDING.pop()
        if before is None:
            os.environ.pop("T2V_HOOKS", None)
        else:
            os.environ["T2V_HOOKS"] = before


class Loads:
    """The runner's component loader (`Hooks.load`): the default one, remembering what it handed out."""

    def __init__(self) -> None:
        self.by_class: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __call__(self, ref, component: str):
        from t2v.models.registry import load_component

        module = load_component(ref, component)
        self.by_class[type(module).__name__] = module
        return module


class Pins(logging.Handler):
    """What page-locking each prefetched component did, from the runner's log line about it
    ("page-locked <class>: <GB> GB in place, <GB> GB copied, <s> s", logger `t2v`), and the share of
    that component's host tensors that are page-locked right after it."""

    def __init__(self, loads: Loads) -> None:
        super().__init__(logging.INFO)
        self.loads = loads
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("page-locked ") or len(record.args or ()) != 4:
            return
        component, registered_gb, packed_gb, seconds = record.args
        module = self.loads.by_class.get(component)
        host = (
            [t for t in (*module.parameters(), *module.buffers()) if t.device.type == "cpu"] if module else []
        )
        self.records.append(
            {
                "component": component,
                "s": seconds,
                "registered_gb": registered_gb,
                "packed_gb": packed_gb,
                "host_tensors_pinned": sum(t.is_pinned() for t in host) / max(1, len(host)),
            }
        )

    @contextmanager
    def attached(self) -> Iterator[None]:
        logger = logging.getLogger("t2v")
        level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(self)
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)


class GcPauses:
    """Each garbage collection's generation and pause while inside (`gc.callbacks`)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._t0))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> dict:
        return {
            "gc_pause_s": {g: sum(p for gen, p in self.pauses if gen == g) for g in (0, 1, 2)},
            "gc_gen2_count": sum(1 for gen, _ in self.pauses if gen == 2),
        }


def write_catalogue(s: Session) -> str:
    catalogue = s.args.work / "night.toml"
    fields = ("prompt", "negative_prompt", "seed", "height", "width", "frames", "steps")
    catalogue.write_text(
        "".join(
            f"[[template]]\nname = {json.dumps(j.template)}\n"
            + "".join(f"{k} = {json.dumps(getattr(j, k))}\n" for k in fields)
            for j in s.jobs
        )
    )
    return str(catalogue)


def compiles(s: Session) -> bool:
    """Whether our night compiles the transformer's blocks, as its runner decides it."""
    from t2v.plans import compile_pays
    from t2v.settings import Settings

    return s.cuda and compile_pays((j.steps for j in s.jobs), Settings.from_env().compile)


def run_ours(s: Session) -> dict:
    """Our nightly flow on the night, under the cap; its raw record (`phases.ours`)."""
    os.environ["T2V_DATA_DIR"] = str(s.args.work / "ours")
    if s.cuda:
        os.environ["T2V_VRAM_BUDGET_GB"] = str(s.args.cap_gib)
    from flows.nightly import nightly
    from t2v.engine import Hooks
    from t2v.vram import PeakMemory

    catalogue = write_catalogue(s)
    s.cap(True)
    timeline, loads = Timeline(), Loads()
    pins = Pins(loads)
    hooks = Hooks(on_event=(timeline.on_event,), load=loads) + s.hooks
    torch = s.torch
    retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0) if s.cuda else 0
    log("ours: nightly flow")
    peak = PeakMemory(s.device)
    with recording(hooks), pins.attached(), GcPauses() as pauses:
        start = timeline.t0 = time.perf_counter()
        with peak:
            outcome = nightly(catalogue=catalogue, model=s.model)
        end = time.perf_counter()
    timeline.finish(end)
    retries = (torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries0) if s.cuda else 0
    return {
        "wall_s": end - start,
        "clips": len(outcome["clips"]),
        "failed": outcome["failed"],
        "compiled": compiles(s),
        "compute_s": timeline.seconds | {"pinning": sum(p["s"] for p in pins.records)},
        "calls": dict(timeline.calls),
        "pins": pins.records,
        "events": timeline.events,
        **pauses.summary(),
        "alloc_retries": retries,
        "peak_allocated_gib": peak.allocated_gib,
        "peak_reserved_gib": peak.reserved_gib,
        "peak_nvml_gib": peak.nvml_gib,
        "rows": stage_rows(s, outcome["run_id"]),
    }


def stage_rows(s: Session, run_id: str) -> list[dict]:
    from t2v.runlog import RunLog

    rows = RunLog(f"sqlite:///{s.args.work / 'ours' / 'runlog.sqlite'}").run(run_id)["stages"]
    keep = ("stage", "template", "status", "plan", "wall_s", "peak_reserved_gib", "peak_nvml_gib")
    return [{k: r[k] for k in keep} for r in rows]


def night_latents(s: Session) -> dict:
    """Each job's latents as our night stored them."""
    from t2v.pipeline import diffuse

    return {
        j.template: s.store.load_tensors(diffuse.STAGE, s.keys(j)[diffuse.STAGE])["latents"] for j in s.jobs
    }


def night_frames(s: Session, job):
    """A job's frames as our night stored them, read back with this machine's codec."""
    from t2v.pipeline import decode

    return s.hooks.codec.read_frames(s.store.path(decode.STAGE, s.keys(job)[decode.STAGE]))


def ours_phase(s: Session) -> None:
    from bench.summary import summarise

    s.results["phases"]["ours"] = ours = run_ours(s)
    summarise(s.results)
    log(
        f"ours: {ours['wall_s']:.1f} s for {ours['clips']} clips; overhead share "
        f"{s.results['ours_overhead_share']:.3f}"
    )
    s.save()
