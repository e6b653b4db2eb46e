"""resolve_model and the component loaders, for the built-in model and a diffusers folder made from it."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline

from t2v.errors import ModelNotFound
from t2v.models import registry, tiny
from t2v.models.registry import ModelRef, resolve_model

# sha256 of each tiny component's state_dict (see _digest), computed once with torch 2.13.0 (CPU build),
# diffusers 0.42.1 and transformers 5.24.0. The built-in model's identity promises "same seed, bit-identical
# weights on every machine": if this fails, the weights changed, so bump tiny.IDENTITY (every store key
# depends on it) and recompute these.
TINY_DIGESTS = {
    "build_text_encoder": "57412dcea156cc38855296feafd03303c682ff621b21f5e026cdb104f01391a8",
    "build_transformer": "eec76ae275d3fc9736a2e44c8af3a77b21b253c424abaa031ea3ae6399398c07",
    "build_vae": "29da9f7df2a24696dd0288ecec86ad2f194171f6663769aff253779da2285177",
}
HUB_ID = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
TEXTS = ["A rotating atom.", "", "Ünïcödé ✓ 火", "a" * 600]


def _digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Wan2.2 diffusers folder holding the tiny model, as `save_pretrained` writes it."""
    folder = tmp_path_factory.mktemp("models") / "wan"
    pipe = WanPipeline(
        tokenizer=tiny.build_tokenizer(),
        text_encoder=tiny.build_text_encoder(),
        transformer=tiny.build_transformer(),
        vae=tiny.build_vae(),
        scheduler=tiny.build_scheduler(),
        expand_timesteps=True,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def copy_of(wan_folder: Path, tmp_path: Path):
    def copy(name: str = "copy") -> Path:
        return Path(shutil.copytree(wan_folder, tmp_path / name))

    return copy


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("resolve_model must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --- resolve_model -------------------------------------------------------------------------------


def test_resolve_builtin() -> None:
    ref = resolve_model("tiny")
    assert ref == ModelRef(spec="tiny", source=None, identity=tiny.IDENTITY, kind="tiny")
    assert ref.builtin
    assert ref.weight_dtype == torch.float32


def test_resolve_folder(wan_folder: Path, copy_of) -> None:
    ref = resolve_model(str(wan_folder))
    assert ref.identity.startswith("folder:")
    assert ref.source == str(wan_folder.resolve())
    assert not ref.builtin
    assert ref.weight_dtype == torch.bfloat16
    assert resolve_model(str(wan_folder)).identity == ref.identity
    # Content decides the identity, not where the folder sits.
    assert resolve_model(str(copy_of())).identity == ref.identity


@pytest.mark.parametrize(
    "config",
    ["transformer/config.json", "scheduler/scheduler_config.json", "vae/config.json", "model_index.json"],
)
def test_identity_changes_with_a_config(wan_folder: Path, copy_of, config: str) -> None:
    before = resolve_model(str(wan_folder)).identity
    folder = copy_of()
    data = json.loads((folder / config).read_text())
    data["_edited_by_test"] = True
    (folder / config).write_text(json.dumps(data))
    assert resolve_model(str(folder)).identity != before


def test_identity_changes_with_a_weight_file_size(wan_folder: Path, copy_of) -> None:
    before = resolve_model(str(wan_folder)).identity
    folder = copy_of()
    with open(folder / "vae" / "diffusion_pytorch_model.safetensors", "ab") as weights:
        weights.write(b"\0")
    assert resolve_model(str(folder)).identity != before


def test_resolve_hub_id_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network) -> None:
    monkeypatch.chdir(tmp_path)  # so no local folder can be named like the hub id
    ref = resolve_model(HUB_ID)
    assert ref == ModelRef(spec=HUB_ID, source=HUB_ID, identity=f"hub:{HUB_ID}")
    assert not ref.builtin
    assert ref.weight_dtype == torch.bfloat16


def _wan_folder_with(copy_of, edit) -> Path:
    folder = copy_of()
    edit(folder)
    return folder


def _set_class(name: str):
    def edit(folder: Path) -> None:
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = name
        (folder / "model_index.json").write_text(json.dumps(index))

    return edit


BAD_FOLDERS = [
    # (id, edit of a copy of the good folder, fragments the message must hold)
    ("no-model-index", lambda f: (f / "model_index.json").unlink(), ["has no model_index.json"]),
    (
        "broken-model-index",
        lambda f: (f / "model_index.json").write_text("{oops"),
        ["broken model_index.json"],
    ),
    ("other-pipeline", _set_class("StableDiffusionPipeline"), ["not a Wan2.2", "'StableDiffusionPipeline'"]),
    ("no-vae", lambda f: shutil.rmtree(f / "vae"), ["not a Wan2.2", "missing ['vae']"]),
]


@pytest.mark.parametrize(("edit", "fragments"), [b[1:] for b in BAD_FOLDERS], ids=[b[0] for b in BAD_FOLDERS])
def test_resolve_rejects_folder(copy_of, edit, fragments: list[str]) -> None:
    folder = _wan_folder_with(copy_of, edit)
    with pytest.raises(ModelNotFound) as info:
        resolve_model(str(folder))
    assert "`--model`" in str(info.value)
    assert repr(str(folder)) in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_resolve_rejects_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="has no model_index.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize(
    "spec",
    [
        "missing-folder",
        "./Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        "org/name/too-deep",
        f"{HUB_ID}\n",
        "Tiny",
        "",
    ],
    ids=["no-slash", "dot-relative", "three-parts", "trailing-newline", "wrong-case-builtin", "empty"],
)
def test_resolve_rejects_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network, spec: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFound) as info:
        resolve_model(spec)
    assert "`--model`" in str(info.value)


def test_resolve_rejects_missing_absolute_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "wan"
    with pytest.raises(ModelNotFound) as info:
        resolve_model(str(missing))
    assert repr(str(missing)) in str(info.value)


# --- loaders: the folder gives back the tiny model --------------------------------------------------


def _assert_same_weights(loaded: torch.nn.Module, built: torch.nn.Module, weight_dtype: torch.dtype) -> None:
    got, want = loaded.state_dict(), built.state_dict()
    assert got.keys() == want.keys()
    # Published bf16 storage; diffusers/transformers keep a few norm and embedding modules in fp32.
    assert {t.dtype for t in got.values()} <= {weight_dtype, torch.float32}
    assert sum(t.dtype == weight_dtype for t in got.values()) > len(got) / 2
    for name, tensor in got.items():
        # Rounding fp32 to bf16 is exact and deterministic, so the cast tiny weight must match bit for bit.
        assert torch.equal(tensor, want[name].to(tensor.dtype)), name


@pytest.mark.parametrize(
    ("loader", "builder"),
    [("load_text_encoder", "build_text_encoder"), ("load_transformer", "build_transformer")],
)
def test_folder_loads_tiny_weights_in_bf16(wan_folder: Path, loader: str, builder: str) -> None:
    ref = resolve_model(str(wan_folder))
    loaded = getattr(registry, loader)(ref)
    assert not loaded.training
    _assert_same_weights(loaded, getattr(tiny, builder)(), ref.weight_dtype)


def test_folder_loads_tiny_vae(wan_folder: Path) -> None:
    ref = resolve_model(str(wan_folder))
    built = tiny.build_vae()
    _assert_same_weights(registry.load_vae(ref), built, torch.float32)
    _assert_same_weights(registry.load_vae(ref, dtype=torch.bfloat16), built, torch.bfloat16)


def test_folder_loads_tiny_scheduler(wan_folder: Path) -> None:
    loaded = registry.load_scheduler(resolve_model(str(wan_folder)))
    built = tiny.build_scheduler()
    assert type(loaded) is type(built)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in built.config.items() if not k.startswith("_")
    }
    loaded.set_timesteps(8)
    built.set_timesteps(8)
    assert torch.equal(loaded.timesteps, built.timesteps)
    assert torch.equal(loaded.sigmas, built.sigmas)


def test_folder_loads_tiny_tokenizer(wan_folder: Path) -> None:
    loaded = registry.load_tokenizer(resolve_model(str(wan_folder)))
    built = tiny.build_tokenizer()
    for text in TEXTS:
        assert loaded(text).input_ids == built(text).input_ids
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)
    assert loaded.model_max_length == built.model_max_length == 512


@pytest.mark.parametrize(
    ("loader", "builder"),
    [
        ("load_text_encoder", "build_text_encoder"),
        ("load_transformer", "build_transformer"),
        ("load_vae", "build_vae"),
    ],
)
def test_builtin_loaders_are_the_tiny_build(loader: str, builder: str) -> None:
    loaded = getattr(registry, loader)(resolve_model("tiny"))
    assert _digest(loaded) == TINY_DIGESTS[builder]


def test_load_component_loads_each_stage_component_by_name() -> None:
    from t2v.pipeline import PIPELINE

    ref = resolve_model("tiny")
    builders = {"text_encoder": "build_text_encoder", "transformer": "build_transformer", "vae": "build_vae"}
    assert set(registry.COMPONENTS) == set(builders)
    assert {s.component for s in PIPELINE if s.on_card} <= set(registry.COMPONENTS)
    for name in registry.COMPONENTS:
        assert _digest(registry.load_component(ref, name)) == TINY_DIGESTS[builders[name]]
    with pytest.raises(ValueError, match="tokenizer"):
        registry.load_component(ref, "tokenizer")


def test_builtin_tokenizer_and_scheduler() -> None:
    ref = resolve_model("tiny")
    assert registry.load_tokenizer(ref)(TEXTS[0]).input_ids == tiny.build_tokenizer()(TEXTS[0]).input_ids
    assert registry.load_scheduler(ref).config == tiny.build_scheduler().config


# --- the tiny model is deterministic ----------------------------------------------------------------


def test_tiny_transformer_is_bit_identical_when_rebuilt() -> None:
    first = tiny.build_transformer().state_dict()
    torch.manual_seed(12345)  # whatever the global RNG holds, the build reseeds it
    torch.rand(1000)
    second = tiny.build_transformer().state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("builder", sorted(TINY_DIGESTS))
def test_tiny_weights_match_the_recorded_digest(builder: str) -> None:
    assert _digest(getattr(tiny, builder)()) == TINY_DIGESTS[builder]


def test_random_full_size_model_resolves_without_weights_and_sizes_from_its_config():
    from t2v.plans import ComponentSizes

    ref = resolve_model(registry.RANDOM_FULL_SIZE)
    assert ref.kind == "random" and ref.builtin and ref.weight_dtype == torch.bfloat16
    sizes = ComponentSizes.from_modules(transformer=registry.skeleton(ref, "transformer"))
    assert sizes.transformer_dim == 3072 and sizes.transformer_ffn_dim == 14336
    # ~5.0e9 parameters in bf16, the norms and modulation kept in fp32 as from_pretrained keeps them
    assert 9.9e9 < sizes.transformer_bytes < 10.2e9
    assert registry.vae_factors(ref) == (4, 16)
