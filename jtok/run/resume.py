"""What may change when a run is resumed, and what the change does.

A resumed run must go on as the run it was, so a difference between the saved config and
the one asked for falls in one of three kinds:

- Run-time settings (RUNTIME_KEYS: how often to log, validate and save, how many
  checkpoints to keep, how many validation tokens, the device, compile, the table
  placement, DDP or FSDP2) change how the run is
  executed, not what it computes. They are applied and recorded.
- ``train.steps``. The schedule is a function of the total, so a new total is applied
  only where it leaves the learning rate at the resume step unchanged: WSD in its stable
  phase (the stable phase extends), "constant", or still in warmup. Elsewhere (cosine,
  or WSD already decaying) it would move the learning rate at once (extending a cosine
  raises it), so it is refused unless ``--allow-change train.steps`` says so.
- Anything else (model shape, lr, schedule, seed, batch, data, ...) is refused with the
  field named, unless ``--allow-change KEY`` applies it; OPTIMIZER_LAYOUT_KEYS not even
  then. ``train.data`` may name another
  path to the same data (equal fingerprint) without that.

Every applied change is recorded in run.json with the step it took effect at, and
config.json is rewritten to the config the run now uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jtok.config import RunConfig, effective_dict
from jtok.errors import JTokError
from jtok.schedule import lr_factor

RUNTIME_KEYS = frozenset({
    "train.eval_every", "train.save_every", "train.log_every", "train.keep_checkpoints",
    "train.eval_tokens", "train.device", "train.compile", "train.table_placement",
    "train.parallel",
})  # fmt: skip


# Settings that decide which optimizer steps which parameters (frozen parameters take no
# optimizer state; sparse tables are RowAdam's, dense ones AdamW's): a checkpoint's
# optimizer state cannot load under another value, so not even --allow-change applies
# them (it used to, and the resume failed only after config.json had been rewritten).
OPTIMIZER_LAYOUT_KEYS = frozenset({"train.freeze_backbone", "model.tokmod.sparse_grad"})


class ResumeError(JTokError):
    """A resume asks for a change the run cannot take; the message names the field."""


@dataclass(frozen=True)
class Change:
    key: str  # dotted, e.g. "train.lr"
    old: Any
    new: Any
    kind: str  # "runtime", "steps", "allowed" or "data-path"

    def record(self, step: int) -> dict[str, Any]:
        return {"step": step, "key": self.key, "old": self.old, "new": self.new,
                "kind": self.kind}  # fmt: skip


def flat_differences(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for each field whose effective value differs."""

    def walk(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b))
                    for d in walk(a.get(k), b.get(k), f"{prefix}{k}.")]  # fmt: skip
        return [] if a == b else [(prefix[:-1], a, b)]

    def effective(cfg) -> dict:  # a retrofitted run's record has its own (jtok.hf.retrofit_run)
        return cfg.effective_dict() if hasattr(cfg, "effective_dict") else effective_dict(cfg)

    return walk(effective(old), effective(new), "")


def _lr_factor(step: int, cfg: RunConfig) -> float:
    return lr_factor(step, cfg.train)


def classify_changes(saved: RunConfig, wanted: RunConfig, resume_step: int,
                     allow: set[str], same_data: bool) -> list[Change]:  # fmt: skip
    """The changes a resume from `resume_step` makes; ResumeError for any it may not make.

    `same_data`: the data `wanted` names has the fingerprint the run recorded."""
    unknown_allow = set(allow)
    changes = []
    for key, old, new in flat_differences(saved, wanted):
        unknown_allow.discard(key)
        if key in RUNTIME_KEYS:
            changes.append(Change(key, old, new, "runtime"))
        elif key in OPTIMIZER_LAYOUT_KEYS:
            raise ResumeError(f"--resume cannot change {key} ({old!r} -> {new!r}): it decides "
                              "which optimizer steps which parameters, and the checkpoint's "
                              "optimizer state would not fit; start a new run")  # fmt: skip
        elif key == "train.data" and same_data and key not in allow:
            changes.append(Change(key, old, new, "data-path"))
        elif key in allow:
            changes.append(Change(key, old, new, "allowed"))
        elif key == "train.steps":
            if new < resume_step:
                raise ResumeError(f"train.steps={new} is before the checkpoint's step "
                                  f"{resume_step}")  # fmt: skip
            before, after = _lr_factor(resume_step, saved), _lr_factor(resume_step, wanted)
            if abs(before - after) > 1e-12:
                advice = ("the decay had begun" if saved.train.schedule == "wsd"
                          else "schedule=wsd runs extend in their stable phase")  # fmt: skip
                raise ResumeError(
                    f"train.steps {old} -> {new} would move the {saved.train.schedule} "
                    f"schedule's learning rate at step {resume_step} from {before:.4g}x to "
                    f"{after:.4g}x the peak ({advice}); --allow-change train.steps accepts "
                    "the jump"
                )
            changes.append(Change(key, old, new, "steps"))
        elif key.startswith("retrofit."):  # the HF model and its tables: fixed for the run
            raise ResumeError(f"--resume cannot change {key} ({old!r} -> {new!r}): a retrofit's "
                              "model and options are fixed for its run; start a new run")
        else:
            hint = ("another data directory (fingerprint differs)" if key == "train.data"
                    else f"{old!r} -> {new!r}")  # fmt: skip
            raise ResumeError(f"--resume cannot change {key} ({hint}); pass --allow-change "
                              f"{key} to apply it anyway, or start a new run")  # fmt: skip
    if unknown_allow:
        key = sorted(unknown_allow)[0]
        raise ResumeError(f"--allow-change {key}: that setting is not being changed")
    return changes
