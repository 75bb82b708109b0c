"""The training loop: one process or many (torchrun), exact resume, periodic validation.

The model knows nothing of this module. Here: the data stream, optimizer roles and
schedule, autocast, gradient accumulation and clipping, data-parallel averaging,
divergence checks, metrics, checkpoints. The run directory (validation before any
change, the lock, resume rules) is jtok.run's. The batch at step s is a pure function of
(seed, s) (see jtok.data.TokenBatches), so a checkpoint needs no data-loader state beyond
its step, and on CPU a resumed run reproduces the uninterrupted one's losses exactly.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from jtok import data
from jtok.config import RunConfig
from jtok.errors import JTokError, environment_errno, environment_message
from jtok.nn.ffn import MoE, update_balance_bias
from jtok.nn.model import build_model
from jtok.parallel.distributed import (
    DistEnv,
    all_reduce_mean_,
    all_reduce_sum_,
    average_table_gradients,
    barrier,
    init_distributed,
)
from jtok.parallel.distributed import shutdown as shutdown_distributed
from jtok.parallel.resources import check_memory
from jtok.parallel.wrap import (
    parallelize,
    shard_optimizer_state,
    sync_gradients,
    table_parameters,
)
from jtok.run import checkpoint as ckpt
from jtok.run.dcp import has_dcp, load_dcp
from jtok.run.files import CONFIG_FILE, LOCK_FILE, METRICS_FILE, TOKENIZER_FILE  # noqa: F401
from jtok.run.lock import RunBusyError, try_lock, unlock
from jtok.run.rundir import (  # noqa: F401  (re-exported)
    StartPlan,
    apply_start,
    check_out_dir,
    is_retrofit,
    plan_start,
    read_metrics,
    saved_config,
)
from jtok.training.divergence import DivergenceMonitor
from jtok.training.evaluate import (  # noqa: F401  (re-exported)
    autocast_context,
    evaluate,
    lm_loss,
    loss_report,
    open_validation,
    validation,
)
from jtok.training.metrics import MetricsLog
from jtok.training.optim import Optimizers, lr_factor


class TrainingError(JTokError):
    """A run cannot go on (diverged loss, ...)."""


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float,
                    distributed_rows=()) -> float:  # fmt: skip
    """Clip the global L2 norm of dense, sparse and sharded gradients together; return the
    norm. The squares of an FSDP2 shard's gradient, and of `distributed_rows` (a sharded
    table's block on each process), are summed over processes (every process must call
    this, with the same parameters)."""
    from torch.distributed.tensor import DTensor

    squares, sharded = [], []
    for p in distributed_rows:
        if p.grad is not None:
            p.grad = p.grad.coalesce()
            sharded.append(p.grad._values().float().square().sum())
    params = [*params, *distributed_rows]
    for p in params:
        if p.grad is None or any(p is q for q in distributed_rows):
            continue
        if isinstance(p.grad, DTensor):
            sharded.append(p.grad.to_local().float().square().sum())
        elif p.grad.is_sparse:
            p.grad = p.grad.coalesce()  # each row once, so the norm of the values is right
            squares.append(p.grad._values().float().square().sum())
        else:
            squares.append(p.grad.float().square().sum())
    if sharded or distributed_rows:
        device = distributed_rows[0].device if distributed_rows else sharded[0].device
        shard_sum = torch.stack(sharded).sum() if sharded else torch.zeros((), device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(shard_sum)
        squares.append(shard_sum.to(squares[0].device) if squares else shard_sum)
    if not squares:
        return 0.0
    total = torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                grad = p.grad
                values = (grad.to_local() if isinstance(grad, DTensor)
                          else grad._values() if grad.is_sparse else grad)  # fmt: skip
                values.mul_(scale.to(values.device, values.dtype))
    return float(total)


def _weights_finite(model: torch.nn.Module, env: DistEnv) -> bool:
    """Whether every weight is finite, on every process (FSDP2 checks its shards)."""
    from torch.distributed.tensor import DTensor

    host = getattr(model.token_tables, "store_parameters", lambda: [])() if getattr(
        model, "token_tables", None) is not None else []  # fmt: skip
    local = [p.to_local() if isinstance(p, DTensor) else p for p in [*model.parameters(), *host]]
    bad = torch.tensor([0.0 if all(bool(torch.isfinite(p).all()) for p in local) else 1.0])
    return float(all_reduce_sum_(bad, env)) == 0.0


def _table_state(states: list[dict], optimizers, store, per_row) -> list[dict]:
    """Optimizer states with every per-row tensor of the sharded table's parameter mapped by
    `per_row` (gather the blocks into the whole, or take this process's block)."""
    table = store.store_parameters()[0]
    out = []
    for state, opt in zip(states, optimizers.optimizers, strict=True):
        params = [p for group in opt.param_groups for p in group["params"]]
        entries = {pid: ({k: per_row(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                          for k, v in values.items()} if params[int(pid)] is table else values)
                   for pid, values in state["state"].items()}  # fmt: skip
        out.append({"state": entries, "param_groups": state["param_groups"]})
    return out


def _keys_on(store, ids_BT: torch.Tensor, device: torch.device):
    """The key of a batch computed from its ids on the host, positions moved to `device`."""
    keys = store.key(ids_BT)
    keys.inverse_N = keys.inverse_N.to(device, non_blocking=True)
    return keys


@contextlib.contextmanager
def _run_directory_lock(run_dir: Path, env: DistEnv):
    """Rank 0 holds the run's lock for the whole run; every rank learns if it failed."""
    held = try_lock(run_dir) if env.is_main else True
    flag = torch.tensor([0.0 if held else 1.0])
    if env.enabled:
        all_reduce_sum_(flag, env)
    if float(flag) > 0:
        if held:
            unlock(run_dir)
        raise RunBusyError(f"{run_dir} is in use by another jtok process; wait for it to "
                           "finish or stop it first")  # fmt: skip
    try:
        yield
    finally:
        if env.is_main:
            unlock(run_dir)


def _remove_if_unused(run_dir: Path) -> None:
    """Remove a directory this start created, if it holds nothing but the lock file."""
    if run_dir.is_dir() and all(p.name == LOCK_FILE for p in run_dir.iterdir()):
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def train(run_cfg: RunConfig, run_dir: Path | str, *, resume: bool = False,
          overwrite: bool = False, allow_changes: set[str] | frozenset = frozenset(),
          progress: bool = True, log=None) -> dict[str, Any]:  # fmt: skip
    """Train per `run_cfg` into `run_dir`; returns a summary of the run.

    With `resume`, `run_cfg` is the saved config with any requested changes; which may be
    applied is jtok.run.resume's rule (`allow_changes`: dotted keys to apply anyway)."""
    run_dir = Path(run_dir)
    env = init_distributed(run_cfg.train.device)
    say = (log or (lambda msg: print(msg, file=sys.stderr))) if env.is_main else (lambda m: None)
    try:
        check_out_dir(run_dir)
        created = not run_dir.exists()
        with _run_directory_lock(run_dir, env):
            try:
                micro_rows = _micro_rows(run_cfg, env)
                tcfg = run_cfg.train
                check_memory(run_cfg.model, env.device, training=True, what="jtok train",
                             batch=micro_rows, seq_len=tcfg.seq_len,
                             table_placement=tcfg.table_placement,
                             world_size=env.world_size, parallel=tcfg.parallel)  # fmt: skip
                plan = plan_start(run_dir, run_cfg, resume=resume, overwrite=overwrite,
                                  allow_changes=allow_changes)  # fmt: skip
            except BaseException:
                if created and env.is_main:
                    _remove_if_unused(run_dir)  # a failed start leaves no trace
                raise
            _same_config_everywhere(plan.config, env)
            barrier(env)  # every process validated before the main one changes anything
            if env.is_main:
                apply_start(plan, log=say)
                for change in plan.changes:
                    say(f"resume: {change.key} {change.old!r} -> {change.new!r} ({change.kind})")
            barrier(env)
            return _train(plan, env, micro_rows, progress, say)
    finally:
        shutdown_distributed(env)


def _same_config_everywhere(run_cfg: RunConfig, env: DistEnv) -> None:
    """Refuse a launch whose processes resolved different configs (another --set on one
    node, a config file edited between starts): they would train different models."""
    if not env.enabled:
        return
    import hashlib
    import json

    import torch.distributed as dist

    digest = hashlib.sha256(json.dumps(run_cfg.to_dict(), sort_keys=True).encode()).hexdigest()
    digests: list = [None] * env.world_size
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        odd = [rank for rank, d in enumerate(digests) if d != digests[0]]
        raise TrainingError(f"the processes resolved different run configs (rank 0 differs "
                            f"from rank(s) {odd}); start every process with the same "
                            "arguments and files")  # fmt: skip


def _micro_rows(run_cfg: RunConfig, env: DistEnv) -> int:
    tcfg = run_cfg.train
    if is_retrofit(run_cfg):
        if env.world_size > 1:
            raise TrainingError("a retrofitted Hugging Face model trains on one process "
                                "(torchrun is not supported for --init-from-hf runs yet)")
    elif tcfg.freeze_backbone:
        raise TrainingError("train.freeze_backbone applies to a retrofitted Hugging Face "
                            "model (jtok train --init-from-hf DIR)")  # fmt: skip
    if tcfg.table_placement == "host" and env.world_size > 1:
        raise TrainingError("train.table_placement=host trains on one process; with "
                            "several, split the tables: train.table_placement=sharded")
    micro_rows = tcfg.batch_size // (env.world_size * tcfg.grad_accum)
    if micro_rows * env.world_size * tcfg.grad_accum != tcfg.batch_size:
        raise TrainingError(
            f"train.batch_size={tcfg.batch_size} must be divisible by processes x grad_accum "
            f"= {env.world_size} x {tcfg.grad_accum}"
        )
    return micro_rows


def _train(plan: StartPlan, env: DistEnv, micro_rows: int, progress: bool, say) -> dict:
    run_cfg, run_dir = plan.config, plan.run_dir
    tcfg, mcfg = run_cfg.train, run_cfg.model
    state = None
    if plan.resume and plan.checkpoint is not None:
        state = ckpt.read_state(plan.checkpoint)
    if is_retrofit(run_cfg):
        # jtok.hf.retrofit_run.RetrofitLM: the HF model behind jtok's model interface. With
        # no checkpoint to resume, step 0 loads the HF weights and fresh tables (s = 0).
        model = run_cfg.build_model(env.device, tcfg.table_placement,
                                    from_source=state is None).train()  # fmt: skip
    else:
        model = build_model(mcfg, seed=tcfg.seed, device=env.device,
                            table_placement=tcfg.table_placement).train()  # fmt: skip
    distributed_ckpt = False
    if state is not None:
        distributed_ckpt = has_dcp(plan.checkpoint) and not ckpt.has_single_file(plan.checkpoint)
        if not distributed_ckpt:  # before wrapping: FSDP2 then shards the loaded values
            ckpt.load_model_weights(plan.checkpoint, model)
    fsdp = env.enabled and tcfg.parallel == "fsdp"
    wrapped = parallelize(model, env, tcfg.parallel, tcfg.precision)
    optimizers = Optimizers(model, tcfg)
    sharded = model.token_tables if getattr(model.token_tables, "placement", "") == "sharded" \
        else None  # fmt: skip
    tables = [param for _, param in table_parameters(model)]
    host = model.token_tables if tcfg.table_placement == "host" and mcfg.tokmod.enabled else None
    metrics = MetricsLog(run_dir, enabled=env.is_main)
    monitor = DivergenceMonitor()
    start_step = 0
    if plan.resume and state is None:
        say(f"no checkpoint in {run_dir} yet: starting from step 0")
    elif state is not None:
        def prepare(states: list[dict]) -> list[dict]:
            if sharded is not None:
                states = _table_state(states, optimizers, sharded, sharded.local_rows)
            return shard_optimizer_state(states, optimizers) if fsdp else states

        if distributed_ckpt:  # DCP reads each tensor into this run's layout (any W)
            load_dcp(plan.checkpoint, model, optimizers, state.get("optimizer"))
        else:
            ckpt.load_optimizer_state(plan.checkpoint, state, optimizers, prepare=prepare)
        optimizers.apply_config(tcfg)  # an allowed change (lr, ...) wins over the saved groups
        ckpt.restore_rng_state(state["rng"])
        monitor.load_state(state.get("divergence"))
        start_step = state["step"]
        say(f"resumed from {plan.checkpoint} (step {start_step})")
    forward = torch.compile(wrapped) if tcfg.compile else wrapped
    data_dir = str(plan.data_dir)
    batches = data.TokenBatches(data_dir, "train", tcfg.seq_len, tcfg.batch_size, tcfg.seed)
    val_split = open_validation(data_dir)  # both splits opened now, used all run long
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    meta = {"tokenizer_sha256": plan.manifest.get("tokenizer_sha256"),
            "config": run_cfg.to_dict()}  # fmt: skip

    def stop(reason: str, step: int) -> TrainingError:
        good = ckpt.last_healthy_checkpoint(run_dir)
        return TrainingError(f"{reason} at step {step}; stopped without saving. Last good "
                             f"checkpoint: {good or 'none'}. Try a lower train.lr.")  # fmt: skip

    def save(step: int) -> None:
        try:
            write_checkpoint(step)
        except Exception as err:
            number = environment_errno(err)  # a full disk, a folder made read-only
            if number is None:
                raise  # a defect keeps its traceback
            # The checkpoint's temporary folder is gone (checkpoint.save_checkpoint).
            previous = "an earlier checkpoint"
            with contextlib.suppress(JTokError):
                previous = str(ckpt.latest_checkpoint(run_dir) or "step 0")
            raise TrainingError(f"saving the checkpoint of step {step} failed "
                                f"({environment_message(err, number)}); --resume continues "
                                f"from {previous}") from None

    def write_checkpoint(step: int) -> None:
        if not _weights_finite(model, env):
            raise stop("the weights are no longer finite", step)
        meta_now = {**meta, "tokens": step * tokens_per_step, "healthy": monitor.healthy(),
                    "divergence": monitor.state()}  # fmt: skip
        if env.enabled:  # several processes: each writes its part (DCP)
            ckpt.save_checkpoint_distributed(run_dir, step, model, optimizers, meta_now,
                                             tcfg.keep_checkpoints, env.is_main,
                                             lambda: barrier(env))  # fmt: skip
            return
        tensors = optimizer_states = None
        if sharded is not None:  # one process: its block is the whole matrix
            tensors = ckpt.model_tensors(model)
            tensors["token_tables.weight"] = sharded.gather_full().cpu()
            optimizer_states = _table_state(optimizers.state_dict(), optimizers, sharded,
                                            sharded.gather_rows)  # fmt: skip
        if env.is_main:
            ckpt.save_checkpoint(run_dir, step, model, optimizers, meta=meta_now,
                                 keep=tcfg.keep_checkpoints, tensors=tensors,
                                 optimizer_states=optimizer_states)  # fmt: skip

    def validate(step: int) -> dict:
        report = validation(model, run_cfg, env.device, max_tokens=tcfg.eval_tokens,
                            opened=val_split)  # fmt: skip
        record = {"step": step, **{f"val_{k}": v for k, v in report.items()}}
        metrics.write(record)
        return record

    bar = None
    # A progress bar only on a terminal: in a log file each redraw would be a line.
    if progress and env.is_main and sys.stderr.isatty():
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            bar = tqdm(total=tcfg.steps, initial=start_step, desc="train", file=sys.stderr,
                       dynamic_ncols=True)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    if host is not None:
        params += host.store_parameters()  # clipped with the rest: one global norm
    # Host tables: the next step's rows are gathered on a background thread (and copied on
    # a side stream) while this step computes; after the optimizer step, the rows it
    # changed are re-read (jtok.tables.host), so prefetching never changes a result.
    prefetch = host is not None and tcfg.grad_accum == 1
    fetched = None
    last_val: dict = {}
    window_start, window_tokens = time.perf_counter(), 0
    loss_value = float("nan")
    next_batch = batches.batch(start_step, env.rank, env.world_size) if prefetch else None
    for step in range(start_step, tcfg.steps):
        optimizers.set_lr_factor(lr_factor(step, tcfg))
        if prefetch:
            inputs, targets = next_batch
            token_rows = host.consume(fetched) if fetched is not None else None
            if step + 1 < tcfg.steps:
                next_batch = batches.batch(step + 1, env.rank, env.world_size)
                fetched = host.fetch(_keys_on(host, next_batch[0], env.device), env.device)
        else:
            inputs, targets = batches.batch(step, env.rank, env.world_size)
            token_rows = None
        loss_sum = torch.zeros((), device=env.device)
        aux_terms: dict[str, float] = {}
        for micro in range(tcfg.grad_accum):
            rows = slice(micro * micro_rows, (micro + 1) * micro_rows)
            x, y = inputs[rows].to(env.device), targets[rows].to(env.device)
            last = micro == tcfg.grad_accum - 1
            with sync_gradients(wrapped, tcfg.parallel, env.enabled, last):
                with autocast_context(env.device, tcfg.precision):
                    loss, out = lm_loss(forward, x, y, token_rows)
                ((loss + out.aux_loss) / tcfg.grad_accum).backward()
            loss_sum += loss.detach()
            for key, value in out.aux_terms.items():
                aux_terms[key] = aux_terms.get(key, 0.0) + float(value) / tcfg.grad_accum
        loss_value = float(all_reduce_mean_(loss_sum / tcfg.grad_accum, env))
        reason = monitor.check_loss(loss_value)
        if reason:
            raise stop(reason, step)
        average_table_gradients(tables, env)  # the backbone's were reduced in backward
        pulled = host.pull_gradients() if host is not None else None
        grad_norm = clip_grad_norm_(params, tcfg.grad_clip, distributed_rows=(
            sharded.store_parameters() if sharded is not None else ()))
        reason = monitor.check_gradient(loss_value, grad_norm)
        if reason:
            raise stop(reason, step)
        if host is not None:
            with host.step_lock():  # no background gather reads a half-stepped row
                optimizers.step()
            host.after_step(pulled)
        else:
            optimizers.step()
        optimizers.zero_grad()
        if mcfg.moe.enabled and mcfg.moe.balance == "aux_free":
            for module in model.modules():  # every process must see the same load
                if isinstance(module, MoE):
                    all_reduce_mean_(module.load_since_update, env)
            update_balance_bias(model)

        done = step + 1
        window_tokens += tokens_per_step
        if done % tcfg.log_every == 0 or done == tcfg.steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "loss": loss_value, "lr": optimizers.param_groups[0]["lr"],
                      "grad_norm": grad_norm, "tokens": done * tokens_per_step,
                      "tokens_per_s": window_tokens / max(elapsed, 1e-9), **aux_terms}  # fmt: skip
            metrics.write(record)
            window_start, window_tokens = time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        if (tcfg.eval_every and done % tcfg.eval_every == 0) or done == tcfg.steps:
            last_val = validate(done)
        if (tcfg.save_every and done % tcfg.save_every == 0) or done == tcfg.steps:
            save(done)
    if bar is not None:
        bar.close()
    metrics.close()
    if not math.isfinite(last_val.get("val_loss", 0.0)):
        raise TrainingError(f"the validation loss is {last_val['val_loss']}")
    return {"steps": tcfg.steps, "final_loss": loss_value, "is_main": env.is_main, **last_val}
