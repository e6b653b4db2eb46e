"""tasks/stages.py: the GPU slot is a lease-based slot of a global concurrency limit, and only that.

What this cannot show: a kill -9 while holding the slot, then the server's repossessor giving it back
once the lease runs out. The session's test server is an ephemeral one, which runs no repossessor; that
drill needs a real `prefect server start` (see README, "GPU slots").
"""

from __future__ import annotations

import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from tasks.stages import gpu_slot


@pytest.fixture
def gpu_limit(monkeypatch: pytest.MonkeyPatch):
    name = f"gpu-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        monkeypatch.setenv("T2V_GPU_LIMIT", name)
        monkeypatch.setenv("T2V_GPU_LEASE_S", "60")  # the server's minimum
        yield name, client
        client.delete_global_concurrency_limit_by_name(name)


def test_gpu_slot_holds_one_slot_and_gives_it_back(gpu_limit):
    name, client = gpu_limit

    with gpu_slot():
        held = client.read_global_concurrency_limit_by_name(name).active_slots
    after = client.read_global_concurrency_limit_by_name(name).active_slots

    assert (held, after) == (1, 0)


def test_gpu_slot_is_given_back_when_the_stage_fails(gpu_limit):
    name, client = gpu_limit

    with pytest.raises(RuntimeError), gpu_slot():
        raise RuntimeError("a stage that fails")

    assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


def test_no_limit_named_means_no_slot(monkeypatch):
    monkeypatch.delenv("T2V_GPU_LIMIT", raising=False)
    with gpu_slot():
        pass  # no server call at all: nothing to fail
