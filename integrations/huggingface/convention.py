"""The loss convention: how a HuggingFace model's `outputs.loss` relates to each example's own loss
(the sum of its label-token losses after the causal shift, or a classifier's example loss), checked
against the logits on the first batch; and what the callback, log_dataset and lm_query share: the
default statistics and excluded modules, one batch's capture."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logix.errors import CaptureError

IGNORE_INDEX = -100
_LOSS_RTOL = 2e-3


def _shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss shifts labels (causal LM: position t predicts label t+1)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss

        if getattr(model, "loss_function", None) is ForCausalLMLoss:
            return True
    except Exception:  # noqa: BLE001 - older transformers, or a model without loss_function
        pass
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


class _LossConvention:
    """How a HuggingFace model's `outputs.loss` relates to its examples' own losses.

    outputs.loss = sum over the batch's label items of their loss / N, where N is
    `num_items_in_batch` when given, else the number of label items (labels != -100, after the
    shift for a causal LM) in the batch. The first batch is checked against the logits.
    """

    def __init__(self, model: nn.Module, check: bool = True):
        self.shift = _shifts_labels(model)
        self.check = check
        self.checked = False

    def items(self, labels: Tensor, shift: bool | None = None) -> Tensor:
        shift = self.shift if shift is None else shift
        if shift and labels.dim() >= 2:
            labels = labels[..., 1:]
        return labels.ne(IGNORE_INDEX).sum()

    def divisor(self, labels: Tensor, num_items: Any, shift: bool | None = None) -> Any:
        """N, as a Python number or a 0-d tensor (never zero: an empty batch's rows are zero anyway)."""
        if num_items is not None:
            return num_items
        return int(self.items(labels, shift).clamp(min=1))

    def verify(self, output: Any, loss: Tensor, labels: Tensor, num_items: Any, shift: bool | None = None) -> None:
        """On the first batch: recompute the loss from the logits; adopt the shift that explains it.

        shift: given (False for `shift_labels`, which are aligned with the logits already), only that
        convention is tried.
        """
        if not self.check or self.checked:
            return
        logits = _get(output, "logits")
        if not isinstance(logits, Tensor) or labels.is_floating_point():
            self.checked = True  # regression, multi-label or custom heads: trusted as documented
            return
        with torch.no_grad():
            got = float(loss.detach().float())
            tried = []
            for candidate in (self.shift, not self.shift) if shift is None else (shift,):
                own = _own_losses(logits, labels, candidate)
                if own is None:
                    continue
                n = float(num_items) if num_items is not None else max(int(self.items(labels, candidate)), 1)
                want = float(own.sum()) / n
                tried.append(f"{want:.6g} ({'shifted' if candidate else 'unshifted'} labels)")
                if math.isclose(got, want, rel_tol=_LOSS_RTOL, abs_tol=1e-6):
                    if shift is None and labels.dim() >= 2:
                        self.shift = candidate
                    self.checked = True
                    return
                if labels.dim() < 2:
                    break
        if not tried:
            self.checked = True
            return
        raise CaptureError(
            f"the model's loss {got:.6g} is not the sum of its label tokens' cross-entropy divided by "
            f"{'num_items_in_batch' if num_items is not None else 'the number of label tokens'} "
            f"(expected {' or '.join(tried)}). logix logs each example's own loss and can only divide out "
            "a known reduction: label smoothing, class weights or another loss inside the model cannot be "
            "logged by this integration (log with logix.init/run.capture in your own loop, or pass "
            "check_loss=False if the loss is a sum of per-example losses divided by that count)"
        )


def _own_losses(logits: Tensor, labels: Tensor, shift: bool) -> Tensor | None:
    """(B,) sums of each example's label-item cross-entropies, or None if the shapes do not fit."""
    labels = labels.to(logits.device)
    logits = logits.detach().float()
    if labels.dim() == 1:
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            return None
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    if logits.shape[:-1] != labels.shape:
        return None
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return ce.reshape(labels.shape[0], -1).sum(dim=1)


def _get(output: Any, key: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(key)
    return getattr(output, key, None)


def _model_loss(output: Any) -> Tensor | None:
    loss = _get(output, "loss")
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        loss = output[0] if output[0].numel() == 1 else None
    return loss


def _batch_mask(model: nn.Module, kwargs: Mapping, batch: int) -> Tensor | None:
    """The (B, T) attention mask, for the capture to leave padding out (decoder-only and encoder models).

    An encoder-decoder's mask covers the encoder's positions only, and the decoder's could have the
    same length by chance: no mask there (padded positions get no gradient either way; the mask
    only keeps them out of the activation statistics).
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] == batch:
        return mask
    return None


def _loss_labels(kwargs: Mapping) -> tuple[Any, bool | None]:
    """The labels the model's loss uses, and the shift to assume (`shift_labels` are pre-shifted)."""
    shifted = kwargs.get("shift_labels")
    if isinstance(shifted, Tensor):
        return shifted, False
    return kwargs.get("labels"), None


# -- what every job of the adapter shares ------------------------------------------------------------

DEFAULT_STATISTICS = ("ekfac",)
# Position embeddings look up (1, T) positions shared by the whole batch (GPT-2's wpe, BERT's
# position_embeddings when position_ids are not passed): they have no per-example gradient.
DEFAULT_EXCLUDE = ("*wpe", "*position_embeddings", "*embed_positions")


def _exclude(exclude: Iterable[str] | None) -> tuple:
    return DEFAULT_EXCLUDE if exclude is None else tuple(exclude)


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _capture_batch(capture, model: nn.Module, inputs: dict, ids: Any, convention: _LossConvention) -> None:
    """One forward and backward of `model(**inputs)` inside `capture(...)`, with the HF loss convention."""
    labels, shift = _loss_labels(inputs)
    scale = 1.0 / convention.divisor(labels, None, shift)
    with capture(ids, mask=_batch_mask(model, inputs, labels.shape[0]), reduction="sum", scale=scale) as cap:
        output = model(**inputs)
        loss = _model_loss(output)
        if not isinstance(loss, Tensor):
            raise CaptureError("the model returned no loss for a batch with labels")
        convention.verify(output, loss, labels, None, shift)
        cap.loss(loss).backward()
    for p in model.parameters():
        p.grad = None
