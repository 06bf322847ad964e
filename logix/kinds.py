"""Per-module-kind math: how a layer's input and output gradient become per-position vectors.

For every supported layer, y_t = W a_t (+ b) at each position t (a token, a conv patch), so the
gradient of one example's loss is G = sum_t delta_t a_t^T with delta = d loss / d y. A kind says
how to turn the layer's input into activations a of shape (B, positions..., d_in), its output
gradient into delta of shape (B, positions..., d_out), and how the layer's parameters lay out as
the (d_out, d_in [+1 bias column]) matrix that a logged row equals at full rank. Adding a kind
touches only this file: subclass `Kind` and register it for a module type.

Dimensions come from module attributes, never from weight shapes (ZeRO-3 partitions parameters
to shape (0,)).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError


class Kind:
    """Default behaviour: a dense layer whose activations are the layer input itself."""

    name = "linear"
    matmul = True  # computed by a matrix product, so autocast runs it in its low-precision dtype
    defers = False  # activations(x) is x and output_grads(g) is g: small calls are projected in groups

    def has_bias(self, module: nn.Module) -> bool:
        return getattr(module, "bias", None) is not None

    def dims(self, module: nn.Module) -> tuple[int, int]:
        """(d_in, d_out) of the gradient matrix, d_in counting the bias column."""
        raise NotImplementedError

    def check(self, module: nn.Module) -> None:
        """Raise ConfigError if this instance of the kind cannot be captured exactly."""

    def activations(self, module: nn.Module, x: Tensor) -> Tensor:
        """Layer input -> (B, *positions, d_in without bias)."""
        raise NotImplementedError

    def output_grads(self, module: nn.Module, grad: Tensor) -> Tensor:
        """d loss / d output -> (B, *positions, d_out), positions matching `activations`."""
        raise NotImplementedError

    def project_inputs(self, module: nn.Module, x: Tensor, proj_t: Tensor | None) -> Tensor:
        """(B, *positions, k_in) in float32: P_in [a; 1], or [a; 1] itself when proj_t is None.

        proj_t is P_in transposed, (d_in [+1], k_in), so the bias column is its last row; the
        product runs in proj_t's dtype.
        """
        a = self.activations(module, x)
        bias = self.has_bias(module)
        if proj_t is None:  # a copy, never the caller's input: the rows are formed later (PendingRows)
            a = a.float() if bias else a.to(torch.float32, copy=True)
            if bias:
                a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
            return a
        a = a.to(proj_t.dtype)
        d = a.shape[-1]
        if bias:
            return torch.addmm(proj_t[d], a.reshape(-1, d), proj_t[:d]).reshape(*a.shape[:-1], -1).float()
        return (a @ proj_t).float()

    def as_matrix(self, module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Parameters (or their gradients) as the (d_out, d_in [+1]) matrix a full-rank row equals."""
        w = weight.reshape(weight.shape[0], -1)
        return w if bias is None else torch.cat([w, bias.reshape(-1, 1)], dim=1)


class LinearKind(Kind):
    name = "linear"
    defers = True

    def dims(self, module):
        return module.in_features + self.has_bias(module), module.out_features

    def activations(self, module, x):
        return x

    def output_grads(self, module, grad):
        return grad


class GPT2Conv1DKind(LinearKind):
    """transformers' `Conv1D` (GPT-2): y = x @ W + b with W stored as (d_in, d_out)."""

    name = "conv1d_transposed"

    def dims(self, module):
        return module.nx + self.has_bias(module), module.nf

    def as_matrix(self, module, weight, bias):
        return super().as_matrix(module, weight.T, bias)


class ConvKind(Kind):
    """nn.Conv1d / nn.Conv2d: activations are the unfolded input patches, one per output position."""

    name = "conv"

    def __init__(self, spatial: int):
        self.spatial = spatial
        self.name = f"conv{spatial}d"

    def check(self, module):
        if module.groups != 1:
            raise ConfigError(
                f"{type(module).__name__} with groups={module.groups} is not supported: its gradient is "
                "block-diagonal over groups; exclude the module (watch(..., exclude=[name]))"
            )

    def dims(self, module):
        d_in = module.in_channels * _prod(module.kernel_size) + self.has_bias(module)
        return d_in, module.out_channels

    def _padding(self, module) -> list[int]:
        """Explicit (left, right) padding per spatial dim, last dim first, as F.pad wants it."""
        pads = []
        for i in reversed(range(self.spatial)):
            k, dil = module.kernel_size[i], module.dilation[i]
            if module.padding == "same":
                total = dil * (k - 1)
                pads += [total // 2, total - total // 2]
            elif module.padding == "valid":
                pads += [0, 0]
            else:
                pads += [module.padding[i], module.padding[i]]
        return pads

    def activations(self, module, x):
        pads = self._padding(module)
        if any(pads):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pads, mode=mode)
        if self.spatial == 1:
            x = x.unsqueeze(2)
            kernel, dil, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
        else:
            kernel, dil, stride = module.kernel_size, module.dilation, module.stride
        patches = F.unfold(x, kernel, dilation=dil, stride=stride)  # (B, C_in*k, L)
        return patches.transpose(1, 2)

    def output_grads(self, module, grad):
        return grad.flatten(2).transpose(1, 2)


class EmbeddingKind(Kind):
    """nn.Embedding: the input is a one-hot index, so P_in a_t is a column of P_in."""

    name = "embedding"
    matmul = False  # a lookup: autocast leaves it in the weight's dtype

    def has_bias(self, module):
        return False

    def check(self, module):
        if module.scale_grad_by_freq:
            raise ConfigError("nn.Embedding(scale_grad_by_freq=True) mixes examples in the gradient; exclude it")

    def dims(self, module):
        return module.num_embeddings, module.embedding_dim

    def project_inputs(self, module, x, proj_t):
        if proj_t is None:
            a = F.one_hot(x, module.num_embeddings).float()
        else:
            a = proj_t[x]
        if module.padding_idx is not None:
            a = a * (x != module.padding_idx).unsqueeze(-1)
        return a

    def output_grads(self, module, grad):
        return grad

    def as_matrix(self, module, weight, bias):
        return weight.T


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


_REGISTRY: dict[type, Kind] = {
    nn.Linear: LinearKind(),
    nn.Conv1d: ConvKind(1),
    nn.Conv2d: ConvKind(2),
    nn.Embedding: EmbeddingKind(),
}


def register(module_type: type, kind: Kind) -> None:
    """Teach logix a new module type (exact type match, subclasses included)."""
    _REGISTRY[module_type] = kind


def kind_of(module: nn.Module) -> Kind | None:
    """The kind that handles this module, or None if logix does not capture it."""
    _register_transformers()
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def _register_transformers() -> None:
    # Only if the user already imported transformers: logix never imports it itself.
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    if conv1d is not None and conv1d not in _REGISTRY:
        _REGISTRY[conv1d] = GPT2Conv1DKind()
