"""Distributed checkpoints: runs of several processes save through torch.distributed.checkpoint.

Each process writes what it holds (FSDP2's shards, its block of a sharded table, its
block of RowAdam's state; DCP writes a replicated DDP tensor once), into
``step_N/dcp/``, beside the usual ``state.json``. Every tensor is saved under a stable
name with its global shape and layout (DTensors; a sharded table's contiguous blocks are
a ``Shard(0)`` DTensor), so `load_dcp` reads it into whatever layout the loading run has:
another world size, FSDP2 or DDP, one process (eval, sample, a resume on one process).
`consolidate` writes the single-process safetensors files beside it, for tools that read
only those (and for sharing a checkpoint).

Tensor names: ``model/<state_dict key>`` (the table matrix as ``model/token_tables.weight``)
and ``optim/<optimizer index>/<parameter index>/<state key>``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

DCP_DIR = "dcp"


def has_dcp(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / DCP_DIR / ".metadata").is_file()


def _table_store(model):
    store = getattr(model, "token_tables", None)
    return store if getattr(store, "placement", "") == "sharded" else None


def _as_global(store, local: Tensor) -> Tensor:
    """A sharded table's per-row block as the DTensor of the whole (or itself, alone)."""
    if store is None or store.world_size == 1:
        return local
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh(local.device.type, (store.world_size,))
    shape = (store.n_rows, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=stride)  # fmt: skip


def _model_tensors(model) -> dict[str, Tensor]:
    from jtok.run.checkpoint import persistent_state

    tensors = {f"model/{k}": v for k, v in persistent_state(model).items()}
    store = _table_store(model)
    if store is not None:
        tensors["model/token_tables.weight"] = _as_global(store, store.weight.data)
    return tensors


def _optimizer_params(optimizers) -> list[list]:
    return [[p for group in opt.param_groups for p in group["params"]]
            for opt in optimizers.optimizers]  # fmt: skip


def save_dcp(folder: Path, model, optimizers) -> None:
    """Every process writes its part of the model and optimizer state into folder/dcp."""
    import torch.distributed.checkpoint as dcp

    state = _model_tensors(model)
    store = _table_store(model)
    table = store.weight if store is not None else None
    for i, params in enumerate(_optimizer_params(optimizers)):
        opt = optimizers.optimizers[i]
        for pid, param in enumerate(params):
            for key, value in opt.state.get(param, {}).items():
                if isinstance(value, Tensor):
                    sharded = param is table and value.dim() > 0
                    state[f"optim/{i}/{pid}/{key}"] = _as_global(store, value) if sharded \
                        else value  # fmt: skip
    dcp.save(state, checkpoint_id=str(Path(folder) / DCP_DIR))


def read_shapes(ckpt_dir: Path) -> dict[str, tuple[int, ...]]:
    """Names and global shapes of a DCP checkpoint's tensors, from its metadata, after
    checking that every file the metadata points into is there and long enough (a
    truncated or missing shard is found here, before anything is loaded or changed)."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = Path(ckpt_dir) / DCP_DIR
    metadata = FileSystemReader(str(folder)).read_metadata()
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            raise ValueError(f"its file {path} is missing")
        if path.stat().st_size < size:
            raise ValueError(f"its file {path} is truncated ({path.stat().st_size} bytes, "
                             f"the metadata needs {size})")  # fmt: skip
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
            if hasattr(v, "size")}  # fmt: skip


def load_dcp(ckpt_dir: Path, model, optimizers=None, scalars: list[dict] | None = None) -> None:
    """Read a DCP checkpoint into `model` (and `optimizers`), in their current layout.

    `scalars`: the checkpoint's non-tensor optimizer state and param groups (state.json)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    shapes = read_shapes(ckpt_dir)
    targets = _model_tensors(model)  # the model's own tensors: loaded in place
    store = _table_store(model)
    table = store.weight if store is not None else None
    loaded: dict[tuple[int, int], dict[str, Tensor]] = {}
    if optimizers is not None:
        params = _optimizer_params(optimizers)
        for name, shape in shapes.items():
            if not name.startswith("optim/"):
                continue
            _, i, pid, key = name.split("/", 3)
            param = params[int(i)][int(pid)]
            if param is table and len(shape) > 0:
                local = torch.zeros((table.shape[0], *shape[1:]),
                                    dtype=torch.int64 if key == "row_step" else table.dtype,
                                    device=table.device)  # fmt: skip
                target = _as_global(store, local)
            elif tuple(param.shape) == shape:
                target = torch.zeros_like(param)
            else:  # a step count: RowAdam's per row (int64), Adam's one (float)
                target = torch.zeros(shape, dtype=torch.int64 if key == "row_step"
                                     else torch.float32)  # fmt: skip
            targets[name] = target
            loaded.setdefault((int(i), int(pid)), {})[key] = target
    from torch.distributed.checkpoint.api import CheckpointException

    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():  # one process reading a checkpoint is what we mean
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(targets, checkpoint_id=str(Path(ckpt_dir) / DCP_DIR), no_dist=no_dist)
    except (Exception, CheckpointException) as err:  # (a BaseException) damaged contents
        from jtok.run.checkpoint import CheckpointError

        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {_cause(err)}") from None
    if optimizers is None:
        return
    states = []
    for i, opt in enumerate(optimizers.optimizers):
        rest = (scalars or [])[i] if scalars and i < len(scalars) else {}
        per_param: dict[int, dict] = {}
        for pid, entries in rest.get("scalars", {}).items():
            per_param.setdefault(int(pid), {}).update(entries)
        for (oi, pid), entries in loaded.items():
            if oi == i:
                per_param.setdefault(pid, {}).update(
                    {k: (v.to_local() if hasattr(v, "to_local") and table is not None
                         and params[i][pid] is table else v) for k, v in entries.items()})
        states.append({"state": per_param,
                       "param_groups": rest.get("param_groups", opt.state_dict()["param_groups"])})
    optimizers.load_state_dict(states)


def _cause(err: BaseException) -> str:
    """The line naming the error: CheckpointException's text is a per-rank traceback whose
    error line ("RuntimeError: ...") may be followed by advice lines."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)
             and not line.startswith("CheckpointException")]  # fmt: skip
    line = named[-1] if named else lines[-1] if lines else type(err).__name__
    return line.split(". ", 1)[0][:300]  # the first sentence: torch's advice is not ours
