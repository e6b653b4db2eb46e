"""Encode: the prompt (and the negative prompt, with guidance) to UMT5 embeddings."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from t2v import stages
from t2v.errors import NonFiniteOutput
from t2v.jobs import JobSpec
from t2v.pipeline.stage import KeyInputs, Stage, Work, Writer
from t2v.plans import ComponentSizes, Placement, PlanOptions, StagePlan

TEXTS_REMEMBERED = 16
"""Embeddings a run keeps in memory by text (4 MB each at full size): the negative prompts, mostly."""


@dataclass(frozen=True)
class EncodeOptions(PlanOptions):
    def offload_target(self, module: torch.nn.Module, placement: Placement) -> torch.nn.Module:
        # UMT5EncoderModel keeps its blocks one level down (encoder.block): block-level offloading of
        # the whole model sees no ModuleList and moves the 11 GB encoder as one group, and naming
        # `encoder` in `block_modules` nests two stream prefetch hooks, which diffusers 0.42 refuses.
        # Offloading the stack itself works: its unmatched group holds the embedding, which `shared`
        # ties to.
        if placement is Placement.GROUP and hasattr(module, "encoder"):
            return module.encoder
        return module


def key(k: KeyInputs) -> dict[str, object]:
    return dict(
        model=k.model.identity,
        prompt=k.job.prompt,
        negative_prompt=k.job.negative_prompt if k.job.cfg else None,
        max_sequence_length=k.model.rules.max_sequence_length,
    )


def ladder(
    s: ComponentSizes,
    job: JobSpec,
    *,
    device: str,
    fp8: bool = False,
    texts: int = 2,
    night: Sequence[JobSpec] = (),
) -> list[StagePlan]:
    if not device.startswith("cuda"):
        return [StagePlan(STAGE.name, Placement.CPU, device="cpu", options=EncodeOptions())]
    tokens = texts * 512
    act = tokens * (s.text_dim * 4 * 8 + s.text_ff_dim * 4 * 3)

    def plan(placement: Placement, estimate: int) -> StagePlan:
        return StagePlan(
            STAGE.name, placement, device=device, options=EncodeOptions(), estimate_bytes=estimate
        )

    return [
        plan(Placement.GPU, s.text_encoder_bytes + act),
        # The embedding table (2.1 GB at full size) is the largest piece that must come on at once.
        plan(Placement.GROUP, s.text_embedding_bytes + 2 * s.text_block_bytes + act),
        plan(Placement.LEAF, s.text_embedding_bytes + act),
    ]


class Texts:
    """Embeddings by text for one run: a night's jobs mostly share one negative prompt, and each pass
    of the 5.7B encoder streams all its weights."""

    def __init__(self) -> None:
        self._by_text: OrderedDict[str, torch.Tensor] = OrderedDict()

    def embed(self, work: Work, encoder: torch.nn.Module, text: str) -> torch.Tensor:
        """One text's embeddings, encoded alone as the pipeline encodes each (so that a text's
        embedding does not depend on what it was batched with)."""
        cached = self._by_text.get(text)
        if cached is not None:
            self._by_text.move_to_end(text)
            return cached
        cached = stages.encode_texts(
            encoder,
            work.run.tokenizer,
            [text],
            device=work.device,
            max_sequence_length=work.run.model.rules.max_sequence_length,
        ).cpu()
        self._by_text[text] = cached
        while len(self._by_text) > TEXTS_REMEMBERED:
            self._by_text.popitem(last=False)
        return cached


def compute(work: Work) -> Writer:
    encoder = work.component()
    texts: Texts = work.state
    wanted = {"cond": work.job.prompt} | ({"uncond": work.job.negative_prompt} if work.job.cfg else {})
    work.progress(0, len(wanted))
    tensors = {}
    for done, (name, text) in enumerate(wanted.items(), start=1):
        tensors[name] = texts.embed(work, encoder, text)
        work.progress(done, len(wanted))  # the live night view counts texts, remembered ones too
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise NonFiniteOutput(f"{work.job.template}: the prompt's embeddings hold NaN or infinite values")
    return work.save_tensors(tensors)


STAGE = Stage(
    name="encode",
    output="embeddings",
    suffix=".safetensors",
    summary="Encode the job's prompt (and negative prompt) to embeddings; returns their store key.",
    task_name="encode-prompt",
    key=key,
    compute=compute,
    component="text_encoder",
    ladder=ladder,
    state=Texts,
)
