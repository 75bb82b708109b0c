"""`jtok demo`: baseline, JTok and JTok-M trained side by side on Shakespeare.

The same small backbone is trained three ways for the same tokens, on the default corpus,
sized for about ten minutes on two CPU cores. Writes a table to stdout, `summary.json`
(one entry per variant) and `loss_curves.png` into the output directory. Each variant is
an ordinary run directory under `runs/`, so `jtok eval` and `jtok sample` work on it, and
an interrupted demo resumes each run where it stopped.

The variants train one after another, so their tokens/s figures are not a speed
comparison (another process on the machine can slow one run and not the next): the table
reports each run's own rate and points to `jtok bench`, which interleaves the variants.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

from jtok import data
from jtok.config import ModelConfig, RunConfig, TokModConfig, TrainConfig, config_differences
from jtok.errors import JTokError
from jtok.flops import summarize
from jtok.io import write_json_atomic
from jtok.parallel.resources import check_output_dir
from jtok.run.checkpoint import latest_checkpoint
from jtok.training.loop import read_metrics, saved_config, train


class DemoError(JTokError):
    """The demo's output folder holds runs it cannot reuse."""


VARIANTS = {
    "baseline": TokModConfig(kind="none"),
    "jtok": TokModConfig(kind="jtok"),
    "jtokm": TokModConfig(kind="jtokm", n_e=5, top_k=2),
}
DATA_VOCAB = 4096
SUMMARY_FILE = "summary.json"
CURVES_FILE = "loss_curves.png"


def demo_backbone(vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                       ffn_hidden=384, max_seq_len=128)  # fmt: skip


def demo_train_config(data_dir: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        data=str(data_dir), seq_len=128, batch_size=16, steps=steps, lr=3e-3,
        warmup_steps=min(50, steps // 10), schedule="cosine", eval_every=max(1, steps // 6),
        eval_tokens=32768, save_every=max(1, steps // 6), log_every=10,
    )  # fmt: skip


def ensure_data(out: Path, log, progress: bool) -> Path:
    """The default corpus, prepared once into OUT/data (reused by later demos)."""
    data_dir = out / "data"
    if (data_dir / data.MANIFEST_FILE).is_file():
        return data_dir
    data.prepare([], data_dir, vocab_size=DATA_VOCAB, val_fraction=0.03, overwrite=True,
                 progress=progress, log=log)  # fmt: skip
    return data_dir


def run_demo(out: Path, steps: int = 600, variants: list[str] | None = None,
             progress: bool = True, log=None) -> dict:  # fmt: skip
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    check_output_dir(out, "--out")  # a file or a read-only folder: one line, nothing written
    out.mkdir(parents=True, exist_ok=True)
    data_dir = ensure_data(out, log, progress)
    vocab = int(data.load_manifest(data_dir)["vocab_size"])
    summary: dict[str, dict] = {}
    for name in variants or list(VARIANTS):
        model_cfg = dataclasses.replace(demo_backbone(vocab), tokmod=VARIANTS[name])
        run_cfg = RunConfig(model=model_cfg, train=demo_train_config(data_dir, steps))
        run_dir = out / "runs" / name
        done = read_metrics(run_dir)
        changed = config_differences(saved_config(run_dir), run_cfg)
        if changed and done:
            # An older jtok's run (other defaults): neither reuse it nor train over it.
            raise DemoError(
                f"{run_dir} was trained with another configuration ({changed[0]}); "
                "pass a new --out, or delete that folder to retrain it"
            )
        finished = any(r.get("step") == steps and "val_loss" in r for r in done)
        if not finished:
            log(f"== {name}: {summarize(model_cfg)['token_params']:,} token parameters ==")
            resume = latest_checkpoint(run_dir) is not None
            train(run_cfg, run_dir, resume=resume, overwrite=not resume, progress=progress,
                  log=log)  # fmt: skip
        summary[name] = variant_summary(model_cfg, run_cfg.train, read_metrics(run_dir))
    write_json_atomic(out / SUMMARY_FILE, summary)
    plot_loss_curves({name: read_metrics(out / "runs" / name) for name in summary},
                     out / CURVES_FILE)  # fmt: skip
    return summary


def variant_summary(model_cfg: ModelConfig, train_cfg: TrainConfig, metrics: list[dict]) -> dict:
    info = summarize(model_cfg, train_cfg.seq_len)
    val = [r for r in metrics if "val_loss" in r]
    rates = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r]
    final = val[-1]
    return {
        "tokmod": model_cfg.tokmod.kind,
        "backbone_params": info["backbone_params"],
        "token_params": info["token_params"],
        "eta": info["eta"],
        "tokens": final["step"] * train_cfg.batch_size * train_cfg.seq_len,
        "val_loss": final["val_loss"],
        "val_ppl": final["val_ppl"],
        "val_bpb": final["val_bpb"],
        # Median over logging windows: robust to a stall on a shared machine.
        "tokens_per_s": statistics.median(rates) if rates else float("nan"),
    }


def bench_command() -> str:
    """The `jtok bench` line that times the demo's backbone and batch, interleaved."""
    from jtok.presets import preset

    small, demo = preset("small").to_dict(), demo_backbone(DATA_VOCAB).to_dict()
    sets = "".join(f" --set {k}={v}" for k, v in demo.items() if small[k] != v)
    train = demo_train_config(Path("."), 1)
    return f"jtok bench --preset small{sets} --seq-len {train.seq_len} --batch {train.batch_size}"


def format_table(summary: dict) -> str:
    header = (f"{'variant':<10}{'backbone':>10}{'token params':>14}{'val loss':>10}"
              f"{'bpb':>8}{'tok/s':>9}")  # fmt: skip
    lines = [header]
    for name, s in summary.items():
        lines.append(
            f"{name:<10}{s['backbone_params']:>10,}{s['token_params']:>14,}{s['val_loss']:>10.4f}"
            f"{s['val_bpb']:>8.4f}{s['tokens_per_s']:>9.0f}"
        )
    note = ("tok/s: each run's own rate; the runs train one after another, so another "
            "process on the machine skews a comparison.\nTo compare speed, time the variants "
            f"interleaved: {bench_command()}")  # fmt: skip
    return "\n".join([*lines, "", note])


def plot_loss_curves(metrics: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, records in metrics.items():
        train_pts = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
        if train_pts:
            tokens, losses = zip(*train_pts, strict=True)
            ax_train.plot([t / 1e6 for t in tokens], _smooth(losses), label=name)
        val_pts = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val_pts:
            per_step = train_pts[0][0] / records[0]["step"] if train_pts else 1
            ax_val.plot([s * per_step / 1e6 for s, _ in val_pts], [v for _, v in val_pts],
                        marker="o", label=name)  # fmt: skip
    ax_train.set(title="training loss (smoothed)", xlabel="tokens (M)", ylabel="loss (nats)")
    ax_val.set(title="validation loss", xlabel="tokens (M)", ylabel="loss (nats)")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values, weight: float = 0.8) -> list[float]:
    out, running = [], None
    for v in values:
        running = v if running is None else weight * running + (1 - weight) * v
        out.append(running)
    return out

