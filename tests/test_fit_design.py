"""`jtok fit`'s design checks (edge minima, parameter counts, paired bootstrap, implied
saving, power) on grids built to need them."""

import json
import math

import numpy as np
import pytest
from fitdata import (
    BUDGETS,
    ETA,
    GAMMA,
    chinchilla,
    eta_sweep_runs,
    isoflop_runs,
    true_optimum,
    write_results,
)

from jtok.cli import main
from jtok.config import ModelConfig, MoEConfig
from jtok.flops import summarize
from jtok.studies.fit import (
    BOOTSTRAP_METHODS,
    Z_DETECT,
    FitError,
    LineFit,
    compute_saving,
    implied_saving,
    isoflop_analysis,
    load_results,
    paired_gains,
    paper_frontier_check,
    power_analysis,
    run_fit,
)


def model_config(d_model, n_layers, tie=False, experts=0) -> ModelConfig:
    moe = MoEConfig(num_experts=experts, num_shared_experts=1, top_k=2,
                    expert_hidden=d_model) if experts else MoEConfig()  # fmt: skip
    return ModelConfig(vocab_size=32000, d_model=d_model, n_layers=n_layers, n_heads=8,
                       n_kv_heads=8, ffn_hidden=1408, tie_embeddings=tie, moe=moe)


def config_run(cfg: ModelConfig, budget: float, loss_of, seed=0) -> dict:
    """A result line as `jtok sweep` writes it: N_c (active, embedding and head included)
    and the full config; the loss from `loss_of(non-embedding N_c, tokens)`."""
    counts = summarize(cfg)
    n_ne = counts["active_backbone_params"] - cfg.vocab_size * cfg.d_model * (
        1 if cfg.tie_embeddings else 2)  # fmt: skip
    tokens = int(budget / (6 * n_ne))
    loss = float(loss_of(n_ne, tokens))
    return {"name": f"L{cfg.n_layers}-d{cfg.d_model}-{budget:.0e}", "variant": "baseline",
            "backbone": f"d{cfg.d_model}-L{cfg.n_layers}", "budget": budget,
            "N_c": counts["active_backbone_params"], "N_c_total": counts["backbone_params"],
            "N_n": 0, "eta": 0.0, "rho": 0.0, "tokens": tokens, "flops": 6.0 * n_ne * tokens,
            "final_val_loss": loss, "best_val_loss": loss, "curve": [],
            "config": {"model": cfg.to_dict(), "train": {"seed": seed}}}  # fmt: skip


def test_non_embedding_count_leaves_out_the_input_embedding_and_head_of_the_config(tmp_path):
    configs = [model_config(512, 4), model_config(512, 4, tie=True),
               model_config(512, 4, experts=8)]  # fmt: skip
    write_results(tmp_path, [config_run(c, 1e17, lambda n, d: 3.0, seed=7) for c in configs])
    untied, tied, moe = load_results(tmp_path)
    embedding = 32000 * 512
    assert untied["N_c_non_embedding"] == untied["N_c"] - 2 * embedding
    assert untied["N_c_non_embedding"] == summarize(configs[0])["non_embedding_params"]
    assert tied["N_c_non_embedding"] == tied["N_c"] - embedding  # one shared matrix
    # MoE: N_c is the active count (2 of 8 routed experts), and so is its non-embedding part.
    assert moe["N_c_non_embedding"] == moe["N_c"] - 2 * embedding
    assert moe["N_c_non_embedding"] < summarize(configs[2])["non_embedding_params"]
    assert (untied["N_c_all"], untied["seed"]) == (untied["N_c"], 7)


def test_fit_in_non_embedding_parameters_recovers_an_optimum_set_in_them(tmp_path):
    # The loss follows the Chinchilla law in N_c without the embedding and head (16.4M x 2
    # here, as much as the whole rest of the model at the smallest budget's optimum).
    rng = np.random.default_rng(0)
    runs = []
    for budget in BUDGETS[:2]:
        per_layer = 3.21e6  # attention 4 d^2 + SwiGLU 3 d ffn at d 512, ffn 1408
        centre = true_optimum(budget)[0] / per_layer
        for layers in sorted({max(1, round(centre * 10**k)) for k in np.linspace(-0.6, 0.6, 5)}):
            runs.append(config_run(model_config(512, layers), budget, lambda n, d: chinchilla(
                n, d) * math.exp(rng.normal(0, 0.002))))  # fmt: skip
    sweep = write_results(tmp_path / "sweep", runs)
    fitted = run_fit(sweep, bootstrap=0, plots=False, params="non-embedding")
    assert fitted["params"] == "non-embedding"
    for row in fitted["isoflops"]["minima"]:
        n_true = true_optimum(row["budget"])[0]
        assert abs(math.log10(row["N_opt"] / n_true)) < 0.06  # within 15%
        assert row["N_opt_all"] == pytest.approx(row["N_opt"] + 2 * 32000 * 512, rel=0.03)
        assert all(n_all - n_ne == 2 * 32000 * 512 for n_all, n_ne in row["size_counts"])
    report = (sweep / "REPORT_fit.md").read_text()
    assert "without the input embedding and head (`--params non-embedding`)" in report
    assert "| N_c | N_c non-emb. |" in report
    hand_made = write_results(tmp_path / "hand", isoflop_runs())  # configs without a model
    with pytest.raises(FitError, match="cannot be counted without its embedding and head"):
        run_fit(hand_made, bootstrap=0, plots=False, params="non-embedding")


def test_implied_saving_of_a_loss_gap_matches_the_hand_computation():
    # Parallel frontiers log2 L = m log10 C + k: equal loss needs log10(C_t / C_b)
    # = -log2(1 - gap) / m, so saving = 1 - 10^(-log2(1 - gap) / m).
    paper = implied_saving(0.022, -0.2016)
    assert paper == pytest.approx(1 - 10 ** (-math.log2(0.978) / -0.2016))
    assert paper == pytest.approx(0.3069, abs=5e-4)  # not the 35% the paper states
    ours = implied_saving(0.022, -0.302)
    assert ours == pytest.approx(0.2171, abs=5e-4)  # "about 22%"
    # the same in natural axes, L ∝ C^a with a = m log10(2)
    a = -0.302 * math.log10(2)
    assert ours == pytest.approx(1 - math.exp(-math.log(1 - 0.022) / a))
    # and what compute_saving finds on two parallel lines with that gap, at any loss
    base = LineFit(-0.302, 6.25, 1.0, 3, math.nan)
    treat = LineFit(-0.302, 6.25 + math.log2(1 - 0.022), 1.0, 3, math.nan)
    for loss in (4.5, 5.0, 5.5):
        assert compute_saving(base, treat, loss) == pytest.approx(ours)
    assert implied_saving(-0.01, -0.302) < 0  # a negative gap is a cost
    assert math.isnan(implied_saving(0.022, 0.0)) and math.isnan(implied_saving(1.0, -0.3))
    assert paper_frontier_check()["stated_gap_implied_saving"] == pytest.approx(paper)


@pytest.mark.parametrize("method", BOOTSTRAP_METHODS)
def test_paired_draws_narrow_the_interval_of_a_difference_whose_runs_share_seeds(method):
    # Most of each run's noise is its seed's (batch order), shared by baseline and treatment
    # at one (budget, size): their difference is far less noisy than either run.
    runs = isoflop_runs(noise=0.001, shared=0.01)
    widths = {}
    for paired in (True, False):
        section, _ = isoflop_analysis(runs, "baseline", bootstrap=200, seed=0, method=method,
                                      paired=paired)  # fmt: skip
        comp, boot = section["comparisons"]["jtokm"], section["bootstrap"]
        lo, hi = comp["loss_gap_ci"][1]
        compute = comp["points"]["compute"][1]
        truth = 1 - true_optimum(compute, ETA)[1] / true_optimum(compute)[1]
        assert lo <= truth <= hi
        widths[paired] = hi - lo
        assert boot["paired"] is paired and boot["kind"] == method
        assert boot["shared_noise_fraction"] > 0.9 if paired else boot["shared_noise_fraction"] == 0
        assert 0 <= boot["fallback_fraction"] <= boot["resamples_with_fallback"] <= 1
    assert widths[True] < 0.6 * widths[False]


def test_case_bootstrap_covers_the_truth_where_profiles_are_far_from_a_parabola():
    # +-1.5 decades, 6 sizes: the quadratic misfits the lopsided profile, more than the noise.
    truth = 1 - 1 / (1 + ETA * GAMMA)
    covered = 0
    for seed in range(12):
        section, _ = isoflop_analysis(isoflop_runs(sizes=6, spread=1.5, seed=seed),
                                      "baseline", bootstrap=150, seed=seed)  # fmt: skip
        lo, hi = section["comparisons"]["jtokm"]["compute_saving_ci"][1]
        covered += lo <= truth <= hi
    assert covered >= 10


def test_power_gives_the_smallest_detectable_gain_and_eta_slope_from_the_noise(tmp_path):
    sweep = write_results(tmp_path / "sweep", isoflop_runs() + eta_sweep_runs())
    result = run_fit(sweep, bootstrap=100, plots=False, noise=0.05)
    power = result["power"]
    assert power["sigma"] == 0.05 and power["sigma_source"] == "--noise"
    pairs = power["pairs"]  # 5 sizes x 3 budgets, one seed; the eta sweep's pairs left out
    base_loss = np.mean([r["final_val_loss"] for r in isoflop_runs() if r["eta"] == 0])
    assert pairs["n"] == 15 and pairs["baseline_loss"] == pytest.approx(base_loss)
    assert pairs["mde_gain"] == pytest.approx(2.8016 * math.sqrt(2) * 0.05 / math.sqrt(15)
                                              / base_loss, rel=1e-4)  # fmt: skip
    x = np.log2([4, 8, 16, 32, 64, 128])
    se = 0.05 / math.sqrt(float(((x - x.mean()) ** 2).sum()))  # sum = 17.5
    (law,) = power["eta_laws"]
    assert law["slope_se"] == pytest.approx(se) and law["mde_slope"] == pytest.approx(Z_DETECT * se)
    half = np.diff(result["isoflops"]["comparisons"]["jtokm"]["compute_saving_ci"][1])[0] / 2
    assert power["saving"]["mde"] == pytest.approx(2.8016 / 1.96 * half, rel=1e-4)
    report = (sweep / "REPORT_fit.md").read_text()
    assert "Power (two-sided alpha 0.05, power 0.8; one run's loss sd 0.0500 nats" in report
    assert f"{100 * pairs['mde_gain']:.1f}% ({pairs['mde']:.4f} nats; 15 pairs" in report
    silent = run_fit(sweep, bootstrap=0, plots=False, out=tmp_path / "silent")
    assert silent["power"]["sigma"] is None
    assert "no seed spread is known" in (tmp_path / "silent" / "REPORT_fit.md").read_text()


def test_power_measures_the_noise_from_repeated_seeds_when_none_is_given():
    base_offsets, diff_offsets = [-0.06, -0.02, 0.02, 0.06], [0.01, -0.01, 0.02, -0.02]
    runs = []
    for backbone, level in (("d32", 5.0), ("d64", 4.6)):
        for seed, (b, d) in enumerate(zip(base_offsets, diff_offsets, strict=True)):
            for variant, loss in (("baseline", level + b), ("jtokm", level + b - 0.05 + d)):
                runs.append({"variant": variant, "backbone": backbone, "budget": 1e12,
                             "tokens": 10**6, "eta": 0.0 if variant == "baseline" else 8.0,
                             "seed": seed, "labels": {"seed": f"s{seed}"},
                             "final_val_loss": loss})  # fmt: skip
    power = power_analysis(runs, paired_gains(runs, "baseline"), [], "baseline", "jtokm", None)
    # pooled over the 4 (variant, backbone) groups of 4 seeds: each has the baseline's spread
    # or that plus the difference's
    groups = [np.array(base_offsets), np.array(base_offsets) + diff_offsets] * 2
    pooled = math.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / 12)
    assert power["sigma"] == pytest.approx(pooled)
    assert power["sigma_source"] == "spread of repeated seeds (12 dof)"
    assert power["seed_spread"]["diff_sd"] == pytest.approx(np.std(diff_offsets, ddof=1))
    pairs = power["pairs"]  # 2 settings x 4 shared seeds
    assert pairs["n"] == 8 and pairs["sd_diff_source"] == "measured same-seed differences"
    assert pairs["mde"] == pytest.approx(Z_DETECT * np.std(diff_offsets, ddof=1) / math.sqrt(8))


def test_jtok_fit_passes_the_design_flags_through(tmp_path, capsys):
    sweep = write_results(tmp_path / "sweep", isoflop_runs(shift={BUDGETS[0]: 0.9}))
    assert main(["fit", str(sweep), "--json", "--no-plots", "--bootstrap", "20",
                 "--include-edge-minima", "--bootstrap-method", "parametric", "--no-paired",
                 "--params", "all"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["include_edge_minima"] and printed["params"] == "all"
    boot = printed["isoflops"]["bootstrap"]
    assert (boot["kind"], boot["paired"]) == ("parametric", False)
    assert len(printed["isoflops"]["frontiers"]["baseline"]["budgets"]) == 3
    assert main(["fit", str(sweep), "--no-plots", "--params", "non-embedding"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be counted without its embedding" in err


# ---- (3) parametric law ------------------------------------------------------------------
