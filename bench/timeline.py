"""The night's timeline, from the events the runner's hooks report (`t2v.engine.hooks.Event`); no
library function is wrapped.

`Timeline.on_event` listens to a run's spans and makes each a record `(bucket, thread, start, end)`, in
seconds from `t0`, adding its time and count to the bucket (`seconds`, `calls`):

  card                 a hold of the card by one attempt
  card_wait            an attempt waiting for the card
  <stage>              the stage's model compute: the attempt's "compute" span minus the "place" span
                       inside it (the compute places the component first where it is not placed yet).
                       Its record starts after the placing. It includes reading the stage's input from
                       the store, moving the result off the card and, in a compiling run, the
                       `compile_repeated_blocks` call with the compile in the first steps
                       (`compile_seconds` takes that out again)
  apply_<stage>, apply placing the component ("place": taking its prefetched host copy, waiting for it
                       if it is still loading, or loading it; moving, pinning, hooking)
  load_<stage>         a load inside the placing (no prefetched copy to take)
  prefetch             a load in the prefetch thread, beside the stages
  write_<stage>        an attempt's write after it let the card go
  steps_<stage>        a job's steps (`on_progress`, a listener for `Hooks(on_progress=...)`): from its
                       progress at 0 to its last step; the rest of the stage's compute is before and
                       after its steps (the component's kernels chosen, the noise, the result moved)
  runner_<stage>       a whole attempt's compute span, placing included
  stage_<stage>        (`finish`) the stage's span: from its first job's first event to its last one's
                       last (its tasks' start-ups before it and the flow's collecting after it are not in
                       it: they are in what the summary calls `prefect_and_flow`)
  <clip>_tail          (`finish`) the stages off the card still running after the last card stage
  flow_before_stages,  (`finish`) from `t0` to the first stage's span, and from the last span to the
  flow_after_stages    end (the flow's set-up; its finish, the run's release of what it loaded)

A stage's bucket name is `label(stage)`, the name results files know it by.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from t2v.engine.hooks import Event
from t2v.jobs import JobSpec
from t2v.pipeline import CLIP, Stage, diffuse, stage_named, stages

Record = tuple[str, str, float, float]


def label(stage: Stage) -> str:
    """The stage's name in results files: its store name, which the finish stage kept from when it was
    called "watermark", so that the fields of the files before and after the rename compare."""
    return stage.folder


def card_labels() -> tuple[str, ...]:
    """Labels of the stages a run computes on the card, in order."""
    return tuple(label(s) for s in stages() if s.on_card)


class Timeline:
    """A listener for `Hooks(on_event=...)`: every span of the run's stages, in buckets."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.events: list[Record] = []
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._open: dict[tuple, float] = {}
        self._placed: dict[str, float] = {}
        """Per thread: seconds of placing inside the compute span it is in."""
        self._stepping: dict[tuple[str, str], float] = {}
        """Per (stage name, template): when its progress was reported at 0."""
        self._spans: dict[str, list[float]] = {}
        """Per stage name: the first and last time of its jobs' events."""
        self._lock = threading.Lock()

    def on_event(self, event: Event) -> None:
        with self._lock:
            if event.template is not None:  # a job's event; a prefetch belongs to no job's span
                span = self._spans.setdefault(event.stage, [event.t, event.t])
                span[0], span[1] = min(span[0], event.t), max(span[1], event.t)
            key = (event.thread, event.span, event.stage, event.template)
            if event.phase == "start":
                self._open[key] = event.t
                if event.span == "compute":
                    self._placed[event.thread] = 0.0
            elif key in self._open:
                self._closed(event, self._open.pop(key))

    def on_progress(self, stage: Stage, job: JobSpec, done: int, total: int | None) -> None:
        now = time.perf_counter()
        key = (stage.name, job.template)
        with self._lock:
            if done == 0:
                self._stepping[key] = now
            elif key in self._stepping and total is not None and done >= total:
                self.add(
                    f"steps_{label(stage)}", threading.current_thread().name, self._stepping.pop(key), now
                )

    def _closed(self, event: Event, start: float) -> None:
        name = label(stage_named(event.stage))
        took = event.t - start
        if event.span == "compute":
            placed = self._placed.pop(event.thread, 0.0)
            self.add(f"runner_{name}", event.thread, start, event.t)
            self.add(name, event.thread, start + placed, event.t)
        elif event.span == "place":
            self._placed[event.thread] = self._placed.get(event.thread, 0.0) + took
            self.add(f"apply_{name}", event.thread, start, event.t)
            self._count("apply", took)
        elif event.span == "load":
            self.add("prefetch" if event.plan is None else f"load_{name}", event.thread, start, event.t)
        elif event.span == "card-wait":
            self.add("card_wait", event.thread, start, event.t)
        elif event.span == "card":
            self.add("card", event.thread, start, event.t)
        else:
            self.add(f"{event.span}_{name}", event.thread, start, event.t)

    def add(self, bucket: str, thread: str, start: float, end: float) -> None:
        self.events.append((bucket, thread, start - self.t0, end - self.t0))
        self._count(bucket, end - start)

    def _count(self, bucket: str, took: float) -> None:
        self.seconds[bucket] = self.seconds.get(bucket, 0.0) + took
        self.calls[bucket] = self.calls.get(bucket, 0) + 1

    def finish(self, end: float) -> None:
        """At the run's end (`end`, a perf_counter time): the stages' spans, the tail of the stages off
        the card and the flow's time around the spans."""
        with self._lock:
            spans = {s: self._spans[s.name] for s in stages() if s.name in self._spans}
        for stage, (first, last) in spans.items():
            self.add(f"stage_{label(stage)}", "flow", first, last)
        card_end = max((last for s, (_, last) in spans.items() if s.on_card), default=None)
        off_end = max((last for s, (_, last) in spans.items() if not s.on_card), default=None)
        if card_end is not None and off_end is not None:
            self._count(f"{label(CLIP)}_tail", max(0.0, off_end - card_end))
        if spans:
            self._count("flow_before_stages", min(first for first, _ in spans.values()) - self.t0)
            self._count("flow_after_stages", end - max(last for _, last in spans.values()))


def card_timeline(events: Sequence, stages: Sequence[str] | None = None) -> dict:
    """Per stage (labels, default those on the card), from the timeline: where its span went around
    the card's holds.

    - before_first_hold: from the stage's start until a job first had the card (a component still
      being prefetched, the first job's wait);
    - gaps: the card free between two holds inside the stage;
    - held_not_compute: holds minus the model compute inside them (run-log row, placing the
      component, peaks);
    - after_last_hold: the last job's write."""
    out = {}
    for stage in card_labels() if stages is None else stages:
        window = [(s, e) for k, _, s, e in events if k == f"stage_{stage}"]
        if not window:
            continue
        begin, end = window[0]
        holds = sorted((s, e) for k, _, s, e in events if k == "card" and begin <= s <= end)
        compute = sum(e - s for k, _, s, e in events if k == stage and begin <= s <= end)
        if not holds:
            continue
        out[stage] = {
            "span_s": end - begin,
            "holds": len(holds),
            "before_first_hold_s": holds[0][0] - begin,
            "gaps_s": sum(max(0.0, b[0] - a[1]) for a, b in zip(holds, holds[1:], strict=False)),
            "held_not_compute_s": sum(e - s for s, e in holds) - compute,
            "after_last_hold_s": end - holds[-1][1],
        }
    return out


def compile_seconds(ours: dict) -> dict:
    """What `torch.compile` cost the night: the first compiled job's diffuse compute beyond the median
    of the later ones (the same shapes: Dynamo traces and Inductor compiles inside the first steps).
    Counted as overhead, not model compute; zero where the night did not compile (`ours["compiled"]`).

    The `compile_repeated_blocks` call is part of that first compute (the runner's hooks do not time it
    apart); files from before the hooks timed it as `compile_call`, which is kept as `call` and, as in
    them, not part of `first_steps`."""
    call = ours["compute_s"].get("compile_call", 0.0)
    compiled = ours.get("compiled", bool(ours["calls"].get("compile_call")))
    timeline = sorted(ours.get("events", []), key=lambda event: event[2])
    computes = [e - s for k, _, s, e in timeline if k == label(diffuse.STAGE)]
    first = 0.0
    if compiled and len(computes) > 1:
        rest = sorted(computes[1:])
        first = max(0.0, computes[0] - rest[len(rest) // 2])
    return {"call": call, "first_steps": first, "total": call + first}
