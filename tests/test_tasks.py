"""tasks/stages.py: the GPU stages (encode, diffuse, decode) hold a lease-based `gpu` slot and give it back.

What this cannot show: a kill -9 while a slot is held, then the server's repossessor returning it when
the lease runs out. The session's test server is an ephemeral one, which runs no repossessor; that drill
needs a served Prefect (`prefect server start`) and belongs with the deployment test.
"""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.context import TaskRunContext

import tasks.stages
from t2v.context import RunContext
from t2v.jobs import JobSpec
from tasks.stages import decode, diffuse, encode

JOB = JobSpec(template="owl", prompt="an owl")


class _Probe:
    """Stands in for the StageRunner: reports, from inside the task, who holds the `gpu` slots."""

    def __init__(self, client, fail: bool = False) -> None:
        self.client = client
        self.fail = fail

    def _holders(self, job: JobSpec) -> str:
        if self.fail:
            raise RuntimeError("a stage that fails")
        holders = self.client.read_concurrency_limit_by_tag("gpu").active_slots
        return f"{holders}|{TaskRunContext.get().task_run.id}"

    encode = diffuse = decode = _holders


@pytest.fixture
def client():
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=1)
        yield client
        client.delete_concurrency_limit_by_tag("gpu")  # the other tests run with no limit


@flow(validate_parameters=False)
def _in_a_flow(stage, job: JobSpec, ctx: RunContext) -> str:
    return stage(job, ctx)


@pytest.fixture
def ctx(tmp_path) -> RunContext:
    return RunContext(
        run_id="r", model="tiny", data_dir=tmp_path, outputs_dir=tmp_path, database_url="sqlite://"
    )


@pytest.mark.parametrize("stage", [encode, diffuse, decode], ids=["encode", "diffuse", "decode"])
def test_a_gpu_stage_holds_the_slot_as_its_task_run_and_gives_it_back(stage, client, ctx, monkeypatch):
    monkeypatch.setattr(tasks.stages, "runner_for", lambda ctx: _Probe(client))

    holders, task_run_id = _in_a_flow(stage, JOB, ctx).split("|")

    # The holder is the task run: the engine's lease, renewed by this process while the task runs.
    assert holders == f"[UUID('{task_run_id}')]"
    assert client.read_concurrency_limit_by_tag("gpu").active_slots == []


def test_a_failed_gpu_stage_gives_the_slot_back(client, ctx, monkeypatch):
    monkeypatch.setattr(tasks.stages, "runner_for", lambda ctx: _Probe(client, fail=True))

    with pytest.raises(RuntimeError, match="a stage that fails"):
        _in_a_flow(diffuse, JOB, ctx)

    assert client.read_concurrency_limit_by_tag("gpu").active_slots == []
