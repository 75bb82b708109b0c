import pytest
from conftest import random_ids, tiny
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from jtok.flops import count_flops, count_params, summarize
from jtok.nn.model import build_model
from jtok.presets import preset

CASES = [
    ("tiny", {}),
    ("tiny", {"tokmod__kind": "jtok"}),
    ("tiny", {"tokmod__kind": "jtokm", "tie_embeddings": "true"}),
    ("tiny-moe", {"tokmod__kind": "jtokm", "tokmod__layers": "1"}),
    ("tiny-moe", {"moe__first_dense_layers": "1", "moe__num_shared_experts": "0"}),
]


@pytest.mark.parametrize("name, overrides", CASES)
def test_parameter_counts_match_the_model(name, overrides):
    cfg = tiny(name, **overrides)
    model = build_model(cfg)
    counts = count_params(cfg)
    params = dict(model.named_parameters())  # a tied weight appears once
    tables = params.pop("token_tables.weight", None)
    assert sum(p.numel() for p in params.values()) == counts.backbone
    assert (0 if tables is None else tables.numel()) == counts.token_params
    attention = sum(p.numel() for n, p in params.items() if ".attn." in n)
    assert attention == counts.attention


@pytest.mark.parametrize("name, overrides", CASES)
def test_training_flops_match_flop_counter_mode(name, overrides):
    cfg = tiny(name, **overrides)
    model = build_model(cfg)
    B, T = 2, 32
    ids = random_ids(cfg, batch=B, seq=T)
    # The math SDPA backend decomposes attention into bmm, which the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(ids)
        (out.logits.float().square().mean() + out.aux_loss).backward()
    counted = counter.get_total_flops() / (B * T)
    flops = count_flops(cfg, seq_len=T)
    assert counted == pytest.approx(3 * (flops.matmul + flops.attention_scores), rel=0.01)
    assert counted == pytest.approx(flops.train, rel=0.05)  # plus the element-wise estimate


def test_summary_ratios():
    cfg = tiny(tokmod__kind="jtokm", tokmod__n_e="4", tokmod__top_k="1")
    s = summarize(cfg)
    assert s["rho"] == 0.25
    assert s["eta"] == pytest.approx(s["token_params"] / s["active_backbone_params"])
    assert s["token_params"] == cfg.n_layers * 4 * cfg.vocab_size * cfg.d_model


def test_moe_active_counts_only_the_routed_experts_used():
    cfg = tiny("tiny-moe")
    p = count_params(cfg)
    per_expert = 3 * cfg.d_model * cfg.moe.expert_hidden
    assert p.backbone - p.backbone_active == cfg.n_layers * (4 - 2) * per_expert
    assert count_flops(cfg).matmul < count_flops(tiny("tiny-moe", moe__top_k="4")).matmul


def test_token_parameters_add_almost_no_flops():
    base = count_flops(tiny("tiny")).train
    jtokm = count_flops(tiny("tiny", tokmod__kind="jtokm")).train
    assert 1.0 < jtokm / base < 1.05


MEMORY_CASES = [
    ("tiny", {}),
    ("tiny", {"tokmod__kind": "jtokm"}),  # sparse tables: RowAdam
    ("tiny", {"tokmod__kind": "jtok", "tokmod__sparse_grad": "false"}),  # dense tables: AdamW
    ("tiny-moe", {"tokmod__kind": "jtok", "tie_embeddings": "true"}),
]


@pytest.mark.parametrize("name, overrides", MEMORY_CASES)
def test_memory_estimate_matches_a_real_training_step(name, overrides):
    import torch
    import torch.nn.functional as F

    from jtok.config import TrainConfig
    from jtok.flops import estimate_memory
    from jtok.training.optim import Optimizers

    cfg = tiny(name, **overrides)
    model = build_model(cfg)
    opts = Optimizers(model, TrainConfig())
    B, T = 4, 32
    ids = random_ids(cfg, batch=B, seq=T + 1)
    saved = {}

    def pack(t):  # every tensor the forward keeps for backward, each storage once
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
    loss.backward()
    params = list(model.parameters())  # a tied weight once
    grads = [p.grad for p in params if p.grad is not None]
    dense_grads = sum(g.nbytes for g in grads if not g.is_sparse)
    opts.step()
    state = [t for o in opts.optimizers for s in o.state.values() for t in s.values()
             if torch.is_tensor(t)]  # fmt: skip
    est = estimate_memory(cfg, training=True, batch=B, seq_len=T)

    assert est.params == sum(p.nbytes for p in params)
    sparse = cfg.tokmod.enabled and cfg.tokmod.sparse_grad
    table_bytes = 4 * count_params(cfg).token_params
    assert dense_grads == 4 * count_params(cfg).backbone + (0 if sparse else table_bytes)
    sparse_grads = sum(g._values().nbytes + g._indices().nbytes for g in grads if g.is_sparse)
    assert est.grads - dense_grads >= sparse_grads  # rows of every position: at most that
    assert (est.grads == dense_grads) == (not sparse)
    # AdamW's per-parameter step counters (a 4-byte scalar each) are all it leaves out.
    scalars = sum(t.nbytes for t in state if t.ndim == 0)
    assert sum(t.nbytes for t in state) - scalars == est.optimizer
    # Activations: a lower bound of what autograd keeps, within a factor of two.
    kept = sum(v for k, v in saved.items() if k not in {p.untyped_storage().data_ptr()
                                                         for p in params})  # fmt: skip
    assert 0.5 * kept < est.activations <= kept
    assert estimate_memory(cfg, training=False).total == est.params  # inference, no batch


def test_memory_check_compares_with_available_memory(monkeypatch):
    from jtok.errors import JTokError
    from jtok.parallel import resources

    cfg = tiny(tokmod__kind="jtokm")
    need = resources.check_memory(cfg, "cpu", training=True, what="x")  # fits: returns it
    assert need.total == need.params + need.grads + need.optimizer and need.activations == 0
    assert resources.check_memory([cfg, cfg], "cpu", True, "x").total == 2 * need.total
    monkeypatch.setattr(resources, "available_memory", lambda device: need.total - 1)
    with pytest.raises(JTokError, match=r"^jtok train needs at least .* MiB of memory \(params "
                                        r".*\), but cpu has .* available"):  # fmt: skip
        resources.check_memory(cfg, "cpu", training=True, what="jtok train")
    resources.check_memory(cfg, "cpu", training=False, what="jtok eval")  # params only: fits
    monkeypatch.setattr(resources, "available_memory", lambda device: None)  # unknown: no check
    resources.check_memory(cfg, "meta", training=True, what="x", batch=10**9)


def test_memory_check_places_each_configs_tables_where_its_placement_puts_them(monkeypatch):
    """Models held at once with different placements (`jtok bench` on a GPU): device-table
    models count their tables on the accelerator, host-table models on the host."""
    from jtok.errors import JTokError
    from jtok.flops import table_memory
    from jtok.parallel import resources

    cfg = tiny(tokmod__kind="jtokm")
    monkeypatch.setattr(resources, "available_memory", lambda device: None)
    both_device = resources.check_memory([cfg, cfg], "cuda", True, "x")
    mixed = resources.check_memory([cfg, cfg], "cuda", True, "x",
                                   table_placement=["device", "host"])  # fmt: skip
    tables = table_memory(cfg, training=True)
    assert both_device.total - mixed.total == tables.total
    with pytest.raises(ValueError, match="one table placement per config"):
        resources.check_memory([cfg, cfg], "cuda", True, "x", table_placement=["host"])
    # The host side is checked for the host-table models' tables alone.
    monkeypatch.setattr(resources, "available_memory",
                        lambda device: tables.total - 1 if str(device) == "cpu" else None)
    with pytest.raises(JTokError, match="the host tables need"):
        resources.check_memory([cfg, cfg], "cuda", True, "x", table_placement=["device", "host"])


def test_available_memory_reads_the_machine():
    from jtok.parallel.resources import available_memory

    cpu = available_memory("cpu")
    assert cpu is None or cpu > 2**20
    assert available_memory("meta") is None


def test_memory_plan_shards_the_backbone_under_fsdp_and_moves_tables_to_the_host():
    from jtok.flops import memory_plan, table_memory

    cfg = preset("small").with_overrides({"tokmod.kind": "jtokm"})
    ddp = memory_plan(cfg, world_size=8, parallel="ddp")
    fsdp = memory_plan(cfg, world_size=8, parallel="fsdp")
    for item in ("backbone params", "backbone grads", "backbone optimizer"):
        assert fsdp["device"][item] == ddp["device"][item] // 8
    assert fsdp["device"]["table rows"] == ddp["device"]["table rows"]  # replicated
    assert "fsdp unsharded block" in fsdp["device"] and "fsdp unsharded block" not in ddp["device"]
    host = memory_plan(cfg, world_size=8, parallel="fsdp", table_placement="host")
    assert "table rows" not in host["device"]
    assert host["host"]["table rows"] + host["host"]["table optimizer"] == table_memory(cfg).total
    assert host["device_total"] == fsdp["device_total"] - table_memory(cfg).total


def test_memory_plan_counts_table_row_gradients_apart_and_shards_only_the_backbone():
    from jtok.flops import count_params, memory_plan, table_memory

    cfg = preset("small").with_overrides({"tokmod.kind": "jtokm", "tokmod.sparse_grad": "true"})
    dense = 4 * count_params(cfg).backbone
    plans = {(parallel, placement): memory_plan(cfg, world_size=4, parallel=parallel,
                                                table_placement=placement, batch=2, seq_len=64)
             for parallel in ("ddp", "fsdp") for placement in ("device", "sharded", "host")}
    rows = 2 * 64 * cfg.tokmod.tables_per_layer * cfg.n_layers  # rows a batch can touch
    for (parallel, placement), plan in plans.items():
        device = plan["device"]
        assert device["backbone grads"] == dense // (4 if parallel == "fsdp" else 1)
        # The batch's rows' gradients: on the compute device for every placement, unsharded.
        assert device["table row grads"] == 4 * rows * cfg.d_model + 8 * rows
        if placement == "sharded":
            assert device["table rows"] == table_memory(cfg).params // 4
    # Serving: sharded tables put 1/W of the rows on each process's accelerator.
    from jtok.cli.model import _serving_memory

    tables = table_memory(cfg, training=False).params
    assert _serving_memory(cfg, "sharded", 4)["accelerator_bytes"] == dense + tables // 4
    assert _serving_memory(cfg, "device", 4)["accelerator_bytes"] == dense + tables
    assert _serving_memory(cfg, "host", 4) == {"table_placement": "host",
                                               "accelerator_bytes": dense, "host_bytes": tables}


def test_info_prints_the_per_process_plan_and_train_refuses_naming_the_largest_item(
        capsys, monkeypatch):  # fmt: skip
    import json

    from jtok.cli import main
    from jtok.parallel import resources

    assert main(["info", "--preset", "moe-17b-a2b", "--world-size", "64", "--parallel",
                 "fsdp", "--json"]) == 0  # fmt: skip
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert plan["world_size"] == 64 and plan["device"]["table rows"] > 10 * 2**30
    monkeypatch.setattr(resources, "available_memory", lambda device: 64 * 2**30)
    with pytest.raises(resources.ResourceError, match=r"largest: table optimizer.*jtok info "
                       r"--world-size 64 --parallel fsdp"):  # fmt: skip
        resources.check_memory(preset("moe-17b-a2b"), "cpu", training=True, what="jtok train",
                               world_size=64, parallel="fsdp")  # fmt: skip
