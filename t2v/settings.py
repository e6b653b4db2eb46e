"""Settings read from the environment, in one place and once per run.

A run reads `Settings.from_env()` when it starts and carries the snapshot in its `RunContext` to every
task, so that a stage never reads the environment again: a worker and its flow cannot disagree, and a
variable changed mid-night changes nothing. Every variable has one parser here; a bad value is an
`InvalidInput` naming the variable, raised before any work starts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from t2v.errors import InvalidInput

VRAM_BUDGET_ENV = "T2V_VRAM_BUDGET_GB"
COMPILE_MODES = ("auto", "on", "off")
PAUSE_SECONDS = 600.0
"""How long a `T2V_PAUSE_AT` pause lasts if nobody kills the process: it then goes on normally."""


def _read_number(env: Mapping[str, str], name: str, unit: str, *, zero_ok: bool = False) -> float | None:
    """$name as a number of `unit`, None when unset. Refused, naming the variable: a value set but
    empty, anything that is not a number, nan and inf, a negative number, and zero unless `zero_ok`."""
    raw = env.get(name)
    if raw is None:
        return None
    text = raw.strip()
    # Set to nothing is a mistake (an empty substitution in a script), not a request for the default.
    if not text:
        raise InvalidInput(f"`{name}` is set but empty; unset it or give a number of {unit}.")
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"`{name}` must be a number of {unit} but is {text!r}.") from None
    if not math.isfinite(value):
        raise InvalidInput(f"`{name}` must be a finite number of {unit} but is {text!r}.")
    if value < 0 or (value == 0 and not zero_ok):
        raise InvalidInput(f"`{name}` must be {'>= 0' if zero_ok else 'positive'} but is {text!r}.")
    return value


def read_vram_budget(env: Mapping[str, str]) -> float | None:
    """$T2V_VRAM_BUDGET_GB as GiB, None when unset; raises InvalidInput for anything but a positive number."""
    return _read_number(env, VRAM_BUDGET_ENV, "GiB")


def _read_seconds(env: Mapping[str, str], name: str, default: float) -> float:
    # Zero is a setting here (T2V_CHECKPOINT_S=0: after every step), so only it may be 0.
    value = _read_number(env, name, "seconds", zero_ok=True)
    return default if value is None else value


_GLOB = re.compile(r"[*?\[]")
_HOOKS = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _read_inject_oom(env: Mapping[str, str]) -> str:
    """$T2V_INJECT_OOM: comma-separated `stage:plan` or `template/stage:plan` patterns; a stage named
    without wildcards must be one (a typo would make a drill that never fires, and so passes)."""
    raw = env.get("T2V_INJECT_OOM", "")
    for pattern in (p.strip() for p in raw.split(",")):
        if not pattern:
            continue
        stage, colon, plan = pattern.rpartition("/")[2].partition(":")
        if not colon or not stage or not plan:
            raise InvalidInput(
                "`T2V_INJECT_OOM` must be comma-separated `stage:plan` or `template/stage:plan` patterns "
                f"(`*` matches any) but has {pattern!r}."
            )
        if not _GLOB.search(stage):
            _stage_named("T2V_INJECT_OOM", stage)
    return raw


def _read_pause_at(env: Mapping[str, str]) -> str:
    """$T2V_PAUSE_AT: a stage name, or `stage@step` to pause after that denoising step."""
    raw = env.get("T2V_PAUSE_AT", "").strip()
    if not raw:
        return ""
    name, at, step = raw.partition("@")
    _stage_named("T2V_PAUSE_AT", name)
    if at and not (step.isdigit() and int(step) >= 1):
        raise InvalidInput(f"`T2V_PAUSE_AT` must be `stage` or `stage@step` (step >= 1) but is {raw!r}.")
    return raw


def _stage_named(variable: str, name: str) -> None:
    # Imported here: the stage registry pulls in torch, and settings are read by `t2v --help`'s imports.
    from t2v.pipeline import stage_named

    try:
        stage_named(name)
    except InvalidInput as exc:
        raise InvalidInput(f"`{variable}` names {exc}") from None


def _read_hooks(env: Mapping[str, str]) -> str:
    # The format only: importing the module would run its code in every command, `--help` aside.
    spec = env.get("T2V_HOOKS", "").strip()
    if spec and not _HOOKS.fullmatch(spec):
        raise InvalidInput(f"`T2V_HOOKS` must be `module:function` but is {spec!r}.")
    return spec


def _read_data_dir(env: Mapping[str, str]) -> Path:
    data_dir = Path(env.get("T2V_DATA_DIR") or "data").expanduser().resolve()
    if data_dir.exists() and not data_dir.is_dir():
        raise InvalidInput(f"`T2V_DATA_DIR` must be a folder but is '{data_dir}', a file.")
    return data_dir


def _read_compile(env: Mapping[str, str]) -> str:
    mode = env.get("T2V_COMPILE", "auto").strip().lower() or "auto"
    if mode not in COMPILE_MODES:
        raise InvalidInput(f"`T2V_COMPILE` has to be auto, on or off but is {mode!r}.")
    return mode


def _read_switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in ("on", "off"):
        raise InvalidInput(f"`{name}` has to be on or off but is {raw!r}.")
    return raw == "on"


@dataclass(frozen=True)
class Settings:
    """Where t2v keeps its files and how it may use the GPU."""

    data_dir: Path = Path("data")
    """Root of the store, the outputs and the default run log ($T2V_DATA_DIR)."""
    database_url: str | None = None
    """Any SQLAlchemy URL ($T2V_DATABASE_URL); default is SQLite at `<data_dir>/runlog.sqlite`."""
    vram_budget_gib: float | None = None
    """Caps the free VRAM that NVML reports ($T2V_VRAM_BUDGET_GB): plans are chosen to fit this."""
    ram_budget_gib: float | None = None
    """Caps the host memory plans and prefetches are chosen for ($T2V_RAM_BUDGET_GB); by default the
    tighter of the host's available memory and its cgroup's limit (`t2v.hostmem`)."""
    inject_oom: str = ""
    """Fault injection for tests and drills ($T2V_INJECT_OOM): `stage:plan` patterns (`*` matches any),
    comma separated, optionally `template/stage:plan` for one job; a matching stage attempt raises
    `torch.OutOfMemoryError` before it computes."""
    compile: str = "auto"
    """`torch.compile` of the transformer's repeated blocks on a GPU ($T2V_COMPILE): `auto` (when the
    run has enough denoising steps to pay back the compile, `plans.compile_pays`), `on` or
    `off`."""
    pause_at: str = ""
    """Crash drills ($T2V_PAUSE_AT): a stage name. When this process has written its first output of
    that stage under the temporary `.partial-*` name, and before the rename that makes it visible, it
    creates `<data_dir>/paused-at-<stage>` and sleeps (up to `PAUSE_SECONDS`), so a test can `kill -9`
    it at the worst moment."""
    inductor_cache: Path | None = None
    """$TORCHINDUCTOR_CACHE_DIR if the user set one."""
    checkpoint_seconds: float = 60.0
    """$T2V_CHECKPOINT_S: a diffusion saves its state at most this often (0: after every step), so that
    a killed night's re-run continues from there. At 720P a step takes ~2.2 s on an H200 and a save
    ~0.1 s (docs/benchmarks.md)."""
    lora_fuse: bool = True
    """$T2V_LORA_FUSE (on, off): each adapted layer folds a job's LoRA into a copy of its weight per
    call (`t2v.lora_fuse`): same math as peft's unmerged forward, other bf16 rounding, so not in the
    store key; off runs peft's forward, bit for bit diffusers' with the same LoRA loaded."""
    hooks: str = ""
    """$T2V_HOOKS: `module:function` returning extra `t2v.engine.Hooks` for every run of this process
    (benchmarks and instrumentation in worker processes); empty for none."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check every variable now; raises InvalidInput naming a bad one."""
        env = os.environ if env is None else env
        data_dir = _read_data_dir(env)
        cache = env.get("TORCHINDUCTOR_CACHE_DIR")
        return cls(
            data_dir=data_dir,
            database_url=env.get("T2V_DATABASE_URL") or None,
            vram_budget_gib=read_vram_budget(env),
            ram_budget_gib=_read_number(env, "T2V_RAM_BUDGET_GB", "GiB"),
            inject_oom=_read_inject_oom(env),
            compile=_read_compile(env),
            pause_at=_read_pause_at(env),
            inductor_cache=Path(cache) if cache else None,
            checkpoint_seconds=_read_seconds(env, "T2V_CHECKPOINT_S", 60.0),
            lora_fuse=_read_switch(env, "T2V_LORA_FUSE", True),
            hooks=_read_hooks(env),
        )

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def inductor_dir(self) -> Path:
        """Where torch.compile's kernels are kept between nights (TORCHINDUCTOR_CACHE_DIR wins): beside
        the store rather than in /tmp, which a reboot may empty."""
        return self.inductor_cache or self.data_dir / "inductor"

    @property
    def runlog_url(self) -> str:
        """$T2V_DATABASE_URL, else an absolute SQLite path under the data folder."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'runlog.sqlite').as_posix()}"


def get_settings() -> Settings:
    """Read the environment now (tests change it between calls); a run calls it once, when it starts."""
    return Settings.from_env()
