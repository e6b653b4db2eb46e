"""LoRA styles per template (t2v/lora.py): adapter files made here from the tiny transformer, one in
diffusers' layout and one in ComfyUI's; the staged path against WanPipeline with the same LoRA, a night
of templates with different LoRAs against each alone, store keys, and bad input."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline
from diffusers.hooks import HookRegistry
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from typer.testing import CliRunner

import flows.generate
import flows.nightly
from t2v import lora, stages
from t2v.context import RunContext
from t2v.engine import Hooks, StageRunner
from t2v.errors import InvalidInput
from t2v.jobs import Catalogue, JobSpec
from t2v.models import tiny
from t2v.models.registry import load_component, resolve_model
from t2v.models.wan22 import WAN22_RULES
from t2v.pipeline import JobKeys, KeyInputs, diffuse, encode
from t2v.placement import apply
from t2v.plans import ComponentSizes, Placement, StagePlan, module_bytes
from t2v.runlog import RunLog
from t2v.settings import Settings
from t2v_cli.main import app

HEIGHT, WIDTH, FRAMES, STEPS, SEED, GUIDANCE = 64, 96, 9, 3, 7, 5.0
PROMPT, NEGATIVE = "a red fox trots through snow", "blurry"
SIZE = dict(height=HEIGHT, width=WIDTH, frames=FRAMES, steps=STEPS, seed=SEED, guidance=GUIDANCE)

# diffusers' names -> the original Wan names that ComfyUI files use (the test writes such a file; the
# conversion back is diffusers' own `_convert_non_diffusers_wan_lora_to_diffusers`).
_COMFY = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def _random_lora(seed: int) -> dict[str, torch.Tensor]:
    """A rank-4 adapter of the tiny transformer with random (non-zero) A and B matrices."""
    transformer = tiny.build_transformer()
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=list(_COMFY), init_lora_weights=False)
    transformer.add_adapter(config, adapter_name="made")
    return get_peft_model_state_dict(transformer, adapter_name="made")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    WanPipeline.save_lora_weights(folder / "ink", transformer_lora_layers=_random_lora(1))
    comfy = {}
    for key, value in _random_lora(2).items():
        module, _, tail = key.rpartition(".lora_")  # blocks.0.attn1.to_q, A.weight
        blocks, index, layer = module.split(".", 2)
        down_up = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[tail]
        comfy[f"diffusion_model.{blocks}.{index}.{_COMFY[layer]}.{down_up}"] = value.contiguous()
    save_file(comfy, folder / "comfy.safetensors")
    return {"ink": folder / "ink" / "pytorch_lora_weights.safetensors", "comfy": folder / "comfy.safetensors"}


@pytest.fixture(scope="module")
def parts():
    return dict(
        tokenizer=tiny.build_tokenizer(), text_encoder=tiny.build_text_encoder(), vae=tiny.build_vae()
    )


_PIPELINE_RUNS: dict[tuple, torch.Tensor] = {}


def pipeline_latents(parts, loras: list[tuple[Path, float]]) -> torch.Tensor:
    """WanPipeline's latents with the LoRAs loaded through its own `load_lora_weights` (once each)."""
    if tuple(loras) not in _PIPELINE_RUNS:
        _PIPELINE_RUNS[tuple(loras)] = _pipeline_latents(parts, loras)
    return _PIPELINE_RUNS[tuple(loras)]


def _pipeline_latents(parts, loras: list[tuple[Path, float]]) -> torch.Tensor:
    pipe = WanPipeline(
        **parts, transformer=tiny.build_transformer(), scheduler=tiny.build_scheduler(), expand_timesteps=True
    )
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
    if loras:
        pipe.set_adapters([f"a{i}" for i in range(len(loras))], [scale for _, scale in loras])
    return pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).frames


def plain_latents(parts, transformer) -> torch.Tensor:
    """The staged loop on its plain path (per-token timesteps, CFG as two passes): bit-identical to
    the pipeline without a LoRA (tests/test_stages.py)."""
    embeds = stages.encode_texts(
        parts["text_encoder"], parts["tokenizer"], [PROMPT, NEGATIVE], device="cpu", max_sequence_length=512
    )
    shape = stages.latent_shape(48, temporal=4, spatial=16, height=HEIGHT, width=WIDTH, frames=FRAMES)
    return stages.denoise(
        transformer,
        tiny.build_scheduler(),
        stages.initial_noise(shape, seed=SEED, device="cpu"),
        embeds[:1],
        embeds[1:],
        steps=STEPS,
        guidance=GUIDANCE,
        compute_dtype=torch.float32,
        shared_timestep=False,
        cfg_batch=1,
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def job_with(files, *pairs: tuple[str, float], template: str = "fox") -> JobSpec:
    loras = tuple(lora.Lora(path=str(files[name]), scale=scale) for name, scale in pairs)
    return JobSpec(template=template, prompt=PROMPT, negative_prompt=NEGATIVE, lora=loras, **SIZE)


# --- the staged path against the pipeline ----------------------------------------------------------


@pytest.mark.parametrize("placement", [Placement.CPU, Placement.LEAF])
def test_a_placed_transformer_with_a_lora_is_bit_identical_to_the_pipeline_with_it(parts, files, placement):
    job = job_with(files, ("ink", 0.8), ("comfy", 0.5))
    adapters = lora.Adapters().for_job(job.lora)
    plan = StagePlan(
        diffuse.STAGE.name, placement, device="cpu", options=diffuse.DiffuseOptions(adapters=adapters)
    )
    transformer = apply(plan, tiny.build_transformer())
    lora.activate(
        transformer, job.lora, device="cpu", fold=False
    )  # peft's unmerged forward, as the pipeline runs it
    reference = pipeline_latents(parts, [(files["ink"], 0.8), (files["comfy"], 0.5)])
    torch.testing.assert_close(plain_latents(parts, transformer), reference, rtol=0, atol=0)
    assert rel(reference, pipeline_latents(parts, [])) > 1e-2  # the styles change the clip
    # Loaded before the offloading hooks: the adapters' own layers are offloaded groups too, as the
    # FFN they sit in was wrapped (chunked) after the files' names had matched.
    lora_q = transformer.blocks[0].attn1.to_q.lora_A[adapters[0].name]
    hooked = HookRegistry.check_if_exists_or_initialize(lora_q).get_hook("group_offloading") is not None
    assert hooked is (placement is Placement.LEAF)
    assert transformer.blocks[0].ffn.ff.net[2].lora_B[adapters[1].name].weight.abs().sum() > 0

    lora.activate(transformer, (), device="cpu")  # a job without: the stock transformer's result, bit for bit
    torch.testing.assert_close(plain_latents(parts, transformer), pipeline_latents(parts, []), rtol=0, atol=0)


def _adapter_products(transformer) -> list[int]:
    """A counter of the calls of every adapter's B matrix: peft's unmerged forward runs them."""
    calls = [0]
    for name, module in transformer.named_modules():
        if ".lora_B." in name:
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("placement", [Placement.CPU, Placement.LEAF])
def test_folded_adapters_give_the_pipelines_latents_without_running_the_adapters_products(
    parts, files, placement
):
    job = job_with(files, ("ink", 0.8), ("comfy", 0.5))
    adapters = lora.Adapters().for_job(job.lora)
    plan = StagePlan(
        diffuse.STAGE.name, placement, device="cpu", options=diffuse.DiffuseOptions(adapters=adapters)
    )
    transformer = apply(plan, tiny.build_transformer())
    products = _adapter_products(transformer)
    lora.activate(transformer, job.lora, device="cpu")  # folding is the default
    folded = plain_latents(parts, transformer)
    assert products[0] == 0  # each layer ran one product with W + scale * B @ A
    reference = pipeline_latents(parts, [(files["ink"], 0.8), (files["comfy"], 0.5)])
    assert rel(folded, reference) < 1e-5  # fp32: the same sum in another order
    assert rel(reference, pipeline_latents(parts, [])) > 1e-2

    lora.activate(transformer, job.lora, device="cpu", fold=False)
    torch.testing.assert_close(plain_latents(parts, transformer), reference, rtol=0, atol=0)
    assert products[0] > 0


def _transformer_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One call of the tiny transformer: latents, a timestep, prompt embeddings (seeded)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 48, 3, 4, 6, generator=g)
    return latents, torch.tensor([500.0]), torch.randn(1, 16, 32, generator=g)


def test_folding_rounds_in_bf16_no_worse_than_the_unmerged_forward(files):
    job = job_with(files, ("ink", 1.0), ("comfy", 0.7))
    adapters = lora.Adapters().for_job(job.lora)
    inputs = _transformer_inputs()

    def output(dtype: torch.dtype, fold: bool) -> torch.Tensor:
        options = diffuse.DiffuseOptions(adapters=adapters)
        transformer = tiny.build_transformer().to(dtype)
        transformer = apply(StagePlan("diffuse", Placement.CPU, device="cpu", options=options), transformer)
        lora.activate(transformer, job.lora, device="cpu", fold=fold)
        with torch.no_grad():
            args = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
            return transformer(*args, return_dict=False)[0].float()

    exact = output(torch.float32, fold=False)
    folded, unmerged = rel(output(torch.bfloat16, True), exact), rel(output(torch.bfloat16, False), exact)
    assert 0 < folded < 1.25 * unmerged  # one rounding of the folded weight, against peft's of each term


def test_compiled_blocks_with_folded_adapters_share_one_graph(files):
    """`compile_repeated_blocks` compiles the block class once for all blocks: the folded forward
    must not make each block's layers look different to dynamo's guards (a diffusers hook per layer
    did: a recompile per block, and eager past dynamo's limit of 8). Dynamo's frames are counted with
    a backend that runs the graph as captured, so no C++ compiler is needed."""
    job = job_with(files, ("ink", 1.0), ("comfy", 0.7))
    options = diffuse.DiffuseOptions(adapters=lora.Adapters().for_job(job.lora))
    transformer = apply(
        StagePlan("diffuse", Placement.CPU, device="cpu", options=options), tiny.build_transformer()
    )
    lora.activate(transformer, job.lora, device="cpu")
    with torch.no_grad():
        eager = transformer(*_transformer_inputs(), return_dict=False)[0]
    graphs = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    transformer.compile_repeated_blocks(backend=counting, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            compiled = transformer(*_transformer_inputs(), return_dict=False)[0]
            torch.testing.assert_close(compiled, eager)
            assert len(transformer.blocks) == 2 and len(graphs) == 1  # the second block reused the first's
            # Other jobs' styles, order and scales: no new graph while a job has as many adapters as
            # the last (they are tensors the graph reads), one for each other count; each job's result.
            for other, count in (
                (job_with(files, ("comfy", -1.5), ("ink", 2.0)), 1),
                (job_with(files, ("ink", 0.5)), 2),
                (job_with(files, ("comfy", 0.3)), 2),
            ):
                lora.activate(transformer, other.lora, device="cpu")
                switched = transformer(*_transformer_inputs(), return_dict=False)[0]
                assert len(graphs) == count, other.lora
                with torch.compiler.set_stance("force_eager"):
                    eager_switched = transformer(*_transformer_inputs(), return_dict=False)[0]
                torch.testing.assert_close(switched, eager_switched)
                assert (switched - compiled).abs().max() > 1e-4  # another style, not the first one's result
            # peft's unmerged forward: one more graph, not one per block
            lora.activate(transformer, job.lora, device="cpu", fold=False)
            transformer(*_transformer_inputs(), return_dict=False)
            assert len(graphs) == 3
    finally:
        torch._dynamo.reset()


def _runner(tmp_path: Path, loads: list[str] | None = None) -> StageRunner:
    def load(ref, name):
        if loads is not None:
            loads.append(name)
        return load_component(ref, name)

    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'runs.db'}")
    run_id = RunLog(settings.runlog_url).start_run(kind="generate", model="tiny")
    ctx = RunContext(run_id=run_id, model="tiny", outputs_dir=tmp_path / "out", settings=settings)
    return StageRunner(ctx, hooks=Hooks(load=load))


def _night(runner: StageRunner, jobs: list[JobSpec]) -> dict[str, torch.Tensor]:
    """The jobs' latents from `runner`, stage-major as a flow runs them (the gc frozen meanwhile, as
    `Residency.held` does around a run's card stages: each drop's collection is then quick)."""
    with runner.residency.held():
        for stage in (encode.STAGE, diffuse.STAGE):
            for job in jobs:
                runner.run(stage, job)
    store = runner.store
    return {
        job.template: store.load_tensors(diffuse.STAGE, runner.keys(job)[diffuse.STAGE])["latents"]
        for job in jobs
    }


def test_a_night_of_three_templates_gives_each_its_own_single_job_result(parts, files, tmp_path):
    jobs = [
        job_with(files, ("ink", 0.8), template="ink"),
        job_with(files, ("comfy", 1.0), template="comfy"),
        job_with(files, template="plain"),
    ]
    # Each alone in a run of its own (one store: the prompt is encoded once), then all in one night.
    alone = {k: v for job in jobs for k, v in _night(_runner(tmp_path / "alone"), [job]).items()}
    loads: list[str] = []
    night = _night(_runner(tmp_path / "night", loads), jobs)
    for job in jobs:
        torch.testing.assert_close(night[job.template], alone[job.template], rtol=0, atol=0)
    # The staged plan (CFG as one batch, a shared timestep) is within fp32 rounding of the pipeline.
    assert rel(alone["ink"], pipeline_latents(parts, [(files["ink"], 0.8)])) < 1e-5
    assert rel(alone["plain"], pipeline_latents(parts, [])) < 1e-5
    assert rel(alone["ink"], alone["plain"]) > 1e-2 and rel(alone["comfy"], alone["plain"]) > 1e-2
    # A file new to the run places the transformer again with every adapter so far; the template
    # without a LoRA after them only switches them off.
    assert loads.count("transformer") == 2


def test_a_night_that_announces_its_jobs_loads_each_file_once_and_places_the_transformer_once(
    files, tmp_path, monkeypatch
):
    # The worst order for loading as the files come: a plain job first, then each file new.
    jobs = [
        job_with(files, template="plain"),
        job_with(files, ("ink", 0.8), template="ink"),
        job_with(files, ("comfy", 1.0), ("ink", 0.5), template="both"),
    ]
    alone = {k: v for job in jobs for k, v in _night(_runner(tmp_path / "alone"), [job]).items()}
    loads: list[str] = []
    injected: list[str] = []
    read = lora.state_dict
    readers: set[str] = set()

    def reading(path):
        injected.append(Path(path).name)
        readers.add(threading.current_thread().name)
        return read(path)

    monkeypatch.setattr(lora, "state_dict", reading)
    runner = _runner(tmp_path / "night", loads)
    # As flows/night.py runs a night: each card stage's jobs handed to `prefetch` before it runs.
    with runner.residency.held():
        for stage in (encode.STAGE, diffuse.STAGE):
            runner.prefetch(stage, jobs)
            for job in jobs:
                runner.run(stage, job)
    assert loads.count("transformer") == 1  # placed once, with both files, for the plain job already
    assert sorted(injected) == sorted(path.name for path in files.values())  # each file read once
    # by the loader, beside the encode stage, before the host copy is page-locked (`diffuse.preload`)
    assert {name.split("_")[0] for name in readers} == {"t2v-prefetch"}
    for job in jobs:
        latents = runner.store.load_tensors(diffuse.STAGE, runner.keys(job)[diffuse.STAGE])["latents"]
        torch.testing.assert_close(latents, alone[job.template], rtol=0, atol=0)
    assert runner.pending(diffuse.STAGE) == ()  # all stored: a re-run would load no file


# --- keys ----------------------------------------------------------------------------------------


def test_the_diffuse_key_is_the_old_one_without_a_lora_and_takes_each_files_hash_and_scale(files, tmp_path):
    model = resolve_model("tiny")
    plain = job_with(files)
    assert diffuse.key(KeyInputs(plain, model)) == dict(
        model=model.identity,
        seed=SEED,
        height=HEIGHT,
        width=WIDTH,
        frames=FRAMES,
        steps=STEPS,
        guidance=GUIDANCE,
        fp8=False,
        step_cache=0.0,
    )

    def latents_key(job: JobSpec) -> str:
        return JobKeys.of(diffuse_pipeline(), KeyInputs(job, model))[diffuse.STAGE]

    base = latents_key(job_with(files, ("ink", 0.8)))
    assert base != latents_key(plain)
    assert latents_key(job_with(files, ("ink", 0.9))) != base
    assert latents_key(job_with(files, ("ink", 0.8), ("comfy", 1.0))) != base
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes(files["ink"].read_bytes())
    assert latents_key(JobSpec(**{**vars(job_with(files)), "lora": (lora.Lora(str(moved), 0.8),)})) == base
    assert lora.adapter_name(moved) == lora.adapter_name(files["ink"])  # one adapter per content


def diffuse_pipeline():
    from t2v.pipeline import PIPELINE

    return PIPELINE


def test_the_adapters_are_counted_in_the_dtype_they_load_in(files):
    # peft gives the adapters their base layer's dtype whatever the file holds (these are float32
    # files): beside bf16 weights they take 2 bytes an element, and the estimate says so.
    job = job_with(files, ("ink", 1.0), ("comfy", 0.5))
    transformer = tiny.build_transformer().to(torch.bfloat16)
    for table in (transformer.scale_shift_table, transformer.blocks[0].scale_shift_table):
        table.data = table.data.float()  # as diffusers keeps them (`_keep_in_fp32_modules`)
    sizes = ComponentSizes.from_modules(transformer=transformer)
    before = module_bytes(transformer)
    lora.load(transformer, lora.Adapters().for_job(job.lora))
    assert module_bytes(transformer) - before == lora.adapter_bytes(job.lora, sizes.transformer_element_bytes)
    assert sizes.transformer_element_bytes == 2


def test_the_estimates_count_the_adapters_the_placement_holds_where_they_sit(files):
    from t2v.plans import Placement

    job = job_with(files, ("ink", 1.0))
    sizes = ComponentSizes.from_modules(transformer=tiny.build_transformer())
    with_lora = diffuse.ladder(sizes, job, device="cuda")
    plain = replace(job, lora=())
    without = diffuse.ladder(sizes, plain, device="cuda")
    extra = sum(t.numel() * 4 for t in _random_lora(1).values())  # the tiny model is float32
    assert lora.adapter_bytes(job.lora, sizes.transformer_element_bytes) == extra > 0
    share = extra // with_lora[-2].blocks  # each block's adapters go where the block goes
    for a, b in zip(with_lora, without, strict=True):
        if a.placement is Placement.GPU:
            assert a.estimate_bytes - b.estimate_bytes == extra  # all of them on the card
        elif a.placement is Placement.GROUP:
            assert a.block_bytes - b.block_bytes == share  # a resident block costs its share
            assert a.estimate_bytes - b.estimate_bytes == 2 * share  # the computing and prefetched
        else:
            assert a.estimate_bytes - b.estimate_bytes == share
    # A job without a LoRA in a night with one is placed with the night's adapters, and planned so.
    beside = diffuse.ladder(sizes, plain, device="cuda", night=[job])
    assert [p.estimate_bytes for p in beside] == [p.estimate_bytes for p in with_lora]
    # Two jobs of one file hold it once.
    assert diffuse.ladder(sizes, job, device="cuda", night=[job]) == with_lora


# --- input ---------------------------------------------------------------------------------------


def test_the_catalogue_reads_paths_relative_to_itself_and_defaults_apply(files, tmp_path):
    (tmp_path / "styles").mkdir()
    (tmp_path / "sub").mkdir()
    ink = tmp_path / "styles" / "ink.safetensors"
    ink.write_bytes(files["ink"].read_bytes())
    path = tmp_path / "sub" / "templates.toml"
    path.write_text(
        f'[defaults]\nlora = [{{ path = "{files["comfy"]}", scale = 0.5 }}]\n'
        f'[[template]]\nname = "a"\nprompt = "p"\n'
        f'[[template]]\nname = "b"\nprompt = "p"\nlora = []\n'
        '[[template]]\nname = "c"\nprompt = "p"\nlora = [{ path = "../styles/ink.safetensors" }]\n'
    )
    a, b, c = Catalogue.from_file(path, WAN22_RULES).jobs
    assert a.lora == (lora.Lora(str(files["comfy"]), 0.5),)
    assert b.lora == ()
    assert c.lora == (lora.Lora(str(ink.resolve()), 1.0),)
    assert lora.parse("x/y.safetensors:0.25") == lora.Lora("x/y.safetensors", 0.25)
    assert lora.parse("C:/styles/y.safetensors") == lora.Lora("C:/styles/y.safetensors")


def test_a_job_with_loras_comes_back_whole_from_the_run_logs_json(files, tmp_path):
    from t2v.rerun import Night

    job = job_with(files, ("ink", 0.8), ("comfy", -1.5))
    night = Night(jobs=(job,), outputs_dir=tmp_path)
    assert Night.from_json(night.to_json()).jobs == (job,)


def _bad_files(folder: Path) -> dict[str, Path]:
    made = {
        "not-lora": {"blocks.0.attn1.to_q.weight": torch.zeros(2, 2)},
        "other-model": {"transformer.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.zeros(2, 2)},
    }
    out = {}
    for name, tensors in made.items():
        out[name] = folder / f"{name}.safetensors"
        save_file(tensors, out[name])
    out["pickle"] = folder / "pickle.safetensors"
    torch.save({"a": torch.zeros(1)}, out["pickle"])
    return out


@pytest.mark.parametrize(
    ("case", "scale", "message"),
    [
        ("not-lora", 1.0, "`lora` is not a LoRA: its keys do not name lora_A/lora_B"),
        ("other-model", 1.0, "`lora` is not a LoRA for the Wan2.2 transformer: 1 of 1 keys match none"),
        ("pickle", 1.0, "`lora` is not a safetensors file ("),
        ("missing", 1.0, "`lora` file not found but is "),
        ("ink", 4.5, "`lora` scale of {path} must be between -4 and 4 but is 4.5."),
        ("ink", float("nan"), "`lora` scale of {path} must be a number between -4 and 4 but is nan."),
        ("ink", "big", "`lora` scale of {path} must be a number between -4 and 4 but is 'big'."),
    ],
)
def test_bad_loras_are_one_line_naming_template_and_field_before_any_model_loads(
    case, scale, message, files, tmp_path, data_dir, monkeypatch
):
    monkeypatch.setattr(flows.nightly, "nightly", lambda *a, **k: pytest.fail("the flow must not start"))
    path = {**_bad_files(tmp_path), **files}.get(case, tmp_path / "missing.safetensors")
    catalogue = tmp_path / "templates.toml"
    scale_toml = {float("nan"): "nan", "big": '"big"'}.get(scale, repr(scale))
    catalogue.write_text(
        "[defaults]\nheight = 64\nwidth = 96\nframes = 9\nsteps = 2\n\n"
        f'[[template]]\nname = "styled"\nprompt = "p"\n'
        f'lora = [{{ path = "{path.name if case != "ink" else path}", scale = {scale_toml} }}]\n'
    )
    if case not in files:
        path = tmp_path / path.name
    result = CliRunner().invoke(app, ["nightly", "--catalogue", str(catalogue)])
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {catalogue}:8: template 'styled': "), line
    assert message.format(path=path.resolve()) in line, line
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {"transformer.blocks.5.attn1.to_q.lora_A.weight": torch.zeros(4, 24)},
            "it has no layer blocks.5.attn1.to_q (1 of the file's 1 layers are missing)",
        ),
        (
            {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 3072)},
            "its layer blocks.0.attn1.to_q has 24 features in, the file's lora_A 3072",
        ),
        (
            {"transformer.blocks.0.ffn.net.2.lora_B.weight": torch.zeros(3072, 4)},
            "its layer blocks.0.ffn.net.2 has 24 features out, the file's lora_B 3072",
        ),
    ],
    ids=["block-past-the-last", "features-in", "features-out"],
)
def test_a_lora_of_another_size_is_refused_before_any_model_loads(tensors, message, tmp_path):
    # Names of the Wan2.2 transformer's layers (`lora.check` passes them), shapes or blocks of another
    # Wan (a 14B file has 40 blocks of 5120 features): the model's transformer on the meta device says so.
    from t2v.context import check_jobs

    path = tmp_path / "other.safetensors"
    save_file(tensors, path)
    job = JobSpec(template="fox", prompt=PROMPT, lora=(lora.Lora(str(path)),), **SIZE)
    job.validate(WAN22_RULES)
    with pytest.raises(InvalidInput) as caught:
        check_jobs([job], resolve_model("tiny"))
    assert (
        str(caught.value) == f"`lora` does not fit this model's transformer: {message} but is {str(path)!r}."
    )


def test_generate_takes_lora_options(files, data_dir, monkeypatch):
    made = []
    monkeypatch.setattr(flows.generate, "generate", lambda job, **kw: made.append(job) or "clip.mp4")
    common = ["generate", "a fox", "--height", "64", "--width", "96", "--frames", "9", "--steps", "2"]
    args = [*common, "--lora", f"{files['ink']}:0.5", "--lora", str(files["comfy"])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert made[0].lora == (lora.Lora(str(files["ink"]), 0.5), lora.Lora(str(files["comfy"]), 1.0))
    with pytest.raises(InvalidInput, match="is the same file as"):
        job_with(files, ("ink", 1.0), ("ink", 0.5)).validate(WAN22_RULES)


def test_fp8_storage_keeps_the_adapters_in_float32_and_their_effect(files):
    # Loaded before the layerwise casting, the adapters' layers are skipped by it (diffusers' default
    # patterns leave peft's layers alone and turn off peft's input cast); loaded after it they would be
    # created in float8 and the forward fails ("mul_cpu_reduced_float" not implemented for float8).
    job = job_with(files, ("ink", 1.0))
    adapters = lora.Adapters().for_job(job.lora)
    inputs = _transformer_inputs()

    def outputs(fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
        options = diffuse.DiffuseOptions(adapters=adapters, fp8_storage=fp8)
        transformer = apply(
            StagePlan("diffuse", Placement.CPU, device="cpu", options=options), tiny.build_transformer()
        )
        assert {p.dtype for n, p in transformer.named_parameters() if "lora_" in n} == {torch.float32}
        with torch.no_grad():
            lora.activate(transformer, job.lora, device="cpu")
            styled = transformer(*inputs, return_dict=False)[0]
            lora.activate(transformer, (), device="cpu")
            return styled, transformer(*inputs, return_dict=False)[0]

    (styled8, plain8), (styled, plain) = outputs(True), outputs(False)
    # fp8's own deviation (1.2% here) and the style's effect (3.1%) both survive the combination.
    assert rel(styled8, styled) < 1.5 * rel(plain8, plain)
    assert 0.5 < rel(styled8, plain8) / rel(styled, plain) < 2
