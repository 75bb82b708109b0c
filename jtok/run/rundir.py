"""The one place that knows a run directory: open it to train (new, resume, overwrite),
load it to evaluate or sample, decide whether a study reuses, resumes or refuses it.

Starting a run is two steps. `plan_start` validates everything and changes nothing: the
config, the data (manifest, tokenizer hash, ids against the vocabulary), the checkpoint
to resume from (state fields, tensor names and shapes, optimizer files: read from file
headers, nothing is loaded), and what a resume may change (jtok.run.resume). Only then
does `apply_start` touch the directory: `--overwrite` deletes the old outputs, leftover
temporary checkpoint folders are removed, config.json / run.json / tokenizer.json are
written and metrics past the checkpoint are dropped. So a failed start or resume leaves
the directory as it was (but for the lock file). Both run under the run's lock
(jtok.run.lock), which the trainer holds until the run ends.

run.json records the data as given and as resolved to an absolute path, with a
fingerprint of its manifest, so `eval` finds the data from any working directory, and a
moved data directory is recognised as the same data; and, per start, the numerics the run
ran under (`numerics_environment`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jtok import __version__, data
from jtok.config import ConfigError, RunConfig, config_differences
from jtok.errors import JTokError
from jtok.io import read_json, read_jsonl, rewrite_jsonl, write_json_atomic
from jtok.parallel.resources import check_memory
from jtok.run import checkpoint as ckpt
from jtok.run.files import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FOLDER_MARKERS,
    LOCK_FILE,
    METRICS_FILE,
    RETROFIT_RECORD_KEY,
    RUN_INFO_FILE,
    RUN_OUTPUTS,
    TOKENIZER_FILE,
)
from jtok.run.resume import Change, classify_changes


class RunDirError(JTokError):
    """A run directory cannot be used as asked; the message says why and what to do."""


# ---- data identity -----------------------------------------------------------------------


def data_fingerprint(manifest: dict) -> str:
    """A hash of what makes prepared data the same data: tokenizer, splits and sources'
    content. Not the paths or the creation time, so a rebuilt or moved copy matches."""
    sources = sorted(s.get("sha256", "") for s in manifest.get("sources", []))
    splits = {name: {k: v for k, v in info.items() if k in ("tokens", "bytes", "documents")}
              for name, info in manifest["splits"].items()}  # fmt: skip
    identity = {"tokenizer_sha256": manifest["tokenizer_sha256"],
                "vocab_size": manifest["vocab_size"], "dtype": manifest["dtype"],
                "splits": splits, "sources": sources}  # fmt: skip
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_INFO_FILE
    if not path.is_file():
        return {}
    info = read_json(path, "run info")
    if not isinstance(info, dict):
        raise RunDirError(f"run info {path} is not a JSON object")
    return info


def _data_record(given: str) -> dict[str, Any]:
    manifest = data.load_manifest(given)
    return {"given": given, "resolved": str(Path(given).resolve()),
            "fingerprint": data_fingerprint(manifest),
            "tokenizer_sha256": manifest["tokenizer_sha256"]}  # fmt: skip


def resolve_data_dir(run_dir: Path, run_cfg: RunConfig) -> Path:
    """The run's data directory: the path as given (relative to the working directory) if
    it exists, else the absolute path recorded when the run started (another working
    directory, or a relative path). A path that holds other data than the run recorded
    is refused, naming what differs."""
    given = run_cfg.train.data
    recorded = read_run_info(run_dir).get("data", {})
    candidates = [p for p in dict.fromkeys((given, recorded.get("resolved"))) if p]
    for candidate in candidates:
        if not (Path(candidate) / data.MANIFEST_FILE).is_file():
            continue
        manifest = data.load_manifest(candidate)
        fingerprint = recorded.get("fingerprint")
        if fingerprint is not None and data_fingerprint(manifest) != fingerprint:
            what = ("was tokenized with another tokenizer (sha256 "
                    f"{manifest['tokenizer_sha256'][:12]}...)"
                    if manifest["tokenizer_sha256"] != recorded.get("tokenizer_sha256")
                    else "holds other data (its fingerprint differs)")  # fmt: skip
            raise RunDirError(f"the data at {candidate} {what} than run {run_dir} trained on")
        return Path(candidate)
    where = " or ".join(repr(p) for p in candidates)
    raise RunDirError(f"the data of run {run_dir} is not at {where or '(no path)'}: it was "
                      "moved or deleted; pass --data DIR to point at it")  # fmt: skip


# ---- starting a training run ---------------------------------------------------------------


@dataclass
class StartPlan:
    """What `apply_start` will do; built by `plan_start` without changing anything."""

    run_dir: Path
    config: RunConfig  # what the run will use (saved config plus the changes applied)
    data_dir: Path
    manifest: dict
    resume: bool
    checkpoint: Path | None = None
    start_step: int = 0
    changes: list[Change] = field(default_factory=list)
    overwrite: bool = False


def _outputs_present(run_dir: Path) -> list[str]:
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)


def _refuse_overwrite_of_a_non_run(run_dir: Path, present: list[str]) -> None:
    """--overwrite deletes a run's own outputs (other files stay). Files of those names in a
    directory that holds no run (no run.json, the first file every start writes), or
    anything but checkpoint folders under checkpoints/, are someone else's: refuse."""
    for name, what in FOLDER_MARKERS.items():
        if name in present and RUN_INFO_FILE not in present:
            raise RunDirError(f"--out {run_dir} holds {what} ({name}); give the run a "
                              "directory of its own")  # fmt: skip
    ours = [name for name in present if name in RUN_OUTPUTS]
    if ours and RUN_INFO_FILE not in present:
        raise RunDirError(f"--out {run_dir} holds {ours[0]!r} but no {RUN_INFO_FILE}, so it is "
                          "not a jtok run; --overwrite replaces only an earlier run's outputs")
    root = run_dir / CHECKPOINT_DIR
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if not (entry.is_dir() and entry.name.startswith(("step_",
                                                              *ckpt.TEMPORARY_PREFIXES))):
                raise RunDirError(f"--out {run_dir}: {CHECKPOINT_DIR}/{entry.name} is not a "
                                  "jtok checkpoint; --overwrite would delete it")  # fmt: skip


def check_out_dir(run_dir: Path) -> None:
    """Refuse an output path that is a file, or whose nearest existing parent is not a
    writable directory, before anything is created."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} exists and is not a directory")
    parent = run_dir if run_dir.exists() else next(p for p in run_dir.parents if p.exists())
    if not parent.is_dir():
        raise RunDirError(f"--out {run_dir}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"--out {run_dir}: {parent} is not writable")


def _check_checkpoint_dir(run_dir: Path, resume: bool) -> None:
    """The checkpoints folder must be a writable directory (or absent) before training
    starts: a file there read as "no checkpoint yet" (and a resume then started over at
    step 0), and a read-only folder failed only at the first save."""
    root = run_dir / CHECKPOINT_DIR
    if not (root.exists() or root.is_symlink()):
        return
    if not root.is_dir():
        raise RunDirError(f"{root} exists and is not a directory"
                          + ("" if resume else "; --overwrite would delete it"))
    if not os.access(root, os.W_OK | os.X_OK):
        raise RunDirError(f"{root} is not writable: checkpoints could not be saved"
                          + ("" if resume else " or deleted"))


def _refuse_data_overlap(run_dir: Path, train_data: str) -> None:
    """A run directory may not be, contain or sit inside its data directory: --overwrite
    would delete the data's files, and a run's files would land among them."""
    if not train_data:
        return
    run, data_dir = run_dir.resolve(), Path(train_data).resolve()
    if run == data_dir or data_dir in run.parents or run in data_dir.parents:
        raise RunDirError(f"--out {run_dir} overlaps the data directory {train_data}; give "
                          "the run a directory of its own")  # fmt: skip


def saved_run_config(run_dir: Path) -> RunConfig:
    """The run's config: a `RunConfig`, or for a retrofitted HF model (config.json with a
    "retrofit" section) a `jtok.hf.retrofit_run.RetrofitRunConfig`."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} holds no run (no {CONFIG_FILE})")
    raw = read_json(path, "run config")
    if isinstance(raw, dict) and "architectures" in raw and "train" not in raw:
        raise RunDirError(f"{run_dir} is a Hugging Face model directory (`jtok export` writes "
                          "these), not a run: load it with transformers")  # fmt: skip
    try:
        if isinstance(raw, dict) and RETROFIT_RECORD_KEY in raw:
            try:
                from jtok.hf.retrofit_run import RetrofitRunConfig
            except ImportError as err:
                raise RunDirError(f"{run_dir} is a retrofitted Hugging Face model: "
                                  f"{str(err).splitlines()[0]}") from None  # fmt: skip
            return RetrofitRunConfig.from_dict(raw)
        return RunConfig.from_dict(raw)
    except ConfigError as err:
        raise RunDirError(f"{path}: {err}") from None


def is_retrofit(run_cfg) -> bool:
    """Whether a run config is a retrofitted HF model's record (jtok.hf.retrofit_run)."""
    return hasattr(run_cfg, "build_model")


def meta_model(run_cfg):
    """The run's model on the meta device: tensor names and shapes, for checkpoint checks."""
    if is_retrofit(run_cfg):
        return run_cfg.build_model("meta")
    from jtok.nn.model import build_model

    return build_model(run_cfg.model, device="meta")


def _check_data(train_data: str, run_cfg) -> dict:
    if not train_data:
        raise RunDirError("train.data is empty: point it at a `jtok data prepare` directory")
    # Paths inside the directory, the tokenizer's hash, split sizes and fingerprints, and
    # the recorded largest ids against the model's vocabulary.
    manifest = data.verify_data_dir(train_data)
    if is_retrofit(run_cfg):  # the data's vocabulary must be the HF model's own
        from jtok.hf.retrofit_run import check_data_vocab

        check_data_vocab(run_cfg, manifest, train_data)
    data.check_vocab(manifest, run_cfg.model.vocab_size)
    return manifest


def plan_start(run_dir: Path | str, run_cfg: RunConfig, *, resume: bool = False,
               overwrite: bool = False, allow_changes: set[str] | frozenset = frozenset(),
               ) -> StartPlan:  # fmt: skip
    """Validate a start or resume of `run_dir` with `run_cfg`; change nothing."""
    run_dir = Path(run_dir)
    check_out_dir(run_dir)
    _refuse_data_overlap(run_dir, run_cfg.train.data)
    _check_checkpoint_dir(run_dir, resume)
    if not resume:
        present = _outputs_present(run_dir)
        if present and not overwrite:
            raise RunDirError(f"run directory {run_dir} is not empty; use --resume to continue "
                              "it or --overwrite to start over (its checkpoints and metrics "
                              "will be deleted)")  # fmt: skip
        _refuse_overwrite_of_a_non_run(run_dir, present)
        manifest = _check_data(run_cfg.train.data, run_cfg)
        if is_retrofit(run_cfg):  # step 0 loads its weights
            from jtok.hf.retrofit_run import check_hf_dir

            check_hf_dir(run_cfg.source)
        return StartPlan(run_dir, run_cfg, Path(run_cfg.train.data), manifest, resume=False,
                         overwrite=bool(present))  # fmt: skip

    saved = saved_run_config(run_dir)
    info = read_run_info(run_dir)
    read_metrics(run_dir)  # corrupt metrics fail here, before anything is rewritten
    latest = ckpt.latest_checkpoint(run_dir)
    step = 0
    if is_retrofit(saved) != is_retrofit(run_cfg):
        raise RunDirError(f"{run_dir} holds a {'retrofitted' if is_retrofit(saved) else 'jtok'}"
                          " model's run; --resume continues it as it is")  # fmt: skip
    if latest is not None:
        # The checkpoint must fit the saved model; a model change is refused below anyway.
        step = ckpt.validate_checkpoint(latest, meta_model(saved), with_optimizer=True)["step"]
    recorded_fp = info.get("data", {}).get("fingerprint")
    wanted_data = run_cfg.train.data
    same_data = False
    if wanted_data != saved.train.data and (Path(wanted_data) / data.MANIFEST_FILE).is_file():
        same_data = recorded_fp is not None and data_fingerprint(
            data.load_manifest(wanted_data)) == recorded_fp  # fmt: skip
    changes = classify_changes(saved, run_cfg, step, set(allow_changes), same_data)
    if any(c.key.startswith("model.") for c in changes) and latest is not None:
        ckpt.validate_checkpoint(latest, meta_model(run_cfg), with_optimizer=True)
    if latest is not None and run_cfg.train.steps < step:
        raise RunDirError(f"train.steps={run_cfg.train.steps} is before checkpoint step {step}")
    data_dir = (Path(wanted_data) if wanted_data != saved.train.data
                else resolve_data_dir(run_dir, saved))  # fmt: skip
    manifest = _check_data(str(data_dir), run_cfg)
    if latest is None and is_retrofit(run_cfg):  # no checkpoint: step 0 loads its weights
        from jtok.hf.retrofit_run import check_hf_dir

        check_hf_dir(run_cfg.source)
    if latest is not None:
        saved_tok = ckpt.read_state(latest).get("tokenizer_sha256")
        if saved_tok:
            data.check_tokenizer(manifest, saved_tok)
    return StartPlan(run_dir, run_cfg, data_dir, manifest, resume=True, checkpoint=latest,
                     start_step=step, changes=changes)  # fmt: skip


def apply_start(plan: StartPlan, log=None) -> None:
    """Make the directory what `plan` says (call on one process, under the run's lock)."""
    run_dir = plan.run_dir
    numerics = numerics_environment(plan.config.train.device)  # before anything is removed
    if plan.overwrite:
        # run.json last: an overwrite cut short still leaves a directory marked as a run.
        for name in sorted(RUN_OUTPUTS, key=lambda name: name == RUN_INFO_FILE):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    removed = ckpt.clean_temporary(run_dir)
    if removed and log:
        log(f"removed {len(removed)} temporary checkpoint folder(s) left by an earlier crash")
    info = read_run_info(run_dir) if plan.resume else {}
    history = list(info.get("changes", []))
    history += [c.record(plan.start_step) for c in plan.changes]
    starts = [*info.get("starts", []), {"step": plan.start_step, **numerics}]
    info = {"jtok_version": __version__, **info, "data": _data_record(str(plan.data_dir)),
            "changes": history, "starts": starts}  # fmt: skip
    info["data"]["given"] = plan.config.train.data
    write_json_atomic(run_dir / RUN_INFO_FILE, info)
    write_json_atomic(run_dir / CONFIG_FILE, plan.config.to_dict())
    source = plan.data_dir / plan.manifest["tokenizer"]
    if not (run_dir / TOKENIZER_FILE).is_file() or not plan.resume:
        shutil.copyfile(source, run_dir / TOKENIZER_FILE)
    if plan.resume:
        truncate_metrics(run_dir, plan.start_step)


def numerics_environment(device_preference: str = "auto") -> dict[str, Any]:
    """What decides a run's floating-point results besides its config and data: the torch
    build, the CPU kernels it dispatches to (AVX2 and AVX-512 sum in different orders), the
    intra-op threads, the number of processes, the accelerator the run uses. run.json keeps
    one record per start, so a run resumed on another machine says where its trajectory may
    have left the bits of an unbroken run. (The parallel mode is in config.json.)"""
    import platform

    import torch

    from jtok.parallel.distributed import resolve_device

    world = torch.distributed.get_world_size() if (
        torch.distributed.is_available() and torch.distributed.is_initialized()) else 1  # fmt: skip
    record = {"torch": torch.__version__, "cpu": platform.machine(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": torch.get_num_threads(), "processes": world}  # fmt: skip
    try:
        device = resolve_device(device_preference)
    except JTokError:  # the trainer reports a device it cannot use; this only records
        return record
    record["device"] = device.type
    if device.type == "cuda":
        record["cuda_device"] = torch.cuda.get_device_name(device)
    return record


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics past `step` (written by a run that died after its last checkpoint)."""
    path = Path(run_dir) / METRICS_FILE
    records = read_jsonl(path, "metrics")
    kept = [r for r in records if r.get("step", 0) <= step]
    if path.is_file() and (len(kept) != len(records) or not path.read_bytes().endswith(b"\n")
                           or records == []):  # fmt: skip
        rewrite_jsonl(path, kept)


def read_metrics(run_dir: Path | str) -> list[dict]:
    return read_jsonl(Path(run_dir) / METRICS_FILE, "metrics")


def saved_config(run_dir: Path | str) -> dict | None:
    """The config.json a run directory was trained with, or None if it has none readable."""
    try:
        return read_json(Path(run_dir) / CONFIG_FILE, "run config")
    except JTokError:
        return None


# ---- reuse, resume or refuse (studies) -------------------------------------------------------


def prior_run(run_dir: Path | str, planned: RunConfig, what: str = "run") -> str:
    """What a study should do with `run_dir` for `planned`: "new", "resume" or "finished".

    A directory that holds a checkpoint or metrics made under another configuration is
    refused (neither reused nor trained over), naming the first field that differs. The
    data is compared by fingerprint where the run recorded one, not by path."""
    run_dir = Path(run_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None and not read_metrics(run_dir):
        return "new"
    changed = run_differences(run_dir, planned)
    if changed:
        raise RunDirError(f"{what} {run_dir} was trained with another configuration "
                          f"({changed[0]}); restore it, or move that folder away to "
                          "retrain")  # fmt: skip
    if latest is None:
        return "new"
    if ckpt.read_state(latest)["step"] >= planned.train.steps:
        return "finished"
    return "resume"


def run_differences(run_dir: Path, planned: RunConfig) -> list[str]:
    recorded = saved_config(run_dir)
    fingerprint = read_run_info(run_dir).get("data", {}).get("fingerprint") if (
        Path(run_dir) / RUN_INFO_FILE).is_file() else None  # fmt: skip
    return differences_ignoring_data_path(recorded, planned, fingerprint)


def differences_ignoring_data_path(recorded: dict | None, planned: RunConfig,
                                   fingerprint: str | None) -> list[str]:  # fmt: skip
    """config_differences, where train.data counts only if the data itself differs."""
    changed = config_differences(recorded, planned)
    if fingerprint is None:
        return changed
    data_changed = [c for c in changed if c.startswith("train.data:")]
    if data_changed and (Path(planned.train.data) / data.MANIFEST_FILE).is_file():
        if data_fingerprint(data.load_manifest(planned.train.data)) == fingerprint:
            changed = [c for c in changed if not c.startswith("train.data:")]
    return changed


# ---- loading a run for eval, sample, generate ------------------------------------------------


def load_run(run_dir: Path | str, checkpoint: Path | str | None = None,
             device: Any = "cpu", table_placement: str = "device"):  # fmt: skip
    """(RunConfig, model with trained weights, checkpoint state) of a training run.

    `table_placement` "host" keeps the tables in host memory (jtok.tables.host)."""
    from jtok.nn.model import build_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    run_cfg = saved_run_config(run_dir)
    for attempt in range(3):
        ckpt_dir = Path(checkpoint) if checkpoint is not None else ckpt.latest_checkpoint(run_dir)
        if ckpt_dir is None:
            raise RunDirError(f"{run_dir} has no checkpoint yet")
        if not ckpt_dir.is_dir():
            raise RunDirError(f"checkpoint {ckpt_dir} does not exist")
        try:
            state = ckpt.validate_checkpoint(ckpt_dir, meta_model(run_cfg), with_optimizer=False)
            check_memory(run_cfg.model, device, training=False, what=f"loading run {run_dir}",
                         table_placement=table_placement)  # fmt: skip
            if is_retrofit(run_cfg):  # a jtok.hf.retrofit_run.RetrofitLM (HF model + tables)
                model = run_cfg.build_model(device, table_placement)
            else:
                model = build_model(run_cfg.model, device=device,
                                    table_placement=table_placement)  # fmt: skip
            ckpt.load_model_weights(ckpt_dir, model)
            return run_cfg, model.eval(), state
        except ckpt.CheckpointError:
            # A run still training rotates old checkpoints away: the latest one may vanish
            # between choosing and reading it. Then the new latest is read instead.
            if checkpoint is not None or ckpt_dir.exists() or attempt == 2:
                raise
