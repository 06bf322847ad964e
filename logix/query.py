"""Query gradients: capture test examples' rows with the log's own modules and projections.

    with log.query(model) as q:
        for ids, x, y in test_loader:
            with q.capture(ids):
                F.cross_entropy(model(x), y).backward()
    log.influence(q, preconditioner="ekfac")

Nothing is written: the (few) query rows stay in memory. The model must hold every logged module,
under the same (normalised) names, with the same dimensions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .call_groups import PendingRows
from .capture import Capture, LossSpec, refuse_unentered, running
from .disk.writer import nonfinite_rows
from .errors import CaptureError, ModelMismatchError
from .hooks import Watched, named_modules
from .kinds import kind_of
from .results import as_ids


class Query:
    """In-memory rows of query examples, laid out exactly like the log's rows."""

    def __init__(self, log, model: nn.Module):
        self.log = log
        modules = dict(named_modules(model))
        projections = log.projections()
        watched, problems = [], []
        for name, info in log.modules.items():
            module = modules.get(name)
            kind = kind_of(module) if module is not None else None
            if kind is None:
                problems.append(f"{name!r} missing")
                continue
            if kind.dims(module) != (info.d_in, info.d_out) or kind.name != info.kind:
                problems.append(
                    f"{name!r} is {kind.name} {kind.dims(module)}, logged {info.kind} {(info.d_in, info.d_out)}"
                )
                continue
            p_in, p_out = projections[name]
            watched.append(
                Watched(name, module, kind, info.d_in, info.d_out, info.k_in, info.k_out, info.offset, p_in, p_out)
            )
        if problems:
            raise ModelMismatchError(f"the model does not match the log {log.path}: " + "; ".join(problems))
        self.watched = watched
        self._rows: list[Tensor] = []
        self._ids: list = []
        self._last_capture: Capture | None = None
        self._closed = False

    def __enter__(self) -> Query:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def capture(
        self,
        ids: Any,
        *,
        mask: Tensor | None = None,
        reduction: str = "mean",
        scale: float | Tensor | None = None,
        scaler: Any = None,
    ) -> Capture:
        """Capture query examples' gradients; same arguments and loss conventions as Run.capture."""
        self._refuse_unentered()
        loss = LossSpec(mask, reduction, scale, scaler)
        self._last_capture = Capture(self.watched, ids, loss, accept=self._accept, label="q.capture")
        return self._last_capture

    def _refuse_unentered(self) -> None:
        """Raise (once) if the last capture was created but never entered."""
        cap = self._last_capture
        if cap is not None and not cap.entered:
            self._last_capture = None
            refuse_unentered(cap)

    @property
    def active_capture(self) -> Capture | None:
        """The capture whose block is running now, if any (framework adapters hook its loss)."""
        return running(self._last_capture)

    def _accept(self, ids: list, pending: PendingRows, factor: float) -> None:
        rows = pending.assemble()
        nonfinite = nonfinite_rows(rows)
        if bool(nonfinite.any()):
            bad = [i for i, no in zip(ids, nonfinite.tolist()) if no]
            raise CaptureError(f"query gradients are not finite for ids {bad[:5]}")
        self._rows.append(rows.detach().float().cpu())
        self._ids.extend(ids)

    @property
    def rows(self) -> Tensor:
        """(Q, D) float32 query rows, in capture order."""
        self._refuse_unentered()  # scoring reads these: a batch never captured must not go missing silently
        if not self._rows:
            return torch.zeros(0, self.log.width)
        return torch.cat(self._rows)

    @property
    def ids(self) -> np.ndarray:
        """Query ids in capture order, aligned with `rows`: int64, or an object array of str (as `Log.ids`)."""
        return as_ids(self._ids)

    def __len__(self) -> int:
        return len(self._ids)
