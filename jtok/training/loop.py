"""The training loop: one process or many (torchrun), exact resume, periodic validation.

The model knows nothing of this module. Here: the data stream, optimizer roles and
schedule, autocast, gradient accumulation and clipping, data-parallel averaging,
metrics, checkpoints. The batch at step s is a pure function of (seed, s) (see
jtok.data.TokenBatches), so a checkpoint needs no data-loader state beyond its step, and
on CPU a resumed run reproduces the uninterrupted one's loss trajectory exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from jtok import data
from jtok.config import RunConfig
from jtok.errors import JTokError
from jtok.nn.ffn import MoE, update_balance_bias
from jtok.nn.model import build_model
from jtok.parallel.distributed import (
    DistEnv,
    all_reduce_mean_,
    average_gradients,
    barrier,
    init_distributed,
)
from jtok.parallel.distributed import shutdown as shutdown_distributed
from jtok.run import checkpoint as ckpt
from jtok.training.optim import Optimizers, lr_factor

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.json"


class TrainingError(JTokError):
    """A run cannot start or cannot go on (bad run directory, diverged loss, ...)."""


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA under "auto"/"bf16"; full fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lm_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """(mean next-token cross-entropy, model output)."""
    out = model(inputs)
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
    return loss, out


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global L2 norm of dense and sparse gradients together; return the norm."""
    squares = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()  # each row once, so the norm of the values is right
            squares.append(p.grad._values().float().square().sum())
        else:
            squares.append(p.grad.float().square().sum())
    if not squares:
        return 0.0
    total = torch.stack(squares).sum().sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                (p.grad._values() if p.grad.is_sparse else p.grad).mul_(scale.to(p.grad.dtype))
    return float(total)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, precision: str) -> dict:
    """Summed loss and token count over an iterable of (inputs, targets)."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast_context(device, precision):
            logits = model(inputs).logits
        loss_sum += float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                          reduction="sum"))  # fmt: skip
        tokens += targets.numel()
    model.train(was_training)
    return {"loss_sum": loss_sum, "tokens": tokens}


def loss_report(loss_sum: float, tokens: int, text_bytes: float, text_tokens: int) -> dict:
    """Mean loss (nats/token), perplexity and bits per byte over `tokens` evaluated targets.

    The text has `text_tokens` ids and `text_bytes` bytes. Windows never predict its first
    id, and a prefix (max tokens) covers only part of it: the bytes are scaled by the share
    of targets evaluated, assuming bytes per token are even across the text.
    """
    share = min(1.0, tokens / max(1, text_tokens - 1))
    text_bytes = text_bytes * share
    loss = loss_sum / max(tokens, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": loss_sum / math.log(2) / text_bytes if text_bytes > 0 else float("nan"),
        "tokens": tokens,
    }


def validation(model, run_cfg: RunConfig, device, split: str = "val",
               max_tokens: int | None = None) -> dict:  # fmt: skip
    """Validation loss / ppl / bpb over (the first max_tokens of) a prepared split.

    Bits per byte need the bytes of the evaluated text: the manifest records them per
    split (see `loss_report` for a prefix).
    """
    train = run_cfg.train
    manifest = data.load_manifest(train.data)
    split_info = manifest["splits"][split]
    result = evaluate(
        model,
        data.eval_batches(train.data, split, train.seq_len, train.batch_size, max_tokens),
        device, train.precision,
    )  # fmt: skip
    return loss_report(result["loss_sum"], result["tokens"], split_info["bytes"],
                       split_info["tokens"])  # fmt: skip


class MetricsLog:
    """metrics.jsonl in the run directory (and tensorboard when it is installed)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop entries past `step` (written by a run that died after its checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]  # fmt: skip
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def saved_config(run_dir: Path) -> dict | None:
    """The config.json a run directory was trained with, or None if it has none readable."""
    try:
        return json.loads((Path(run_dir) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare_run_dir(run_dir: Path, run_cfg: RunConfig, resume: bool, overwrite: bool,
                    env: DistEnv) -> None:  # fmt: skip
    """Check, then create or reuse the run directory and write the resolved config.

    Every process checks before any writes (a barrier apart), so that no process
    mistakes the files of another for a previous run.
    """
    config_path = run_dir / CONFIG_FILE
    if resume and not config_path.is_file():
        raise TrainingError(f"--resume: {run_dir} holds no run (no {CONFIG_FILE})")
    occupied = not resume and run_dir.exists() and any(run_dir.iterdir())
    if occupied and not overwrite:
        raise TrainingError(
            f"run directory {run_dir} is not empty; use --resume to continue it or "
            "--overwrite to start over (its checkpoints and metrics will be deleted)"
        )
    barrier(env)
    if env.is_main:
        if occupied:
            for name in (ckpt.CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE, "tensorboard",
                         TOKENIZER_FILE):  # fmt: skip
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        # On resume the caller merged the saved config with any overrides (more steps).
        ckpt.write_json_atomic(config_path, run_cfg.to_dict())
    barrier(env)


def train(run_cfg: RunConfig, run_dir: Path | str, *, resume: bool = False,
          overwrite: bool = False, progress: bool = True, log=None) -> dict[str, Any]:  # fmt: skip
    """Train per `run_cfg` into `run_dir`; returns a summary of the run."""
    run_dir = Path(run_dir)
    env = init_distributed(run_cfg.train.device)
    try:
        return _train(run_cfg, run_dir, env, resume, overwrite, progress, log)
    finally:
        shutdown_distributed(env)


def _train(run_cfg, run_dir, env: DistEnv, resume, overwrite, progress, log) -> dict:
    tcfg, mcfg = run_cfg.train, run_cfg.model
    say = (log or (lambda msg: print(msg, file=sys.stderr))) if env.is_main else (lambda m: None)
    if not tcfg.data:
        raise TrainingError("train.data is empty: point it at a `jtok data prepare` directory")
    micro_rows = tcfg.batch_size // (env.world_size * tcfg.grad_accum)
    if micro_rows * env.world_size * tcfg.grad_accum != tcfg.batch_size:
        raise TrainingError(
            f"train.batch_size={tcfg.batch_size} must be divisible by processes x grad_accum "
            f"= {env.world_size} x {tcfg.grad_accum}"
        )
    manifest = data.load_manifest(tcfg.data)
    data.check_vocab(manifest, mcfg.vocab_size)
    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    if latest is not None:  # before anything in the run directory is touched
        saved_tokenizer = ckpt.read_state(latest).get("tokenizer_sha256")
        if saved_tokenizer:
            data.check_tokenizer(manifest, saved_tokenizer)
    prepare_run_dir(run_dir, run_cfg, resume, overwrite, env)
    if env.is_main:
        shutil.copyfile(Path(tcfg.data) / manifest["tokenizer"], run_dir / TOKENIZER_FILE)

    model = build_model(mcfg, seed=tcfg.seed, device=env.device).train()
    optimizers = Optimizers(model, tcfg)
    metrics = MetricsLog(run_dir, enabled=env.is_main)
    start_step = 0
    if resume:
        if latest is None:
            say(f"no checkpoint in {run_dir} yet: starting from step 0")
        else:
            state = ckpt.load_checkpoint(latest, model, optimizers)
            ckpt.restore_rng_state(state["rng"])
            start_step = state["step"]
            say(f"resumed from {latest} (step {start_step})")
        metrics.truncate_after(start_step)
    forward = torch.compile(model) if tcfg.compile else model
    batches = data.TokenBatches(tcfg.data, "train", tcfg.seq_len, tcfg.batch_size, tcfg.seed)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    meta = {"tokenizer_sha256": manifest.get("tokenizer_sha256"), "config": run_cfg.to_dict()}

    def save(step: int) -> None:
        if env.is_main:
            ckpt.save_checkpoint(run_dir, step, model, optimizers,
                                 meta={**meta, "tokens": step * tokens_per_step},
                                 keep=tcfg.keep_checkpoints)  # fmt: skip

    def validate(step: int) -> dict:
        report = validation(model, run_cfg, env.device, max_tokens=tcfg.eval_tokens)
        record = {"step": step, **{f"val_{k}": v for k, v in report.items()}}
        metrics.write(record)
        return record

    bar = None
    if progress and env.is_main:
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            bar = tqdm(total=tcfg.steps, initial=start_step, desc="train", file=sys.stderr,
                       dynamic_ncols=True)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    last_val: dict = {}
    window_start, window_tokens = time.perf_counter(), 0
    loss_value = float("nan")
    for step in range(start_step, tcfg.steps):
        optimizers.set_lr_factor(lr_factor(step, tcfg))
        inputs, targets = batches.batch(step, env.rank, env.world_size)
        loss_sum = torch.zeros((), device=env.device)
        aux_terms: dict[str, float] = {}
        for micro in range(tcfg.grad_accum):
            rows = slice(micro * micro_rows, (micro + 1) * micro_rows)
            x, y = inputs[rows].to(env.device), targets[rows].to(env.device)
            with autocast_context(env.device, tcfg.precision):
                loss, out = lm_loss(forward, x, y)
            ((loss + out.aux_loss) / tcfg.grad_accum).backward()
            loss_sum += loss.detach()
            for key, value in out.aux_terms.items():
                aux_terms[key] = aux_terms.get(key, 0.0) + float(value) / tcfg.grad_accum
        step_loss = all_reduce_mean_(loss_sum / tcfg.grad_accum, env)
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):
            last = ckpt.latest_checkpoint(run_dir)
            raise TrainingError(
                f"loss became {loss_value} at step {step}; stopped without updating the "
                f"weights. Last good checkpoint: {last or 'none'}. Try a lower train.lr."
            )
        average_gradients(model, env)
        grad_norm = clip_grad_norm_(params, tcfg.grad_clip)
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
    return {"steps": tcfg.steps, "final_loss": loss_value, "is_main": env.is_main, **last_val}
