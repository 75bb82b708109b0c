"""`JTokLM`: a jtok model as an lm-evaluation-harness model, registered as "jtok".

    lm_eval --model jtok --model_args run=RUN_DIR,batch_size=16 --tasks ...   # after import
    JTokLM(run="RUN_DIR")            # a training run: load_run + the run's tokenizer.json
    JTokLM(pretrained="EXPORT_DIR")  # a `jtok export` directory (needs jtok[transformers])

Scoring (`loglikelihood`, `loglikelihood_rolling`) runs full forwards over right-padded
batches (a continuation longer than the context window is scored in several windows,
each token once, with as much preceding text as fits): attention is causal and the MoE
is dropless, so padding after a row's last token changes nothing that row's scored
positions see, and no attention mask is needed. Rows are
sorted by length (longest first), so a batch holds little padding and the first batch
shows whether memory suffices. Log-probabilities are taken in fp32 (log_softmax of the
logits cast to float), under the run's precision setting (bf16 autocast on CUDA by
default, like `jtok eval`).

`generate_until` goes through `jtok.inference.generate.generate_batch` (KV cache,
left-padded prompts), greedy unless the task asks for sampling; it stops at the
end-of-text id or the token budget, and the task's stop strings are applied after
decoding (the text is cut before the earliest one).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from jtok.evaluation import require_lm_eval

require_lm_eval()

# lm-eval fills its model registry with its own models (hf, vllm, ...) lazily, only while
# the registry is empty: registering "jtok" first would hide them from later
# `simple_evaluate(model="hf")` calls in this process, so they are imported first.
import lm_eval.models  # noqa: E402, F401
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from jtok.data import EOT_TOKEN, load_tokenizer  # noqa: E402
from jtok.errors import JTokError  # noqa: E402

DEFAULT_MAX_GEN_TOKS = 256


class EvalModelError(JTokError, ValueError):
    """The lm-eval model was asked for something it cannot do."""


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@register_model("jtok")
class JTokLM(TemplateLM):
    """lm-eval's LM interface over a `JTokModel` and the run's tokenizer."""

    def __init__(self, run: str | Path | None = None, checkpoint: str | Path | None = None,
                 pretrained: str | Path | None = None, device: str | None = None,
                 table_placement: str = "device", batch_size: int | str = 16,
                 max_length: int | None = None, precision: str | None = None,
                 model: torch.nn.Module | None = None, tokenizer: Any = None,
                 **_ignored: Any) -> None:  # fmt: skip
        super().__init__()
        self.step: int | None = None  # the checkpoint's training step, where known
        from jtok.parallel.distributed import resolve_device

        if model is not None:  # already loaded (tests, notebooks)
            if tokenizer is None:
                raise EvalModelError("JTokLM(model=...) needs tokenizer= too")
            self.model, self.tokenizer = model, tokenizer
            self.precision = precision or "fp32"
        elif (run is None) == (pretrained is None):
            raise EvalModelError("JTokLM needs exactly one of run=RUN_DIR or pretrained=DIR")
        elif run is not None:
            from jtok.run.files import CONFIG_FILE, RUN_INFO_FILE, TOKENIZER_FILE
            from jtok.run.rundir import load_run, saved_run_config

            run = Path(run)
            if (run / CONFIG_FILE).is_file() and not (run / RUN_INFO_FILE).is_file():
                raise EvalModelError(f"{run} is not a run but (likely) a `jtok export` "
                                     "folder: pass it as pretrained=DIR")  # fmt: skip
            saved = saved_run_config(run)
            dev = resolve_device(device or saved.train.device)
            run_cfg, self.model, state = load_run(run, checkpoint, device=dev,
                                                  table_placement=table_placement)  # fmt: skip
            self.step = int(state["step"])
            self.tokenizer = load_tokenizer(run / TOKENIZER_FILE)
            self.precision = precision or run_cfg.train.precision
        else:
            import jtok.hf  # noqa: F401  (registers the Auto classes)
            from jtok.hf.modeling import JTokForCausalLM
            from jtok.hf.retrofit_io import is_saved_retrofit

            if is_saved_retrofit(pretrained):
                raise EvalModelError(f"{pretrained} is the export of a retrofitted Hugging "
                                     "Face model, which JTokLM does not load: pass its run as "
                                     "run=RUN_DIR (jtok.load_retrofit loads the export)")

            hf = JTokForCausalLM.from_pretrained(str(pretrained),
                                                 table_placement=table_placement)  # fmt: skip
            dev = resolve_device(device or "auto")
            self.model = hf.model.to(dev) if table_placement == "device" else hf.model
            self.tokenizer = load_tokenizer(Path(pretrained) / "tokenizer.json")
            self.precision = precision or "auto"
        self.model.eval()
        self._device = next(self.model.parameters()).device
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 16
        if self.batch_size < 1:
            raise EvalModelError(f"batch_size must be >= 1, got {batch_size}")
        context = self.model.cfg.max_seq_len
        self.max_length = min(int(max_length), context) if max_length else context
        eot = self.tokenizer.token_to_id(EOT_TOKEN)
        if eot is None:
            raise EvalModelError(f"the tokenizer has no {EOT_TOKEN} token")
        self._eot = int(eot)

    # ---- what lm-eval asks of a model ------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "jtok"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:  # fmt: skip
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # ---- scoring -----------------------------------------------------------------------

    def _autocast(self):
        from jtok.training.evaluate import autocast_context

        return autocast_context(self._device, self.precision)

    def _segments(self, context: list[int], continuation: list[int]):
        """(inputs, targets) windows that score each continuation token once, with as
        much preceding text as the context window holds: one window when context and
        continuation fit (the context cut on the left), more for a continuation longer
        than the window. The targets are predicted at the last len(targets) inputs."""
        whole = list(context) + list(continuation)
        window, first, end = self.max_length, len(context), len(whole)
        segments = []
        while end > first:
            begin = max(first, end - window)
            segments.append((whole[max(0, end - 1 - window) : end - 1], whole[begin:end]))
            end = begin
        return segments[::-1]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives it) of each
        (context ids, continuation ids)."""
        rows, owners = [], []
        for p, (context, continuation) in enumerate(pairs):
            if continuation and not context:
                raise EvalModelError("a continuation needs at least one context token")
            for segment in self._segments(context, continuation):
                rows.append(segment)
                owners.append(p)
        scores = [0.0] * len(pairs)
        greedy = [True] * len(pairs)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for begin in range(0, len(order), self.batch_size):
            batch = order[begin : begin + self.batch_size]
            width = len(rows[batch[0]][0])
            ids = torch.zeros(len(batch), width, dtype=torch.long)  # right padding: id 0
            for b, i in enumerate(batch):
                inputs = rows[i][0]
                ids[b, : len(inputs)] = torch.as_tensor(inputs, dtype=torch.long)
            with self._autocast():
                logits_BTV = self.model(ids.to(self._device)).logits
            for b, i in enumerate(batch):
                inputs, targets = rows[i]
                n, k = len(inputs), len(targets)
                logp_KV = F.log_softmax(logits_BTV[b, n - k : n].float(), dim=-1)
                if not bool(torch.isfinite(logp_KV).all()):
                    raise EvalModelError("the model's logits are not finite (NaN or Inf): "
                                         "the checkpoint has diverged")  # fmt: skip
                target_K = torch.as_tensor(targets, device=logp_KV.device)
                scores[owners[i]] += float(logp_KV.gather(1, target_K[:, None]).sum())
                greedy[owners[i]] &= bool((logp_KV.argmax(dim=-1) == target_K).all())
        return list(zip(scores, greedy, strict=True))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # lm-eval's tokenizing loop passes disable= explicitly (TQDM_DISABLE cannot reach it):
        # its progress bar only on a terminal, as jtok's own.
        return super().loglikelihood(requests,
                                     disable_tqdm=disable_tqdm or not sys.stderr.isatty())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:  # fmt: skip
        results = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: disjoint windows of the model's context, each
        token scored once, the first conditioned on end-of-text."""
        pairs, owners = [], []
        for r, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                                self.max_length, context_len=1)  # fmt: skip
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owners, self._score(pairs), strict=True):
            totals[r] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation --------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from jtok.inference.generate import generate_batch

        groups: dict[tuple, list[int]] = {}
        settings = []
        for r, request in enumerate(requests):
            _, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            sample = _flag(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if sample else 0.0
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0) if sample else 1.0
            top_k = int(kwargs.pop("top_k", 0) or 0) if sample else 0
            settings.append(until)
            groups.setdefault((max_new, temperature, top_k, top_p), []).append(r)
        out: list[str] = [""] * len(requests)
        for (max_new, temperature, top_k, top_p), members in groups.items():
            prompts = []
            for r in members:
                ids = self.tok_encode(requests[r].args[0]) or [self.prefix_token_id]
                keep = max(self.max_length - max_new, 1)  # room for the new tokens
                prompts.append(ids[-keep:])
            news = generate_batch(self.model, prompts, max_new, temperature, top_k, top_p,
                                  stop_ids=(self._eot,), batch_size=self.batch_size)  # fmt: skip
            for r, new in zip(members, news, strict=True):
                text = self.tok_decode(i for i in new if i != self._eot)
                for stop in settings[r]:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out[r] = text
                self.cache_hook.add_partial("generate_until", requests[r].args, text)
        return out
