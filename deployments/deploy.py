"""Deploy the nightly flow to a Prefect server: a process work pool for the GPU host, the `gpu`
concurrency limit, and a deployment on a cron schedule in the host's time zone.

Everything here is idempotent, so `t2v deploy` can be run again after a change (a new catalogue, a
new schedule): the pool and the limit are updated in place and the deployment is replaced.

Why a process pool: the worker runs each flow run as a child process on the GPU host itself, in this
checkout, with the worker's environment (CUDA_VISIBLE_DEVICES, T2V_DATA_DIR, T2V_DATABASE_URL, the
Hugging Face cache), so no secret travels through the Prefect database and no image is built.
"""

from __future__ import annotations

import os
import socket
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from t2v.errors import InvalidInput

PROJECT_DIR = Path(__file__).resolve().parent.parent
"""The checkout the worker runs flows from (the deployment's pull step changes into it)."""
ENTRYPOINT = "flows/nightly.py:nightly"


def default_pool() -> str:
    """`gpu-<short hostname>`: a pool per GPU host, so a night runs on the host whose store has its files."""
    return f"gpu-{socket.gethostname().split('.')[0].lower()}"


def local_timezone() -> str:
    """The host's IANA time zone name ($TZ, /etc/timezone, or the /etc/localtime link), else UTC."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        candidates.append(Path("/etc/timezone").read_text().strip())
    except OSError:
        pass
    localtime = Path("/etc/localtime")
    if localtime.is_symlink():
        target = str(localtime.resolve())
        if "/zoneinfo/" in target:
            candidates.append(target.split("/zoneinfo/", 1)[1])
    for name in candidates:
        if name and name in zoneinfo.available_timezones():
            return name
    return "UTC"


@dataclass(frozen=True)
class NightlyDeployment:
    """What `deploy` sets up; defaults are one GPU host running the nightly batch at 02:00 local time."""

    catalogue: Path
    """The catalogue the scheduled runs read; stored absolute, as the worker runs elsewhere."""
    model: str = "tiny"
    """`--model` of the runs: `tiny`, a diffusers folder on the GPU host, or a hub id."""
    cron: str = "0 2 * * *"
    timezone: str = field(default_factory=local_timezone)
    """IANA name; the schedule follows its daylight-saving changes."""
    pool: str = field(default_factory=default_pool)
    gpus: int = 1
    """GPU workers on the pool: the slots of the `gpu` concurrency limit, and with more than one, the night is
    split into that many shards, each scheduled as its own flow run for one worker to take."""
    name: str = "nightly"
    """The deployment's name; it is run as `nightly/<name>`."""
    project_dir: Path = PROJECT_DIR

    def __post_init__(self) -> None:
        from prefect.client.schemas.schedules import CronSchedule

        if not Path(self.catalogue).is_file():
            raise InvalidInput(f"`catalogue` has to be a file but {str(self.catalogue)!r} is not one.")
        object.__setattr__(self, "catalogue", Path(self.catalogue).resolve())
        if self.timezone not in zoneinfo.available_timezones():
            raise InvalidInput(
                f"`timezone` has to be an IANA name such as Europe/Berlin but is {self.timezone!r}."
            )
        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except ValueError as exc:
            raise InvalidInput(f"`cron` is not a valid cron expression: {self.cron!r}.") from exc
        if self.gpus < 1:
            raise InvalidInput(f"`gpus` has to be at least 1 but is {self.gpus}.")
        if not self.pool or not all(c.isalnum() or c in "-_" for c in self.pool):
            raise InvalidInput(f"`pool` may hold letters, digits, '-' and '_' but is {self.pool!r}.")

    @property
    def worker_command(self) -> str:
        """How to start this pool's worker: one per GPU, taking one flow run at a time."""
        return f"CUDA_VISIBLE_DEVICES=0 prefect worker start --pool {self.pool} --limit 1"


def deploy(spec: NightlyDeployment) -> UUID:
    """Create or update the pool, the GPU limit and the deployment on the server at PREFECT_API_URL."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.schedules import Cron
    from prefect.workers.process import ProcessWorker

    from tasks.stages import GPU_LIMIT

    with get_client(sync_client=True) as client:
        template = ProcessWorker.get_default_base_job_template()
        try:
            client.create_work_pool(
                WorkPoolCreate(name=spec.pool, type="process", base_job_template=template)
            )
        except ObjectAlreadyExists:
            client.update_work_pool(spec.pool, WorkPoolUpdate(base_job_template=template))
        # A run holds one slot through its GPU stages (tasks.stages.gpu_slot); with one slot per GPU, a
        # manual run beside the nightly one (a `generate` against this server) waits instead of
        # running the card out of memory.
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, spec.gpus)

    if spec.gpus == 1:
        schedules = [Cron(spec.cron, timezone=spec.timezone)]
    else:
        # One schedule per shard at the same time: n flow runs, each taken by one worker (`--limit 1`),
        # that between them make every clip of the night once.
        schedules = [
            Cron(spec.cron, timezone=spec.timezone, parameters={"shard": f"{i}/{spec.gpus}"})
            for i in range(spec.gpus)
        ]
    flow = Flow.from_source(source=str(spec.project_dir), entrypoint=ENTRYPOINT)
    return flow.deploy(
        name=spec.name,
        work_pool_name=spec.pool,
        schedules=schedules,
        parameters={"catalogue": str(spec.catalogue), "model": spec.model},
        # A night's runs (one per shard) may run together; a late night waits rather than doubling up.
        concurrency_limit=spec.gpus,
        tags=["t2v"],
        description=f"t2v nightly batch of {spec.catalogue} on {spec.model}",
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,  # the advice to use `.serve` instead: a worker is what we want here
    )
