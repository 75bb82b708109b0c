"""Retrofit (jtok.hf.retrofit): JTok / JTok-M attached to tiny random Llama, Qwen2 and Qwen3
models built from configs (nothing is downloaded).

Greedy ids are compared only where the reference's top-1 margin is clearly above float
noise (batched and single-sequence forwards differ in the last bits)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", minversion="5")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import jtok  # noqa: E402
from jtok.errors import JTokError  # noqa: E402
from jtok.hf.retrofit import (  # noqa: E402
    RetrofitError,
    RetrofitInputError,
    balance_loss,
    freeze_backbone,
    retrofit,
    retrofit_options,
    retrofit_tables,
)
from jtok.hf.retrofit_io import (  # noqa: E402
    OPTIONS_FILE,
    WEIGHTS_FILE,
    build_retrofit,
    load_retrofit,
    save_retrofit,
)

VOCAB, D, LAYERS, PAD = 96, 32, 2, 0
NOISE = 1e-4  # top-1 margins below this may flip between batch shapes
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),  # q/k norms
    "mistral": (MistralConfig, MistralForCausalLM, {}),
}


def tiny_hf(family: str = "llama", seed: int = 0, layers: int = LAYERS):
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(hidden_size=D, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                        max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1,
                        eos_token_id=None, tie_word_embeddings=False, **extra)  # fmt: skip
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # a sharper head: greedy choices with clear margins
        model.lm_head.weight.mul_(40.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def ids_of(batch=2, seq=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=gen)


def set_scales(model, value):
    with torch.no_grad():
        for mixer in retrofit_tables(model).mixers:
            mixer.scale.fill_(value)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# ---- init, equations, layers ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["jtok", "jtokm"])
def test_outputs_unchanged_at_init_and_changed_by_a_nonzero_scale(family, kind):
    model, ids = tiny_hf(family), ids_of()
    base = logits(model, ids)
    retrofit(model, kind, n_e=3, top_k=2)
    assert torch.equal(logits(model, ids), base)  # s = 0: bit-identical
    model.train()  # and with grad (JTok-M's autograd Functions), as training runs it
    assert torch.equal(model(input_ids=ids).logits.detach(), base)
    model.eval()
    set_scales(model, 1.0)
    assert (logits(model, ids) - base).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["jtok", "jtokm"])
def test_outputs_unchanged_at_init_in_bf16(kind):
    model, ids = tiny_hf().to(torch.bfloat16), ids_of()
    base = logits(model, ids)
    retrofit(model, kind)
    assert retrofit_tables(model).tables.weight.dtype == torch.float32  # tables stay fp32
    assert torch.equal(logits(model, ids), base)


def test_scale_init_option_sets_s():
    model, ids = tiny_hf(), ids_of()
    base = logits(model, ids)
    retrofit(model, "jtokm", scale_init=1e-2)
    assert all(bool((m.scale == 1e-2).all()) for m in retrofit_tables(model).mixers)
    small = (logits(model, ids) - base).abs().max()
    set_scales(model, 1.0)
    assert 0 < small < (logits(model, ids) - base).abs().max()


def _captures(layer):
    """Hooks on a decoder layer that record its input h, h~ and its output h'."""
    seen = {}
    layer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.__setitem__("h", args[0] if args else
                                                   kwargs["hidden_states"]),
        with_kwargs=True)  # fmt: skip
    layer.post_attention_layernorm.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("h_tilde", args[0])
    )
    layer.register_forward_hook(lambda mod, args, out: seen.__setitem__("out", out))
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_jtok_is_eq9_on_the_ffn_update(family):
    model, ids = tiny_hf(family), ids_of()
    retrofit(model, "jtok")
    set_scales(model, 3.0)
    tables = retrofit_tables(model)
    layer = model.model.layers[1]
    seen = _captures(layer)
    logits(model, ids)
    with torch.no_grad():
        m = layer.mlp.forward(layer.post_attention_layernorm(seen["h_tilde"]))  # no hooks
        rows = tables.tables.layer_weight(1)[ids][:, :, 0]  # E_l[x]
        u = rows / (rows.norm(dim=-1, keepdim=True) + 1e-6)  # Eq 7
        expected = seen["h_tilde"] + m * (1 + 3.0 * u)  # Eq 8-9
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_jtokm_is_eq13_routed_on_the_layer_input(family):
    model, ids = tiny_hf(family), ids_of()
    retrofit(model, "jtokm", n_e=4, top_k=2)
    set_scales(model, 2.0)
    tables = retrofit_tables(model)
    layer, mixer = model.model.layers[1], tables.mixers[1]
    seen = _captures(layer)
    logits(model, ids)
    with torch.no_grad():
        h, h_tilde = seen["h"], seen["h_tilde"]
        m = layer.mlp.forward(layer.post_attention_layernorm(h_tilde))
        eps = model.config.rms_norm_eps
        g = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)) @ mixer.router.t()  # Eq 10
        top, index = g.topk(2, dim=-1)
        w = torch.sigmoid(top) / torch.sigmoid(top).sum(-1, keepdim=True)  # Eq 11
        rows = tables.tables.layer_weight(1)[ids]  # (B, T, n_e, d)
        e = (w[..., None] * rows.gather(2, index[..., None].expand(-1, -1, -1, D))).sum(2)
        r = 2.0 * e / (e.norm(dim=-1, keepdim=True) + 1e-6) / math.sqrt(2 * LAYERS)  # Eq 12-13
        expected = h_tilde + m + r
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)


def test_only_the_listed_layers_carry_tables():
    model, ids = tiny_hf(layers=3), ids_of()
    with torch.no_grad():
        base = model(input_ids=ids, output_hidden_states=True).hidden_states
    retrofit(model, "jtokm", layers=[1])
    assert retrofit_tables(model).layers == [1] and len(retrofit_tables(model).mixers) == 1
    set_scales(model, 5.0)
    with torch.no_grad():
        now = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(now[1], base[1])  # after layer 0: untouched
    assert (now[2] - base[2]).abs().max() > 1e-3  # after layer 1: modulated


# ---- inputs, generation ----------------------------------------------------------------


def test_inputs_embeds_alone_is_refused():
    model = tiny_hf()
    retrofit(model, "jtok")
    embeds = model.get_input_embeddings()(ids_of())
    with pytest.raises(RetrofitInputError, match="input_ids") as info:
        model(inputs_embeds=embeds)
    assert isinstance(info.value, JTokError)


def _greedy_without_cache(model, prompt, steps):
    """Reference: the full sequence recomputed at every step (no KV cache)."""
    ids, margins = prompt[None], []
    for _ in range(steps):
        last = logits(model, ids, use_cache=False)[0, -1]
        top = last.topk(2).values
        margins.append(float(top[0] - top[1]))
        ids = torch.cat((ids, last.argmax()[None, None]), dim=1)
    return ids[0, len(prompt) :], min(margins)


def _greedy_scores(model, prompt, steps=6):
    with torch.no_grad():
        out = model.generate(prompt[None], max_new_tokens=steps, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)  # fmt: skip
    return out.scores


@pytest.mark.parametrize("family,kind", [("llama", "jtokm"), ("qwen2", "jtok"),
                                         ("qwen3", "jtokm")])  # fmt: skip
def test_greedy_generate_batched_left_padded_equals_one_by_one(family, kind):
    model = tiny_hf(family)
    base_prompt = ids_of(1, 7, seed=3)[0]
    with torch.no_grad():
        plain = _greedy_scores(model, base_prompt)
    retrofit(model, kind, n_e=3, top_k=2)
    set_scales(model, math.sqrt(D))  # s u of unit RMS per element: a strong modulation
    prompts = [ids_of(1, n, seed=n)[0] for n in (7, 3, 5)]
    steps = 6
    expected = []
    for prompt in prompts:
        reference, margin = _greedy_without_cache(model, prompt, steps)
        assert margin > NOISE, "the test model needs clear top-1 margins"
        with torch.no_grad():
            alone = model.generate(prompt[None], max_new_tokens=steps, do_sample=False)
        assert torch.equal(alone[0, len(prompt) :], reference)  # KV-cache decoding
        expected.append(reference)
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    with torch.no_grad():
        out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=steps,
                             do_sample=False)  # fmt: skip
    for row, reference in enumerate(expected):
        assert torch.equal(out[row, width:], reference)
    # The tables act at every step, the decode steps (one token, from the cache) included.
    now = _greedy_scores(model, base_prompt)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(now, plain, strict=True))


# ---- training with a frozen backbone --------------------------------------------------------


def _train_steps(model, steps, ids, host=False):
    from jtok.config import TrainConfig
    from jtok.training.optim import Optimizers

    optimizers = Optimizers(model, TrainConfig(lr=1e-2, schedule="constant", warmup_steps=0))
    store = retrofit_tables(model).tables
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        aux = balance_loss(model)
        (out.loss + (aux if aux is not None else 0.0)).backward()
        if host:
            pulled = store.pull_gradients()
            with store.step_lock():
                optimizers.step()
            store.after_step(pulled)
        else:
            optimizers.step()
        optimizers.zero_grad()
    return optimizers


@pytest.mark.parametrize("family,kind", [("llama", "jtokm"), ("qwen2", "jtok"),
                                         ("qwen3", "jtokm")])  # fmt: skip
def test_frozen_backbone_training_changes_only_tables_routers_scales(family, kind):
    from jtok.training.optim import parameter_roles

    model, ids = tiny_hf(family), ids_of(4, 16)
    retrofit(model, kind, n_e=3, top_k=2)
    assert freeze_backbone(model) == len(list(model.parameters())) - len(
        list(retrofit_tables(model).parameters())
    )
    model.train()
    roles = {name: role for name, _, role in parameter_roles(model)}
    expected_roles = {"jtok_retrofit.tables.weight": "table"}
    for i in range(LAYERS):
        expected_roles[f"jtok_retrofit.mixers.{i}.scale"] = "scale"  # train.scale_lr_mult
        if kind == "jtokm":
            expected_roles[f"jtok_retrofit.mixers.{i}.router"] = "router"
    assert roles == expected_roles
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = retrofit_tables(model).tables.weight

    _train_steps(model, 1, ids)  # s = 0: the first step moves s only
    assert torch.equal(table, before["jtok_retrofit.tables.weight"])
    assert all(not torch.equal(m.scale, before[f"jtok_retrofit.mixers.{i}.scale"])
               for i, m in enumerate(retrofit_tables(model).mixers))  # fmt: skip
    _train_steps(model, 2, ids)  # now the tables (and routers) learn too
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == set(expected_roles)
    aux = balance_loss(model)  # of the last (training) forward
    assert aux is None if kind == "jtok" else (aux.requires_grad and float(aux.detach()) > 0)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model, ids = tiny_hf(), ids_of(2, 10)
        retrofit(model, "jtokm", n_e=3, scale_init=0.5)
        freeze_backbone(model)
        model.train()
        if checkpointing:  # transformers recomputes each layer's forward in backward
            model.activation_checkpointing_enable()
        (model(input_ids=ids, labels=ids).loss + balance_loss(model)).backward()
        grads.append({n: p.grad.to_dense() for n, p in retrofit_tables(model).named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0 and torch.equal(grads[1][name], grad), name


def test_host_training_steps_equal_device_training_steps():
    ids = ids_of(4, 16)
    trained = {}
    for placement in ("device", "host"):
        model = tiny_hf()
        retrofit(model, "jtokm", n_e=3, table_placement=placement, scale_init=1e-2)
        freeze_backbone(model)
        model.train()
        _train_steps(model, 3, ids, host=placement == "host")
        trained[placement] = retrofit_tables(model).state_dict()
    for name, value in trained["device"].items():
        torch.testing.assert_close(trained["host"][name], value, atol=1e-6, rtol=1e-6)


# ---- placement, save and load --------------------------------------------------------------


def test_host_placement_gives_the_device_placements_logits():
    ids = ids_of()
    results = []
    for placement in ("device", "host"):
        model = tiny_hf()
        retrofit(model, "jtokm", n_e=3, table_placement=placement)
        set_scales(model, 4.0)
        assert retrofit_tables(model).tables.placement == placement
        results.append(logits(model, ids))
    assert torch.equal(results[0], results[1])
    assert "jtok_retrofit.tables.weight" not in dict(model.named_parameters())  # host: off


@pytest.mark.parametrize("family,kind", [("llama", "jtokm"), ("qwen3", "jtok")])
def test_save_and_load_round_trip_gives_equal_logits(family, kind, tmp_path):
    model, ids = tiny_hf(family), ids_of()
    base = logits(model, ids)
    retrofit(model, kind, n_e=3, layers=[0, 1], seed=7)
    set_scales(model, 2.5)
    with torch.no_grad():
        for mixer in retrofit_tables(model).mixers:
            mixer.scale.add_(torch.randn(D) * 0.1)
    want = logits(model, ids)
    out = save_retrofit(model, tmp_path / "retro")
    assert (out / WEIGHTS_FILE).is_file() and (out / OPTIONS_FILE).is_file()
    loaded = load_retrofit(out)
    assert retrofit_options(loaded) == retrofit_options(model)
    assert torch.equal(logits(loaded, ids), want)
    host = load_retrofit(out, table_placement="host")
    assert torch.equal(logits(host, ids), want)
    # The directory is still a plain HF model for transformers (the backbone alone).
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert torch.equal(logits(plain, ids), base)
    with pytest.raises(RetrofitError, match="not empty"):
        save_retrofit(model, out)
    save_retrofit(loaded, out, overwrite=True)
    assert torch.equal(logits(load_retrofit(out), ids), want)


def test_retrofit_options_rebuild_the_same_initial_model():
    ids = ids_of()
    first = retrofit(tiny_hf(), "jtokm", n_e=4, top_k=3, scale_init=0.5, seed=3)
    again = retrofit(tiny_hf(), **retrofit_options(first))
    assert torch.equal(logits(first, ids), logits(again, ids))
    import json

    assert json.loads(json.dumps(retrofit_options(first))) == retrofit_options(first)


def test_build_retrofit_from_a_config_or_a_directory(tmp_path):
    config = tiny_hf("qwen2").config
    model = build_retrofit(config, {"kind": "jtok", "layers": [1]})
    assert retrofit_options(model)["layers"] == [1]
    model.save_pretrained(tmp_path / "plain")
    again = build_retrofit(tmp_path / "plain", retrofit_options(model))
    ids = ids_of()
    assert torch.equal(logits(again, ids), logits(model, ids))
    with pytest.raises(RetrofitError, match="unknown retrofit option 'colour'"):
        build_retrofit(config, {"kind": "jtok", "colour": "blue"})
    with pytest.raises(RetrofitError, match="not a Hugging Face model directory"):
        build_retrofit(tmp_path / "nowhere", {"kind": "jtok"})


def test_a_deep_copy_reads_its_own_tables():
    model, ids = tiny_hf(), ids_of()
    retrofit(model, "jtok")
    twin = copy.deepcopy(model)
    set_scales(twin, 2.0)
    assert torch.equal(logits(model, ids), logits(tiny_hf(), ids))  # still s = 0
    assert not torch.equal(logits(twin, ids), logits(model, ids))


def test_refusals():
    model = tiny_hf()
    with pytest.raises(RetrofitError, match="kind"):
        retrofit(model, "moe")
    with pytest.raises(RetrofitError, match="table_placement"):
        retrofit(model, "jtok", table_placement="sharded")
    with pytest.raises(JTokError, match="tokmod.layers"):
        retrofit(model, "jtok", layers=[LAYERS])
    retrofit(model, "jtok")
    with pytest.raises(RetrofitError, match="already"):
        retrofit(model, "jtok")
    other = torch.nn.Linear(2, 2)
    other.config = type("Config", (), {"model_type": "gpt2"})()
    with pytest.raises(RetrofitError, match="gpt2"):
        retrofit(other, "jtok")


def test_lazy_top_level_name():
    assert jtok.retrofit is retrofit
    # jtok itself must not import transformers.
    import subprocess
    import sys

    code = "import sys, jtok; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cross_entropy_unchanged_at_init():
    # The HF loss path (labels) is the same function of the same logits.
    model, ids = tiny_hf("qwen2"), ids_of()
    with torch.no_grad():
        base = model(input_ids=ids, labels=ids).loss
    retrofit(model, "jtokm")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, labels=ids).loss, base)
        ref = F.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB),
                              ids[:, 1:].reshape(-1))  # fmt: skip
    torch.testing.assert_close(base, ref)
