"""How much host memory a run may use: the smaller of what the host has free and what its cgroup
(a container, a Kubernetes pod, a systemd slice) still allows, or $T2V_RAM_BUDGET_GB.

`psutil.virtual_memory().available` reports the host's free memory, not the container's limit: on a
GPU host with 125 GiB free, a process in a 16 GiB cgroup saw room for a prefetch that was not there, and
was OOM-killed. The cgroup's own files say how much is left: cgroup v2 `memory.max` - `memory.current`
(and `memory.peak`), v1 `memory.limit_in_bytes` - `memory.usage_in_bytes`, at every level from the
process's group up to the root, the tightest winning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

GIB = 2**30
CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 2**60
"""v1 reports "no limit" as a page-rounded 2^63 - 1; anything this large is none."""


@dataclass(frozen=True)
class CgroupMemory:
    """One cgroup's memory files (v2: memory.max/current/peak; v1: limit/usage/max_usage)."""

    folder: Path
    version: int

    def _read(self, name: str) -> int | None:
        try:
            raw = (self.folder / name).read_text().strip()
        except OSError:
            return None
        if raw == "max" or not raw.isdigit() or int(raw) >= _NO_LIMIT:
            return None
        return int(raw)

    @property
    def limit(self) -> int | None:
        return self._read("memory.max" if self.version == 2 else "memory.limit_in_bytes")

    @property
    def usage(self) -> int | None:
        return self._read("memory.current" if self.version == 2 else "memory.usage_in_bytes")

    @property
    def peak(self) -> int | None:
        return self._read("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")

    @property
    def page_cache(self) -> int:
        """Bytes of file pages in the usage (memory.stat's active and inactive file): the kernel drops
        them before it kills anything, so they are room, not load. The weights `from_pretrained` maps
        from safetensors are such pages until something copies them."""
        prefix = "" if self.version == 2 else "total_"
        try:
            lines = (self.folder / "memory.stat").read_text().splitlines()
        except OSError:
            return 0
        stat = dict(line.split(maxsplit=1) for line in lines if " " in line)
        return sum(int(stat.get(f"{prefix}{kind}_file", "0").strip() or 0) for kind in ("active", "inactive"))


def own_cgroups(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT
) -> list[CgroupMemory]:
    """This process's memory cgroup and its ancestors, innermost first (empty where there is none)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (root / "cgroup.controllers").exists():
            return _chain(root, path, version=2)
        if "memory" in controllers.split(","):
            return _chain(root / "memory", path, version=1)
    return []


def _chain(mount: Path, path: str, *, version: int) -> list[CgroupMemory]:
    # Inside a container the mount usually is the container's own group, and the path named in
    # /proc/self/cgroup (the host's view) does not exist below it: then the mount itself is the group.
    folder = mount / path.lstrip("/")
    chain = []
    while True:
        if folder.is_dir():
            chain.append(CgroupMemory(folder, version))
        if folder == mount or mount not in folder.parents:
            break
        folder = folder.parent
    return chain or [CgroupMemory(mount, version)]


@dataclass(frozen=True)
class HostMemory:
    """What a plan may use of the host's memory now, and where that figure comes from."""

    total_bytes: int
    budget_bytes: int
    source: str
    """"budget" ($T2V_RAM_BUDGET_GB), "cgroup" (a limit tighter than the host's free memory), "host"."""
    note: str = ""

    @property
    def budget_gib(self) -> float:
        return self.budget_bytes / GIB


def probe_host(
    budget_gib: float | None = None,
    cgroups: list[CgroupMemory] | None = None,
    *,
    page_cache_is_room: bool = True,
) -> HostMemory:
    """The host budget now: `budget_gib` if given (capped by what is free), else the tighter of the
    host's available memory and every enclosing cgroup's limit minus its usage (less its page cache,
    unless `page_cache_is_room` is False: room for a second copy beside weights streamed from there)."""
    vm = psutil.virtual_memory()
    free, source, note = vm.available, "host", f"{vm.available / GIB:.1f} GiB available on the host"
    for group in own_cgroups() if cgroups is None else cgroups:
        limit, usage = group.limit, group.usage
        if limit is None or usage is None:
            continue
        cache = min(group.page_cache, usage) if page_cache_is_room else 0
        if limit - usage + cache < free:
            free, source = max(limit - usage + cache, 0), "cgroup"
            note = (
                f"cgroup v{group.version} {group.folder}: {usage / GIB:.1f} of {limit / GIB:.1f} GiB used, "
                f"{cache / GIB:.1f} of it page cache"
            )
    if budget_gib is not None:
        return HostMemory(
            vm.total, min(int(budget_gib * GIB), free), "budget", f"budget of {budget_gib:g} GiB; {note}"
        )
    return HostMemory(vm.total, free, source, note)


def cgroup_usage(cgroups: list[CgroupMemory] | None = None) -> int | None:
    """Bytes the innermost memory cgroup holds now (what its limit is measured against)."""
    groups = own_cgroups() if cgroups is None else cgroups
    return groups[0].usage if groups else None
