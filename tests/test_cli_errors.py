"""User mistakes on the command line: exit status 2, exactly one line on stderr, nothing
changed on disk. One group per kind of mistake: config files, NaN/Inf, unknown keys,
`jtok config` / `--version`, `jtok bench` arguments and memory, CUDA, the demo's --out."""

import hashlib
import json
import os
import shutil

import pytest
import torch

from jtok import __version__
from jtok.cli import main
from jtok.config import RunConfig, TrainConfig, config_keys


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(argv, capsys, *fragments):
    code, out, err = run(argv, capsys)
    assert code == 2, (code, out, err)
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith("jtok") and ": error: " in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def tree_digest(path):
    """sha256 of every file under `path` (or of `path` itself), by relative name."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}  # fmt: skip


# ---- 1. config files ----------------------------------------------------------------------

BAD_FILES = {
    "binary.yaml": (b"\x00\x01\x02jtok\xff", "is a binary file"),
    "latin1.yaml": ("d_model: 128 # caf\xe9\n".encode("latin-1"), "is not valid UTF-8"),
    "empty.yaml": (b"", "is empty"),
    "comments.yaml": (b"# nothing here\n\n", "is empty"),
    "list.yaml": (b"- 1\n- 2\n", "must hold a mapping (key: value), not a list"),
    "scalar.json": (b"42", "must hold a mapping (key: value), not a number"),
    "indent.yaml": (b"model:\n  d_model: 128\n  x: a: b\n", ":3:7: mapping values are not allowed"),
    "unclosed.json": (b'{"d_model": 128,\n "n_heads": [4\n', ":3:1: expected ',' or ']'"),
    "comma.json": (b'{"d_model": 128,,}', ":1:17: expected the node content"),
    "control.yaml": (b"d_model: 1\x07\n", ":1:11: unacceptable character #x0007"),
    "two_docs.yaml": (b"d_model: 1\n---\nd_model: 2\n", ":2:1: but found another document"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
@pytest.mark.parametrize("command", ["info", "config", "train"])
def test_a_bad_config_file_is_one_line_naming_the_file(name, command, tmp_path, capsys):
    content, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    before = tree_digest(tmp_path)
    extra = ["--out", tmp_path / "run"] if command == "train" else []
    err = one_line_error([command, "--config", path, *extra], capsys, message)
    assert str(path) in err
    assert tree_digest(tmp_path) == before  # nothing written, the file untouched


def test_a_missing_file_or_a_folder_as_config_is_one_line(tmp_path, capsys):
    one_line_error(["info", "--config", tmp_path / "absent.yaml"], capsys,
                   "cannot read config", "No such file")  # fmt: skip
    one_line_error(["info", "--config", tmp_path], capsys, "cannot read config", "directory")


def test_a_bad_sweep_spec_is_one_line_and_creates_nothing(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"base:\n  model: {d_model: 64\n")
    one_line_error(["sweep", spec, "--out", tmp_path / "sweep", "--dry-run"], capsys,
                   f"sweep spec {spec}:3:1:")  # fmt: skip
    assert not (tmp_path / "sweep").exists()


# ---- 2. NaN and Inf -------------------------------------------------------------------------

FLOAT_KEYS = ["lr", "embed_lr_mult", "table_lr_mult", "adam_eps", "grad_clip", "beta2",
              "weight_decay", "rope_base", "norm_eps", "init_std", "tokmod.eps",
              "tokmod.table_init_std", "tokmod.scale_init", "tokmod.aux_weight",
              "moe.aux_weight", "moe.bias_update_rate"]  # fmt: skip


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "NaN", "1e999"])
def test_set_refuses_non_finite_floats_naming_the_field(key, value, capsys):
    one_line_error(["config", "--preset", "tiny", "--set", f"{key}={value}"], capsys,
                   f"{key}: must be a finite number")  # fmt: skip


def test_model_commands_refuse_non_finite_floats_too(capsys):
    one_line_error(["info", "--preset", "tiny", "--set", "tokmod.eps=inf"], capsys,
                   "tokmod.eps: must be a finite number, got inf")  # fmt: skip
    one_line_error(["bench", "--preset", "tiny", "--set", "rope_base=nan"], capsys,
                   "rope_base: must be a finite number, got nan")  # fmt: skip


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_json_nan_and_infinity_literals_are_refused(literal, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text('{"model": {"max_seq_len": 256, "tokmod": {"eps": 1e-6}},\n'
                    f' "train": {{"lr": {literal}}}}}\n')  # fmt: skip
    before = tree_digest(tmp_path)
    one_line_error(["config", "--config", path], capsys, "train.lr: must be a finite number")
    one_line_error(["train", "--config", path, "--out", tmp_path / "run"], capsys,
                   "train.lr: must be a finite number")  # fmt: skip
    assert tree_digest(tmp_path) == before


# ---- 3. unknown keys --------------------------------------------------------------------------


def test_unknown_set_key_names_the_section_it_probably_meant(capsys):
    err = one_line_error(["config", "--preset", "tiny", "--set", "lr_mult=3"], capsys,
                         "lr_mult: unknown key", "train.table_lr_mult", "train keys: ")  # fmt: skip
    assert "embed_lr_mult, norm_lr_mult" in err  # the train section's keys are listed
    one_line_error(["info", "--preset", "tiny", "--set", "tokmod.topk=1"], capsys,
                   "did you mean tokmod.top_k?", "tokmod keys: kind, layers")  # fmt: skip
    one_line_error(["info", "--preset", "tiny", "--set", "tokmod.num_experts=4"], capsys,
                   "did you mean moe.num_experts?", "moe keys: ")  # fmt: skip
    one_line_error(["info", "--preset", "tiny", "--set", "lr=1e-3"], capsys,
                   "lr is a train key, not a model key", "model keys: vocab_size")  # fmt: skip
    one_line_error(["bench", "--preset", "tiny", "--set", "moe=4"], capsys,
                   "moe: is a section, not a key; moe keys: num_experts")  # fmt: skip


def test_unknown_keys_in_config_files_suggest_the_right_one(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  d_model: 64\n  tokmod: {knd: jtok}\ntrain: {seq_len: 64}\n")
    one_line_error(["config", "--config", path], capsys,
                   "model.tokmod.knd: unknown key (did you mean model.tokmod.kind?)",
                   "model.tokmod keys: kind,")  # fmt: skip
    path.write_text("model: {d_model: 64}\ntrain: {seq_len: 64, warmup: 5}\n")
    one_line_error(["train", "--config", path, "--out", tmp_path / "run"], capsys,
                   "train.warmup: unknown key (did you mean train.warmup_steps?)")  # fmt: skip
    assert not (tmp_path / "run").exists()


# ---- 4. jtok config, jtok --version -------------------------------------------------------------


def test_config_prints_every_model_and_train_key(capsys):
    code, out, err = run(["config", "--preset", "tiny", "--set", "lr=1e-3",
                          "--set", "tokmod.kind=jtokm"], capsys)  # fmt: skip
    assert code == 0 and err == ""
    pairs = dict(line.split(" = ", 1) for line in out.splitlines())
    assert list(pairs) == config_keys(RunConfig)  # every key, dotted, in order
    assert any(k.startswith("model.moe.") for k in pairs) and "train.compile" in pairs
    assert pairs["train.lr"] == "0.001" and pairs["model.tokmod.kind"] == "jtokm"
    assert pairs["model.tokmod.layers"] == "null" and pairs["train.seq_len"] == "128"
    assert pairs["train.table_lr_mult"] == str(TrainConfig.table_lr_mult)  # the default


def test_config_json_is_a_run_config_that_config_reads_back(tmp_path, capsys):
    code, out, _ = run(["config", "--preset", "tiny-moe", "--set", "steps=7", "--json"], capsys)
    assert code == 0 and len(out.splitlines()) == 1
    data = json.loads(out)
    assert data["train"]["steps"] == 7 and data["model"]["moe"]["num_experts"] == 4
    (tmp_path / "run.json").write_text(out)
    assert run(["config", "--config", tmp_path / "run.json", "--json"], capsys)[1] == out
    one_line_error(["config"], capsys, "give --preset NAME or --config FILE")


def test_version(capsys):
    code, out, err = run(["--version"], capsys)
    assert code == 0 and out == f"jtok {__version__}\n" and err == ""


def test_argparse_mistakes_are_one_line_too(capsys):
    one_line_error(["info", "--preset", "huge"], capsys, "jtok info: error: argument --preset")
    one_line_error(["info", "--seq-len", "x"], capsys,
                   "argument --seq-len: expected a positive integer, got 'x'")  # fmt: skip
    one_line_error(["info", "--preset", "tiny", "--json", "--frobnicate"], capsys,
                   "unrecognized arguments: --frobnicate")  # fmt: skip
    one_line_error([], capsys, "jtok: error: the following arguments are required")
    one_line_error(["nonsense"], capsys, "invalid choice: 'nonsense'")


# ---- 5. jtok bench -------------------------------------------------------------------------------


@pytest.fixture
def no_benchmark(monkeypatch):
    """Fail the test if the benchmark starts: every refusal must come first."""
    import jtok.bench.train_step as train_step

    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(train_step, "train_step_benchmark", refuse)


BENCH = ["bench", "--preset", "tiny", "--seq-len", "16"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "0"], "argument --batch: expected a positive integer, got 0"),
        (["--batch", "-3"], "argument --batch: expected a positive integer, got -3"),
        (["--seq-len", "0"], "argument --seq-len: expected a positive integer"),
        (["--steps", "0"], "argument --steps: expected a positive integer"),
        (["--reps", "-1"], "argument --reps: expected a positive integer"),
        (["--warmup", "-1"], "argument --warmup: expected an integer >= 0"),
        (["--threads", "0"], "argument --threads: expected a positive integer"),
        (["--batch", "nan"], "argument --batch: expected a positive integer, got 'nan'"),
        (["--steps", "2.5"], "argument --steps: expected a positive integer, got '2.5'"),
        (["--seq-len", "999"], "--seq-len 999 exceeds max_seq_len 128"),
        (["--variants", "baseline,jtk"], "--variants: unknown variant 'jtk'"),
        (["--variants", " , "], "--variants: name at least one of"),
        (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
    ],
)
def test_bench_refuses_bad_arguments_before_running(args, message, no_benchmark, capsys):
    one_line_error([*BENCH, *args], capsys, message)


def test_info_refuses_a_plan_train_would_refuse(capsys):
    """Host tables train on one process: a per-process plan for W > 1 described a layout
    that `jtok train` refuses under torchrun."""
    one_line_error(["info", "--preset", "tiny", "--world-size", "2", "--table-placement",
                    "host"], capsys, "--table-placement host trains and serves on one process")


def test_bench_out_never_lands_in_a_run_data_or_study_folder(tmp_path, no_benchmark, capsys):
    """--overwrite used to replace a run's config.json or a data manifest.json."""
    for marker, what in (("run.json", "a run"), ("manifest.json", "prepared data"),
                         ("spec.json", "a sweep study")):  # fmt: skip
        folder = tmp_path / marker.split(".")[0]
        (folder / "checkpoints").mkdir(parents=True)
        (folder / marker).write_text("{}\n")
        (folder / "config.json").write_text("{}\n")
        before = tree_digest(tmp_path)
        for out in (folder / "config.json", folder / "checkpoints" / "bench.json"):
            one_line_error([*BENCH, "--out", out, "--overwrite"], capsys,
                           f"is inside {what} ({folder})")  # fmt: skip
        assert tree_digest(tmp_path) == before


def test_bench_refuses_an_out_it_could_not_write(tmp_path, monkeypatch, no_benchmark, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "old.json").write_text("{}\n")
    before = tree_digest(tmp_path)
    one_line_error([*BENCH, "--out", folder], capsys, f"--out {folder} is a folder")
    one_line_error([*BENCH, "--out", tmp_path / "absent" / "b.json"], capsys,
                   f"folder {tmp_path / 'absent'} does not exist")  # fmt: skip
    one_line_error([*BENCH, "--out", folder / "old.json" / "b.json"], capsys,
                   "old.json is not a folder")  # fmt: skip
    # Read-only: simulated, since root may write anywhere (a real chmod check follows).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(folder)
                        else real_access(p, mode))  # fmt: skip
    one_line_error([*BENCH, "--out", folder / "b.json"], capsys, f"folder {folder} is read-only")
    monkeypatch.setattr(os, "access", real_access)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            one_line_error([*BENCH, "--out", folder / "b.json"], capsys, "read-only")
        finally:
            folder.chmod(0o755)
    assert tree_digest(tmp_path) == before


def test_bench_refuses_sizes_that_cannot_fit_before_allocating(monkeypatch, no_benchmark,
                                                              capsys):  # fmt: skip
    import jtok.parallel.resources as resources

    monkeypatch.setattr(resources, "available_memory", lambda device: 10 * 2**20)  # 10 MiB
    err = one_line_error([*BENCH, "--batch", "64"], capsys,
                         "jtok bench (3 configurations) needs at least", "but cpu has 10.0 MiB "
                         "available")  # fmt: skip
    assert "params " in err and "optimizer " in err and "activations " in err
    monkeypatch.setenv("JTOK_NO_MEMORY_CHECK", "1")  # the escape hatch skips the check
    with pytest.raises(AssertionError, match="the benchmark ran"):
        main([*BENCH, "--batch", "64"])


def test_bench_refuses_a_huge_model_on_this_machine(no_benchmark, capsys):
    # No monkeypatching: 10^7 x 4096 fp32 tables (x3 with Adam) exceed any CPU's memory.
    one_line_error(["bench", "--preset", "small", "--set", "vocab_size=10000000",
                    "--set", "d_model=4096", "--set", "n_heads=32", "--set", "n_kv_heads=32"],
                   capsys, "needs at least", "TiB")  # fmt: skip


def test_bench_writes_its_out_file(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, _, _ = run([*BENCH, "--batch", "2", "--steps", "1", "--reps", "1", "--warmup", "0",
                      "--variants", "jtok,jtok", "--json", "--out", out], capsys)  # fmt: skip
    assert code == 0
    assert set(json.loads(out.read_text())["variants"]) == {"baseline", "jtok"}


# ---- 6. CUDA on a machine without it ---------------------------------------------------------


def test_device_cuda_without_cuda_is_one_line(monkeypatch, tiny_data, tmp_path, capsys):
    from jtok.config import ConfigError
    from jtok.parallel.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^train\.device: 'cuda' requested but"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match=r"^train\.device: must be one of"):
        resolve_device("tpu")
    one_line_error(["train", "--preset", "tiny", "--data", tiny_data, "--out", tmp_path / "run",
                    "--set", "device=cuda"], capsys, "train.device: 'cuda' requested")  # fmt: skip
    assert not (tmp_path / "run").exists()


# ---- 7. the demo's --out ---------------------------------------------------------------------


def test_demo_refuses_an_out_that_is_a_file_or_read_only(tmp_path, monkeypatch, capsys):
    path = tmp_path / "demo"
    path.write_text("not a folder\n")
    before = tree_digest(tmp_path)
    one_line_error(["demo", "--out", path], capsys, f"--out {path} is a file, not a folder")
    one_line_error(["demo", "--out", path / "sub"], capsys, "is a file, not a folder")
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(folder)
                        else real_access(p, mode))  # fmt: skip
    one_line_error(["demo", "--out", folder], capsys, f"folder {folder} is read-only")
    one_line_error(["demo", "--out", folder / "new"], capsys, "read-only")
    assert not (folder / "new").exists()
    shutil.rmtree(folder)
    assert tree_digest(tmp_path) == before
