import json
import os
import subprocess
import sys

import pytest

from jtok.cli import main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_json_has_the_contract_fields(capsys):
    code, out, _ = run(["info", "--preset", "tiny", "--set", "tokmod.kind=jtokm",
                        "--set", "tokmod.n_e=5", "--json"], capsys)  # fmt: skip
    assert code == 0
    data = json.loads(out)
    for key in ("backbone_params", "active_backbone_params", "token_params", "eta",
                "train_flops_per_token"):  # fmt: skip
        assert key in data
    assert data["config"]["tokmod"]["n_e"] == 5
    assert data["token_params"] == 2 * 5 * 512 * 64
    assert data["eta"] == pytest.approx(data["token_params"] / data["active_backbone_params"])


def test_info_table_is_readable(capsys):
    code, out, _ = run(["info", "--preset", "moe-17b-a2b"], capsys)
    assert code == 0
    assert "token params N_n" in out and "43.60B" in out and "JTok-M n_e=5 K=2" in out


def test_info_reads_a_config_file(tmp_path, capsys):
    from jtok.presets import preset

    path = tmp_path / "model.yaml"
    path.write_text("model:\n  d_model: 128\n  n_heads: 4\n  tokmod: {kind: jtok}\n")
    code, out, _ = run(["info", "--config", str(path), "--json"], capsys)
    assert code == 0 and json.loads(out)["config"]["d_model"] == 128
    (tmp_path / "m.json").write_text(preset("tiny").to_json())
    assert run(["info", "--config", str(tmp_path / "m.json")], capsys)[0] == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "--preset", "tiny", "--set", "tokmod.top_k=9", "--set", "tokmod.kind=jtokm"],
         "tokmod.top_k"),
        (["info", "--preset", "tiny", "--set", "nonsense=1"], "nonsense"),
        (["info", "--preset", "tiny", "--set", "novalue"], "KEY=VALUE"),
        (["info", "--config", "/does/not/exist.json"], "cannot read config"),
        (["info"], "--preset"),
        (["info", "--preset", "tiny", "--seq-len", "0"], "--seq-len"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_bad_yaml_is_a_user_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    code, _, err = run(["info", "--config", str(path)], capsys)
    assert code == 2 and f"{path}:2:1: expected ',' or ']'" in err  # file:line:column
    assert len(err.splitlines()) == 1


def test_bench_runs_and_reports_ratios(capsys):
    argv = ["bench", "--preset", "tiny", "--batch", "2", "--seq-len", "16", "--steps", "1",
            "--reps", "2", "--warmup", "1", "--json"]  # fmt: skip
    code, out, _ = run(argv, capsys)
    assert code == 0
    result = json.loads(out)
    assert set(result["variants"]) == {"baseline", "jtok", "jtokm"}
    assert result["variants"]["baseline"]["ratio_to_baseline"] == 1.0
    assert result["variants"]["jtokm"]["token_params"] > 0


def test_console_entry_point_help():
    for argv in (["--help"], ["info", "--help"], ["bench", "--help"]):
        done = subprocess.run([sys.executable, "-m", "jtok", *argv], capture_output=True,
                              text=True, check=True)  # fmt: skip
        assert "usage: jtok" in done.stdout
    assert "--set" in subprocess.run([sys.executable, "-m", "jtok", "info", "--help"],
                                     capture_output=True, text=True).stdout  # fmt: skip


def test_output_into_a_closed_pipe_ends_quietly():
    # As in `jtok info | head -1`: the reader is gone before jtok writes.
    proc = subprocess.Popen([sys.executable, "-m", "jtok", "info", "--preset", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141
    assert "Traceback" not in err and "Exception ignored" not in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_output_onto_a_full_disk_is_one_line():
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "jtok", "info", "--preset", "tiny"],
                              stdout=full, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "jtok info: error: No space left on device\n", done.stderr


def test_environment_errors_are_one_line_and_defects_keep_their_traceback(capsys):
    import errno

    def fails_with(number):
        def handler(args):
            raise OSError(number, os.strerror(number), "/some/file")
        return handler

    for number in (errno.ENOSPC, errno.EACCES, errno.EROFS):
        assert main_with_handler(fails_with(number)) == 2
        assert capsys.readouterr().err == f"jtok info: error: {os.strerror(number)}: /some/file\n"
    with pytest.raises(FileNotFoundError):  # a missing file the code did not check: a defect
        main_with_handler(fails_with(errno.ENOENT))


def main_with_handler(handler):
    """`jtok info --preset tiny` with its handler replaced."""
    import jtok.cli as cli

    real = cli.build_parser

    def parser_with_handler():
        parser = real()
        parser._subparsers._group_actions[0].choices["info"].set_defaults(handler=handler)
        return parser

    cli.build_parser = parser_with_handler
    try:
        return cli.main(["info", "--preset", "tiny"])
    finally:
        cli.build_parser = real


def test_environment_errno_reads_safetensors_write_errors():
    from safetensors import SafetensorError

    from jtok.errors import environment_errno

    full = SafetensorError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")  # fmt: skip
    assert environment_errno(full) == 28
    assert environment_errno(SafetensorError("File does not contain tensor x")) is None
    assert environment_errno(OSError(2, "No such file or directory")) is None
    assert environment_errno(ValueError("no")) is None


def test_model_only_commands_take_config_spelled_keys_and_refuse_train_keys(tmp_path, capsys):
    assert main(["info", "--preset", "tiny", "--set", "model.d_model=128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["d_model"] == 128
    assert main(["info", "--preset", "tiny", "--set", "steps=5"]) == 2
    assert "steps is a train key, not a model key" in capsys.readouterr().err


def test_bench_out_is_never_replaced_silently_and_seq_len_follows_the_preset(tmp_path, capsys):
    earlier = tmp_path / "results.jsonl"
    earlier.write_text("precious\n")
    argv = ["bench", "--preset", "tiny", "--reps", "1", "--steps", "1", "--warmup", "0",
            "--variants", "baseline", "--json"]  # fmt: skip
    assert main([*argv, "--out", str(earlier)]) == 2
    assert "exists; use --overwrite" in capsys.readouterr().err
    assert earlier.read_text() == "precious\n"
    assert main([*argv, "--set", "tokmod.kind=jtok"]) == 2
    assert "--variants chooses" in capsys.readouterr().err
    assert main([*argv, "--out", str(earlier), "--overwrite"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seq_len"] == 128  # tiny's max_seq_len, under the default 256
    assert json.loads(earlier.read_text()) == printed
