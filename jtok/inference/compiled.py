"""A model's forward under torch.compile, for decoding (`jtok generate --compile`, `jtok
bench decode --compile`).

Compiled, a JTok-M layer without autograd runs `jtok.tables.mixers._compiled_inference`,
which inductor fuses into a few loops: on the development CPU JTok-M then decodes at about
1.02x the (equally compiled) baseline per token, where eager it takes 1.22x
(benchmarks/README.md). Compilation takes tens of seconds per model on a CPU, once per
process; it pays for long generations, not for a few tokens.
"""

from __future__ import annotations

import types

import torch

from jtok.nn.model import JTokModel
from jtok.tables.store import LazyTokenRows, TokenRows

_ATTRIBUTE = "_jtok_compiled_forward"


def compile_for_decoding(model: JTokModel):
    """`model`'s forward under torch.compile. Shapes are left to Dynamo's automatic dynamism
    (``dynamic=None``): the first recompile marks the sizes that changed (the KV cache's
    position, the batch) dynamic, and everything that never changes stays a constant.
    ``dynamic=True`` would also turn every float attribute of every module (norm and
    table eps, JTok-M's depth factor) into a graph input, made into a tensor on every
    call: 18 extra tensors per JTok-M decode step at L = 6, about 4% of its time on a CPU.
    Dynamo keeps its compiled graphs (and a limit on their number) per code object;
    each model gets its own copy of the forward's code, so that the graphs of several
    models neither evict one another nor have their guards tried on every call of the
    others."""
    plain = type(model).forward
    code = plain.__code__.replace(co_name=f"forward_{id(model):x}")
    fresh = types.FunctionType(code, plain.__globals__, code.co_name, plain.__defaults__,
                               plain.__closure__)  # fmt: skip
    compiled = torch.compile(types.MethodType(fresh, model), dynamic=None)

    def forward(ids_BT, cache=None, token_rows=None):
        # Rows fetched ahead (host tables) are resolved here, before the graph: waiting for
        # the gather inside it would break the graph in the layer loop.
        if isinstance(token_rows, LazyTokenRows):
            token_rows = TokenRows(token_rows.layers, token_rows.inverse_N)
        return compiled(ids_BT, cache=cache, token_rows=token_rows)

    return forward


def compiled_forward(model: JTokModel):
    """The model's compiled forward, made on first use and kept on the model (a plain
    attribute: not a parameter, buffer or submodule, so state_dict and .to() ignore it),
    so that a second generation reuses the compiled graphs."""
    found = model.__dict__.get(_ATTRIBUTE)
    if found is None:
        found = model.__dict__[_ATTRIBUTE] = compile_for_decoding(model)
    return found
