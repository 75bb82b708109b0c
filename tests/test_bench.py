"""`jtok bench decode`: the decode benchmark's loop, its JSON contract and its CLI."""

import json
import math

import pytest
import torch
from conftest import tiny

from jtok.bench.decode import _build, check_host_placement, decode_benchmark, decode_once
from jtok.bench.train_step import variant_config, zipf_token_batches
from jtok.cli import main
from jtok.inference.generate import generate_batch
from jtok.presets import preset


def tiny_train_argv(steps: int, reps: int, extra=()) -> list[str]:
    """`jtok bench` (train mode) on the tiny preset, JTok-M with device and host tables."""
    return ["bench", "--preset", "tiny", "--batch", "2", "--seq-len", "8", "--steps",
            str(steps), "--reps", str(reps), "--warmup", "1", "--variants", "jtokm",
            "--placements", "device,host", "--device", "cpu", *extra, "--json"]  # fmt: skip


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("placement", ["device", "host"])
@pytest.mark.parametrize("variant", ["baseline", "jtok", "jtokm"])
def test_decode_loop_chooses_what_generate_batch_chooses(variant, placement):
    # The benchmark's lean loop does generate_batch's work step for step (greedy).
    config = _build(tiny(), variant, None if variant == "baseline" else placement,
                    torch.device("cpu"), compile_model=False)  # fmt: skip
    prompts = torch.randint(0, 512, (3, 5), generator=torch.Generator().manual_seed(0))
    _, _, _, ids = decode_once(config, prompts, 6, torch.device("cpu"))
    assert [len(row) for row in ids] == [7, 7, 7]  # the prefill's choice + 6 steps
    assert ids == generate_batch(config.model, prompts.tolist(), 7)


def test_decode_benchmark_json_has_the_contract_fields(capsys):
    argv = ["bench", "decode", "--preset", "tiny", "--batches", "1,2", "--new-tokens", "3",
            "--prompt-len", "4", "--reps", "2", "--warmup", "0", "--threads", "1", "--json"]
    code, out, _ = run(argv, capsys)
    assert code == 0
    result = json.loads(out)  # one JSON object
    assert result["benchmark"] == "decode" and result["batches"] == [1, 2]
    assert result["placements"] == ["device", "host"]
    assert set(result["variants"]) == {"baseline", "jtok", "jtokm"}
    for name, variant in result["variants"].items():
        for placement in ("device", "host"):
            for batch in ("1", "2"):
                row = variant[placement][batch]
                assert row["tokens_per_s"] > 0 and math.isfinite(row["tokens_per_s"])
                assert row["ratio_to_baseline"] > 0 and math.isfinite(row["ratio_to_baseline"])
                low, high = row["ratio_ci"]
                assert low <= row["ratio_to_baseline"] <= high
                assert row["ratio_ci_coverage"] == pytest.approx(0.5)  # 2 reps: their range
                assert row["prefill_ms"] > 0 and len(row["decode_ms_per_step_all"]) == 2
                if name == "baseline":
                    assert row["ratio_to_baseline"] == 1.0 and row["table_device"] is None
                else:
                    assert row["table_device"] == "cpu" and row["table_bytes"] > 0
                assert row["cuda_peak_allocated_bytes"] is None  # CPU run
    check = result["host_placement_check"]
    assert check["ok"] and check["table_device"] == "cpu"
    assert check["table_optimizer_state_devices"] == ["cpu"]  # RowAdam's m and v
    assert not check["table_registered_on_model"]
    assert result["host_memory_end"]["rss_bytes"] > 0


def test_decode_benchmark_subsets_and_text_report(capsys):
    code, out, _ = run(["bench", "decode", "--preset", "tiny", "--variants", "jtokm",
                        "--placements", "host", "--batches", "2", "--new-tokens", "2",
                        "--prompt-len", "3", "--reps", "1", "--no-host-check"], capsys)  # fmt: skip
    assert code == 0
    assert "host" in out and "jtokm" in out and "baseline" in out  # the baseline always runs
    assert "host placement:" not in out  # the check was skipped
    result = decode_benchmark(tiny(), ["jtok"], [1], prompt_len=3, new_tokens=2, reps=1,
                              warmup=0, placements=["device"], check_host=True)  # fmt: skip
    assert "device" in result["variants"]["jtok"] and "host" not in result["variants"]["jtok"]
    assert result["host_placement_check"] is None  # no host tables in this run


def test_host_placement_check_reports_where_tables_and_state_live():
    report = check_host_placement(variant_config(tiny(), "jtokm", True), torch.device("cpu"),
                                  strict=True)  # fmt: skip
    assert report["ok"] and report["table_device"] == "cpu"
    assert report["table_and_state_bytes"] >= 3 * 2 * 512 * 5 * 64 * 4  # table, m, v (fp32)


@pytest.mark.parametrize(
    "args, message",
    [
        (["decode", "--steps", "2"], "--steps applies to `jtok bench (train)`"),
        (["decode", "--batch", "2"], "--batch applies to `jtok bench (train)`"),
        (["--batches", "1"], "--batches applies to `jtok bench decode`"),
        (["train", "--new-tokens", "4"], "--new-tokens applies to `jtok bench decode`"),
        (["decode", "--batches", "1,x"], "--batches: expected positive integers"),
        (["decode", "--batches", "0"], "--batches: expected positive integers"),
        (["decode", "--placements", "gpu"], "--placements: name one or both of device, host"),
        (["decode", "--prompt-len", "100", "--new-tokens", "64"],
         "--prompt-len 100 + --new-tokens 64 = 164 exceeds max_seq_len 128"),
        (["decode", "--new-tokens", "0"], "argument --new-tokens: expected a positive integer"),
        (["sideways"], "invalid choice: 'sideways'"),
        (["decode", "--phases"], "--phases applies to `jtok bench (train)`"),
        (["--compile", "--warmup", "0"], "--compile compiles in the warm-up"),
        (["decode", "--compile", "--warmup", "0"], "--compile compiles in the warm-up"),
        (["--placements", "host", "--optimizer", "adamw", "--seq-len", "64"],
         "host tables train with sparse"),
        (["--threads", "100000"], "--threads 100000 exceeds the"),
        (["decode", "--threads", "100000"], "--threads 100000 exceeds the"),
    ],
)
def test_bench_modes_refuse_the_other_modes_options(args, message, capsys, monkeypatch):
    import jtok.bench.decode as decode
    import jtok.bench.train_step as train_step

    def refuse(*a, **k):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(decode, "decode_benchmark", refuse)
    monkeypatch.setattr(train_step, "train_step_benchmark", refuse)
    code, _, err = run(["bench", *args, "--preset", "tiny"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("mode", [[], ["decode"]])
def test_bench_refuses_cuda_where_there_is_none(mode, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fits = [] if mode else ["--seq-len", "8"]  # the training step's default is over tiny's
    code, _, err = run(["bench", *mode, "--device", "cuda", "--preset", "tiny", *fits], capsys)
    assert code == 2 and "--device: 'cuda' requested but" in err
    assert len(err.strip().splitlines()) == 1


def test_train_mode_is_the_default_and_can_be_named(capsys):
    argv = ["--preset", "tiny", "--batch", "2", "--seq-len", "8", "--steps", "1", "--reps", "1",
            "--warmup", "0", "--variants", "jtokm", "--json"]
    for prefix in ([], ["train"]):
        code, out, _ = run(["bench", *prefix, *argv], capsys)
        assert code == 0
        result = json.loads(out)
        assert result["optimizer"] == "sparse" and set(result["variants"]) == {"baseline", "jtokm"}


def test_train_mode_times_host_tables_as_the_trainer_steps_them(capsys):
    argv = tiny_train_argv(steps=2, reps=1)
    code, out, _ = run(argv, capsys)
    assert code == 0
    result = json.loads(out)
    assert result["device"] == "cpu"
    variants = result["variants"]
    assert all(v["accelerator_step_peak_bytes"] is None for v in variants.values())
    assert set(variants) == {"baseline", "jtokm", "jtokm/host"}
    assert variants["jtokm/host"]["table_placement"] == "host"
    assert variants["jtokm"]["table_placement"] == "device"
    assert variants["baseline"]["table_placement"] is None
    assert variants["jtokm/host"]["ratio_to_baseline"] > 0


def test_train_mode_compile_runs_every_configuration_through_torch_compile(capsys,
                                                                         monkeypatch):  # fmt: skip
    # The plumbing, not inductor (too slow for a test): torch.compile with the eager
    # backend, recording what it was given; the steps must call what it returned.
    compiled, calls = [], []
    real_compile = torch.compile

    def recording_compile(model, **kwargs):
        compiled.append(type(model).__name__)
        inner = real_compile(model, backend="eager")

        def forward(*args, **kw):
            calls.append(type(model).__name__)
            return inner(*args, **kw)

        return forward

    monkeypatch.setattr(torch, "compile", recording_compile)
    argv = tiny_train_argv(steps=1, reps=2, extra=["--compile"])
    code, out, _ = run(argv, capsys)
    assert code == 0
    result = json.loads(out)
    assert result["compile"] is True and len(compiled) == 3  # baseline, jtokm, jtokm/host
    assert len(calls) == 3 * (1 + 2)  # warm-up and timed steps, all through the compiled
    assert all(v["ratio_to_baseline"] > 0 for v in result["variants"].values())
    code, out, _ = run([a for a in argv if a != "--compile"], capsys)
    assert json.loads(out)["compile"] is False and len(compiled) == 3


def test_host_table_steps_train_like_device_steps():
    """The benchmark's host stepping (prefetch ahead, pull, locked RowAdam step) gives the
    device store's losses: the prefetch never reads a row before the step that updates it."""
    from jtok.bench.train_step import HostTableSteps, train_step, zipf_token_batches
    from jtok.config import TrainConfig
    from jtok.nn.model import build_model
    from jtok.presets import preset
    from jtok.training.optim import Optimizers

    cfg = variant_config(preset("tiny"), "jtokm", sparse_grad=True)
    batches = zipf_token_batches(cfg.vocab_size, 2, 16, n_batches=3)
    losses = {}
    for placement in ("device", "host"):
        torch.manual_seed(0)
        model = build_model(cfg, seed=0, table_placement=placement).train()
        opts = Optimizers(model, TrainConfig(lr=1e-2, table_lr_mult=30))
        if placement == "host":
            steps = HostTableSteps(model, opts, batches)
            losses[placement] = [steps.step() for _ in range(5)]
        else:
            losses[placement] = [train_step(model, opts, batches[i % 3]) for i in range(5)]
    assert losses["host"] == pytest.approx(losses["device"], rel=1e-5)
    assert losses["device"][-1] < losses["device"][0]


def test_phases_time_every_part_of_the_step_once_per_timed_step(capsys):
    argv = tiny_train_argv(steps=2, reps=3, extra=["--phases"])
    code, out, _ = run(argv, capsys)
    assert code == 0
    result = json.loads(out)
    assert result["phases"] is True
    phases = {name: v["phase_ms_median"] for name, v in result["variants"].items()}
    assert set(phases["baseline"]) == {"forward", "backward", "step AdamW",
                                       "zero_grad, loss.item"}  # fmt: skip
    assert set(phases["jtokm"]) == set(phases["baseline"]) | {"step RowAdam"}
    assert {"forward", "backward", "pull table gradients",
            "step AdamW + RowAdam"} <= set(phases["jtokm/host"])  # fmt: skip
    for name, variant in result["variants"].items():
        assert all(ms > 0 for ms in phases[name].values())
        # The phases tile the step: their medians add up to about its median.
        assert sum(phases[name].values()) <= 1.5 * variant["step_ms_median"]
    # Without --phases nothing extra is recorded (the step's own timing is unchanged).
    code, out, _ = run([a for a in argv if a != "--phases"], capsys)
    result = json.loads(out)
    assert result["phases"] is False
    assert not any("phase_ms_median" in v for v in result["variants"].values())


def test_phase_clock_sums_a_step_per_phase(monkeypatch):
    import itertools

    from jtok.bench import train_step as ts

    ticks = itertools.count()  # perf_counter reads 0, 1, 2, ... seconds
    monkeypatch.setattr(ts.time, "perf_counter", lambda: float(next(ticks)))
    clock = ts.PhaseClock(torch.device("cpu"))
    for step in range(4):
        clock.recording = step > 0  # the first step is a warm-up: not kept
        clock.start()
        clock.mark("a")  # 1 s
        clock.mark("b")  # 1 s
        clock.mark("a")  # a second visit adds to the step's "a": 2 s in all
        clock.finish()
    assert clock.samples == {"a": [2.0, 2.0, 2.0], "b": [1.0, 1.0, 1.0]}
    assert clock.medians_ms() == {"a": 2000.0, "b": 1000.0}


def test_ratio_summary_is_the_median_and_quartiles_of_paired_ratios():
    from jtok.bench.paired import ratio_summary

    base = [10.0, 20.0, 10.0, 10.0, 10.0]
    times = [11.0, 20.0, 12.0, 10.0, 13.0]  # ratios 1.1, 1.0, 1.2, 1.0, 1.3
    median, (q1, q3) = ratio_summary(times, base)
    assert median == pytest.approx(1.1)
    assert (q1, q3) == (pytest.approx(1.0), pytest.approx(1.2))
    assert ratio_summary([3.0], [2.0]) == (1.5, [1.5, 1.5])


def test_median_interval_is_the_binomial_order_statistic_interval():
    import random

    from jtok.bench.paired import median_interval, ratio_interval

    # n = 31: P(Bin(31, 1/2) <= 9) = 0.0147, <= 10 = 0.0354, so the 10th and 22nd smallest
    # (coverage 0.9706); the 11th would cover only 0.929.
    low, high, coverage = median_interval(list(range(31, 0, -1)))
    assert (low, high) == (10, 22) and coverage == pytest.approx(0.97055, abs=1e-4)
    # Too few values for 95%: the whole range, and its true coverage (1 - 2/32).
    assert median_interval([5.0, 1.0, 3.0, 2.0, 4.0]) == (1.0, 5.0, pytest.approx(0.9375))
    assert median_interval([2.0]) == (2.0, 2.0, 0.0)
    # Coverage holds for draws of a skewed distribution whose median is known (ln 2).
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):
        low, high, _ = median_interval([rng.expovariate(1.0) for _ in range(21)])
        hits += low <= math.log(2) <= high
    assert 0.95 <= hits / 2000 <= 0.995  # 21 draws: exact coverage 0.973
    assert ratio_interval([2.0, 4.0, 6.0, 8.0, 10.0, 12.0], [2.0] * 6) == {
        "ratio_ci": [1.0, 6.0], "ratio_ci_coverage": pytest.approx(0.96875)}
    from jtok.bench.paired import interval_text

    assert interval_text([1.0, 1.1], 0.97) == "[1.000, 1.100]"
    assert interval_text([1.0, 1.1], 0.875) == "[1.000, 1.100] 88%"  # too few repetitions


def test_prepared_device_checks_pass_on_the_cpu():
    """benchmarks/device_checks.py (the GPU session's correctness checks) runs and passes
    where it is kept working between GPU sessions: on the CPU (compiled check left out)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "device_checks.py"
    spec = importlib.util.spec_from_file_location("device_checks", path)
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    cfg = variant_config(preset("tiny"), "jtokm", sparse_grad=True)
    batches = zipf_token_batches(cfg.vocab_size, 2, 16, n_batches=2)
    state = checks.trained_state(cfg, batches, steps=5)
    cpu = torch.device("cpu")
    training = checks.check_training(cfg, state, batches, cpu)
    assert training["ok"] and training["losses_host"] == training["losses_device"]
    generation = checks.check_generation(cfg, state, cpu, compiled=False)
    assert generation["ok"] and generation["host_equals_device"]
