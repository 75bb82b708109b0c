"""`jtok fit` end to end: loading results, writing reports, and one-line errors."""

import argparse
import hashlib
import json
import os

import pytest
from fitdata import (
    BUDGETS,
    eta_sweep_runs,
    isoflop_runs,
    write_results,
)

from jtok.cli import main
from jtok.cli.studies import add_fit_arguments, cmd_fit
from jtok.studies.fit import (
    RESULTS_FILE,
    FitError,
    load_results,
    run_fit,
)


def test_load_results_names_the_file_and_line_of_a_missing_field(tmp_path):
    runs = eta_sweep_runs()
    broken = dict(runs[1])
    del broken["tokens"]
    write_results(tmp_path, [runs[0], broken])
    with pytest.raises(FitError, match=r"results\.jsonl:2: missing field 'tokens'"):
        load_results(tmp_path)
    write_results(tmp_path, [dict(runs[0], N_c="ten million")])
    with pytest.raises(FitError, match=r":1: field 'N_c' must be a number"):
        load_results(tmp_path)


def test_load_results_reports_a_bad_json_line(tmp_path):
    write_results(tmp_path, eta_sweep_runs()[:2], extra_lines=['{"name": "cut off'])
    with pytest.raises(FitError, match=r"results\.jsonl is corrupt at line 3: not JSON"):
        load_results(tmp_path / RESULTS_FILE)


def test_load_results_drops_a_torn_last_line_with_a_warning(tmp_path):
    # A sweep that died while appending leaves a last line without its newline.
    runs = eta_sweep_runs()[:2]
    (tmp_path / RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in runs)
                                         + '{"name": "cut off')  # fmt: skip
    with pytest.warns(UserWarning, match="half-written last line"):
        assert [r["name"] for r in load_results(tmp_path)] == [r["name"] for r in runs]


def test_load_results_names_the_line_of_a_bad_record_after_blank_lines(tmp_path):
    runs = eta_sweep_runs()[:2]
    write_results(tmp_path, [runs[0]], extra_lines=["", json.dumps(dict(runs[1], eta=-1))])
    with pytest.raises(FitError, match=r"results\.jsonl:3: field 'eta' must be non-negative"):
        load_results(tmp_path)


def test_load_results_ignores_unknown_fields_and_blank_lines(tmp_path):
    runs = eta_sweep_runs()[:2]
    runs[0]["machine"] = {"threads": 2}
    del runs[1]["labels"]  # optional: results written without axis labels still load
    write_results(tmp_path, runs, extra_lines=[""])
    loaded = load_results(tmp_path)
    assert len(loaded) == 2 and "machine" not in loaded[0]
    assert loaded[0]["labels"] == {"eta": "0.0"} and loaded[1]["labels"] == {}
    assert loaded[0]["budget"] is None and isinstance(loaded[0]["eta"], float)


def test_run_fit_end_to_end_writes_json_report_and_figures(tmp_path):
    sweep = write_results(tmp_path / "sweep", isoflop_runs() + eta_sweep_runs())
    result = run_fit(sweep, bootstrap=30, seed=0)
    on_disk = json.loads((sweep / "fit.json").read_text())
    assert on_disk == result
    assert result["eta_law"][0]["slope"] == pytest.approx(-0.0118, abs=0.0015)
    assert result["isoflops"]["comparisons"]["jtokm"]["compute_saving_ci"]
    assert result["parametric"]["effective"]["gamma"] is not None
    report = (sweep / "REPORT_fit.md").read_text()
    assert "compute saving at equal loss" in report and "95% CI" in report
    assert "Over all matched settings" in report
    boot = result["isoflops"]["bootstrap"]  # the default: a paired case bootstrap
    assert (boot["kind"], boot["paired"]) == ("case", True)
    assert f"{100 * boot['resamples_with_fallback']:.1f}% of resamples had at least one" in report
    assert "saving implied by the mid loss gap at the baseline's slope" in report
    assert report.count("Power (two-sided alpha 0.05") == 1
    # the per-run table: one row per (budget, backbone), the best size of each profile bold
    runs = isoflop_runs()
    best = min((r for r in runs if r["variant"] == "jtokm" and r["budget"] == BUDGETS[0]),
               key=lambda r: r["final_val_loss"])  # fmt: skip
    row = next(line for line in report.splitlines()
               if line.startswith(f"| {BUDGETS[0]:.3g} | {best['backbone']} |"))  # fmt: skip
    assert row.split(" | ")[-1].rstrip(" |") == f"**{best['final_val_loss']:.4f}**"
    assert sum(line.startswith(f"| {BUDGETS[0]:.3g} |") for line in report.splitlines()) == 5
    for name in ("fit_eta.png", "fit_isoflops.png", "fit_frontier.png", "fit_parametric.png"):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in result["files"]


def test_run_fit_skips_what_the_data_cannot_support_and_fails_on_nothing(tmp_path):
    sweep = write_results(tmp_path / "eta-only", eta_sweep_runs())
    result = run_fit(sweep, plots=False)
    assert result["isoflops"] is None and result["parametric"] is None
    assert any("no run has a FLOP budget" in note for note in result["notes"])
    assert not (sweep / "fit_eta.png").exists()
    with pytest.raises(FitError, match="no such directory"):
        run_fit(tmp_path / "absent")
    tiny = write_results(tmp_path / "tiny", eta_sweep_runs()[:3])
    with pytest.raises(FitError, match="too few runs for any fit"):
        run_fit(tiny)


def test_cmd_fit_json_prints_one_parseable_object(tmp_path, capsys):
    sweep = write_results(tmp_path / "sweep", isoflop_runs() + eta_sweep_runs())
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    args = parser.parse_args([str(sweep), "--json", "--no-plots", "--bootstrap", "0"])
    assert cmd_fit(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((sweep / "fit.json").read_text())
    assert printed["treatment"] == "jtokm" and printed["files"] == ["fit.json", "REPORT_fit.md"]


def test_jtok_fit_passes_window_and_noise_through_and_rejects_bad_ones(tmp_path, capsys):
    sweep = write_results(tmp_path / "sweep", isoflop_runs(sizes=7))
    assert main(["fit", str(sweep), "--json", "--no-plots", "--bootstrap", "20",
                 "--window", "5", "--noise", "0.01"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["isoflop_window"] == 5
    assert {m["fit_sizes"] for m in printed["isoflops"]["minima"]} == {5}
    assert printed["isoflops"]["bootstrap"]["noise_sigma"] == 0.01
    for bad in (["--window", "2"], ["--noise", "0"]):
        assert main(["fit", str(sweep), "--no-plots", *bad]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_fit_out_keeps_a_variant_analysis_beside_the_main_one(tmp_path):
    sweep = write_results(tmp_path / "sweep", isoflop_runs())
    main_fit = run_fit(sweep, bootstrap=0, plots=False)
    variant = run_fit(sweep, bootstrap=0, plots=True, window=3, out=tmp_path / "windowed")
    assert json.loads((sweep / "fit.json").read_text()) == main_fit  # untouched
    assert json.loads((tmp_path / "windowed" / "fit.json").read_text()) == variant
    assert (tmp_path / "windowed" / "fit_isoflops.png").exists()
    assert not (sweep / "fit_isoflops.png").exists()
    other = write_results(tmp_path / "other", isoflop_runs(seed=1))
    with pytest.raises(FitError, match="another sweep"):
        run_fit(sweep, bootstrap=0, plots=False, out=other)
    assert not (other / "fit.json").exists()


def test_fit_variants_restricts_the_analysis_to_the_named_variants(tmp_path, capsys):
    runs = isoflop_runs()
    # A third variant, 5% worse everywhere, added to the grid later.
    extra = [dict(r, name="x" + r["name"], variant="jtokm-x",
                  final_val_loss=r["final_val_loss"] * 1.05)
             for r in runs if r["variant"] == "jtokm"]  # fmt: skip
    before = run_fit(write_results(tmp_path / "two", runs), bootstrap=50, plots=False)
    grown = write_results(tmp_path / "three", runs + extra)
    both = run_fit(grown, bootstrap=50, plots=False)
    kept = run_fit(grown, bootstrap=50, plots=False, variants=["baseline", "jtokm"],
                   out=tmp_path / "kept")  # fmt: skip
    assert set(both["variants"]) == {"baseline", "jtokm", "jtokm-x"}
    # Restricted, the grown grid reproduces the earlier analysis exactly.
    assert kept["variants"] == before["variants"]
    assert kept["variant_filter"] == ["baseline", "jtokm"]
    jtokm = before["isoflops"]["comparisons"]["jtokm"]
    assert kept["isoflops"]["comparisons"]["jtokm"] == jtokm
    # Unrestricted, the extra profiles change the pooled noise and so the intervals.
    assert both["isoflops"]["comparisons"]["jtokm"] != jtokm
    assert "Only these variants" in (tmp_path / "kept" / "REPORT_fit.md").read_text()
    assert main(["fit", str(grown), "--no-plots", "--variants", "baseline,jtokm-y"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "jtokm-y: no such variant" in err


# ---- (6) bad input to `jtok fit`: one line on stderr, exit 2, nothing changed on disk ----


def tree_digest(root) -> dict:
    """Every path under `root`: the sha256 of a file, "dir" for a folder."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            for path in root.rglob("*")}  # fmt: skip


def assert_one_line_error(capsys, args, *, contains: str) -> None:
    assert main(["fit", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("jtok fit: error: ") and captured.err.count("\n") == 1
    assert contains in captured.err


def test_jtok_fit_refuses_a_missing_or_file_dir_and_a_dir_without_results(tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a sweep\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    before = tree_digest(tmp_path)
    assert_one_line_error(capsys, [str(tmp_path / "absent")], contains="no such directory")
    assert_one_line_error(capsys, [str(a_file)], contains="not a directory")
    assert_one_line_error(capsys, [str(empty)], contains="run `jtok sweep` first")
    assert tree_digest(tmp_path) == before  # nor was "absent" created


def test_jtok_fit_names_the_corrupt_line_of_results(tmp_path, capsys):
    sweep = write_results(tmp_path / "sweep", isoflop_runs(),
                          extra_lines=["{oops", json.dumps(eta_sweep_runs()[0])])  # fmt: skip
    before = tree_digest(tmp_path)
    assert_one_line_error(capsys, [str(sweep), "--no-plots"],
                          contains=f"{sweep / RESULTS_FILE} is corrupt at line "
                                   f"{len(isoflop_runs()) + 1}")  # fmt: skip
    assert tree_digest(tmp_path) == before


def test_jtok_fit_refuses_an_out_that_is_a_file_before_computing(tmp_path, capsys):
    sweep = write_results(tmp_path / "sweep", isoflop_runs())
    out = tmp_path / "taken"
    out.write_text("someone's notes\n")
    before = tree_digest(tmp_path)
    assert_one_line_error(capsys, [str(sweep), "--out", str(out)], contains="not a directory")
    assert_one_line_error(capsys, [str(sweep), "--out", str(out / "fits")],
                          contains=f"({out} is a file)")  # fmt: skip
    assert tree_digest(tmp_path) == before


def test_jtok_fit_refuses_a_read_only_out_before_computing(tmp_path, capsys, monkeypatch):
    sweep = write_results(tmp_path / "sweep", isoflop_runs())
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "fit.json").write_text("{}\n")  # an earlier fit, to be kept
    before = tree_digest(tmp_path)
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
            False if os.fspath(path) == str(locked) and mode & os.W_OK
            else real_access(path, mode, **kw)))  # fmt: skip
    try:
        for args in (["--out", str(locked)], ["--out", str(locked / "new" / "deeper")]):
            assert_one_line_error(capsys, [str(sweep), "--no-plots", *args],
                                  contains="not writable")  # fmt: skip
    finally:
        locked.chmod(0o755)
    assert tree_digest(tmp_path) == before


def test_jtok_fit_unknown_variant_changes_nothing(tmp_path, capsys):
    sweep = write_results(tmp_path / "sweep", isoflop_runs())
    before = tree_digest(tmp_path)
    assert_one_line_error(capsys, [str(sweep), "--variants", "baseline,nope"],
                          contains="nope: no such variant")  # fmt: skip
    assert tree_digest(tmp_path) == before


def test_fit_prints_the_objective_change_with_one_sign():
    from jtok.studies.fit.report import _change

    assert _change({"relative_improvement": -0.0}) == "+0.0%"
    assert _change({"relative_improvement": 0.032}) == "-3.2%"
    assert _change({"relative_improvement": None}) == "n/a"
