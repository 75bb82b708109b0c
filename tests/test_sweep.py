import contextlib
import fcntl
import json

import pytest

from jtok.cli import main
from jtok.flops import count_flops
from jtok.studies.sweep import SweepError, claim_run, finished_runs, plan, run_sweep


def spec_dict(data_dir, budget=None):
    return {
        "name": "test",
        "base": {
            "preset": "tiny",
            "model": {"vocab_size": 320, "tokmod": {"n_e": 3, "top_k": 1}},
            "train": {"data": str(data_dir), "seq_len": 32, "batch_size": 4, "lr": "3e-3",
                      "eval_tokens": 512, "log_every": 1},
        },
        "axes": {
            "variant": {"baseline": {}, "jtokm": {"model.tokmod.kind": "jtokm"}},
            "backbone": {"d32": {"model.d_model": 32, "model.n_heads": 2},
                         "d64": {}},
        },
        "budget": budget or {"tokens": [256, 512]},
        "warmup_fraction": 0.25,
        "evals_per_run": 2,
    }  # fmt: skip


def write_spec(tmp_path, spec):
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def test_eval_and_save_intervals_follow_evals_per_run_unless_the_spec_sets_them(tiny_data):
    spec = spec_dict(tiny_data, {"tokens": [2048]})  # 16 steps of 4 x 32 tokens
    for run in plan(spec):
        assert (run.config.train.eval_every, run.config.train.save_every) == (8, 8)
    spec["base"]["train"]["save_every"] = 3
    spec["axes"]["backbone"]["d64"]["train.eval_every"] = 5
    for run in plan(spec):
        expected_eval = 5 if run.labels["backbone"] == "d64" else 8
        assert (run.config.train.eval_every, run.config.train.save_every) == (expected_eval, 3)


def test_plan_is_the_cartesian_product_with_steps_from_the_budget(tiny_data):
    runs = plan(spec_dict(tiny_data, {"flops": ["1e9", 4e9]}))
    assert len(runs) == 2 * 2 * 2
    assert len({r.name for r in runs}) == 8
    for run in runs:
        per_token = count_flops(run.config.model, 32).train
        target_tokens = run.budget / per_token
        assert abs(run.tokens - target_tokens) <= 32 * 4 / 2  # rounded to whole steps
        assert run.config.train.warmup_steps == round(0.25 * run.config.train.steps)
        assert run.config.model.tokmod.kind == ("jtokm" if "jtokm" in run.name else "none")
    small = [r for r in runs if r.labels["backbone"] == "d32"]
    assert all(r.config.model.d_model == 32 for r in small)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.update(budget={"time": [1]}), "budget"),
        (lambda s: s.update(budget={"tokens": []}), "budget.tokens"),
        (lambda s: s.update(colour=1), "unknown key"),
        (lambda s: s["axes"]["variant"].update(bad={"model.tokmod.top_k": 9}), "top_k"),
        (lambda s: s["axes"].update(empty={}), "axis 'empty'"),
        (lambda s: s.update(exclude={"backbone": "d32"}), "exclude must be a list"),
        (lambda s: s.update(exclude=[{"size": "d32"}]), "unknown axis 'size'"),
        (lambda s: s.update(exclude=[{"backbone": "d24"}]), "unknown backbone value 'd24'"),
        (lambda s: s.update(exclude=[{"budget": "lots"}]), "exclude budget 'lots'"),
        (lambda s: s.update(exclude=[{"budget": 300}]), "exclude budget 300 is not one of"),
    ],
)
def test_invalid_specs_are_rejected_with_the_part_named(tiny_data, mutate, message):
    spec = spec_dict(tiny_data)
    mutate(spec)
    with pytest.raises(SweepError, match=message):
        plan(spec)


def test_training_trace_thins_the_log_and_keeps_the_last_point():
    from jtok.studies.sweep import TRACE_POINTS, training_trace

    metrics = [{"step": i, "loss": 10.0 - i / 100, "grad_norm": 1.0, "lr": 1e-3,
                "tokmod_balance": 1.1, "tokens_per_s": 5.0} for i in range(1, 301)]  # fmt: skip
    metrics.insert(50, {"step": 50, "val_loss": 9.0, "val_ppl": 8000.0})
    trace = training_trace(metrics)
    assert len(trace) == TRACE_POINTS and trace[-1]["step"] == 300 and trace[0]["step"] == 1
    steps = [t["step"] for t in trace]
    assert steps == sorted(set(steps))
    assert set(trace[0]) == {"step", "loss", "grad_norm", "tokmod_balance"}
    assert training_trace(metrics[:10]) == [
        {k: r[k] for k in ("step", "loss", "grad_norm", "tokmod_balance")} for r in metrics[:10]]


def test_sweep_runs_every_run_once_and_resumes(tiny_data, tmp_path):
    spec = spec_dict(tiny_data)
    spec["axes"]["backbone"] = {"d64": {}}
    path = write_spec(tmp_path, spec)
    out = tmp_path / "sweep"
    # Two shards, as two processes would run them.
    first = run_sweep(path, out, shard=(0, 2), progress=False, log=lambda m: None)
    second = run_sweep(path, out, shard=(1, 2), progress=False, log=lambda m: None)
    assert len(first) + len(second) == 4
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in lines) == sorted(r.name for r in first + second)
    for record in lines:
        for key in ("N_c", "N_n", "eta", "rho", "tokens", "flops", "final_val_loss",
                    "best_val_loss", "curve", "config", "variant", "backbone"):  # fmt: skip
            assert key in record
        assert record["best_val_loss"] <= record["final_val_loss"]
        assert (record["N_n"] > 0) == (record["variant"] == "jtokm")
        assert record["tokens"] in (256, 512)
        assert record["machine"]["threads"] >= 1 and record["machine"]["median_tokens_per_s"] > 0
        trace = record["train_trace"]  # the training log kept beyond the scratch run folder
        assert trace and all({"step", "loss", "grad_norm"} <= set(t) for t in trace)
        assert ("tokmod_balance" in trace[-1]) == (record["variant"] == "jtokm")
    # A re-run skips finished runs: nothing new is trained or appended.
    stamps = {p: p.stat().st_mtime for p in out.glob("runs/*/metrics.jsonl")}
    run_sweep(path, out, progress=False, log=lambda m: None)
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/metrics.jsonl")} == stamps
    assert len((out / "results.jsonl").read_text().splitlines()) == 4

    # An interrupted run (checkpoint present, no result line) resumes from its checkpoint.
    name = lines[0]["name"]
    kept = [x for x in (out / "results.jsonl").read_text().splitlines()
            if json.loads(x)["name"] != name]  # fmt: skip
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    run_sweep(path, out, progress=False, log=lambda m: None)
    assert set(finished_runs(out)) == {r["name"] for r in lines}


def test_sweep_cli_dry_run_and_errors(tiny_data, tmp_path, capsys):
    path = write_spec(tmp_path, spec_dict(tiny_data))
    assert main(["sweep", str(path), "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 runs" in out and "jtokm__d32__D256" in out
    assert not (tmp_path / "s").exists()
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "s")]) == 2
    assert main(["sweep", str(path), "--out", str(tmp_path / "s"), "--shard", "3/2"]) == 2


def test_dry_run_warns_of_runs_whose_one_step_overruns_the_flop_budget(tiny_data, tmp_path,
                                                                        capsys):  # fmt: skip
    spec = spec_dict(tiny_data)
    spec["budget"] = {"flops": [1e12]}
    path = write_spec(tmp_path, spec)
    assert main(["sweep", str(path), "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().out
    spec["budget"] = {"flops": [1e5]}  # far below one step: each run still trains one
    path = write_spec(tmp_path, spec)
    assert main(["sweep", str(path), "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "over 1.5x their FLOP budget" in out


def test_exclude_drops_the_matching_grid_points_only(tiny_data):
    spec = spec_dict(tiny_data)
    full = {r.name for r in plan(spec)}
    # d32 only at the smaller budget; and no JTok-M at d64 at all.
    spec["exclude"] = [{"backbone": "d32", "budget": 512},
                       {"variant": ["jtokm"], "backbone": "d64"}]  # fmt: skip
    kept = {r.name for r in plan(spec)}
    assert full - kept == {"baseline__d32__D512", "jtokm__d32__D512",
                           "jtokm__d64__D256", "jtokm__d64__D512"}  # fmt: skip


def test_grid_points_with_identical_configs_run_once(tiny_data):
    spec = spec_dict(tiny_data)
    spec["axes"] = {
        "variant": {"baseline": {}, "jtokm": {"model.tokmod.kind": "jtokm"}},
        "tables": {"n2": {"model.tokmod.n_e": 2}, "n3": {"model.tokmod.n_e": 3}},
    }
    runs = plan(spec)
    # baseline ignores the table axis: 1 baseline + 2 JTok-M per budget
    assert len(runs) == 3 * 2
    assert sorted({r.labels["variant"] for r in runs}) == ["baseline", "jtokm"]
    assert {r.config.model.tokmod.n_e for r in runs if r.labels["variant"] == "jtokm"} == {2, 3}


def test_a_changed_spec_does_not_mix_with_runs_already_done(tiny_data, tmp_path):
    spec = spec_dict(tiny_data, budget={"tokens": [256]})
    spec["axes"] = {"variant": {"jtokm": {"model.tokmod.kind": "jtokm"}}}
    path = write_spec(tmp_path, spec)
    out = tmp_path / "sweep"
    run_sweep(path, out, progress=False, log=lambda m: None)
    before = (out / "results.jsonl").read_text()

    # Same run names, another table LR: the finished run is not silently reused.
    spec["base"]["train"]["table_lr_mult"] = 3.0
    write_spec(tmp_path, spec)
    with pytest.raises(SweepError, match=r"jtokm__D256 .*train.table_lr_mult: 300.0 -> 3.0"):
        run_sweep(path, out, progress=False, log=lambda m: None)
    assert (out / "results.jsonl").read_text() == before  # nothing trained or appended

    # An interrupted run (checkpoint, no result line) is not resumed under another config.
    (out / "results.jsonl").write_text("")
    with pytest.raises(SweepError, match=r"runs.jtokm__D256 .*table_lr_mult"):
        run_sweep(path, out, progress=False, log=lambda m: None)
    assert main(["sweep", str(path), "--out", str(out)]) == 2


@contextlib.contextmanager
def held_elsewhere(run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".jtok.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
        fcntl.flock(handle, fcntl.LOCK_UN)


def test_a_run_locked_by_another_process_is_passed_over(tiny_data, tmp_path, capsys):
    spec = spec_dict(tiny_data, budget={"tokens": [256]})
    spec["axes"]["backbone"] = {"d64": {}}
    path = write_spec(tmp_path, spec)
    out = tmp_path / "sweep"
    logged = []
    # Hold baseline's lock as a second sweep process would while it trains it (flock
    # belongs to an open file, so a lock taken on another open file stands in for it).
    run_dir = out / "runs" / "baseline__d64__D256"
    with held_elsewhere(run_dir):
        with claim_run(out, "baseline__d64__D256") as claimed:
            assert not claimed  # a claim fails while another holder has the run
        run_sweep(path, out, progress=False, log=logged.append)
    assert set(finished_runs(out)) == {"jtokm__d64__D256"}
    assert not (out / "runs" / "baseline__d64__D256" / "metrics.jsonl").exists()
    assert any("baseline__d64__D256: running in another process" in m for m in logged)
    # The command's summary does not count a run another process still holds as done.
    with held_elsewhere(run_dir):
        assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "1 of 2 runs done, 1 still running in another process" in capsys.readouterr().out
    # Released (as when its holder finishes or dies), the next sweep takes it.
    run_sweep(path, out, progress=False, log=lambda m: None)
    assert set(finished_runs(out)) == {"baseline__d64__D256", "jtokm__d64__D256"}


def test_only_selects_runs_by_name_pattern(tiny_data, tmp_path):
    path = write_spec(tmp_path, spec_dict(tiny_data))
    chosen = run_sweep(path, tmp_path / "s", dry_run=True, only=["*d32*"])
    assert sorted(r.name for r in chosen) == sorted(
        f"{v}__d32__D{t}" for v in ("baseline", "jtokm") for t in (256, 512))
    both = run_sweep(path, tmp_path / "s", dry_run=True,
                     only=["jtokm__d64*", "baseline__d32__D256"])
    assert sorted(r.name for r in both) == ["baseline__d32__D256", "jtokm__d64__D256",
                                            "jtokm__d64__D512"]
    with pytest.raises(SweepError, match="--only 'd24' matches no run"):
        run_sweep(path, tmp_path / "s", dry_run=True, only=["d24"])
    args = ["sweep", str(path), "--out", str(tmp_path / "s"), "--only", "x*", "--dry-run"]
    assert main(args) == 2


@pytest.mark.parametrize("change, needle", [
    (lambda s: s.update(axes=[{"variant": "baseline"}]), "axes must map"),
    (lambda s: s.update(budget=1e9), "budget must be"),
    (lambda s: s.update(budget={"tokens": "many"}), "finite positive"),
    (lambda s: s.update(budget={"tokens": [float("nan")]}), "finite positive"),
    (lambda s: s.update(budget={"tokens": [float("inf")]}), "finite positive"),
    (lambda s: s.update(warmup_fraction="lots"), "warmup_fraction"),
    (lambda s: s.update(evals_per_run=2.5), "evals_per_run"),
    (lambda s: s["axes"]["variant"].update(jtok=3), "must be a mapping"),
    (lambda s: s["base"].update(train=[1, 2]), "base.train must be a mapping"),
    (lambda s: s["base"]["train"].update(lr="fast"), "train.lr"),
    (lambda s: s["base"]["train"].update(steps=10),
     "sweep spec base.train: train.steps follows from the budget"),
    (lambda s: s["axes"]["backbone"]["d64"].update({"train.steps": 10}),
     "sweep spec axes {'variant': 'baseline', 'backbone': 'd64'}: train.steps follows"),
    (lambda s: s["base"]["train"].update(warmup_steps=3),
     "base.train: give warmup_fraction or train.warmup"),
])
def test_malformed_specs_give_one_line_and_write_nothing(tiny_data, tmp_path, capsys, change,
                                                          needle):  # fmt: skip
    spec = spec_dict(tiny_data)
    change(spec)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec, allow_nan=True))
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_out_must_be_this_studys_folder(tiny_data, tmp_path, capsys):
    """A sweep writes only into a new or empty folder or its own study's; `jtok train`
    never trains into a sweep's or a data folder."""
    path = write_spec(tmp_path, spec_dict(tiny_data))
    other_study = tmp_path / "other"
    other_study.mkdir()
    (other_study / "spec.json").write_text(json.dumps({"name": "another"}))
    a_run = tmp_path / "a_run"
    a_run.mkdir()
    (a_run / "run.json").write_text("{}")
    for out, message in [(tiny_data, "holds prepared data (manifest.json)"),
                         (a_run, "holds a run (run.json)"),
                         (other_study, "holds the study 'another', not 'test'")]:
        before = sorted(p.name for p in out.iterdir())
        assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
        assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((other_study / "spec.json").read_text()) == {"name": "another"}
    import shutil

    other_data = tmp_path / "other_data"
    shutil.copytree(tiny_data, other_data)
    for out, what in [(other_study, "a sweep study (spec.json)"), (other_data, "prepared data")]:
        code = main(["train", "--preset", "tiny", "--data", str(tiny_data), "--out", str(out),
                     "--overwrite", "--no-progress"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and what in err, err


def test_a_preset_vocabulary_follows_the_data_in_config_train_and_sweeps(tiny_data, tmp_path,
                                                                         capsys):
    """The tiny preset has V 512, the tiny data's tokenizer 320: `jtok config` shows the
    320 that `jtok train` uses, and a sweep's base.preset plans with it too."""
    assert main(["config", "--preset", "tiny", "--set", f"data={tiny_data}"]) == 0
    assert "model.vocab_size = 320" in capsys.readouterr().out.splitlines()
    assert main(["config", "--preset", "tiny", "--set", f"data={tiny_data}",
                 "--set", "vocab_size=400"]) == 0  # fmt: skip
    assert "model.vocab_size = 400" in capsys.readouterr().out.splitlines()
    spec = spec_dict(tiny_data)
    del spec["base"]["model"]["vocab_size"]
    assert {r.config.model.vocab_size for r in plan(spec)} == {320}
    code = main(["train", "--preset", "tiny", "--data", str(tiny_data), "--set",
                 f"data={tmp_path}", "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "disagree" in err and not (tmp_path / "run").exists(), err


def test_an_axis_over_data_gives_each_run_its_own_datas_vocabulary(tiny_data, tmp_path):
    """base.preset with an axis over train.data: each run's vocabulary follows its own data
    (V 320 and V 300 here), as `jtok train --preset P --data D` would; a vocab_size the
    spec sets stays."""
    from jtok.data import prepare

    small_vocab = tmp_path / "v300"
    prepare([str(tiny_data.parent / "corpus.txt")], small_vocab, vocab_size=300,
            val_fraction=0.1, progress=False, log=lambda msg: None)  # fmt: skip
    spec = spec_dict(tiny_data)
    del spec["base"]["model"]["vocab_size"]
    spec["axes"] = {"data": {"v320": {}, "v300": {"train.data": str(small_vocab)}}}
    vocab = {r.labels["data"]: r.config.model.vocab_size for r in plan(spec)}
    assert vocab == {"v320": 320, "v300": 300}
    spec["axes"]["data"]["v300"]["model.vocab_size"] = 384
    assert {r.labels["data"]: r.config.model.vocab_size for r in plan(spec)} == {
        "v320": 320, "v300": 384}
    spec["base"]["model"]["vocab_size"] = 400  # the spec's own: no run follows its data
    del spec["axes"]["data"]["v300"]["model.vocab_size"]
    assert {r.config.model.vocab_size for r in plan(spec)} == {400}
