"""Training runs of retrofitted HF models: the run record and the model adapter.

`jtok train --init-from-hf DIR --set tokmod.kind=jtokm ...` continues pretraining a local
Llama / Qwen2 / Qwen3 / Mistral checkpoint with JTok or JTok-M tables (jtok.hf.retrofit)
on jtok data. jtok's `ModelConfig` cannot describe these models (qk-norm, biases, rope
scaling, tied heads), so such a run's config.json records, in place of the ``model``
section, a ``retrofit`` section:

    {"retrofit": {"format_version": 1,
                  "about": "a retrofitted Hugging Face model (jtok train --init-from-hf) ...",
                  "source": "/abs/path/of/DIR",      # where step 0's weights came from
                  "hf_config": {...},                 # the HF config's to_dict()
                  "options": {"kind": "jtokm", "n_e": 5, ...}},   # retrofit options
     "train": {...}}                                  # an ordinary TrainConfig

(the options leave out ``table_placement`` and ``seed``: they are ``train.table_placement``,
a run-time choice as for native runs, and ``train.seed``). `RetrofitRunConfig` is that
record; it offers what the trainer and the run directory code ask of a `RunConfig`:
``train``, ``model`` (a `ModelConfig` describing what the tables read of the HF model:
vocabulary, width, depth, context; see `jtok.hf.retrofit.table_model_config`), ``to_dict``,
``with_overrides``, ``effective_dict`` and ``build_model``.

Checkpoints are jtok's own (jtok.run.checkpoint: model.safetensors + optimizer.safetensors
+ state.json, written atomically) and hold the whole model: every HF weight under its HF
name (a tied head once) and the tables, routers and scales under ``jtok_retrofit.``. A
resume builds the model from the recorded HF config (not from DIR, which may be gone) and
loads the checkpoint, so it is exact as a native resume is.

Why an adapter (`RetrofitLM`). The trainer, `jtok eval`, `jtok generate` / `sample` and
lm-eval's `JTokLM` all drive a model through one small interface: ``model(ids)`` returning
an object with ``.logits``, ``.aux_loss`` and ``.aux_terms``, ``model.cfg`` (vocabulary,
context), ``model.token_tables`` (the store, for host placement's gradient sequence), and
`generate_batch`. Presenting the HF model through that interface lets one trainer, one
checkpoint format and one evaluation path serve native and retrofitted runs, instead of a
second copy of each. The adapter adds nothing to the computation: ``logits`` are the HF
model's, ``aux_loss`` is JTok-M's balance loss (`jtok.hf.retrofit.balance_loss`, which HF's
own loss leaves out), and its state dict is the HF model's (HF names).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jtok.config import ConfigError, ModelConfig, TokModConfig, TrainConfig
from jtok.errors import JTokError
from jtok.hf.retrofit import (
    ATTRIBUTE,
    OPTION_NAMES,
    SUPPORTED_MODEL_TYPES,
    RetrofitError,
    freeze_backbone,
    retrofit,
    retrofit_tables,
    table_model_config,
)
from jtok.hf.retrofit_io import OPTIONS_FILE, is_saved_retrofit
from jtok.run.files import RETROFIT_RECORD_KEY

RECORD_FORMAT = 1
ABOUT = ("a retrofitted Hugging Face model (jtok train --init-from-hf): the HF config and "
         "the retrofit options stand in for a jtok model config")  # fmt: skip
# Options that live in the train section (run-time placement, the run's seed).
_TRAIN_OPTIONS = ("table_placement", "seed")
RECORDED_OPTIONS = tuple(name for name in OPTION_NAMES if name not in _TRAIN_OPTIONS)
_TOKMOD_OPTIONS = tuple(name for name in RECORDED_OPTIONS if name != "kind")
# retrofit()'s defaults (scale_init 0, ...), which differ from a native TokModConfig's.
_DEFAULTS = {name: p.default for name, p in inspect.signature(retrofit).parameters.items()
             if name in RECORDED_OPTIONS}  # fmt: skip
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # fmt: skip


class RetrofitRunError(JTokError):
    """A retrofitted run cannot be started or used as asked; the message says why."""


def hf_config_from_dict(data: dict[str, Any]):
    """The transformers config a recorded ``to_dict()`` describes."""
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RetrofitRunError(f"the recorded HF config has model_type {model_type!r}; "
                               f"retrofit supports {list(SUPPORTED_MODEL_TYPES)}")  # fmt: skip
    try:
        return AutoConfig.for_model(model_type, **data)
    except (TypeError, ValueError) as err:
        raise RetrofitRunError(f"the recorded HF config does not load: {err}") from None


def _context(hf_config) -> int:
    return int(getattr(hf_config, "max_position_embeddings", None) or 2048)


def _tokmod(options: dict[str, Any]) -> TokModConfig:
    return TokModConfig(kind=options["kind"], **{k: options[k] for k in _TOKMOD_OPTIONS})


@dataclass
class RetrofitRunConfig:
    """A retrofitted run's record (config.json): HF config, retrofit options, training."""

    hf_config: dict[str, Any]
    options: dict[str, Any]
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = ""  # the HF directory step 0 loads (absolute; informational afterwards)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - set(RECORDED_OPTIONS))
        if unknown:
            raise ConfigError(f"{RETROFIT_RECORD_KEY}.options: unknown option {unknown[0]!r} "
                              f"(options: {list(RECORDED_OPTIONS)})")  # fmt: skip
        try:  # as config.json will hold it (int keys of id2label become strings, ...)
            self.hf_config = json.loads(json.dumps(self.hf_config))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{RETROFIT_RECORD_KEY}.hf_config is not JSON-able: {err}") from None
        self.options = {**_DEFAULTS, **self.options}
        if self.options.get("kind") not in ("jtok", "jtokm"):
            raise ConfigError("tokmod.kind: a retrofit needs --set tokmod.kind=jtok or jtokm, "
                              f"got {self.options.get('kind')!r}")  # fmt: skip
        self._hf = hf_config_from_dict(self.hf_config)
        # Checks every option against the model (layers in range, top_k <= n_e, ...).
        self._model = table_model_config(self._hf, _tokmod(self.options)).with_overrides(
            {"max_seq_len": _context(self._hf)})  # fmt: skip
        if self.train.seq_len > self._model.max_seq_len:
            raise ConfigError(f"train.seq_len: seq_len={self.train.seq_len} exceeds the HF "
                              f"model's max_position_embeddings={self._model.max_seq_len}")
        if self.train.table_placement not in ("device", "host"):
            raise ConfigError("train.table_placement: a retrofit keeps its tables on the "
                              "device or on the host, not 'sharded'")  # fmt: skip
        if self.train.compile:  # untested with HF modules: refused rather than run silently
            raise ConfigError("train.compile: not supported for a retrofitted model")

    # ---- what a RunConfig offers -----------------------------------------------------------

    @property
    def model(self) -> ModelConfig:
        """What the tables read of the HF model (vocab_size, d_model, n_layers, tokmod) and
        its context (max_seq_len); the other fields are placeholders."""
        return self._model

    def to_dict(self) -> dict[str, Any]:
        return {RETROFIT_RECORD_KEY: {"format_version": RECORD_FORMAT, "about": ABOUT,
                                      "source": self.source,
                                      "hf_config": copy.deepcopy(self.hf_config),
                                      "options": dict(self.options)},
                "train": self.train.to_dict()}  # fmt: skip

    def effective_dict(self) -> dict[str, Any]:
        """The fields that make two records the same run (not the source path)."""
        data = self.to_dict()
        record = data[RETROFIT_RECORD_KEY]
        for key in ("source", "about"):
            record.pop(key)
        record["hf_config"].pop("transformers_version", None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrofitRunConfig:
        record = data.get(RETROFIT_RECORD_KEY) if isinstance(data, dict) else None
        if not isinstance(record, dict) or record.get("format_version") != RECORD_FORMAT:
            raise ConfigError(f"{RETROFIT_RECORD_KEY}: not a retrofit record of format "
                              f"{RECORD_FORMAT}")  # fmt: skip
        extra = sorted(set(data) - {RETROFIT_RECORD_KEY, "train"})
        if extra:
            raise ConfigError(f"a retrofitted run's config has no section {extra[0]!r}")
        if not isinstance(record.get("hf_config"), dict) or not isinstance(
                record.get("options"), dict):  # fmt: skip
            raise ConfigError(f"{RETROFIT_RECORD_KEY}: hf_config and options must be objects")
        return cls(hf_config=record["hf_config"], options=record["options"],
                   train=TrainConfig.from_dict(data.get("train", {})),
                   source=str(record.get("source", "")))  # fmt: skip

    def with_overrides(self, overrides: dict[str, Any]) -> RetrofitRunConfig:
        """``train.*`` keys go to the train section, ``model.tokmod.*`` / ``tokmod.*`` keys
        to the retrofit options (parsed and checked as TokModConfig's); ``model.*`` else is
        the HF model's and cannot be set."""
        train, tokmod = {}, {}
        for key, value in overrides.items():
            if key.startswith("train."):
                train[key[len("train."):]] = value
            elif key.startswith(("model.tokmod.", "tokmod.")):
                tokmod[key.split("tokmod.", 1)[1]] = value
            else:
                raise ConfigError(f"{key}: a retrofitted run takes its model from the HF "
                                  "directory; only tokmod.* (kind, n_e, top_k, layers, ...) "
                                  "and train.* can be set")  # fmt: skip
        options = dict(self.options)
        if tokmod:
            allowed = {"kind", *_TOKMOD_OPTIONS}
            bad = sorted(set(tokmod) - allowed)
            if bad:
                raise ConfigError(f"tokmod.{bad[0]}: not a retrofit option (options: "
                                  f"{sorted(allowed)})")  # fmt: skip
            parsed = self._model.with_overrides({f"tokmod.{k}": v for k, v in tokmod.items()})
            options.update({k: getattr(parsed.tokmod, k) for k in tokmod})
        return RetrofitRunConfig(self.hf_config, options,
                                 self.train.with_overrides(train) if train else self.train,
                                 self.source)  # fmt: skip

    def retrofit_options(self, table_placement: str | None = None) -> dict[str, Any]:
        """`jtok.hf.retrofit.retrofit`'s keyword arguments for this run."""
        return {**self.options, "table_placement": table_placement or self.train.table_placement,
                "seed": self.train.seed}  # fmt: skip

    def build_model(self, device: Any = "cpu", table_placement: str | None = None,
                    from_source: bool = False) -> RetrofitLM:  # fmt: skip
        """The run's model as a `RetrofitLM`, in fp32 (under bf16 autocast on CUDA, as
        native runs). `from_source`: the HF weights of `source` and freshly initialised
        tables (step 0); else the backbone is built from the recorded config (random, or
        on "meta" empty) and the tables are left unset, for a checkpoint to fill."""
        from transformers import AutoModelForCausalLM

        options = self.retrofit_options(table_placement)
        meta = str(device) == "meta"
        if from_source:
            check_hf_dir(self.source)
            with _quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(self.source, local_files_only=True,
                                                             dtype=torch.float32)  # fmt: skip
        else:
            with torch.device("meta" if meta else "cpu"):
                model = AutoModelForCausalLM.from_config(self._hf, dtype=torch.float32)
        retrofit(model, **options, initialize=from_source)
        if self.train.freeze_backbone:
            freeze_backbone(model)
        lm = RetrofitLM(model, self._model)
        if not meta:
            lm.to(device)  # host tables stay in host memory
        return lm


@contextlib.contextmanager
def _quiet_loading():
    """No transformers progress bar while a run loads its weights (a log is no terminal)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---- starting a run from an HF directory ------------------------------------------------


def check_hf_dir(path: Path | str) -> Path:
    """A local HF model directory with a config and weights (nothing is downloaded)."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "no such directory"
        raise RetrofitRunError(f"--init-from-hf {path}: {what} (a local Hugging Face model "
                               "directory is expected; nothing is downloaded)")  # fmt: skip
    if not (path / "config.json").is_file():
        raise RetrofitRunError(f"--init-from-hf {path} is not a Hugging Face model directory "
                               "(no config.json)")  # fmt: skip
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise RetrofitRunError(f"--init-from-hf {path} holds no weights (none of "
                               f"{', '.join(WEIGHT_FILES)})")  # fmt: skip
    if is_saved_retrofit(path):  # a new run would start fresh tables on its backbone
        raise RetrofitRunError(f"--init-from-hf {path} is a retrofit with trained tables "
                               f"({OPTIONS_FILE}), which a new run would replace; resume its "
                               "run, or start from the plain Hugging Face model")  # fmt: skip
    return path


def init_run_config(hf_dir: Path | str, overrides: dict[str, Any]) -> RetrofitRunConfig:
    """The record of a new run from HF directory `hf_dir` and `--set` overrides."""
    from transformers import AutoConfig

    path = check_hf_dir(hf_dir)
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RetrofitRunError(f"--init-from-hf {path}: config.json does not load: "
                               f"{first}") from None  # fmt: skip
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise RetrofitRunError(f"--init-from-hf {path}: model_type {hf_config.model_type!r}; "
                               f"retrofit supports {list(SUPPORTED_MODEL_TYPES)}")  # fmt: skip
    kind = overrides.get("model.tokmod.kind", overrides.get("tokmod.kind"))
    if kind is None:
        raise RetrofitRunError("--init-from-hf needs --set tokmod.kind=jtok or jtokm")
    context = _context(hf_config)
    train = TrainConfig(seq_len=min(TrainConfig.seq_len, context))
    base = RetrofitRunConfig(hf_config.to_dict(), {"kind": str(kind)}, train,
                             str(path.resolve()))  # fmt: skip
    return base.with_overrides(overrides)


def check_data_vocab(run_cfg: RetrofitRunConfig, manifest: dict, data_dir: Any) -> None:
    """The data's token ids must be the HF model's: the tables and the embedding are indexed
    by them, so another tokenizer's ids would be read as other tokens.

    - A data vocabulary larger than the model's embedding is refused (ids out of range).
    - Where the HF directory holds its tokenizer (tokenizer.json), the data's tokenizer
      must map every token to the same id: this also accepts a model whose embedding is
      padded past its tokenizer (Qwen's 151,936 rows for about 151,665 tokens) and catches a
      different tokenizer of the same size.
    - Without a tokenizer to compare with, the sizes must be equal; a resume whose source
      directory has gone (only step 0 reads it) keeps what its start checked.
    (The largest ids the data holds are checked against the model separately.)"""
    from jtok.data import load_tokenizer

    data_vocab, model_vocab = int(manifest["vocab_size"]), run_cfg.model.vocab_size
    how = "prepare it with the model's own tokenizer (jtok data prepare ... --tokenizer DIR)"
    if data_vocab > model_vocab:
        raise RetrofitRunError(f"the data at {data_dir} was tokenized with a vocabulary of "
                               f"{data_vocab} but the HF model's embedding has {model_vocab} "
                               f"rows: {how}")  # fmt: skip
    source_tokenizer = Path(run_cfg.source) / "tokenizer.json" if run_cfg.source else None
    if source_tokenizer is not None and source_tokenizer.is_file():
        try:
            same = load_tokenizer(source_tokenizer).get_vocab() == \
                load_tokenizer(data_dir).get_vocab()
        except JTokError as err:
            raise RetrofitRunError(f"cannot compare the data's tokenizer with "
                                   f"{source_tokenizer}: {err}") from None
        if not same:
            raise RetrofitRunError(f"the data at {data_dir} was tokenized with another "
                                   f"tokenizer than the HF model's ({source_tokenizer}): {how}")
        return
    if run_cfg.source and not Path(run_cfg.source).is_dir():
        return
    if data_vocab != model_vocab:
        raise RetrofitRunError(
            f"the data at {data_dir} was tokenized with a vocabulary of {data_vocab} but the "
            f"HF model's is {model_vocab}, and the HF directory holds no tokenizer.json to "
            f"compare: {how}")


# ---- the adapter ------------------------------------------------------------------------


@dataclass
class RetrofitOutput:
    logits: Tensor
    aux_loss: Tensor
    aux_terms: dict[str, Tensor] = field(default_factory=dict)


class RetrofitLM(nn.Module):
    """A retrofitted HF causal LM behind jtok's model interface (see the module docstring).

    ``hf`` is the HF model itself (``RetrofitLM(m).hf is m``); `state_dict` and
    `load_state_dict` are its own (HF names, a tied head once)."""

    def __init__(self, hf_model: nn.Module, cfg: ModelConfig):
        super().__init__()
        retrofit_tables(hf_model)  # refuses a model without tables
        self.hf = hf_model
        self.cfg = cfg

    @property
    def token_tables(self) -> nn.Module:
        return retrofit_tables(self.hf).tables

    def forward(self, ids: Tensor, token_rows=None, cache=None) -> RetrofitOutput:
        if cache is not None:
            raise RetrofitError("a retrofitted model decodes with HF generate (generate_batch)")
        tables = retrofit_tables(self.hf)
        tables.use_rows(token_rows)
        logits = self.hf(input_ids=ids, use_cache=False).logits
        aux_loss = logits.new_zeros((), dtype=torch.float32)
        terms: dict[str, Tensor] = {}
        balance = tables.balance_loss()
        if balance is not None:
            aux_loss = aux_loss + balance.float()
            terms["tokmod_balance"] = tables.balance_mean()
        return RetrofitOutput(logits, aux_loss, terms)

    def _tied_names(self) -> set[str]:
        """Names of parameters that are another, earlier parameter (a tied head)."""
        seen: set[int] = set()
        tied = set()
        for name, param in self.hf.named_parameters(remove_duplicate=False):
            (tied.add(name) if id(param) in seen else seen.add(id(param)))
        return tied

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        tied = self._tied_names()
        return {k: v for k, v in self.hf.state_dict(*args, **kwargs).items() if k not in tied}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = self.hf.load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in self._tied_names()]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"state dict does not fit: missing {missing[:3]}, unexpected "
                               f"{result.unexpected_keys[:3]}")  # fmt: skip
        return result

    # ---- generation: HF generate --------------------------------------------------------

    @torch.no_grad()
    def generate_batch(self, prompts, max_new_tokens: int, temperature: float, top_k: int,
                       top_p: float, seed: int, stops: list[frozenset[int]],
                       batch_size: int | None) -> list[list[int]]:  # fmt: skip
        """`jtok.inference.generate.generate_batch`'s contract through HF ``generate``
        (KV cache, left-padded prompts, attention mask). Greedy prompts run in batches of
        `batch_size` (grouped by length and stop ids). Sampled prompts run one at a time,
        each under its own seed (seed, i), so prompt i's draws depend on (seed, i) only, as
        natively: HF's sampler draws from the global generator for the whole batch."""
        context = self.cfg.max_seq_len
        budgets = [min(max_new_tokens, context - len(p)) for p in prompts]
        order = sorted((i for i in range(len(prompts)) if budgets[i] > 0),
                       key=lambda i: -len(prompts[i]))  # fmt: skip
        sampling = temperature > 0
        size = 1 if sampling else (batch_size or max(len(order), 1))
        groups: dict[frozenset[int], list[int]] = {}
        for i in order:
            groups.setdefault(stops[i], []).append(i)
        results: list[list[int]] = [[] for _ in prompts]
        was_training = self.training
        self.eval()
        try:
            for stop, members in groups.items():
                for rows in _within_context(members, size, prompts, budgets, context):
                    news = self._generate([prompts[i] for i in rows],
                                          max(budgets[i] for i in rows), temperature, top_k,
                                          top_p, seed * 1_000_003 + rows[0], stop)  # fmt: skip
                    for i, new in zip(rows, news, strict=True):
                        new = new[: budgets[i]]
                        cut = next((n for n, t in enumerate(new) if t in stop), None)
                        results[i] = new if cut is None else new[: cut + 1]
        finally:
            self.train(was_training)
        return results

    def _generate(self, prompts, budget: int, temperature: float, top_k: int, top_p: float,
                  seed: int, stop: frozenset[int]) -> list[list[int]]:  # fmt: skip
        from transformers import GenerationConfig

        device = next(self.hf.parameters()).device
        pad = min(stop) if stop else 0
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask[b, width - len(prompt):] = 1
        settings = dict(max_new_tokens=budget, min_new_tokens=0, pad_token_id=pad,
                        eos_token_id=sorted(stop) or None, do_sample=temperature > 0)  # fmt: skip
        if temperature > 0:
            settings.update(temperature=float(temperature), top_k=int(top_k),
                            top_p=float(top_p))  # fmt: skip
        # A fresh GenerationConfig: the source model's generation_config.json (a chat
        # model's repetition penalty, sampling defaults) must not change jtok's contract.
        config = GenerationConfig(**settings)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed % (2**63))
            out = self.hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   generation_config=config)  # fmt: skip
        return [row[width:].tolist() for row in out.cpu()]


def _within_context(members: list[int], size: int, prompts, budgets: list[int],
                    context: int):  # fmt: skip
    """Batches of at most `size` consecutive rows of `members` (longest prompt first) whose
    longest prompt plus largest budget fits the context.

    A left-padded batch generates its largest budget for every row: a long prompt batched
    with a short prompt's larger budget would run past the context (cut-off steps, HF's
    max-length warning, and with a dynamically scaled RoPE new frequencies for the whole
    batch). The price: where budgets reach the context, only prompts of one length share a
    batch. A row alone always fits (its budget is at most the context less its prompt)."""
    batch: list[int] = []
    widest = largest = 0
    for i in members:
        if batch and (len(batch) == size or widest + max(largest, budgets[i]) > context):
            yield batch
            batch = []
        if not batch:
            widest, largest = len(prompts[i]), 0
        batch.append(i)
        largest = max(largest, budgets[i])
    if batch:
        yield batch


def hf_model_of(model: nn.Module) -> nn.Module:
    """The HF model inside a `RetrofitLM` (or the model itself)."""
    return model.hf if isinstance(model, RetrofitLM) else model


__all__ = ["ATTRIBUTE", "RetrofitLM", "RetrofitRunConfig", "RetrofitRunError", "check_data_vocab",
           "check_hf_dir", "hf_model_of", "init_run_config"]
