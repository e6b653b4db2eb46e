"""Which model a `--model` value means, and loading its components one at a time.

Stage-major batching loads one component per stage, so each loader here returns a single component.
`FOLDER+FILE.gguf` is a diffusers folder whose transformer is replaced by a GGUF file (t2v.models.gguf).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from t2v import samplers
from t2v.errors import InvalidInput, ModelNotFound
from t2v.models import gguf, tiny
from t2v.models.wan22 import WAN22_RULES, ModelRules

BUILTIN = "tiny"
RANDOM_FULL_SIZE = "wan2.2-ti2v-5b-random"
"""The full-size architecture with seeded random weights, built on the GPU: for benchmarks on a card
with no weights at hand. Its clips are noise; its memory and speed are the real model's."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SUBFOLDERS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")


@dataclass(frozen=True)
class ModelRef:
    """A resolved `--model` value: what to load and the identity that goes into every store key."""

    spec: str
    """What the user typed."""
    source: str | None
    """Folder or hub id for `from_pretrained`; None for the built-in model."""
    identity: str
    """Changes whenever the weights or configs can differ."""
    rules: ModelRules = WAN22_RULES
    kind: str = "pretrained"
    """"tiny" (built in), "random" (full size, random weights) or "pretrained" (from_pretrained)."""
    transformer_file: str | None = None
    """A GGUF file whose quantised transformer replaces the folder's (`FOLDER+FILE.gguf`); its name,
    size and a hash of its header and a sample of its data are in `identity`."""

    @property
    def builtin(self) -> bool:
        """Built here from code, nothing loaded from files."""
        return self.kind != "pretrained"

    @property
    def weight_dtype(self) -> torch.dtype:
        """Storage dtype of the transformer and text encoder: bf16 as published, fp32 for tiny (CPU)."""
        return torch.float32 if self.kind == "tiny" else torch.bfloat16


def _folder_identity(folder: Path) -> str:
    # Configs by content, weights by name and size: hashing 25 GB of weights per run would cost minutes.
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = path.relative_to(folder).as_posix()
            if path.suffix == ".json":
                digest.update(rel.encode() + path.read_bytes())
            else:
                digest.update(f"{rel}:{path.stat().st_size}".encode())
    return f"folder:{digest.hexdigest()[:16]}"


def resolve_model(spec: str) -> ModelRef:
    """Check a `--model` value without loading weights: `tiny`, a Wan2.2 diffusers folder, a hub id,
    or `FOLDER+FILE.gguf`."""
    if spec == BUILTIN:
        return ModelRef(spec=spec, source=None, identity=tiny.IDENTITY, kind="tiny")
    if spec == RANDOM_FULL_SIZE:
        return ModelRef(spec=spec, source=None, identity=f"{spec}@seed0-v1", kind="random")
    path = Path(spec).expanduser()
    parts = None if path.is_dir() else gguf.split_spec(spec)
    if parts:
        return _with_gguf(spec, *parts)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelNotFound(f"`--model` folder {spec!r} has no model_index.json: not a diffusers folder.")
        try:
            pipeline_class = json.loads(index.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelNotFound(f"`--model` folder {spec!r} has a broken model_index.json ({exc}).") from exc
        missing = [name for name in _SUBFOLDERS if not (path / name).is_dir()]
        # A pipeline diffusers does not have (FastVideo's WanDMDPipeline) over Wan2.2 TI2V components in
        # diffusers' layout: its components load one by one as any folder's, with the preset it implies.
        preset = samplers.PIPELINE_PRESETS.get(pipeline_class) if isinstance(pipeline_class, str) else None
        if (pipeline_class != "WanPipeline" and preset is None) or missing:
            if not missing and not _diffusers_has(pipeline_class):
                known = ", ".join(samplers.PIPELINE_PRESETS)
                raise ModelNotFound(
                    f"`--model` folder {spec!r} names pipeline {pipeline_class!r}, which is neither a "
                    f"diffusers pipeline nor one t2v has a sampler preset for ({known}); a Wan2.2 TI2V "
                    "diffusers folder names WanPipeline."
                )
            raise ModelNotFound(
                f"`--model` folder {spec!r} is not a Wan2.2 TI2V diffusers folder "
                f"(pipeline {pipeline_class!r}, missing {missing or 'nothing'})."
            )
        rules = WAN22_RULES if preset is None else replace(WAN22_RULES, preset=preset)
        return ModelRef(spec=spec, source=str(path.resolve()), identity=_folder_identity(path), rules=rules)
    # fullmatch: `$` alone would accept a trailing newline and make it part of the identity.
    if _HUB_ID.fullmatch(spec) and not path.exists() and not spec.startswith("."):
        return ModelRef(spec=spec, source=spec, identity=f"hub:{spec}")
    raise ModelNotFound(
        f"`--model` {spec!r} is not a folder here, nor a hub id like 'Wan-AI/Wan2.2-TI2V-5B-Diffusers'; "
        f"use '{BUILTIN}' for the built-in model."
    )


def _diffusers_has(pipeline_class: object) -> bool:
    """Whether diffusers has a pipeline of that name (imported only for a folder t2v does not know)."""
    import diffusers

    return isinstance(pipeline_class, str) and hasattr(diffusers, pipeline_class)


def _with_gguf(spec: str, folder: str, file: str) -> ModelRef:
    """`folder` checked as a `--model` folder, `file` as a GGUF of its transformer (header and tensor
    table against the folder's config); its identity joins the folder's."""
    if not Path(folder).expanduser().is_dir():
        raise ModelNotFound(
            f"`--model` {spec!r}: a GGUF transformer goes with a local Wan2.2 diffusers folder "
            f"(FOLDER+FILE.gguf), and {folder!r} is not a folder here."
        )
    base = resolve_model(folder)
    checked = gguf.inspect(file)
    gguf.check_fits(checked, skeleton(base, "transformer"), folder)
    return ModelRef(
        spec=spec,
        source=base.source,
        identity=f"{base.identity}+{checked.identity}",
        rules=base.rules,
        transformer_file=str(checked.path),
    )


def check_switches(ref: ModelRef, *, fp8: bool) -> None:
    """Refuse, before any load, a switch the model cannot take: `--fp8-storage` with a GGUF
    transformer. Layerwise casting's `.to(float8)` leaves the packed (integer) weights as they are
    and casts only the biases, losing precision for nothing, while the diffuse ladder would count
    the weights at half their bytes."""
    if fp8 and ref.transformer_file:
        raise InvalidInput(
            f"`--fp8-storage` cannot be used with a GGUF transformer ({Path(ref.transformer_file).name}): "
            "its weights are quantised already; drop one of the two."
        )


def load_tokenizer(ref: ModelRef):
    if ref.builtin:  # the random model's compute does not depend on which token ids it gets
        return tiny.build_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref.source, subfolder="tokenizer")


def load_text_encoder(ref: ModelRef) -> torch.nn.Module:
    if ref.kind == "random":
        return _build_random("text_encoder", ref.weight_dtype)
    if ref.builtin:
        return tiny.build_text_encoder()
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel.from_pretrained(
        ref.source, subfolder="text_encoder", dtype=ref.weight_dtype
    ).eval()


def load_transformer(ref: ModelRef) -> torch.nn.Module:
    if ref.kind == "random":
        return _build_random("transformer", ref.weight_dtype)
    if ref.builtin:
        return tiny.build_transformer()
    if ref.transformer_file:
        return gguf.load_transformer(ref.transformer_file, ref.source, ref.weight_dtype)
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(
        ref.source, subfolder="transformer", torch_dtype=ref.weight_dtype
    ).eval()


def load_vae(ref: ModelRef, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    if ref.kind == "random":
        return _build_random("vae", dtype)
    if ref.builtin:
        vae = tiny.build_vae()
        return vae if dtype == torch.float32 else vae.to(dtype)
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(ref.source, subfolder="vae", torch_dtype=dtype).eval()


def load_scheduler(ref: ModelRef):
    """The folder's scheduler, of the class its config names (UniPC for Wan2.2; a few-step folder's may
    be another), UniPC where that is no diffusers scheduler."""
    if ref.builtin:
        return tiny.build_scheduler()
    import diffusers
    from diffusers import SchedulerMixin, UniPCMultistepScheduler

    config = UniPCMultistepScheduler.load_config(ref.source, subfolder="scheduler")
    named = getattr(diffusers, str(config.get("_class_name")), None)
    cls = named if isinstance(named, type) and issubclass(named, SchedulerMixin) else UniPCMultistepScheduler
    return cls.from_config(config)


def skeleton(ref: ModelRef, component: str) -> torch.nn.Module:
    """`component` built from its config on the meta device, in its storage dtype: shapes, no weights."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from t2v.models.fullsize import cast_like_pretrained

    with torch.device("meta"):
        if ref.kind == "random":
            from t2v.models.fullsize import construct

            module = construct(component)
        elif ref.builtin:
            module = {
                "text_encoder": tiny.build_text_encoder,
                "transformer": tiny.build_transformer,
                "vae": tiny.build_vae,
            }[component]()
        elif component == "text_encoder":
            module = UMT5EncoderModel(UMT5Config.from_pretrained(ref.source, subfolder="text_encoder"))
        elif component == "transformer":
            module = WanTransformer3DModel.from_config(
                WanTransformer3DModel.load_config(ref.source, subfolder="transformer")
            )
        elif component == "vae":
            module = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(ref.source, subfolder="vae"))
        else:
            raise ValueError(f"`component` must be text_encoder, transformer or vae but is {component!r}")
    if component == "transformer":
        cast_like_pretrained(module, ref.weight_dtype)
        if ref.transformer_file:  # the bytes as loaded: quantised weights stay packed
            gguf.as_loaded(module, gguf.inspect(ref.transformer_file))
    elif component == "text_encoder":
        module.to(ref.weight_dtype)  # transformers 5 loads UMT5 wholly in the dtype asked for
    return module


def _build_random(component: str, dtype: torch.dtype) -> torch.nn.Module:
    from t2v.models.fullsize import clone

    return clone(_random_master(component, dtype))


@functools.cache
def _random_master(component: str, dtype: torch.dtype) -> torch.nn.Module:
    # Built once per process (on the GPU, at full memory: fp32 init needs 23 GB for the encoder) and
    # kept in host memory; each load hands out a clone sharing its tensors, as a fresh load would be.
    from t2v.models.fullsize import build
    from t2v.vram import uncapped

    if not torch.cuda.is_available():
        raise ModelNotFound(
            f"`--model {RANDOM_FULL_SIZE}` is built on a GPU (minutes on a CPU); none is here."
        )
    with uncapped():
        return build(component, device="cuda", dtype=dtype, keep_on="cpu")


def vae_factors(ref: ModelRef) -> tuple[int, int]:
    """(temporal, spatial) compression of the VAE, read from its config without loading weights."""
    if ref.kind == "tiny":
        config = dict(tiny.build_vae().config)
    elif ref.kind == "random":
        from t2v.models.wan22 import FULL_SIZE

        config = FULL_SIZE["vae"]["kwargs"]
    else:
        from diffusers import AutoencoderKLWan

        config = AutoencoderKLWan.load_config(ref.source, subfolder="vae")
    return config["scale_factor_temporal"], config["scale_factor_spatial"]


COMPONENTS = ("text_encoder", "transformer", "vae")
"""What a stage may load; each has a loader below and a `skeleton`."""


def load_component(ref: ModelRef, component: str) -> torch.nn.Module:
    """Load one of `COMPONENTS` onto the host, in its storage dtype."""
    loaders = {"text_encoder": load_text_encoder, "transformer": load_transformer, "vae": load_vae}
    if component not in loaders:
        raise ValueError(f"`component` must be one of {COMPONENTS} but is {component!r}")
    return loaders[component](ref)
