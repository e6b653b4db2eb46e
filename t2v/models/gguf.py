"""Single-file GGUF transformers (`--model FOLDER+FILE.gguf`): checking a file without reading its
weights, its identity, its sizes as loaded, loading it through diffusers, and writing one.

Published GGUFs of Wan2.2-TI2V-5B (QuantStack's, city96's for ComfyUI) hold only the transformer, in
the original Wan key layout; the text encoder, VAE, tokenizer and scheduler still come from the
diffusers folder. diffusers reads them with `WanTransformer3DModel.from_single_file` and a
`GGUFQuantizationConfig`: quantised Linear weights stay packed (`GGUFParameter`, uint8) and are
dequantised to bf16 at each forward (`GGUFLinear`); the rest loads as from a folder.

Run `python -m t2v.models.gguf write FOLDER OUT.gguf --type Q8_0` to write one from a saved diffusers
folder, tensor by tensor (the GPU benchmarks' full-size random transformer has no published GGUF).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from t2v.errors import ModelNotFound

if TYPE_CHECKING:  # gguf costs 0.5 s to import: only the functions that read or write files do
    from gguf import GGMLQuantizationType

MAGIC = b"GGUF"
SUFFIX = ".gguf"
_SAMPLES, _SAMPLE_BYTES = 16, 64 * 1024
"""The identity hashes the header and tensor table, plus 16 slices of 64 KiB spread over the data:
1 MiB read of a 5 GB file, so two files with the same tensor table but other weights (a fine-tune
quantised the same way) still differ, where the header alone would not tell them apart."""


def split_spec(spec: str) -> tuple[str, str] | None:
    """`FOLDER+FILE.gguf` as (FOLDER, FILE), split on the last `+` whose right side ends in `.gguf`
    and, where several do (a `+` in the file's own name), whose left side is a folder; None if none."""
    cuts = [i for i, c in enumerate(spec) if c == "+" and spec[i + 1 :].lower().endswith(SUFFIX)]
    if not cuts:
        return None
    cut = next((i for i in reversed(cuts) if Path(spec[:i]).expanduser().is_dir()), cuts[-1])
    return spec[:cut], spec[cut + 1 :]


# --- checking a file, without its weights ---------------------------------------------------------


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF transformer as checked by `inspect`: what goes into the model's identity."""

    path: Path
    size: int
    digest: str
    """sha256 of the header and tensor table and a sample of the data (see `_SAMPLES`)."""
    types: tuple[str, ...]
    """The tensor types it holds, e.g. ('F32', 'Q8_0')."""

    @property
    def identity(self) -> str:
        return f"gguf:{self.path.name}:{self.size}:{self.digest}"


def inspect(path: str) -> GGUFFile:
    """Check that `path` is a GGUF whose tensor types diffusers can dequantise; raises ModelNotFound.
    Reads the header and tensor table (memory-mapped), not the weights."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelNotFound(f"`--model` file {path!r} does not exist (FOLDER+FILE.gguf wants a GGUF file).")
    with open(file, "rb") as f:
        head = f.read(len(MAGIC))
    if head != MAGIC:
        raise ModelNotFound(
            f"`--model` file {path!r} is not a GGUF file: it starts with {head!r}, not {MAGIC!r}."
        )
    reader = _reader(file)
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - set(_loadable_types()))
    if unsupported:
        raise ModelNotFound(
            f"`--model` file {path!r} holds tensors of type {', '.join(unsupported)}, which diffusers cannot "
            f"dequantise; use a file of {', '.join(sorted(_loadable_types()))} (Q8_0 or Q4_K_M as published)."
        )
    size = file.stat().st_size
    types = tuple(sorted({t.tensor_type.name for t in reader.tensors}))
    return GGUFFile(
        path=file.resolve(), size=size, digest=_digest(file, reader.data_offset, size), types=types
    )


def _reader(file: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(file)
    except Exception as exc:  # a damaged header or a file cut short fails in many ways inside gguf
        raise ModelNotFound(
            f"`--model` file {str(file)!r} is a damaged or incomplete GGUF file ({exc}); download it again."
        ) from exc


@functools.cache
def _loadable_types() -> frozenset[str]:
    """Types diffusers loads: what its dequantiser knows, and F32/F16 (loaded as plain tensors)."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    return frozenset(t.name for t in SUPPORTED_GGUF_QUANT_TYPES) | {"F32", "F16"}


def _digest(file: Path, data_offset: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        digest.update(f.read(data_offset))
        span = max(size - data_offset, 0)
        for i in range(_SAMPLES):
            f.seek(data_offset + span * i // _SAMPLES)
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    """One tensor of the file, under its diffusers name."""

    shape: tuple[int, ...]
    """Its shape in the model (the dequantised shape)."""
    packed: tuple[int, ...] | None
    """Shape of its uint8 blocks where it stays quantised when loaded; None for F32/F16."""


@functools.lru_cache(maxsize=4)
def tensor_table(file: GGUFFile) -> dict[str, Entry]:
    """The file's tensors by diffusers name, renamed by diffusers' own conversion of the Wan layout."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    entries = {}
    for t in _reader(file.path).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        packed = None if t.tensor_type.name in ("F32", "F16") else tuple(t.data.shape)
        entries[t.name] = Entry(shape=shape, packed=packed)
    return convert_wan_transformer_to_diffusers(entries)


def check_fits(file: GGUFFile, skeleton: torch.nn.Module, folder: str) -> None:
    """Refuse a file whose tensors are not the folder's transformer's (another model size, another
    model); raises ModelNotFound naming the file and the first tensor that differs."""
    want = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    got = {name: e.shape for name, e in tensor_table(file).items()}
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    wrong = [n for n in sorted(want.keys() & got.keys()) if want[n] != got[n]]
    if missing or extra or wrong:
        what = (
            f"{wrong[0]!r} is {list(got[wrong[0]])} in it and {list(want[wrong[0]])} in the folder"
            if wrong
            else f"it lacks {missing[:2]}"
            if missing
            else f"it has tensors the folder's does not, {extra[:2]}"
        )
        raise ModelNotFound(
            f"`--model` file {str(file.path)!r} is not a transformer for the folder {folder!r}: {what} "
            f"({len(missing)} missing, {len(extra)} extra, {len(wrong)} of another shape)."
        )


def as_loaded(skeleton: torch.nn.Module, file: GGUFFile) -> torch.nn.Module:
    """`skeleton` (meta, cast as from_pretrained casts) with each weight that stays quantised when
    loaded replaced by its uint8 blocks, so that the planner sees the bytes the card will hold.

    A quantised tensor under one of the class's `_keep_in_fp32_modules` is dequantised to fp32 at
    load (diffusers' GGUFQuantizer), and F32/F16 tensors load in the model's dtype: those keep the
    skeleton's own parameter."""
    keep = getattr(skeleton, "_keep_in_fp32_modules", None) or []
    for name, entry in tensor_table(file).items():
        if entry.packed is None or any(k in name.split(".") for k in keep):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = skeleton.get_submodule(owner_name)
        owner._parameters[attr] = torch.nn.Parameter(
            torch.empty(entry.packed, dtype=torch.uint8, device="meta"), requires_grad=False
        )
    return skeleton


def load_transformer(file: str, folder: str, dtype: torch.dtype) -> torch.nn.Module:
    """The GGUF transformer on the host, its config from `folder`'s transformer, computing in `dtype`.

    diffusers copies the file's tensors into host memory as it reads them: the load holds about the
    file's size (not the bf16 model's), and the loaded transformer is that size."""
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    return WanTransformer3DModel.from_single_file(
        file,
        config=folder,
        subfolder="transformer",
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
        torch_dtype=dtype,
    ).eval()


# --- writing one ------------------------------------------------------------------------------------

_TO_ORIGINAL = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"\.norm2\.", ".norm3."),  # diffusers' norm2 (cross-attention, affine) is Wan's norm3
)
"""diffusers names to the original Wan layout. Written out rather than derived: diffusers' renames
are a local table of `convert_wan_transformer_to_diffusers`, and not invertible as they stand (two
entries give `scale_shift_table`, two `proj_out`). `original_names` checks every use against that
function, so this table cannot drift from it unnoticed."""


def original_names(names: list[str]) -> dict[str, str]:
    """diffusers name -> Wan name, checked: diffusers' conversion must map each back to itself."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    mapping = {}
    for name in names:
        original = name
        for pattern, replacement in _TO_ORIGINAL:
            original = re.sub(pattern, replacement, original)
        mapping[name] = original
    back = convert_wan_transformer_to_diffusers({o: d for d, o in mapping.items()})
    wrong = [(d, o) for o, d in back.items() if o != d]
    if wrong or len(back) != len(names):
        raise RuntimeError(f"diffusers' Wan conversion no longer inverts t2v's: {wrong[:3]}")
    return mapping


def quantised_type(
    name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, keep: list[str]
) -> GGMLQuantizationType:
    """What `write` stores a tensor as: `qtype` for a matrix whose rows split into its blocks, else
    F32 (biases, norms, the patch embedding, and modules the class keeps in fp32, which diffusers
    would dequantise at load anyway, so quantising them would lose precision for nothing)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block = GGML_QUANT_SIZES[qtype][0]
    if len(shape) < 2 or shape[-1] % block or any(k in name.split(".") for k in keep):
        return GGMLQuantizationType.F32
    return qtype


def write(
    out: Path,
    shapes: Mapping[str, tuple[int, ...]],
    get: Callable[[str], torch.Tensor],
    qtype: GGMLQuantizationType,
    keep: list[str],
) -> None:
    """Write a GGUF of the tensors named in `shapes` (diffusers names), fetching each with `get` only
    when it is written: the header goes first, from the shapes alone, so one tensor at a time is held."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quant_shape_to_byte_shape, quantize

    names = original_names(list(shapes))
    types = {n: quantised_type(n, tuple(s), qtype, keep) for n, s in shapes.items()}
    writer = GGUFWriter(out, arch="wan")
    for name, shape in shapes.items():
        t = types[name]
        if t is GGMLQuantizationType.F32:
            writer.add_tensor_info(names[name], shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            packed = quant_shape_to_byte_shape(shape, t)
            writer.add_tensor_info(names[name], packed, np.dtype(np.uint8), int(np.prod(packed)), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name in shapes:
        data = get(name).detach().to(torch.float32).cpu().numpy()
        writer.write_tensor_data(
            data if types[name] is GGMLQuantizationType.F32 else quantize(data, types[name])
        )
    writer.close()


def write_module(module: torch.nn.Module, out: Path, qtype: GGMLQuantizationType) -> None:
    """A GGUF of a transformer in memory (the tests' tiny one)."""
    state = module.state_dict()
    write(out, {n: tuple(t.shape) for n, t in state.items()}, state.__getitem__, qtype, _keep(module))


def write_folder(folder: Path, out: Path, qtype: GGMLQuantizationType) -> None:
    """A GGUF of a diffusers folder's transformer, read tensor by tensor from its memory-mapped
    safetensors: host memory holds one tensor (and its float32 copy), not the model."""
    from diffusers import WanTransformer3DModel

    with _folder_tensors(Path(folder) / "transformer") as (shapes, get):
        write(out, shapes, get, qtype, list(WanTransformer3DModel._keep_in_fp32_modules or []))


@contextmanager
def _folder_tensors(
    folder: Path,
) -> Iterator[tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{str(folder)!r} holds no .safetensors files")
    with ExitStack() as stack:
        owners, shapes = {}, {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            for name in handle.keys():
                owners[name] = handle
                shapes[name] = tuple(handle.get_slice(name).get_shape())
        yield shapes, lambda name: owners[name].get_tensor(name)


def _keep(module: torch.nn.Module) -> list[str]:
    return list(getattr(module, "_keep_in_fp32_modules", None) or [])


def writable_types() -> list[str]:
    """Types `write` can produce that diffusers can load: those the gguf package can quantise (it
    cannot quantise K-quants such as Q4_K; published Q4_K_M files come from llama.cpp's C tools)."""
    return ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m t2v.models.gguf",
        description="Write a GGUF transformer from a diffusers folder. Example: python -m t2v.models.gguf "
        "write /models/wan-random /models/wan-random-Q8_0.gguf --type Q8_0",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write", help="FOLDER's transformer as OUT.gguf, one tensor at a time")
    w.add_argument("folder", type=Path, help="a Wan2.2 diffusers folder (with transformer/)")
    w.add_argument("out", type=Path, help="the GGUF file to write")
    w.add_argument("--type", default="Q8_0", choices=writable_types(), help="quantisation of the matrices")
    args = parser.parse_args(argv)
    from gguf import GGMLQuantizationType

    start = time.perf_counter()
    write_folder(args.folder, args.out, GGMLQuantizationType[args.type])
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.1f} MB, {args.type}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
