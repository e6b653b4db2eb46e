"""Host memory: the cgroup-aware budget, where a component's weights wait on the host (pinned or mapped),
and a dropped component really gone before the next loads. No GPU here: the driver's registration is a
recorder; the loads, file mappings and bookkeeping are real."""

import gc
import logging
import threading
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from t2v.engine.residency import Residency
from t2v.hostmem import CgroupMemory, probe_host
from t2v.models import tiny
from t2v.pinning import HostPin, file_mappings, pin_host_tensors
from t2v.placement import apply
from t2v.plans import HOST_RESERVE, HostPlacement, Placement, StagePlan, host_need, host_placement, with_host

GiB = 2**30


def _in_files(module: torch.nn.Module) -> int:
    """Parameters of `module` whose memory lies in a file mapping."""
    spans = file_mappings()
    return sum(any(a <= p.data_ptr() < b for a, b in spans) for p in module.parameters())


@pytest.fixture(scope="module")
def saved_transformer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("weights") / "transformer"
    tiny.build_transformer().save_pretrained(folder)
    return folder


def test_a_cgroup_budget_counts_its_page_cache_as_room(tmp_path: Path) -> None:
    group = tmp_path / "night"
    group.mkdir()
    (group / "memory.max").write_text(f"{16 * GiB}\n")
    (group / "memory.current").write_text(f"{12 * GiB}\n")
    (group / "memory.stat").write_text(f"anon {5 * GiB}\nactive_file {4 * GiB}\ninactive_file {3 * GiB}\n")

    budget = probe_host(cgroups=[CgroupMemory(group, 2)])

    # 16 - 12 used, of which 7 is file pages the kernel drops before it kills anything.
    assert budget.source == "cgroup" and budget.budget_bytes == 11 * GiB
    assert "7.0 of it page cache" in budget.note
    # A second copy beside weights streamed from that cache must not count on it.
    assert probe_host(cgroups=[CgroupMemory(group, 2)], page_cache_is_room=False).budget_bytes == 4 * GiB
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{8 * GiB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{6 * GiB}\n")
    (v1 / "memory.stat").write_text(f"cache 1\ntotal_active_file {GiB}\ntotal_inactive_file 0\n")
    assert probe_host(cgroups=[CgroupMemory(v1, 1)]).budget_bytes == 3 * GiB


def test_the_host_plan_is_pinned_where_the_component_fits_else_mapped_and_named_so() -> None:
    assert host_placement(10 * GiB, 10 * GiB + HOST_RESERVE) is HostPlacement.PINNED
    assert host_placement(10 * GiB, 10 * GiB + HOST_RESERVE - 1) is HostPlacement.MAPPED
    group = StagePlan("diffuse", Placement.GROUP, block_bytes=300 * 2**20, blocks=30)
    pinned, cpu = with_host(
        [group, StagePlan("diffuse", Placement.CPU, device="cpu")], HostPlacement.PINNED, GiB
    )
    (mapped,) = with_host([group], HostPlacement.MAPPED, 10 * GiB)

    assert pinned.name == "diffuse:group" and mapped.name == "diffuse:group-mapped"
    assert pinned.residency_key != mapped.residency_key  # a mapped copy is not a pinned one
    assert host_need(pinned) == GiB + HOST_RESERVE
    assert host_need(mapped) == HOST_RESERVE + 2 * 300 * 2**20  # staging for two blocks, not the weights
    assert cpu.host is HostPlacement.PINNED and cpu.component_bytes == 0  # no card: nothing streams


def test_pinning_weights_loaded_from_safetensors_copies_them_out_of_the_file_first(saved_transformer):
    transformer = WanTransformer3DModel.from_pretrained(saved_transformer)
    before = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    assert _in_files(transformer) == len(before)  # from_pretrained maps the file; nothing is copied
    registered = []

    pin = pin_host_tensors(
        transformer,
        register=lambda address, nbytes: registered.append((address, nbytes)) or True,
        unregister=lambda address: None,
        is_pinned=lambda t: False,
    )

    # Registered memory is anonymous: the file's pages are page cache again, which the kernel may drop.
    assert _in_files(transformer) == 0 and pin.packed_bytes == 0
    assert pin.copied_bytes >= sum(p.numel() * p.element_size() for p in transformer.parameters())
    assert all(torch.equal(p, before[n]) for n, p in transformer.named_parameters())
    for p in transformer.parameters():
        assert any(a <= p.data_ptr() < a + n for a, n in registered)


def test_a_mapped_plan_streams_the_weights_from_the_files_without_a_copy(saved_transformer):
    transformer = WanTransformer3DModel.from_pretrained(saved_transformer).eval()
    plan = with_host([StagePlan("diffuse", Placement.LEAF, device="cpu")], HostPlacement.MAPPED, 1)[0]
    pins = []

    apply(plan, transformer, pin=pins.append)
    latents = torch.randn(1, transformer.config.in_channels, 3, 4, 6)
    with torch.no_grad():
        transformer(latents, torch.tensor([500.0]), torch.randn(1, 16, transformer.config.text_dim))

    assert pins == [] and _in_files(transformer) > 0  # still the file's pages after a forward


def test_a_dropped_component_is_gone_before_the_next_one_loads() -> None:
    events: list[str] = []

    def pin(module: torch.nn.Module) -> HostPin:
        return HostPin(
            registered=[(id(module), 4096)], unregister=lambda address: events.append("unregister")
        )

    residency = Residency(pin=pin, empty_host_cache=lambda: events.append("empty cache"))
    encoder = residency.get("text_encoder", "tag", tiny.build_text_encoder)
    residency.pin("text_encoder", encoder)
    assert residency.host_bytes() == 4096 and residency.host_bytes(but="text_encoder") == 0
    gone = weakref.ref(encoder)
    del encoder

    def load_next() -> torch.nn.Module:
        gc.collect()
        # No reference left anywhere, its page-locked range given back, then PyTorch's pinned cache emptied.
        assert gone() is None
        # (The loader thread empties it after giving the range back; the stage's settle once more.)
        assert events[-3:] == ["unregister", "empty cache", "empty cache"]
        events.append("load")
        return tiny.build_transformer()

    residency.get("transformer", "tag", load_next)
    assert events[-1] == "load" and residency.loaded == ["transformer"] and residency.host_bytes() == 0


def test_a_stage_taking_a_prefetched_copy_does_not_wait_for_the_dropped_one_to_be_given_back() -> None:
    gate, events = threading.Event(), []

    def unregister(address: int) -> None:
        gate.wait(timeout=10)  # the loader thread's give-back, held until the stage has its component
        events.append("unregister")

    residency = Residency(
        pin=lambda module: HostPin(registered=[(id(module), 4096)], unregister=unregister),
        empty_host_cache=lambda: events.append("empty cache"),
    )
    encoder = residency.get("text_encoder", "tiny|encode", tiny.build_text_encoder, source="tiny")
    residency.pin("text_encoder", encoder)
    events.clear()  # its own load settled first: nothing was loaded ahead
    ahead = torch.nn.Linear(4, 4)
    residency.prefetch("transformer", "tiny", lambda: ahead)
    assert residency.prefetching("transformer", "tiny") is True
    taken = residency.get(
        "transformer", "tiny|diffuse", lambda: residency.prefetched("transformer", "tiny"), source="tiny"
    )
    assert taken is ahead and events == []  # the encoder's range is still being given back
    gate.set()
    residency.settle()
    assert events == ["unregister", "empty cache", "empty cache"]
    # Another model's copy, or none loaded ahead: the stage loads it itself, after the give-back.
    gate.clear()
    threading.Timer(0.2, gate.set).start()
    load = lambda: events.append("load") or torch.nn.Linear(2, 2)  # noqa: E731
    residency.get("vae", "tiny|decode", load, source="other")
    assert events[3:] == ["unregister", "empty cache", "empty cache", "load"]
    residency.release()


def test_the_next_component_loads_while_the_last_one_is_being_page_locked() -> None:
    gate, loads = threading.Event(), []
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(3, 3)

    def pin(module: torch.nn.Module) -> HostPin:
        if module is first:
            gate.wait(timeout=5)  # a slow page-locking (about a second for 10 GB on the H200 host)
            loads.append("text_encoder page-locked")
        return HostPin(registered=[(id(module), 4096)], unregister=lambda address: None)

    residency = Residency(pin=pin, empty_host_cache=lambda: None)
    residency.prefetch("text_encoder", "tiny", lambda: loads.append("text_encoder") or first)
    residency.prefetch("transformer", "tiny", lambda: loads.append("transformer") or second)
    assert residency.prefetched("transformer", "tiny") is second  # loaded and page-locked meanwhile
    assert loads == ["text_encoder", "transformer"]
    gate.set()
    assert residency.prefetched("text_encoder", "tiny") is first
    assert loads == ["text_encoder", "transformer", "text_encoder page-locked"]
    assert residency.host_bytes() == 2 * 4096  # each with its own page-locked copy
    residency.release()
    assert residency.host_bytes() == 0


def test_a_load_ahead_that_has_not_started_when_the_run_ends_is_never_made() -> None:
    gate, loads = threading.Event(), []

    def slow() -> torch.nn.Module:
        gate.wait(timeout=5)
        loads.append("text_encoder")
        return torch.nn.Linear(2, 2)

    residency = Residency(pin=lambda module: None, empty_host_cache=lambda: None)
    residency.prefetch("text_encoder", "tiny", slow)
    residency.prefetch("transformer", "tiny", lambda: loads.append("transformer") or torch.nn.Linear(2, 2))
    threading.Timer(0.2, gate.set).start()
    residency.release()  # the run's jobs all failed: nobody takes either
    assert loads == ["text_encoder"]


def test_a_prefetched_copy_recast_by_its_plan_is_given_back_before_the_new_one_is_pinned() -> None:
    released: list[int] = []
    pins: list[torch.nn.Module] = []

    def pin(module: torch.nn.Module) -> HostPin:
        pins.append(module)
        return HostPin(registered=[(len(pins), 4096)], unregister=released.append)

    residency = Residency(pin=pin, empty_host_cache=lambda: None)
    module = torch.nn.Linear(4, 4)
    residency.prefetch("transformer", "tiny", lambda: module)
    assert residency.prefetching("transformer", "tiny") is True
    taken = residency.get("transformer", "tag", lambda: residency.prefetched("transformer", "tiny"))
    assert taken is module and released == []

    residency.pin("transformer", taken)  # its tensors are not page-locked (no card): as after an fp8 cast
    assert released == [1] and len(pins) == 2 and residency.host_bytes() == 4096
    residency.release()
    assert released == [1, 2]


def test_a_prefetch_without_room_loads_nothing_and_says_so() -> None:
    loads = []
    residency = Residency(pin=lambda module: None, empty_host_cache=lambda: None)
    residency.prefetch("transformer", "tiny", lambda: loads.append(1) or torch.nn.Linear(2, 2), lambda: False)
    assert residency.prefetching("transformer", "tiny") is False
    assert residency.prefetched("transformer", "tiny") is None and loads == []
    residency.release()


def test_a_prefetch_leaves_the_host_memory_a_mapped_stage_streams_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The 12 GiB night on the GPU machine: the transformer's prefetch, decided at the night's start,
    # pinned 9.3 GiB while the text encoder streamed mapped beside it (its file pages uncharged,
    # another group's cache, so the budget showed them free) until the OOM killer ended the night.
    from t2v.context import RunContext
    from t2v.engine import StageRunner
    from t2v.engine import runner as runner_module
    from t2v.engine.residency import host_has_room
    from t2v.hostmem import HostMemory
    from t2v.pipeline.decode import STAGE as DECODE
    from t2v.pipeline.diffuse import STAGE as DIFFUSE
    from t2v.pipeline.encode import STAGE as ENCODE
    from t2v.runlog import RunLog
    from t2v.settings import Settings

    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'runs.db'}")
    run_id = RunLog(settings.runlog_url).start_run(kind="generate", model="tiny")
    runner = StageRunner(
        RunContext(run_id=run_id, model="tiny", outputs_dir=tmp_path / "out", settings=settings)
    )
    monkeypatch.setattr(StageRunner, "device", property(lambda self: "cuda:0"))  # decided as for a card
    encoder_bytes = runner.sizes("text_encoder")[1]
    monkeypatch.setattr(
        runner_module, "probe_host", lambda budget: HostMemory(8 * GiB, encoder_bytes // 2, "cgroup")
    )
    assert runner.mapped_bytes(ENCODE) == 0  # nothing before the first stage
    # Before the encoder is loaded: its placement is decided then (mapped), and counted.
    assert runner.mapped_bytes(DIFFUSE) == encoder_bytes
    assert runner.host_placement("text_encoder") is HostPlacement.MAPPED
    runner.component(ENCODE, StagePlan("encode", Placement.CPU, device="cpu"))
    assert runner.mapped_bytes(DIFFUSE) == encoder_bytes
    # The VAE's prefetch also leaves the transformer's: at this budget it streams mapped too.
    assert runner.mapped_bytes(DECODE) == encoder_bytes + runner.sizes("transformer")[1]
    runner.residency.drop("text_encoder")
    assert runner.mapped_bytes(DIFFUSE) == 0  # done with: the diffuse stage's component may be prefetched

    assert host_has_room("transformer", GiB // 8, budget_gib=2)  # 0.125 GiB + the 1.5 GiB reserve
    with caplog.at_level(logging.INFO, logger="t2v"):
        assert not host_has_room("transformer", GiB // 8, budget_gib=2, streaming_bytes=GiB)
    assert "1.0 GiB more streamed by the stage running" in caplog.text
