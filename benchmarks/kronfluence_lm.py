"""Kronfluence EK-FAC on the tiny language model of lm_task.py, for attribution_quality.py --task lm.

Kronfluence tracks nn.Linear (and Conv2d) modules; GPT-2's transformers.Conv1D layers are the same
map with the weight transposed, so a copy of the model with each Conv1D swapped for an nn.Linear
gives Kronfluence the modules logix watches (attention, MLP and the untied output layer). Train
loss: each sequence's summed next-token cross-entropy, padding masked (and left out of the
activation covariances through the attention mask); with `sampled`, the labels drawn from the
model (Kronfluence's true Fisher), else the observed ones (the empirical Fisher). Damping:
Kronfluence's own heuristic, 0.1 x the mean eigenvalue per module.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings

import lm_task  # the tiny language model task (this folder)
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def installed() -> bool:
    try:
        import kronfluence.analyzer  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken: the row is skipped
        return False
    return True


def as_linear(model: nn.Module) -> nn.Module:
    """A copy of the model with every transformers Conv1D replaced by the equivalent nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return out


def scores(model: nn.Module, data: lm_task.Data, sampled: bool, batch: int = 50) -> tuple[np.ndarray, float]:
    """(queries, train) Kronfluence EK-FAC influence (positive = helps) and the seconds it took."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class Sequences(Task):
        def compute_train_loss(self, batch, model, sample=False):
            ids, mask = batch
            logits = lm_task.logits(model, ids, mask)
            if not sample:
                return lm_task.sequence_losses(logits, ids, mask).sum()
            with torch.no_grad():
                probs = torch.softmax(logits[:, :-1].detach(), dim=-1)
                drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(probs.shape[:-1])
            token = F.cross_entropy(logits[:, :-1].transpose(1, 2), drawn, reduction="none")
            return (token * mask[:, 1:]).sum()

        def compute_measurement(self, batch, model):
            ids, mask = batch
            return lm_task.sequence_losses(lm_task.logits(model, ids, mask), ids, mask).sum()

        def get_attention_mask(self, batch):
            return batch[1]

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    linear = as_linear(model).eval()
    ids, mask = lm_task.pad(data.query)
    with torch.no_grad():
        same = torch.allclose(lm_task.logits(linear, ids, mask), lm_task.logits(model, ids, mask), atol=1e-5)
    if not same:
        raise RuntimeError("the Conv1D -> Linear copy does not compute the same logits")
    task = Sequences()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="logix-kronfluence-lm-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # kronfluence's torch.cuda.amp spellings
        analyzer = Analyzer(
            "lm",
            prepare_model(linear, task),
            task,
            cpu=True,
            disable_tqdm=True,
            disable_model_save=True,
            output_dir=tmp,
        )
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=lm_task.pad))
        factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=not sampled)
        analyzer.fit_all_factors("ekfac", dataset=data.train, per_device_batch_size=batch, factor_args=factor_args)
        analyzer.compute_pairwise_scores(
            "scores",
            factors_name="ekfac",
            query_dataset=data.query,
            train_dataset=data.train,
            per_device_query_batch_size=len(data.query),
            per_device_train_batch_size=batch,
            score_args=ScoreArguments(damping_factor=None),  # 0.1 x mean eigenvalue per module
        )
        values = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    return values, time.perf_counter() - start
