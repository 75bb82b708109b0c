"""`jtok export` of a retrofitted run: `save_retrofit`'s directory plus the run's tokenizer.

    OUT/
      config.json, model.safetensors, generation_config.json   the HF model (HF names)
      jtok_retrofit.safetensors, jtok_retrofit.json            tables, routers, scales
      tokenizer.json, tokenizer_config.json, ...               the run's tokenizer

`jtok.load_retrofit(OUT)` gives the run's model (same logits); a plain
``AutoModelForCausalLM.from_pretrained(OUT)`` gives the backbone alone. The generation
config names the data's end-of-text token as eos and pad. The directory is built beside
OUT and renamed into place; an existing OUT is replaced only with `overwrite`, and only
if it is an earlier export.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from jtok.hf.export import (
    EXPORT_FILES,
    ExportError,
    check_out_dir,
    hf_tokenizer,
    refuse_non_finite,
)
from jtok.hf.retrofit_io import OPTIONS_FILE, WEIGHTS_FILE, save_retrofit
from jtok.hf.retrofit_run import _quiet_loading
from jtok.io import replace_dir
from jtok.run.files import TOKENIZER_FILE

RETROFIT_EXPORT_FILES = EXPORT_FILES | {WEIGHTS_FILE, OPTIONS_FILE}


def _check_out(out: Path, overwrite: bool) -> None:
    check_out_dir(out, overwrite, allowed=RETROFIT_EXPORT_FILES)


def export_retrofit_run(run_dir: Path | str, out: Path | str, checkpoint=None,
                        overwrite: bool = False) -> int:  # fmt: skip
    """Write retrofitted run `run_dir` (latest checkpoint, or `checkpoint`) to `out`; the
    checkpoint's step."""
    from transformers import GenerationConfig

    from jtok.run.rundir import load_run

    run_dir, out = Path(run_dir), Path(out)
    _check_out(out, overwrite)
    run_cfg, model, state = load_run(run_dir, checkpoint)
    refuse_non_finite(model, state["step"])
    tokenizer = hf_tokenizer(run_dir / TOKENIZER_FILE, run_cfg.model.max_seq_len)
    hf = model.hf.eval()
    eos = tokenizer.eos_token_id
    hf.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos)
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        with _quiet_loading():
            save_retrofit(hf, tmp)
        tokenizer.save_pretrained(tmp)
        _check_out(out, overwrite)  # still as checked (nothing appeared meanwhile)
        replace_dir(tmp, out)
    except OSError as err:
        raise ExportError(f"cannot write {out}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return int(state["step"])
