"""Choosing modules, and the hooks that turn one forward/backward into projected per-example rows.

This is the only module that touches nn.Module hooks. A forward hook projects each watched
layer's input (P_in a) and registers a tensor hook on that call's output; when the output's
gradient arrives, the hook projects it (P_out delta) and adds sum_t (P_out delta_t)(P_in a_t)^T
to that module's (B, k_out, k_in) buffer. Pairing through the closure makes a module called several
times per forward, and gradient checkpointing (which re-runs forwards during backward), come out
right. A tensor hook instead of a full backward hook survives `ReLU(inplace=True)`.
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
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def width(self) -> int:
        return self.k_in * self.k_out

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


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matmul-type layers in on this device right now; None when it is off."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4 has no device argument
        enabled = torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device.type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_gpu_dtype() if device.type == "cuda" else torch.get_autocast_cpu_dtype()


def _explicit_dtypes(autocast: torch.dtype | None, device: torch.device):
    """Autocast off around the projections: they run in the dtype `_projection_dtype` chose."""
    return torch.autocast(device_type=device.type, enabled=False) if autocast is not None else nullcontext()


def _projection_dtype(layer_in_bfloat16: bool, device: torch.device) -> torch.dtype:
    """bfloat16 where the layer itself ran in bfloat16 on a GPU, else float32.

    The weight gradient autograd computes for such a layer already uses bfloat16 inputs and output
    gradients, so a bfloat16 projection (float32 accumulation, result in float32 from there on)
    loses little; it reads a fifth of the bytes of casting to float32 first, and on a GPU the
    projections are bound by those bytes. On CPUs, and for float16 (whose range a scaled loss can
    exceed), projections stay float32.
    """
    return torch.bfloat16 if layer_in_bfloat16 and device.type == "cuda" else torch.float32


class Collector:
    """Hooks installed for one capture; `rows()` gives the (B, D) float32 sum of per-module blocks.

    Rows are the raw gradients the backward pass delivered, that is c * grad(loss_i) where c comes
    from the user's loss reduction; the caller divides c out. `observer`, if given, is called as
    observer(watched, projected_activations, projected_output_grads, mask, examples) for each module
    call (curvature statistics hook in there). `keep` (B,) bool leaves examples out of both: their
    rows come out zero and the statistics never see them.
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
        self.blocks: dict[str, Tensor] = {}
        self.forwards = 0
        self.masked_calls = 0
        self._masks: dict = {}
        self.without_grad: set[str] = set()  # watched modules whose output needed no gradient
        self._handles: list = []
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
        def forward_hook(module, args, kwargs, output):
            if not (self._active and torch.is_grad_enabled()):
                return None
            if not isinstance(output, Tensor):
                return None
            if not output.requires_grad:
                self.without_grad.add(w.name)
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            device = output.device
            autocast = _autocast_dtype(device)
            layer_in_bfloat16 = w.kind.matmul and torch.bfloat16 in (x.dtype, autocast)
            proj_in = w.projections(device, _projection_dtype(layer_in_bfloat16, device))[0]
            with _explicit_dtypes(autocast, device):  # x is detached and P needs no grad: no graph is built
                acts = w.kind.project_inputs(module, x.detach(), proj_in)
                mask = self._mask_for(acts)
                if mask is not None:
                    acts = acts * mask
                    mask = mask.reshape(acts.shape[0], -1)
                acts = acts.reshape(acts.shape[0], -1, acts.shape[-1])  # (B, T, k_in)
                examples = acts.shape[0]
                if self.keep is not None:
                    keep = self._keep_for(acts)
                    acts = acts * keep.unsqueeze(-1)
                    mask = keep if mask is None else mask * keep
                    examples = keep[:, 0].sum()
            self.forwards += 1

            def grad_hook(grad: Tensor) -> None:
                if not self._active:  # a backward after the capture ended: not ours to record
                    return
                with _explicit_dtypes(_autocast_dtype(grad.device), grad.device):
                    delta = w.kind.output_grads(module, grad.detach())
                    delta = delta.reshape(delta.shape[0], -1, delta.shape[-1])  # (B, T, d_out)
                    dtype = _projection_dtype(delta.dtype == torch.bfloat16, delta.device)
                    proj_out = w.projections(delta.device, dtype)[1]
                    if proj_out is not None:
                        delta = delta.to(dtype) @ proj_out
                    delta = delta.float()
                    if self.observer is not None:
                        self.observer(w, acts, delta, mask, examples)
                    if self.keep_rows and delta.shape[1] == 1:  # one position: an outer product, ~10x
                        block = delta.transpose(1, 2) * acts  # cheaper than a batched GEMM of 1-deep matrices
                    elif self.keep_rows:
                        block = torch.bmm(delta.transpose(1, 2), acts)
                    else:  # statistics only: remember the batch size, skip the per-example products
                        block = delta.new_zeros(delta.shape[0], 0, 0)
                    if w.name in self.blocks:
                        if self.blocks[w.name].shape != block.shape:
                            raise CaptureError(
                                f"module {w.name!r} was called on batches of different sizes "
                                f"({self.blocks[w.name].shape[0]} and {block.shape[0]}) in one capture"
                            )
                        self.blocks[w.name].add_(block)
                    else:
                        self.blocks[w.name] = block

            output.register_hook(grad_hook)
            return None

        return forward_hook

    def _mask_for(self, acts: Tensor) -> Tensor | None:
        """The (B, T, 1) mask when this call's positions are the mask's (B, T); else None."""
        if self.mask is None or acts.shape[:-1] != self.mask.shape:
            return None
        self.masked_calls += 1
        key = (acts.device, acts.dtype)
        if key not in self._masks:  # converted once per capture, not once per module call
            self._masks[key] = self.mask.to(device=acts.device, dtype=acts.dtype).unsqueeze(-1)
        return self._masks[key]

    def _keep_for(self, acts: Tensor) -> Tensor:
        """The (B, T) 0/1 example mask for (B, T, k) activations."""
        if acts.shape[0] != self.keep.shape[0]:
            raise CaptureError(
                f"a watched module saw a batch of {acts.shape[0]} examples, "
                f"but the capture has {self.keep.shape[0]} ids"
            )
        key = ("keep", acts.device, acts.dtype)
        if key not in self._masks:  # one host-to-device copy per capture, not one per module call
            self._masks[key] = self.keep.to(device=acts.device, dtype=acts.dtype)
        return self._masks[key].unsqueeze(1).expand(acts.shape[0], acts.shape[1])

    def rows(self) -> Tensor:
        """(B, D) float32 rows: each module's block flattened row-major (k_out, k_in), at its offset."""
        if self.without_grad:
            raise CaptureError(
                f"watched modules {sorted(self.without_grad)} ran with gradients enabled but their outputs need no "
                "gradient (frozen, with inputs that need none either), so their gradient cannot be captured; "
                "exclude them from watch()"
            )
        if not self.blocks:
            if self.forwards == 0:
                raise CaptureError(
                    "no watched module ran a forward with gradients inside the capture block; "
                    f"run the forward pass inside `with {self.label}(ids):` (and not under torch.no_grad())"
                )
            raise CaptureError(
                "no gradient reached the watched modules inside the capture block; "
                f"call loss.backward() inside `with {self.label}(ids):`"
            )
        if self.mask is not None and self.masked_calls == 0:
            raise CaptureError(
                f"the mask of shape {tuple(self.mask.shape)} matches no watched module's (batch, positions); "
                "pass the attention mask of the batch the model ran on"
            )
        sizes = {name: block.shape[0] for name, block in self.blocks.items()}
        batch = max(set(sizes.values()), key=list(sizes.values()).count)  # what most modules saw
        odd = {name: b for name, b in sizes.items() if b != batch}
        if odd:
            raise CaptureError(
                f"modules {sorted(odd)} saw a batch of {sorted(set(odd.values()))} while the others saw {batch}. "
                "A module whose output is broadcast over the batch (such as GPT-2's position embedding wpe when "
                "position_ids are not passed) has no per-example gradient: exclude it from watch(), or give it "
                "batched inputs; the batch must be the first dimension of every watched module's input"
            )
        some = next(iter(self.blocks.values()))
        if not self.keep_rows:
            return some.new_zeros(batch, 0)
        parts = []
        for w in self.watched:
            block = self.blocks.get(w.name)
            parts.append(block.reshape(batch, -1) if block is not None else some.new_zeros(batch, w.width))
        return torch.cat(parts, dim=1)


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
