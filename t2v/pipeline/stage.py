"""What a stage is: one definition that the store, run log, runner, plans, dashboard, tasks and flows ask.

A `Stage` names its output, the component it needs, the stages whose outputs it reads, how its store
key is made from the job and its inputs' keys, its plan ladder and its compute function. `JobKeys`
builds a job's keys once, walking the pipeline in order so that a change flows downstream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from t2v.store import make_key

if TYPE_CHECKING:
    import torch

    from t2v.jobs import JobSpec
    from t2v.models.registry import ModelRef
    from t2v.plans import StagePlan
    from t2v.store import Kind, Store

Writer = Callable[[], object]
"""What a compute hands back: the write of its output, run after the card is let go."""


@dataclass(frozen=True)
class KeyInputs:
    """What a stage's key may depend on besides its inputs' keys."""

    job: JobSpec
    model: ModelRef
    fp8: bool = False
    """Transformer weights stored in float8 (a run option that changes the clip)."""


class RunServices(Protocol):
    """What the runner offers a compute function (`t2v.engine.runner.StageRunner` implements it)."""

    model: ModelRef
    store: Store
    outputs_dir: Path

    @property
    def device(self) -> str: ...

    @property
    def codec(self) -> Any: ...

    @property
    def hooks(self) -> Any: ...

    @property
    def settings(self) -> Any: ...

    @property
    def tokenizer(self) -> Any: ...

    def scheduler(self) -> Any: ...

    def vae_factors(self) -> tuple[int, int]: ...

    def component(self, stage: Stage, plan: StagePlan) -> torch.nn.Module: ...

    def pending(self, stage: Stage) -> Sequence[JobSpec]: ...


@dataclass(frozen=True)
class Stage:
    """One step of a job, defined once."""

    name: str
    """In the run log, the dashboard, `T2V_INJECT_OOM` and `T2V_PAUSE_AT`."""
    output: str
    """What its output is called where a later stage's key names it (`embeddings`, `latents`...)."""
    suffix: str
    """The stored file's suffix."""
    summary: str
    """One line: what the stage does and what its task returns."""
    task_name: str
    """The Prefect task's name (kebab-case verb-noun)."""
    key: Callable[[KeyInputs], dict[str, object]]
    """The parts of its store key besides its inputs' keys (which `JobKeys` adds by their `output`)."""
    compute: Callable[[Work], Writer | None]
    """Runs one attempt on `work.plan`; returns the write of its output, done after the card is free."""
    inputs: tuple[Stage, ...] = ()
    """Stages whose outputs it reads: their keys are part of its key, and they must be stored first."""
    component: str | None = None
    """The model component it computes with (`t2v.models.registry.COMPONENTS`); None: a CPU stage,
    run per job as soon as its inputs exist, beside the later GPU stages."""
    ladder: Callable[..., list[StagePlan]] | None = None
    """`ladder(sizes, job, *, device, fp8, night)`: its memory plans, fastest first, with estimates;
    `night` the run's jobs of the stage, which share its placed component."""
    state: Callable[[], object] | None = None
    """Makes what the stage keeps for one run (the encoder's remembered texts); `work.state`."""
    preload: Callable[[torch.nn.Module, Sequence[JobSpec]], None] | None = None
    """`preload(component, jobs)`: what the jobs announced for the stage add to its freshly loaded
    component, done in the background loader before it page-locks the host copy (the night's LoRA
    adapters): the stage's placing then finds them there, page-locked with the rest."""
    result: Callable[[Work], str] | None = None
    """What its task returns once its output is stored (the published clip's path); default the key."""
    store_name: str = ""
    """The name hashed into its keys and naming its store folder, when it differs from `name` (a stage
    renamed after its outputs were stored keeps their keys)."""
    formerly: tuple[str, ...] = ()
    """Earlier names, accepted where a user names a stage (`T2V_PAUSE_AT`)."""
    files: Callable[[Work], Sequence[tuple[Kind, str]]] | None = None
    """The stored files its output is, where that is more than the one file at its key (the finish
    stage's outputs: each MP4, the poster, the preview); it is skipped only when all are stored and whole."""

    @property
    def folder(self) -> str:
        return self.store_name or self.name

    @property
    def on_card(self) -> bool:
        return self.component is not None

    def __hash__(self) -> int:
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stage) and other.name == self.name


@dataclass(frozen=True)
class JobKeys:
    """Store keys of a job's outputs by stage name; each hashes its inputs' keys."""

    by_stage: Mapping[str, str]
    final: str
    """The last stage's key: the job's identity in the run log (`job_key`)."""

    @classmethod
    def of(cls, pipeline: Sequence[Stage], inputs: KeyInputs) -> JobKeys:
        keys: dict[str, str] = {}
        for stage in pipeline:
            upstream = {source.output: keys[source.name] for source in stage.inputs}
            keys[stage.name] = make_key(stage.folder, **stage.key(inputs), **upstream)
        return cls(by_stage=keys, final=keys[pipeline[-1].name])

    def __getitem__(self, stage: Stage) -> str:
        return self.by_stage[stage.name]


@dataclass(frozen=True)
class Work:
    """One attempt at one stage of one job, as its compute function sees it."""

    stage: Stage
    job: JobSpec
    keys: JobKeys
    run: RunServices
    plan: StagePlan | None = None
    state: object = None
    on_label: Callable[[str], None] | None = None
    """Where `label_plan` goes: the attempt's run-log row (`t2v.engine.attempts`); None outside one."""

    @property
    def key(self) -> str:
        """The key of this stage's output."""
        return self.keys[self.stage]

    @property
    def device(self) -> str:
        return self.plan.device if self.plan is not None else "cpu"

    def component(self) -> torch.nn.Module:
        """The stage's component, placed for this plan."""
        assert self.plan is not None, f"{self.stage.name} has no plan: it has no component"
        return self.run.component(self.stage, self.plan)

    def label_plan(self, label: str) -> None:
        """Add `-label` to this attempt's plan on its run-log row, for a choice the compute makes itself
        (the diffusion's attention kernel). The plan keeps its name, which residency and drills match."""
        if self.on_label is not None:
            self.on_label(label)

    def progress(self, done: int, total: int | None) -> None:
        """Report how far this attempt is (`Hooks.progress`: the live night view): cheap enough to call
        between a compute's steps."""
        self.run.hooks.progress(self.stage, self.job, done, total)

    def input_path(self, stage: Stage) -> Path:
        return self.run.store.path(stage, self.keys[stage])

    def load_tensors(self, stage: Stage) -> dict[str, torch.Tensor]:
        return self.run.store.load_tensors(stage, self.keys[stage])

    def save_tensors(self, tensors: dict[str, torch.Tensor]) -> Writer:
        """The write of this stage's output tensors, for the compute to hand back."""
        store, stage, key = self.run.store, self.stage, self.key
        return lambda: store.save_tensors(stage, key, tensors)
