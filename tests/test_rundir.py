"""The run-directory layer: validate before changing, resume rules, the lock, divergence,
leftovers of a killed save, torn metrics. Each bad input must give one line, exit 2, and
leave the protected files byte-identical."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config

from jtok.cli import main
from jtok.io import read_jsonl
from jtok.run import checkpoint as ckpt
from jtok.run.rundir import load_run
from jtok.training.loop import TrainingError, train


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the lock file (a start may add it)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".jtok.lock"}


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def trained_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_run_config(tiny_data, steps=8, save_every=4, schedule="wsd",
                          decay_fraction=0.25), run, progress=False, log=lambda m: None)
    return run


def resume(run, *extra):
    return main(["train", "--out", str(run), "--resume", "--no-progress", *extra])


def test_refused_resume_changes_nothing_and_names_the_field(trained_run, capsys):
    before = tree_hashes(trained_run)
    capsys.readouterr()
    one_line_error(capsys, resume(trained_run, "--set", "d_model=128"), "model.d_model")
    one_line_error(capsys, resume(trained_run, "--set", "lr=0.3"), "train.lr", "--allow-change")
    one_line_error(capsys, resume(trained_run, "--set", "seed=3"), "train.seed")
    one_line_error(capsys, resume(trained_run, "--allow-change", "train.seed"),
                   "not being changed")
    # Which optimizer steps which parameter: refused even when allowed (the checkpoint's
    # optimizer state would not load, and config.json used to be rewritten first).
    key = "model.tokmod.sparse_grad"  # train.freeze_backbone: tests/test_retrofit_run.py
    one_line_error(capsys, resume(trained_run, "--set", f"{key}=false", "--set", "steps=9",
                                  "--allow-change", key), key, "optimizer state would not fit")
    assert tree_hashes(trained_run) == before
    assert resume(trained_run) == 0  # and a plain resume still works afterwards


def test_a_checkpoints_path_that_is_a_file_is_refused_before_anything_changes(trained_run,
                                                                             capsys):
    """It used to read as "no checkpoint yet": the resume restarted at step 0 and emptied
    metrics.jsonl, then failed at its first save."""
    import shutil

    shutil.rmtree(trained_run / "checkpoints")
    (trained_run / "checkpoints").write_text("not a folder")
    before = tree_hashes(trained_run)
    capsys.readouterr()
    one_line_error(capsys, resume(trained_run), "checkpoints exists and is not a directory")
    assert tree_hashes(trained_run) == before


def test_a_failed_save_is_one_line_and_leaves_no_partial_checkpoint(tiny_data, tmp_path,
                                                                    monkeypatch, capsys):
    import errno

    def disk_full(folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(tiny_data), "--set", "steps=4",
                 "--set", "save_every=2", "--set", "batch_size=4", "--set", "seq_len=32",
                 "--no-progress", "--out", str(run)]) == 0  # fmt: skip
    monkeypatch.setattr(ckpt, "_write_checkpoint_files", disk_full)
    capsys.readouterr()
    code = resume(run, "--set", "steps=6", "--allow-change", "steps")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # after the resume's own notes
    assert last.startswith("jtok train: error: saving the checkpoint of step 6 failed (No "
                           "space left on device") and last.endswith("step_00000004"), last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002",
                                                                       "step_00000004"]


def test_a_damaged_latest_checkpoint_is_an_error_not_a_silent_older_one(trained_run, capsys):
    (trained_run / "checkpoints" / "step_00000008" / "state.json").unlink()
    before = tree_hashes(trained_run)
    capsys.readouterr()
    for argv in (["eval", "--run", str(trained_run)],
                 ["train", "--out", str(trained_run), "--resume", "--no-progress"]):
        one_line_error(capsys, main(argv), "step_00000008 is damaged: it has no state.json",
                       "the one before is step_00000004")
    assert tree_hashes(trained_run) == before
    # Explicitly asked for, the older checkpoint still loads.
    assert main(["eval", "--run", str(trained_run), "--checkpoint",
                 str(trained_run / "checkpoints" / "step_00000004")]) == 0  # fmt: skip


def test_a_checkpoint_rotated_away_while_loading_is_replaced_by_the_new_latest(trained_run,
                                                                               monkeypatch):
    """A run still training deletes old checkpoints: `eval` reading the latest one as the
    trainer saves a newer one and rotates it away reads the new latest instead."""
    import shutil

    real_validate, calls = ckpt.validate_checkpoint, {"n": 0}
    newer = trained_run / "checkpoints" / "step_00000009"

    def rotated_meanwhile(ckpt_dir, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the trainer saves step 9 and rotates step 8 away
            shutil.copytree(ckpt_dir, newer)
            shutil.rmtree(ckpt_dir)
        return real_validate(ckpt_dir, *args, **kwargs)

    monkeypatch.setattr(ckpt, "validate_checkpoint", rotated_meanwhile)
    _, model, state = load_run(trained_run)
    assert calls["n"] == 2 and state["step"] == 8  # the copy of step 8 under step 9's name


def test_allowed_change_is_applied_for_real_and_recorded(trained_run, capsys):
    # The WSD run had decayed: a longer run would jump the LR, so that is refused too.
    one_line_error(capsys, resume(trained_run, "--set", "lr=1e-2", "--set", "steps=10",
                                  "--allow-change", "lr"), "train.steps", "decay had begun")
    assert resume(trained_run, "--set", "lr=1e-2", "--set", "steps=10",
                  "--allow-change", "lr", "--allow-change", "steps") == 0
    capsys.readouterr()
    config = json.loads((trained_run / "config.json").read_text())
    assert config["train"]["lr"] == 1e-2 and config["train"]["steps"] == 10
    changes = json.loads((trained_run / "run.json").read_text())["changes"]
    assert {(c["key"], c["kind"], c["step"]) for c in changes} == {
        ("train.lr", "allowed", 8), ("train.steps", "allowed", 8)}
    state = ckpt.read_state(ckpt.latest_checkpoint(trained_run))
    groups = [g for part in state["optimizer"] for g in part["param_groups"]]
    matrix = next(g for g in groups if g["role"] == "matrix")
    assert matrix["base_lr"] == pytest.approx(1e-2)  # the optimizer used the new lr


def test_extending_steps_follows_the_schedule(tiny_data, tmp_path, capsys):
    # WSD in its stable phase: the stable phase extends, the LR does not move.
    wsd = tmp_path / "wsd"
    train(tiny_run_config(tiny_data, steps=12, save_every=4, schedule="wsd",
                          decay_fraction=0.25), wsd, progress=False, log=lambda m: None)
    for path in ckpt.list_checkpoints(wsd)[1:]:  # back to step 4, inside the stable phase
        import shutil

        shutil.rmtree(path)
    assert resume(wsd, "--set", "steps=40") == 0
    lrs = {r["step"]: r["lr"] for r in read_jsonl(wsd / "metrics.jsonl") if "lr" in r}
    assert lrs[5] == lrs[20] == pytest.approx(3e-3)  # flat until the new decay
    # Cosine: extending would raise the LR at once, so it is refused, naming the jump.
    cos = tmp_path / "cos"
    train(tiny_run_config(tiny_data, steps=8, save_every=4), cos, progress=False,
          log=lambda m: None)  # fmt: skip
    before = tree_hashes(cos)
    capsys.readouterr()
    one_line_error(capsys, resume(cos, "--set", "steps=16"), "train.steps", "cosine")
    assert tree_hashes(cos) == before
    # Run-time settings just apply.
    assert resume(cos, "--set", "eval_every=3", "--set", "log_every=2") == 0
    assert json.loads((cos / "config.json").read_text())["train"]["eval_every"] == 3


def test_damaged_checkpoints_and_metrics(trained_run, capsys):
    latest = ckpt.latest_checkpoint(trained_run)
    optimizer = latest / "optimizer.safetensors"
    original = optimizer.read_bytes()
    optimizer.write_bytes(original[: len(original) // 2])  # truncated
    before = tree_hashes(trained_run)
    capsys.readouterr()
    one_line_error(capsys, resume(trained_run, "--set", "steps=8"), "optimizer")
    assert tree_hashes(trained_run) == before
    optimizer.write_bytes(original)
    state_path = latest / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({k: v for k, v in state.items() if k != "rng"}))
    one_line_error(capsys, resume(trained_run), "missing rng")
    state_path.write_text(json.dumps(state))
    # A half-written last metrics line (a kill mid-write) does not break a resume.
    metrics = trained_run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 9, "lo')
    assert resume(trained_run) == 0
    assert metrics.read_bytes().endswith(b"\n")
    assert all(r["step"] <= 8 for r in read_jsonl(metrics))


def test_leftovers_of_a_killed_save_are_cleaned_and_the_latest_complete_loads(trained_run):
    root = trained_run / "checkpoints"
    # What SIGKILL during a save leaves: a hidden temporary folder with partial files.
    partial = root / f".tmp-step_00000012-{os.getpid() + 1}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    _, _, state = load_run(trained_run)
    assert state["step"] == 8  # readers never see the partial folder
    assert resume(trained_run, "--set", "steps=8") == 0
    assert not partial.exists()


def explode_loss_after(monkeypatch, steps: int, factor: float) -> None:
    """The trainer's loss, multiplied by `factor` (huge but finite) after `steps` calls."""
    import jtok.training.loop as train_module

    real_loss, calls = train_module.lm_loss, {"n": 0}

    def exploding(model, x, y, *rest):
        calls["n"] += 1
        loss, out = real_loss(model, x, y, *rest)
        return (loss * factor if calls["n"] > steps else loss), out

    monkeypatch.setattr(train_module, "lm_loss", exploding)


def test_divergence_stops_before_a_bad_checkpoint(tiny_data, tmp_path, monkeypatch):
    explode_loss_after(monkeypatch, 25, 1e6)  # from the 26th step on
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"exploded.*at step 25.*step_00000024"):
        train(tiny_run_config(tiny_data, steps=40, save_every=4, keep_checkpoints=1), run,
              progress=False, log=lambda m: None)  # fmt: skip
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000024"]
    _, model, _ = load_run(run)
    assert max(float(p.abs().max()) for p in model.parameters()) < 100


def test_an_explosion_in_the_first_steps_stops_training(tiny_data, tmp_path, monkeypatch):
    """Before a median of 20 steps exists, the lowest loss so far is the reference: a loss
    that jumps 100x at the third step stops the run there, with nothing saved."""
    explode_loss_after(monkeypatch, 2, 100)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"exploded.*the lowest of the first 2 steps"):
        train(tiny_run_config(tiny_data, steps=40, save_every=1, keep_checkpoints=1), run,
              progress=False, log=lambda m: None)  # fmt: skip
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002"]


def test_early_descent_never_counts_as_an_explosion():
    from jtok.training.divergence import DivergenceMonitor

    monitor = DivergenceMonitor()
    # Rises back to 3.0, and an uneven 7.0 (2.9x the lowest): fine; 25 > 10 x 2.4 is not.
    for loss in [7.0, 5.0, 2.5, 3.0, 2.4, 7.0, 25.0]:
        reason = monitor.check_loss(loss)
        if loss == 25.0:
            assert reason is not None and "10.4x 2.4" in reason
        else:
            assert reason is None
            monitor.check_gradient(loss, 1.0)


def test_rotation_keeps_the_newest_healthy_checkpoint(tmp_path):
    from conftest import tiny_model

    model = tiny_model()
    ckpt.save_checkpoint(tmp_path, 1, model, meta={"healthy": True}, keep=1)
    ckpt.save_checkpoint(tmp_path, 2, model, meta={"healthy": False}, keep=1)
    ckpt.save_checkpoint(tmp_path, 3, model, meta={"healthy": False}, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001",
                                                                  "step_00000003"]
    assert ckpt.last_healthy_checkpoint(tmp_path).name == "step_00000001"


def test_eval_reports_a_nan_loss_as_an_error(trained_run, capsys):
    from safetensors.torch import load_file, save_file

    path = ckpt.latest_checkpoint(trained_run) / "model.safetensors"
    tensors = load_file(path)
    tensors["head.weight"] = torch.full_like(tensors["head.weight"], float("nan"))
    save_file(tensors, path)
    one_line_error(capsys, main(["eval", "--run", str(trained_run)]), "nan")


def test_bad_output_paths_give_one_line(tiny_data, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    base = ["train", "--preset", "tiny", "--data", str(tiny_data), "--set", "seq_len=32",
            "--set", "steps=1", "--no-progress"]  # fmt: skip
    one_line_error(capsys, main([*base, "--out", str(afile)]), "not a directory")
    one_line_error(capsys, main([*base, "--out", str(afile / "sub")]), "not a directory")
    assert afile.read_text() == "keep me"
    spaced = tmp_path / "a dir with spaces ünï"
    assert main([*base, "--out", str(spaced)]) == 0
    assert (spaced / "config.json").is_file()


def test_eval_works_from_another_working_directory(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny_data.parent)
    run = tmp_path / "run"
    cfg = tiny_run_config(Path("prepared"), steps=2, save_every=2)  # a relative data path
    train(cfg, run, progress=False, log=lambda m: None)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def _spawn_training(tiny_data, run, steps):
    cfg = tiny_run_config(tiny_data, steps=steps, save_every=steps, eval_every=0)
    script = ("import sys, json; from jtok.config import RunConfig; from jtok.training.loop "
              "import train; train(RunConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], "
              "progress=False, log=lambda m: print(m, flush=True))")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg.to_dict()), str(run)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_process_cannot_take_a_run_in_use(tiny_data, trained_run, tmp_path, capsys):
    run = tmp_path / "busy"
    proc = _spawn_training(tiny_data, run, steps=400)
    try:
        deadline = time.time() + 60
        while not (run / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        before = tree_hashes(run)
        args = ["train", "--preset", "tiny", "--data", str(tiny_data), "--set", "seq_len=32",
                "--out", str(run), "--no-progress"]  # fmt: skip
        one_line_error(capsys, main([*args, "--overwrite"]), "in use")
        one_line_error(capsys, main(["train", "--out", str(run), "--resume", "--no-progress"]),
                       "in use")  # fmt: skip
        assert (run / "config.json").read_text() == json.dumps(
            json.loads((run / "config.json").read_text()), indent=2) + "\n"
        after = tree_hashes(run)
        assert after["config.json"] == before["config.json"]
        assert main(["eval", "--run", str(trained_run)]) == 0  # readers need no lock
    finally:
        proc.kill()
        proc.wait()
    # The holder died: its lock is free again at once.
    assert resume(run, "--set", "steps=1") in (0, 2)
    assert "in use" not in capsys.readouterr().err


def test_run_json_records_the_numerics_of_every_start(trained_run, monkeypatch):
    first = json.loads((trained_run / "run.json").read_text())["starts"]
    assert len(first) == 1 and first[0]["step"] == 0
    assert first[0]["torch"] == torch.__version__
    assert first[0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # as if on another machine
    for path in ckpt.list_checkpoints(trained_run)[1:]:  # back to step 4
        import shutil

        shutil.rmtree(path)
    assert resume(trained_run) == 0
    starts = json.loads((trained_run / "run.json").read_text())["starts"]
    assert starts[0] == first[0]  # the first start's record is kept
    assert (starts[1]["step"], starts[1]["threads"]) == (4, 7)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "__0_0.distcp is truncated"),
    ("delete", "__0_0.distcp is missing"),
    ("scramble", "step_00000009 is damaged: "),
    ("metadata", "its distributed checkpoint dcp/ has no .metadata"),
])  # fmt: skip
def test_a_damaged_distributed_checkpoint_is_one_line(trained_run, capsys, damage, message):
    """A DCP checkpoint (written here by one process, as a launch's main process writes
    it) with a damaged shard or metadata fails eval in one line, not DCP's traceback."""
    from jtok.training.optim import Optimizers

    run_cfg, model, state = load_run(trained_run)
    ckpt.save_checkpoint_distributed(trained_run, 9, model, Optimizers(model, run_cfg.train),
                                     {"config": run_cfg.to_dict()}, None, True, lambda: None)
    folder = trained_run / "checkpoints" / "step_00000009" / "dcp"
    shard = folder / "__0_0.distcp"
    assert shard.is_file() and main(["eval", "--run", str(trained_run)]) == 0
    capsys.readouterr()
    if damage == "truncate":
        os.truncate(shard, 100)
    elif damage == "delete":
        shard.unlink()
    elif damage == "scramble":  # same size, other bytes
        shard.write_bytes(bytes(255 - b for b in shard.read_bytes()))
    else:
        (folder / ".metadata").unlink()
    one_line_error(capsys, main(["eval", "--run", str(trained_run)]), message)


def test_run_and_checkpoint_arguments(trained_run, tmp_path, capsys):
    """--checkpoint takes a name inside the run's checkpoints/; a pipe of prompts is read;
    a folder, a pipe for --text (read twice) or an export folder as --run are named."""
    assert main(["eval", "--run", str(trained_run), "--checkpoint", "step_00000004",
                 "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["step"] == 4
    one_line_error(capsys, main(["eval", "--run", str(trained_run), "--checkpoint",
                                 "step_00000005"]), "no such checkpoint folder")  # fmt: skip
    read, write = os.pipe()
    os.write(write, b"the king\n")
    os.close(write)
    argv = ["generate", "--run", str(trained_run), "--max-new-tokens", "2", "--json"]
    assert main([*argv, "--prompts", f"/dev/fd/{read}"]) == 0
    os.close(read)
    assert json.loads(capsys.readouterr().out)["prompt"] == "the king"
    one_line_error(capsys, main([*argv, "--prompts", str(tmp_path)]), "is a folder")
    read, write = os.pipe()
    one_line_error(capsys, main(["eval", "--run", str(trained_run), "--text",
                                 f"/dev/fd/{read}"]), "is not a regular file")  # fmt: skip
    os.close(read)
    os.close(write)
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"architectures": ["JTokForCausalLM"]}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the king\n")
    one_line_error(capsys, main([*argv, "--prompts", str(prompts), "--run", str(export)]),
                   "is a Hugging Face model directory")


def test_checkpoint_files_are_readable_as_any_file_the_user_writes(trained_run):
    """safetensors creates its files 0600; checkpoints (and exports) are meant to be shared."""
    from jtok.io import file_mode

    latest = ckpt.latest_checkpoint(trained_run)
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        assert (latest / name).stat().st_mode & 0o777 == file_mode(), name
    old = os.umask(0o077)
    try:
        assert file_mode() == 0o600  # and a private umask is respected
    finally:
        os.umask(old)
