import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_model, tiny_run_config

from jtok.cli import main
from jtok.config import TrainConfig
from jtok.run import checkpoint as ckpt
from jtok.run.rundir import load_run
from jtok.training.loop import TrainingError, read_metrics, train
from jtok.training.optim import Optimizers, RoleError, lr_factor, parameter_roles


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def test_training_reduces_loss_and_writes_a_complete_run(tiny_data, tmp_path):
    cfg = tiny_run_config(tiny_data, steps=30, lr=1e-2)
    summary = train(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text()) == cfg.to_dict()
    assert (run / "tokenizer.json").is_file()
    trajectory = [loss for _, loss in losses(run)]
    assert trajectory[-1] < trajectory[0] - 0.5
    assert summary["val_loss"] < 5.0 and math.isfinite(summary["val_bpb"])
    kept = [p.name for p in ckpt.list_checkpoints(run)]
    assert kept == ["step_00000028", "step_00000030"]  # keep_checkpoints=2


def run_cli_train(args, **popen):
    return subprocess.Popen([sys.executable, "-m", "jtok", "train", "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)  # fmt: skip


def test_resume_after_a_kill_reproduces_the_uninterrupted_run_exactly(tiny_data, tmp_path):
    common = ["--preset", "tiny", "--data", str(tiny_data), "--set", "tokmod.kind=jtokm",
              "--set", "seq_len=32", "--set", "batch_size=8", "--set", "steps=16",
              "--set", "save_every=4", "--set", "eval_every=8", "--set", "eval_tokens=1024",
              "--set", "log_every=1", "--set", "warmup_steps=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = run_cli_train([*common, "--out", str(tmp_path / "full")], env=env)
    assert full.wait(timeout=120) == 0, full.stderr.read()

    killed = tmp_path / "killed"
    proc = run_cli_train([*common, "--set", "steps=16", "--out", str(killed)], env=env)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_00000008").is_dir():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint before exit"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.latest_checkpoint(killed).name in ("step_00000008", "step_00000012")
    resumed = run_cli_train(["--out", str(killed), "--resume"], env=env)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()

    assert losses(killed) == losses(tmp_path / "full")  # bit-identical on CPU
    val = [(r["step"], r["val_loss"]) for r in read_metrics(killed) if "val_loss" in r]
    assert val == [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / "full")
                   if "val_loss" in r]  # fmt: skip


def test_two_process_torchrun_matches_single_process_training(tiny_data, tmp_path):
    args = ["--preset", "tiny", "--data", str(tiny_data), "--set", "tokmod.kind=jtokm",
            "--set", "seq_len=32", "--set", "batch_size=8", "--set", "steps=6",
            "--set", "eval_every=0", "--set", "save_every=6", "--set", "log_every=1",
            "--set", "warmup_steps=2", "--set", "adam_eps=1e-6", "--no-progress"]  # fmt: skip
    # adam_eps 1e-6, not 1e-8: a table element whose gradient is a near-cancelling sum (about
    # 1e-8 from terms of 1e-4) takes an Adam step of lr * g / (|g| + eps), which at |g| ~ eps
    # turns the summation order's rounding (different across processes) into 0.1% of lr.
    # Measured on this data: 11 of 204,800 table elements 1e-4 to 9e-4 apart at 1e-8.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "jtok", "train", *args, "--out",
                             str(tmp_path / "single")], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    dist = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "jtok", "train", *args, "--out", str(tmp_path / "dist")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert dist.returncode == 0, dist.stderr[-3000:]
    a, b = losses(tmp_path / "single"), losses(tmp_path / "dist")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=2e-4)
    w1 = load_run(tmp_path / "single")[1].state_dict()
    w2 = load_run(tmp_path / "dist")[1].state_dict()
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-3, atol=1e-4, msg=key)


def test_gradient_accumulation_matches_one_big_batch(tiny_data, tmp_path):
    one = train(tiny_run_config(tiny_data, steps=4), tmp_path / "a", progress=False,
                log=lambda m: None)  # fmt: skip
    two = train(tiny_run_config(tiny_data, steps=4, grad_accum=2), tmp_path / "b",
                progress=False, log=lambda m: None)  # fmt: skip
    assert one["final_loss"] == pytest.approx(two["final_loss"], rel=1e-4)


def test_refuses_a_non_empty_run_directory_unless_told(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    argv = ["train", "--preset", "tiny", "--data", str(tiny_data), "--set", "seq_len=32",
            "--set", "steps=2", "--set", "batch_size=4", "--out", str(run), "--no-progress"]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "mine" and not (run / "config.json").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_overwrite_refuses_run_file_names_in_a_directory_that_holds_no_run(tiny_data, tmp_path,
                                                                          capsys):  # fmt: skip
    argv = ["train", "--preset", "tiny", "--data", str(tiny_data), "--set", "seq_len=32",
            "--set", "steps=2", "--set", "batch_size=4", "--no-progress", "--overwrite"]
    # A user's metrics.jsonl, or a user's file under checkpoints/, where no run was started
    # (no run.json): --overwrite would replace or delete them.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "metrics.jsonl").write_text('{"mine": 1}\n')
    nested = tmp_path / "nested"
    (nested / "checkpoints" / "step_00000001").mkdir(parents=True)
    (nested / "checkpoints" / "step_00000001" / "readme.txt").write_text("mine")
    for out, needle in ((lone, "'metrics.jsonl' but no run.json"),
                        (nested, "'checkpoints' but no run.json")):  # fmt: skip
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert (lone / "metrics.jsonl").read_text() == '{"mine": 1}\n'
    assert (nested / "checkpoints" / "step_00000001" / "readme.txt").read_text() == "mine"
    assert not (lone / "run.json").exists() and not (nested / "run.json").exists()
    # A real run whose checkpoints/ holds a user's file: refused too, the file kept.
    run = tmp_path / "run"
    assert main([*argv, "--out", str(run)]) == 0
    (run / "checkpoints" / "notes.txt").write_text("mine")
    assert main([*argv, "--out", str(run)]) == 2
    assert "checkpoints/notes.txt is not a jtok checkpoint" in capsys.readouterr().err
    assert (run / "checkpoints" / "notes.txt").read_text() == "mine"
    (run / "checkpoints" / "notes.txt").unlink()
    assert main([*argv, "--out", str(run)]) == 0  # a run's own outputs are replaced


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tiny_data, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    import jtok.training.loop as train_module

    real_loss, calls = train_module.lm_loss, {"n": 0}

    def poisoned(model, x, y, *rest):
        calls["n"] += 1
        loss, out = real_loss(model, x, y, *rest)
        return (loss * float("nan") if calls["n"] > 5 else loss), out

    monkeypatch.setattr(train_module, "lm_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*step_00000004"):
        train(tiny_run_config(tiny_data), run, progress=False, log=lambda m: None)
    _, model, state = load_run(run)
    assert state["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    model = tiny_model()
    ckpt.save_checkpoint(tmp_path, 1, model)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_tensors", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    fresh = tiny_model(seed=9)
    ckpt.load_model_weights(ckpt.latest_checkpoint(tmp_path), fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key])


def test_checkpoint_round_trip_restores_optimizer_state(tmp_path):
    model = tiny_model(tokmod__kind="jtokm")
    opts = Optimizers(model, TrainConfig(seq_len=32))
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids)
    (out.logits.square().mean() + out.aux_loss).backward()
    opts.step()
    ckpt.save_checkpoint(tmp_path, 3, model, opts)
    model2 = tiny_model(tokmod__kind="jtokm", seed=5)
    opts2 = Optimizers(model2, TrainConfig(seq_len=32))
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), model2, opts2)
    assert state["step"] == 3
    for a, b in zip(opts.state_dict(), opts2.state_dict(), strict=True):
        for pid, entries in a["state"].items():
            for key, value in entries.items():
                assert torch.equal(value, b["state"][pid][key]), key
                assert value.dtype == b["state"][pid][key].dtype, key


def test_parameter_roles_and_their_hyperparameters():
    model = tiny_model("tiny-moe", tokmod__kind="jtokm")
    roles = {name: role for name, _, role in parameter_roles(model)}
    assert len(roles) == len(list(model.parameters()))
    assert roles["token_tables.weight"] == "table"
    assert roles["embed.weight"] == roles["head.weight"] == "embedding"
    assert roles["blocks.0.ffn.router.weight"] == roles["blocks.0.tokmod.router"] == "router"
    assert roles["blocks.0.tokmod.scale"] == roles["norm.weight"] == "norm"
    assert roles["blocks.0.ffn.w13"] == roles["blocks.0.attn.wqkv.weight"] == "matrix"
    cfg = TrainConfig(seq_len=32, lr=1e-3, table_lr_mult=4.0, weight_decay=0.1)
    groups = {g["role"]: g for g in Optimizers(model, cfg).param_groups}
    assert groups["table"]["lr"] == pytest.approx(4e-3) and groups["table"]["weight_decay"] == 0
    assert groups["matrix"]["weight_decay"] == 0.1 and groups["norm"]["weight_decay"] == 0


def test_roles_survive_wrappers_and_an_undeclared_parameter_fails():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_model("tiny-moe", tokmod__kind="jtokm")
    expected = {id(p): role for _, p, role in parameter_roles(model)}

    def roles_of(wrapped):
        return {id(p): role for _, p, role in parameter_roles(wrapped)}

    class Outer(torch.nn.Module):  # renames every parameter to inner.*
        def __init__(self):
            super().__init__()
            self.inner = model

    assert roles_of(Outer()) == expected
    assert roles_of(torch.compile(model)) == expected  # _orig_mod.*
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)  # module.*
        assert {n for n, _, _ in parameter_roles(ddp)} >= {"module.token_tables.weight"}
        assert roles_of(ddp) == expected
        # FSDP2 swaps every parameter for a DTensor and every module class for a subclass.
        from torch.distributed.fsdp import fully_shard

        sharded = tiny_model("tiny-moe", tokmod__kind="jtokm")
        by_name = {n: r for n, _, r in parameter_roles(sharded)}
        for block in sharded.blocks:
            fully_shard(block)
        fully_shard(sharded)
        assert {n: r for n, _, r in parameter_roles(sharded)} == by_name
    finally:
        dist.destroy_process_group()

    model.extra = torch.nn.Parameter(torch.zeros(3))  # a parameter no module type declares
    with pytest.raises(RoleError, match="extra"):
        parameter_roles(model)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_warm_up_then_end_where_they_should(schedule):
    cfg = TrainConfig(seq_len=32, steps=100, warmup_steps=10, schedule=schedule,
                      min_lr_ratio=0.1, decay_fraction=0.2)  # fmt: skip
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10], strict=False))
    end = {"cosine": 0.1, "wsd": 0.1, "constant": 1.0}[schedule]
    assert factors[-1] == pytest.approx(end)
    if schedule == "wsd":
        assert factors[10:80] == [1.0] * 70 and factors[80] < 1.0
    if schedule == "cosine":
        assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def test_eval_and_sample_commands(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_run_config(tiny_data, steps=8), run, progress=False, log=lambda m: None)
    assert main(["eval", "--run", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"loss", "ppl", "bpb", "tokens"}
    assert report["ppl"] == pytest.approx(math.exp(report["loss"]))
    text = tmp_path / "t.txt"
    text.write_text("the king went to the sea and said what the fool had said " * 20)
    assert main(["eval", "--run", str(run), "--text", str(text), "--json"]) == 0
    on_text = json.loads(capsys.readouterr().out)
    assert on_text["tokens"] > 50 and on_text["bpb"] > 0

    argv = ["sample", "--run", str(run), "--prompt", "the king", "--max-tokens", "12",
            "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("the king")


def test_bad_inputs_get_one_line_errors(tiny_data, tmp_path, capsys):
    cases = [
        (["train", "--preset", "tiny", "--data", str(tiny_data), "--set", "vocab_size=100",
          "--set", "seq_len=32", "--out", str(tmp_path / "r1")], "vocab"),
        (["train", "--preset", "tiny", "--data", str(tmp_path / "nowhere"), "--out",
          str(tmp_path / "r2")], "manifest"),
        (["train", "--out", str(tmp_path / "r3"), "--resume"], "no run"),
        (["eval", "--run", str(tmp_path / "r3")], "no such run directory"),
        (["sample", "--run", str(tmp_path / "r3"), "--prompt", "x"], "no such run directory"),
        (["train", "--preset", "tiny", "--data", str(tiny_data), "--set", "seq_len=4096",
          "--out", str(tmp_path / "r4")], "seq_len"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main([*argv, "--no-progress"] if argv[0] == "train" else argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_eval_refuses_data_tokenized_differently_from_the_checkpoint(tiny_data, tmp_path,
                                                                      capsys):  # fmt: skip
    from jtok.data import prepare

    run = tmp_path / "run"
    train(tiny_run_config(tiny_data, steps=2, save_every=2), run, progress=False,
          log=lambda m: None)  # fmt: skip
    other = tmp_path / "other"
    (tmp_path / "other.txt").write_text("completely different words here\n\n" * 200)
    prepare([str(tmp_path / "other.txt")], other, vocab_size=290, progress=False,
            log=lambda m: None)  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    config["train"]["data"] = str(other)
    (run / "config.json").write_text(json.dumps(config))
    assert main(["eval", "--run", str(run)]) == 2
    assert "tokenizer" in capsys.readouterr().err
    # Resuming on that data is refused too, before the run directory is touched.
    tokenizer_before = (run / "tokenizer.json").read_bytes()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert (run / "tokenizer.json").read_bytes() == tokenizer_before


def test_train_takes_a_run_config_file_with_overrides(tiny_data, tmp_path):
    import yaml

    cfg = tiny_run_config(tiny_data, steps=2, save_every=2, eval_every=0)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    run = tmp_path / "run"
    assert main(["train", "--config", str(path), "--set", "lr=2e-3", "--set",
                 "tokmod.kind=jtok", "--out", str(run), "--no-progress"]) == 0  # fmt: skip
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["lr"] == 2e-3 and saved["model"]["tokmod"]["kind"] == "jtok"
    assert saved["train"]["data"] == str(tiny_data)


def test_bits_per_byte_scale_to_the_share_of_text_evaluated():
    from jtok.training.loop import loss_report

    # 101 ids -> 100 targets; all of them evaluated: bytes are the whole text's.
    full = loss_report(loss_sum=200.0, tokens=100, text_bytes=400, text_tokens=101)
    assert full["loss"] == 2.0 and full["bpb"] == pytest.approx(200.0 / math.log(2) / 400)
    # A prefix of 50 targets covers half the text's bytes.
    half = loss_report(loss_sum=100.0, tokens=50, text_bytes=400, text_tokens=101)
    assert half["bpb"] == pytest.approx(full["bpb"])
    assert half["ppl"] == pytest.approx(math.exp(2.0))
