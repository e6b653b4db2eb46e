"""Every row of docs/bad_input.md through the CLI: one line, exit 2, no traceback, nothing written.

The table in the document is the single list of rejected inputs; this test reads its rows as parameters,
so a row added there is tested and a message changed here must be changed there.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import flows.generate
import flows.nightly
import flows.rerun
import t2v_cli.checks
from t2v_cli.main import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"
LONG = "a" * 600
"""600 letters: 601 tokens with the end-of-text token, one table of the doc calls it `{long}`."""


def _cell(text: str) -> str:
    text = text.strip()
    for fence in ("``", "`"):
        if len(text) >= 2 * len(fence) and text.startswith(fence) and text.endswith(fence):
            return text[len(fence) : -len(fence)].strip()
    return text


def _rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            cells = line.strip().strip("|").split(" | ")
            assert len(cells) == 5, line
            case, _, command, extra, message = (_cell(c) for c in cells)
            rows.append((case, command, extra, message))
    return rows


ROWS = _rows()


def test_the_table_is_long_enough_and_ids_are_unique():
    assert len(ROWS) >= 30
    assert len({case for case, *_ in ROWS}) == len(ROWS)


@pytest.mark.parametrize(("case", "command", "extra", "message"), ROWS, ids=[r[0] for r in ROWS])
def test_rejected_input(case, command, extra, message, data_dir, tmp_path, monkeypatch):
    def no_flow(*args, **kwargs):
        raise AssertionError("the flow must not start")

    for module, name in ((flows.generate, "generate"), (flows.nightly, "nightly"), (flows.rerun, "rerun")):
        monkeypatch.setattr(module, name, no_flow)
    folder = tmp_path / "in"
    places = {
        "catalogue": str(folder / "templates.toml"),
        "folder": str(folder),
        "long": LONG,
        "no_index": str(folder / "empty-model"),
        "not_wan": str(folder / "other-model"),
        "unknown_pipeline": str(folder / "mystery-model"),
        "blocker": str(folder / "blocker"),
        "mp4_folder": str(folder / "clips.mp4"),
        "other_clip": str(folder / "other.mp4"),
        "readonly": str(folder / "readonly"),
    }
    (folder / "empty-model").mkdir(parents=True)
    (folder / "other-model").mkdir()
    (folder / "other-model" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    # A Wan2.2 folder's layout under a pipeline neither diffusers nor t2v knows.
    for sub in ("text_encoder", "tokenizer", "transformer", "vae", "scheduler"):
        (folder / "mystery-model" / sub).mkdir(parents=True)
    (folder / "mystery-model" / "model_index.json").write_text('{"_class_name": "MysteryVideoPipeline"}')
    # Safetensors files that are no LoRA, a LoRA of another model, and one of a wider Wan than tiny.
    save_file({"blocks.0.attn1.to_q.weight": torch.zeros(2, 2)}, folder / "not-lora.safetensors")
    save_file(
        {"transformer.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.zeros(2, 2)},
        folder / "other-model.safetensors",
    )
    save_file(
        {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 3072)}, folder / "wide.safetensors"
    )
    (folder / "blocker").write_text("a file where a folder would go\n")
    (folder / "fake-logo.png").write_text("not a png\n")
    (folder / "clips.mp4").mkdir()
    (folder / "other.mp4").write_text("not the clip\n")
    readonly = folder / "readonly"
    readonly.mkdir(mode=0o555)
    if os.geteuid() == 0:
        # root may write anywhere: have the check see the folder as any other user would.
        access = os.access
        monkeypatch.setattr(
            t2v_cli.checks.os, "access", lambda path, mode: access(path, mode) and Path(path) != readonly
        )
    env = {}
    if extra.startswith("env: "):
        name, value = extra.removeprefix("env: ").split("=", 1)
        env[name] = value.format(**places)
        extra = ""
    if extra.startswith("!"):
        toml = extra[1:]
    else:
        toml = (
            '[[template]]\nname = "ok"\n' + ("" if "prompt" in extra else 'prompt = "A red kite."\n') + extra
        )
    # `\n` and `\xNN` escapes as the document writes them; latin-1 keeps a `\xe9` one raw byte.
    raw = toml.replace("{long}", LONG).encode("latin-1").decode("unicode_escape").encode("latin-1")
    Path(places["catalogue"]).write_bytes(raw + b"\n")

    result = CliRunner().invoke(app, shlex.split(command.removeprefix("t2v ").format(**places)), env=env)

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    expected = re.escape(message).replace("…", ".*")
    for key, value in places.items():
        expected = expected.replace(re.escape("{" + key + "}"), re.escape(value))
    assert re.fullmatch(expected, lines[0]), f"\n{lines[0]}\n{message}"
    assert not data_dir.exists()
