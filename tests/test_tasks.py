"""tasks/stages.py: a run's GPU stages hold one lease-based slot of the `gpu` limit, given back after them.

What this cannot show: a kill -9 while the slot is held, then the server's repossessor returning it when
the lease runs out. The session's test server is an ephemeral one, which runs no repossessor; that drill
needs a served Prefect (`prefect server start`): tests/test_gpu_slot.py.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext

import tasks.stages
from t2v.context import RunContext
from t2v.jobs import JobSpec
from t2v.pipeline import PIPELINE
from t2v.settings import Settings
from tasks.stages import GPU_LIMIT, TASKS, gpu_slot

JOB = JobSpec(template="owl", prompt="an owl")
ON_CARD = [stage for stage in PIPELINE if stage.on_card]


class _Residency:
    def __init__(self, released: list) -> None:
        self.released = released

    @contextmanager
    def held(self):
        yield
        self.released.append(True)


class _Probe:
    """Stands in for the StageRunner: reports, from inside each task, how many `gpu` slots are taken."""

    def __init__(self, client=None, fail: bool = False) -> None:
        self.client = client
        self.fail = fail
        self.seen: list[int] = []
        self.ran: list[str] = []
        self.released: list[bool] = []
        self.residency = _Residency(self.released)

    def run(self, stage, job: JobSpec) -> str:
        if self.fail:
            raise RuntimeError("a stage that fails")
        self.ran.append(stage.name)
        if self.client is not None:
            self.seen.append(self.client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots)
        return "key"


@pytest.fixture
def client():
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, 1)  # as `t2v deploy --gpus 1`
        yield client
        client.delete_global_concurrency_limit_by_name(GPU_LIMIT)  # the other tests run with no limit


@pytest.fixture
def ctx(tmp_path) -> RunContext:
    return RunContext(
        run_id="r",
        model="tiny",
        outputs_dir=tmp_path,
        settings=Settings(data_dir=tmp_path, database_url="sqlite://"),
    )


@flow(validate_parameters=False)
def _gpu_stages(ctx: RunContext) -> str:
    with gpu_slot(ctx):
        for stage in ON_CARD:
            TASKS[stage.name](JOB, ctx)
    return str(FlowRunContext.get().flow_run.id)


def test_the_gpu_stages_hold_one_slot_from_first_to_last_and_give_it_back(client, ctx, monkeypatch):
    probe = _Probe(client)
    monkeypatch.setattr(tasks.stages, "runner_for", lambda ctx: probe)

    _gpu_stages(ctx)

    # One slot for the run, taken before the first stage and held through the last; the tasks take
    # none of their own (with a limit of 1, a second would have waited forever).
    assert probe.seen == [1] * len(ON_CARD)
    assert client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 0
    assert probe.released == [True]  # the loaded components left the card before the slot was given back


def test_a_failed_gpu_stage_gives_the_slot_back(client, ctx, monkeypatch):
    monkeypatch.setattr(tasks.stages, "runner_for", lambda ctx: _Probe(client, fail=True))

    with pytest.raises(RuntimeError, match="a stage that fails"):
        _gpu_stages(ctx)

    assert client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 0


def test_without_a_limit_on_the_server_the_stages_run_and_still_free_the_card(ctx, monkeypatch):
    probe = _Probe()
    monkeypatch.setattr(tasks.stages, "runner_for", lambda ctx: probe)

    _gpu_stages(ctx)  # a plain `t2v nightly`: no deployment, no limit named `gpu`

    assert probe.ran == [stage.name for stage in ON_CARD] and probe.released == [True]


def test_the_stage_tasks_carry_no_tag_slots():
    # A tag limit on them would make each task take and give back its own lease through the server.
    assert [TASKS[stage.name].tags for stage in PIPELINE] == [set()] * len(PIPELINE)
