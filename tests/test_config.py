import dataclasses
import json

import pytest

from jtok.config import ConfigError, ModelConfig, MoEConfig, TokModConfig
from jtok.flops import count_params
from jtok.nn.model import build_model
from jtok.presets import PRESETS, preset


def test_json_round_trip_preserves_every_field():
    cfg = preset("tiny-moe").with_overrides(
        {"tokmod.kind": "jtokm", "tokmod.layers": "0", "moe.score_func": "sigmoid"}
    )
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["tokmod"]["layers"] == [0]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_heads": "5"}, "n_heads"),  # does not divide d_model=64
        ({"n_kv_heads": "3"}, "n_kv_heads"),  # does not divide n_heads
        ({"d_model": "0"}, "d_model"),
        ({"vocab_size": "-3"}, "vocab_size"),
        ({"tokmod.kind": "jtokm", "tokmod.top_k": "6"}, "tokmod.top_k"),  # K > n_e
        ({"tokmod.n_e": "0"}, "tokmod.n_e"),
        ({"tokmod.kind": "both"}, "tokmod.kind"),
        ({"tokmod.layers": "[0, 5]"}, "tokmod.layers"),  # out of range for 2 layers
        ({"tokmod.layers": "[1, 1]"}, "tokmod.layers"),
        ({"tokmod.kind": "jtokm", "tokmod.layers": "[]"}, "tokmod.layers"),  # no table at all
        ({"tokmod.eps": "0"}, "tokmod.eps"),
        ({"moe.num_experts": "2", "moe.top_k": "3", "moe.expert_hidden": "8"}, "moe.top_k"),
        ({"moe.num_experts": "2", "moe.expert_hidden": "0"}, "moe.expert_hidden"),
        ({"moe.score_func": "relu"}, "moe.score_func"),
        ({"moe.balance": "magic"}, "moe.balance"),
        ({"tie_embeddings": "sometimes"}, "tie_embeddings"),
        ({"n_layers": "2.5"}, "n_layers"),
        ({"colour": "red"}, "colour"),
        ({"tokmod.colour": "red"}, "tokmod.colour"),
    ],
)
def test_invalid_values_raise_an_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        preset("tiny").with_overrides(overrides)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_unknown_keys_in_json_are_rejected_with_their_path():
    data = preset("tiny").to_dict()
    data["moe"]["experts"] = 4
    with pytest.raises(ConfigError, match=r"^moe\.experts:"):
        ModelConfig.from_dict(data)
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json("{not json")


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match=r"^tokmod\.top_k:"):
        ModelConfig(tokmod=TokModConfig(kind="jtokm", n_e=2, top_k=3))
    with pytest.raises(ConfigError, match=r"^moe\.top_k:"):
        ModelConfig(moe=MoEConfig(num_experts=4, top_k=5, expert_hidden=8))


def test_command_line_values_are_parsed_to_field_types():
    cfg = preset("tiny").with_overrides({
        "tokmod.kind": "jtokm", "tokmod.layers": "0,1", "tokmod.aux_weight": "1e-3",
        "tie_embeddings": "true", "rope_base": "500000", "tokmod.dedup": "false",
    })  # fmt: skip
    assert cfg.tokmod.layers == [0, 1] and cfg.tokmod.aux_weight == 1e-3
    assert cfg.tie_embeddings is True and cfg.tokmod.dedup is False
    assert isinstance(cfg.rope_base, float) and cfg.rope_base == 5e5
    assert preset("tiny").with_overrides({"tokmod.layers": "1"}).tokmod.layers == [1]
    assert preset("tiny").with_overrides({"tokmod.layers": "all"}).tokmod.layers is None


def test_overrides_do_not_mutate_the_original():
    base = preset("tiny")
    base.with_overrides({"tokmod.kind": "jtok", "d_model": "128"})
    assert base.tokmod.kind == "none" and base.d_model == 64


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta_and_matches_the_accounting(name):
    cfg = preset(name)
    model = build_model(cfg, device="meta")
    counts = count_params(cfg)
    tables = 0 if model.token_tables is None else model.token_tables.weight.numel()
    backbone = sum(p.numel() for p in model.parameters()) - tables
    assert backbone == counts.backbone
    assert tables == counts.token_params
    assert all(p.is_meta for p in model.parameters())


def test_paper_scale_presets_have_the_papers_sizes():
    dense = count_params(preset("dense-190m").with_overrides({"tokmod.kind": "jtok"}))
    assert abs(dense.backbone - 190e6) / 190e6 < 0.01
    assert abs(dense.token_params - 460e6) / 460e6 < 0.01  # "+ 460M JTok params"
    moe = count_params(preset("moe-17b-a2b"))
    assert abs(moe.backbone - 17e9) / 17e9 < 0.02
    assert abs(moe.token_params - 43.6e9) / 43.6e9 < 0.005


def test_every_float_field_refuses_nan_and_inf_naming_it():
    from jtok.config import RunConfig, TrainConfig

    nan, inf = float("nan"), float("inf")
    with pytest.raises(ConfigError, match=r"^lr: must be a finite number, got nan$"):
        TrainConfig(lr=nan)
    with pytest.raises(ConfigError, match=r"^tokmod\.eps: must be a finite number, got inf$"):
        ModelConfig(tokmod=TokModConfig(eps=inf))
    with pytest.raises(ConfigError, match=r"^moe\.aux_weight: must be a finite"):
        ModelConfig(moe=MoEConfig(aux_weight=-inf))
    with pytest.raises(ConfigError, match=r"^model\.rope_base: must be a finite"):
        RunConfig.from_json('{"model": {"rope_base": Infinity}}')
    floats = [f.name for f in dataclasses.fields(TrainConfig) if f.type in ("float", float)]
    assert "lr" in floats and "table_lr_mult" in floats and len(floats) >= 13
    for name in floats:  # every one, whatever other check it has
        with pytest.raises(ConfigError, match=rf"^train\.{name}: must be a finite"):
            RunConfig().with_overrides({f"train.{name}": "nan"})


def test_yaml_errors_are_one_line_with_file_line_and_column(tmp_path):
    from jtok.config_file import load_mapping

    path = tmp_path / "my.yaml"
    path.write_text("model:\n  d_model: 64\n  tokmod: kind: jtok\n")
    with pytest.raises(ConfigError) as err:
        load_mapping(path)
    assert str(err.value) == f"config {path}:3:15: mapping values are not allowed here"
    path.write_bytes(b"\xef\xbb\xbfd_model: 64\n")  # a UTF-8 byte-order mark is fine
    assert load_mapping(path) == {"d_model": 64}
    # A key given twice: YAML would keep the second silently.
    path.write_text("axes:\n  backbone:\n    d64: {d_model: 64}\n    d64: {d_model: 96}\n")
    with pytest.raises(ConfigError, match=r"my\.yaml:4:5: found duplicate key 'd64'"):
        load_mapping(path)
    path.write_text("base: &b {lr: 1}\nrun: {<<: *b, lr: 2}\n")  # a merge may be overridden
    assert load_mapping(path) == {"base": {"lr": 1}, "run": {"lr": 2}}


def test_unknown_keys_suggest_close_matches_and_list_their_section():
    from jtok.config import RunConfig, unknown_key_error

    message = str(unknown_key_error(RunConfig, "train.lr_mult"))
    assert message.startswith("train.lr_mult: unknown key (did you mean train.")
    assert "table_lr_mult" in message and "; train keys: data, seq_len," in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"^tokmod\.n_experts: unknown key \(did you mean "
                                          r"moe\.num_experts"):  # fmt: skip
        preset("tiny").with_overrides({"tokmod.n_experts": "4"})
    data = preset("tiny").to_dict()
    data[3] = "a non-string key"  # YAML allows them; the error must still be one line
    with pytest.raises(ConfigError, match=r"^3: unknown key; model keys: vocab_size"):
        ModelConfig.from_dict(data)
