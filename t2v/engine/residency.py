"""Residency: the components a run has loaded, the next one loading in the background, their
page-locked host memory, and freeing them.

One component is on the card at a time (stage-major order). `prefetch` loads the next stage's
component in a loader thread while the current stage runs, and page-locks its host copy in threads of
their own (`PINNING_AHEAD`), so that the next load need not wait for it; its stage then only has to
place it on the card. A component a stage loads itself is loaded only once the one before
it is gone: its references dropped, its page-locked ranges unregistered and PyTorch's cache of
page-locked blocks emptied, so that two components never share a small host's memory.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch

from t2v.hostmem import probe_host
from t2v.pinning import HostPin, pin_host_tensors
from t2v.plans import HOST_RESERVE

log = logging.getLogger("t2v")

PINNING_AHEAD = 2
"""Components page-locked at once: the next stage's and the one after it, which the runner loads ahead
together (`StageRunner.prefetch`)."""

PREFETCH_ROOM = 1.0
"""Host memory a prefetch wants free beside the stage running, as a multiple of the component's size
(plus `HOST_RESERVE` for that stage): one copy. The files' pages it is read from are page cache, which
the budget counts as room (`t2v.hostmem`)."""


def host_has_room(
    name: str, size_bytes: int, budget_gib: float | None = None, *, streaming_bytes: int = 0
) -> bool:
    """Whether the host budget (its free memory, its cgroup's limit, or `budget_gib`: `t2v.hostmem`)
    has `PREFETCH_ROOM` times `size_bytes`, and the reserve, left for loading `name` ahead, beside the
    `streaming_bytes` of components held mapped (`HostPlacement.MAPPED`)."""
    need = PREFETCH_ROOM * size_bytes + HOST_RESERVE
    # Not the page cache: a stage running beside it may be streaming its weights from there. Nor the
    # file pages a mapped component streams from, which the budget shows as free while they are
    # uncharged (another group's cache) or not yet read: a page-locked copy loaded beside such a
    # stage takes the memory its weights come through.
    free = probe_host(budget_gib, page_cache_is_room=False).budget_bytes - streaming_bytes
    if free < need:
        log.info(
            "not prefetching %s: %.1f GiB of host memory free (%.1f GiB more streamed by the stage "
            "running), %.1f wanted",
            name,
            max(free, 0) / 2**30,
            streaming_bytes / 2**30,
            need / 2**30,
        )
        return False
    return True


class Residency:
    """Components loaded by one run, kept between the tasks of a stage; one on the card at a time."""

    def __init__(
        self,
        *,
        pin: Callable[[torch.nn.Module], HostPin | None] | None = None,
        empty_host_cache: Callable[[], None] | None = None,
    ) -> None:
        self._held: dict[str, tuple[str, torch.nn.Module]] = {}
        self._ahead: dict[str, tuple[str, Future]] = {}
        self._loads: dict[str, Future] = {}
        """Per component loaded ahead: its load in the loader thread (`_ahead` holds its page-locking)."""
        self._decided: dict[str, Future[bool]] = {}
        """Per component loaded ahead: whether the loader found the host's room for it."""
        self._pins: dict[str, HostPin] = {}
        """Page-locked host memory of the components held, given back at their drop."""
        self._releasing: list[Future] = []
        self._loader: ThreadPoolExecutor | None = None
        self._pinner: ThreadPoolExecutor | None = None
        self._load_lock = threading.Lock()
        self._pin = pin or _pin_if_card
        self._empty_host_cache = empty_host_cache or _empty_host_cache

    def get(
        self, name: str, tag: str, load: Callable[[], torch.nn.Module], *, source: str | None = None
    ) -> torch.nn.Module:
        """Component `name` as placed for `tag`, loaded (after dropping the others) if it is not.

        `source`: the model whose copy loaded ahead `load` takes (`prefetched`), if any. A copy loaded
        ahead already has its room, so the stage waits neither for the dropped component's page-locked
        memory to be given back nor for what the loader thread queued before that; the loader gives
        it back beside the stage."""
        held = self._held.get(name)
        if held and held[0] == tag:
            return held[1]
        # Stage-major order: the previous stage's component leaves the card, and the host, before this
        # one comes.
        self.drop()
        if not self._loaded_ahead(name, source):
            self.settle()
        module = load()
        self._held[name] = (tag, module)
        return module

    def loading(self) -> threading.Lock:
        """Held around every component load, in the loader thread and on a stage's path alike:
        `from_pretrained` is not thread-safe. accelerate's `init_empty_weights` and transformers' init
        contexts patch `nn.Module` methods process-wide while a model is built, so a model built in one
        thread while another loads comes out with its parameters on the meta device."""
        return self._load_lock

    def _loaded_ahead(self, name: str, source: str | None) -> bool:
        """Whether the loader thread found the room for `source`'s `name` and loaded it (or is loading
        it): no room to make for it. Not yet decided, or refused: the stage may load it itself."""
        ahead, decided = self._ahead.get(name), self._decided.get(name)
        if source is None or ahead is None or ahead[0] != source or decided is None or not decided.done():
            return False
        return decided.exception() is None and decided.result()

    def settle(self) -> None:
        """Wait until every dropped component's page-locked memory is given back, and PyTorch's cache of
        page-locked blocks is empty: what a load that needs the host's room waits for."""
        for release in self._releasing:
            release.result()
        self._releasing.clear()
        self._empty_host_cache()

    def pin(self, name: str, module: torch.nn.Module) -> None:
        """Page-lock the host tensors of component `name` (`t2v.pinning`), unless it is page-locked
        already. Where a prefetched copy was page-locked and the plan's preparation replaced its tensors
        (fp8 storage casts them), that copy is given back first: one page-locked copy at a time."""
        old = self._pins.get(name)
        if old is not None:
            if all(t.is_pinned() for t in _cpu_tensors(module)):
                return
            self._pins.pop(name).release()
        pin = self._pin(module)
        if pin is not None:
            self._pins[name] = pin

    def unpin(self, name: str) -> None:
        """Give back component `name`'s page-locked memory now: once its weights are all on the card,
        the host copy only takes room."""
        pin = self._pins.pop(name, None)
        if pin is not None:
            pin.release()
            self._empty_host_cache()

    def prefetch(
        self,
        name: str,
        source: str,
        load: Callable[[], torch.nn.Module],
        room: Callable[[], bool] = lambda: True,
    ) -> None:
        """Start loading component `name` of model `source` (and pinning its host copy) in the
        background, unless it is loaded or on its way. The loader thread first asks `room()` (after the
        loads queued before it) and loads nothing if it says no."""
        held = self._held.get(name)
        ahead = self._ahead.get(name)
        if (held and held[0].startswith(f"{source}|")) or (ahead and ahead[0] == source):
            return
        decided: Future[bool] = Future()
        self._decided[name] = decided
        loaded = self._loads[name] = self._background().submit(self._load_ahead, load, room, decided)
        self._ahead[name] = (source, self._pinning().submit(self._pin_loaded, loaded))

    def prefetching(self, name: str, source: str) -> bool:
        """Whether component `name` of `source` is loaded ahead (or loading): waits for the loader thread
        to decide whether the host has the room, not for the load."""
        ahead = self._ahead.get(name)
        if ahead is None or ahead[0] != source:
            return False
        try:
            return self._decided[name].result()
        except Exception:
            return False

    def host_bytes(self, *, but: str | None = None) -> int:
        """Page-locked host memory held for components other than `but`: room again once dropped."""
        return sum(pin.registered_bytes + pin.packed_bytes for name, pin in self._pins.items() if name != but)

    def _background(self) -> ThreadPoolExecutor:
        """The one thread that loads components ahead and gives back their page-locked memory."""
        if self._loader is None:
            self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t2v-prefetch")
        return self._loader

    def _pinning(self) -> ThreadPoolExecutor:
        """The threads that page-lock what the loader thread loaded, `PINNING_AHEAD` components at a
        time, so that the next load does not wait for the last one's page-locking."""
        if self._pinner is None:
            self._pinner = ThreadPoolExecutor(max_workers=PINNING_AHEAD, thread_name_prefix="t2v-pin-ahead")
        return self._pinner

    def prefetched(
        self, name: str, source: str, while_waiting: Callable[[], None] | None = None
    ) -> torch.nn.Module | None:
        """The component `prefetch` loaded (waiting for it if still loading), once; None if it was not
        asked for, not loaded, or its load failed (the stage then loads it itself and meets the error).

        `while_waiting` is called first if the load is still going: work the stage needs later, done
        while it would sit idle."""
        ahead = self._ahead.pop(name, None)
        self._loads.pop(name, None)
        if ahead is None or ahead[0] != source:
            return None
        if while_waiting is not None and not ahead[1].done():
            while_waiting()
        try:
            module, pin = ahead[1].result()
        except Exception as exc:
            log.warning("prefetching %s failed (%s: %s); loading it now", name, type(exc).__name__, exc)
            self.settle()  # the stage's own load needs the room `get` did not wait for
            return None
        if pin is not None:
            self._pins[name] = pin
        return module

    def drop(self, name: str | None = None) -> None:
        """Let go of component `name` (None: all), its page-locked memory, and what the card cached."""
        for key in [name] if name else list(self._held):
            self._held.pop(key, None)
        for key in [name] if name else list(self._pins):
            pin = self._pins.pop(key, None)
            if pin is not None:
                # Host work that the next stage need not wait for (0.1-0.3 s a component on the
                # H200): the pin keeps the memory allocated until its ranges are unregistered.
                self._releasing.append(self._background().submit(self._give_back, pin))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def holds(self, name: str) -> bool:
        """Whether `name` is loaded (placed, or prefetched and not yet taken)."""
        return name in self._held or name in self._ahead

    @property
    def loaded(self) -> list[str]:
        """Names of the components held now (for tests and the log)."""
        return list(self._held)

    def forget_prefetched(self) -> None:
        """Wait for loads in flight and let go of what nobody took; wait for page-locked memory still
        being given back."""
        for load in self._loads.values():
            load.cancel()  # one not started is never made (its page-locking then fails, cancelled)
        self._loads.clear()
        for _, future in self._ahead.values():
            if future.cancel() or future.exception() is not None:
                continue  # not started, or failed (for a stage not run); else it waited for the load
            _, pin = future.result()
            if pin is not None:
                pin.release()
        self._ahead.clear()
        self.settle()

    def release(self) -> None:
        """Free every component (weights on the card, pinned host copies) and stop the loader thread:
        when a run's GPU stages are over and the card goes to someone else."""
        self.forget_prefetched()
        self.drop()
        self.settle()
        for pool in (self._pinner, self._loader):
            if pool is not None:
                pool.shutdown(wait=True)
        self._loader = self._pinner = None

    @contextmanager
    def held(self) -> Iterator[None]:
        """Around a run's GPU stages: what the process holds when they start is frozen out of the
        garbage collector until they end, and every component they loaded is released at the end.

        Each change of component collects the dropped one's reference cycles (diffusers' hooks), which
        a full `gc.collect()` finds only by walking every object the process tracks: ~0.5 M after the
        imports, 0.34-0.59 s a collection on the H200 host, four times a night (0.3 s on a 2-core CPU
        host, where it takes under 1 ms once those are frozen). What is frozen stays alive until the
        end, so garbage that still holds card memory is collected first."""
        if torch.cuda.is_available() and torch.cuda.memory_allocated() > 0:
            gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            try:
                self.release()
            finally:
                gc.unfreeze()

    def _give_back(self, pin: HostPin) -> None:
        # And the cache's blocks (a packed buffer) with it: a stage that took a prefetched copy did
        # not wait for this, so no `settle` empties the cache after it.
        pin.release()
        self._empty_host_cache()

    def _load_ahead(
        self, load: Callable[[], torch.nn.Module], room: Callable[[], bool], decided: Future[bool]
    ) -> torch.nn.Module | None:
        """`load()` in the loader thread, or nothing where `room()` says the host lacks the room."""
        try:
            fits = room()
        except BaseException as exc:
            decided.set_exception(exc)
            raise
        decided.set_result(fits)
        return load() if fits else None

    def _pin_loaded(self, loaded: Future) -> tuple[torch.nn.Module | None, HostPin | None]:
        """The loaded component with its host tensors page-locked (`t2v.pinning`), so that the card
        copies from them at full speed and group offloading has nothing left to pin in the stage's
        time. Page-locking 10 GB takes about a second (docs/benchmarks.md): in the loader thread the
        next component's load waited for it."""
        module = loaded.result()
        return module, (self._pin(module) if module is not None else None)


def _pin_if_card(module: torch.nn.Module) -> HostPin | None:
    return pin_host_tensors(module) if torch.cuda.is_available() else None


def _empty_host_cache() -> None:
    # Blocks that PyTorch's page-locked allocator handed out (group offloading's staging, a packed
    # buffer) stay page-locked in its cache after they are freed, unless emptied.
    if torch.cuda.is_available():
        torch._C._host_emptyCache()


def _cpu_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module.parameters(), *module.buffers()) if t.device.type == "cpu" and t.numel()]
