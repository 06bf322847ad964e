"""Watched module calls of equal shape, finished together in one batched operation per group.

A hook call in eager PyTorch costs a few microseconds per torch operation whatever the tensor
size, so a small model's capture cost is the number of operations, not the arithmetic. The hooks
(logix.hooks) therefore only hold each call's input and output gradient (`Call`); when the capture
ends, the Collector groups the calls that share a shape (`group_calls`) and, per group, projects
both sides with one batched matmul each (`stacked_sides`, with the group's `GroupPlan`), applies
the mask, feeds the statistics, and keeps what the rows are made of (`RowParts`): the rows
themselves are formed later, per group, by whoever takes the batch (`PendingRows`: on a CPU the
writer thread, several batches at once). The operations per step then grow with the number of
distinct module shapes, not of modules.

Large tensors are projected in the hook itself (the input as soon as the forward has it, so it is
not held to the backward, e.g. in float32 under autocast), and finished calls are processed early
once they hold FLUSH_ELEMENTS numbers: memory stays bounded for large models, where a few
operations more per module cost nothing measurable.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT32 = torch.float32

DEFER_NUMEL = 1 << 15  # an input or output gradient up to this many elements is projected with its group
FLUSH_ELEMENTS = 4 << 20  # finished calls hold at most about this many numbers before their groups are processed


class Call:
    """One watched module call: its input (raw, or projected already) and, once the backward reached
    it, its output gradient (raw or projected). Raw sides carry the dtype to project them in.

    A call is itself the hook that receives its output gradient (no closure to build per call): the
    pre-hook of its output's autograd node, called with the node's gradients (`slot` picks its
    own), or, for an output that is a leaf, a tensor hook (`slot` None)."""

    __slots__ = ("collector", "w", "acts", "acts_raw", "a_dtype", "masked", "slot", "grads", "grads_raw", "g_dtype")

    def __init__(self, collector, w, acts: Tensor, acts_raw: bool, a_dtype):
        self.collector, self.w, self.acts, self.acts_raw, self.a_dtype = collector, w, acts, acts_raw, a_dtype
        self.masked, self.slot, self.grads, self.grads_raw, self.g_dtype = False, 0, None, False, torch.float32

    def __call__(self, grads) -> None:
        collector = self.collector
        if collector._active:  # else a backward after the capture ended: not ours to record
            grad = grads if self.slot is None else grads[self.slot]
            if grad is not None:
                collector.arrived(self, grad)

    def key(self) -> tuple:
        """Calls with equal keys are finished in one group."""
        a, g = self.acts, self.grads
        return (self.w.group_key, a.shape, a.dtype, self.acts_raw, self.a_dtype, g.shape, g.dtype, self.grads_raw,
                self.g_dtype, self.masked, a.get_device())  # fmt: skip


def group_calls(calls: list[Call]) -> list[list[Call]]:
    """The calls in groups of equal keys (in the order their first call finished)."""
    groups: dict[tuple, list[Call]] = {}
    for call in calls:
        groups.setdefault(call.key(), []).append(call)
    return list(groups.values())


class GroupPlan:
    """What finishing a group of modules' calls needs, resolved once and cached on the group's first
    module (in its projections' cache, cleared when they change): the stacked transposed projections
    of the raw sides as ready views (2-D ones for a group of one call), and the group's row columns.
    Building it turns each module's own projection copy into a view of the stack: no memory added."""

    def __init__(self, ws: list, device: torch.device, in_dtype, out_dtype):
        self.bias = ws[0].has_bias
        self.in_weight = self.in_bias = self.in_weight_2d = self.in_bias_2d = None
        self.out_weight = self.out_weight_2d = None
        if in_dtype is not None and ws[0].proj_in is not None:
            stack = self._stack(ws, 0, device, in_dtype)  # (E, d [+1], k_in): P_in^T, bias row last
            d = stack.shape[1] - self.bias
            self.in_weight, self.in_bias = stack[:, :d], (stack[:, d:] if self.bias else None)
            self.in_weight_2d, self.in_bias_2d = stack[0, :d], (stack[0, d] if self.bias else None)
        if out_dtype is not None and ws[0].proj_out is not None:
            self.out_weight = self._stack(ws, 1, device, out_dtype)  # (E, d_out, k_out): P_out^T
            self.out_weight_2d = self.out_weight[0]
        self.index = torch.cat([torch.arange(w.offset, w.offset + w.width, device=device) for w in ws])
        ends = [(w.offset, w.offset + w.width) for w in ws]
        consecutive = all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
        self.run = range(ends[0][0], ends[-1][1]) if consecutive else None  # the columns as one run, if they are

    @staticmethod
    def _stack(ws: list, side: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        per_module = [w.projections(device, dtype) for w in ws]
        stack = torch.stack([pair[side] for pair in per_module])
        for w, pair, view in zip(ws, per_module, stack):
            w._cache[(device, dtype)] = (view, pair[1]) if side == 0 else (pair[0], view)
        return stack


def plan_for(ws: list, first: Call) -> GroupPlan:
    device = first.acts.device
    in_dtype = first.a_dtype if first.acts_raw else None
    out_dtype = first.g_dtype if first.grads_raw else None
    key = ("plan", tuple(map(id, ws)), device, in_dtype, out_dtype)  # ids stay unique: the entry holds the objects
    hit = ws[0]._cache.get(key)
    if hit is not None:
        return hit[1]
    plan = GroupPlan(ws, device, in_dtype, out_dtype)
    ws[0]._cache[key] = (tuple(ws), plan)
    return plan


def _project(xs: list[Tensor], weight, bias, weight_2d, bias_2d, dtype, append_one: bool) -> Tensor:
    """(E, B, T, k) float32 from E raw tensors (B, *positions, d): x P^T (+ the bias row), or, with no
    projection (weight None), x itself with a 1 appended where the layer has a bias."""
    x = xs[0]
    e, b, d = len(xs), x.shape[0], x.shape[-1]
    flat = x.reshape(-1, d) if e == 1 else torch.stack(xs).reshape(e, -1, d)
    if weight is None:  # full rank; a copy, never the caller's tensor, which PendingRows may outlive
        out = flat.float() if e > 1 or append_one else flat.to(FLOAT32, copy=True)
        if append_one:
            out = torch.cat([out, out.new_ones(out.shape[:-1] + (1,))], dim=-1)
    else:
        if flat.dtype is not dtype:
            flat = flat.to(dtype)
        if e == 1:  # a plain GEMM is cheaper than a batched one of one
            out = flat @ weight_2d if bias_2d is None else torch.addmm(bias_2d, flat, weight_2d)
        else:
            out = torch.bmm(flat, weight) if bias is None else torch.baddbmm(bias, flat, weight)
        if out.dtype is not FLOAT32:
            out = out.float()
    return out.reshape(e, b, -1, out.shape[-1])


def stacked_sides(plan: GroupPlan, calls: list[Call]) -> tuple[Tensor, Tensor]:
    """The group's projected inputs and output gradients, (E, B, T, k_in) and (E, B, T, k_out) float32."""
    first = calls[0]
    acts = [c.acts for c in calls]
    if first.acts_raw:
        p = plan
        acts = _project(acts, p.in_weight, p.in_bias, p.in_weight_2d, p.in_bias_2d, first.a_dtype, p.bias)
    else:
        acts = _stacked(acts)
    grads = [c.grads for c in calls]
    if first.grads_raw:
        grads = _project(grads, plan.out_weight, None, plan.out_weight_2d, None, first.g_dtype, False)
    else:
        grads = _stacked(grads)
    return acts, grads


def _stacked(tensors: list[Tensor]) -> Tensor:
    """(E, B, T, k) from E projected (B, *positions, k)."""
    x = tensors[0]
    stacked = x.unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
    return stacked.reshape(len(tensors), x.shape[0], -1, x.shape[-1])


class RowParts:
    """A batch's rows as they are assembled: each group's part with its columns.

    A group of one position per example (an MLP's layers) keeps its two projected sides, which are
    smaller than their products; a group with several positions keeps the products summed over
    them. `assemble` divides out the loss factor and, where the groups' column runs tile the row
    (each module called once, the usual case), writes each group's products straight into its
    columns of one new row, the factor folded into the smaller side: no concatenation and no pass
    over the whole row to scale it, which on a CPU cost a quarter of an MLP's plain step. Otherwise
    the blocks are added into a zero row at their columns (a module called twice adds up its calls)."""

    def __init__(self, width: int):
        self.width = width
        self.parts: list[tuple[GroupPlan, Tensor, Tensor | None]] = []  # (plan, acts, grads) or (plan, products, None)

    def add(self, plan: GroupPlan, acts: Tensor, grads: Tensor) -> None:
        if acts.shape[2] == 1:
            self.parts.append((plan, acts, grads))
        else:
            self.parts.append((plan, products(acts, grads), None))

    @torch.no_grad()
    def assemble(self, batch: int, device, divisor: float | Tensor = 1.0, out: Tensor | None = None) -> Tensor:
        """(B, width) float32 rows divided by `divisor` (a number or a 0-d tensor), written into `out`
        when given (a float32 (B, width) tensor, such as a view of the writer's staging block)."""
        runs = [(plan.run.start, plan.run.stop, i) for i, (plan, _, _) in enumerate(self.parts) if plan.run is not None]
        runs.sort()
        tiled = len(runs) == len(self.parts) and all(a[1] <= b[0] for a, b in zip(runs, runs[1:]))
        if not tiled:
            rows = torch.zeros(batch, self.width, device=device) if out is None else out.zero_()
            for plan, first, second in self.parts:
                blocks = products(first, second) if second is not None else first
                rows.index_add_(1, plan.index.to(device), blocks.transpose(0, 1).reshape(batch, -1).to(device))
            return rows if _is_one(divisor) else rows.div_(divisor)
        rows = torch.empty(batch, self.width, device=device) if out is None else out
        at = 0
        for start, stop, i in runs:
            if start > at:
                rows[:, at:start].zero_()  # modules that never ran
            plan, first, second = self.parts[i]
            if second is not None:  # (E, B, 1, k_in) and (E, B, 1, k_out): write the products, scaled
                e, k_in, k_out = first.shape[0], first.shape[-1], second.shape[-1]
                out = rows[:, start:stop].view(batch, e, k_out, k_in).transpose(0, 1)
                grads = second if _is_one(divisor) else second / divisor
                torch.mul(grads.transpose(-1, -2), first, out=out)
            else:  # (E, B, k_out, k_in) products
                out = rows[:, start:stop].view(batch, *first.shape[:1], *first.shape[2:]).transpose(0, 1)
                if _is_one(divisor):
                    out.copy_(first)
                else:
                    torch.div(first, divisor, out=out)
            at = stop
        if at < self.width:
            rows[:, at:].zero_()
        return rows


class PendingRows:
    """A captured batch's rows before they are formed: its RowParts, batch, device and loss factor.

    Forming the rows is the one part of a capture whose cost grows with the row width on the
    training thread (on a CPU, an MLP's products took 8% of its plain step, the rows having left
    the cache by then); a CPU writer thread forms them instead, straight into the block it writes
    (`fill_many`), so the training thread only projects. What it holds is the capture's own tensors
    (projections, products and copies; at full rank also the backward's output gradients, which
    nothing changes afterwards), never a tensor of the model's or the user's, so they cannot change
    before the rows are formed. `select` leaves examples out; `assemble` forms the rows here and now."""

    def __init__(self, parts: RowParts, batch: int, device, divisor: float | Tensor, keep: Tensor | None = None):
        self.parts, self.batch, self.device, self.divisor, self.keep = parts, batch, device, divisor, keep
        self.dtype = FLOAT32  # what `fill_many` writes; the writer stores rows in its own dtype
        self.shape = (batch if keep is None else len(keep), parts.width)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def select(self, keep: list[bool]) -> PendingRows:
        """These rows with only the examples whose `keep` is True."""
        index = torch.tensor(keep, dtype=torch.bool).nonzero().flatten()
        if self.keep is not None:
            index = self.keep[index]
        return PendingRows(self.parts, self.batch, self.device, self.divisor, index)

    def stored_as(self, dtype: torch.dtype) -> PendingRows:
        """The same rows, to be filled in `dtype` (the log's storage dtype)."""
        rows = PendingRows(self.parts, self.batch, self.device, self.divisor, self.keep)
        rows.dtype = dtype
        return rows

    def assemble(self, out: Tensor | None = None) -> Tensor:
        """(B, width) float32 rows on the capture's device, formed now (into `out`, if given)."""
        if self.keep is None and (out is None or out.dtype is FLOAT32):
            return self.parts.assemble(self.batch, self.device, self.divisor, out)
        rows = self.parts.assemble(self.batch, self.device, self.divisor)
        rows = rows if self.keep is None else rows[self.keep.to(rows.device)]
        return rows if out is None else out.copy_(rows)

    @staticmethod
    def fill_many(pending: list[PendingRows], out) -> None:
        """Form several batches' rows into consecutive rows of `out` (a host array, float32 or
        float16). Batches alike
        (same groups, same loss factor, no examples left out: the usual run of a training loop)
        are joined first and formed with one product per group, not one per group and batch: the
        writer thread then takes the GIL a few times per write, not a few times per batch, and the
        training thread, which needs it between its own operations, waits less."""
        at = 0
        for run in _alike_runs(pending):
            rows = run[0] if len(run) == 1 else _joined(run)
            rows.assemble(torch.from_numpy(out[at : at + rows.shape[0]]))
            at += rows.shape[0]

    def _signature(self) -> tuple | None:
        """Equal for batches that can be formed as one; None for one that cannot be joined."""
        if self.keep is not None or isinstance(self.divisor, Tensor):
            return None
        return self.device, self.divisor, tuple((plan, second is None) for plan, _, second in self.parts.parts)


def _alike_runs(pending: list[PendingRows]) -> list[list[PendingRows]]:
    runs: list[list[PendingRows]] = []
    last = None
    for rows in pending:
        signature = rows._signature()
        if runs and signature is not None and signature == last:
            runs[-1].append(rows)
        else:
            runs.append([rows])
        last = signature
    return runs


def _joined(run: list[PendingRows]) -> PendingRows:
    """One PendingRows for a run of alike batches: each group's sides (or products) joined along
    the batch (dimension 1 of (E, B, ...))."""
    first = run[0]
    parts = RowParts(first.parts.width)
    for j, (plan, _, second) in enumerate(first.parts.parts):
        joined = torch.cat([rows.parts.parts[j][1] for rows in run], dim=1)
        if second is None:
            parts.parts.append((plan, joined, None))
        else:
            parts.parts.append((plan, joined, torch.cat([rows.parts.parts[j][2] for rows in run], dim=1)))
    joined = PendingRows(parts, sum(rows.batch for rows in run), first.device, first.divisor)
    return joined.stored_as(first.dtype)


def _is_one(divisor) -> bool:
    return not isinstance(divisor, Tensor) and divisor == 1.0


def products(acts: Tensor, grads: Tensor) -> Tensor:
    """(E, B, k_out, k_in): sum over positions of each example's outer products d~ a~^T."""
    if acts.shape[2] == 1:  # one position: a broadcast product, much cheaper than a GEMM of 1-deep matrices
        return grads.transpose(-1, -2) * acts
    return torch.matmul(grads.transpose(-1, -2), acts)
