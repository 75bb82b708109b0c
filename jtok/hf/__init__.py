"""The Hugging Face transformers bridge: jtok models as `AutoModelForCausalLM`.

Importing this package registers `JTokConfig` (model_type "jtok") with `AutoConfig` and
`JTokForCausalLM` with `AutoModelForCausalLM`, so a directory written by `jtok export`
(or `save_pretrained`) loads with::

    import jtok.hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DIR)              # or table_placement="host"
    tokenizer = AutoTokenizer.from_pretrained(DIR)                 # left padding, eos = pad
    batch = tokenizer(["the king", "love"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=20, do_sample=False)

Without the import, ``trust_remote_code=True`` does the same where jtok is installed (the
saved config's auto_map points at a two-line modeling_jtok.py that imports this package).

jtok's model and tables never import this package; it needs the optional extra:
``pip install 'jtok[transformers]'`` (transformers 5.x).
"""

from __future__ import annotations

MISSING_EXTRA = ("the Hugging Face bridge needs transformers 5.x: pip install "
                 "'jtok[transformers]'")  # fmt: skip

try:
    import transformers
except ImportError as _err:
    raise ImportError(MISSING_EXTRA) from _err

if not transformers.__version__.startswith("5."):
    raise ImportError(f"{MISSING_EXTRA} (found transformers {transformers.__version__})")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from jtok.hf.configuration import MODEL_TYPE, JTokConfig  # noqa: E402
from jtok.hf.modeling import JTokForCausalLM  # noqa: E402


def register() -> None:
    """Register the jtok classes with AutoConfig / AutoModelForCausalLM (idempotent)."""
    AutoConfig.register(MODEL_TYPE, JTokConfig, exist_ok=True)
    AutoModelForCausalLM.register(JTokConfig, JTokForCausalLM, exist_ok=True)


register()

__all__ = ["MISSING_EXTRA", "JTokConfig", "JTokForCausalLM", "register"]
