"""`jtok export`: a training run as a transformers model directory.

    OUT/
      config.json             JTokConfig: the run's ModelConfig (jtok_model), auto_map
      modeling_jtok.py        the trust_remote_code entry point (imports jtok.hf)
      model.safetensors       the checkpoint's weights (jtok's tensor names, each once)
      generation_config.json  eos / pad token ids (greedy by default)
      tokenizer.json, tokenizer_config.json, ...   a PreTrainedTokenizerFast

The tokenizer is the run's tokenizer.json, with the end-of-text token as eos and as the
pad token, padding on the left (generation pads prompts on the left; the attention mask
hides the pad slots, so reusing end-of-text as padding changes no result).

Everything is checked before anything is written, and the directory is built beside OUT
and renamed into place, so a failure leaves an existing OUT as it was. `--overwrite`
replaces only a directory that holds nothing but what an export writes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from jtok.data import EOT_TOKEN, load_tokenizer
from jtok.errors import JTokError
from jtok.hf.configuration import MODEL_TYPE, REMOTE_CODE_FILE
from jtok.hf.modeling import JTokForCausalLM
from jtok.hf.retrofit_io import is_saved_retrofit
from jtok.io import FileFormatError, read_json, replace_dir
from jtok.run import checkpoint as ckpt
from jtok.run.files import TOKENIZER_FILE

# Every name an export writes (transformers' tokenizer writes some of them by version).
EXPORT_FILES = frozenset({
    "config.json", "generation_config.json", ckpt.MODEL_FILE, REMOTE_CODE_FILE,
    TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
})  # fmt: skip
# End-of-text names, the first the tokenizer knows is eos (jtok data prepare's is first).
EOT_NAMES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>")


class ExportError(JTokError):
    """A run cannot be exported as asked; the message says why."""


def check_out_dir(out: Path, overwrite: bool, allowed: frozenset[str] | set[str] = EXPORT_FILES,
                  ) -> None:  # fmt: skip
    """Refuse an output that is a file, or a non-empty directory unless `overwrite` and it
    holds only what an export writes (`allowed`)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: {parent} is not a writable directory")
    if not out.is_dir():
        return
    present = sorted(p.name for p in out.iterdir())
    if present and not overwrite:
        raise ExportError(f"--out {out} is not empty; use --overwrite to replace an earlier "
                          "export, or choose another directory")  # fmt: skip
    foreign = [name for name in present if name not in allowed]
    if foreign:
        raise ExportError(f"--out {out} holds {foreign[0]!r}, which jtok export does not "
                          "write; --overwrite replaces only an earlier export")  # fmt: skip
    # A plain Hugging Face model (a retrofit's source, say) holds the same file names as an
    # export; an export is recognised by what only jtok writes.
    if "config.json" in present and not _is_jtok_export(out):
        raise ExportError(f"--out {out} holds a Hugging Face model that is not a jtok export; "
                          "--overwrite replaces only an earlier export")  # fmt: skip


def _is_jtok_export(folder: Path) -> bool:
    """A native export (config.json of model_type "jtok") or a retrofit export (with its
    jtok_retrofit.json)."""
    if is_saved_retrofit(folder):
        return True
    try:
        return read_json(folder / "config.json").get("model_type") == MODEL_TYPE
    except (FileFormatError, OSError, AttributeError):  # unreadable, or not a mapping
        return False


def hf_tokenizer(tokenizer_file: Path, max_length: int):
    """The run's tokenizer as a PreTrainedTokenizerFast: eos = pad = end-of-text, left
    padding, model_max_length = the model's context."""
    from transformers import PreTrainedTokenizerFast

    raw = load_tokenizer(tokenizer_file)
    eos = next((name for name in EOT_NAMES if raw.token_to_id(name) is not None), None)
    if eos is None:
        raise ExportError(f"tokenizer {tokenizer_file} has no end-of-text token (tried "
                          f"{list(EOT_NAMES)})")  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=eos,
                                   pad_token=eos, padding_side="left",
                                   model_max_length=max_length)  # fmt: skip


def refuse_non_finite(model, step: int) -> None:
    """A diverged checkpoint (a NaN or Inf weight) is not exported: eval and generate refuse
    it too, and a shared model should not carry it."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"checkpoint step {step} has non-finite values in {name}: the "
                              "weights have diverged; export an earlier checkpoint "
                              "(--checkpoint)")  # fmt: skip


def from_run(run_dir: Path | str, checkpoint: Path | str | None = None,
             table_placement: str = "device", device: str = "cpu"):  # fmt: skip
    """(JTokForCausalLM, PreTrainedTokenizerFast, checkpoint step) of a training run."""
    from transformers import GenerationConfig

    from jtok.run.rundir import load_run

    run_dir = Path(run_dir)
    run_cfg, model, state = load_run(run_dir, checkpoint, device=device,
                                     table_placement=table_placement)  # fmt: skip
    refuse_non_finite(model, state["step"])
    tokenizer = hf_tokenizer(run_dir / TOKENIZER_FILE, run_cfg.model.max_seq_len)
    eos = tokenizer.eos_token_id
    if eos >= run_cfg.model.vocab_size:
        raise ExportError(f"the tokenizer's end-of-text id {eos} is outside the model's "
                          f"vocabulary ({run_cfg.model.vocab_size})")  # fmt: skip
    hf_model = JTokForCausalLM.from_jtok(model, eos_token_id=eos, pad_token_id=eos)
    hf_model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos)
    return hf_model.eval(), tokenizer, state["step"]


def export_run(run_dir: Path | str, out: Path | str, checkpoint: Path | str | None = None,
               overwrite: bool = False) -> int:  # fmt: skip
    """Write run `run_dir` (its latest checkpoint, or `checkpoint`) to `out`; the step."""
    out = Path(out)
    check_out_dir(out, overwrite)
    model, tokenizer, step = from_run(run_dir, checkpoint)
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check_out_dir(out, overwrite)  # still as checked (nothing appeared meanwhile)
        replace_dir(tmp, out)
    except OSError as err:  # a full disk, a permission: one line, OUT left as it was
        raise ExportError(f"cannot write {out}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return step
