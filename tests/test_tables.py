"""The table system: keys, the device store (today's reference) and the host store, which
must give bit-identical results on CPU, keep the tables off the model's device, and
prefetch without ever changing a result."""

import json
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny, tiny_run_config

from jtok.config import TrainConfig
from jtok.nn.model import build_model
from jtok.tables.host import HostTables
from jtok.tables.keys import CurrentTokenKey
from jtok.tables.row_adam import nonzero_positions
from jtok.tables.store import TableStoreError, TokenTables, make_store
from jtok.training.loop import clip_grad_norm_, train
from jtok.training.optim import Optimizers, parameter_roles


def test_current_token_key_deduplicates_except_for_single_positions():
    key = CurrentTokenKey(num_keys=10)
    ids = torch.tensor([[3, 1, 3, 7], [1, 1, 9, 3]])
    keys = key(ids)
    assert keys.distinct_U.tolist() == [1, 3, 7, 9]
    assert torch.equal(keys.distinct_U[keys.inverse_N], ids.reshape(-1))
    single = key(torch.tensor([[4], [4]]))  # decoding: one token per row, no sort
    assert single.distinct_U.tolist() == [4, 4] and single.inverse_N.tolist() == [0, 1]


@pytest.mark.parametrize("name,kind", [("tiny", "jtok"), ("tiny", "jtokm"),
                                       ("tiny-moe", "jtokm")])
def test_host_store_equals_device_store_bit_for_bit(name, kind):
    cfg = tiny(name, tokmod__kind=kind)
    device = build_model(cfg, seed=0)
    host = build_model(cfg, seed=0, table_placement="host")
    assert isinstance(device.token_tables, TokenTables)
    assert isinstance(host.token_tables, HostTables)
    assert torch.equal(device.token_tables.weight, host.token_tables.weight)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    train_cfg = TrainConfig(seq_len=16, lr=1e-2)
    opt_d, opt_h = Optimizers(device, train_cfg), Optimizers(host, train_cfg)
    for _ in range(3):
        losses = []
        for model in (device, host):
            out = model(ids[:, :-1])
            loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
            (loss + out.aux_loss).backward()
            losses.append(loss)
        assert torch.equal(losses[0], losses[1])
        host.token_tables.pull_gradients()
        # The rows RowAdam steps: the device store's JTok-M gradient holds only the routed
        # rows (RoutedRows), the host store's every gathered row, the others zero.
        grad_d = _nonzero_rows(device.token_tables.weight.grad)
        grad_h = _nonzero_rows(host.token_tables.weight.grad)
        assert torch.equal(grad_d[0], grad_h[0])
        assert torch.equal(grad_d[1], grad_h[1])
        norm_d = clip_grad_norm_(list(device.parameters()), 1.0)
        norm_h = clip_grad_norm_([*host.parameters(), *host.token_tables.store_parameters()], 1.0)
        assert norm_d == norm_h
        for opt in (opt_d, opt_h):
            opt.step()
            opt.zero_grad()
    assert torch.equal(device.token_tables.weight, host.token_tables.weight)


def _nonzero_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, values) of a sparse gradient's rows that are not all zero."""
    grad = grad.coalesce()
    kept = nonzero_positions(grad.values())
    return grad.indices()[0][kept], grad.values()[kept]


def test_host_tables_are_never_on_the_models_device():
    cfg = tiny(tokmod__kind="jtokm")
    model = build_model(cfg, seed=0, table_placement="host")
    table = model.token_tables.weight
    model.to("meta")  # stands in for an accelerator: every registered tensor moves
    assert table.device.type == "cpu" and model.token_tables.weight is table
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.device.type == "meta", name
        assert tensor.data_ptr() != table.data_ptr() or tensor.numel() == 0, name
    assert not any(p is table for p in model.parameters())
    # ... yet the optimizer and the checkpoint see it, under the device store's name.
    roles = {name: role for name, _, role in parameter_roles(model)}
    assert roles["token_tables.weight"] == "table"
    assert model.state_dict()["token_tables.weight"].device.type == "cpu"


def test_checkpoints_are_interchangeable_between_placements(tmp_path):
    from jtok.run import checkpoint as ckpt

    cfg = tiny(tokmod__kind="jtokm")
    device = build_model(cfg, seed=3)
    ckpt.save_checkpoint(tmp_path, 1, device)
    host = build_model(cfg, seed=0, table_placement="host")
    ckpt.load_model_weights(ckpt.latest_checkpoint(tmp_path), host)
    assert torch.equal(host.token_tables.weight, device.token_tables.weight)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(host(ids).logits, device(ids).logits)


def test_training_with_host_tables_and_prefetch_repeats_the_device_run(tiny_data, tmp_path):
    # Consecutive batches share frequent rows, so a prefetch that read a row before the
    # optimizer step updated it would change the losses; they must match bit for bit.
    runs = {}
    for placement in ("device", "host"):
        run = tmp_path / placement
        train(tiny_run_config(tiny_data, steps=10, save_every=10, eval_every=5,
                              table_placement=placement), run, progress=False,
              log=lambda m: None)  # fmt: skip
        runs[placement] = [json.loads(line) for line in (run / "metrics.jsonl").read_text()
                           .splitlines()]  # fmt: skip
    def without_timing(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert len(runs["device"]) > 10
    assert without_timing(runs["device"]) == without_timing(runs["host"])


def test_an_error_in_the_background_gather_surfaces_and_does_not_hang(monkeypatch):
    cfg = tiny(tokmod__kind="jtokm")
    model = build_model(cfg, seed=0, table_placement="host")

    def broken(self, index, device):
        raise OSError("simulated read failure")

    monkeypatch.setattr(HostTables, "_gather", broken)
    start = time.perf_counter()
    with pytest.raises(TableStoreError, match="gathering table rows failed.*simulated"):
        model(torch.randint(0, cfg.vocab_size, (1, 8)))
    assert time.perf_counter() - start < 10


def test_host_placement_needs_sparse_gradients_and_a_known_name():
    with pytest.raises(TableStoreError, match="sparse_grad"):
        make_store(tiny(tokmod__kind="jtok", tokmod__sparse_grad=False), "host")
    with pytest.raises(TableStoreError, match="placement"):
        make_store(tiny(tokmod__kind="jtok"), "disk")
