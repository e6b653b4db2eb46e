"""Runs one stage of one job: skip it if its output is stored, else pick a memory plan, compute, store,
and log every attempt. What a Prefect task wraps; it knows the store, the run log and the models, not
Prefect. The work is split among objects the runner owns: the card (`Card`), what is loaded
(`Residency`), the attempts and their rows (`Attempts`), the live record of the night (`LiveRecorder`);
drills and benchmarks come in as `Hooks`.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from t2v.compile_cache import CompiledShapes, shape_key
from t2v.context import RunContext, open_runlog
from t2v.digests import Verdict
from t2v.engine.attempts import Attempts
from t2v.engine.card import Card
from t2v.engine.drills import Drills
from t2v.engine.hooks import Hooks, hooks_from
from t2v.engine.live import LiveRecorder
from t2v.engine.residency import Residency, host_has_room
from t2v.errors import StoreDamaged
from t2v.hostmem import probe_host
from t2v.jobs import JobSpec
from t2v.models import registry
from t2v.models.registry import ModelRef, resolve_model
from t2v.pipeline import JobKeys, KeyInputs, Stage, Work, stages
from t2v.placement import apply, compile_blocks, configure
from t2v.plans import (
    ComponentSizes,
    HostPlacement,
    Placement,
    StagePlan,
    choose,
    component_sizes,
    host_placement,
    with_host,
)
from t2v.store import Store
from t2v.vram import DeviceMemory, hold_to_budget, probe

log = logging.getLogger("t2v")


def import_compiler() -> None:
    """What `torch.compile`'s first call imports (Inductor; diffusers has imported Dynamo already)."""
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401


class StageRunner:
    """The stages of one run's jobs, against one model, store, run log and card."""

    def __init__(
        self,
        ctx: RunContext,
        *,
        hooks: Hooks | None = None,
        memory: DeviceMemory | None = None,
        pipeline: Sequence[Stage] | None = None,
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.model: ModelRef = resolve_model(ctx.model)
        self.store = Store(ctx.settings.store_dir)
        self.runlog = open_runlog(ctx.settings.runlog_url)
        self.outputs_dir: Path = ctx.outputs_dir
        self.pipeline = tuple(pipeline or stages())
        self.memory = memory or probe(budget_gib=self.settings.vram_budget_gib)
        # The live record's listeners are always on (they only note values); its thread runs while a
        # flow watches the run (`with runner.live:`, tasks.stages.watched).
        self.live = LiveRecorder(self.runlog, ctx.run_id, self.memory.device)
        self.hooks = (
            (hooks or Hooks())
            + Drills(self.settings).hooks()
            + hooks_from(self.settings.hooks)
            + self.live.hooks()
        )
        self.card = Card(self.memory.device)
        self.residency = Residency()
        self.attempts = Attempts(
            runlog=self.runlog,
            run_id=ctx.run_id,
            model=self.model.identity,
            card=self.card,
            residency=self.residency,
            hooks=self.hooks,
        )
        self.compile_blocks = ctx.compile_blocks and self.device.startswith("cuda")
        if self.hooks.on_written:
            self.store.on_written = self._written
        hold_to_budget(self.memory)
        m = self.memory
        log.info(
            "planning for %s (%s): %.1f GiB free of %.1f, from %s%s",
            m.name,
            m.device,
            m.budget_bytes / 2**30,
            m.total_bytes / 2**30,
            m.source,
            f"; {m.note}" if m.note else "",
        )
        host = probe_host(self.settings.ram_budget_gib)
        log.info("host memory: %.1f GiB for this run, from %s (%s)", host.budget_gib, host.source, host.note)
        self._lock = threading.Lock()
        self._keys: dict[JobSpec, JobKeys] = {}
        self._hosts: dict[str, HostPlacement] = {}
        self._placed: set[str] = set()
        """Components placed this run (a dropped one is done with)."""
        self._announced: dict[str, tuple[JobSpec, ...]] = {}
        self._state = {stage.name: stage.state() for stage in self.pipeline if stage.state}
        self._tokenizer = None
        self._scheduler = None
        self._factors: tuple[int, int] | None = None

    @property
    def device(self) -> str:
        return self.memory.device

    @property
    def run_id(self) -> str:
        return self.ctx.run_id

    @property
    def codec(self) -> Any:
        return self.hooks.codec

    # --- a stage of a job ------------------------------------------------------------------------

    def keys(self, job: JobSpec) -> JobKeys:
        """The job's store keys, built once per job and run."""
        with self._lock:
            if job not in self._keys:
                self._keys[job] = JobKeys.of(
                    self.pipeline, KeyInputs(job, self.model, fp8=self.ctx.fp8_storage)
                )
            return self._keys[job]

    def run(self, stage: Stage, job: JobSpec) -> str:
        """Make `stage`'s output for `job` unless it is stored; returns its key, or what the stage's
        `result` gives (the published clip's path)."""
        keys = self.keys(job)
        key = keys[stage]
        if self._stored(stage, job, keys):
            self.attempts.skip(stage, job, keys.final, key)
        else:
            self._check_inputs(stage, job, keys)
            state = self._state.get(stage.name)

            def compute(plan: StagePlan | None, label: Callable[[str], None]):
                work = Work(stage=stage, job=job, keys=keys, run=self, plan=plan, state=state, on_label=label)
                return stage.compute(work)

            self.attempts.run(
                stage, job, job_key=keys.final, key=key, plans=self.plans(stage, job), compute=compute
            )
            if self.compile_blocks and stage.component == "transformer":
                # The night's kernels are in Inductor's cache now: a later night at these shapes
                # compiles after far fewer steps (`plans.compile_pays`).
                CompiledShapes(self.settings.inductor_dir).add([shape_key(job, self.model.identity)])
        if stage.result is None:
            return key
        return stage.result(Work(stage=stage, job=job, keys=keys, run=self))

    def _stored(self, stage: Stage, job: JobSpec, keys: JobKeys) -> bool:
        """Whether every file of the stage's output is stored and whole. A damaged one is moved aside
        and logged as a failed row, and the stage computes it again now, as if it had never been stored."""
        work = Work(stage=stage, job=job, keys=keys, run=self)
        whole = True
        for kind, key in stage.files(work) if stage.files else [(stage, keys[stage])]:
            verdict, why = self.store.check(kind, key)
            if verdict is Verdict.DAMAGED:
                self.attempts.damaged(stage, job, keys.final, why)
            whole = whole and verdict is Verdict.OK
        return whole

    def _check_inputs(self, stage: Stage, job: JobSpec, keys: JobKeys) -> None:
        for source in stage.inputs:
            verdict, why = self.store.check(source, keys[source])
            if verdict is Verdict.DAMAGED:
                self.attempts.damaged(source, job, keys.final, why)
            if verdict is not Verdict.OK:
                path = self.store.path(source, keys[source])
                raise StoreDamaged(
                    f"{job.template}: the {source.name} output {path} is "
                    f"{'damaged and was moved aside' if verdict is Verdict.DAMAGED else 'not in the store'}; "
                    f"`t2v rerun --last` computes it again"
                )

    def plans(self, stage: Stage, job: JobSpec) -> list[StagePlan | None]:
        """The plans to try in order: the fastest that fits the card's budget, then the leaner ones."""
        if not stage.on_card:
            return [None]
        sizes, component_bytes = self.sizes(stage.component)
        night = self.pending(stage)
        ladder = stage.ladder(sizes, job, device=self.device, fp8=self.ctx.fp8_storage, night=night)
        plans = choose(ladder, self.memory.budget_bytes)
        return with_host(plans, self.host_placement(stage.component), component_bytes)

    def host_placement(self, component: str) -> HostPlacement:
        """Where `component`'s weights wait on the host this run, decided at its first plan and kept
        (its jobs share the loaded copy): pinned where prefetched (the prefetch found the room), else
        pinned if the host memory free once the other components are dropped holds it, else mapped."""
        with self._lock:
            decided = self._hosts.get(component)
        if decided is not None:
            return decided
        if not self.device.startswith("cuda"):
            decided = HostPlacement.PINNED  # nothing streams to a card: nothing to pin or map
        elif self.residency.prefetching(component, self.model.identity):
            decided = HostPlacement.PINNED
        else:
            host = probe_host(self.settings.ram_budget_gib)
            free = host.budget_bytes + self.residency.host_bytes(but=component)
            decided = host_placement(self.sizes(component)[1], free)
            log.info(
                "%s: weights %s on the host (%.1f GiB; %.1f GiB free once the others are dropped)",
                component,
                decided.value,
                self.sizes(component)[1] / 2**30,
                free / 2**30,
            )
        with self._lock:
            return self._hosts.setdefault(component, decided)

    def mapped_bytes(self, stage: Stage) -> int:
        """The weights that the components of the stages before `stage` stream from their files
        (`HostPlacement.MAPPED`), where loaded or still to be loaded this run: what a prefetch for
        `stage` would load beside. Their placement is decided here if it is not yet (it is kept)."""
        earlier = self.pipeline[: self.pipeline.index(stage)]
        components = {s.component for s in earlier if s.on_card and s.component != stage.component}
        with self._lock:
            finished = {c for c in self._placed if not self.residency.holds(c)}
        return sum(
            self.sizes(c)[1] for c in components - finished if self.host_placement(c) is HostPlacement.MAPPED
        )

    def sizes(self, component: str) -> tuple[ComponentSizes, int]:
        """What the planner needs of `component`, and its bytes (`plans.component_sizes`); under the
        run's lock because a stage's tasks start together and a prefetch asks first."""
        with self._lock:
            return component_sizes(self.model, component)

    # --- components ------------------------------------------------------------------------------

    def component(self, stage: Stage, plan: StagePlan) -> torch.nn.Module:
        """`stage`'s component placed as `plan` says: the one already placed so if it is, else the
        prefetched host copy (or a fresh load) put in place."""
        name = stage.component
        compiled = self.compile_blocks and name == "transformer"

        def place() -> torch.nn.Module:
            # The stage waits for its prefetched component (the text encoder's, at the night's start):
            # the compiler's import (2.6-3.3 s on the H200 host) can take that idle time. In the loader
            # thread, beside a stage's compute, it slowed the compute as much (docs/benchmarks.md).
            waiting = import_compiler if self.compile_blocks else None
            with self.hooks.span("place", stage, None, plan):
                module = self.residency.prefetched(name, self.model.identity, while_waiting=waiting)
                if module is None:
                    with self.hooks.span("load", stage, None, plan), self.residency.loading():
                        module = self.hooks.load(self.model, name)
                with self._lock:
                    self._placed.add(name)
                module = apply(plan, module, pin=lambda target: self.residency.pin(name, target))
                if plan.placement is Placement.GPU:
                    self.residency.unpin(name)  # all on the card now: the host copy only takes room
            if compiled:
                # Each block is compiled once and reused by all 30 (dynamic=False: a night's shapes
                # repeat); the first step pays the compile, Inductor's on-disk cache the next night's.
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.settings.inductor_dir)
                compile_blocks(module)
            return module

        tag = f"{self.model.identity}|{plan.residency_key}|compiled={compiled}"
        return configure(plan, self.residency.get(name, tag, place, source=self.model.identity))

    def prefetch(self, stage: Stage, jobs: Sequence[JobSpec]) -> bool:
        """Start loading `stage`'s component into host memory in the background; False (and nothing
        started) where it has none or every job has that stage's output stored. The background load
        first checks that the host has the room to hold it beside what is loaded already, and loads
        nothing where it lacks it, as on a small machine: its stage then loads it. The jobs are
        remembered as the stage's (`pending`), whatever is stored."""
        with self._lock:
            self._announced[stage.name] = tuple(jobs)
        if not stage.on_card or all(self.store.has(stage, self.keys(j)[stage]) for j in jobs):
            return False
        name = stage.component

        def room() -> bool:
            return host_has_room(
                name,
                self.sizes(name)[1],
                self.settings.ram_budget_gib,
                streaming_bytes=self.mapped_bytes(stage),
            )

        todo = self.pending(stage)  # the jobs just announced, less those whose output is stored

        def load() -> torch.nn.Module:
            with self.hooks.span("load", stage), self.residency.loading():
                module = self.hooks.load(self.model, name)
                if stage.preload is not None:
                    stage.preload(module, todo)
                return module

        self.residency.prefetch(name, self.model.identity, load, room)
        return True

    def pending(self, stage: Stage) -> tuple[JobSpec, ...]:
        """The jobs the flow has announced for `stage` (it hands them to `prefetch` before the stage
        runs) whose output of it is not stored yet, in order; none for a stage run alone. What a stage
        needs to know of its later jobs before the first (the LoRA files to load once)."""
        with self._lock:
            jobs = self._announced.get(stage.name, ())
        return tuple(j for j in jobs if not self.store.has(stage, self.keys(j)[stage]))

    def _written(self, stage: Stage, temp: Path) -> None:
        for listener in self.hooks.on_written:
            listener(stage, temp)

    # --- what the stages share for a run ---------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = registry.load_tokenizer(self.model)
        return self._tokenizer

    def scheduler(self) -> Any:
        if self._scheduler is None:
            self._scheduler = registry.load_scheduler(self.model)
        return copy.deepcopy(self._scheduler)  # schedulers keep per-run state

    def vae_factors(self) -> tuple[int, int]:
        if self._factors is None:  # the same for every job of the run; tiny builds a VAE to read them
            self._factors = registry.vae_factors(self.model)
        return self._factors
