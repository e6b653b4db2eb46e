"""The nightly deployment as Prefect's own `prefect.yaml`, at the project's root: what it says, writing it
from a few values, and applying it with `prefect deploy --all`.

The file is the deployment: `prefect deploy --all` in this folder applies it, and `t2v deploy` is a thin
wrapper that writes it from its options (any it is not given keep the file's values) and then applies
it. What a prefect.yaml cannot hold is done beside it: the work pool must exist before `prefect deploy`
accepts a deployment for it (`ensure_pool`, as `prefect work-pool create NAME --type process` does), and
the `gpu` global concurrency limit has no prefect.yaml section, so the file's build step
`deployments.steps.set_concurrency_limit` creates or updates it on every `prefect deploy`.

Why a process pool: the worker runs each flow run as a child process on the GPU host itself, in this
checkout, with the worker's environment (CUDA_VISIBLE_DEVICES, T2V_DATA_DIR, T2V_DATABASE_URL, the
Hugging Face cache), so no secret travels through the Prefect database and no image is built.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2v.errors import InvalidInput

PROJECT_DIR = Path(__file__).resolve().parent.parent
"""The checkout: where `prefect deploy` runs and the worker runs flows (and relative catalogues start)."""
PREFECT_FILE = PROJECT_DIR / "prefect.yaml"
ENTRYPOINT = "flows/nightly.py:nightly"
GPU_LIMIT = "gpu"
STEP = "deployments.steps.set_concurrency_limit"
"""tasks.stages.GPU_LIMIT (tests/test_deployment.py checks that the two agree): not imported, because
tasks.stages loads the whole engine and `t2v deploy` needs none of it."""


@dataclass(frozen=True)
class NightlyDeployment:
    """The values `t2v deploy` writes into prefect.yaml; the defaults are the committed file's."""

    catalogue: str = "data/templates.toml"
    """The catalogue the scheduled runs read: relative to the checkout (where the flow runs), or absolute."""
    model: str = "tiny"
    """`--model` of the runs: `tiny`, a diffusers folder on the GPU host, or a hub id."""
    cron: str = "0 2 * * *"
    timezone: str = "Europe/Berlin"
    """IANA name; the schedule follows its daylight-saving changes."""
    pool: str = "t2v-gpu"
    """The process work pool the GPU workers poll."""
    gpus: int = 1
    """GPU workers on the pool: the slots of the `gpu` concurrency limit, and with more than one, the night
    is split into that many shards, each scheduled as its own flow run for one worker to take."""

    def __post_init__(self) -> None:
        from prefect.client.schemas.schedules import CronSchedule

        object.__setattr__(self, "catalogue", str(self.catalogue))  # a Path from Python callers
        if not self.catalogue_path.is_file():
            raise InvalidInput(f"`catalogue` has to be a file but {self.catalogue!r} is not one.")
        if self.timezone not in zoneinfo.available_timezones():
            raise InvalidInput(
                f"`timezone` has to be an IANA name such as Europe/Berlin but is {self.timezone!r}."
            )
        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except ValueError as exc:
            raise InvalidInput(f"`cron` is not a valid cron expression: {self.cron!r}.") from exc
        if not isinstance(self.gpus, int) or self.gpus < 1:
            raise InvalidInput(f"`gpus` has to be a whole number of at least 1 but is {self.gpus!r}.")
        if not self.pool or not all(c.isalnum() or c in "-_" for c in self.pool):
            raise InvalidInput(f"`pool` may hold letters, digits, '-' and '_' but is {self.pool!r}.")

    @property
    def catalogue_path(self) -> Path:
        return PROJECT_DIR / self.catalogue  # an absolute catalogue stays itself

    @property
    def worker_command(self) -> str:
        """How to start this pool's worker: one per GPU, taking one flow run at a time."""
        return f"CUDA_VISIBLE_DEVICES=0 prefect worker start --pool {self.pool} --limit 1"

    @classmethod
    def from_file(cls, path: Path = PREFECT_FILE) -> NightlyDeployment:
        """The deployment a prefect.yaml that `render` wrote describes; the defaults if there is no file."""
        return cls(**values_in(path))


def values_in(path: Path) -> dict[str, Any]:
    """NightlyDeployment's values as the prefect.yaml at `path` has them, unchecked; {} if there is none.

    Raises InvalidInput for a file that `render` did not write (its layout is not the one read here).
    """
    import yaml

    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
        (deployment,) = [d for d in data["deployments"] if d["name"] == "nightly"]
        schedule = deployment["schedules"][0]
        (slots,) = [step[STEP]["slots"] for step in data["build"] if STEP in step]
        return {
            "catalogue": deployment["parameters"]["catalogue"],
            "model": deployment["parameters"]["model"],
            "cron": schedule["cron"],
            "timezone": schedule["timezone"],
            "pool": deployment["work_pool"]["name"],
            "gpus": slots,
        }
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise InvalidInput(
            f"`{path}` is not a prefect.yaml that `t2v deploy` wrote ({type(exc).__name__}: {exc}); "
            "apply it with `prefect deploy --all`, or move it aside and run `t2v deploy` again."
        ) from exc


def catalogue_value(path: str) -> str:
    """A `--catalogue` (relative to the current folder) as prefect.yaml keeps it: relative to the checkout
    when inside it, so that the file reads the same on every host; absolute otherwise."""
    resolved = Path(path).expanduser().resolve()
    return str(resolved.relative_to(PROJECT_DIR)) if resolved.is_relative_to(PROJECT_DIR) else str(resolved)


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a YAML double-quoted scalar: safe for any value


def render(spec: NightlyDeployment) -> str:
    """prefect.yaml for `spec`, with the comments that say what each part is for."""
    if spec.gpus == 1:
        schedules = f"      - cron: {_q(spec.cron)}\n        timezone: {_q(spec.timezone)}\n"
    else:
        # One schedule per shard at the same time: N flow runs, each taken by one worker (`--limit 1`),
        # that between them make every clip of the night once.
        schedules = "".join(
            f"      - cron: {_q(spec.cron)}\n        timezone: {_q(spec.timezone)}\n"
            f"        parameters:\n          shard: {_q(f'{i}/{spec.gpus}')}\n"
            for i in range(spec.gpus)
        )
    return f"""\
# t2v's nightly batch as a Prefect deployment. Apply it from this folder, against the server at
# PREFECT_API_URL, with `prefect deploy --all`; the work pool must exist first (a prefect.yaml cannot
# make one): `prefect work-pool create {spec.pool} --type process`. `t2v deploy` does both, after writing
# this file from its options (catalogue, model, cron, timezone, pool, gpus; an option it is not given
# keeps the value below). It rewrites the whole file: other edits survive only `prefect deploy --all`.
name: t2v

build:
  # The folder `prefect deploy` runs in (this checkout): the pull step below runs each flow there.
  - prefect.deployments.steps.run_shell_script:
      id: checkout
      script: pwd
      stream_output: false
  # The `{GPU_LIMIT}` global concurrency limit, one slot per GPU worker: a run holds a slot through its GPU
  # stages (tasks.stages.gpu_slot), so a `generate` sent to this server waits for the night's. A
  # prefect.yaml has no section for global limits; this step creates or updates it.
  - {STEP}:
      name: {_q(GPU_LIMIT)}
      slots: {spec.gpus}

push: null

pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{{{{ checkout.stdout }}}}"

deployments:
  - name: nightly
    entrypoint: {ENTRYPOINT}
    description: "t2v nightly batch: every template of the catalogue, stage by stage"
    tags: ["t2v"]
    parameters:
      catalogue: {_q(spec.catalogue)}
      model: {_q(spec.model)}
    work_pool:
      name: {_q(spec.pool)}
      job_variables: {{}}
    # A night's runs (one per shard) may run together; a late night waits for the one before (ENQUEUE)
    # rather than doubling up on the cards.
    concurrency_limit:
      limit: {spec.gpus}
      collision_strategy: ENQUEUE
    # {_schedules_comment(spec.gpus)}
    schedules:
{schedules}"""


def _schedules_comment(gpus: int) -> str:
    what = "One schedule" if gpus == 1 else f"{gpus} schedules at once, one per shard of the night"
    return f"{what}, in the time zone's local time (daylight saving followed)."


def ensure_pool(name: str) -> bool:
    """Create the process work pool `name` unless it exists (then it is left as it is); True if created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            return False
    return True


class DeployFailed(RuntimeError):
    """`prefect deploy` did not apply the file (the server refused it, the flow did not load...)."""


def apply(path: Path) -> str | None:
    """`prefect deploy --all` of the prefect.yaml at `path`, run in the checkout, without prompts; returns
    the deployment's id as Prefect reports it. Raises DeployFailed with the end of Prefect's output."""
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(path)]
    done = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        # Prefect's output is boxes and colour over many lines; its last lines say what went wrong.
        lines = [line.strip(" │╭╮╰╯─") for line in output.splitlines()]
        raise DeployFailed(" ".join([line for line in lines if line][-3:]))
    found = re.search(r"successfully created with id '([0-9a-f-]+)'", output)
    return found.group(1) if found else None


def deploy(spec: NightlyDeployment, path: Path | None = None) -> str | None:
    """Write `spec`'s prefect.yaml at `path`, make its pool and apply it; the deployment's id.

    `path` None writes a temporary file, leaving the checkout's alone (benchmarks, scripts).
    """
    with tempfile.TemporaryDirectory(prefix="t2v-deploy-") as folder:
        target = path or Path(folder) / "prefect.yaml"
        target.write_text(render(spec))
        ensure_pool(spec.pool)
        return apply(target)
