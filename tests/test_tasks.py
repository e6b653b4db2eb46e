"""tasks/stages.py: a run's GPU stages hold one lease-based slot of the `gpu` limit, given back after them.

What this cannot show: a kill -9 while the slot is held, then the server's repossessor returning it when
the lease runs out. The session's test server is an ephemeral one, which runs no repossessor; that drill
needs a served Prefect (`prefect server start`): tests/test_gpu_slot.py.
"""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext

import t2v.runner
import tasks.stages
from t2v.context import RunContext
from t2v.jobs import JobSpec
from tasks.stages import GPU_LIMIT, decode, diffuse, encode, gpu_slot

JOB = JobSpec(template="owl", prompt="an owl")


class _Probe:
    """Stands in for the StageRunner: reports, from inside each task, how many `gpu` slots are taken."""

    def __init__(self, client, fail: bool = False) -> None:
        self.client = client
        self.fail = fail
        self.seen: list[int] = []

    def _taken(self, job: JobSpec) -> str:
        if self.fail:
            raise RuntimeError("a stage that fails")
        self.seen.append(self.client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots)
        return "key"

    encode = diffuse = decode = _taken


@pytest.fixture
def client():
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, 1)  # as `t2v deploy --gpus 1`
        yield client
        client.delete_global_concurrency_limit_by_name(GPU_LIMIT)  # the other tests run with no limit


@pytest.fixture
def ctx(tmp_path) -> RunContext:
    return RunContext(
        run_id="r", model="tiny", data_dir=tmp_path, outputs_dir=tmp_path, database_url="sqlite://"
    )


@flow(validate_parameters=False)
def _gpu_stages(ctx: RunContext) -> str:
    with gpu_slot():
        for stage in (encode, diffuse, decode):
            stage(JOB, ctx)
    return str(FlowRunContext.get().flow_run.id)


def test_the_gpu_stages_hold_one_slot_from_first_to_last_and_give_it_back(client, ctx, monkeypatch):
    probe = _Probe(client)
    monkeypatch.setattr(tasks.stages, "runner_for", lambda ctx: probe)
    released = []
    monkeypatch.setattr(t2v.runner, "release_components", lambda: released.append(True))

    _gpu_stages(ctx)

    # One slot for the run, taken before the first stage and held through the last; the tasks take
    # none of their own (with a limit of 1, a second would have waited forever).
    assert probe.seen == [1, 1, 1]
    assert client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 0
    assert released == [True]  # the loaded components left the card before the slot was given back


def test_a_failed_gpu_stage_gives_the_slot_back(client, ctx, monkeypatch):
    monkeypatch.setattr(tasks.stages, "runner_for", lambda ctx: _Probe(client, fail=True))
    monkeypatch.setattr(t2v.runner, "release_components", lambda: None)

    with pytest.raises(RuntimeError, match="a stage that fails"):
        _gpu_stages(ctx)

    assert client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 0


def test_without_a_limit_on_the_server_the_stages_run_and_still_free_the_card(ctx, monkeypatch):
    ran, released = [], []

    class Runner:
        def encode(self, job):
            ran.append("encode")

        def diffuse(self, job):
            ran.append("diffuse")

        def decode(self, job):
            ran.append("decode")

    monkeypatch.setattr(tasks.stages, "runner_for", lambda ctx: Runner())
    monkeypatch.setattr(t2v.runner, "release_components", lambda: released.append(True))

    _gpu_stages(ctx)  # a plain `t2v nightly`: no deployment, no limit named `gpu`

    assert ran == ["encode", "diffuse", "decode"] and released == [True]


def test_the_stage_tasks_carry_no_tag_slots():
    # A tag limit on them would make each task take and give back its own lease through the server.
    assert [t.tags for t in (encode, diffuse, decode)] == [set(), set(), set()]
