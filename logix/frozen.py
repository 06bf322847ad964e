"""A model held still for a pass that only reads gradients (a query, IF-COMP, a token split, a
logging pass at a fixed checkpoint): its mode set, any `.grad` it held set aside so backward does
not add into it, and both restored on exit; parameters are never touched."""

from __future__ import annotations

from torch import nn


class Frozen:
    """`with Frozen(model):` eval mode (or train mode with train_mode=True), gradients set aside."""

    def __init__(self, model: nn.Module, train_mode: bool = False):
        self.model, self.train_mode = model, train_mode

    def __enter__(self):
        self.was_training = self.model.training
        self.grads = [(p, p.grad) for p in self.model.parameters()]
        for p, _ in self.grads:
            p.grad = None
        self.model.train(self.train_mode)
        return self

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)
        for p, g in self.grads:
            p.grad = g
