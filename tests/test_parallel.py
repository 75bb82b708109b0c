"""Data parallelism on torch's engine (DDP, FSDP2) under torchrun, gloo on CPU: a W-process
run equals a single-process run of the same global batch, split into the same micro-batches
(W processes x g micro-batches = one process x W*g micro-batches, so even the balance losses,
which are per micro-batch, match). Dense and MoE backbones, JTok and JTok-M, in one launch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config

from jtok.presets import preset
from jtok.run.rundir import load_run, read_metrics
from jtok.training.loop import train

CASES = [  # (name, preset, tokmod kind, parallel, grad_accum per process, table placement)
    ("ddp-dense-jtokm", "tiny", "jtokm", "ddp", 1, "device"),
    ("ddp-moe-jtok", "tiny-moe", "jtok", "ddp", 2, "device"),
    ("fsdp-dense-jtokm", "tiny", "jtokm", "fsdp", 1, "device"),
    ("fsdp-moe-jtokm", "tiny-moe", "jtokm", "fsdp", 2, "device"),
    ("sharded-dense-jtokm", "tiny", "jtokm", "ddp", 1, "sharded"),
    ("sharded-moe-jtok-fsdp", "tiny-moe", "jtok", "fsdp", 2, "sharded"),
]
WORLD = 2


def case_config(tiny_data, preset_name, kind, parallel, grad_accum, placement="device"):
    cfg = tiny_run_config(tiny_data, steps=4, save_every=2, eval_every=4, batch_size=8,
                          grad_accum=grad_accum, parallel=parallel,
                          table_placement=placement)  # fmt: skip
    model = preset(preset_name).with_overrides({"vocab_size": "320", "tokmod.kind": kind})
    return type(cfg)(model=model, train=cfg.train)


def losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


@pytest.fixture(scope="module")
def parallel_runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    jobs = []
    for name, preset_name, kind, parallel, accum, placement in CASES:
        cfg = case_config(tiny_data, preset_name, kind, parallel, accum, placement)
        jobs.append({"config": cfg.to_dict(), "out": str(root / name)})
    # Exact resume at an equal world size: the FSDP2 + sharded run again from its step-2
    # (distributed) checkpoint, after the uninterrupted one.
    source = next(j for j in jobs if j["out"].endswith("sharded-moe-jtok-fsdp"))
    jobs.append({**source, "out": str(root / "resumed-sharded-moe-jtok-fsdp"), "resume": True,
                 "copy_from": source["out"], "drop": "step_00000004"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("dist_worker.py")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={WORLD}", str(worker), json.dumps(jobs)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return root


@pytest.mark.parametrize("name,preset_name,kind,parallel,accum,placement", CASES)
def test_parallel_run_equals_one_process_with_the_same_micro_batches(
        parallel_runs, tiny_data, tmp_path, name, preset_name, kind, parallel, accum,
        placement):  # fmt: skip
    # The reference: one process, the device store, twice the micro-batches.
    cfg = case_config(tiny_data, preset_name, kind, parallel, accum * WORLD)
    single = tmp_path / "single"
    train(cfg, single, progress=False, log=lambda m: None)
    a, b = losses(single), losses(parallel_runs / name)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-5)
    w1 = load_run(single)[1].state_dict()
    w2 = load_run(parallel_runs / name)[1].state_dict()  # FSDP2: gathered full tensors
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_distributed_resume_at_the_same_world_size_is_exact(parallel_runs):
    full = dict(losses(parallel_runs / "sharded-moe-jtok-fsdp"))
    resumed = dict(losses(parallel_runs / "resumed-sharded-moe-jtok-fsdp"))
    assert resumed[3] == full[3] and resumed[4] == full[4]  # bit for bit on CPU


def test_each_process_holds_its_share_of_the_sharded_rows_and_their_state(parallel_runs):
    shares = [json.loads((parallel_runs / "sharded-dense-jtokm" / f"share_{rank}.json")
                         .read_text()) for rank in range(WORLD)]  # fmt: skip
    rows = shares[0]["n_rows"]
    assert sum(s["rows"] for s in shares) == rows
    assert all(abs(s["rows"] - rows / WORLD) <= 1 for s in shares)
    for share in shares:  # RowAdam's state is the block's, not the table's
        assert share["exp_avg"] == [share["rows"], share["d"]]
        assert share["row_step"] == [share["rows"]]


@pytest.mark.parametrize("name", ["ddp-moe-jtok", "fsdp-dense-jtokm", "sharded-dense-jtokm"])
def test_a_two_process_checkpoint_resumes_on_one_process(parallel_runs, tmp_path, name):
    import shutil

    from jtok.run import checkpoint as ckpt

    run = tmp_path / name
    shutil.copytree(parallel_runs / name, run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # back to step 2 (of 4)
    assert ckpt.latest_checkpoint(run).name == "step_00000002"
    # The checkpoint (gathered from FSDP2 shards) is the single-process format; a change of
    # world size needs no conversion. One process with twice the micro-batches continues it.
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["grad_accum"] *= WORLD
    from jtok.config import RunConfig

    train(RunConfig.from_dict(cfg), run, resume=True, allow_changes={"train.grad_accum"},
          progress=False, log=lambda m: None)  # fmt: skip
    resumed = dict(losses(run))
    original = dict(losses(parallel_runs / name))
    for step in (3, 4):
        assert resumed[step] == pytest.approx(original[step], rel=1e-5)


def test_processes_with_different_configs_are_refused(tiny_data, tmp_path):
    cfg = case_config(tiny_data, "tiny", "jtok", "ddp", 1)
    script = tmp_path / "mismatch.py"
    script.write_text(
        "import json, os, sys\n"
        "from jtok.config import RunConfig\n"
        "from jtok.training.loop import train\n"
        "cfg = json.loads(sys.argv[1])\n"
        "cfg['train']['lr'] *= 1 + int(os.environ['RANK'])  # each process its own lr\n"
        "train(RunConfig.from_dict(cfg), sys.argv[2], progress=False, log=print)\n")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={WORLD}", str(script), json.dumps(cfg.to_dict()),
         str(tmp_path / "run")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "resolved different run configs" in done.stderr
    assert not (tmp_path / "run" / "config.json").exists()  # refused before any change


def test_a_killed_launch_leaves_its_last_checkpoint_loadable(tiny_data, tmp_path):
    import signal
    import time

    from jtok.run import checkpoint as ckpt

    cfg = tiny_run_config(tiny_data, steps=400, save_every=3, eval_every=0,
                          table_placement="sharded")  # fmt: skip
    run = tmp_path / "run"
    worker = Path(__file__).with_name("dist_worker.py")
    launch = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={WORLD}", str(worker),
         json.dumps([{"config": cfg.to_dict(), "out": str(run)}])],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while len(ckpt.list_checkpoints(run)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert ckpt.list_checkpoints(run), "no checkpoint appeared"
    finally:
        # Every process of the launch at once: the agent's group, and the workers, which
        # torchrun starts in sessions of their own (found by the run path they were given).
        os.killpg(launch.pid, signal.SIGKILL)
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and str(run).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass
        launch.wait()
        time.sleep(0.5)
    _, model, state = load_run(run)
    assert state["step"] % 3 == 0 and all(torch.isfinite(p).all() for p in model.parameters())


def test_consolidate_writes_the_single_process_files_of_a_distributed_checkpoint(
        parallel_runs, tmp_path, capsys):  # fmt: skip
    import shutil

    from jtok.cli import main
    from jtok.run import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(parallel_runs / "sharded-moe-jtok-fsdp", run)
    latest = ckpt.latest_checkpoint(run)
    assert not ckpt.has_single_file(latest)  # a launch writes DCP
    _, from_dcp, _ = load_run(run)
    assert main(["checkpoint", "consolidate", "--run", str(run)]) == 0
    assert ckpt.has_single_file(latest)
    shutil.rmtree(latest / "dcp")  # the single files alone now carry the checkpoint
    _, from_files, _ = load_run(run)
    a, b = from_dcp.state_dict(), from_files.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["checkpoint", "consolidate", "--run", str(run)]) == 0  # step 2: done before
    assert "already consolidated" in capsys.readouterr().out
    assert main(["checkpoint", "consolidate", "--run", str(tmp_path / "nowhere")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
