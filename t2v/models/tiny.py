"""The built-in `tiny` model: Wan2.2 TI2V's real architecture with tiny configs and seeded random weights.

It runs every code path of the real model (UMT5 encoder, WanTransformer3DModel with 48 latent
channels and per-token timesteps, the residual Wan2.2 VAE with patch 2 and 16x spatial / 4x temporal
compression, UniPC with flow sigmas) on a CPU in well under a second for small clips. Each component
is drawn from its own fixed seed, so building one never depends on having built another, and the
weights are bit-identical on every machine. Nothing is downloaded: the tokenizer is byte-level and
built here.
"""

from __future__ import annotations

from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from t2v.models.seeding import seeded
from t2v.models.wan22 import FULL_SIZE, MAX_SEQUENCE_LENGTH, WAN22_RULES

SEED = 2022
"""Bumping this (or any config below) changes the model identity, hence every store key."""
IDENTITY = f"tiny-wan2.2-ti2v@seed{SEED}-v1"

_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in UMT5

ROPE_POSITIONS = max(
    WAN22_RULES.max_side // WAN22_RULES.spatial_multiple,
    (WAN22_RULES.max_frames - 1) // WAN22_RULES.temporal_factor + 1,
)
"""Rotary positions per axis the transformer's table must hold: a side of `max_side` px is
max_side / 16 (VAE) / 2 (patch) = 40 tokens, the longest clip 31 latent frames.

It was 32, so every side over 1024 px failed in the first forward. The table's rows do not depend on
its length (row i is position i) and it holds no weights, so the longer table changes neither the
weights nor any clip that ran before: IDENTITY, and with it every store key, stays as it was."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per UTF-8 byte, `</s>` appended as UMT5's tokenizer does."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def build_text_encoder() -> UMT5EncoderModel:
    config = UMT5Config(
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        vocab_size=len(_SPECIAL_TOKENS) + 256,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    # eval(): a freshly built model is in training mode, whose dropout would make encoding random.
    with seeded(SEED):
        return UMT5EncoderModel(config).eval()


def build_transformer() -> WanTransformer3DModel:
    with seeded(SEED + 1):
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=48,
            out_channels=48,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=ROPE_POSITIONS,
        ).eval()


def build_vae() -> AutoencoderKLWan:
    kwargs = dict(FULL_SIZE["vae"]["kwargs"])
    kwargs.update(base_dim=4, decoder_base_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    with seeded(SEED + 2):
        return AutoencoderKLWan(**kwargs).eval()


def build_scheduler() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(**FULL_SIZE["scheduler"]["kwargs"])
