"""Attention backends: the kernel the transformer's attention runs on, chosen per job.

diffusers sends every attention call of the Wan transformer (`WanAttnProcessor`, self and cross)
through `dispatch_attention_fn`, by a backend name that `ModelMixin.set_attention_backend` sets on all
processors at once: t2v picks the name, diffusers runs the kernel. `JobSpec.attention` is one of:

- `auto` (the default): on a CUDA card, PyTorch's own pick (`sdpa`) unless one of its exact kernels
  (cuDNN, flash, memory-efficient) by name times `MARGIN` faster on the job's self-attention (nearly
  all of the cost: the cross-attention has 512 text tokens), timed once per card, torch release and
  shape in this process (~0.4 s at 720P); off a card, `sdpa`. Exact kernels differ in bf16 rounding
  only, as compiled blocks do: not in the key.
- `sdpa` (PyTorch picks per call), or `cudnn`, `flash`, `efficient` (that kernel, on a card).
- `sage`: SageAttention 2.1.1+ (`SAGE_MIN_VERSION`, CUDA only), Q and K in int8, ~1.4% off exact
  attention: opt-in, never picked by `auto`, and part of the diffuse store key.

No torch or diffusers at import: `t2v.jobs`, and with it `t2v --help`, import this module.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from t2v.errors import InvalidInput

if TYPE_CHECKING:
    import torch

log = logging.getLogger("t2v")

AUTO, SDPA, SAGE = "auto", "sdpa", "sage"
LOSSLESS = ("cudnn", "flash", "efficient")
"""The exact kernels by name."""
MARGIN = 0.05
"""How much faster than `sdpa` a named kernel must time to be taken. Naming one runs each call inside
PyTorch's kernel selection context, which the probe's card-side timing does not see: on the H200 the
cuDNN kernel by name made 720P steps 3% slower than `sdpa`, which dispatches to that same kernel
(bit-identical latents, docs/benchmarks.md)."""
BACKENDS = {SDPA: "native", **{name: f"_native_{name}" for name in LOSSLESS}, SAGE: "sage"}
"""Our names of diffusers' `AttentionBackendName` values."""
_OURS = {value: name for name, value in BACKENDS.items()}
SETTINGS = (AUTO, *BACKENDS)
TIMED_CALLS = 3
RULE = "must be one of " + ", ".join(SETTINGS)
HELP = (
    "Attention kernel: auto (sdpa, or an exact kernel clearly faster on this card for the clip's size), "
    "sdpa, cudnn, flash, efficient; or sage (SageAttention 2.1.1+): lossy (~1.4%), so a new clip."
)


def valid(setting: object) -> bool:
    """Whether `setting` is an `attention` value (`RULE`)."""
    return isinstance(setting, str) and setting in SETTINGS


SAGE_MIN_VERSION = (2, 1, 1)
"""diffusers' `sage` backend needs SageAttention 2.1.1 or later; PyPI's newest release is 1.0.6 (built
from github.com/thu-ml/SageAttention instead)."""


def _version(package: str) -> tuple[int, ...] | None:
    from importlib import metadata

    if importlib.util.find_spec(package) is None:
        return None
    try:
        text = metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def check_installed(setting: str) -> None:
    """Refuse `sage` where its package is missing or too old for diffusers: before any model loads, not
    at the first step."""
    if setting != SAGE:
        return
    found = _version("sageattention")
    if found is None or found < SAGE_MIN_VERSION:
        have = "is not installed here" if found is None else f"is {'.'.join(map(str, found))} here"
        raise InvalidInput(
            f"`attention` 'sage' needs the sageattention package 2.1.1 or later, which {have}; build it "
            "from github.com/thu-ml/SageAttention (CUDA only; PyPI has 1.0.6), or use auto."
        )


def check_device(setting: str, device: str) -> None:
    """Refuse a kernel named explicitly where there is no CUDA card: what was asked for cannot run."""
    if setting not in (AUTO, SDPA) and not device.startswith("cuda"):
        raise InvalidInput(
            f"`attention` {setting!r} runs on a CUDA card only, and this run is on {device}; "
            "use auto or sdpa."
        )


def key_part(setting: str) -> str | None:
    """What the diffuse store key takes: the lossy backend alone (the exact ones change rounding only)."""
    return setting if setting == SAGE else None


@dataclass(frozen=True)
class Shape:
    """One self-attention call of a job at batch 1 (CFG's batch of 2 scales every kernel alike)."""

    tokens: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    """The compute dtype (with fp8 storage the weights' dtype is not the one attention runs in)."""

    @classmethod
    def of(cls, transformer: torch.nn.Module, tokens: int, dtype: torch.dtype) -> Shape:
        """`tokens` video tokens (`diffuse.diffusion_tokens`) at the transformer's heads."""
        config = transformer.config
        return cls(tokens, config.num_attention_heads, config.attention_head_dim, dtype)

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.tokens} tokens x {self.heads} heads x {self.head_dim} ({dtype})"


def cuda_milliseconds(backend: str, shape: Shape, device: str) -> float:
    """One warm-up call (a kernel's first call plans or loads it), then `TIMED_CALLS` timed with CUDA
    events, of `backend` through diffusers' dispatcher on random Q, K and V of `shape`."""
    import torch
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    name = AttentionBackendName(BACKENDS[backend])
    with torch.cuda.device(torch.device(device)):
        size = (1, shape.tokens, shape.heads, shape.head_dim)  # diffusers' layout: (batch, seq, heads, dim)
        q, k, v = (torch.randn(size, device=device, dtype=shape.dtype) for _ in range(3))
        dispatch_attention_fn(q, k, v, backend=name)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TIMED_CALLS):
            dispatch_attention_fn(q, k, v, backend=name)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / TIMED_CALLS


def torch_offers(backend: str) -> bool:
    """Whether this torch build has the kernel and it is not switched off (`torch.backends.cuda`)."""
    import torch

    cuda = torch.backends.cuda
    if backend == SDPA:
        return True
    if backend == "cudnn":
        return torch.backends.cudnn.is_available() and cuda.cudnn_sdp_enabled()
    if backend == "flash":
        return cuda.is_flash_attention_available() and cuda.flash_sdp_enabled()
    return backend == "efficient" and cuda.mem_efficient_sdp_enabled()


def card_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device))


@dataclass(kw_only=True)
class Probe:
    """The fastest lossless backend per (card, torch release, shape), timed once each in this process:
    a night's jobs of one size probe once. Its parts are fields so that a test can give it kernels that
    fail or are missing, and a clock."""

    candidates: Sequence[str] = (SDPA, *LOSSLESS)
    offered: Callable[[str], bool] = torch_offers
    timer: Callable[[str, Shape, str], float] = cuda_milliseconds
    """`timer(backend, shape, device)`: milliseconds a call; raises where the kernel cannot run it."""
    card: Callable[[str], str] = card_name
    _fastest: dict[tuple[str, str, Shape], str] = field(default_factory=dict, repr=False)

    def fastest(self, shape: Shape, device: str) -> str:
        import torch

        key = (self.card(device), torch.__version__, shape)
        if key not in self._fastest:
            self._fastest[key] = self._measure(shape, device, key[0])
        return self._fastest[key]

    def _measure(self, shape: Shape, device: str, card: str) -> str:
        times: dict[str, float] = {}
        notes = []
        for backend in self.candidates:
            if not self.offered(backend):
                notes.append(f"{backend} not in this torch")
                continue
            try:
                times[backend] = self.timer(backend, shape, device)
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot run this shape is no candidate
                notes.append(f"{backend} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
                continue
            notes.append(f"{backend} {times[backend]:.2f} ms")
        best = min(times, key=times.__getitem__) if times else SDPA
        if SDPA in times and times[best] > (1 - MARGIN) * times[SDPA]:
            best = SDPA  # PyTorch's own pick, unless a named kernel is clearly faster
        log.info("attention on %s, %s: %s; taking %s", card, shape, ", ".join(notes) or "no kernel", best)
        return best


PROBE = Probe()


def resolve(setting: str, shape: Shape, device: str, *, probe: Probe = PROBE) -> str:
    """The backend a job's `attention` setting means on `device` for `shape` (never `auto`)."""
    check_device(setting, device)
    if setting != AUTO:
        return setting
    return probe.fastest(shape, device) if device.startswith("cuda") else SDPA


def current(module: torch.nn.Module) -> str:
    """The backend `module`'s attention runs on now: its processors' (diffusers sets them all at once),
    or where none is set diffusers' process-wide active one (`DIFFUSERS_ATTN_BACKEND`, default native)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    processors = (getattr(m, "processor", None) for m in module.modules())
    chosen = next((p._attention_backend for p in processors if hasattr(p, "_attention_backend")), None)
    if chosen is None:
        chosen = _AttentionBackendRegistry.get_active_backend()[0]
    value = AttentionBackendName(chosen).value
    return _OURS.get(value, value)


def apply(module: torch.nn.Module, backend: str) -> bool:
    """Put `module` on `backend` unless it is on it already (with compiled blocks a change recompiles
    them); True where it changed. Offloading hooks and step caches wrap the blocks' forwards, not the
    processors, so they keep calling the one set here."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    if current(module) == backend:
        return False
    process_wide = _AttentionBackendRegistry.get_active_backend()[0]
    module.set_attention_backend(BACKENDS[backend])
    # diffusers also makes it every module's default; a job's kernel stays the job's transformer's.
    _AttentionBackendRegistry.set_active_backend(process_wide)
    log.info("attention: %s (diffusers' %s backend)", backend, BACKENDS[backend])
    return True


def use(module: torch.nn.Module, setting: str, shape: Shape, device: str, *, probe: Probe = PROBE) -> str:
    """Resolve a job's setting for `shape` and put `module` on that backend; returns its name, for the
    attempt's row in the run log."""
    backend = resolve(setting, shape, device, probe=probe)
    apply(module, backend)
    return backend
