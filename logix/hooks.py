"""Choosing modules, and the hooks that turn one forward/backward into projected per-example rows.

This is the only module that touches nn.Module hooks. A forward hook keeps each watched layer's
input (projected at once when it is large) and registers a pre-hook on that call's output node;
when the output's gradient arrives there, the call is finished and its two sides go to
logix.call_groups, which projects and multiplies the calls of equal shape together:
sum_t (P_out delta_t)(P_in a_t)^T per example, at the module's place in the row. Pairing each input
with its own output makes a module called several times per forward, and gradient checkpointing
(which re-runs forwards during backward), come out right; hooking the output's node (not the
tensor that may be changed in place later) survives `ReLU(inplace=True)`.
Hooks live only while a `Collector` is entered; nothing is left on the model afterwards.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .call_groups import (
    DEFER_NUMEL,
    FLUSH_ELEMENTS,
    Call,
    PendingRows,
    RowParts,
    group_calls,
    plan_for,
    stacked_sides,
)
from .errors import CaptureError, ConfigError
from .kinds import Kind, kind_of

WRAPPER_ATTRIBUTES = ("module", "_orig_mod")
ROOT_NAME = "root"


def named_modules(model: nn.Module):
    """(name, module) pairs with the wrappers that DDP, DeepSpeed and torch.compile add peeled off.

    A wrapper is a module whose only child is called `module` or `_orig_mod`; its prefix is dropped
    so that every setup names modules alike. A real submodule called `module` beside others keeps
    its name. The model itself, if watched (a bare nn.Linear), is called "root".
    """
    inner = model
    while True:
        children = list(inner.named_children())
        if len(children) != 1 or children[0][0] not in WRAPPER_ATTRIBUTES:
            break
        inner = children[0][1]
    for name, module in inner.named_modules():
        yield (name or ROOT_NAME), module


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p + ".") for p in patterns)


def select_modules(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    include_frozen: bool = False,
) -> list[tuple[str, nn.Module, Kind]]:
    """Watched modules in model order: supported kinds, filtered by glob patterns on their names.

    A pattern matches a name exactly, as a glob (`*attn*`), or as a prefix of a subtree (`encoder`
    matches `encoder.layer.0.fc`). Frozen modules (weight.requires_grad False, as in LoRA
    fine-tuning) are skipped unless include_frozen: their gradient is not part of training.
    """
    include = _patterns(include, "include") if include is not None else None
    exclude = _patterns(exclude, "exclude") if exclude is not None else []
    _refuse_parameter_adapters(model)
    chosen, seen = [], set()
    for name, module in named_modules(model):
        kind = kind_of(module)
        if kind is None or id(module) in seen:
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        weight = getattr(module, "weight", None)
        if not include_frozen and (weight is None or not weight.requires_grad):
            continue
        kind.check(module)
        if any(name == other for other, _, _ in chosen):
            raise ConfigError(f"two watched modules are both named {name!r}; rename one or exclude it")
        seen.add(id(module))
        chosen.append((name, module, kind))
    if not chosen:
        raise ConfigError(
            "no module to watch: the model has no trainable nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding "
            f"or transformers Conv1D matching include={include} exclude={exclude} "
            f"(include_frozen={include_frozen})"
        )
    return chosen


def _refuse_parameter_adapters(model: nn.Module) -> None:
    """peft's LoRA on an embedding keeps its adapters as bare parameters (lora_embedding_A/B), not
    as modules whose inputs and output gradients a hook could see: refuse rather than leave them out
    of the rows in silence."""
    bare = [name for name, p in model.named_parameters() if p.requires_grad and ".lora_embedding_" in f".{name}"]
    if bare:
        raise ConfigError(
            f"trainable LoRA adapters on an embedding ({bare[0]}{' and others' if len(bare) > 1 else ''}) are "
            "parameters, not modules, so logix cannot capture their per-example gradients; put LoRA on Linear or "
            "Conv1D layers only (LoraConfig(target_modules=...)), or train the embedding itself"
        )


def _patterns(patterns, what: str) -> list[str]:
    """Glob patterns as a list of strings (a lone string is one pattern, not its characters)."""
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, Iterable) and not isinstance(patterns, bytes):
        patterns = list(patterns)
        if all(isinstance(p, str) for p in patterns):
            return patterns
    raise ConfigError(f"{what} must be a list of module name patterns, got {patterns!r}")


@dataclass
class Watched:
    """One watched module: its dimensions, projections and place in a row."""

    name: str
    module: nn.Module
    kind: Kind
    d_in: int
    d_out: int
    k_in: int
    k_out: int
    offset: int
    proj_in: Tensor | None
    proj_out: Tensor | None
    _cache: dict = field(default_factory=dict, repr=False)  # cleared whenever the projections change

    def __post_init__(self):
        self.has_bias = self.kind.has_bias(self.module)

    @property
    def width(self) -> int:
        return self.k_in * self.k_out

    @property
    def group_key(self) -> tuple:
        """Modules with equal keys have calls that can be finished in one batched operation."""
        key = self._cache.get("group_key")
        if key is None:
            key = self._cache["group_key"] = (
                self.kind.name, self.d_in, self.d_out, self.k_in, self.k_out, self.has_bias,
                self.proj_in is None, self.proj_out is None,
            )  # fmt: skip
        return key

    def held_tensors(self) -> list[Tensor]:
        """The tensors this module keeps between batches (projections and their cached copies)."""
        found, todo = [], [self.proj_in, self.proj_out, *self._cache.values()]
        while todo:
            item = todo.pop()
            if isinstance(item, Tensor):
                found.append(item)
            elif isinstance(item, tuple):
                todo.extend(item)
        return found

    def projections(
        self, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor | None, Tensor | None]:
        """P_in^T (d_in, k_in) and P_out^T (d_out, k_out), contiguous, on the module's device.

        Transposed once here so that each hook call is a plain matmul (copied once per device and
        compute dtype).
        """
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = tuple(
                None if p is None else p.T.contiguous().to(device=device, dtype=dtype)
                for p in (self.proj_in, self.proj_out)
            )
        return self._cache[key]


BFLOAT16, FLOAT32 = torch.bfloat16, torch.float32

if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4

    def _autocast_dtype(device_type: str) -> torch.dtype | None:
        """The dtype autocast runs matmul-type layers in on this device type now; None when it is off."""
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

else:  # pragma: no cover - torch < 2.4 has no device argument

    def _autocast_dtype(device_type: str) -> torch.dtype | None:
        if not (torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()):
            return None
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def _explicit_dtypes(autocast: torch.dtype | None, device_type: str):
    """Autocast off around the projections: they run in the dtype `_projection_dtype` chose."""
    return torch.autocast(device_type=device_type, enabled=False) if autocast is not None else nullcontext()


def _projection_dtype(layer_in_bfloat16: bool, device_type: str) -> torch.dtype:
    """bfloat16 where the layer itself ran in bfloat16 on a GPU, else float32.

    The weight gradient autograd computes for such a layer already uses bfloat16 inputs and output
    gradients, so a bfloat16 projection (float32 accumulation, result in float32 from there on)
    loses little; it reads a fifth of the bytes of casting to float32 first, and on a GPU the
    projections are bound by those bytes. On CPUs, and for float16 (whose range a scaled loss can
    exceed), projections stay float32.
    """
    return BFLOAT16 if layer_in_bfloat16 and device_type == "cuda" else FLOAT32


class Collector:
    """Hooks installed for one capture; `rows()` gives the (B, D) float32 sum of per-module blocks.

    Rows are the raw gradients the backward pass delivered, that is c * grad(loss_i) where c comes
    from the user's loss reduction; the caller passes c to `rows(c)`, which divides it out.
    `observer`, if given, is called as
    observer(names, projected_activations, projected_output_grads, mask, examples) for each group
    of module calls (logix.call_groups; curvature statistics hook in there), with the first two
    stacked (E, B, T, k). `keep` (B,) bool leaves examples out of both: their rows come out zero
    and the statistics never see them.
    """

    def __init__(
        self,
        watched: list[Watched],
        mask: Tensor | None = None,
        keep: Tensor | None = None,
        observer: Callable | None = None,
        keep_rows: bool = True,
        label: str = "run.capture",
    ):
        self.watched = watched
        self.label = label
        self.keep_rows = keep_rows
        self.mask = mask
        self.keep = keep
        self.observer = observer
        self.forwards = 0
        self.masked_calls = 0
        self.without_grad: set[str] = set()  # watched modules whose output needed no gradient
        self._masks: dict = {}
        self._finished: list[Call] = []  # calls whose output gradient arrived, not yet processed
        self._finished_elements = 0
        self._batch_of: dict[str, int] = {}  # module -> the batch size its calls had
        self._mixed: dict[str, tuple[int, int]] = {}  # module -> two different batch sizes it saw
        self._parts = RowParts(sum(w.width for w in watched))
        self._device = None  # where the first group was processed
        self._handles: list = []
        self._checked_batch: int | None = None  # batch() after its checks, until more calls are processed
        self._active = False

    def __enter__(self) -> Collector:
        self._active = True
        for w in self.watched:
            hook = self._make_forward_hook(w)
            self._handles.append(w.module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_forward_hook(self, w: Watched):
        kind, defers = w.kind, w.kind.defers

        def forward_hook(module, args, kwargs, output):
            if not (self._active and isinstance(output, Tensor)):
                return None
            if not output.requires_grad:  # (a tensor that requires grad implies grad mode)
                if torch.is_grad_enabled():
                    self.without_grad.add(w.name)
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            if self.keep is not None and x.shape[0] != self.keep.shape[0]:
                raise CaptureError(
                    f"a watched module saw a batch of {x.shape[0]} examples, "
                    f"but the capture has {self.keep.shape[0]} ids"
                )
            if output.is_cpu:  # projections on a CPU run in float32 (see _projection_dtype)
                device_type, dtype = "cpu", FLOAT32
            else:
                device_type = "cuda" if output.is_cuda else output.device.type
                autocast = _autocast_dtype(device_type)
                dtype = _projection_dtype(kind.matmul and BFLOAT16 in (x.dtype, autocast), device_type)
            if defers and x.numel() <= DEFER_NUMEL:  # projected with its group (logix.call_groups)
                call = Call(self, w, x, True, dtype)  # read under no_grad when its group is processed
            else:
                autocast = _autocast_dtype(device_type)
                with _explicit_dtypes(autocast, device_type):  # x is detached and P needs no grad: no graph
                    acts = kind.project_inputs(module, x.detach(), w.projections(output.device, dtype)[0])
                call = Call(self, w, acts, False, None)
            if self.mask is not None and call.acts.shape[:-1] == self.mask.shape:
                call.masked = True
                self.masked_calls += 1
            self.forwards += 1
            node = output.grad_fn
            if node is None:  # an output that is a leaf: no node to hook, a tensor hook instead
                call.slot = None
                output.register_hook(call)
            else:  # the node's pre-hook: cheaper than a tensor hook, and the same gradient
                call.slot = output.output_nr
                node.register_prehook(call)
            return None

        return forward_hook

    def arrived(self, call: Call, grad: Tensor) -> None:
        """A call's output gradient (from Call.__call__): held raw if small, else projected now;
        the call is finished, and the finished ones are processed once they hold FLUSH_ELEMENTS."""
        size = grad.numel()
        if call.acts_raw and size <= DEFER_NUMEL:
            call.grads, call.grads_raw = grad, True
            if grad.dtype is not FLOAT32:
                call.g_dtype = _projection_dtype(grad.dtype is BFLOAT16, grad.device.type)
        else:
            call.grads = self._project_output_grads(call.w, grad)
            size = call.grads.numel()
        self._finished.append(call)
        self._finished_elements += size + call.acts.numel()
        if self._finished_elements > FLUSH_ELEMENTS:
            self._process()

    @staticmethod
    def _project_output_grads(w: Watched, grad: Tensor) -> Tensor:
        """(B, T, k_out) float32: P_out delta for one call."""
        device_type = grad.device.type
        with _explicit_dtypes(_autocast_dtype(device_type), device_type):
            delta = w.kind.output_grads(w.module, grad.detach())
            delta = delta.reshape(delta.shape[0], -1, delta.shape[-1])  # (B, T, d_out)
            dtype = _projection_dtype(delta.dtype == BFLOAT16, device_type)
            proj_out = w.projections(delta.device, dtype)[1]
            if proj_out is not None:
                delta = delta.to(dtype) @ proj_out
            return delta.float()

    def _process(self) -> None:
        """Finish every call whose gradient arrived, a group of equal shapes at a time."""
        finished, self._finished, self._finished_elements = self._finished, [], 0
        if not finished:
            return
        self._checked_batch = None
        device_type = finished[0].acts.device.type
        with torch.no_grad(), _explicit_dtypes(_autocast_dtype(device_type), device_type):
            for calls in group_calls(finished):
                self._process_group(calls)

    def _process_group(self, calls: list[Call]) -> None:
        ws = [c.w for c in calls]
        names = tuple(w.name for w in ws)
        plan = plan_for(ws, calls[0])
        acts, grads = stacked_sides(plan, calls)
        batch = acts.shape[1]
        self._device = acts.device
        for name in names:
            seen = self._batch_of.setdefault(name, batch)
            if seen != batch:
                self._mixed.setdefault(name, (seen, batch))
        mask = None
        if calls[0].masked:
            mask = self._mask_for(acts)
            acts = acts * mask.unsqueeze(-1)
        examples = batch
        if self.keep is not None:
            keep = self._keep_for(acts)
            acts = acts * keep.unsqueeze(-1)
            mask = keep if mask is None else mask * keep
            examples = keep[:, 0].sum()
        if self.observer is not None:
            self.observer(names, acts, grads, mask, examples)
        if not self.keep_rows:
            return
        self._parts.add(plan, acts, grads)

    def _mask_for(self, acts: Tensor) -> Tensor:
        """The (B, T) mask, converted once per capture, for a group whose positions are the mask's."""
        key = (acts.device, acts.dtype)
        if key not in self._masks:
            self._masks[key] = self.mask.to(device=acts.device, dtype=acts.dtype)
        return self._masks[key]

    def _keep_for(self, acts: Tensor) -> Tensor:
        """The (B, T) 0/1 example mask for (E, B, T, k) activations."""
        key = ("keep", acts.device, acts.dtype)
        if key not in self._masks:  # one host-to-device copy per capture, not one per module call
            self._masks[key] = self.keep.to(device=acts.device, dtype=acts.dtype)
        return self._masks[key].unsqueeze(1).expand(acts.shape[1], acts.shape[2])

    def rows(self, divisor: float | Tensor = 1.0) -> Tensor:
        """(B, D) float32 rows: each module's block flattened row-major (k_out, k_in), at its offset,
        divided by `divisor` (the loss factor: folded into the products, cheaper than a pass over
        the rows afterwards)."""
        return self.pending_rows(divisor).assemble()

    def pending_rows(self, divisor: float | Tensor = 1.0) -> PendingRows:
        """The rows of `rows(divisor)`, to be formed later (by the writer thread, on a CPU)."""
        batch = self.batch()
        parts = self._parts if self.keep_rows else RowParts(0)
        self._parts = RowParts(self._parts.width)  # handed over: this collector no longer adds to them
        return PendingRows(parts, batch, self._device, divisor)

    def batch(self) -> int:
        """The capture's batch size, once every call is processed; raises CaptureError where the
        block did not capture what it should have."""
        self._process()
        if self._checked_batch is not None:  # Capture asks, then rows() asks again: check once
            return self._checked_batch
        if self.without_grad:
            raise CaptureError(
                f"watched modules {sorted(self.without_grad)} ran with gradients enabled but their outputs need no "
                "gradient (frozen, with inputs that need none either), so their gradient cannot be captured; "
                "exclude them from watch()"
            )
        if not self._batch_of:
            if self.forwards == 0:
                raise CaptureError(
                    "no watched module ran a forward with gradients inside the capture block; "
                    f"run the forward pass inside `with {self.label}(ids):` (and not under torch.no_grad())"
                )
            raise CaptureError(
                "no gradient reached the watched modules inside the capture block; "
                f"call loss.backward() inside `with {self.label}(ids):`"
            )
        if self._mixed:
            name, (a, b) = next(iter(self._mixed.items()))
            a, b = sorted((a, b))
            raise CaptureError(f"module {name!r} was called on batches of different sizes ({a} and {b}) in one capture")
        if self.mask is not None and self.masked_calls == 0:
            raise CaptureError(
                f"the mask of shape {tuple(self.mask.shape)} matches no watched module's (batch, positions); "
                "pass the attention mask of the batch the model ran on"
            )
        sizes = list(self._batch_of.values())
        batch = max(set(sizes), key=sizes.count)  # what most modules saw
        odd = {name: b for name, b in self._batch_of.items() if b != batch}
        if odd:
            raise CaptureError(
                f"modules {sorted(odd)} saw a batch of {sorted(set(odd.values()))} while the others saw {batch}. "
                "A module whose output is broadcast over the batch (such as GPT-2's position embedding wpe when "
                "position_ids are not passed) has no per-example gradient: exclude it from watch(), or give it "
                "batched inputs; the batch must be the first dimension of every watched module's input"
            )
        self._checked_batch = batch
        return batch


def warn_if_compiled(model: nn.Module) -> None:
    """Dynamo ignores hooks added after compilation unless told to guard on them."""
    if not hasattr(model, "_orig_mod"):
        return
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and getattr(dynamo.config, "skip_nnmodule_hook_guards", False):
        warnings.warn(
            "logix: this model is torch.compile'd and torch._dynamo.config.skip_nnmodule_hook_guards is True, "
            "so graphs compiled before a capture will skip logix's hooks (the capture then raises CaptureError). "
            "Set torch._dynamo.config.skip_nnmodule_hook_guards = False before the first compiled call.",
            stacklevel=3,
        )
