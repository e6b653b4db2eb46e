"""Options shared by several commands, and `job_option`: the options that fill a JobSpec.

A job option's default and help are the JobSpec field's (its default and `metadata["help"]`), so that
`t2v generate` and a catalogue template without the key always agree and the CLI restates nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer

from t2v.jobs import JobSpec

_JOB_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(JobSpec)}


def job_help(name: str) -> str:
    """The help text of JobSpec field `name`; a KeyError for a field that has none is a bug here."""
    return _JOB_FIELDS[name].metadata["help"]


def job_option(name: str) -> Any:
    """A `typer.Option` with JobSpec field `name`'s default and help, for use as a parameter's default.

    This is typer's older style (`height: int = job_option("height")`) on purpose: with `Annotated` the
    default has to be the parameter's own default, which would be a second place that states it.
    """
    field = _JOB_FIELDS[name]
    if field.default is dataclasses.MISSING:
        raise TypeError(f"JobSpec.{name} has no default to offer as an option")
    return typer.Option(field.default, help=job_help(name))


Fp8Option = Annotated[
    bool,
    typer.Option(
        "--fp8-storage",
        help="Keep the transformer's weights in float8 and compute in bf16: less VRAM and PCIe traffic, "
        "but the clip changes (latents ~5% off after 3 steps on random weights). Off by default.",
    ),
]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace a file already at the clip's path that is not this clip. Without it the command "
        "stops before any work; the same clip made again is never an overwrite.",
    ),
]
ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        help="'tiny' (built in, random weights), a Wan2.2-TI2V-5B diffusers folder, "
        "a hub id such as Wan-AI/Wan2.2-TI2V-5B-Diffusers, or FOLDER+FILE.gguf: the folder with its "
        "transformer replaced by a quantised GGUF file (opt-in; the clip changes).",
    ),
]
CatalogueOption = Annotated[str, typer.Option(help="TOML file of [defaults] and [[template]] tables.")]
DEFAULT_CATALOGUE = "data/templates.toml"
