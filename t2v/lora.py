"""LoRA styles per template (issue 18): what a job asks for, its checks, and the adapters' life in a run.

A job's `lora` is a tuple of `Lora(path, scale)` (a catalogue's `lora = [{ path = "...", scale = 0.8 }]`,
relative to the catalogue file; `t2v generate --lora PATH[:SCALE]`). Everything about the files goes
through diffusers: `WanLoraLoaderMixin.lora_state_dict` reads them and converts the ComfyUI, Kohya and
musubi key layouts; `load_lora_adapter` injects them into the transformer; `set_adapters` picks a job's.

In a run (the diffuse stage, `t2v.pipeline.diffuse`): each file is one adapter named by its content
hash, injected into the freshly loaded transformer before any plan's preparation, offloading hook,
page-locking or compile sees it (`load`), so that group offloading streams the adapter weights with
their blocks; between jobs only `activate` runs (`set_adapters`, or `disable_lora` for a job without).
Adapters are never fused into the shared weights, so templates cannot leak into each other; by default
each adapted layer folds its active adapters into a copy of its weight for each call
(`t2v.lora_fuse`, $T2V_LORA_FUSE), which spares the unmerged products' passes over the activations.

Nothing here imports torch, diffusers or safetensors at import time: `t2v.jobs` imports this module,
and `t2v --help` imports `t2v.jobs`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from t2v.errors import InvalidInput

if TYPE_CHECKING:
    import torch

MAX_SCALE = 4.0
"""A scale outside [-MAX_SCALE, MAX_SCALE] is refused: beyond it a style is noise, not a style."""

PREFIX = "transformer"
"""What `lora_state_dict` puts before the transformer's keys (diffusers' `TRANSFORMER_NAME`)."""


@dataclass(frozen=True)
class Lora:
    """One LoRA file a job applies, and how strongly."""

    path: str
    """The safetensors file (absolute once the catalogue or the CLI has read it)."""
    scale: float = 1.0
    """Its weight in `set_adapters`; 1 is the strength it was trained at."""


def coerce(value: object) -> object:
    """A job's `lora` as the catalogue (tables), the CLI (`PATH[:SCALE]`) or a re-run's JSON (dicts)
    give it, as a tuple of `Lora`; what cannot be read is left as given for `check` to name."""
    if value is None:
        return ()
    if isinstance(value, Lora | str | dict):
        value = [value]
    if not isinstance(value, list | tuple):
        return value
    out: list[object] = []
    for item in value:
        if isinstance(item, str):
            item = parse(item)
        elif isinstance(item, dict) and set(item) <= {"path", "scale"} and "path" in item:
            item = Lora(path=item["path"], scale=item.get("scale", 1.0))
        out.append(item)
    return tuple(out)


def parse(text: str) -> Lora:
    """`PATH[:SCALE]`: the part after the last `:` is the scale when it reads as a number."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return Lora(path=path, scale=float(scale))
        except ValueError:
            pass
    return Lora(path=text)


def relative_to(value: object, folder: Path) -> object:
    """A catalogue's `lora` with relative paths made relative to the catalogue's folder."""
    loras = coerce(value)
    if not isinstance(loras, tuple):
        return loras
    return tuple(
        Lora(path=str((folder / item.path).resolve()), scale=item.scale)
        if isinstance(item, Lora) and isinstance(item.path, str) and item.path.strip()
        else item
        for item in loras
    )


# --- checks at input time ------------------------------------------------------------------------


def check(loras: object) -> None:
    """Raise InvalidInput naming `lora` unless every entry is a readable LoRA for the Wan transformer
    with a scale in range. Reads each file's tensors (diffusers converts the layout); no model loads."""
    if not isinstance(loras, tuple) or not all(isinstance(item, Lora) for item in loras):
        _bad(loras, 'must be a list of tables such as { path = "style.safetensors", scale = 0.8 }')
    seen: dict[str, str] = {}
    for item in loras:
        if not isinstance(item.path, str) or not item.path.strip():
            _bad(item.path, "needs a `path` to a .safetensors file")
        scale = item.scale
        if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale):
            _bad(scale, f"scale of {item.path} must be a number between -{MAX_SCALE:g} and {MAX_SCALE:g}")
        if not -MAX_SCALE <= scale <= MAX_SCALE:
            _bad(scale, f"scale of {item.path} must be between -{MAX_SCALE:g} and {MAX_SCALE:g}")
        path = Path(item.path)
        if not path.is_file():
            _bad(item.path, "file not found")
        _check_file(path)
        name = adapter_name(item.path)
        if name in seen:
            _bad(item.path, f"is the same file as {seen[name]}: list a file once")
        seen[name] = item.path


def _check_file(path: Path) -> None:
    try:
        keys = tuple(_converted(str(path.resolve()), *_version(path)))
    except InvalidInput:
        raise
    except Exception as exc:  # safetensors' and diffusers' own errors: a file they cannot read
        _bad(str(path), f"is not a LoRA diffusers can read ({type(exc).__name__}: {_first_line(exc)})")
    unknown = sorted(
        k for k in keys if not k.startswith(f"{PREFIX}.") or _module_of(k) not in _wan_module_patterns()
    )
    if unknown:
        _bad(
            str(path),
            f"is not a LoRA for the Wan2.2 transformer: {len(unknown)} of {len(keys)} keys match none of "
            f"its layers (first: {unknown[0]})",
        )


def _version(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _converted(path: str, size: int, mtime_ns: int) -> dict[str, tuple[int, ...]]:
    """The file's keys after diffusers' conversion and their shapes, once per version of the file in
    this process."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as exc:
        _bad(path, f"is not a safetensors file ({_first_line(exc)})")
    state = state_dict(path)
    if not state:
        _bad(path, "holds no tensors")
    if not all("lora" in key for key in state):
        _bad(path, "is not a LoRA: its keys do not name lora_A/lora_B (or lora_down/lora_up) weights")
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def check_fits(loras: tuple[Lora, ...], transformer: Any) -> None:
    """Raise InvalidInput naming `lora` unless each file's layers are layers of `transformer` (the
    model's, built on the meta device: no weights) with the features the file's matrices take. A LoRA
    of another Wan (a 14B one: 40 blocks of 5120 features) passes `check`, which knows layer names
    only, and would otherwise fail only once the transformer is loaded."""
    modules = dict(transformer.named_modules())
    for item in {adapter_name(item.path): item for item in loras}.values():
        shapes = _converted(str(Path(item.path).resolve()), *_version(Path(item.path)))
        missing = sorted({_target(k) for k in shapes} - set(modules))
        if missing:
            _bad(
                item.path,
                f"does not fit this model's transformer: it has no layer {missing[0]} ({len(missing)} of the "
                f"file's {len({_target(k) for k in shapes})} layers are missing)",
            )
        for key, shape in shapes.items():
            module = modules[_target(key)]
            side = "A" if ".lora_A." in key else "B" if ".lora_B." in key else None
            if side is None or not key.endswith(".weight") or len(shape) != 2:
                continue
            features = getattr(module, "in_features" if side == "A" else "out_features", None)
            given = shape[1] if side == "A" else shape[0]
            if isinstance(features, int) and features != given:
                way = "in" if side == "A" else "out"
                _bad(
                    item.path,
                    f"does not fit this model's transformer: its layer {_target(key)} has {features} "
                    f"features {way}, the file's lora_{side} {given}",
                )


def _module_of(key: str) -> str:
    """`transformer.blocks.3.attn1.to_q.lora_A.weight` -> `blocks.N.attn1.to_q`."""
    name = key.removeprefix(f"{PREFIX}.")
    name = re.sub(r"\.lora_[AB](\.[^.]+)?\.(weight|bias)$|\.lora_magnitude_vector.*$", "", name)
    return re.sub(r"^blocks\.\d+\.", "blocks.N.", name)


@functools.cache
def _wan_module_patterns() -> frozenset[str]:
    """The Wan2.2 transformer's module names, block indices as `N` (from its config on the meta device)."""
    import torch
    from diffusers import WanTransformer3DModel

    from t2v.models.wan22 import FULL_SIZE

    kwargs = dict(FULL_SIZE["transformer"]["kwargs"], num_layers=1)
    with torch.device("meta"):
        model = WanTransformer3DModel(**kwargs)
    return frozenset(re.sub(r"^blocks\.\d+\.", "blocks.N.", n) for n, _ in model.named_modules() if n)


def _bad(value: object, rule: str) -> None:
    raise InvalidInput(f"`lora` {rule} but is {value!r}.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- what the files are ---------------------------------------------------------------------------


def file_digest(path: str | Path) -> str:
    """SHA-256 of the file's bytes, read once per version of it (path, size, mtime) in this process."""
    return _digest(str(Path(path).resolve()), *_version(Path(path)))


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def adapter_name(path: str | Path) -> str:
    """The adapter's name in the transformer: from the file's content, so one file is one adapter
    whatever its path, and an edited file is another."""
    return f"lora_{file_digest(path)[:16]}"


def key_part(loras: tuple[Lora, ...]) -> list[str]:
    """What a job's LoRAs add to its diffuse key: each file's hash and scale, in order."""
    return [f"{file_digest(item.path)}:{float(item.scale)!r}" for item in loras]


def state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors in diffusers' layout (`transformer.<module>.lora_A.weight`), converted by
    diffusers from ComfyUI/Kohya (`diffusion_model.`) and musubi (`lora_unet_`) layouts."""
    from diffusers.loaders import WanLoraLoaderMixin

    return WanLoraLoaderMixin.lora_state_dict(str(path), use_safetensors=True)


def adapter_bytes(loras: Iterable[Lora], element_bytes: int) -> int:
    """Bytes the adapters add to the transformer as loaded, from the files' headers: through diffusers
    (`inject_adapter_in_model`, which does not upcast them as a `PeftModel` would) peft gives them their
    base layer's dtype, `element_bytes` each (bf16 beside bf16 weights), whatever the file stores."""
    from safetensors import safe_open

    total = 0
    for item in {adapter_name(item.path): item for item in loras}.values():
        with safe_open(str(item.path), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape()) * element_bytes
    return total


# --- in a run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """One LoRA file as an adapter of the transformer: its name (content hash) and where it is."""

    name: str
    path: str

    @classmethod
    def of(cls, item: Lora) -> Adapter:
        return cls(name=adapter_name(item.path), path=str(item.path))


def load(module: Any, adapters: Iterable[Adapter]) -> None:
    """Inject each adapter not yet in `module` through diffusers' `load_lora_adapter`, left inactive.

    Call it on the freshly loaded transformer, before any wrapper, offloading hook, page-locking or
    compile: group offloading records each group's tensors (and their page-locked copies) when it is
    applied, so adapter weights added after it would never reach the card."""
    loaded = getattr(module, "peft_config", {})
    names = {name for name, _ in module.named_modules()}
    for adapter in adapters:
        if adapter.name in loaded:
            continue
        state = state_dict(adapter.path)
        missing = sorted({_target(k) for k in state} - names)
        if missing:  # diffusers only warns about keys that match nothing
            raise InvalidInput(
                f"`lora` {adapter.path} does not fit this transformer: no layer {missing[0]} "
                f"({len(missing)} of its layers are missing)."
            )
        module.load_lora_adapter(state, adapter_name=adapter.name, prefix=PREFIX)
        loaded = module.peft_config
    if getattr(module, "peft_config", None):
        from t2v import lora_fuse

        lora_fuse.install(module)  # the adapted layers' folded forward, before any compile traces them
        module.disable_lora()  # until a job asks for its own


def activate(module: Any, loras: tuple[Lora, ...], *, device: torch.device | str, fold: bool = True) -> None:
    """Make exactly the job's adapters active, at its scales; none for a job without a LoRA. `fold`:
    each layer folds them into its weight per call (`t2v.lora_fuse`, its scales on `device`, where the
    layers compute), else peft's unmerged forward."""
    if not getattr(module, "peft_config", None):
        if loras:
            raise RuntimeError("the transformer holds no adapters; `load` must run before its placement")
        return
    if not loras:
        module.disable_lora()
        return
    from t2v import lora_fuse

    lora_fuse.set_folding(module, fold)
    module.enable_lora()
    names = [adapter_name(item.path) for item in loras]
    module.set_adapters(names, weights=[item.scale for item in loras])
    # peft marks the active adapters trainable; inference needs no grad, and torch.compile guards on
    # the flag, so each switch of jobs would recompile the blocks.
    for name, parameter in module.named_parameters():
        if ".lora_" in name:
            parameter.requires_grad_(False)
    lora_fuse.set_job(module, {name: item.scale for name, item in zip(names, loras, strict=True)}, device)


def _target(key: str) -> str:
    name = key.removeprefix(f"{PREFIX}.")
    return re.sub(r"\.lora_[AB](\.[^.]+)?\.(weight|bias)$|\.lora_magnitude_vector.*$", "", name)


class Adapters:
    """The diffuse stage's LoRA state for one run: every adapter its jobs have asked for, in order. A
    placement carries them all (`DiffuseOptions.adapters`, part of the residency key). Given the jobs
    still to come (`expected`) at the first, it holds the night's every file from the start, so each
    is loaded once and the transformer placed once; a job whose file is new to the run places it
    again, with it."""

    def __init__(self) -> None:
        self.wanted: tuple[Adapter, ...] = ()

    def for_job(
        self, loras: tuple[Lora, ...], *, expected: Iterable[tuple[Lora, ...]] = ()
    ) -> tuple[Adapter, ...]:
        """What the placed transformer must hold for a job with `loras`: all asked for so far, and
        those of the `expected` jobs' LoRAs."""
        for item in (*(item for later in expected for item in later), *loras):
            adapter = Adapter.of(item)
            if adapter not in self.wanted:
                self.wanted += (adapter,)
        return self.wanted
