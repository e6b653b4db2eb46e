"""Attempts: one stage of one job run on its plans in order until one fits, each attempt a run-log row
with its peaks; on CUDA out-of-memory the card is freed and the next, leaner plan is tried."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack

import torch

from t2v.engine.card import Card
from t2v.engine.hooks import Hooks
from t2v.engine.residency import Residency
from t2v.errors import NoPlanFits, StoreDamaged
from t2v.jobs import JobSpec
from t2v.pipeline import Stage
from t2v.pipeline.stage import Writer
from t2v.plans import StagePlan
from t2v.runlog import RunLog, StageRecord
from t2v.vram import PeakMemory

log = logging.getLogger("t2v")

Compute = Callable[[StagePlan | None, Callable[[str], None]], Writer | None]
"""`compute(plan, label)`: one attempt on `plan`; `label(text)` adds `-text` to its row's plan."""


class Attempts:
    """Runs attempts and logs them, for one run on one card."""

    def __init__(
        self, *, runlog: RunLog, run_id: str, model: str, card: Card, residency: Residency, hooks: Hooks
    ) -> None:
        self.runlog = runlog
        self.run_id = run_id
        self.model = model
        self.card = card
        self.residency = residency
        self.hooks = hooks

    def row(self, stage: Stage, job: JobSpec, job_key: str) -> dict:
        return dict(
            run_id=self.run_id, job_key=job_key, template=job.template, stage=stage.name, model=self.model
        )

    def skip(self, stage: Stage, job: JobSpec, job_key: str, key: str) -> None:
        self.runlog.record_skip(**self.row(stage, job, job_key), output_key=key)

    def damaged(self, stage: Stage, job: JobSpec, job_key: str, why: str) -> None:
        """A failed row for a stored output found damaged (and moved aside), before it is computed again."""
        try:
            with self.runlog.stage(**self.row(stage, job, job_key), plan=None):
                raise StoreDamaged(why)
        except StoreDamaged:
            pass

    def run(
        self,
        stage: Stage,
        job: JobSpec,
        *,
        job_key: str,
        key: str,
        plans: list[StagePlan | None],
        compute: Compute,
    ) -> None:
        """Compute on the first plan that does not run out of memory; raises NoPlanFits if none."""
        last_error: BaseException | None = None
        for plan in plans:
            try:
                self._attempt(stage, job, job_key, key, plan, compute)
                return
            except torch.OutOfMemoryError as exc:
                last_error = exc
                log.warning(
                    "%s of %s ran out of memory on plan %s; trying a leaner plan",
                    stage.name,
                    job.template,
                    plan.name if plan else "-",
                )
                # The component may hold hooks and half-moved weights: drop it and load it afresh.
                with self.card:
                    self.residency.drop()
        raise NoPlanFits(
            f"{stage.name} of {job.template!r} ran out of memory on every plan "
            f"({', '.join(p.name for p in plans if p)}): {last_error}"
        )

    def _attempt(
        self,
        stage: Stage,
        job: JobSpec,
        job_key: str,
        key: str,
        plan: StagePlan | None,
        compute: Compute,
    ) -> None:
        # A planned stage has the card to itself (and its peaks are its own) from before its row starts
        # (a job waiting for the card has no row yet, so a row's wall time is its own) to the end of its
        # compute; the write it hands back runs after, beside the next job's.
        hooks = self.hooks
        with ExitStack() as card:
            if plan is not None:
                with hooks.span("card-wait", stage, job, plan):
                    card.enter_context(self.card)
                card.enter_context(hooks.span("card", stage, job, plan))
            with self.runlog.stage(
                **self.row(stage, job, job_key), plan=plan.name if plan else None
            ) as record:
                peak = PeakMemory(plan.device if plan is not None else "cpu")
                try:
                    with peak, hooks.span("compute", stage, job, plan):
                        for check in hooks.before_compute:
                            check(stage, plan, job)
                        write = compute(plan, lambda label: _label(record, label))
                finally:  # a failed attempt's peaks are what the next plan must beat
                    record.peak_allocated_gib = peak.allocated_gib
                    record.peak_reserved_gib = peak.reserved_gib
                    record.peak_nvml_gib = peak.nvml_gib
                    record.peak_rss_gib = peak.rss_gib
                    record.peak_cgroup_gib = peak.cgroup_gib
                card.close()
                if write is not None:
                    with hooks.span("write", stage, job, plan):
                        write()
                record.output_key = key


def _label(record: StageRecord, label: str) -> None:
    record.plan = f"{record.plan}-{label}" if record.plan else label
