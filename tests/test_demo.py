"""The README's main job, `jtok demo`, on the tiny dataset with a few steps."""

import json
import shutil

import pytest

from jtok.cli import main
from jtok.studies.demo import DemoError, bench_command, format_table, run_demo


@pytest.fixture
def demo_out(tiny_data, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(tiny_data, out / "data")  # prepared data in place: the demo reuses it
    return out


def test_demo_trains_each_variant_writes_a_summary_and_reuses_finished_runs(demo_out):
    summary = run_demo(demo_out, steps=2, variants=["baseline", "jtokm"], progress=False,
                       log=lambda m: None)  # fmt: skip
    assert set(summary) == {"baseline", "jtokm"}
    assert summary["baseline"]["token_params"] == 0 < summary["jtokm"]["token_params"]
    saved = json.loads((demo_out / "summary.json").read_text())
    assert saved["jtokm"]["val_loss"] == summary["jtokm"]["val_loss"]
    assert (demo_out / "loss_curves.png").stat().st_size > 0
    # Speed ratios between runs trained one after another are not reported (another
    # process on the machine skews them): the table points to `jtok bench` instead.
    assert not any("ratio" in key for entry in saved.values() for key in entry)
    table = format_table(summary)
    assert "step time" not in table and "x\n" not in table
    assert table.splitlines()[0].split() == ["variant", "backbone", "token", "params", "val",
                                             "loss", "bpb", "tok/s"]  # fmt: skip
    assert table.rstrip().endswith(bench_command()) and "jtok bench --preset small" in table
    config = json.loads((demo_out / "runs" / "jtokm" / "config.json").read_text())
    assert config["model"]["tokmod"]["kind"] == "jtokm" and config["train"]["steps"] == 2

    metrics = demo_out / "runs" / "jtokm" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime_ns
    again = run_demo(demo_out, steps=2, variants=["jtokm"], progress=False, log=lambda m: None)
    assert metrics.stat().st_mtime_ns == stamp  # finished: reused, not retrained
    assert again["jtokm"]["val_loss"] == summary["jtokm"]["val_loss"]


def test_demo_refuses_a_run_trained_with_another_configuration(demo_out, capsys):
    run_demo(demo_out, steps=2, variants=["jtokm"], progress=False, log=lambda m: None)
    config_path = demo_out / "runs" / "jtokm" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["tokmod"]["scale_init"] = 1.0  # as an older jtok's default would be
    config_path.write_text(json.dumps(config))
    metrics = (demo_out / "runs" / "jtokm" / "metrics.jsonl").read_text()
    with pytest.raises(DemoError, match=r"scale_init: 1.0 -> None"):
        run_demo(demo_out, steps=2, variants=["jtokm"], progress=False, log=lambda m: None)
    assert (demo_out / "runs" / "jtokm" / "metrics.jsonl").read_text() == metrics  # untouched
    assert main(["demo", "--out", str(demo_out), "--steps", "2"]) == 2
    assert "trained with another configuration" in capsys.readouterr().err


def test_demo_out_that_is_a_file_is_one_line_and_left_alone(tmp_path, capsys):
    import hashlib

    path = tmp_path / "demo.txt"
    path.write_text("my notes\n")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert main(["demo", "--out", str(path), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"jtok demo: error: --out {path} is a file, not a folder"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.txt"]


def test_bench_command_times_the_demos_backbone():
    from jtok.cli import build_parser
    from jtok.cli.common import resolve_model_config
    from jtok.studies.demo import DATA_VOCAB, demo_backbone

    args = build_parser().parse_args(bench_command().split()[1:])
    assert resolve_model_config(args) == demo_backbone(DATA_VOCAB)
    assert (args.seq_len, args.batch) == (128, 16)
