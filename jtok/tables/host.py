"""The host store: tables and their row-optimizer state in host memory.

The paper serves a 44B-parameter table beside a 17B-A2B backbone with no extra
accelerator memory: only the rows a batch reads cross to the accelerator. Here:

- The table matrix is a CPU tensor (pinned when CUDA is present, so copies from it can
  be asynchronous). It is a Parameter, so `RowAdam` steps it and checkpoints hold it, but
  it is *not registered* on the module: `model.parameters()`, `.to()`, `.cuda()`, DDP and
  FSDP never see or move it. `state_dict()` / `load_state_dict()` include it under the
  same key as the device store's (``token_tables.weight``), so checkpoints are
  interchangeable, and loading writes straight into host memory. `store_parameters()` is
  how the optimizer (jtok.training.optim) finds it.
- `rows(keys, device)`: one `index_select` on the host for every layer's rows of the
  distinct keys, then one copy to `device` (non-blocking from a pinned staging buffer on
  a side CUDA stream; on CPU the rows are used in place). With `fetch` the gather runs on
  a background thread (and its copy on the side stream), so it overlaps the compute before
  the first table-carrying layer, or the previous training step.
- Training: the gathered rows are a leaf on the accelerator; after backward
  `pull_gradients()` brings their gradient back as a sparse row gradient of the host
  matrix, and RowAdam steps it on the host. A fetch issued before an optimizer step may
  hold rows that step then changes (frequent tokens recur batch after batch), so
  `after_step()` re-reads, in any fetch still pending, exactly the rows the step updated:
  prefetching never changes a result.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor, nn

from jtok.config import ModelConfig
from jtok.tables.keys import RowKeys
from jtok.tables.store import LazyTokenRows, TableStoreError, _TableLayout


class RowFetch:
    """A gather in flight: host row indices and (soon) the rows on the target device."""

    def __init__(self, store: HostTables, keys: RowKeys, index: Tensor, future: Future):
        self.store, self.keys, self.index, self.future = store, keys, index, future
        self.patch: Tensor | None = None  # row indices an optimizer step changed meanwhile

    def wait(self) -> Tensor:
        try:
            rows = self.future.result()
        except Exception as err:  # the thread's error, on the caller's side
            raise TableStoreError(f"gathering table rows failed: {err}") from err
        if self.patch is not None:
            rows = self.store._refresh(rows, self.index, self.patch)
            self.patch = None
        return rows


class HostTables(_TableLayout, nn.Module):
    """Every token-indexed table of a model, kept in host memory."""

    placement = "host"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._init_layout(cfg)
        if not cfg.tokmod.sparse_grad:
            raise TableStoreError("host table placement needs tokmod.sparse_grad=true: the "
                                  "host matrix is stepped row-wise by RowAdam")  # fmt: skip
        # Built on the meta device (jtok.nn.model.build_model counts and shapes models
        # without allocating); `materialize` allocates it in host memory.
        weight = torch.empty(self.n_rows, cfg.d_model, device="meta")
        # object.__setattr__: a Parameter that nn.Module does not register (see the module
        # docstring), so .to() and model.parameters() leave it alone.
        object.__setattr__(self, "_host_weight", nn.Parameter(weight))
        object.__setattr__(self, "_pending", [])  # (row index, device leaf) since last pull
        object.__setattr__(self, "_in_flight", [])  # fetches not yet consumed
        object.__setattr__(self, "_executor", None)
        object.__setattr__(self, "_lock", threading.Lock())

    # ---- the matrix, its state_dict entry, the optimizer's view --------------------------

    def materialize(self) -> None:
        """Allocate the matrix in host memory (pinned when CUDA is present); values unset."""
        if self._host_weight.device.type == "meta":
            pin = torch.cuda.is_available()
            weight = torch.empty(self.n_rows, self.d_model, pin_memory=pin)
            object.__setattr__(self, "_host_weight", nn.Parameter(weight))

    @property
    def weight(self) -> nn.Parameter:
        return self._host_weight

    def store_parameters(self) -> list[nn.Parameter]:
        return [self._host_weight]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self._host_weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        key = prefix + "weight"
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        source = state_dict[key]
        if source.shape != self._host_weight.shape:
            error_msgs.append(f"size mismatch for {key}: {tuple(source.shape)} in the "
                              f"checkpoint, {tuple(self._host_weight.shape)} here")  # fmt: skip
            return
        with torch.no_grad():
            self._host_weight.copy_(source)  # straight into host memory

    # ---- gathering --------------------------------------------------------------------

    def _gather(self, index: Tensor, device: torch.device) -> Tensor:
        """Host rows `index` on `device` (one index_select; an async copy to CUDA)."""
        with self._lock:  # an optimizer step never half-overlaps a read
            rows = self._host_weight.detach().index_select(0, index)
        if device.type != "cuda":
            return rows
        staging = rows.pin_memory()
        stream = _side_stream(device)
        with torch.cuda.stream(stream):
            moved = staging.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        torch.cuda.current_stream(device).wait_event(done)
        moved.record_stream(torch.cuda.current_stream(device))
        return moved

    def _refresh(self, rows: Tensor, index: Tensor, changed: Tensor) -> Tensor:
        """Re-read in `rows` (for host rows `index`) the rows in `changed`."""
        stale = torch.isin(index, changed)
        if bool(stale.any()):
            where = stale.nonzero().squeeze(1)
            fresh = self._gather(index[where], rows.device)
            rows = rows.clone()
            rows[where.to(rows.device)] = fresh
        return rows

    def fetch(self, keys: RowKeys, device: torch.device) -> RowFetch:
        """Start gathering the rows of `keys` for `device` on a background thread."""
        if self._executor is None:
            object.__setattr__(self, "_executor",
                               ThreadPoolExecutor(1, thread_name_prefix="jtok-rows"))  # fmt: skip
        index = self.row_index(keys.distinct_U.to("cpu"))
        fetch = RowFetch(self, keys, index, self._executor.submit(self._gather, index, device))
        self._in_flight.append(fetch)
        return fetch

    def consume(self, fetch: RowFetch) -> LazyTokenRows:
        """TokenRows of a fetch, resolved when the first table-carrying layer reads them."""

        def resolve() -> tuple[Tensor, ...]:
            if fetch in self._in_flight:
                self._in_flight.remove(fetch)
            rows = fetch.wait()
            return self.split_layers(self._track(fetch.index, rows), fetch.keys.count)

        return LazyTokenRows(resolve, fetch.keys.inverse_N)

    def rows(self, keys: RowKeys, device: torch.device | None = None) -> LazyTokenRows:
        device = device if device is not None else keys.inverse_N.device
        return self.consume(self.fetch(keys, device))

    def _track(self, index: Tensor, rows: Tensor) -> Tensor:
        """Make gathered rows a leaf whose gradient `pull_gradients` returns to the host."""
        if torch.is_grad_enabled() and self._host_weight.requires_grad:
            rows = rows.detach().requires_grad_(True)
            self._pending.append((index, rows))
        return rows

    # ---- training ---------------------------------------------------------------------

    def pull_gradients(self) -> Tensor:
        """The gathered rows' gradients, back on the host as a sparse gradient of the matrix
        (added up over micro-batches, as the device store's sparse gradients are).
        Returns the host rows they cover (for `after_step`)."""
        weight = self._host_weight
        pulled = []
        for index, rows in self._pending:
            if rows.grad is None:
                continue
            grad = torch.sparse_coo_tensor(index[None], rows.grad.to("cpu", weight.dtype),
                                           weight.shape, check_invariants=False)  # fmt: skip
            weight.grad = grad if weight.grad is None else weight.grad + grad
            pulled.append(index)
        self._pending.clear()
        return torch.cat(pulled) if pulled else torch.empty(0, dtype=torch.long)

    def after_step(self, updated: Tensor | None) -> None:
        """An optimizer step changed host rows `updated`: fetches in flight re-read them."""
        if updated is None or updated.numel() == 0:
            return
        for fetch in self._in_flight:
            fetch.patch = updated if fetch.patch is None else torch.cat((fetch.patch, updated))

    def step_lock(self) -> threading.Lock:
        """Hold while stepping the host matrix, so no gather reads a half-updated row."""
        return self._lock


_streams: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(device=index)
    return _streams[index]
