"""Training runs of retrofitted HF models: jtok train --init-from-hf, the run record,
resume, eval, generate, export (jtok.hf.retrofit_run, jtok.hf.retrofit_export)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from jtok.cli import main  # noqa: E402
from jtok.hf.retrofit import ATTRIBUTE  # noqa: E402
from jtok.hf.retrofit_io import load_retrofit  # noqa: E402
from jtok.hf.retrofit_run import RetrofitLM, RetrofitRunConfig, init_run_config  # noqa: E402
from jtok.run import checkpoint as ckpt  # noqa: E402
from jtok.run.files import RETROFIT_RECORD_KEY  # noqa: E402
from jtok.run.rundir import load_run, read_metrics, saved_run_config  # noqa: E402
from jtok.training.loop import train  # noqa: E402
from jtok.training.optim import parameter_roles  # noqa: E402

VOCAB = 320  # the tiny_data fixture's


def _save_hf(path, family: str, vocab: int = VOCAB):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg = LlamaConfig(**common) if family == "llama" else Qwen3Config(**common, head_dim=8)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save_hf(tmp_path_factory.mktemp("hf") / "llama", "llama")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return _save_hf(tmp_path_factory.mktemp("hf") / "qwen3", "qwen3")


def _sets(data, **extra):
    train = dict(data=str(data), seq_len=32, batch_size=4, steps=3, lr=3e-3, warmup_steps=1,
                 eval_tokens=256, save_every=100, eval_every=0, log_every=1)
    train.update(extra)
    return {f"train.{k}": str(v) for k, v in train.items()}


def _config(hf_dir, data, kind="jtokm", **extra):
    return init_run_config(hf_dir, {"tokmod.kind": kind, "tokmod.n_e": "4",
                                    **_sets(data, **extra)})


def _weights(run_dir):
    return load_file(ckpt.latest_checkpoint(run_dir) / ckpt.MODEL_FILE)


def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_step0_outputs_equal_the_hf_models(llama_dir, qwen_dir, tiny_data):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    for hf_dir, kind in ((llama_dir, "jtokm"), (qwen_dir, "jtok")):
        plain = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        model = _config(hf_dir, tiny_data, kind).build_model("cpu", from_source=True).eval()
        assert isinstance(model, RetrofitLM)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, plain(input_ids=ids).logits)


def test_record_roles_and_overrides(llama_dir, tiny_data):
    cfg = _config(llama_dir, tiny_data, **{"freeze_backbone": "true"})
    record = cfg.to_dict()
    assert set(record) == {RETROFIT_RECORD_KEY, "train"}
    assert record[RETROFIT_RECORD_KEY]["hf_config"]["model_type"] == "llama"
    assert record[RETROFIT_RECORD_KEY]["options"]["n_e"] == 4
    assert RetrofitRunConfig.from_dict(json.loads(json.dumps(record))).to_dict() == record
    # Everything trains: every parameter has a role; the scales have their own.
    full = _config(llama_dir, tiny_data).build_model("cpu", from_source=True)
    roles = {name: role for name, _, role in parameter_roles(full)}
    assert roles["hf.model.embed_tokens.weight"] == "embedding"
    assert roles["hf.lm_head.weight"] == "embedding"
    assert roles["hf.model.norm.weight"] == "norm"
    assert roles["hf.model.layers.0.mlp.up_proj.weight"] == "matrix"
    assert roles[f"hf.{ATTRIBUTE}.mixers.0.scale"] == "scale"
    assert roles[f"hf.{ATTRIBUTE}.mixers.0.router"] == "router"
    # Frozen: only the tables, routers and scales.
    frozen = cfg.build_model("cpu", from_source=True)
    assert all(ATTRIBUTE in name for name, _, _ in parameter_roles(frozen))


def test_frozen_trains_only_tables_routers_scales(llama_dir, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(_config(llama_dir, tiny_data, freeze_backbone="true"), run, progress=False)
    source = load_file(llama_dir / "model.safetensors")
    after = _weights(run)
    for name, value in source.items():
        assert torch.equal(after[name], value), name
    changed = {k for k in after if k.startswith(ATTRIBUTE)
               and not torch.equal(after[k], _initial(llama_dir, tiny_data)[k])}
    assert f"{ATTRIBUTE}.mixers.0.scale" in changed
    assert f"{ATTRIBUTE}.mixers.0.router" in changed
    assert f"{ATTRIBUTE}.tables.weight" in changed


_INITIAL: dict = {}


def _initial(hf_dir, data):
    if hf_dir not in _INITIAL:
        model = _config(hf_dir, data).build_model("cpu", from_source=True)
        _INITIAL[hf_dir] = {k: v.clone() for k, v in model.state_dict().items()}
    return _INITIAL[hf_dir]


def test_unfrozen_trains_the_backbone_too(qwen_dir, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(_config(qwen_dir, tiny_data, "jtok"), run, progress=False)
    source = load_file(qwen_dir / "model.safetensors")
    after = _weights(run)
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"],
                           source["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(after["model.norm.weight"], source["model.norm.weight"])
    assert not torch.equal(after[f"{ATTRIBUTE}.mixers.1.scale"],
                           torch.zeros_like(after[f"{ATTRIBUTE}.mixers.1.scale"]))


def test_resume_is_exact(llama_dir, tiny_data, tmp_path):
    common = dict(schedule="constant", save_every=4)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_config(llama_dir, tiny_data, steps=8, **common), straight, progress=False)
    train(_config(llama_dir, tiny_data, steps=4, **common), split, progress=False)
    resumed = saved_run_config(split).with_overrides({"train.steps": 8})
    train(resumed, split, resume=True, progress=False)

    def losses(run):
        return [r["loss"] for r in read_metrics(run) if "loss" in r]

    assert len(losses(straight)) == 8
    assert losses(split) == losses(straight)
    a, b = _weights(straight), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained_run(llama_dir, tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("retrofit_runs") / "run"
    code = main(["train", "--init-from-hf", str(llama_dir), "--set", "tokmod.kind=jtokm",
                 "--set", "tokmod.n_e=4", "--set", "tokmod.layers=1", "--out", str(run),
                 "--no-progress",
                 *[a for k, v in _sets(tiny_data, steps=4).items() for a in ("--set", f"{k}={v}")]])
    assert code == 0
    return run


def test_eval_generate_sample_from_the_run(trained_run, capsys):
    code, out, err = _cli(["eval", "--run", trained_run, "--json", "--max-tokens", 256], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["step"] == 4 and report["tokens"] == 256 and report["loss"] > 0

    prompts = trained_run.parent / "prompts.txt"
    prompts.write_text("the king\nlove and war of the sea went\nday\n")
    base = ["generate", "--run", trained_run, "--prompts", prompts, "--max-new-tokens", 6, "--json"]
    code, out, err = _cli(base, capsys)
    assert code == 0, err
    batched = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt_tokens"] > 0 for r in batched] == [True] * 3
    # Batched left-padded greedy equals one prompt at a time.
    code, out, _ = _cli([*base, "--batch-size", 1], capsys)
    assert [json.loads(line)["completion_ids"] for line in out.splitlines()] == [
        r["completion_ids"] for r in batched]
    # Greedy equals HF generate on the run's model.
    _, model, _ = load_run(trained_run)
    from jtok.data import load_tokenizer

    tok = load_tokenizer(trained_run / "tokenizer.json")
    ids = torch.tensor([tok.encode("the king").ids])
    hf_out = model.hf.generate(input_ids=ids, max_new_tokens=6, do_sample=False, top_k=None,
                               top_p=None, temperature=None, eos_token_id=None)
    if batched[0]["stop"] == "max_new_tokens":
        assert hf_out[0, ids.shape[1]:].tolist() == batched[0]["completion_ids"]
    # Sampling: prompt i's draws do not depend on the batch.
    sampled = [*base, "--temperature", 1.0, "--seed", 3]
    code, out_a, _ = _cli(sampled, capsys)
    code, out_b, _ = _cli([*sampled, "--batch-size", 1], capsys)
    assert code == 0 and out_a == out_b
    code, out, err = _cli(["sample", "--run", trained_run, "--prompt", "the king",
                           "--max-tokens", 4, "--temperature", 0], capsys)
    assert code == 0, err
    assert out.startswith("the king")


def _refused_by_every_config_reader(config, tmp_path, capsys, *needles):
    """info, config, bench and train --config each refuse `config` in one line naming it
    (`needles`), never as "unknown key", and train creates nothing."""
    for argv in (["info", "--config", config], ["config", "--config", config],
                 ["bench", "--config", config],
                 ["train", "--config", config, "--out", tmp_path / "new"]):  # fmt: skip
        code, _, err = _cli(argv, capsys)
        assert code == 2 and all(n in err for n in needles), (argv, err)
        assert len(err.splitlines()) == 1 and "unknown key" not in err
    assert not (tmp_path / "new").exists()


def test_commands_reading_jtok_configs_name_a_retrofit_runs_config(trained_run, tmp_path,
                                                                    capsys):  # fmt: skip
    _refused_by_every_config_reader(trained_run / "config.json", tmp_path, capsys,
                                    "retrofitted Hugging Face model")  # fmt: skip


def test_commands_reading_jtok_configs_name_a_hugging_face_config(llama_dir, tmp_path,
                                                                   capsys):  # fmt: skip
    _refused_by_every_config_reader(llama_dir / "config.json", tmp_path, capsys,
                                    "a Hugging Face model's config (model_type 'llama')",
                                    "--init-from-hf")  # fmt: skip


def test_batches_within_the_context():
    from jtok.hf.retrofit_run import _within_context

    prompts = [[0] * 60, [0] * 50, [0] * 40]
    assert list(_within_context([0, 1, 2], 3, prompts, [4, 4, 4], 64)) == [[0, 1, 2]]
    assert list(_within_context([0, 1, 2], 2, prompts, [4, 4, 4], 64)) == [[0, 1], [2]]
    # Budgets to the context: 60 + 14 > 64, so the 50-token prompt starts a new batch;
    # 50 + 20 > 64 again.
    assert list(_within_context([0, 1, 2], 3, prompts, [4, 14, 24], 64)) == [[0], [1], [2]]
    assert list(_within_context([0, 1, 2], 3, prompts, [4, 4, 14], 64)) == [[0, 1], [2]]


def test_batched_generation_never_runs_past_the_context(trained_run):
    """Prompts of mixed lengths whose budgets reach the context: every HF generate call
    stays within it (a long prompt is not batched with a short one's larger budget), and
    the ids equal one prompt at a time."""
    _, model, _ = load_run(trained_run)
    context = model.cfg.max_seq_len
    prompts = [[5] * (context - 3), [6, 7], [8] * (context // 2), [9] * (context - 1)]
    calls = []
    generate = model.hf.generate

    def recording(**kwargs):
        calls.append(kwargs["input_ids"].shape[1] + kwargs["generation_config"].max_new_tokens)
        return generate(**kwargs)

    model.hf.generate = recording
    stops = [frozenset()] * len(prompts)
    batched = model.generate_batch(prompts, 10_000, 0.0, 0, 1.0, 0, stops, None)
    assert calls and max(calls) <= context
    assert [len(p) + len(new) for p, new in zip(prompts, batched, strict=True)] == [context] * 4
    one_by_one = model.generate_batch(prompts, 10_000, 0.0, 0, 1.0, 0, stops, 1)
    assert batched == one_by_one


def test_export_loads_with_load_retrofit(trained_run, tmp_path, capsys):
    out_dir = tmp_path / "export"
    code, _, err = _cli(["export", "--run", trained_run, "--out", out_dir], capsys)
    assert code == 0, err
    loaded = load_retrofit(out_dir).eval()
    _, model, _ = load_run(trained_run)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(ids).logits)
    assert (out_dir / "tokenizer.json").is_file()
    capsys.readouterr()  # transformers' loading progress bar
    # A second export refuses a non-empty --out without --overwrite; with it, replaces.
    code, _, err = _cli(["export", "--run", trained_run, "--out", out_dir], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = _cli(["export", "--run", trained_run, "--out", out_dir, "--overwrite"],
                        capsys)
    assert code == 0, err


def test_bad_input_is_one_line(llama_dir, tiny_data, tmp_path, capsys):
    wrong_vocab = _save_hf(tmp_path / "v400", "llama", vocab=400)  # no tokenizer to compare
    too_small = _save_hf(tmp_path / "v300", "llama", vocab=300)
    # The same vocabulary size, two ids swapped: another tokenizer.
    other_tokenizer = _save_hf(tmp_path / "other", "llama", vocab=336)
    tok = json.loads((tiny_data / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other_tokenizer / "tokenizer.json").write_text(json.dumps(tok))
    not_hf = tmp_path / "not_hf"
    not_hf.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    (broken / "model.safetensors").write_bytes(b"")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((llama_dir / "config.json").read_text())
    cases = [
        (wrong_vocab, ["--set", "tokmod.kind=jtokm"], "vocabulary of 320"),
        (too_small, ["--set", "tokmod.kind=jtokm"], "embedding has 300 rows"),
        (other_tokenizer, ["--set", "tokmod.kind=jtokm"], "another tokenizer"),
        (tmp_path / "missing", ["--set", "tokmod.kind=jtokm"], "no such directory"),
        (not_hf, ["--set", "tokmod.kind=jtokm"], "no config.json"),
        (broken, ["--set", "tokmod.kind=jtokm"], "does not load"),
        (no_weights, ["--set", "tokmod.kind=jtokm"], "holds no weights"),
        (llama_dir, [], "tokmod.kind"),
        (llama_dir, ["--set", "tokmod.kind=jtokm", "--set", "model.d_model=64"], "model.d_model"),
        (llama_dir, ["--set", "tokmod.kind=jtokm", "--set", "tokmod.layers=5"], "layers"),
        (llama_dir, ["--set", "tokmod.kind=jtokm", "--preset", "tiny"], "--preset"),
    ]
    capsys.readouterr()  # transformers' saving progress bar
    for i, (hf_dir, extra, needle) in enumerate(cases):
        out = tmp_path / f"run{i}"
        code, _, err = _cli(["train", "--init-from-hf", hf_dir, "--data", tiny_data, "--out",
                             out, "--no-progress", *extra], capsys)
        assert code == 2, (needle, err)
        assert len(err.strip().splitlines()) == 1, err
        assert needle in err, err
        assert not out.exists()  # nothing written
    # A native run cannot freeze a backbone.
    code, _, err = _cli(["train", "--preset", "tiny", "--data", tiny_data, "--out",
                         tmp_path / "native", "--set", "train.freeze_backbone=true"], capsys)
    assert code == 2 and "freeze_backbone" in err and len(err.strip().splitlines()) == 1


def test_a_padded_vocabulary_with_the_datas_tokenizer_is_accepted(tiny_data, tmp_path):
    """Qwen-style: the embedding has more rows (336) than the tokenizer has tokens (320);
    the HF directory's tokenizer is the data's, so the ids mean the same tokens."""
    padded = _save_hf(tmp_path / "padded", "llama", vocab=VOCAB + 16)
    shutil.copy(tiny_data / "tokenizer.json", padded / "tokenizer.json")
    run = tmp_path / "run"
    train(_config(padded, tiny_data, steps=1), run, progress=False, log=lambda m: None)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1]


def test_host_tables_train_as_device_tables(llama_dir, tiny_data, tmp_path):
    """train.table_placement=host: pull_gradients / step_lock / after_step and the rows
    fetched ahead; the same losses and weights as device tables."""
    runs = {}
    for placement in ("device", "host"):
        runs[placement] = tmp_path / placement
        # adam_eps 1e-6: see test_two_process_torchrun_matches_single_process_training.
        train(_config(llama_dir, tiny_data, steps=4, table_placement=placement,
                      adam_eps=1e-6), runs[placement], progress=False)  # fmt: skip
    losses = {p: [r["loss"] for r in read_metrics(run) if "loss" in r] for p, run in runs.items()}
    assert losses["host"] == pytest.approx(losses["device"], rel=1e-5, abs=1e-6)
    a, b = _weights(runs["device"]), _weights(runs["host"])
    assert set(a) == set(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_lm_eval_tasks_on_a_retrofitted_run(trained_run, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from test_lm_eval import ITEMS, TASK, write_task

    write_task(tmp_path)
    code, out, err = _cli(["eval", "--run", trained_run, "--tasks", TASK, "--include-path",
                           tmp_path, "--json"], capsys)  # fmt: skip
    assert code == 0, err
    row = json.loads(out)["tasks"][TASK]
    assert row["n"] == len(ITEMS) and 0 <= row["acc"] <= 1


def test_a_resume_that_changes_the_retrofit_options_is_refused_without_circular_advice(
        trained_run, capsys):  # fmt: skip
    # The options are fixed for the run: no "--allow-change retrofit.options.n_e" hint (that
    # key is no --allow-change key at all).
    code, _, err = _cli(["train", "--out", trained_run, "--resume", "--no-progress",
                         "--set", "tokmod.n_e=8"], capsys)  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "retrofit.options.n_e" in err and "fixed for its run" in err, err
    assert "--allow-change" not in err


def test_a_resume_may_not_freeze_or_unfreeze_the_backbone(trained_run, capsys):
    """Frozen parameters have no optimizer state, so the checkpoint's would not load: the
    resume used to rewrite config.json and run.json first, and every later resume failed."""
    files = {p: p.read_bytes() for p in (trained_run / "config.json", trained_run / "run.json")}
    code, _, err = _cli(["train", "--out", trained_run, "--resume", "--no-progress",
                         "--set", "train.freeze_backbone=true", "--set", "train.steps=5",
                         "--allow-change", "train.freeze_backbone"], capsys)  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "train.freeze_backbone" in err and "optimizer state would not fit" in err, err
    assert all(path.read_bytes() == data for path, data in files.items())


def test_export_overwrite_refuses_a_plain_hugging_face_model(trained_run, llama_dir,
                                                             tmp_path, capsys):  # fmt: skip
    """The run's own source model has an export's file names; --overwrite used to replace
    its weights."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(llama_dir, source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    code, _, err = _cli(["export", "--run", trained_run, "--out", source, "--overwrite"], capsys)
    assert code == 2 and "not a jtok export" in err and len(err.splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    earlier = tmp_path / "export"  # an earlier export is still replaced
    assert _cli(["export", "--run", trained_run, "--out", earlier], capsys)[0] == 0
    assert _cli(["export", "--run", trained_run, "--out", earlier, "--overwrite"], capsys)[0] == 0


def test_init_from_hf_refuses_a_retrofit_export(trained_run, tmp_path, capsys, tiny_data):
    """Its trained tables used to be dropped without a word: the new run started fresh."""
    export = tmp_path / "export"
    assert _cli(["export", "--run", trained_run, "--out", export], capsys)[0] == 0
    code, _, err = _cli(["train", "--init-from-hf", export, "--set", "tokmod.kind=jtokm",
                         "--set", f"train.data={tiny_data}", "--out", tmp_path / "new"],
                        capsys)  # fmt: skip
    assert code == 2 and "retrofit with trained tables" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("key, value, message", [
    ("train.table_placement", "sharded", "not 'sharded'"),
    ("train.compile", "true", "train.compile: not supported for a retrofitted model"),
])  # fmt: skip
def test_unsupported_training_settings_are_refused(llama_dir, tiny_data, tmp_path, capsys,
                                                   key, value, message):  # fmt: skip
    code, _, err = _cli(["train", "--init-from-hf", llama_dir, "--set", "tokmod.kind=jtokm",
                         "--set", f"train.data={tiny_data}", "--set", f"{key}={value}",
                         "--out", tmp_path / "run"], capsys)  # fmt: skip
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
