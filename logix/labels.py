"""Labels drawn from the model, for curvature passes: the true Fisher instead of the empirical one.

The gradients logged while training use the data's labels, so their second moment is the empirical
Fisher: large where the model is still wrong, near zero where it fits its labels, and so a poor
stand-in for the curvature along training. Drawn from the model's own predictive distribution, the
labels make E[g g^T] the true Fisher, which for softmax cross-entropy is the Gauss-Newton matrix
(GGN) of the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import ConfigError


def sampled_labels(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One class per position drawn from softmax(logits): shape logits.shape[:-1], int64.

    The draw uses `generator` when given (the global RNG, and so the training run, is then
    untouched) and never builds a graph. For a language model, take the logits that predict the
    next token; positions the loss masks out stay masked, whatever is drawn there.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1 or logits.shape[-1] < 1:
        raise ConfigError(f"logits must be a float tensor (..., classes), got {getattr(logits, 'shape', logits)!r}")
    probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    drawn = torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])
    return drawn.to(logits.device)
