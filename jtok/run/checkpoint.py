"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A run directory holds ``checkpoints/step_00000100/`` folders, each with
``model.safetensors`` (weights), ``optimizer.safetensors`` (optimizer tensors) and
``state.json`` (step, config, optimizer hyperparameters, RNG state, data position).
A checkpoint is written into a hidden temporary folder and renamed into place in one
step, so a crash mid-write leaves the previous checkpoints intact and never a partial
one under a checkpoint's name. No pickle is involved anywhere.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from jtok.errors import JTokError

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1


class CheckpointError(JTokError):
    """A checkpoint is missing, incomplete or does not fit the model."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.name.startswith("step_") and (p / "state.json").is_file()]  # fmt: skip
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    _fsync(tmp)
    os.replace(tmp, path)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent state, each tensor once (a tied head is stored as the embedding)."""
    state = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        state.pop("head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _split_optimizer_state(states: list[dict]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state dicts -> (tensors for safetensors, JSON-able remainder)."""
    tensors: dict[str, torch.Tensor] = {}
    rest = []
    for i, state in enumerate(states):
        scalars: dict[str, dict[str, Any]] = {}
        for pid, entries in state["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{i}.{pid}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(pid), {})[key] = value
        rest.append({"param_groups": state["param_groups"], "scalars": scalars})
    return tensors, rest


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: list[dict]) -> list[dict]:
    states = []
    for i, part in enumerate(rest):
        per_param: dict[int, dict[str, Any]] = {}
        for pid, entries in part["scalars"].items():
            per_param.setdefault(int(pid), {}).update(entries)
        prefix = f"{i}."
        for name, tensor in tensors.items():
            if name.startswith(prefix):
                _, pid, key = name.split(".", 2)
                per_param.setdefault(int(pid), {})[key] = tensor
        states.append({"state": per_param, "param_groups": part["param_groups"]})
    return states


def rng_state() -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state().numpy().tobytes()
        state["cuda"] = base64.b64encode(cuda).decode()
    return state


def restore_rng_state(state: dict[str, str]) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, optimizers=None,
    meta: dict[str, Any] | None = None, keep: int | None = None,
) -> Path:  # fmt: skip
    """Write checkpoint `step` atomically; then prune to the newest `keep` checkpoints."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_checkpoint_files(tmp, step, model, optimizers, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written folder left behind
        raise
    if final.exists():  # re-saving a step: move the old one aside first, then drop it
        old = root / f".old-{checkpoint_name(step)}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)
    if keep is not None:
        for stale in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _write_checkpoint_files(folder: Path, step: int, model: torch.nn.Module, optimizers,
                            meta: dict[str, Any] | None) -> None:  # fmt: skip
    config_json = json.dumps(model.cfg.to_dict()) if hasattr(model, "cfg") else "{}"
    save_file(model_tensors(model), folder / "model.safetensors", metadata={"config": config_json})
    state = {"format_version": FORMAT_VERSION, "step": step, "rng": rng_state(), **(meta or {})}
    if optimizers is not None:
        tensors, rest = _split_optimizer_state(optimizers.state_dict())
        save_file(tensors, folder / "optimizer.safetensors")
        state["optimizer"] = rest
    (folder / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    for name in os.listdir(folder):
        _fsync(folder / name)


def read_state(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read checkpoint state {path}: {err}") from None


def load_model_weights(ckpt_dir: Path, model: torch.nn.Module) -> None:
    """Load `model.safetensors` into `model`; every tensor must be present and fit."""
    path = Path(ckpt_dir) / "model.safetensors"
    try:
        tensors = load_file(path, device=str(next(model.parameters()).device))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot read weights {path}: {err}") from None
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} does not fit the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )
    model.load_state_dict(tensors, strict=False)  # strict=False: a tied head is not stored


def load_checkpoint(ckpt_dir: Path, model: torch.nn.Module, optimizers=None) -> dict[str, Any]:
    """Restore weights (and optimizer state when given); return the checkpoint's state.json."""
    state = read_state(ckpt_dir)
    load_model_weights(ckpt_dir, model)
    if optimizers is not None:
        path = Path(ckpt_dir) / "optimizer.safetensors"
        if "optimizer" not in state or not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir} has no optimizer state")
        device = str(next(model.parameters()).device)
        optimizers.load_state_dict(_join_optimizer_state(load_file(path, device=device),
                                                         state["optimizer"]))  # fmt: skip
    return state


def load_run(run_dir: Path, checkpoint: Path | None = None,
             device: torch.device | str = "cpu"):  # fmt: skip
    """(RunConfig, model with trained weights, checkpoint state) of a training run."""
    from jtok.config import ConfigError, RunConfig
    from jtok.nn.model import build_model

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a training run (no config.json)")
    try:
        run_cfg = RunConfig.from_json(config_path.read_text())
    except ConfigError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    ckpt_dir = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if ckpt_dir is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet")
    model = build_model(run_cfg.model, device=device)
    state = read_state(ckpt_dir)
    load_model_weights(ckpt_dir, model)
    return run_cfg, model.eval(), state
