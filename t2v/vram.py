"""What memory the device offers before a stage, and what the stage used.

`probe` answers the planner's question (how many bytes may a plan use) without importing
torch or creating a CUDA context, which would itself take a few hundred MiB of the GPU it
measures. `PeakMemory` wraps a stage and records its peaks for the run log.
"""

import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, Self

import psutil

from t2v.hostmem import cgroup_usage, own_cgroups
from t2v.settings import VRAM_BUDGET_ENV, read_vram_budget

__all__ = [
    "BUDGET_ENV",
    "GIB",
    "DeviceMemory",
    "PeakMemory",
    "hold_to_budget",
    "open_nvml",
    "physical_device",
    "probe",
    "uncapped",
    "visible_devices",
]

GIB = 2**30
BUDGET_ENV = VRAM_BUDGET_ENV


@dataclass(frozen=True)
class DeviceMemory:
    """Free and total memory of the device a stage will use."""

    device: str
    name: str
    total_bytes: int
    free_bytes: int
    source: str
    note: str = ""
    cap_bytes: int | None = None
    """The budget asked for ($T2V_VRAM_BUDGET_GB), which `hold_to_budget` makes PyTorch keep to."""

    @property
    def budget_bytes(self) -> int:
        """What a plan may use."""
        return self.free_bytes


def visible_devices(cuda_visible_devices: str | None) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES as CUDA reads them; None when every GPU is visible.

    CUDA stops at the first entry it cannot parse and ignores the rest, so "1,-1,2" exposes
    only GPU 1, and an empty value hides every GPU.
    """
    if cuda_visible_devices is None:
        return None
    entries: list[str] = []
    for raw in cuda_visible_devices.split(","):
        entry = raw.strip()
        if entry.isdigit() or entry.startswith(("GPU-", "MIG-")):
            entries.append(entry)
        else:
            break
    return entries


def physical_device(device_index: int, cuda_visible_devices: str | None) -> int | str:
    """The NVML identity of the CUDA device `device_index` as this process sees it.

    Returns a physical index for NVML's nvmlDeviceGetHandleByIndex, or a UUID (GPU-... or
    MIG-...) for a UUID entry. Raises LookupError when no such device is visible.

    A numeric entry matches NVML's (PCI bus) order only when CUDA_DEVICE_ORDER=PCI_BUS_ID or
    the GPUs are all alike; CUDA's default order puts the fastest first. Mixed-GPU hosts should
    set CUDA_DEVICE_ORDER=PCI_BUS_ID or list UUIDs.
    """
    if device_index < 0:
        raise LookupError(f"device index {device_index} is negative")
    entries = visible_devices(cuda_visible_devices)
    if entries is None:
        return device_index
    if device_index >= len(entries):
        raise LookupError(
            f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} makes {len(entries)} GPU(s) visible; "
            f"there is no cuda:{device_index}"
        )
    entry = entries[device_index]
    return int(entry) if entry.isdigit() else entry


def _import_pynvml() -> ModuleType:
    # The "pynvml" distribution is a deprecated shim over nvidia-ml-py that warns on import;
    # the module it ends up importing is the same, so the warning is noise for our users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import pynvml

    return pynvml


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes.
    return value.decode() if isinstance(value, bytes) else value


def _nvml_handle(nvml: ModuleType, target: int | str) -> Any:
    if isinstance(target, int):
        return nvml.nvmlDeviceGetHandleByIndex(target)
    try:
        return nvml.nvmlDeviceGetHandleByUUID(target)
    except nvml.NVMLError:
        # CUDA accepts any unique prefix of a UUID; NVML wants the whole one.
        matches = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            if _text(nvml.nvmlDeviceGetUUID(handle)).startswith(target):
                matches.append(handle)
        if len(matches) != 1:
            raise
        return matches[0]


def _cpu_memory(note: str) -> DeviceMemory:
    vm = psutil.virtual_memory()
    return DeviceMemory(
        device="cpu", name="cpu", total_bytes=vm.total, free_bytes=vm.available, source="none", note=note
    )


def probe(*, device_index: int = 0, budget_gib: float | None = None) -> DeviceMemory:
    """Free and total memory of cuda:`device_index`, or of the CPU when there is no usable GPU.

    `budget_gib` (else $T2V_VRAM_BUDGET_GB, in GiB despite the name) caps the free memory, to
    plan for a smaller card than the one present or to leave room for another process.
    Never raises for a missing driver or GPU: the answer is then the CPU with system RAM and a
    note saying why.
    """
    if budget_gib is None:
        budget_gib = read_vram_budget(os.environ)
    if budget_gib is not None and budget_gib <= 0:
        raise ValueError(f"a VRAM budget must be positive, not {budget_gib} GiB")
    ignored = f"; the VRAM budget of {budget_gib:g} GiB is ignored" if budget_gib is not None else ""

    try:
        nvml = _import_pynvml()
    except ImportError as e:
        return _cpu_memory(f"pynvml is not installed ({e}); planning for the CPU{ignored}")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        return _cpu_memory(f"no NVIDIA driver found (NVML: {e}); planning for the CPU{ignored}")
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            target = physical_device(device_index, visible)
        except LookupError as e:
            return _cpu_memory(f"{e}; planning for the CPU{ignored}")
        try:
            handle = _nvml_handle(nvml, target)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = _text(nvml.nvmlDeviceGetName(handle))
        except nvml.NVMLError as e:
            shown = f"physical GPU {target}" if isinstance(target, int) else target
            return _cpu_memory(f"NVML cannot read {shown} (NVML: {e}); planning for the CPU{ignored}")
    finally:
        nvml.nvmlShutdown()

    device = f"cuda:{device_index}"
    total, free = int(info.total), int(info.free)
    if budget_gib is None:
        return DeviceMemory(device=device, name=name, total_bytes=total, free_bytes=free, source="nvml")
    budget = int(budget_gib * GIB)
    note = f"budget of {budget_gib:g} GiB; NVML reports {free / GIB:.2f} GiB free of {total / GIB:.2f} GiB"
    return DeviceMemory(
        device=device,
        name=name,
        total_bytes=total,
        free_bytes=min(free, budget),
        source="budget",
        note=note,
        cap_bytes=budget,
    )


_CAPS: dict[int, float] = {}
"""Per-process memory fractions set by `hold_to_budget`, by CUDA device index."""


def hold_to_budget(memory: DeviceMemory) -> None:
    """Make PyTorch's allocator keep to the budget on that card, as a card of that size would: a run
    planned for 8 GiB on an 80 GB card then also runs out of memory where an 8 GiB card would, and
    falls back the same way. Without a budget, a cap an earlier run of this process set is lifted."""
    if not memory.device.startswith("cuda"):
        return
    import torch

    index = torch.device(memory.device).index or 0
    if memory.cap_bytes is None:
        if _CAPS.pop(index, None) is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
        return
    fraction = min(1.0, memory.cap_bytes / memory.total_bytes)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    _CAPS[index] = fraction


_UNCAP_LOCK = threading.Lock()
_UNCAP_HOLDERS: dict[int, int] = {}
"""Threads inside `uncapped` per device: a component prefetched in a background thread may be built
while the stage's own component is; the cap comes back when the last of them leaves."""


@contextmanager
def uncapped() -> Iterator[None]:
    """Lift `hold_to_budget`'s cap on the current CUDA device while inside, then put it back.

    For building the random-weight benchmark model, which is initialised on the card in fp32 (23 GB
    for the text encoder) before it is cast and moved to host memory, where a real model is read from
    disk: neither is part of what a budget plans for."""
    import torch

    index = torch.cuda.current_device() if torch.cuda.is_available() else -1
    if _CAPS.get(index) is None:
        yield
        return
    with _UNCAP_LOCK:
        if not _UNCAP_HOLDERS.get(index):
            torch.cuda.set_per_process_memory_fraction(1.0, index)
        _UNCAP_HOLDERS[index] = _UNCAP_HOLDERS.get(index, 0) + 1
    try:
        yield
    finally:
        with _UNCAP_LOCK:
            _UNCAP_HOLDERS[index] -= 1
            fraction = _CAPS.get(index)
            if not _UNCAP_HOLDERS[index] and fraction is not None:
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(fraction, index)


def open_nvml(torch_index: int) -> tuple[ModuleType, Any] | None:
    """NVML, initialised, and the handle of CUDA device `torch_index` as this process sees it; None
    without pynvml, a driver or that device. The caller calls `nvmlShutdown()` when done."""
    try:
        nvml = _import_pynvml()
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return None
    try:
        target = physical_device(torch_index, os.environ.get("CUDA_VISIBLE_DEVICES"))
        return nvml, _nvml_handle(nvml, target)
    except (LookupError, nvml.NVMLError):
        nvml.nvmlShutdown()
        return None


class PeakMemory:
    """Context manager measuring a stage's peaks: torch CUDA peak allocated/reserved (reset at entry),
    the highest NVML-seen used memory on that GPU (sampled by a daemon thread every `interval_s`
    while inside), and the peak RSS of this process (sampled likewise with psutil; ru_maxrss is
    lifetime so not usable per stage).

    After exit: `allocated_gib`, `reserved_gib`, `nvml_gib` (None without CUDA / NVML),
    `rss_gib` and `wall_s`. Works on a CPU-only machine. The torch counters are global to the
    device, so nesting two of these on one GPU resets the outer one's peaks.

    Sampling misses spikes shorter than `interval_s`; the NVML figure counts every process on
    the GPU, which is what matters for whether the next stage fits.
    """

    def __init__(self, device: str = "cuda:0", *, interval_s: float = 0.05) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        self.device = str(device)
        self.interval_s = interval_s
        self.allocated_gib: float | None = None
        self.reserved_gib: float | None = None
        self.nvml_gib: float | None = None
        self.rss_gib: float | None = None
        self.cgroup_gib: float | None = None
        self.wall_s: float | None = None
        self._torch_index: int | None = None
        self._nvml: ModuleType | None = None
        self._nvml_handle: Any = None
        self._peak_rss = 0
        self._peak_nvml = 0
        self._peak_cgroup = 0
        self._cgroups = own_cgroups()[:1]
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def __enter__(self) -> Self:
        self.allocated_gib = self.reserved_gib = self.nvml_gib = self.rss_gib = self.wall_s = None
        self.cgroup_gib = None
        self._peak_rss = self._peak_nvml = self._peak_cgroup = 0
        if self.device.startswith("cuda"):
            self._start_cuda()
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="t2v-peak-memory", daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()
        self.rss_gib = self._peak_rss / GIB
        self.cgroup_gib = self._peak_cgroup / GIB if self._peak_cgroup else None
        if self._nvml is not None:
            self.nvml_gib = self._peak_nvml / GIB
            self._nvml.nvmlShutdown()
            self._nvml = self._nvml_handle = None
        if self._torch_index is not None:
            import torch

            self.allocated_gib = torch.cuda.max_memory_allocated(self._torch_index) / GIB
            self.reserved_gib = torch.cuda.max_memory_reserved(self._torch_index) / GIB
            self._torch_index = None

    def _start_cuda(self) -> None:
        # torch is imported only for CUDA devices: a CPU stage should not pay for the import.
        import torch

        if not torch.cuda.is_available():
            return
        index = torch.device(self.device).index
        self._torch_index = torch.cuda.current_device() if index is None else index
        # Before CUDA is initialised torch refuses the reset ("Invalid device argument"), and
        # there is nothing to reset: the peaks then count from the body's first allocation.
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats(self._torch_index)
        # Without NVML the torch peaks are still worth having.
        opened = open_nvml(self._torch_index)
        if opened is not None:
            self._nvml, self._nvml_handle = opened

    def _sample(self) -> None:
        try:
            self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
        except psutil.Error:
            pass
        used = cgroup_usage(self._cgroups) if self._cgroups else None
        if used is not None:
            self._peak_cgroup = max(self._peak_cgroup, used)
        if self._nvml is not None:
            try:
                used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)
            except self._nvml.NVMLError:
                return
            self._peak_nvml = max(self._peak_nvml, used)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()
