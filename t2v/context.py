"""What one pipeline run hands to each of its stages, the set-up the flows share, and the checks made
before a run starts.

The flows build a `RunContext` and pass it to every stage task beside the job; both are small frozen
values that read well in logs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2v import attention, lora
from t2v.compile_cache import CompiledShapes, shape_key
from t2v.errors import CatalogueError, InvalidInput, NoPlanFits
from t2v.jobs import JobSpec, template_line
from t2v.models import registry
from t2v.models.registry import ModelRef, resolve_model
from t2v.plans import compile_pays, compile_weight
from t2v.runlog import RunLog
from t2v.settings import Settings

log = logging.getLogger("t2v")


@dataclass(frozen=True)
class RunContext:
    """One run's identity, places and settings: everything a stage needs besides its job."""

    run_id: str
    """Id of the run's row in the run log."""
    model: str
    """The `--model` value (`tiny`, a folder or a hub id); resolved again where it is used."""
    outputs_dir: Path
    """Where the clips of this run are published as `<template>.mp4`."""
    settings: Settings
    """The environment as the run read it when it started: tasks read no other."""
    fp8_storage: bool = False
    """Store the transformer's weights in float8 (opt-in: it changes the output; see docs/benchmarks.md)."""
    compile_blocks: bool = False
    """`torch.compile` the transformer's repeated blocks (on a GPU): `plans.compile_pays` decides."""


def start_run(
    kind: str,
    jobs: Sequence[JobSpec],
    *,
    settings: Settings,
    model: str,
    outputs_dir: Path,
    fp8_storage: bool = False,
    **row: Any,
) -> RunContext:
    """The set-up every flow shares: the run's row in the run log and its context. `row` goes to
    `RunLog.start_run` (catalogue, parent run, the night's jobs)."""
    ref = resolve_model(model)
    run_id = open_runlog(settings.runlog_url).start_run(kind=kind, model=ref.source or ref.spec, **row)
    return RunContext(
        run_id=run_id,
        model=model,
        outputs_dir=outputs_dir,
        settings=settings,
        fp8_storage=fp8_storage,
        compile_blocks=_compiles(jobs, ref.identity, settings),
    )


def _compiles(jobs: Sequence[JobSpec], identity: str, settings: Settings) -> bool:
    """`plans.compile_pays` for the night's steps weighted by their size (`plans.compile_weight`), warm
    where an earlier night compiled all of its shapes; logged, with what the compile is expected to
    cost (a GPU run only compiles)."""
    from t2v.pipeline.diffuse import diffusion_tokens

    steps = sum(j.steps for j in jobs)
    weighted = sum(j.steps * compile_weight(diffusion_tokens(j)) for j in jobs)
    warm = CompiledShapes(settings.inductor_dir).holds(shape_key(j, identity) for j in jobs)
    compiles = compile_pays([weighted], settings.compile, warm=warm)
    log.info(
        "torch.compile of the transformer's blocks (on a GPU): %s for %d steps, worth %.0f at 480P "
        "(T2V_COMPILE=%s; Inductor's cache %s these shapes: a compile costs ~%s)",
        "on" if compiles else "off",
        steps,
        weighted,
        settings.compile,
        "holds" if warm else "does not hold",
        "3 s" if warm else "16 s",
    )
    return compiles


_RUNLOGS: dict[str, RunLog] = {}
_RUNLOGS_LOCK = threading.Lock()


def open_runlog(url: str) -> RunLog:
    """One RunLog (one connection pool) per URL in this process, opened again if its SQLite file was
    deleted or replaced since (a long-lived process: the dashboard, a worker); raises RunLogUnavailable."""
    with _RUNLOGS_LOCK:
        runlog = _RUNLOGS.get(url)
        if runlog is None or not runlog.still_open():
            runlog = _RUNLOGS[url] = RunLog(url)
        return runlog


def check_jobs(jobs: Iterable[JobSpec], model: ModelRef, *, catalogue: Path | str | None = None) -> None:
    """Validate jobs against the model's rules, prompt token counts included; raises InvalidInput.

    Loads the tokenizer and no weights (a LoRA is checked against the transformer built on the meta
    device): this is what runs before a flow starts. With `catalogue`, messages say which template of
    which file is wrong.
    """
    jobs = list(jobs)
    tokenizer = transformer = None
    for job in jobs:
        try:
            job.validate(model.rules)
            attention.check_installed(job.attention)  # this host's packages: sage's, before a model loads
            tokenizer = tokenizer or registry.load_tokenizer(model)
            job.check_prompt_length(tokenizer, model.rules)
            if job.lora:  # each file against this model's transformer, built on the meta device
                transformer = transformer or registry.skeleton(model, "transformer")
                lora.check_fits(job.lora, transformer)
        except InvalidInput as exc:
            if catalogue is None:
                raise
            where = f"{catalogue}: template {job.template!r}"
            try:  # the line, as Catalogue.from_file gives it for the rules it checks itself
                line = template_line(Path(catalogue).read_text(encoding="utf-8"), job.template)
            except (OSError, UnicodeDecodeError):
                line = 0
            if line:
                where = f"{catalogue}:{line}: template {job.template!r}"
            raise CatalogueError(f"{where}: {exc}") from exc


def check_budgets(jobs: Sequence[JobSpec], model: ModelRef, settings: Settings, *, fp8: bool = False) -> None:
    """Refuse, before any weights load, a night that cannot fit: a card stage whose leanest plan needs
    more than the card's budget, or more host memory than is left (without a card a component is loaded
    whole; with one, the leanest host plan streams it from its mapped files). Raises NoPlanFits saying
    what the smallest plan needs; InvalidInput for a job naming a card's attention kernel (cudnn, flash,
    efficient, sage) without a card. Reads configs, not weights."""
    from t2v.hostmem import probe_host
    from t2v.models.registry import check_switches
    from t2v.pipeline import stages
    from t2v.plans import HostPlacement, component_sizes, host_need, with_host
    from t2v.vram import probe

    check_switches(model, fp8=fp8)
    card = probe(budget_gib=settings.vram_budget_gib)
    for job in jobs:  # a kernel named for a card, where the run has none
        try:
            attention.check_device(job.attention, card.device)
        except InvalidInput as exc:
            raise InvalidInput(f"template {job.template!r}: {exc}") from exc
    host = probe_host(settings.ram_budget_gib)
    raise_it = "raise the memory limit or T2V_RAM_BUDGET_GB"
    for stage in (s for s in stages() if s.on_card):
        sizes, need = component_sizes(model, stage.component)
        if not card.device.startswith("cuda"):
            if need > host.budget_bytes:
                raise NoPlanFits(
                    f"the {stage.component} of the {stage.name} stage is {_size(need)} as loaded, and the "
                    f"host has {_size(host.budget_bytes)} left for it ({host.note}); {raise_it}."
                )
            continue
        for job in jobs:
            ladder = stage.ladder(sizes, job, device=card.device, fp8=fp8, night=jobs)
            leanest = ladder[-1]
            if leanest.estimate_bytes > card.budget_bytes:
                size = f"{job.width}x{job.height}x{job.frames}"
                raise NoPlanFits(
                    f"`{job.template}` ({size}): no {stage.name} plan fits the card's "
                    f"{_size(card.budget_bytes)} ({card.source}); the leanest, {leanest.name}, "
                    f"needs about {_size(leanest.estimate_bytes)}. Raise T2V_VRAM_BUDGET_GB, free the card, "
                    "or make the clip smaller."
                )
            host_plan = min(with_host(ladder, HostPlacement.MAPPED, need), key=host_need)
            if host_need(host_plan) > host.budget_bytes:
                raise NoPlanFits(
                    f"no {stage.name} plan fits the host's {_size(host.budget_bytes)} ({host.note}): the "
                    f"leanest, {host_plan.name}, needs about {_size(host_need(host_plan))} beside the "
                    f"process; {raise_it}."
                )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 // 10 else f"{n / 2**20:.1f} MiB"
