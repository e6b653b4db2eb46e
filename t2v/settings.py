"""Settings read from the environment, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _float_or_none(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


@dataclass(frozen=True)
class Settings:
    """Where t2v keeps its files and how it may use the GPU."""

    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("T2V_DATA_DIR", "data")))
    """Root of the store, the outputs and the default run log."""
    database_url: str | None = field(default_factory=lambda: os.environ.get("T2V_DATABASE_URL") or None)
    """Any SQLAlchemy URL; default is SQLite at `<data_dir>/runlog.sqlite`."""
    vram_budget_gib: float | None = field(
        default_factory=lambda: _float_or_none(os.environ.get("T2V_VRAM_BUDGET_GB"))
    )
    """Caps the free VRAM that NVML reports: plans are chosen to fit this."""
    inject_oom: str = field(default_factory=lambda: os.environ.get("T2V_INJECT_OOM", ""))
    """Fault injection for tests and drills: `stage:plan` patterns (`*` matches any), comma separated,
    optionally `template/stage:plan` for one job; a matching stage attempt raises
    `torch.OutOfMemoryError` before it computes."""
    compile: str = field(
        default_factory=lambda: os.environ.get("T2V_COMPILE", "auto").strip().lower() or "auto"
    )
    """`torch.compile` of the transformer's repeated blocks on a GPU: `auto` (when the run has enough
    denoising steps to pay back the compile, `plans.COMPILE_PAYS_AFTER_STEPS`), `on` or `off`."""
    pause_at: str = field(default_factory=lambda: os.environ.get("T2V_PAUSE_AT", ""))
    """Crash drills: a stage name (`encode`, `diffuse`, `decode`, `watermark`). When this process has
    written its first output of that stage under the temporary `.partial-*` name, and before the
    rename that makes it visible, it creates `<data_dir>/paused-at-<stage>` and sleeps (up to
    `PAUSE_SECONDS`), so a test can `kill -9` it at the worst moment."""

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
        chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        return Path(chosen) if chosen else self.data_dir.expanduser().resolve() / "inductor"

    @property
    def runlog_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'runlog.sqlite').as_posix()}"


PAUSE_SECONDS = 600.0
"""How long a `T2V_PAUSE_AT` pause lasts if nobody kills the process: it then goes on normally."""


def get_settings() -> Settings:
    """Read the environment now (tests change it between calls)."""
    return Settings()
