"""A diffusion's state between steps, so that a killed night's re-run continues from the last saved step
instead of step 0: the latents, the step index and the scheduler's multistep history.

Saved as safetensors (tensors) with a JSON description of everything else in the file's metadata: no
pickle, so a file in the store cannot run code when it is read. The scheduler's state is every
attribute `set_timesteps` and `step` change (UniPC's `model_outputs`, `timestep_list`, `last_sample`,
`lower_order_nums`, `_step_index`...), taken generically from its `__dict__`; a value of a type this
does not know makes `scheduler_state` return None and the diffusion simply goes on without checkpoints.
The schedulers Wan2.2 uses draw no random numbers, so there is no RNG state to keep.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_SCALARS = (int, float, bool, str, type(None))


@dataclass
class Checkpoint:
    step: int
    """Steps done."""
    latents: torch.Tensor
    scheduler: dict[str, Any]
    """What `restore_scheduler` puts back."""


def scheduler_state(scheduler: Any) -> dict[str, Any] | None:
    """The scheduler's changing attributes (tensors on the CPU), or None if one cannot be saved."""
    state: dict[str, Any] = {}
    for name, value in vars(scheduler).items():
        if name == "_internal_dict":  # the config: the same for every scheduler of the model
            continue
        if isinstance(value, torch.Tensor):
            state[name] = value.detach().cpu().clone()
        elif isinstance(value, list) and all(isinstance(v, torch.Tensor | None) for v in value):
            state[name] = [None if v is None else v.detach().cpu().clone() for v in value]
        elif isinstance(value, _SCALARS):
            state[name] = value
        else:
            return None
    return state


def restore_scheduler(scheduler: Any, state: dict[str, Any], device: torch.device | str) -> None:
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
        elif isinstance(value, list):
            value = [None if v is None else v.to(device) for v in value]
        setattr(scheduler, name, value)


def save(path: Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` to `path` (a temporary name from `Store.writing`)."""
    tensors = {"latents": checkpoint.latents.detach().cpu().contiguous()}
    layout: dict[str, Any] = {}
    for name, value in checkpoint.scheduler.items():
        if isinstance(value, torch.Tensor):
            tensors[f"s.{name}"] = value.contiguous()
            layout[name] = "tensor"
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if item is not None:
                    tensors[f"s.{name}.{i}"] = item.contiguous()
            layout[name] = ["tensor" if item is not None else None for item in value]
        else:
            layout[name] = {"value": value}
    save_file(tensors, str(path), metadata={"step": str(checkpoint.step), "layout": json.dumps(layout)})


def load(path: Path) -> Checkpoint:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        layout = json.loads(meta["layout"])
        state: dict[str, Any] = {}
        for name, kind in layout.items():
            if kind == "tensor":
                state[name] = f.get_tensor(f"s.{name}")
            elif isinstance(kind, list):
                state[name] = [
                    None if k is None else f.get_tensor(f"s.{name}.{i}") for i, k in enumerate(kind)
                ]
            else:
                state[name] = kind["value"]
        return Checkpoint(step=int(meta["step"]), latents=f.get_tensor("latents"), scheduler=state)
