import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

from t2v import vram
from t2v.errors import InvalidInput
from t2v.vram import GIB, DeviceMemory, PeakMemory, physical_device, probe, visible_devices


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(vram.BUDGET_ENV, raising=False)


# -- CUDA_VISIBLE_DEVICES mapping ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", []),
        ("3,5", ["3", "5"]),
        (" 3 , 5 ", ["3", "5"]),
        ("1,-1,2", ["1"]),
        ("0,bogus,1", ["0"]),
        ("GPU-8f1c,MIG-aa11", ["GPU-8f1c", "MIG-aa11"]),
    ],
)
def test_visible_devices_parses_like_cuda(value: str | None, expected: list[str] | None) -> None:
    assert visible_devices(value) == expected


def test_physical_device_maps_visible_index_to_physical() -> None:
    assert physical_device(0, None) == 0
    assert physical_device(2, None) == 2
    assert physical_device(0, "3,5") == 3
    assert physical_device(1, "3,5") == 5
    assert physical_device(0, "GPU-5a7b-11") == "GPU-5a7b-11"
    assert physical_device(1, "2,GPU-5a7b-11") == "GPU-5a7b-11"


@pytest.mark.parametrize(("index", "value"), [(2, "3,5"), (0, ""), (1, "1,-1,2"), (-1, None)])
def test_physical_device_rejects_invisible_index(index: int, value: str | None) -> None:
    with pytest.raises(LookupError):
        physical_device(index, value)


# -- probe on this machine (no NVIDIA driver) ---------------------------------------------------


def _has_nvml() -> bool:
    try:
        nvml = vram._import_pynvml()
        nvml.nvmlInit()
    except Exception:
        return False
    nvml.nvmlShutdown()
    return True


needs_no_gpu = pytest.mark.skipif(_has_nvml(), reason="checks the no-driver path")


@needs_no_gpu
def test_probe_without_driver_plans_for_cpu() -> None:
    mem = probe()
    assert mem.device == "cpu"
    assert mem.name == "cpu"
    assert mem.source == "none"
    assert mem.total_bytes == psutil.virtual_memory().total
    assert 0 < mem.free_bytes <= mem.total_bytes
    assert mem.budget_bytes == mem.free_bytes
    assert "NVML" in mem.note and "CPU" in mem.note


@needs_no_gpu
def test_probe_without_driver_ignores_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    mem = probe(budget_gib=4)
    assert (mem.device, mem.source) == ("cpu", "none")
    assert "budget of 4 GiB is ignored" in mem.note
    monkeypatch.setenv(vram.BUDGET_ENV, "6.5")
    assert "6.5 GiB is ignored" in probe().note


def test_probe_rejects_bad_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="positive"):
        probe(budget_gib=0)
    monkeypatch.setenv(vram.BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="T2V_VRAM_BUDGET_GB"):
        probe()
    # Read through the settings' own reader: the same error, a user's InvalidInput, for every bad value.
    assert vram.BUDGET_ENV == "T2V_VRAM_BUDGET_GB"
    for bad in ("lots", "0", "-2"):
        monkeypatch.setenv(vram.BUDGET_ENV, bad)
        with pytest.raises(InvalidInput, match="T2V_VRAM_BUDGET_GB"):
            probe()


def test_probe_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(vram, "_import_pynvml", missing)
    mem = probe()
    assert (mem.device, mem.source) == ("cpu", "none")
    assert "pynvml is not installed" in mem.note


# -- probe against a stand-in NVML ---------------------------------------------------------------


class _FakeNVMLError(Exception):
    pass


def _fake_nvml(gpus: dict[int, tuple[str, str, int, int]]) -> SimpleNamespace:
    """Physical index -> (uuid, name, total, free), answering like pynvml."""
    calls: list[str] = []

    def by_index(i: int) -> int:
        calls.append(f"index:{i}")
        if i not in gpus:
            raise _FakeNVMLError("Invalid Argument")
        return i

    def by_uuid(uuid: str) -> int:
        calls.append(f"uuid:{uuid}")
        for i, gpu in gpus.items():
            if gpu[0] == uuid:
                return i
        raise _FakeNVMLError("Not Found")

    return SimpleNamespace(
        NVMLError=_FakeNVMLError,
        calls=calls,
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=by_index,
        nvmlDeviceGetHandleByUUID=by_uuid,
        nvmlDeviceGetUUID=lambda h: gpus[h][0],
        nvmlDeviceGetName=lambda h: gpus[h][1].encode(),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(
            total=gpus[h][2], free=gpus[h][3], used=gpus[h][2] - gpus[h][3]
        ),
    )


# NVML numbers GPUs 0..n-1; the odd ones out make a wrong mapping show.
GPUS = {i: (f"GPU-{i}{i}{i}{i}0000", "NVIDIA A10", 24 * GIB, 20 * GIB) for i in range(6)}
GPUS[3] = ("GPU-3333bbbb", "NVIDIA L4", 24 * GIB, 10 * GIB)
GPUS[5] = ("GPU-5555cccc", "NVIDIA T4", 16 * GIB, 15 * GIB)


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    fake = _fake_nvml(GPUS)
    monkeypatch.setattr(vram, "_import_pynvml", lambda: fake)
    return fake


def test_probe_reads_nvml(fake_nvml: SimpleNamespace) -> None:
    mem = probe()
    assert mem == DeviceMemory("cuda:0", "NVIDIA A10", 24 * GIB, 20 * GIB, "nvml")
    assert fake_nvml.calls[-1] == "shutdown"


def test_probe_honours_cuda_visible_devices(
    fake_nvml: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    first, second = probe(device_index=0), probe(device_index=1)
    assert (first.device, first.name, first.free_bytes) == ("cuda:0", "NVIDIA L4", 10 * GIB)
    assert (second.device, second.name, second.free_bytes) == ("cuda:1", "NVIDIA T4", 15 * GIB)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5555cccc")
    assert probe().name == "NVIDIA T4"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3333")  # CUDA takes a unique prefix
    assert probe().name == "NVIDIA L4"


def test_probe_falls_back_to_cpu_for_an_invisible_gpu(
    fake_nvml: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    mem = probe()
    assert (mem.device, mem.source) == ("cpu", "none")
    assert "no cuda:0" in mem.note
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # not installed
    assert "physical GPU 7" in probe().note
    assert fake_nvml.calls.count("init") == fake_nvml.calls.count("shutdown")


def test_probe_budget_caps_free_memory(fake_nvml: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    capped = probe(budget_gib=8)
    assert (capped.source, capped.free_bytes, capped.budget_bytes) == ("budget", 8 * GIB, 8 * GIB)
    assert capped.total_bytes == 24 * GIB
    assert "20.00 GiB free" in capped.note

    roomy = probe(budget_gib=100)  # a budget never adds memory the card does not have free
    assert (roomy.source, roomy.free_bytes) == ("budget", 20 * GIB)

    monkeypatch.setenv(vram.BUDGET_ENV, "2.5")
    assert probe().free_bytes == int(2.5 * GIB)
    assert probe(budget_gib=3).free_bytes == 3 * GIB  # explicit beats the environment


# -- PeakMemory ----------------------------------------------------------------------------------


def test_peak_memory_sees_rss_of_a_short_lived_array() -> None:
    baseline = psutil.Process().memory_info().rss / GIB
    with PeakMemory("cpu") as peak:
        block = np.ones(200 * 2**20, dtype=np.uint8)  # ones, not zeros: pages must be touched
        time.sleep(0.15)
        del block
        time.sleep(0.1)
    assert peak.rss_gib is not None and peak.rss_gib - baseline >= 0.15
    assert peak.wall_s is not None and peak.wall_s >= 0.25
    assert (peak.allocated_gib, peak.reserved_gib, peak.nvml_gib) == (None, None, None)


def test_peak_memory_catches_a_spike_between_samples() -> None:
    # Freed before exit: only the sampling thread can have seen it.
    baseline = psutil.Process().memory_info().rss / GIB
    with PeakMemory("cpu", interval_s=0.01) as peak:
        block = np.ones(200 * 2**20, dtype=np.uint8)
        time.sleep(0.1)
        del block
    after = psutil.Process().memory_info().rss / GIB
    assert peak.rss_gib is not None
    assert peak.rss_gib - baseline >= 0.15
    assert peak.rss_gib - after >= 0.15


def test_peak_memory_cuda_device_on_a_cpu_machine() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only path")
    with PeakMemory() as peak:
        pass
    assert (peak.allocated_gib, peak.reserved_gib, peak.nvml_gib) == (None, None, None)
    assert isinstance(peak.rss_gib, float) and peak.rss_gib > 0
    assert isinstance(peak.wall_s, float)


def test_peak_memory_records_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="oom"):
        with PeakMemory("cpu") as peak:
            raise RuntimeError("oom")
    assert peak.rss_gib is not None and peak.wall_s is not None
    assert peak._thread is None


def test_peak_memory_rejects_bad_interval() -> None:
    with pytest.raises(ValueError):
        PeakMemory("cpu", interval_s=0)


def test_peak_memory_cuda_wiring(fake_nvml: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: stand in for torch.cuda to check which device is reset, read and sampled.
    torch = pytest.importorskip("torch")
    reset: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset.append)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda i: 4 * GIB)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with PeakMemory("cuda:1", interval_s=0.01) as peak:
        time.sleep(0.05)
    assert reset == [1]
    assert (peak.allocated_gib, peak.reserved_gib) == (3.0, 4.0)
    assert peak.nvml_gib == 1.0  # physical GPU 5: 16 GiB total, 15 free
    assert "index:5" in fake_nvml.calls
    assert fake_nvml.calls.count("init") == fake_nvml.calls.count("shutdown")
