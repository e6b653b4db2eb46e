"""Runs one stage of one job: skip it if its output is stored, else pick a memory plan, compute, store,
and log every attempt; on CUDA out-of-memory, free the card and try the next leaner plan.

This is what a Prefect task wraps; it knows the store, the run log and the models, not Prefect.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import gc
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from t2v import media, stages
from t2v.errors import NoPlanFits
from t2v.jobs import JobSpec
from t2v.models import registry
from t2v.models.registry import ModelRef
from t2v.pinning import HostPin, pin_host_tensors
from t2v.plans import (
    ComponentSizes,
    StagePlan,
    apply,
    choose,
    configure,
    ladder,
    module_bytes,
    residency_key,
)
from t2v.runlog import RunLog
from t2v.settings import PAUSE_SECONDS, Settings
from t2v.store import Store, make_key, publish
from t2v.vram import DeviceMemory, PeakMemory, hold_to_budget

log = logging.getLogger("t2v")
MAX_CLIP_BYTES = 20_000_000
TEXTS_REMEMBERED = 16
"""Embeddings a run keeps in memory by text (4 MB each at full size): the negative prompts, mostly."""


@dataclass(frozen=True)
class JobKeys:
    """Store keys of a job's four outputs; each hashes its inputs' keys, so a change flows downstream."""

    embeddings: str
    latents: str
    frames: str
    clip: str

    @classmethod
    def of(cls, job: JobSpec, model: ModelRef, *, fp8: bool = False) -> JobKeys:
        embeddings = make_key(
            "encode",
            model=model.identity,
            prompt=job.prompt,
            negative_prompt=job.negative_prompt if job.cfg else None,
            max_sequence_length=model.rules.max_sequence_length,
        )
        latents = make_key(
            "diffuse",
            model=model.identity,
            embeddings=embeddings,
            seed=job.seed,
            height=job.height,
            width=job.width,
            frames=job.frames,
            steps=job.steps,
            guidance=job.guidance,
            fp8=fp8,
            step_cache=job.step_cache,
        )
        frames = make_key("decode", model=model.identity, latents=latents)
        watermark = asdict(job.watermark)
        if job.watermark.image:
            watermark["image"] = hashlib.sha256(Path(job.watermark.image).read_bytes()).hexdigest()
        clip = make_key(
            "watermark", frames=frames, fps=job.fps, watermark=watermark, max_bytes=MAX_CLIP_BYTES
        )
        return cls(embeddings, latents, frames, clip)

    def output(self, stage: str) -> str:
        """The key of `stage`'s output."""
        by_stage = dict(encode=self.embeddings, diffuse=self.latents, decode=self.frames, watermark=self.clip)
        return by_stage[stage]


@contextmanager
def step_cache(transformer: torch.nn.Module, threshold: float) -> Iterator[None]:
    """diffusers' first-block cache on `transformer` for one job; the component outlives the job, the
    cache must not (the next job may not ask for it, and its state belongs to this job's steps)."""
    if threshold <= 0:
        yield
        return
    from diffusers import FirstBlockCacheConfig

    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        yield
    finally:
        transformer.disable_cache()


class Residency:
    """Components loaded in this process, kept between tasks of a stage; one GPU component at a time.

    `lock` is the card: a stage holds it while it loads a component or computes, and lets it go before
    writing its output, so the next job's stage computes while the last one's frames go to disk.
    `prefetch` loads the next stage's component into pinned host memory in a background thread while
    the current stage runs; its stage then only has to place it on the card."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, torch.nn.Module]] = {}
        self._ahead: dict[str, tuple[str, Future]] = {}
        self._pins: dict[str, HostPin] = {}
        """Page-locked host memory of the prefetched components a stage took, given back at their drop."""
        self._releasing: list[Future] = []
        self._loader: ThreadPoolExecutor | None = None
        self.lock = threading.Lock()

    def get(self, name: str, tag: str, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        held = self._held.get(name)
        if held and held[0] == tag:
            return held[1]
        # Stage-major order: the previous stage's component leaves the card before this one comes.
        self.drop()
        module = load()
        self._held[name] = (tag, module)
        return module

    def prefetch(self, name: str, source: str, load: Callable[[], torch.nn.Module | None]) -> None:
        """Start loading component `name` of model `source` (and pinning its host copy) in the
        background, unless it is loaded or on its way."""
        held = self._held.get(name)
        ahead = self._ahead.get(name)
        if (held and held[0].startswith(f"{source}|")) or (ahead and ahead[0] == source):
            return
        self._ahead[name] = (source, self._background().submit(_pinned, load))

    def _background(self) -> ThreadPoolExecutor:
        """The one thread that loads components ahead and gives back their page-locked memory."""
        if self._loader is None:
            self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t2v-prefetch")
        return self._loader

    def prefetched(
        self, name: str, source: str, while_waiting: Callable[[], None] | None = None
    ) -> torch.nn.Module | None:
        """The component `prefetch` loaded (waiting for it if still loading), once; None if it was not
        asked for, not loaded, or its load failed (the stage then loads it itself and meets the error).

        `while_waiting` is called first if the load is still going: work the stage needs later, done
        while it would sit idle."""
        ahead = self._ahead.pop(name, None)
        if ahead is None or ahead[0] != source:
            return None
        if while_waiting is not None and not ahead[1].done():
            while_waiting()
        try:
            module, pin = ahead[1].result()
        except Exception as exc:
            log.warning("prefetching %s failed (%s: %s); loading it now", name, type(exc).__name__, exc)
            return None
        if pin is not None:
            self._pins[name] = pin
        return module

    def drop(self, name: str | None = None) -> None:
        for key in [name] if name else list(self._held):
            self._held.pop(key, None)
        for key in [name] if name else list(self._pins):
            pin = self._pins.pop(key, None)
            if pin is not None:
                # Host work that the next stage need not wait for (0.1-0.3 s a component on the
                # H200): the pin keeps the memory allocated until its ranges are unregistered.
                self._releasing.append(self._background().submit(pin.release))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def forget_prefetched(self) -> None:
        """Wait for loads in flight and let go of what nobody took; wait for page-locked memory still
        being given back."""
        for _, future in self._ahead.values():
            if future.cancel() or future.exception() is not None:
                continue  # not started, or failed (for a stage not run); else it waited for the load
            _, pin = future.result()
            if pin is not None:
                pin.release()
        self._ahead.clear()
        for release in self._releasing:
            release.result()
        self._releasing.clear()


def _pinned(load: Callable[[], torch.nn.Module | None]) -> tuple[torch.nn.Module | None, HostPin | None]:
    """`load()` with its host tensors page-locked where they are (`t2v.pinning`), so that the card copies
    from them at full speed and group offloading has nothing left to pin in the stage's time."""
    module = load()
    if module is None or not torch.cuda.is_available():
        return module, None
    return module, pin_host_tensors(module)


@contextmanager
def components_held() -> Iterator[None]:
    """Around a run's GPU stages: what the process holds when they start is frozen out of the garbage
    collector until they end, and every component they loaded is released at the end.

    Each change of component collects the dropped one's reference cycles (diffusers' hooks), which a
    full `gc.collect()` finds only by walking every object the process tracks: ~0.5 M after the imports,
    0.34-0.59 s a collection on the H200 host, four times a night (0.3 s on a 2-core CPU host, where it
    takes under 1 ms once those are frozen). What is frozen stays alive until the end,
    so garbage that still holds card memory is collected first."""
    if torch.cuda.is_available() and torch.cuda.memory_allocated() > 0:
        gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        try:
            release_components()
        finally:
            gc.unfreeze()


def release_components() -> None:
    """Free every component this process keeps loaded (weights on the card, pinned host copies): when a
    run's GPU stages are over and the card goes to someone else."""
    _RESIDENCY.forget_prefetched()
    with _RESIDENCY.lock:
        _RESIDENCY.drop()
    if torch.cuda.is_available():
        torch._C._host_emptyCache()  # packed or per-tensor page-locked blocks go back to the system


LOADERS: dict[str, Callable[[ModelRef], torch.nn.Module]] = {
    "text_encoder": registry.load_text_encoder,
    "transformer": registry.load_transformer,
    "vae": registry.load_vae,
}
STAGE_OF = {"text_encoder": "encode", "transformer": "diffuse", "vae": "decode"}


def import_compiler() -> None:
    """What `torch.compile`'s first call imports (Inductor; diffusers has imported Dynamo already)."""
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401


PREFETCH_ROOM = 2.0
"""Host memory a prefetch wants free, as a multiple of the component's size: the copy, and as much again
left for the stage running beside it (its activations, the frames it writes)."""

_PAUSED: set[str] = set()
"""Stages this process has paused at (T2V_PAUSE_AT): once per process, not once per run."""

_RESIDENCY = Residency()
"""One per process: Prefect runs a flow's tasks in threads of one process, so they share it."""


class StageRunner:
    """The four stages of jobs in one run, against one model, store and run log."""

    def __init__(
        self,
        *,
        model: ModelRef,
        store: Store,
        runlog: RunLog,
        run_id: str,
        settings: Settings,
        memory: DeviceMemory,
        outputs_dir: Path,
        fp8: bool = False,
        compile_blocks: bool = False,
        residency: Residency = _RESIDENCY,
    ) -> None:
        self.model = model
        self.store = store
        self.runlog = runlog
        self.run_id = run_id
        self.settings = settings
        self.memory = memory
        self.outputs_dir = outputs_dir
        self.fp8 = fp8
        self.compile_blocks = compile_blocks and memory.device.startswith("cuda")
        self.residency = residency
        hold_to_budget(memory)
        log.info(
            "planning for %s (%s): %.1f GiB free of %.1f, from %s%s",
            memory.name,
            memory.device,
            memory.budget_bytes / 2**30,
            memory.total_bytes / 2**30,
            memory.source,
            f"; {memory.note}" if memory.note else "",
        )
        self._tokenizer = None
        self._factors: tuple[int, int] | None = None
        self._scheduler = None
        self._sizes: dict[str, tuple[ComponentSizes, int]] = {}
        self._sizes_lock = threading.Lock()
        self._texts: OrderedDict[str, torch.Tensor] = OrderedDict()
        if settings.pause_at:
            store.on_written = self._maybe_pause

    @property
    def device(self) -> str:
        return self.memory.device

    # --- the stages ------------------------------------------------------------------------------

    def encode(self, job: JobSpec) -> str:
        keys = JobKeys.of(job, self.model, fp8=self.fp8)

        def compute(plan: StagePlan) -> Callable[[], object]:
            encoder = self._component("text_encoder", plan)
            tensors = {"cond": self._embed(encoder, plan, job.prompt)}
            if job.cfg:
                tensors["uncond"] = self._embed(encoder, plan, job.negative_prompt)
            return functools.partial(self.store.save_tensors, "encode", keys.embeddings, tensors)

        return self._run("encode", job, keys, keys.embeddings, compute, sizes_of="text_encoder")

    def diffuse(self, job: JobSpec) -> str:
        keys = JobKeys.of(job, self.model, fp8=self.fp8)

        def compute(plan: StagePlan) -> Callable[[], object]:
            embeds = self.store.load_tensors("encode", keys.embeddings)
            transformer = self._component("transformer", plan)
            device = self._compute_device(plan)
            temporal, spatial = self._vae_factors()
            noise = stages.job_noise(
                job, transformer.config.in_channels, temporal=temporal, spatial=spatial, device=device
            )
            with (
                tqdm(total=job.steps, desc=f"{job.template} denoise", unit="step", leave=False) as bar,
                step_cache(transformer, job.step_cache),
            ):
                latents = stages.denoise(
                    transformer,
                    self.scheduler(),
                    noise,
                    embeds["cond"],
                    embeds.get("uncond"),
                    steps=job.steps,
                    guidance=job.guidance,
                    compute_dtype=self.model.weight_dtype,
                    shared_timestep=plan.shared_timestep,
                    cfg_batch=plan.cfg_batch,
                    on_step=lambda i, n: bar.update(1),
                )
            # Off the card while it is ours: the write then runs beside the next job's compute.
            latents = {"latents": latents.cpu()}
            return functools.partial(self.store.save_tensors, "diffuse", keys.latents, latents)

        self._require("encode", keys.embeddings, job)
        return self._run("diffuse", job, keys, keys.latents, compute, sizes_of="transformer")

    def decode(self, job: JobSpec) -> str:
        keys = JobKeys.of(job, self.model, fp8=self.fp8)

        def compute(plan: StagePlan) -> Callable[[], object]:
            latents = self.store.load_tensors("diffuse", keys.latents)["latents"]
            vae = self._component("vae", plan)
            frames = stages.decode_latents(vae, latents, device=self._compute_device(plan))

            def write() -> None:  # ~100 MB per 480P clip: written once the card is free again
                with self.store.writing("decode", keys.frames) as temp:
                    media.write_frames_lossless(frames, temp, fps=job.fps)

            return write

        self._require("diffuse", keys.latents, job)
        return self._run("decode", job, keys, keys.frames, compute, sizes_of="vae")

    def watermark(self, job: JobSpec) -> Path:
        """Encode the clip into the store and publish it as `<outputs_dir>/<template>.mp4`."""
        keys = JobKeys.of(job, self.model, fp8=self.fp8)

        def compute(plan: StagePlan | None) -> None:
            with self.store.writing("watermark", keys.clip) as temp:
                media.encode_mp4(
                    self.store.path("decode", keys.frames),
                    temp,
                    fps=job.fps,
                    watermark=job.watermark,
                    max_bytes=MAX_CLIP_BYTES,
                )

        self._require("decode", keys.frames, job)
        self._run("watermark", job, keys, keys.clip, compute, sizes_of=None)
        return publish(self.store.path("watermark", keys.clip), self.outputs_dir / f"{job.template}.mp4")

    # --- shared machinery ------------------------------------------------------------------------

    def _run(
        self, stage: str, job: JobSpec, keys: JobKeys, key: str, compute: Callable, *, sizes_of: str | None
    ) -> str:
        row = dict(
            run_id=self.run_id,
            job_key=keys.clip,
            template=job.template,
            stage=stage,
            model=self.model.identity,
        )
        if self.store.has(stage, key):
            self.runlog.record_skip(**row, output_key=key)
            return key
        plans: list[StagePlan | None] = [None]
        if sizes_of:
            plans = choose(self._ladder(stage, job, sizes_of), self.memory.budget_bytes)
        last_error: BaseException | None = None
        for plan in plans:
            try:
                # A planned stage has the card to itself (and its peaks are its own) from before its row
                # starts (a job waiting for the card has no row yet, so a row's wall time is its own) to
                # the end of its compute; the write it hands back runs after, beside the next job's.
                with ExitStack() as card:
                    if plan:
                        card.enter_context(self.residency.lock)
                    with self.runlog.stage(**row, plan=plan.name if plan else None) as record:
                        peak = PeakMemory(self.device)
                        try:
                            with peak:
                                self._maybe_inject_oom(plan, job.template)
                                write = compute(plan)
                        finally:  # a failed attempt's peaks are what the next plan must beat
                            record.peak_allocated_gib = peak.allocated_gib
                            record.peak_reserved_gib = peak.reserved_gib
                            record.peak_nvml_gib = peak.nvml_gib
                            record.peak_rss_gib = peak.rss_gib
                        card.close()
                        if write is not None:
                            write()
                        record.output_key = key
                return key
            except torch.OutOfMemoryError as exc:
                last_error = exc
                log.warning(
                    "%s of %s ran out of memory on plan %s; trying a leaner plan",
                    stage,
                    job.template,
                    plan.name if plan else "-",
                )
                # The component may hold hooks and half-moved weights: drop it and load it afresh.
                with self.residency.lock:
                    self.residency.drop()
        raise NoPlanFits(
            f"{stage} of {job.template!r} ran out of memory on every plan "
            f"({', '.join(p.name for p in plans if p)}): {last_error}"
        )

    def _ladder(self, stage: str, job: JobSpec, component: str) -> list[StagePlan]:
        return ladder(stage, self._sizes_of(component)[0], job, device=self.device, fp8=self.fp8)

    def _sizes_of(self, component: str) -> tuple[ComponentSizes, int]:
        """What the planner needs of `component`, and its bytes: from a weightless copy built from the
        config on the meta device, once per run (a stage's tasks start together; a prefetch asks first)."""
        with self._sizes_lock:
            if component not in self._sizes:
                module = registry.skeleton(self.model, component)
                self._sizes[component] = (
                    ComponentSizes.from_modules(**{component: module}),
                    module_bytes(module),
                )
            return self._sizes[component]

    def _component(self, name: str, plan: StagePlan) -> torch.nn.Module:
        load = LOADERS[name]
        compiled = self.compile_blocks and name == "transformer"

        def place() -> torch.nn.Module:
            # The stage waits for its prefetched component (the text encoder's, at the night's start):
            # the compiler's import (2.6-3.3 s on the H200 host) can take that idle time. In the loader
            # thread, beside a stage's compute, it slowed the compute as much (run 10, docs/benchmarks.md).
            waiting = import_compiler if self.compile_blocks else None
            module = self.residency.prefetched(name, self.model.identity, while_waiting=waiting)
            module = apply(plan, load(self.model) if module is None else module)
            if compiled:
                # Each block is compiled once and reused by all 30 (dynamic=False: a night's shapes
                # repeat); the first step pays the compile, Inductor's on-disk cache the next night's.
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.settings.inductor_dir)
                module.compile_repeated_blocks(dynamic=False)
            return module

        tag = f"{self.model.identity}|{residency_key(plan)}|compiled={compiled}"
        return configure(plan, self.residency.get(name, tag, place))

    def prefetch(self, name: str, jobs: Sequence[JobSpec]) -> bool:
        """Start loading component `name` into host memory in the background, for the stage of `jobs`
        that uses it; False (and nothing started) where every job has that stage's output stored. The
        background load first checks that the host has the room to hold it beside what is loaded
        already, and loads nothing where it lacks it, as on a small machine: its stage then loads it."""
        stage = STAGE_OF[name]
        if all(self.store.has(stage, JobKeys.of(j, self.model, fp8=self.fp8).output(stage)) for j in jobs):
            return False

        def load_if_room() -> torch.nn.Module | None:
            need = PREFETCH_ROOM * self._sizes_of(name)[1]
            free = psutil.virtual_memory().available
            if free < need:
                log.info(
                    "not prefetching %s: %.1f GiB of host memory free, %.1f wanted",
                    name,
                    free / 2**30,
                    need / 2**30,
                )
                return None
            return LOADERS[name](self.model)

        self.residency.prefetch(name, self.model.identity, load_if_room)
        return True

    def _embed(self, encoder: torch.nn.Module, plan: StagePlan, text: str) -> torch.Tensor:
        """One text's embeddings, encoded alone as the pipeline encodes each (so a text's embedding does
        not depend on what it was batched with) and remembered for the run: a night's jobs mostly
        share one negative prompt, and each pass of the 5.7B encoder streams all its weights."""
        cached = self._texts.get(text)
        if cached is None:
            cached = stages.encode_texts(
                encoder,
                self.tokenizer,
                [text],
                device=self._compute_device(plan),
                max_sequence_length=self.model.rules.max_sequence_length,
            ).cpu()
            self._texts[text] = cached
            while len(self._texts) > TEXTS_REMEMBERED:
                self._texts.popitem(last=False)
        else:
            self._texts.move_to_end(text)
        return cached

    def _compute_device(self, plan: StagePlan) -> torch.device:
        return torch.device(plan.device)

    def _require(self, stage: str, key: str, job: JobSpec) -> None:
        if not self.store.has(stage, key):
            raise FileNotFoundError(
                f"{job.template}: the {stage} output {key} is not in the store; run the {stage} stage first"
            )

    def _maybe_inject_oom(self, plan: StagePlan | None, template: str) -> None:
        if plan is None or not self.settings.inject_oom:
            return
        for pattern in self.settings.inject_oom.split(","):
            pattern = pattern.strip()
            # `template/stage:plan` aims at one job; plain `stage:plan` at every job with that plan.
            target = f"{template}/{plan.name}" if "/" in pattern else plan.name
            if pattern and fnmatch.fnmatch(target, pattern):
                raise torch.OutOfMemoryError(f"injected by T2V_INJECT_OOM={self.settings.inject_oom!r}")

    def _maybe_pause(self, stage: str, temp: Path) -> None:
        """T2V_PAUSE_AT: stop once, with the stage's first output complete but not yet renamed.

        This is the moment a crash hurts most (the row says "running", the bytes exist under a
        temporary name), so crash tests kill the process here: see tests/test_crash.py.
        """
        if stage != self.settings.pause_at or stage in _PAUSED:
            return
        _PAUSED.add(stage)
        marker = self.settings.data_dir.expanduser() / f"paused-at-{stage}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{temp}\n")
        log.warning("T2V_PAUSE_AT=%s: paused before publishing %s; waiting to be killed", stage, temp.name)
        time.sleep(PAUSE_SECONDS)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = registry.load_tokenizer(self.model)
        return self._tokenizer

    def scheduler(self):
        if self._scheduler is None:
            self._scheduler = registry.load_scheduler(self.model)
        return copy.deepcopy(self._scheduler)  # schedulers keep per-run state

    def _vae_factors(self) -> tuple[int, int]:
        if self._factors is None:  # the same for every job of the run; tiny builds a VAE to read them
            self._factors = registry.vae_factors(self.model)
        return self._factors
