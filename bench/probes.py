"""bench/nightly_throughput.py's measurements beside the night, on the same card and cap: pinning speed,
the step cache and `torch.compile` of the transformer placed by the night's diffuse plan, and the
warm-up that starts a night from an earlier night's compile cache."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable

from bench.night import log
from bench.session import GiB, Session


def pin_probe(torch, gib: float = 2.0) -> dict:
    """Seconds to pin `gib` of host memory with cudaHostAlloc and with the host-register path."""
    out = {}
    src = torch.empty(int(gib * GiB), dtype=torch.uint8)
    src.fill_(1)
    for name, setting in (("cudaHostAlloc", "False"), ("cudaHostRegister_8_threads", "True")):
        try:
            torch.cuda.memory._set_allocator_settings(f"pinned_use_cuda_host_register:{setting}")
            start = time.perf_counter()
            pinned = src.pin_memory()
            out[name + "_s"] = time.perf_counter() - start
            start = time.perf_counter()
            pinned.to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            out[name + "_h2d_gb_s"] = gib * GiB / 1e9 / (time.perf_counter() - start)
            del pinned
            torch._C._host_emptyCache()
        except Exception as exc:
            out[name + "_error"] = f"{type(exc).__name__}: {exc}"
    torch.cuda.memory._set_allocator_settings("pinned_use_cuda_host_register:True")
    return out


def optional_phase(s: Session, name: str, fn: Callable[[], dict]) -> None:
    """Run phase `name` unless skipped or past `--deadline-s`; an error is its record, not the end."""
    if name in s.skip:
        return
    if s.past_deadline():
        s.results["phases"][name] = {"skipped": f"past --deadline-s {s.args.deadline_s}"}
        s.save()
        return
    try:
        s.results["phases"][name] = fn()
    except Exception as exc:
        traceback.print_exc()
        s.results["phases"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    log(f"{name}: {s.results['phases'][name]}")
    s.save()


def transformer_for_night(s: Session):
    """The transformer placed by the plan the night used for its diffuse stage: (plan, module)."""
    from t2v.models import registry
    from t2v.pipeline import diffuse
    from t2v.placement import apply
    from t2v.plans import ComponentSizes, choose
    from t2v.vram import probe

    component = diffuse.STAGE.component
    sizes = ComponentSizes.from_modules(**{component: registry.skeleton(s.ref, component)})
    ladder = diffuse.STAGE.ladder(sizes, s.jobs[0], device=s.device, fp8=False)
    plan = choose(ladder, probe(budget_gib=s.args.cap_gib if s.cuda else None).budget_bytes)[0]
    return plan, apply(plan, registry.load_component(s.ref, component))


def denoise_once(s: Session, transformer, plan, job, steps: int, embeds=None) -> tuple:
    """`steps` steps of `job` on the placed `transformer` (from the night's embeddings unless given):
    (latents, seconds of each step)."""
    from t2v import stages
    from t2v.models import registry
    from t2v.pipeline import encode

    if embeds is None:
        embeds = s.store.load_tensors(encode.STAGE, s.keys(job)[encode.STAGE])
    temporal, spatial = registry.vae_factors(s.ref)
    noise = stages.job_noise(
        job, transformer.config.in_channels, temporal=temporal, spatial=spatial, device=s.device
    )
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(i, n):
        if s.cuda:
            s.torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    last[0] = time.perf_counter()
    latents = stages.denoise(
        transformer,
        registry.load_scheduler(s.ref),
        noise,
        embeds["cond"],
        embeds.get("uncond"),
        steps=steps,
        guidance=job.guidance,
        compute_dtype=s.ref.weight_dtype,
        shared_timestep=plan.options.shared_timestep,
        cfg_batch=plan.options.cfg_batch,
        on_step=on_step,
    )
    return latents, times


def warm_compile(s: Session) -> dict:
    """`--warm-compile`: the blocks compiled once at the night's shapes (random embeddings of the
    encoder's shape), then Dynamo reset: Inductor's on-disk cache is what an earlier night left."""
    from t2v.models import registry
    from t2v.pipeline import encode
    from t2v.settings import get_settings

    torch = s.torch
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(get_settings().inductor_dir)  # the night's
    s.cap(True)
    start = time.perf_counter()
    plan, transformer = transformer_for_night(s)
    transformer.compile_repeated_blocks(dynamic=False)
    width = registry.skeleton(s.ref, encode.STAGE.component).config.d_model
    text = torch.randn(1, s.ref.rules.max_sequence_length, width, dtype=s.ref.weight_dtype, device=s.device)
    _, times = denoise_once(s, transformer, plan, s.jobs[0], 2, {"cond": text, "uncond": text})
    del transformer
    s.free()
    torch._dynamo.reset()
    return {"plan": plan.name, "s": time.perf_counter() - start, "step_times": times}


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def step_cache_phase(s: Session, night_latents: dict) -> dict:
    """The first-block cache on one job at three thresholds: speed, and how far its latents move from
    the uncached run's (which must be the night's)."""
    from t2v.pipeline.diffuse import step_cache

    s.free()
    s.cap(True)
    plan, transformer = transformer_for_night(s)
    job, steps = s.jobs[0], s.args.steps
    out = {"plan": plan.name}
    plain, plain_times = denoise_once(s, transformer, plan, job, steps)
    out["uncached_s"] = sum(plain_times)
    out["uncached_matches_night"] = rel(plain.cpu(), night_latents[job.template])
    for threshold in (0.1, 0.3, 1.0):
        with step_cache(transformer, threshold):
            cached, times = denoise_once(s, transformer, plan, job, steps)
        out[f"threshold_{threshold}"] = {
            "s": sum(times),
            "speedup": sum(plain_times) / sum(times),
            "latents_rel_change": rel(cached.cpu(), plain.cpu()),
        }
    out["step_times_uncached"] = plain_times
    return out


def _median(times: list[float]) -> float:
    later = times[1:] or times
    return sorted(later)[len(later) // 2]


def compile_phase(s: Session) -> dict:
    """After the night: what the next night's compile costs. Dynamo's in-process caches are reset;
    Inductor's on-disk cache (beside the store, as the runner sets it) keeps the night's kernels, as
    it does for the next night's flow-run process (which also pays ~imports this process has)."""
    s.free()
    s.cap(True)
    s.torch._dynamo.reset()
    plan, transformer = transformer_for_night(s)
    job = s.jobs[0]
    out = {"plan": plan.name, "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    plain, plain_times = denoise_once(s, transformer, plan, job, 3)
    start = time.perf_counter()
    transformer.compile_repeated_blocks(fullgraph=False, dynamic=False)
    out["compile_call_s"] = time.perf_counter() - start
    _, first = denoise_once(s, transformer, plan, job, 3)
    compiled, again = denoise_once(s, transformer, plan, job, 3)
    out["latents_rel_change"] = rel(compiled.cpu(), plain.cpu())
    out["uncompiled_step_times"] = plain_times
    out["first_compiled_step_times"] = first
    out["compiled_step_times"] = again
    out["compile_overhead_s"] = sum(first) - sum(again)
    base, later = _median(plain_times), _median(again)
    out["median_step_uncompiled_s"] = base
    out["median_step_compiled_s"] = later
    out["break_even_steps"] = out["compile_overhead_s"] / (base - later) if base > later else None
    return out
