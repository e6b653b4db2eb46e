"""A night's work: job specs, their validation, and the template catalogue they come from."""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from t2v import attention as attn
from t2v import images, lora, samplers, step_caches
from t2v.errors import CatalogueError, InvalidInput
from t2v.lora import Lora
from t2v.media import Watermark
from t2v.models.wan22 import DEFAULT_NEGATIVE_PROMPT, WAN22_RULES, ModelRules
from t2v.outputs import (
    DEFAULT_OUTPUTS,
    Output,
    Poster,
    Preview,
    check_outputs,
    coerce_outputs,
    coerce_poster,
    coerce_preview,
)

MAX_SEED = 2**63 - 1
MAX_STEPS = 200
MAX_FPS = 60
TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
"""Template names become file names under data/outputs: no dots, slashes or upper case."""
_SIDE_HELP = f"Pixels; a multiple of {WAN22_RULES.spatial_multiple} up to {WAN22_RULES.max_side}."


@dataclass(frozen=True)
class JobSpec:
    """One clip to make. Every field below, and the model, decides the output."""

    # `metadata["help"]` is the one-line help of the field's `t2v generate` option (t2v_cli reads it with
    # the default from `dataclasses.fields`), so the CLI never restates a default or a rule.
    template: str
    """Catalogue name; also the clip's file name."""
    prompt: str = field(metadata={"help": "What the clip shows."})
    negative_prompt: str = field(
        default=DEFAULT_NEGATIVE_PROMPT, metadata={"help": "What the clip should not show."}
    )
    seed: int = field(default=0, metadata={"help": "Same seed, same clip, on any device."})
    height: int = field(default=480, metadata={"help": _SIDE_HELP})
    width: int = field(default=832, metadata={"help": _SIDE_HELP})
    frames: int = field(
        default=81,
        metadata={"help": f"{WAN22_RULES.temporal_factor}k+1 frames, at most {WAN22_RULES.max_frames}."},
    )
    """`4k + 1` frames; 81 is 3.4 s at 24 fps."""
    steps: int = field(default=50, metadata={"help": "Denoising steps."})
    guidance: float = field(default=5.0, metadata={"help": "Classifier-free guidance; <= 1 turns it off."})
    """Classifier-free guidance scale; <= 1 turns guidance off (one transformer pass a step)."""
    fps: int = field(default=24, metadata={"help": "Frames per second of the MP4."})
    step_cache: float | str = field(default=0.0, metadata={"help": step_caches.HELP})
    """A step cache (t2v/step_caches.py); 0 turns it off (the default). A number up to 1 is diffusers'
    FirstBlockCache at that threshold (a step whose first block barely changed reuses the other blocks'
    last residual); "mag" or "mag:THRESHOLD" is MagCache with its authors' TI2V-5B ratios (whole steps
    reuse the last residual while the ratios predict little change). Faster, and the clip changes, so
    it is opt-in per template and part of the store key."""
    attention: str = field(default=attn.AUTO, metadata={"help": attn.HELP})
    """The attention kernel (t2v/attention.py): "auto" keeps "sdpa" on a CUDA card unless an exact
    kernel by name times clearly faster for the job's size (measured once per size), sdpa off a card;
    "sdpa", "cudnn", "flash" or "efficient" name one. "sage" (SageAttention) is lossy, so opt-in and
    part of the store key."""
    # The first frame from a picture (t2v/images.py): its path (a str, as the run log's JSON keeps it)
    # and how it fills the frame; both None for a text-only job.
    image: str | None = field(
        default=None,
        metadata={
            "help": "Picture for the first frame (the clip animates it). Without --height/--width/--fit the "
            f"clip keeps its aspect at the 832x480 area: {images.example_help()}."
        },
    )
    fit: str | None = field(
        default=None,
        metadata={
            "help": "With --image, fill the --height x --width frame: crop (cover it, centre-crop) or pad "
            "(fit inside it, black bars). Unset: crop, and only with a size given."
        },
    )
    watermark: Watermark = field(default_factory=Watermark)
    # What is made of the clip (t2v/outputs.py): its MP4s, a poster and a preview.
    outputs: tuple[Output, ...] = DEFAULT_OUTPUTS
    """The MP4s, the first being the clip: "native" (as made) and aspects ("9:16", "1:1", "16:9", "4:5"),
    each a name or a table {aspect, fill, focus, background}."""
    fill: str = field(default="crop", metadata={"help": "Reframing to an aspect: crop or pad."})
    focus: str = field(
        default="center",
        metadata={
            "help": "The part a crop keeps (where a pad puts the clip): center, top, bottom, left or right."
        },
    )
    background: str = field(
        default="blur", metadata={"help": "Behind a pad: blur (the clip, enlarged and blurred) or a colour."}
    )
    poster: Poster | None = None
    """A still: first, middle, last, a frame index, or a table {frame, format (jpeg or webp)}."""
    preview: Preview | None = None
    """A looping animation: webp, gif, or a table {format, width, fps, max_bytes}."""
    lora: tuple[Lora, ...] = ()
    """LoRA styles (t2v/lora.py): tables {path, scale}, paths relative to the catalogue; none by default."""
    # The sampler (t2v/samplers.py); unset, the model's own: its folder's preset, else its scheduler.
    sampler: str | None = field(
        default=None,
        metadata={
            "help": "model (the folder's scheduler, --steps), euler or dmd (at --timesteps; dmd has no "
            "guidance). Unset: the folder's preset (FastWan2.2: dmd at 1000,757,522), else model."
        },
    )
    timesteps: tuple[float, ...] = field(
        default=(),
        metadata={
            "help": "For --sampler euler or dmd: timesteps from noise (1000) down, comma-separated, e.g. "
            "1000,757,522; the step count follows from them."
        },
    )
    """Explicit timesteps in [0, 1000], strictly decreasing; when given, `steps` is their number."""

    def __post_init__(self) -> None:
        # A catalogue, the CLI and a re-run's JSON give lists, names and tables: hold them as the
        # (hashable) dataclasses; what cannot be read stays as given for `validate` to name.
        for name, coerce in (
            ("outputs", coerce_outputs),
            ("poster", coerce_poster),
            ("preview", coerce_preview),
            ("lora", lora.coerce),
        ):
            object.__setattr__(self, name, coerce(getattr(self, name)))
        object.__setattr__(self, "timesteps", samplers.coerce_timesteps(self.timesteps))
        if isinstance(self.timesteps, tuple) and self.timesteps:
            object.__setattr__(self, "steps", len(self.timesteps))  # one step per explicit timestep

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0

    @property
    def size_settled(self) -> bool:
        """Whether `height`/`width` are the clip's: a text-only job's always, an image job's once its
        `fit` is set (`images.size_for_picture` may change the size only while `fit` is unset, and
        always sets it)."""
        return self.image is None or self.fit is not None

    def validate(self, rules: ModelRules) -> None:
        """Raise InvalidInput naming the first field that breaks a rule; nothing else is checked later."""
        # fullmatch: `$` alone would also accept a trailing newline, which then lands in a file name.
        if not isinstance(self.template, str) or not TEMPLATE_NAME.fullmatch(self.template):
            _bad(
                "template",
                self.template,
                "must be 1-64 of a-z, 0-9, '-' or '_', starting with a letter or digit",
            )
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str):
                _bad(name, value, "must be text")
        if not self.prompt.strip():
            _bad("prompt", self.prompt, "must not be empty")
        for name in ("seed", "height", "width", "frames", "steps", "fps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                _bad(name, value, "must be a whole number")
        m = rules.spatial_multiple
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % m or value > rules.max_side:
                _bad(name, value, f"must be a positive multiple of {m} up to {rules.max_side}")
        t = rules.temporal_factor
        if self.frames < 1 or (self.frames - 1) % t or self.frames > rules.max_frames:
            _bad("frames", self.frames, f"must be {t}k+1 (e.g. 49, 81, 121) and at most {rules.max_frames}")
        if not 1 <= self.steps <= MAX_STEPS:
            _bad("steps", self.steps, f"must be between 1 and {MAX_STEPS}")
        if not isinstance(self.guidance, int | float) or isinstance(self.guidance, bool):
            _bad("guidance", self.guidance, "must be a number")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            _bad("guidance", self.guidance, "must be a finite number >= 0")
        if not step_caches.valid(self.step_cache):
            _bad("step_cache", self.step_cache, step_caches.RULE)
        if not attn.valid(self.attention):
            _bad("attention", self.attention, attn.RULE)
        if not 1 <= self.fps <= MAX_FPS:
            _bad("fps", self.fps, f"must be between 1 and {MAX_FPS}")
        if not 0 <= self.seed <= MAX_SEED:
            _bad("seed", self.seed, f"must be between 0 and {MAX_SEED}")
        try:
            self.watermark.validate()
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        samplers.check(self, rules)
        self._check_image()
        lora.check(self.lora)
        if self.size_settled:  # else `images.size_for_picture` runs it on the size it settles
            check_outputs(self)

    def _check_image(self) -> None:
        images.check_fit(self.fit)  # a text-only template's too: [defaults] may set it for all
        if self.image is None:
            return
        if not isinstance(self.image, str) or not self.image.strip():
            _bad("image", self.image, "must be the path of a picture")
        images.read_picture(self.image)  # every check a picture must pass, before any model loads

    def check_prompt_length(self, tokenizer, rules: ModelRules) -> None:
        """Reject prompts the text encoder would truncate: a silently cut prompt makes a different clip."""
        for name in ("prompt", "negative_prompt"):
            # verbose=False: the tokenizer's own "longer than the maximum" warning would be a second
            # stderr line beside the one-line error below.
            n = len(tokenizer(getattr(self, name), add_special_tokens=True, verbose=False).input_ids)
            if n > rules.max_sequence_length:
                _bad(
                    name,
                    f"{getattr(self, name)[:40]}...",
                    f"is {n} tokens; the limit is {rules.max_sequence_length}",
                )


def _bad(name: str, value: object, rule: str) -> None:
    raise InvalidInput(f"`{name}` {rule} but is {value!r}.")


# --- the catalogue -------------------------------------------------------------------------------

_JOB_FIELDS = {f.name for f in fields(JobSpec)} - {"template", "watermark"}
_TEMPLATE_KEYS = _JOB_FIELDS | {"name", "watermark"}
_DEFAULT_KEYS = _JOB_FIELDS - {"prompt"} | {"watermark"}
_WATERMARK_KEYS = {f.name for f in fields(Watermark)}


@dataclass(frozen=True)
class Catalogue:
    """The templates of `data/templates.toml` as validated jobs."""

    path: Path
    jobs: tuple[JobSpec, ...]

    @classmethod
    def from_file(cls, path: str | Path, rules: ModelRules) -> Catalogue:
        path = Path(path)
        if not path.is_file():
            raise CatalogueError(f"{path}: catalogue not found; pass `--catalogue PATH` to a TOML file.")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CatalogueError(f"{path}: not UTF-8 text (byte {exc.start}).") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CatalogueError(f"{path}: TOML syntax error: {exc}.") from exc
        return cls(path=path, jobs=tuple(_jobs_from_toml(data, path, text, rules)))


def _jobs_from_toml(data: dict, path: Path, text: str, rules: ModelRules) -> list[JobSpec]:
    unknown = set(data) - {"defaults", "template"}
    if unknown:
        raise CatalogueError(
            f"{path}: unknown top-level key(s) {sorted(unknown)}; use [defaults] and [[template]]."
        )
    defaults = data.get("defaults", {})
    templates = data.get("template", [])
    _check_keys(defaults, _DEFAULT_KEYS, f"{path}: [defaults]")
    _check_watermark(defaults.get("watermark", {}), f"{path}: [defaults] watermark")
    if not isinstance(templates, list) or not templates:
        raise CatalogueError(f"{path}: needs at least one [[template]] table.")
    seen: set[str] = set()
    jobs = []
    for i, raw in enumerate(templates, start=1):
        if not isinstance(raw, dict):
            raise CatalogueError(f"{path}: template #{i} must be a table; write it as [[template]].")
        name = raw.get("name")
        if not isinstance(name, str):
            raise CatalogueError(f"{path}: template #{i}: `name` is required and must be text.")
        # A duplicate is the second `name = ...` line of that name: point at it, not at the first.
        line = template_line(text, name, nth=1 if name in seen else 0)
        where = f"{path}:{line}: template {name!r}" if name else f"{path}: template #{i}"
        _check_keys(raw, _TEMPLATE_KEYS, where)
        if name in seen:
            raise CatalogueError(f"{where}: duplicate template name {name!r}.")
        seen.add(name)
        merged = {**defaults, **{k: v for k, v in raw.items() if k != "name"}}
        if "prompt" not in merged:
            raise CatalogueError(f"{where}: `prompt` is required.")
        _check_watermark(raw.get("watermark", {}), f"{where}: watermark")
        watermark_raw = {**defaults.get("watermark", {}), **raw.get("watermark", {})}
        if watermark_raw.get("image"):
            # Relative image paths are relative to the catalogue, so a catalogue folder can move as a whole.
            watermark_raw["image"] = (path.parent / watermark_raw["image"]).resolve()
        merged["watermark"] = replace(Watermark(), **watermark_raw)
        if isinstance(merged.get("image"), str) and merged["image"].strip():
            merged["image"] = str((path.parent / merged["image"]).resolve())  # relative to the catalogue
        if "lora" in merged:
            merged["lora"] = lora.relative_to(merged["lora"], path.parent)
        job = JobSpec(template=name, **merged)
        try:
            # The model's preset where the template names no sampler; a guidance of the template's own
            # with a sampler that has none is then refused, one from [defaults] turned off.
            job = samplers.resolve(job, rules, guidance_given="guidance" in raw)
            job.validate(rules)
            if job.image is not None:
                # The template's own height/width fix the frame; from [defaults] they give the area.
                size_given = "height" in raw or "width" in raw
                job = images.size_for_picture(job, rules, size_given=size_given)  # outputs checked
        except InvalidInput as exc:
            raise CatalogueError(f"{where}: {exc}") from exc
        jobs.append(job)
    return jobs


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise CatalogueError(f"{where}: must be a table.")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise CatalogueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}.")


def _check_watermark(table: object, where: str) -> None:
    """Keys and value types of a watermark table; Watermark.validate assumes the types are right."""
    _check_keys(table, _WATERMARK_KEYS, where)
    blank = Watermark()
    for key, value in table.items():
        # The defaults tell the type: floats are numbers, the rest (text, image path, corner) is text.
        if isinstance(getattr(blank, key), float):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise CatalogueError(f"{where}: `watermark.{key}` must be a number but is {value!r}.")
        elif not isinstance(value, str):
            raise CatalogueError(f"{where}: `watermark.{key}` must be text but is {value!r}.")


def template_line(text: str, name: object, nth: int = 0) -> int:
    """Line of the `nth` `name = "<name>"` in the file, for messages (tomllib keeps no positions)."""
    pattern = re.compile(rf"^\s*name\s*=\s*[\"']{re.escape(str(name))}[\"']", re.MULTILINE)
    matches = list(pattern.finditer(text))
    return text.count("\n", 0, matches[nth].start()) + 1 if len(matches) > nth else 0
