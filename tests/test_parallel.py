"""Data parallelism on torch's engine (DDP, FSDP2) under torchrun, gloo on CPU: a W-process
run equals a single-process run of the same global batch, split into the same micro-batches
(W processes x g micro-batches = one process x W*g micro-batches, so even the balance losses,
which are per micro-batch, match). Dense and MoE backbones, JTok and JTok-M, the sharded
store's two exchange paths, at 2 and at 4 processes: one launch per world size."""

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

# (name, preset, tokmod kind, parallel, grad_accum per process, table placement,
#  the sharded store's exchange path)
CASES = [
    ("ddp-dense-jtokm", "tiny", "jtokm", "ddp", 1, "device", "auto"),
    ("ddp-moe-jtok", "tiny-moe", "jtok", "ddp", 2, "device", "auto"),
    ("fsdp-dense-jtokm", "tiny", "jtokm", "fsdp", 1, "device", "auto"),
    ("fsdp-moe-jtokm", "tiny-moe", "jtokm", "fsdp", 2, "device", "auto"),
    ("sharded-dense-jtokm", "tiny", "jtokm", "ddp", 1, "sharded", "raw"),
    ("sharded-dense-jtokm-premixed", "tiny", "jtokm", "ddp", 1, "sharded", "premixed"),
    ("sharded-moe-jtok-fsdp", "tiny-moe", "jtok", "fsdp", 2, "sharded", "auto"),
]
WORLD = 2
# Four processes (one launch of small runs): the sharded JTok-M store on both paths, and a
# 2-process run's checkpoint resumed on four; the 4-process checkpoint resumes on one.
CASES_4 = [
    ("sharded4-dense-jtokm-premixed", "tiny", "jtokm", "ddp", 1, "sharded", "premixed"),
    ("sharded4-moe-jtokm-raw-fsdp", "tiny-moe", "jtokm", "fsdp", 1, "sharded", "raw"),
]
WORLD_4 = 4
RESHARDED = "sharded-moe-jtok-fsdp"  # its 2-process checkpoint resumes on 4 processes
RESUMED_ON_4 = "resumed-on-4-" + RESHARDED


def case_config(tiny_data, preset_name, kind, parallel, grad_accum, placement="device"):
    cfg = tiny_run_config(tiny_data, steps=4, save_every=2, eval_every=4, batch_size=8,
                          grad_accum=grad_accum, parallel=parallel,
                          table_placement=placement)  # fmt: skip
    model = preset(preset_name).with_overrides({"vocab_size": "320", "tokmod.kind": kind})
    return type(cfg)(model=model, train=cfg.train)


def losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


def assert_weights_close(reference: dict, other: dict, train_cfg) -> None:
    """Every tensor within 1e-5 relative (1e-6 absolute). The tables' RowAdam step is
    lr * table_lr_mult (0.09 here): a gradient component near Adam's eps (1e-8) turns fp32
    rounding (gradients summed in another order across processes) into a visible
    difference of that step, so a handful of table entries may differ by up to 1e-3 of a
    step (seen: one of 204,800 entries, by 2e-5, at four processes)."""
    assert reference.keys() == other.keys()
    for key in reference:
        a, b = reference[key], other[key]
        if key != "token_tables.weight":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
            continue
        off = ~torch.isclose(a, b, rtol=1e-5, atol=1e-6)
        step = train_cfg.lr * train_cfg.table_lr_mult
        assert int(off.sum()) <= 10, (key, int(off.sum()))
        assert not off.any() or float((a - b).abs()[off].max()) <= 1e-3 * step, key


def launch(world: int, jobs: list[dict]) -> None:
    """One torchrun launch of `world` processes (tests/dist_worker.py) running `jobs`."""
    worker = Path(__file__).with_name("dist_worker.py")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={world}", str(worker), json.dumps(jobs)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]


def case_jobs(tiny_data, root: Path, cases) -> list[dict]:
    return [{"config": case_config(tiny_data, *case[1:6]).to_dict(), "out": str(root / case[0]),
             "exchange_path": case[6]} for case in cases]  # fmt: skip


@pytest.fixture(scope="module")
def parallel_runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    jobs = case_jobs(tiny_data, root, CASES)
    # Exact resume at an equal world size: the FSDP2 + sharded run again from its step-2
    # (distributed) checkpoint, after the uninterrupted one.
    source = next(j for j in jobs if j["out"].endswith(RESHARDED))
    jobs.append({**source, "out": str(root / f"resumed-{RESHARDED}"), "resume": True,
                 "copy_from": source["out"], "drop": "step_00000004"})
    jobs.append({"paths": str(root / "paths")})
    launch(WORLD, jobs)
    return root


@pytest.fixture(scope="module")
def four_process_runs(tiny_data, tmp_path_factory, parallel_runs):
    root = tmp_path_factory.mktemp("parallel4")
    jobs = [*case_jobs(tiny_data, root, CASES_4), {"paths": str(root / "paths")}]
    # Resharding up: the 2-process run's step-2 checkpoint (DCP: blocks of 1/2 of the rows
    # and of their RowAdam state) continued by 4 processes with half the micro-batches each.
    case = next(c for c in CASES if c[0] == RESHARDED)
    name, preset_name, kind, parallel, accum, placement, path = case
    cfg = case_config(tiny_data, preset_name, kind, parallel, accum * WORLD // WORLD_4,
                      placement)  # fmt: skip
    jobs.append({"config": cfg.to_dict(), "out": str(root / RESUMED_ON_4), "resume": True,
                 "copy_from": str(parallel_runs / name), "drop": "step_00000004",
                 "allow_changes": ["train.grad_accum"], "exchange_path": path})  # fmt: skip
    launch(WORLD_4, jobs)
    return root


@pytest.mark.parametrize("world,name,preset_name,kind,parallel,accum,placement,path",
                         [(WORLD, *c) for c in CASES] + [(WORLD_4, *c) for c in CASES_4])
def test_parallel_run_equals_one_process_with_the_same_micro_batches(
        parallel_runs, four_process_runs, tiny_data, tmp_path, world, name, preset_name, kind,
        parallel, accum, placement, path):  # fmt: skip
    # The reference: one process, the device store, W times the micro-batches.
    cfg = case_config(tiny_data, preset_name, kind, parallel, accum * world)
    single = tmp_path / "single"
    train(cfg, single, progress=False, log=lambda m: None)
    runs = parallel_runs if world == WORLD else four_process_runs
    a, b = losses(single), losses(runs / name)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-5)
    w1 = load_run(single)[1].state_dict()
    w2 = load_run(runs / name)[1].state_dict()  # FSDP2: gathered full tensors
    assert_weights_close(w1, w2, cfg.train)


def test_a_distributed_resume_at_the_same_world_size_is_exact(parallel_runs):
    full = dict(losses(parallel_runs / RESHARDED))
    resumed = dict(losses(parallel_runs / f"resumed-{RESHARDED}"))
    assert resumed[3] == full[3] and resumed[4] == full[4]  # bit for bit on CPU


def test_a_two_process_checkpoint_resumes_on_four_processes(parallel_runs, four_process_runs):
    resumed = dict(losses(four_process_runs / RESUMED_ON_4))
    original = dict(losses(parallel_runs / RESHARDED))
    assert sorted(resumed) == [1, 2, 3, 4]  # steps 1-2 from the copied log, 3-4 resumed
    for step in (3, 4):
        assert resumed[step] == pytest.approx(original[step], rel=1e-5)
    cfg, final, _ = load_run(four_process_runs / RESUMED_ON_4)
    assert_weights_close(load_run(parallel_runs / RESHARDED)[1].state_dict(),
                         final.state_dict(), cfg.train)  # fmt: skip


def test_a_four_process_checkpoint_resumes_on_one_process(four_process_runs, tiny_data,
                                                          tmp_path):  # fmt: skip
    import shutil

    name, preset_name, kind, parallel, accum, placement, _ = CASES_4[0]
    resumed = tmp_path / "resumed-on-1"
    shutil.copytree(four_process_runs / name, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    cfg = case_config(tiny_data, preset_name, kind, parallel, accum * WORLD_4, placement)
    train(cfg, resumed, resume=True, allow_changes={"train.grad_accum"}, progress=False,
          log=lambda m: None)  # fmt: skip
    got, original = dict(losses(resumed)), dict(losses(four_process_runs / name))
    for step in (3, 4):
        assert got[step] == pytest.approx(original[step], rel=1e-5)


@pytest.mark.parametrize("world,name", [(WORLD, "sharded-dense-jtokm"),
                                        (WORLD_4, CASES_4[1][0])])  # fmt: skip
def test_each_process_holds_its_share_of_the_sharded_rows_and_their_state(
        parallel_runs, four_process_runs, world, name):  # fmt: skip
    runs = parallel_runs if world == WORLD else four_process_runs
    shares = [json.loads((runs / name / f"share_{rank}.json").read_text())
              for rank in range(world)]  # fmt: skip
    rows = shares[0]["n_rows"]
    assert sum(s["rows"] for s in shares) == rows
    assert all(abs(s["rows"] - rows / world) <= 1 for s in shares)
    for share in shares:  # RowAdam's state is the block's, not the table's
        assert share["exp_avg"] == [share["rows"], share["d"]]
        assert share["row_step"] == [share["rows"]]


@pytest.mark.parametrize("world", [WORLD, WORLD_4])
def test_the_premixed_and_raw_paths_agree_and_move_the_bytes_they_plan(
        parallel_runs, four_process_runs, world):  # fmt: skip
    # tests/dist_paths.py: the same three training steps through either path.
    root = (parallel_runs if world == WORLD else four_process_runs) / "paths"
    for rank in range(world):
        report = json.loads((root / f"paths_{rank}.json").read_text())
        assert report["finite"]
        # fp32 rounding (the row gradients are summed in another order), over three steps.
        for name in ("logits", "loss", "row_grad", "router_grad", "table"):
            assert report["worst"][name] <= 1e-5, (name, report["worst"][name])
        assert report["weights_abs"] <= 1e-6
        # A block boundary cut a (layer, token) group, and its requests went to both owners.
        assert report["cut_tokens"] and report["split_requests"] > 0
        for record in report["bytes"]:  # the plan's count is what the exchanges sent
            assert record["sent"] == record[f"{record['path']}_planned"] > 0
        auto = report["auto"]
        assert auto["distinct"]["path"] == "premixed" and auto["repeated"]["path"] == "raw"
        for choice in auto.values():  # the path taken is the one with fewer bytes
            other = "raw" if choice["path"] == "premixed" else "premixed"
            assert choice[f"{choice['path']}_bytes"] < choice[f"{other}_bytes"]


def test_one_process_premixed_rows_equal_raw_rows():
    # W = 1: both paths run their whole code (the all-to-alls are copies), cheaply.
    from conftest import random_ids

    from jtok.nn.model import build_model
    from jtok.tables.sharded import ShardedTables, choose_path

    cfg = preset("tiny").with_overrides({"vocab_size": "321", "tokmod.kind": "jtokm"})
    seen = {}
    for path in ("raw", "premixed"):
        model = build_model(cfg, seed=0, table_placement="sharded")
        model.token_tables.exchange_path = path
        out = model(random_ids(cfg, batch=2, seq=16))
        (out.logits.square().mean() + out.aux_loss).backward()
        assert model.token_tables.last_exchange["path"] == path
        assert isinstance(model.token_tables.weight.grad, torch.Tensor)
        seen[path] = (out.logits.detach(), model.token_tables.weight.grad.to_dense(),
                      [b.tokmod.router.grad for b in model.blocks])  # fmt: skip
    assert torch.equal(seen["raw"][0], seen["premixed"][0])  # the same embedding_bag sums
    torch.testing.assert_close(seen["raw"][1], seen["premixed"][1], rtol=1e-5, atol=1e-9)
    for a, b in zip(seen["raw"][2], seen["premixed"][2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    # The rule: fewer bytes wins, a tie (one process: nothing crosses) stays raw, JTok is raw.
    assert choose_path("auto", 10, 9, True) == "premixed"
    assert choose_path("auto", 9, 9, True) == choose_path("auto", 9, 10, True) == "raw"
    assert choose_path("premixed", 1, 10, False) == "raw"
    assert ShardedTables.exchange_path == "auto"


def test_premixed_requests_reach_every_owner_of_a_group_a_block_boundary_cuts():
    # Blocks of 3 rows, groups of n = 5: every group spans two or three owners. Each
    # (layer, position) must ask exactly the owners whose blocks hold part of its group,
    # with the group's first row as an address in each owner's block.
    from types import SimpleNamespace

    from jtok.tables.keys import CurrentTokenKey
    from jtok.tables.sharded_premix import premix_entries

    L, V, n, block = 2, 7, 5, 3
    world = -(-L * V * n // block)
    store = SimpleNamespace(layers=[0, 2], tables_per_layer=n, vocab_size=V, world_size=world,
                            block=block, n_rows=L * V * n, weight=torch.empty(0, 4))  # fmt: skip
    ids = torch.tensor([[3, 0, 6, 3, 5]])
    entries = premix_entries(store, CurrentTokenKey(V)(ids))
    assert entries.n_positions == ids.numel()
    for layer in range(L):
        pos, base = entries.pos[layer], entries.base[layer].long()
        owners = torch.repeat_interleave(torch.arange(world), entries.counts_LW[layer])
        assert bool((owners[1:] >= owners[:-1]).all())  # grouped by owner, for all_to_all
        asked = {}
        for p, o, b in zip(pos.tolist(), owners.tolist(), base.tolist(), strict=True):
            first = (layer * V + int(ids.view(-1)[p])) * n
            assert b + o * block == first  # the group's first row, in owner o's block
            asked.setdefault(p, []).append(o)
        for p in range(ids.numel()):
            first = (layer * V + int(ids.view(-1)[p])) * n
            assert asked[p] == list(range(first // block, (first + n - 1) // block + 1))


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


def test_ddp_wrapping_prints_no_deprecation_warning(tiny_data):
    """broadcast_buffers=False is kept on purpose (forward_sync_buffers=False would still
    sync buffers at init); torch's FutureWarning about it was printed once per rank."""
    import warnings

    import torch.distributed as dist

    from jtok.parallel.distributed import DistEnv
    from jtok.parallel.wrap import parallelize

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        from jtok.nn.model import build_model

        model = build_model(tiny_run_config(tiny_data).model, seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # DistEnv says 2 so that it wraps at all; DDP itself uses the 1-process group.
            wrapped = parallelize(model, DistEnv(world_size=2), "ddp", "fp32")
        assert type(wrapped).__name__ == "DistributedDataParallel"
        assert not [w for w in caught if "broadcast_buffers" in str(w.message)]
    finally:
        dist.destroy_process_group()
