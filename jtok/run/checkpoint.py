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
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from jtok.errors import JTokError
from jtok.io import (
    fsync_dir,
    read_json,
    replace_dir,
    save_tensors,
    write_json_atomic,  # noqa: F401  (demo imports it here; moves to jtok.io)
)
from jtok.run.files import CHECKPOINT_DIR

FORMAT_VERSION = 1
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
# Fields every checkpoint's state.json has; a resume needs all of them.
STATE_FIELDS = ("format_version", "step", "rng")
TEMPORARY_PREFIXES = (".tmp-", ".old-")


class CheckpointError(JTokError):
    """A checkpoint is missing, incomplete or does not fit the model."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


_STEP_NAME = re.compile(r"step_\d{8}")


def _step_folders(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders (named step_NNNNNNNN), oldest first, complete or not."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_NAME.fullmatch(p.name) and p.is_dir()),
                  key=lambda p: p.name)  # fmt: skip


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [p for p in _step_folders(run_dir) if (p / STATE_FILE).is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint. A newer step folder without its state.json is a
    damaged checkpoint (saves rename a complete folder into place): an error, never a
    silent fall-back to an older step."""
    folders = _step_folders(run_dir)  # one listing: a save renamed in later is not seen
    if not folders:
        return None
    newest = folders[-1]
    if not (newest / STATE_FILE).is_file():
        complete = [p for p in folders if (p / STATE_FILE).is_file()]
        before = f"; the one before is {complete[-1].name}" if complete else ""
        raise CheckpointError(f"checkpoint {newest} is damaged: it has no {STATE_FILE} (move "
                              f"it out of {CHECKPOINT_DIR}/ to use an older one{before})")
    return newest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_temporary(run_dir: Path) -> list[str]:
    """Remove folders a killed save left behind (``.tmp-*``, ``.old-*``); their names.

    Call it only while holding the run's lock: a live save writes into such a folder.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    removed = []
    for entry in root.iterdir():
        if entry.name.startswith(TEMPORARY_PREFIXES):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def has_single_file(ckpt_dir: Path) -> bool:
    """Whether a checkpoint has the single-process files (written, or consolidated)."""
    return (Path(ckpt_dir) / MODEL_FILE).is_file() and (Path(ckpt_dir) / OPTIMIZER_FILE).is_file()


def _is_dcp(ckpt_dir: Path) -> bool:
    """Whether the checkpoint is read through DCP; a dcp/ folder without its .metadata is
    an incomplete one (said so, rather than that model.safetensors is missing)."""
    from jtok.run.dcp import DCP_DIR, has_dcp

    if not has_dcp(ckpt_dir) and (Path(ckpt_dir) / DCP_DIR).is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: its distributed checkpoint "
                              f"{DCP_DIR}/ has no .metadata")  # fmt: skip
    return has_dcp(ckpt_dir)


def is_healthy(ckpt_dir: Path) -> bool:
    """Whether a checkpoint was saved while the loss was finite and not exploding.

    Checkpoints written before this flag existed count as healthy."""
    try:
        return bool(read_state(ckpt_dir).get("healthy", True))
    except CheckpointError:
        return False


def last_healthy_checkpoint(run_dir: Path) -> Path | None:
    for ckpt_dir in reversed(list_checkpoints(run_dir)):
        if is_healthy(ckpt_dir):
            return ckpt_dir
    return None


def persistent_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        state.pop("head.weight", None)
    return state


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent state, each tensor once (a tied head is stored as the embedding)."""
    return {k: v.detach().contiguous().cpu() for k, v in persistent_state(model).items()}


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
    tensors: dict[str, torch.Tensor] | None = None, optimizer_states: list | None = None,
) -> Path:  # fmt: skip
    """Write checkpoint `step` atomically; then prune to the newest `keep` checkpoints.

    `tensors` / `optimizer_states` replace the model's and the optimizers' own state when
    given (a sharded table's blocks gathered into the whole matrix)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_checkpoint_files(tmp, step, model, optimizers, meta, tensors, optimizer_states)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written folder left behind
        raise
    replace_dir(tmp, final)  # a re-saved step's old folder goes aside (.old-) first
    if keep is not None:
        # Never rotate away the newest checkpoint saved while training was healthy: if the
        # run diverges later, it is the one to go back to.
        protected = last_healthy_checkpoint(run_dir)
        for stale in list_checkpoints(run_dir)[:-keep]:
            if stale != protected:
                shutil.rmtree(stale, ignore_errors=True)
    return final


def save_checkpoint_distributed(run_dir: Path, step: int, model: torch.nn.Module, optimizers,
                                meta: dict[str, Any], keep: int | None, is_main: bool,
                                barrier) -> Path:  # fmt: skip
    """Every process of a launch writes its part through DCP (jtok.run.dcp); the main one
    then adds state.json and renames the folder into place, so a checkpoint under its name
    is complete, as in the single-process format. `barrier` synchronises the processes."""
    from jtok.run.dcp import save_dcp

    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-dcp"  # one name every process agrees on
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    save_dcp(tmp, model, optimizers)
    barrier()
    if is_main:
        _, rest = _split_optimizer_state(optimizers.state_dict())
        state = {"format_version": FORMAT_VERSION, "step": step, "rng": rng_state(),
                 "format": "dcp", **meta, "optimizer": _scalars_only(rest)}  # fmt: skip
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        _fsync(tmp / STATE_FILE)
        replace_dir(tmp, final)  # a re-saved step: aside first, never a state-less folder
        if keep is not None:
            protected = last_healthy_checkpoint(run_dir)
            for stale in list_checkpoints(run_dir)[:-keep]:
                if stale != protected:
                    shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def write_single_files(ckpt_dir: Path, model: torch.nn.Module, optimizers) -> None:
    """Add the single-process files (model.safetensors, optimizer.safetensors) to a
    checkpoint that has none (a DCP checkpoint, loaded whole into `model` and
    `optimizers`): each file is written beside it and renamed into place."""
    ckpt_dir = Path(ckpt_dir)
    scratch = ckpt_dir.parent / f".tmp-consolidate-{ckpt_dir.name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        config_json = json.dumps(model.cfg.to_dict()) if hasattr(model, "cfg") else "{}"
        save_tensors(model_tensors(model), scratch / MODEL_FILE, metadata={"config": config_json})
        tensors, _ = _split_optimizer_state(optimizers.state_dict())
        save_tensors(tensors, scratch / OPTIMIZER_FILE)
        for name in (OPTIMIZER_FILE, MODEL_FILE):  # the model file last: it marks "done"
            _fsync(scratch / name)
            os.replace(scratch / name, ckpt_dir / name)
        fsync_dir(ckpt_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scalars_only(rest: list[dict]) -> list[dict]:
    """The JSON part of optimizer states, without anything DTensor-shaped in it."""
    return json.loads(json.dumps(rest, default=lambda value: None))


def _write_checkpoint_files(folder: Path, step: int, model: torch.nn.Module, optimizers,
                            meta: dict[str, Any] | None, model_state=None,
                            optimizer_states=None) -> None:  # fmt: skip
    config_json = json.dumps(model.cfg.to_dict()) if hasattr(model, "cfg") else "{}"
    weights = model_tensors(model) if model_state is None else model_state
    save_tensors(weights, folder / MODEL_FILE, metadata={"config": config_json})
    state = {"format_version": FORMAT_VERSION, "step": step, "rng": rng_state(), **(meta or {})}
    if optimizers is not None:
        states = optimizers.state_dict() if optimizer_states is None else optimizer_states
        tensors, rest = _split_optimizer_state(states)
        save_tensors(tensors, folder / OPTIMIZER_FILE)
        state["optimizer"] = rest
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    for name in os.listdir(folder):
        _fsync(folder / name)


def read_state(ckpt_dir: Path) -> dict[str, Any]:
    """A checkpoint's state.json, with the fields every checkpoint has."""
    path = Path(ckpt_dir) / STATE_FILE
    try:
        state = read_json(path, "checkpoint state")
    except JTokError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint state {path} is not a JSON object")
    missing = [name for name in STATE_FIELDS if name not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint state {path} is missing {', '.join(missing)}; the checkpoint is "
            "damaged: remove it to use an earlier one"
        )
    if state["format_version"] != FORMAT_VERSION or not isinstance(state["step"], int):
        raise CheckpointError(f"checkpoint state {path}: format_version "
                              f"{state['format_version']!r} or step {state['step']!r} is not "
                              "one this jtok reads")  # fmt: skip
    return state


def _tensor_shapes(path: Path, what: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes in a safetensors file, from its header (no tensor data is read).

    safetensors checks on open that the header's offsets fit in the file, so a truncated
    file is caught here too."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing") from None
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{what} {path} is damaged: {str(err).splitlines()[0]}") from None


def validate_checkpoint(ckpt_dir: Path, model: torch.nn.Module, with_optimizer: bool) -> dict:
    """Check that a checkpoint loads into `model` (which may be on the meta device) without
    loading it: state fields, tensor names and shapes, and optimizer files. Returns state.

    Run before anything in the run directory changes, so a bad checkpoint fails a resume
    with one line and leaves the directory as it was."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    if not (ckpt_dir / MODEL_FILE).is_file() and _is_dcp(ckpt_dir):
        from jtok.run.dcp import read_shapes

        try:
            found = read_shapes(ckpt_dir)
        except Exception as err:  # DCP raises assorted errors for a damaged folder
            raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: "
                                  f"{str(err).splitlines()[0]}") from None  # fmt: skip
        shapes = {k[len("model/"):]: v for k, v in found.items() if k.startswith("model/")}
        _check_fit(ckpt_dir, expected_shapes(model), shapes)
        if with_optimizer and "optimizer" not in state:
            raise CheckpointError(f"checkpoint {ckpt_dir} has no optimizer state")
        return state
    shapes = _tensor_shapes(ckpt_dir / MODEL_FILE, "checkpoint weights")
    _check_fit(ckpt_dir, expected_shapes(model), shapes)
    if with_optimizer:
        if "optimizer" not in state:
            raise CheckpointError(f"checkpoint {ckpt_dir} has no optimizer state")
        _tensor_shapes(ckpt_dir / OPTIMIZER_FILE, "checkpoint optimizer state")
    return state


def _check_fit(ckpt_dir: Path, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} vs {expected[k]}" for k in expected
             if k in found and tuple(found[k]) != tuple(expected[k])]  # fmt: skip
    if missing or unexpected or wrong:
        parts = [f"{label} {items[:3]}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if items]  # fmt: skip
        raise CheckpointError(f"checkpoint {ckpt_dir} does not fit the model: "
                              + "; ".join(parts))  # fmt: skip


def load_model_weights(ckpt_dir: Path, model: torch.nn.Module) -> None:
    """Load `model.safetensors` into `model`; every tensor must be present and fit."""
    path = Path(ckpt_dir) / MODEL_FILE
    if not path.is_file() and _is_dcp(ckpt_dir):
        from jtok.run.dcp import load_dcp

        load_dcp(ckpt_dir, model)  # into the model's layout, whatever wrote it
        return
    try:
        # Read on the host; load_state_dict copies each tensor to where its parameter
        # lives, so host tables (jtok.tables.host) never pass through the accelerator.
        tensors = load_file(path, device="cpu")
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot read weights {path}: {str(err).splitlines()[0]}") from None
    expected = expected_shapes(model)
    _check_fit(ckpt_dir, expected, {k: tuple(v.shape) for k, v in tensors.items()})
    for key, store in _split_stores(model).items():  # sharded tables take their rows
        store.load_full(tensors.pop(key))
    model.load_state_dict(tensors, strict=False)  # strict=False: a tied head is not stored


def _split_stores(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Table stores whose matrix no process holds whole (jtok.tables.sharded), by key."""
    return {f"{name}.weight": module for name, module in model.named_modules()
            if hasattr(module, "load_full")}  # fmt: skip


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor names and shapes for `model` (a sharded matrix whole)."""
    shapes = {k: tuple(v.shape) for k, v in persistent_state(model).items()}
    for key, store in _split_stores(model).items():
        shapes[key] = (store.n_rows, store.d_model)
    return shapes


def load_checkpoint(ckpt_dir: Path, model: torch.nn.Module, optimizers=None) -> dict[str, Any]:
    """Restore weights (and optimizer state when given); return the checkpoint's state.json."""
    state = read_state(ckpt_dir)
    load_model_weights(ckpt_dir, model)
    if optimizers is not None:
        load_optimizer_state(ckpt_dir, state, optimizers)
    return state


def load_optimizer_state(ckpt_dir: Path, state: dict, optimizers, prepare=None) -> None:
    """Restore the optimizers' state; `prepare` maps the full states first (e.g. to FSDP2
    shards: jtok.parallel.wrap.shard_optimizer_state)."""
    path = Path(ckpt_dir) / OPTIMIZER_FILE
    if not path.is_file() and _is_dcp(ckpt_dir) and "optimizer" in state:
        raise CheckpointError(f"checkpoint {ckpt_dir} is a distributed checkpoint: load it "
                              "with jtok.run.dcp.load_dcp")  # fmt: skip
    if "optimizer" not in state or not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no optimizer state")
    try:  # on the host: Optimizer.load_state_dict moves each state to its parameter
        states = _join_optimizer_state(load_file(path, device="cpu"), state["optimizer"])
        optimizers.load_state_dict(prepare(states) if prepare else states)
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"optimizer state {path} does not load: "
                              f"{str(err).splitlines()[0]}") from None  # fmt: skip
