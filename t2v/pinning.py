"""Page-locked host memory for the weights a stage streams to the card.

The card copies from page-locked ("pinned") host memory at full speed and asynchronously, which is what
lets group offloading fetch the next block while the current one computes. diffusers pins an offloaded
component itself, one `tensor.pin_memory()` at a time: each call allocates a new page-locked block and
copies the tensor into it, so 21 GB of weights cost 21 GB of fresh memory, faulted in page by page, and
a copy (13.2 s for the transformer and VAE on an H100 host, docs/benchmarks.md). `pin_memory()` returns
a tensor that is already page-locked as it is, so pinning the component beforehand makes that a no-op.

`pin_host_tensors` page-locks the memory the weights already occupy (`cudaHostRegister`): no new memory
and no copy. Three kinds of tensor are copied first (`pack_host_tensors`):
- those that lie in a file's memory mapping, as every weight `from_pretrained` loads from safetensors
  does: their pages are the page cache, which the kernel may drop and read again, and registering them
  breaks them into private copies page by page anyway;
- those smaller than `SHARES_PAGES_BELOW`, which the C library may have placed on its heap, where their
  first and last pages also hold other allocations. The driver registers whole pages, and a copy from or
  to a tensor that lies partly in registered pages fails with "invalid argument": registered in place,
  a small tensor (a LoRA adapter's, a bias) would take part of its neighbours' pages with it, such as a
  resident block's adapter weights that are moved to the card next. Larger tensors get a mapping of
  their own, whose pages hold nothing else.
  Both kinds go into one buffer mapped for it alone, which is then registered like any other memory,
  and the file's pages become reclaimable cache again;
- those in a range the driver refuses (memory some other registration covers): they are packed into one
  page-locked buffer.
No buffer comes from PyTorch's page-locked allocator per tensor: it rounds every block up to a power of
two (a 3072 x 14336 bf16 weight, 88 MB, takes 128 MB), ~1.45x the transformer's size in all.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("t2v")

PAGE = mmap.PAGESIZE
PACK_ALIGN = 4096
"""Byte alignment of each tensor in a packed host buffer: page-aligned copies to the card."""
REGISTER_THREADS = 8
"""Ranges registered at once: page-locking is the kernel's work, page by page, and runs in parallel."""
SHARES_PAGES_BELOW = 32 * 2**20
"""glibc's largest mmap threshold: it serves every request from this size up with a mapping of its own;
below it, from its heap, where pages are shared (the threshold moves up to it as mappings are freed)."""


def cuda_register(address: int, nbytes: int) -> bool:
    """Page-lock `nbytes` of host memory at `address` for the current CUDA device; False if refused."""
    return int(torch.cuda.cudart().cudaHostRegister(address, nbytes, 0)) == 0


def cuda_unregister(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)


@dataclass
class HostPin:
    """What `pin_host_tensors` did to one component, undone by `release` when the component is dropped."""

    registered: list[tuple[int, int]] = field(default_factory=list)
    """(page-aligned address, bytes) of each range registered in place."""
    kept: list[torch.UntypedStorage] = field(default_factory=list)
    """The registered ranges' storages (not their tensors, whose data `.to()` may swap). Registered
    memory must outlive its registration: were it freed first, a later allocation at the same address
    would look page-locked while the driver still holds the old pages, and copies from it would read
    those."""
    packed_bytes: int = 0
    """Bytes copied into a page-locked buffer because the driver refused their range."""
    copied_bytes: int = 0
    """Bytes copied into a buffer of their own before registering it: out of file mappings, or small
    tensors whose pages may hold other allocations."""
    seconds: float = 0.0
    unregister: Callable[[int], object] = cuda_unregister

    @property
    def registered_bytes(self) -> int:
        return sum(n for _, n in self.registered)

    def release(self) -> None:
        """Unregister the ranges (the tensors stay valid, in pageable memory) and let go of them."""
        if self.registered and torch.cuda.is_available():
            torch.cuda.synchronize()  # no copy from these pages may still be in flight
        for address, _ in self.registered:
            self.unregister(address)
        self.registered.clear()
        self.kept.clear()


def pinned_buffer(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def pin_host_tensors(
    module: torch.nn.Module,
    *,
    register: Callable[[int, int], bool] = cuda_register,
    unregister: Callable[[int], object] = cuda_unregister,
    allocate: Callable[[int], torch.Tensor] = pinned_buffer,
    is_pinned: Callable[[torch.Tensor], bool] = torch.Tensor.is_pinned,
    mappings: Callable[[], list[tuple[int, int]]] = lambda: file_mappings(),
    shares_pages_below: int = SHARES_PAGES_BELOW,
) -> HostPin:
    """Page-lock the host memory of `module`'s parameters and buffers where it is, after copying those in
    file mappings (`mappings()`) and those under `shares_pages_below` bytes into one buffer of their
    own; what cannot be registered is packed into one page-locked buffer. Values, ties and tensor
    objects are unchanged."""
    start = time.perf_counter()
    host = [t for t in _host_tensors(module).values() if not is_pinned(t)]
    moved = _in_file_mappings(host, mappings())
    moved |= {id(t) for t in host if t.untyped_storage().nbytes() < shares_pages_below}
    copied = pack_host_tensors(module, _anonymous_buffer, only=moved) if moved else 0
    tensors = [t for t in _host_tensors(module).values() if not is_pinned(t)]
    ranges = page_ranges(tensors)
    # Threads of their own, ended here: a refused registration leaves a CUDA error in its host thread's
    # "last error", which a later kernel launch in that thread would report as its own.
    with ThreadPoolExecutor(max_workers=REGISTER_THREADS, thread_name_prefix="t2v-pin") as pool:
        accepted = list(pool.map(lambda r: _accepted(register, r[0], r[1] - r[0]), ranges))
    pin = HostPin(unregister=unregister)
    refused: set[int] = set()
    for (begin, end, members), ok in zip(ranges, accepted, strict=True):
        if ok:
            pin.registered.append((begin, end - begin))
            pin.kept.extend(t.untyped_storage() for t in members)
        else:
            refused.update(id(t) for t in members)
    try:
        if refused:
            pin.packed_bytes = pack_host_tensors(module, allocate, only=refused)
    except BaseException:
        pin.release()  # nothing may stay registered that no pin keeps alive
        raise
    pin.copied_bytes = copied
    pin.seconds = time.perf_counter() - start
    log.info(
        "page-locked %s: %.2f GB registered (%.2f GB of it copied into a buffer of its own first), "
        "%.2f GB packed, %.2f s",
        type(module).__name__,
        pin.registered_bytes / 1e9,
        copied / 1e9,
        pin.packed_bytes / 1e9,
        pin.seconds,
    )
    return pin


def _anonymous_buffer(nbytes: int) -> torch.Tensor:
    """A buffer whose pages hold nothing else (an anonymous mapping of its own, page-aligned), whatever
    its size: `torch.empty` would take a small one from the heap. The tensor keeps the mapping alive."""
    # Private: a shared anonymous mapping is listed as /dev/zero, which `file_mappings` would count.
    return torch.frombuffer(
        mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=torch.uint8
    )


def file_mappings(maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]]:
    """(start, end) of this process's memory mappings backed by a file (empty where /proc is not)."""
    spans = []
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return spans
    for line in lines:
        fields = line.split(maxsplit=5)
        # An inode other than 0 is a file; anonymous memory, the heap and the stacks have none.
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            begin, end = fields[0].split("-")
            spans.append((int(begin, 16), int(end, 16)))
    return spans


def _in_file_mappings(tensors: Iterable[torch.Tensor], spans: list[tuple[int, int]]) -> set[int]:
    """Ids of the tensors whose storage starts inside one of `spans`."""
    if not spans:
        return set()
    spans = sorted(spans)
    starts = [begin for begin, _ in spans]
    found = set()
    for t in tensors:
        address = t.untyped_storage().data_ptr()
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and address < spans[i][1]:
            found.add(id(t))
    return found


def _accepted(register: Callable[[int, int], bool], address: int, nbytes: int) -> bool:
    try:
        return bool(register(address, nbytes))
    except Exception as exc:  # a driver that cannot register at all: the range is packed instead
        log.debug("registering %d bytes at %#x failed: %s", nbytes, address, exc)
        return False


def page_ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int, list[torch.Tensor]]]:
    """The whole pages under `tensors`' storages as (start, end, tensors) ranges, sorted, with ranges that
    share a page merged: the driver registers whole pages, and no page may be registered twice."""
    spans = []
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            begin = storage.data_ptr()
            spans.append((begin // PAGE * PAGE, -(-(begin + storage.nbytes()) // PAGE) * PAGE, t))
    merged: list[tuple[int, int, list[torch.Tensor]]] = []
    for begin, end, tensor in sorted(spans, key=lambda span: span[:2]):  # views of one storage tie
        if merged and begin < merged[-1][1]:
            last = merged[-1]
            merged[-1] = (last[0], max(last[1], end), [*last[2], tensor])
        else:
            merged.append((begin, end, [tensor]))
    return merged


def pack_host_tensors(
    module: torch.nn.Module, allocate: Callable[[int], torch.Tensor], *, only: set[int] | None = None
) -> int:
    """Move `module`'s host parameters and buffers (those whose `id` is in `only`, if given) into one
    buffer from `allocate(nbytes)` (uint8) as views of it, values unchanged and tied weights still tied;
    returns the bytes moved. One buffer, so one allocation and registration instead of one per tensor."""
    found = {k: t for k, t in _host_tensors(module).items() if only is None or k in only}
    offsets, total = {}, 0
    for key, tensor in found.items():
        offsets[key] = total
        total += -(-tensor.numel() * tensor.element_size() // PACK_ALIGN) * PACK_ALIGN
    if not total:
        return 0
    arena = allocate(total)
    views = {}
    for key, tensor in found.items():
        nbytes = tensor.numel() * tensor.element_size()
        view = arena[offsets[key] : offsets[key] + nbytes].view(tensor.dtype).view(tensor.shape)
        views[key] = view.copy_(tensor)
    for owner in module.modules():
        for tensor in owner._parameters.values():
            if tensor is not None and id(tensor) in views:
                tensor.data = views[id(tensor)]  # the Parameter object stays: ties and outside refs hold
        for name, tensor in owner._buffers.items():
            if tensor is not None and id(tensor) in views:
                owner._buffers[name] = views[id(tensor)]
    return total


def _host_tensors(module: torch.nn.Module) -> dict[int, torch.Tensor]:
    """`module`'s non-empty CPU parameters and buffers, each once (tied ones share an entry), by id."""
    found: dict[int, torch.Tensor] = {}
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for tensor in table.values():
                if tensor is not None and tensor.device.type == "cpu" and tensor.numel():
                    found.setdefault(id(tensor), tensor)
    return found
