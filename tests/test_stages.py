"""The staged encode -> denoise -> decode against one call of diffusers' WanPipeline, on the tiny model."""

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from diffusers.hooks import apply_group_offloading

from t2v import stages
from t2v.models import fullsize, tiny
from t2v.placement import chunk_feed_forward

HEIGHT, WIDTH, FRAMES, STEPS, SEED, GUIDANCE = 64, 96, 9, 3, 7, 5.0
PROMPT, NEGATIVE = "a red fox trots through snow", "blurry"


@pytest.fixture(scope="module")
def reference(parts):
    """The pipeline's own latents and frames for the same inputs and seed."""
    pipe = WanPipeline(**parts, scheduler=tiny.build_scheduler(), expand_timesteps=True)
    common = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        max_sequence_length=512,
    )
    latents = pipe(**common, generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
    frames = pipe(**common, generator=torch.Generator().manual_seed(SEED), output_type="np").frames[0]
    return latents, frames


def staged_latents(parts, *, shared_timestep: bool, cfg_batch: int, transformer=None) -> torch.Tensor:
    embeds = stages.encode_texts(
        parts["text_encoder"], parts["tokenizer"], [PROMPT, NEGATIVE], device="cpu", max_sequence_length=512
    )
    shape = stages.latent_shape(48, temporal=4, spatial=16, height=HEIGHT, width=WIDTH, frames=FRAMES)
    noise = stages.initial_noise(shape, seed=SEED, device="cpu")
    return stages.denoise(
        transformer or parts["transformer"],
        tiny.build_scheduler(),
        noise,
        embeds[:1],
        embeds[1:],
        steps=STEPS,
        guidance=GUIDANCE,
        compute_dtype=torch.float32,
        shared_timestep=shared_timestep,
        cfg_batch=cfg_batch,
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_plain_staged_path_is_bit_identical_to_the_pipeline(parts, reference):
    latents = staged_latents(parts, shared_timestep=False, cfg_batch=1)
    torch.testing.assert_close(latents, reference[0], rtol=0, atol=0)
    frames = stages.decode_latents(parts["vae"], latents, device="cpu")
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, stages.to_uint8(reference[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frames_convert_to_uint8_exactly_as_diffusers_postprocesses_them(dtype):
    from diffusers.video_processor import VideoProcessor

    processor = VideoProcessor(vae_scale_factor=16)
    # 21 frames: one chunk of FRAMES_AT_ONCE and a short one; values past [-1, 1] are clipped, and
    # 2 * (k + 0.5) / 255 - 1 lands 255 * x on rounding ties (to even, in both).
    video = torch.randn(1, 3, 21, 8, 10, generator=torch.Generator().manual_seed(0)) * 0.7
    ties = 2 * (torch.arange(80, dtype=torch.float64) + 0.5) / 255 - 1
    video[0, 0, 0] = ties.view(8, 10)
    video = video.to(dtype)
    expected = stages.to_uint8(processor.postprocess_video(video, output_type="np")[0])
    frames = stages.frames_uint8(video, processor)
    assert frames.shape == (21, 8, 10, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, expected)


@pytest.mark.parametrize(("shared_timestep", "cfg_batch"), [(True, 1), (False, 2), (True, 2)])
def test_memory_switches_stay_within_float32_rounding(parts, reference, shared_timestep, cfg_batch):
    # Same values, other GEMM shapes: fp32 reassociation gives ~1e-6 relative after 3 steps; anything
    # near 1e-3 would be a real change in what the model computes.
    latents = staged_latents(parts, shared_timestep=shared_timestep, cfg_batch=cfg_batch)
    assert 0 < rel(latents, reference[0]) < 1e-5 or rel(latents, reference[0]) == 0


def test_chunked_feed_forward_and_group_offload_change_nothing(parts, reference):
    transformer = fullsize.clone(parts["transformer"])
    chunk_feed_forward(transformer, 4)
    apply_group_offloading(
        transformer, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    latents = staged_latents(parts, shared_timestep=False, cfg_batch=1, transformer=transformer)
    assert rel(latents, reference[0]) < 1e-6


def test_resident_blocks_run_unhooked_and_change_nothing(parts, reference):
    from diffusers.hooks import HookRegistry

    from t2v.placement import _resident_blocks_hidden

    streamed = fullsize.clone(parts["transformer"])
    apply_group_offloading(
        streamed, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    mixed = fullsize.clone(parts["transformer"])
    blocks = list(mixed.blocks)
    with _resident_blocks_hidden(mixed, 1) as resident:
        apply_group_offloading(
            mixed, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
        )
    assert list(mixed.blocks) == blocks and resident == [blocks[-1]]  # the whole list is back

    def hooked(block):
        return HookRegistry.check_if_exists_or_initialize(block).get_hook("group_offloading") is not None

    assert [hooked(b) for b in mixed.blocks] == [True] * (len(blocks) - 1) + [False]
    a = staged_latents(parts, shared_timestep=True, cfg_batch=2, transformer=streamed)
    b = staged_latents(parts, shared_timestep=True, cfg_batch=2, transformer=mixed)
    torch.testing.assert_close(b, a, rtol=0, atol=0)  # the same kernels on the same weights
    assert rel(b, reference[0]) < 1e-5


def test_modules_outside_the_blocks_stay_on_the_card_after_their_first_use(parts, reference):
    from diffusers.hooks import HookRegistry

    from t2v.placement import _keep_unmatched_on_card

    transformer = fullsize.clone(parts["transformer"])
    apply_group_offloading(
        transformer, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )

    def group_of(module):
        return HookRegistry.check_if_exists_or_initialize(module).get_hook("group_offloading").group

    unmatched, block = group_of(transformer), group_of(transformer.blocks[0])
    # After each forward diffusers sends this stream-less group to its offload device: by default the
    # host, a copy back (and a copy in again before the next forward).
    assert unmatched.offload_device == torch.device("cpu") and unmatched.stream is None
    _keep_unmatched_on_card(transformer, torch.device("cuda"))
    assert unmatched.offload_device == torch.device("cuda")  # "offloading" it is now staying put
    assert block.offload_device == torch.device("cpu")  # the streamed blocks still leave the card
    _keep_unmatched_on_card(transformer, torch.device("cpu"))  # this test computes on the CPU
    latents = staged_latents(parts, shared_timestep=True, cfg_batch=2, transformer=transformer)
    assert rel(latents, reference[0]) < 1e-5


def test_text_encoder_offloaded_by_blocks_encodes_the_same(parts):
    plain = stages.encode_texts(
        parts["text_encoder"], parts["tokenizer"], [PROMPT], device="cpu", max_sequence_length=512
    )
    encoder = fullsize.clone(parts["text_encoder"])
    apply_group_offloading(
        encoder.encoder, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    offloaded = stages.encode_texts(
        encoder, parts["tokenizer"], [PROMPT], device="cpu", max_sequence_length=512
    )
    torch.testing.assert_close(offloaded, plain, rtol=0, atol=0)
    assert plain.shape == (1, 512, 32)
    assert torch.count_nonzero(plain[0, 40:]) == 0  # zero padding after the prompt's tokens


def test_tiled_and_bf16_decode_deviate_by_measured_amounts(parts, reference):
    latents = reference[0]
    whole = stages.decode_latents(parts["vae"], latents, device="cpu").astype(np.int16)
    vae = fullsize.clone(parts["vae"])
    vae.enable_tiling(
        tile_sample_min_height=64,
        tile_sample_min_width=64,
        tile_sample_stride_height=48,
        tile_sample_stride_width=48,
    )
    tiled = stages.decode_latents(vae, latents, device="cpu").astype(np.int16)
    assert tiled.shape == whole.shape
    # Random weights make seams loud: 11.7/255 mean here with 64 px tiles on a 64x96 clip, and on the
    # full-size VAE 5.3-5.6/255 with 256 px tiles, 14.3/255 with 128 px (docs/benchmarks.md). Two
    # unrelated latents decode 22.5/255 apart here, so 16 still tells "the same picture" from "another".
    assert 0 < np.abs(tiled - whole).mean() < 16
    half = fullsize.clone(parts["vae"]).to(torch.bfloat16)
    bf16 = stages.decode_latents(half, latents, device="cpu").astype(np.int16)
    assert np.abs(bf16 - whole).mean() < 2  # bf16 weights and activations: about 1/255 on average


def test_seed_decides_the_noise():
    shape = (1, 48, 3, 4, 6)
    a = stages.initial_noise(shape, seed=1, device="cpu")
    torch.testing.assert_close(a, stages.initial_noise(shape, seed=1, device="cpu"), rtol=0, atol=0)
    assert not torch.equal(a, stages.initial_noise(shape, seed=2, device="cpu"))


def test_a_jobs_noise_has_its_sizes_latent_shape_and_comes_from_its_seed():
    from t2v.jobs import JobSpec

    job = JobSpec(
        template="fox", prompt="a fox", seed=SEED, height=HEIGHT, width=WIDTH, frames=FRAMES, steps=2
    )
    noise = stages.job_noise(job, 48, temporal=4, spatial=16, device="cpu")

    assert noise.shape == (1, 48, (FRAMES - 1) // 4 + 1, HEIGHT // 16, WIDTH // 16)
    torch.testing.assert_close(
        noise, stages.initial_noise(noise.shape, seed=SEED, device="cpu"), rtol=0, atol=0
    )


def test_fp8_storage_is_a_visible_opt_in_change(parts, reference):
    from t2v.jobs import JobSpec
    from t2v.pipeline import diffuse
    from t2v.placement import apply
    from t2v.plans import ComponentSizes

    job = JobSpec(template="x", prompt=PROMPT, height=HEIGHT, width=WIDTH, frames=FRAMES, steps=STEPS)
    sizes = ComponentSizes.from_modules(transformer=parts["transformer"])
    assert not diffuse.STAGE.ladder(sizes, job, device="cpu")[0].options.fp8_storage  # off unless asked for
    plan = diffuse.STAGE.ladder(sizes, job, device="cpu", fp8=True)[0]
    transformer = apply(plan, fullsize.clone(parts["transformer"]))
    assert next(transformer.blocks[0].ffn.parameters()).dtype == torch.float8_e4m3fn
    latents = staged_latents(parts, shared_timestep=True, cfg_batch=2, transformer=transformer)
    # Measured 0.67% on the tiny model and ~4.9% on the full-size one after 3 steps: a real change
    # in the output, which is why it is opt-in and part of the store key.
    assert 1e-3 < rel(latents, reference[0]) < 5e-2


def test_step_cache_is_off_by_default_and_skips_blocks_when_on(parts, reference):
    from t2v.pipeline.diffuse import step_cache

    transformer = fullsize.clone(parts["transformer"])
    calls = []
    # On the FFN inside the block: the cache replaces a skipped block's forward, not its __call__.
    transformer.blocks[1].ffn.register_forward_hook(lambda *args: calls.append(1))
    with step_cache(transformer, 0.0):
        plain = staged_latents(parts, shared_timestep=False, cfg_batch=1, transformer=transformer)
    torch.testing.assert_close(plain, reference[0], rtol=0, atol=0)
    full_calls = len(calls)
    assert full_calls == 2 * STEPS  # cond and uncond, every step

    calls.clear()
    with step_cache(transformer, 0.9):  # a threshold so loose that every step after the first is reused
        cached = staged_latents(parts, shared_timestep=False, cfg_batch=1, transformer=transformer)
    assert len(calls) < full_calls
    assert rel(cached, reference[0]) > 1e-4  # the clip changes: hence opt-in and in the store key
    assert not transformer.is_cache_enabled  # the component goes back to the next job uncached


def test_tiles_blended_on_the_host_decode_the_same_and_leave_with_their_job(parts, reference):
    from diffusers.hooks import HookRegistry

    from t2v.pipeline.decode import DecodeOptions, Tiles, TilesToHost, decode_frames

    latents, vae = reference[0], fullsize.clone(parts["vae"])
    tiles = Tiles(height=64, width=64, stride_height=48, stride_width=48)

    def hooked() -> bool:
        return HookRegistry.check_if_exists_or_initialize(vae.decoder).get_hook(TilesToHost.NAME) is not None

    on_card = stages.decode_latents(DecodeOptions(vae_tiles=tiles).configure(vae), latents, device="cpu")
    assert not hooked()
    DecodeOptions(vae_tiles=tiles, tiles_to_host=True).configure(vae)
    assert hooked()
    on_host = decode_frames(vae, latents, device="cpu")
    np.testing.assert_array_equal(on_host, on_card)
    DecodeOptions(vae_tiles=tiles, tiles_to_host=True).configure(vae)  # the next job's: one hook, not two
    DecodeOptions().configure(vae)  # a whole-frame job on the same component: no hook left behind
    assert not hooked()
    whole = stages.decode_latents(vae, latents, device="cpu")
    np.testing.assert_array_equal(whole, stages.to_uint8(reference[1]))


def test_tiles_sent_to_the_host_wait_for_the_card_once_a_tile(parts, reference, monkeypatch):
    """The pieces go to the host without waiting; diffusers' tiled decode reads them when it concatenates
    a tile's pieces, after its last one, which is where the card must be waited for. Latents within one
    tile decode whole frames, concatenated piece by piece: each piece is waited for."""
    from t2v.pipeline.decode import DecodeOptions, Tiles, TilesToHost, decode_frames, decoder_passes

    latents, vae = reference[0], fullsize.clone(parts["vae"])
    frames = latents.shape[2]
    waits: list[int] = []
    monkeypatch.setattr(TilesToHost, "wait", lambda hook: waits.append(hook._passes))
    tiles = Tiles(height=64, width=64, stride_height=48, stride_width=48)
    DecodeOptions(vae_tiles=tiles, tiles_to_host=True).configure(vae)
    decode_frames(vae, latents, device="cpu")
    count = decoder_passes(vae, tuple(latents.shape)) // frames
    assert count > 1 and frames > 1
    assert waits == [frames] * count  # once a tile, at its last piece

    waits.clear()
    height, width = (side * vae.spatial_compression_ratio for side in latents.shape[-2:])
    DecodeOptions(vae_tiles=Tiles(height, width, height, width), tiles_to_host=True).configure(vae)
    decode_frames(vae, latents, device="cpu")
    assert waits == list(range(1, frames + 1))


def test_a_whole_card_decode_plan_casts_its_weights_where_they_go(parts, monkeypatch):
    """A bf16 decode plan placed whole moves the decoder first and casts it there (on a card ~10x faster
    than the host's cast): the host's fp32 copy is never cast, and the weights equal a host cast's."""
    from t2v.pipeline.decode import DecodeOptions
    from t2v.placement import apply
    from t2v.plans import Placement, StagePlan

    options = DecodeOptions(vae_dtype="bfloat16")
    on_host = options.prepare(fullsize.clone(parts["vae"]))
    casts: list[str] = []
    real_to = torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        if dtype is not None:
            casts.append(str(next(module.parameters()).device))
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    plan = StagePlan("decode", Placement.GPU, device="meta", options=options)
    placed = apply(plan, fullsize.clone(parts["vae"]))
    monkeypatch.undo()
    assert casts == ["meta"]  # one cast, of weights already at the destination
    assert placed.encoder is None
    assert {p.device.type for p in placed.parameters()} == {"meta"}
    assert {p.dtype for p in placed.parameters()} == {torch.bfloat16}
    names = [n for n, _ in on_host.named_parameters()]
    assert names == [n for n, _ in placed.named_parameters()]
    conv = next(m for m in placed.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_blocks_compile_after_the_first_forward_where_group_offloading_learns_their_order(parts):
    """Under group offloading with streams, diffusers tracks the blocks' order in the first forward with
    a hook per block that dynamo would guard on (a recompile per block); `compile_blocks` compiles
    after that forward there, and at once elsewhere."""
    from diffusers.hooks import HookRegistry, ModelHook

    from t2v.placement import LAZY_PREFETCH, compile_blocks

    graphs = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    def compiled(module: torch.nn.Module) -> list[bool]:
        return [block._compiled_call_impl is not None for block in module.blocks]

    inputs = dict(
        hidden_states=torch.randn(1, 48, 2, 4, 6),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 16, 32),
        return_dict=False,
    )
    torch._dynamo.reset()
    try:
        plain = tiny.build_transformer()
        compile_blocks(plain, backend=counting)
        assert compiled(plain) == [True, True]

        streamed = tiny.build_transformer()
        HookRegistry.check_if_exists_or_initialize(streamed).register_hook(ModelHook(), LAZY_PREFETCH)
        compile_blocks(streamed, backend=counting)
        assert compiled(streamed) == [False, False]
        with torch.no_grad():
            first = streamed(**inputs)[0]
            assert compiled(streamed) == [True, True] and not graphs  # the first forward ran eager
            torch.testing.assert_close(streamed(**inputs)[0], first)
        assert len(graphs) == 1  # then both blocks shared one graph
    finally:
        torch._dynamo.reset()
