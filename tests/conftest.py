"""Shared test helpers: exact per-example gradients from torch.func, laid out as logix rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from logix.hooks import named_modules
from logix.kinds import kind_of


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def exact_gradients(model: nn.Module, example_loss, *batch) -> dict[str, torch.Tensor]:
    """{module name: (B, d_out, d_in [+1 bias column])} exact per-example gradients.

    example_loss(model_output, *targets_of_one_example_with_batch_dim_1) -> scalar: the loss of one
    example. batch: tensors whose first dim is the batch; the first is the model input, the rest
    are passed to example_loss. Computed with vmap(grad(...)) over functional_call, then laid out
    with each module kind's `as_matrix` (the row contract).
    """
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, *rest):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return example_loss(out, *(r.unsqueeze(0) for r in rest))

    grads = vmap(grad(one), in_dims=(None,) + (0,) * len(batch))(params, *batch)
    out = {}
    raw_names = {id(m): n for n, m in model.named_modules()}
    for name, module in named_modules(model):
        raw = raw_names[id(module)]
        prefix = f"{raw}." if raw else ""
        kind = kind_of(module)
        if kind is None or f"{prefix}weight" not in grads:
            continue
        w = grads[f"{prefix}weight"]
        b = grads.get(f"{prefix}bias")
        out[name] = torch.stack([kind.as_matrix(module, w[i], None if b is None else b[i]) for i in range(w.shape[0])])
    return out


def projected(exact: torch.Tensor, p_in: torch.Tensor | None, p_out: torch.Tensor | None) -> torch.Tensor:
    """P_out G P_in^T for a batch of exact gradients G (None = identity side)."""
    g = exact.double()
    if p_out is not None:
        g = p_out.double() @ g
    if p_in is not None:
        g = g @ p_in.double().T
    return g.float()
