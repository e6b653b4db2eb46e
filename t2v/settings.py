"""Settings read from the environment, in one place and once per run.

A run reads `Settings.from_env()` when it starts and carries the snapshot in its `RunContext` to every
task, so that a stage never reads the environment again: a worker and its flow cannot disagree, and a
variable changed mid-night changes nothing. Every variable has one parser here; a bad value is an
`InvalidInput` naming the variable, raised before any work starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from t2v.errors import InvalidInput

VRAM_BUDGET_ENV = "T2V_VRAM_BUDGET_GB"
COMPILE_MODES = ("auto", "on", "off")
PAUSE_SECONDS = 600.0
"""How long a `T2V_PAUSE_AT` pause lasts if nobody kills the process: it then goes on normally."""


def read_vram_budget(env: Mapping[str, str]) -> float | None:
    """$T2V_VRAM_BUDGET_GB as GiB, None when unset; raises InvalidInput for anything but a positive number."""
    raw = env.get(VRAM_BUDGET_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"`{VRAM_BUDGET_ENV}` must be a number of GiB but is {raw!r}.") from None
    if not value > 0:
        raise InvalidInput(f"`{VRAM_BUDGET_ENV}` must be positive but is {raw!r}.")
    return value


def _read_compile(env: Mapping[str, str]) -> str:
    mode = env.get("T2V_COMPILE", "auto").strip().lower() or "auto"
    if mode not in COMPILE_MODES:
        raise InvalidInput(f"`T2V_COMPILE` has to be auto, on or off but is {mode!r}.")
    return mode


@dataclass(frozen=True)
class Settings:
    """Where t2v keeps its files and how it may use the GPU."""

    data_dir: Path = Path("data")
    """Root of the store, the outputs and the default run log ($T2V_DATA_DIR)."""
    database_url: str | None = None
    """Any SQLAlchemy URL ($T2V_DATABASE_URL); default is SQLite at `<data_dir>/runlog.sqlite`."""
    vram_budget_gib: float | None = None
    """Caps the free VRAM that NVML reports ($T2V_VRAM_BUDGET_GB): plans are chosen to fit this."""
    inject_oom: str = ""
    """Fault injection for tests and drills ($T2V_INJECT_OOM): `stage:plan` patterns (`*` matches any),
    comma separated, optionally `template/stage:plan` for one job; a matching stage attempt raises
    `torch.OutOfMemoryError` before it computes."""
    compile: str = "auto"
    """`torch.compile` of the transformer's repeated blocks on a GPU ($T2V_COMPILE): `auto` (when the
    run has enough denoising steps to pay back the compile, `plans.COMPILE_PAYS_AFTER_STEPS`), `on` or
    `off`."""
    pause_at: str = ""
    """Crash drills ($T2V_PAUSE_AT): a stage name. When this process has written its first output of
    that stage under the temporary `.partial-*` name, and before the rename that makes it visible, it
    creates `<data_dir>/paused-at-<stage>` and sleeps (up to `PAUSE_SECONDS`), so a test can `kill -9`
    it at the worst moment."""
    inductor_cache: Path | None = None
    """$TORCHINDUCTOR_CACHE_DIR if the user set one."""
    hooks: str = ""
    """$T2V_HOOKS: `module:function` returning extra `t2v.engine.Hooks` for every run of this process
    (benchmarks and instrumentation in worker processes); empty for none."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check every variable now; raises InvalidInput naming a bad one."""
        env = os.environ if env is None else env
        data_dir = Path(env.get("T2V_DATA_DIR") or "data").expanduser().resolve()
        cache = env.get("TORCHINDUCTOR_CACHE_DIR")
        return cls(
            data_dir=data_dir,
            database_url=env.get("T2V_DATABASE_URL") or None,
            vram_budget_gib=read_vram_budget(env),
            inject_oom=env.get("T2V_INJECT_OOM", ""),
            compile=_read_compile(env),
            pause_at=env.get("T2V_PAUSE_AT", "").strip(),
            inductor_cache=Path(cache) if cache else None,
            hooks=env.get("T2V_HOOKS", "").strip(),
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
