"""GGUF transformers (`--model FOLDER+FILE.gguf`): files written here from a tiny transformer with the
gguf package, in the original Wan layout, checked without loading, loaded through diffusers'
`from_single_file`, sized for the planner, streamed by group offloading and run as a staged job.

The folder's transformer is the tiny one at attention_head_dim 16 (width 32) instead of 12: GGUF
quantises rows in blocks of 32 values, and at tiny's width 24 only 6 of its 22 matrices would split
into blocks; at 32 every matrix does, as every one of the full-size model's does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor
from gguf import GGMLQuantizationType as Q
from typer.testing import CliRunner

import flows.generate
from t2v.context import RunContext
from t2v.engine import StageRunner
from t2v.errors import InvalidInput, ModelNotFound
from t2v.jobs import JobSpec
from t2v.models import gguf as t2v_gguf
from t2v.models import registry, tiny
from t2v.models.seeding import seeded
from t2v.pipeline.diffuse import STAGE as DIFFUSE
from t2v.pipeline.encode import STAGE as ENCODE
from t2v.plans import ComponentSizes, component_sizes, module_bytes
from t2v.runlog import RunLog
from t2v.settings import Settings
from t2v_cli.checks import clip_key
from t2v_cli.main import app

JOB = JobSpec(template="fox", prompt="a fox at dusk", height=64, width=96, frames=9, steps=2)


def _wide_transformer(seed: int = tiny.SEED + 1) -> WanTransformer3DModel:
    config = {k: v for k, v in tiny.build_transformer().config.items() if not k.startswith("_")}
    with seeded(seed):
        return WanTransformer3DModel(**(config | {"attention_head_dim": 16})).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Wan2.2 diffusers folder (`folder`) and GGUFs of its transformer, one per type."""
    root = tmp_path_factory.mktemp("gguf")
    transformer = _wide_transformer()
    WanPipeline(
        tokenizer=tiny.build_tokenizer(),
        text_encoder=tiny.build_text_encoder(),
        transformer=transformer,
        vae=tiny.build_vae(),
        scheduler=tiny.build_scheduler(),
        expand_timesteps=True,
    ).save_pretrained(root / "wan")
    made = {"folder": root / "wan"}
    for qtype in (Q.Q8_0, Q.Q4_0, Q.MXFP4):  # MXFP4: gguf writes it, diffusers cannot dequantise it
        made[qtype.name] = root / f"wan-{qtype.name}.gguf"
        t2v_gguf.write_module(transformer, made[qtype.name], qtype)
    return made


def _spec(files: dict[str, Path], name: str) -> str:
    return f"{files['folder']}+{files[name]}"


# --- `--model FOLDER+FILE.gguf` ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        ("/m/wan+/m/q8.gguf", ("/m/wan", "/m/q8.gguf")),
        ("/m/wan+x+/m/Q8.GGUF", ("/m/wan+x", "/m/Q8.GGUF")),  # a `+` in the folder's name
        ("/m/wan+/m/q8.gguf.part", None),
        ("/m/wan", None),
        ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", None),
    ],
)
def test_split_spec_cuts_at_the_last_plus_before_a_gguf_file(spec: str, parts) -> None:
    assert t2v_gguf.split_spec(spec) == parts


def test_split_spec_prefers_the_cut_whose_left_side_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "wan").mkdir()
    spec = f"{tmp_path / 'wan'}+{tmp_path / 'a+b.gguf'}"  # the file's own name has a `+`
    assert t2v_gguf.split_spec(spec) == (str(tmp_path / "wan"), str(tmp_path / "a+b.gguf"))


def test_resolve_keeps_the_folder_and_adds_the_file_to_the_identity(files) -> None:
    plain = registry.resolve_model(str(files["folder"]))
    ref = registry.resolve_model(_spec(files, "Q8_0"))
    assert (ref.source, ref.kind, ref.transformer_file) == (plain.source, "pretrained", str(files["Q8_0"]))
    size = files["Q8_0"].stat().st_size
    assert ref.identity.startswith(f"{plain.identity}+gguf:wan-Q8_0.gguf:{size}:")
    assert registry.resolve_model(_spec(files, "Q4_0")).identity != ref.identity
    assert plain.transformer_file is None


def test_identity_is_the_files_content_not_its_place(files, tmp_path: Path) -> None:
    ref = registry.resolve_model(_spec(files, "Q8_0"))
    (tmp_path / "elsewhere").mkdir()
    moved = Path(shutil.copy(files["Q8_0"], tmp_path / "elsewhere" / "wan-Q8_0.gguf"))
    assert registry.resolve_model(f"{files['folder']}+{moved}").identity == ref.identity
    # Same name, size and tensor table, other weights: the sampled data tells them apart.
    other = tmp_path / "wan-Q8_0.gguf"
    t2v_gguf.write_module(_wide_transformer(seed=7), other, Q.Q8_0)
    assert other.stat().st_size == files["Q8_0"].stat().st_size
    assert registry.resolve_model(f"{files['folder']}+{other}").identity != ref.identity


def test_store_keys_differ_from_the_plain_folders(files) -> None:
    keys = {
        name: clip_key(JOB, registry.resolve_model(spec), fp8=False)
        for name, spec in [("bf16", str(files["folder"])), *((t, _spec(files, t)) for t in ("Q8_0", "Q4_0"))]
    }
    assert len(set(keys.values())) == 3, keys


def _bad(files: dict[str, Path], tmp_path: Path, case: str) -> tuple[str, str]:
    """A bad `--model` value for `case`, and the file its message must name."""
    folder = files["folder"]
    if case == "missing":
        return f"{folder}+{tmp_path / 'nope.gguf'}", str(tmp_path / "nope.gguf")
    if case == "not-gguf":
        fake = tmp_path / "weights.gguf"
        shutil.copy(folder / "transformer" / "diffusion_pytorch_model.safetensors", fake)
        return f"{folder}+{fake}", str(fake)
    if case == "truncated":
        cut = tmp_path / "cut.gguf"
        data = files["Q8_0"].read_bytes()
        cut.write_bytes(data[: len(data) // 2])  # an interrupted download
        return f"{folder}+{cut}", str(cut)
    if case == "unsupported-type":
        return _spec(files, "MXFP4"), str(files["MXFP4"])
    if case == "other-model":  # the tiny transformer's GGUF (width 24) with the width-32 folder
        other = tmp_path / "tiny.gguf"
        t2v_gguf.write_module(tiny.build_transformer(), other, Q.Q8_0)
        return f"{folder}+{other}", str(other)
    if case == "no-folder":
        return f"{tmp_path / 'nowhere'}+{files['Q8_0']}", str(tmp_path / "nowhere")
    assert case == "builtin"
    return f"tiny+{files['Q8_0']}", "tiny"


BAD = {
    "missing": "does not exist",
    "not-gguf": "is not a GGUF file: it starts with",
    "truncated": "is a damaged or incomplete GGUF file",
    "unsupported-type": "of type MXFP4, which diffusers cannot dequantise",
    "other-model": "is not a transformer for the folder",
    "no-folder": "goes with a local Wan2.2 diffusers folder",
    "builtin": "goes with a local Wan2.2 diffusers folder",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_one_line_naming_the_file(files, tmp_path: Path, monkeypatch, case: str) -> None:
    def no_load(*args, **kwargs):
        raise AssertionError("nothing may load before the file is checked")

    monkeypatch.setattr(WanTransformer3DModel, "from_single_file", no_load)
    spec, named = _bad(files, tmp_path, case)
    with pytest.raises(ModelNotFound) as info:
        registry.resolve_model(spec)
    message = str(info.value)
    assert "\n" not in message and "`--model`" in message
    assert BAD[case] in message and named in message, message


@pytest.mark.parametrize("case", ["missing", "unsupported-type"])
def test_cli_refuses_a_bad_file_with_exit_2_before_any_flow(files, tmp_path, data_dir, monkeypatch, case):
    def no_flow(*args, **kwargs):
        raise AssertionError("the flow must not start")

    monkeypatch.setattr(flows.generate, "generate", no_flow)
    spec, named = _bad(files, tmp_path, case)
    result = CliRunner().invoke(app, ["generate", "a fox", "--model", spec, "--steps", "2"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
    assert not data_dir.exists()


def test_fp8_storage_with_a_gguf_is_refused(files) -> None:
    ref = registry.resolve_model(_spec(files, "Q8_0"))
    with pytest.raises(InvalidInput, match=r"`--fp8-storage` cannot be used with a GGUF transformer"):
        registry.check_switches(ref, fp8=True)
    registry.check_switches(ref, fp8=False)
    registry.check_switches(registry.resolve_model(str(files["folder"])), fp8=True)
    from t2v.context import check_budgets
    from t2v.settings import Settings

    with pytest.raises(InvalidInput, match=r"`--fp8-storage` cannot be used"):  # what every command checks
        check_budgets([JOB], ref, Settings(data_dir=files["folder"].parent / "data"), fp8=True)
    # Why: layerwise casting's `.to(float8)` leaves integer tensors alone, so the packed weights stay
    # as they are and only the biases lose precision, while the planner would halve the weights' bytes.
    model = registry.load_transformer(ref)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    packed = [p for p in model.parameters() if isinstance(p, GGUFParameter)]
    assert packed and all(p.dtype == torch.uint8 for p in packed)
    assert model.blocks[0].attn1.to_q.bias.dtype == torch.float8_e4m3fn


# --- loading, sizes, offloading ---------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=["Q8_0", "Q4_0"])
def test_loaded_weights_are_the_quantised_then_dequantised_originals(files, qtype) -> None:
    original = _wide_transformer().state_dict()
    loaded = registry.load_transformer(registry.resolve_model(_spec(files, qtype.name)))
    keep = WanTransformer3DModel._keep_in_fp32_modules
    linears = [n for n, m in loaded.named_modules() if isinstance(m, torch.nn.Linear)]
    quantised = [n for n in linears if not any(k in n.split(".") for k in keep)]
    assert quantised and all(isinstance(loaded.get_submodule(n), GGUFLinear) for n in quantised)
    for name, param in loaded.state_dict().items():
        want = original[name]
        if isinstance(param, GGUFParameter):
            assert param.quant_type == qtype, name
            expected = gguf.quants.dequantize(gguf.quants.quantize(want.numpy(), qtype), qtype)
            # diffusers multiplies the fp16 block scale in fp16; gguf's numpy reference in fp32.
            got = dequantize_gguf_tensor(param).float()
            torch.testing.assert_close(got, torch.from_numpy(expected), rtol=2e-3, atol=1e-6)
            assert not torch.equal(got, want), f"{name} was not quantised"
        else:  # stored F32: loaded as from a folder, bf16 or (keep_in_fp32 modules) fp32
            assert torch.equal(param, want.to(param.dtype)), name
    assert {
        n.rpartition(".")[0] for n, p in loaded.named_parameters() if isinstance(p, GGUFParameter)
    } == set(quantised)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_planner_sizes_are_the_loaded_gguf_bytes(files, qtype: str) -> None:
    ref = registry.resolve_model(_spec(files, qtype))
    loaded = registry.load_transformer(ref)
    sizes, total = component_sizes(ref, "transformer")
    assert sizes == ComponentSizes.from_modules(transformer=loaded)
    assert total == module_bytes(loaded)
    plain, plain_total = component_sizes(registry.resolve_model(str(files["folder"])), "transformer")
    # A block's matrices: 2 bytes a weight in bf16, 34/32 in Q8_0, 18/32 in Q4_0 (+ fp32 norms, bf16 biases).
    block_weights = sum(
        m.in_features * m.out_features for m in loaded.blocks[0].modules() if isinstance(m, GGUFLinear)
    )
    bytes_per_weight = {"Q8_0": 34 / 32, "Q4_0": 18 / 32}[qtype]
    saved = plain.transformer_block_bytes - sizes.transformer_block_bytes
    assert saved == int(block_weights * (2 - bytes_per_weight))
    assert total < plain_total  # the largest leaf here is the fp32 time embedder, quantised in neither


def _forward(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, 48, 3, 4, 6, generator=g).bfloat16(),
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=torch.randn(1, 7, 32, generator=g).bfloat16(),
            return_dict=False,
        )[0]


def test_group_and_leaf_offloading_and_host_packing_keep_the_gguf_weights(files) -> None:
    from diffusers.hooks import apply_group_offloading

    from t2v import placement
    from t2v.pinning import pack_host_tensors
    from t2v.plans import Placement, StagePlan

    ref = registry.resolve_model(_spec(files, "Q4_0"))
    expected = _forward(registry.load_transformer(ref))
    # Block level as the `group` plan has it, without the CUDA stream (there is no card here): each
    # block's `param.data` is swapped to the onload device before its forward and back after it.
    grouped = registry.load_transformer(ref)
    apply_group_offloading(
        grouped, torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
        num_blocks_per_group=1, use_stream=False,
    )  # fmt: skip
    leaf = placement.apply(
        StagePlan(DIFFUSE.name, Placement.LEAF, device="cpu"), registry.load_transformer(ref)
    )
    packed = registry.load_transformer(ref)
    assert pack_host_tensors(packed, lambda n: torch.empty(n, dtype=torch.uint8)) > 0  # pinned arena's path
    for model in (grouped, leaf, packed):
        assert torch.equal(_forward(model), expected)
        assert {getattr(p, "quant_type", None) for p in model.parameters()} == {Q.Q4_0, None}


# --- a staged job ----------------------------------------------------------------------------------


def _latents(root: Path, model: str) -> torch.Tensor:
    settings = Settings(data_dir=root, database_url=f"sqlite:///{root / 'runs.db'}")
    root.mkdir(parents=True)
    run_id = RunLog(settings.runlog_url).start_run(kind="generate", model=model)
    runner = StageRunner(RunContext(run_id=run_id, model=model, outputs_dir=root / "out", settings=settings))
    runner.run(ENCODE, JOB)
    runner.run(DIFFUSE, JOB)
    assert [r["status"] for r in runner.runlog.run(run_id)["stages"]] == ["ok", "ok"]
    return runner.store.load_tensors(DIFFUSE, runner.keys(JOB)[DIFFUSE])["latents"].float()


def test_a_staged_job_on_a_gguf_deviates_from_bf16_by_its_quantisation(files, tmp_path: Path) -> None:
    bf16 = _latents(tmp_path / "bf16", str(files["folder"]))
    deviation = {
        t: ((_latents(tmp_path / t, _spec(files, t)) - bf16).norm() / bf16.norm()).item()
        for t in ("Q8_0", "Q4_0")
    }
    print(f"latents vs bf16 after {JOB.steps} steps: {deviation}")
    # Measured with torch 2.13 on the CPU: Q8_0 0.014, Q4_0 0.041 (one forward: 0.0063 and 0.066). Both
    # against bf16 weights, whose own rounding is part of the Q8_0 figure.
    assert 0 < deviation["Q8_0"] < 0.025
    assert 2 * deviation["Q8_0"] < deviation["Q4_0"] < 0.1


# --- writing ----------------------------------------------------------------------------------------


def test_writing_from_a_folder_streams_the_same_tensors(files, tmp_path: Path) -> None:
    out = tmp_path / "from-folder.gguf"
    t2v_gguf.main(["write", str(files["folder"]), str(out), "--type", "Q8_0"])

    def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
        return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}

    assert tensors(out) == tensors(files["Q8_0"])
    names = set(tensors(out))
    assert {
        "head.modulation",
        "blocks.0.self_attn.q.weight",
        "blocks.0.norm3.weight",
        "blocks.0.ffn.0.weight",
    } <= names
    assert not any("attn1" in n or "scale_shift_table" in n for n in names)  # the original Wan layout


def test_the_writers_names_are_what_diffusers_converts_back() -> None:
    names = list(_wide_transformer().state_dict())
    assert len(set(t2v_gguf.original_names(names).values())) == len(names)
    with pytest.raises(RuntimeError, match="no longer inverts"):
        t2v_gguf.original_names([*names, "blocks.0.norm3.weight"])
