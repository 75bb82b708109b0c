"""Saving and loading retrofitted HF models; building one from an HF directory or config.

A saved retrofit is an ordinary HF model directory plus two files:

    DIR/
      config.json, model.safetensors, generation_config.json   the HF model's save_pretrained
                                                               (its own weights only)
      jtok_retrofit.safetensors   tables, routers and scales (``tables.weight``,
                                  ``mixers.<i>.scale``, ``mixers.<i>.router``)
      jtok_retrofit.json          format version and the retrofit options (JSON)

so ``AutoModelForCausalLM.from_pretrained(DIR)`` still loads the plain backbone, and
`load_retrofit(DIR)` the retrofitted model with identical logits. Safetensors and JSON
only (no pickle). The directory is written beside its target and renamed into place, so a
failure leaves no half-written retrofit under DIR's name (as jtok export does).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from jtok.hf.retrofit import (
    ATTRIBUTE,
    OPTION_NAMES,
    RetrofitError,
    retrofit,
    retrofit_options,
    retrofit_tables,
)
from jtok.io import FileFormatError, read_json, replace_dir, save_tensors, write_json_atomic

FORMAT_VERSION = 1
WEIGHTS_FILE = "jtok_retrofit.safetensors"
OPTIONS_FILE = "jtok_retrofit.json"


def _check_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise RetrofitError(f"{where}: the retrofit options must be an object")
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise RetrofitError(f"{where}: unknown retrofit option {unknown[0]!r} (options: "
                            f"{list(OPTION_NAMES)})")  # fmt: skip
    return dict(options)


def build_retrofit(source, options: dict[str, Any], device: str | torch.device | None = None,
                   initialize: bool = True, **from_pretrained_kwargs) -> nn.Module:  # fmt: skip
    """A retrofitted causal LM from `source` and retrofit `options` (a `retrofit_options`
    dict, or any subset of `retrofit`'s keyword arguments).

    `source`: an HF model directory (loaded with ``local_files_only``: nothing is downloaded)
    or a `PretrainedConfig` (random weights, from ``AutoModelForCausalLM.from_config``).
    `initialize=False` leaves the tables unset, for a caller that loads them next."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    options = _check_options(options, "build_retrofit")
    if isinstance(source, PretrainedConfig):
        model = AutoModelForCausalLM.from_config(source)
    else:
        path = Path(source)
        if not (path / "config.json").is_file():
            raise RetrofitError(f"{path} is not a Hugging Face model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                     **from_pretrained_kwargs)  # fmt: skip
    retrofit(model, **options, initialize=initialize)
    if device is not None:
        model.to(device)  # host tables stay in host memory
    return model


def save_retrofit(hf_model: nn.Module, out: Path | str, overwrite: bool = False) -> Path:
    """Write a retrofitted model to directory `out` (see the module docstring); `out`.

    An existing `out` is replaced only with `overwrite`, and only if it is a saved retrofit."""
    out = Path(out)
    tables = retrofit_tables(hf_model)
    if out.exists():
        if not out.is_dir():
            raise RetrofitError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not (overwrite and is_saved_retrofit(out)):
            hint = (
                " and not a saved retrofit"
                if overwrite
                else ("; pass overwrite=True to replace an earlier saved retrofit")
            )
            raise RetrofitError(f"{out} is not empty{hint}")
    prefix = ATTRIBUTE + "."
    backbone = {k: v for k, v in hf_model.state_dict().items() if not k.startswith(prefix)}
    own = {k: v.detach().to("cpu").contiguous() for k, v in tables.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-retrofit-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf_model.save_pretrained(tmp, state_dict=backbone)
        save_tensors(own, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json_atomic(tmp / OPTIONS_FILE, {"format_version": FORMAT_VERSION,
                                               "options": retrofit_options(hf_model),
                                               "tensors": sorted(own)})  # fmt: skip
        replace_dir(tmp, out)
    except OSError as err:
        raise RetrofitError(f"cannot write {out}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_saved_retrofit(path: Path | str) -> bool:
    """Whether directory `path` holds a saved retrofit (`save_retrofit`, `jtok export` of a
    retrofitted run): its options file is what marks one."""
    return (Path(path) / OPTIONS_FILE).is_file()


def read_retrofit_options(path: Path | str) -> dict[str, Any]:
    """The retrofit options recorded in a saved retrofit directory."""
    record_file = Path(path) / OPTIONS_FILE
    try:
        record = read_json(record_file, "retrofit options")
    except FileFormatError as err:
        raise RetrofitError(str(err)) from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        raise RetrofitError(f"{record_file}: not a jtok retrofit record of format "
                            f"{FORMAT_VERSION}")  # fmt: skip
    return _check_options(record.get("options"), str(record_file))


def load_retrofit(path: Path | str, table_placement: str | None = None,
                  device: str | torch.device | None = None,
                  **from_pretrained_kwargs) -> nn.Module:  # fmt: skip
    """A model saved by `save_retrofit`, with its tables, routers and scales.

    `table_placement` overrides the recorded one (the values are the same either way);
    `from_pretrained_kwargs` go to the HF loader (e.g. ``dtype``)."""
    path = Path(path)
    options = read_retrofit_options(path)
    if table_placement is not None:
        options["table_placement"] = table_placement
    model = build_retrofit(path, options, initialize=False, **from_pretrained_kwargs)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise RetrofitError(f"{weights_file} is missing")
    tensors = load_file(str(weights_file))
    try:
        # strict: every table, router and scale is in the file, and nothing else is.
        retrofit_tables(model).load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise RetrofitError(f"{weights_file} does not fit the recorded options: {err}") from None
    if device is not None:
        model.to(device)
    return model
