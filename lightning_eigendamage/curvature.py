"""K-FAC factor capture for ``nn.Linear`` and ``nn.Conv2d``.

For a layer with input activations ``a`` and pre-activation output ``s`` let ``D = ∂ℓ_n/∂s`` be
the gradient of the per-example loss ``ℓ_n``. With PyTorch's row-major weight layout the
per-example weight gradient is ``D aᵀ`` and the layer's Fisher block is ``F ≈ G ⊗ A`` with

- Linear ``(C_out, C_in)`` on inputs ``(N, *, C_in)``: every leading position (token) is a
  location; ``A = E_{n,t}[a aᵀ]`` ``(C_in, C_in)``, ``G = E_{n,t}[D Dᵀ]`` ``(C_out, C_out)``.
- Conv2d, *channel* form (EigenDamage): ``A = E_{n,t,δ}[a_{tδ} a_{tδ}ᵀ]`` over output locations
  ``t`` and kernel offsets ``δ``, ``(C_in, C_in)``; ``G = E_{n,t}[D_t D_tᵀ]``.
- Conv2d, *patch* form (standard K-FAC, for baselines): ``A = E_{n,t}[p_t p_tᵀ]`` with ``p_t`` the
  ``C_in·kh·kw`` patch in ``weight.view(C_out, -1)`` order.

The channel form is computed without unfolding: every pixel ``p`` of the padded input is read by
``c_p`` (offset, location) pairs, so ``Σ_{t,δ} a aᵀ = Xᵀ diag(c) X``; it is normalised by the
number of reads ``N·T·kh·kw`` (zero-padded reads included). See ``method.md`` §2.

Gradients ``D`` are taken with tensor hooks registered on each layer's output inside its forward
hook, so in-place ops after the layer (``ReLU(inplace=True)``) do not change what is seen, and the
backward is run with :func:`torch.autograd.grad`, so parameter ``.grad`` is never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .costs import Geometry

FISHER_TYPES = ("true", "empirical")
LIKELIHOODS = ("categorical", "gaussian")
A_FORMS = ("channel", "patch")


# ---------------------------------------------------------------------------------------------
# Per-batch factor contributions (pure functions, tested against brute force)
# ---------------------------------------------------------------------------------------------


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Explicit ``(top, bottom, left, right)`` padding of a Conv2d, resolving ``"same"``/``"valid"``.

    ``"same"`` splits ``dilation·(k−1)`` as PyTorch does: ``total // 2`` before, the rest after.
    """
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for d, k in zip(conv.dilation, conv.kernel_size):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    ph, pw = conv.padding
    return (ph, ph, pw, pw)


def _read_counts(size: int, pad_lo: int, pad_hi: int, k: int, s: int, d: int, n_out: int):
    """Reads per padded-input position along one axis: ``c[p] = #{(t, δ): t·s + δ·d = p}``."""
    c = torch.zeros(size + pad_lo + pad_hi, dtype=torch.float64)
    starts = torch.arange(n_out) * s
    for delta in range(k):
        c.index_add_(0, starts + delta * d, torch.ones(n_out, dtype=torch.float64))
    return c


def conv_read_counts(conv: nn.Conv2d, h: int, w: int, h_out: int, w_out: int) -> torch.Tensor:
    """The count map ``c`` over the padded input grid ``(H+pt+pb, W+pl+pr)``, float64 on CPU."""
    ch, cw = _axis_counts(conv, h, w, h_out, w_out, crop=False)
    return ch[:, None] * cw[None, :]


def _axis_counts(conv: nn.Conv2d, h: int, w: int, h_out: int, w_out: int, *, crop: bool):
    """Per-axis read counts; the map is separable: ``c[i, j] = c_h[i] · c_w[j]``.

    With ``crop=True`` the zero-padding border is cut off (those pixels are zeros).
    """
    top, bottom, left, right = conv_padding(conv)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ch = _read_counts(h, top, bottom, kh, sh, dh, h_out)
    cw = _read_counts(w, left, right, kw, sw, dw, w_out)
    if crop:
        ch, cw = ch[top : top + h], cw[left : left + w]
    return ch, cw


def gram(v: torch.Tensor) -> torch.Tensor:
    """``Σ_n V_n V_nᵀ`` for ``v`` ``(N, C, P)``: ``(C, C)``.

    Batched products for narrow layers (no copy of ``v``); one transposing copy and a single
    GEMM for wide ones, where that is faster.
    """
    n, c, p = v.shape
    if c <= 128:
        return torch.bmm(v, v.transpose(1, 2)).sum(0)
    rows = v.transpose(0, 1).reshape(c, n * p)
    return rows @ rows.T


def conv_channel_a(
    x: torch.Tensor, conv: nn.Conv2d, h_out: int, w_out: int, cache: dict | None = None
) -> tuple[torch.Tensor, int]:
    """Channel-form ``Σ_{n,t,δ} a aᵀ`` for a conv input ``x`` ``(N, C_in, H, W)``.

    Returns the ``(C_in, C_in)`` sum (not yet averaged) and the number of reads ``N·T·kh·kw``.
    Uses ``Xᵀ diag(c) X`` with the separable count map ``c = c_h ⊗ c_w``: rows and columns that
    are never read (``c = 0``, e.g. the skipped pixels of a strided 1×1 conv) are dropped first;
    uniform counts need no weighting copy at all. ``cache`` (any dict) keeps the per-shape counts.
    """
    n, c_in, h, w = x.shape
    key = (id(conv), h, w, h_out, w_out)
    prep = cache.get(key) if cache is not None else None
    if prep is None:
        crop = conv.padding_mode == "zeros"
        ch, cw = _axis_counts(conv, h, w, h_out, w_out, crop=crop)
        ih, iw = ch.nonzero().squeeze(1), cw.nonzero().squeeze(1)
        ih = None if ih.numel() == ch.numel() else ih.to(x.device)
        iw = None if iw.numel() == cw.numel() else iw.to(x.device)
        ch = ch[ch > 0]
        cw = cw[cw > 0]
        uniform = bool((ch == ch[0]).all() and (cw == cw[0]).all())
        weight = float(ch[0] * cw[0]) if uniform else (ch.sqrt()[:, None] * cw.sqrt()[None, :]).to(x.device)
        prep = (crop, ih, iw, uniform, weight)
        if cache is not None:
            cache[key] = prep
    crop, ih, iw, uniform, weight = prep
    if not crop:
        top, bottom, left, right = conv_padding(conv)
        x = F.pad(x, (left, right, top, bottom), mode=conv.padding_mode)
    if ih is not None:
        x = x.index_select(2, ih)
    if iw is not None:
        x = x.index_select(3, iw)
    if uniform:
        a = gram(x.reshape(n, c_in, -1)) * weight
    else:
        a = gram((x * weight.to(x.dtype)).reshape(n, c_in, -1))
    reads = n * h_out * w_out * conv.kernel_size[0] * conv.kernel_size[1]
    return a, reads


def conv_patch_a(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, int]:
    """Patch-form ``Σ_{n,t} p pᵀ`` ``(C_in·kh·kw, C_in·kh·kw)`` by unfolding, and ``N·T``."""
    top, bottom, left, right = conv_padding(conv)
    if any((top, bottom, left, right)):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, (left, right, top, bottom), mode=mode)
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N·T, C_in·k²)
    return patches.T @ patches, patches.shape[0]


def linear_a(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``Σ a aᵀ`` over all examples and leading positions of ``x`` ``(N, *, C_in)``, and the count."""
    rows = x.reshape(-1, x.shape[-1])
    return rows.T @ rows, rows.shape[0]


def output_g(grad: torch.Tensor, is_conv: bool) -> tuple[torch.Tensor, int]:
    """``Σ D Dᵀ`` over examples and locations of an output gradient, and the number of rows.

    ``grad`` is ``(N, C_out, H_out, W_out)`` for a conv, ``(N, *, C_out)`` for a Linear.
    """
    if is_conv:
        n, c = grad.shape[:2]
        v = grad.reshape(n, c, -1)
        return gram(v), n * v.shape[2]
    rows = grad.reshape(-1, grad.shape[-1])
    return rows.T @ rows, rows.shape[0]


# ---------------------------------------------------------------------------------------------
# Hook-based capture
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerFactors:
    """Accumulated factors of one layer (sums; :meth:`a` / :meth:`g` give the averages)."""

    a_sum: torch.Tensor | None = None
    g_sum: torch.Tensor | None = None
    a_rows: int = 0
    g_rows: int = 0
    examples: int = 0
    geometry: Geometry | None = None
    input_shape: tuple[int, ...] | None = None  # per-example shape of the hooked module's input
    max_calls: int = 0  # most forward calls seen in one pass
    fired: bool = False
    reached: bool = False  # a gradient arrived at least once
    _pending: dict[str, Any] = field(default_factory=dict)

    def a(self) -> torch.Tensor:
        return self.a_sum / self.a_rows

    def g(self) -> torch.Tensor:
        return self.g_sum / self.g_rows

    @property
    def locations(self) -> float:
        """``T``: output locations per example (``H_out·W_out``, tokens, or 1)."""
        return self.g_rows / max(self.examples, 1)


class KFACapture:
    """Registers hooks that accumulate K-FAC factors for the given modules.

    Use as a context manager; hooks are removed on exit, also on exceptions. Between
    :meth:`begin_batch` and :meth:`end_batch`, each forward call of a module records its ``A``
    contribution, and the gradient that later reaches its output records ``G`` (multiplied by
    ``grad_scale²``, which undoes a mean-reduced loss). :meth:`end_batch` commits the batch only if
    every contribution is finite.

    Args:
        modules: name → module to hook (a ``nn.Conv2d`` or ``nn.Linear``).
        factors_for: names whose factors are computed; others only record that they fired.
        a_form: ``"channel"`` or ``"patch"`` (conv ``A``).
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        *,
        factors_for: Iterable[str] | None = None,
        a_form: str = "channel",
        accum_dtype: torch.dtype = torch.float64,
    ) -> None:
        if a_form not in A_FORMS:
            raise ValueError(f"a_form must be one of {A_FORMS}, got {a_form!r}")
        self.modules = dict(modules)
        self.factors_for = set(self.modules if factors_for is None else factors_for)
        self.a_form = a_form
        self.accum_dtype = accum_dtype
        self.layers = {name: LayerFactors() for name in self.modules}
        self.fire_order: list[str] = []
        self.grad_scale = 1.0
        self.batches = 0
        self.skipped_batches = 0
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}
        self._count_cache: dict = {}
        self._active = False

    # -- context management ------------------------------------------------------------------
    def __enter__(self) -> KFACapture:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False

    # -- batches -------------------------------------------------------------------------------
    def begin_batch(self) -> None:
        self._calls = {}
        for lf in self.layers.values():
            lf._pending = {}
        self._active = True

    def grad_targets(self, root: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Tensors a backward must reach for every recorded layer's output hook to fire.

        ``root`` (the model input, made to carry a gradient) first; then, in the order the layers
        ran, a layer's input only if no earlier target is upstream of it in the autograd graph
        (e.g. for a plain CNN only ``root``), or its weight if the input carries no gradient. No
        weight gradient is computed for layers reached through their inputs, and the gradients
        ``torch.autograd.grad`` returns (one per target, each the size of its tensor) stay few.
        """
        chosen: list[torch.Tensor] = []
        nodes: set = set()  # autograd nodes of the non-leaf targets
        leaves: set[int] = set()  # ids of the leaf targets
        not_reaching: set = set()  # nodes known not to lead to any target (reset on each new one)

        def covered(t: torch.Tensor) -> bool:
            if t.grad_fn is None:
                return id(t) in leaves
            stack, seen = [t.grad_fn], set()
            while stack:
                node = stack.pop()
                if node in nodes:
                    return True
                var = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
                if var is not None and id(var) in leaves:
                    return True
                if node in seen or node in not_reaching:
                    continue
                seen.add(node)
                stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
            not_reaching.update(seen)
            return False

        def add(t: torch.Tensor) -> None:
            chosen.append(t)
            if t.grad_fn is None:
                leaves.add(id(t))
            else:
                nodes.add(t.grad_fn)
            not_reaching.clear()

        if root is not None and root.requires_grad:
            add(root)
        order = [n for n in self.fire_order if n in self.factors_for]
        order += [n for n in self.factors_for if n not in order]
        for name in order:
            t = self.layers[name]._pending.get("grad_target")
            if t is not None and t.requires_grad and not covered(t):
                add(t)
        return chosen

    def abort_batch(self) -> None:
        """Drop the current batch's contributions (e.g. after an exception)."""
        self._active = False
        for lf in self.layers.values():
            lf._pending = {}

    def result(self) -> CaptureResult:
        """The factors accumulated so far (the tensors are shared, not copied)."""
        return CaptureResult(self.layers, list(self.fire_order), self.batches, self.skipped_batches)

    def end_batch(self, n_examples: int) -> bool:
        """Commit the batch's contributions; returns False (and counts it) if any is non-finite."""
        self._active = False
        for name, calls in self._calls.items():
            lf = self.layers[name]
            lf.max_calls = max(lf.max_calls, calls)
        pend = [(lf, lf._pending) for lf in self.layers.values() if lf._pending]
        checks = [p[k].sum() for _, p in pend for k in ("a", "g") if k in p]
        if checks and not bool(torch.isfinite(torch.stack(checks)).all()):
            self.skipped_batches += 1
            for lf, _ in pend:
                lf._pending = {}
            return False
        for lf, p in pend:
            lf._pending = {}  # also drops references to this batch's activations
            if "a" not in p or "g" not in p:
                continue
            lf.a_sum = p["a"] if lf.a_sum is None else lf.a_sum + p["a"]
            lf.g_sum = p["g"] if lf.g_sum is None else lf.g_sum + p["g"]
            lf.a_rows += p["a_rows"]
            lf.g_rows += p["g_rows"]
            lf.examples += n_examples
            lf._pending = {}
        self.batches += 1
        return True

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The factors accumulated so far as plain data (CPU tensors, numbers, strings, lists), so
        a checkpoint written inside a capture window loads with ``torch.load(weights_only=True)``.

        Sums are copied exactly (``accum_dtype``); a batch in progress is not included.
        """

        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to("cpu", copy=True)

        layers = {}
        for name, lf in self.layers.items():
            geo = lf.geometry
            layers[name] = {
                "a_sum": cpu(lf.a_sum),
                "g_sum": cpu(lf.g_sum),
                "a_rows": lf.a_rows,
                "g_rows": lf.g_rows,
                "examples": lf.examples,
                "geometry": None if geo is None else [geo.c_in, geo.c_out, geo.loc_in, geo.loc_out, geo.k2],
                "input_shape": None if lf.input_shape is None else list(lf.input_shape),
                "max_calls": lf.max_calls,
                "fired": lf.fired,
                "reached": lf.reached,
            }
        return {
            "a_form": self.a_form,
            "layers": layers,
            "fire_order": list(self.fire_order),
            "batches": self.batches,
            "skipped_batches": self.skipped_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output (factors moved to each module's device).

        Raises:
            ValueError: the state is for other layers, another ``a_form`` or other widths; the
                capture is then left unchanged.
        """
        layers = state.get("layers") if isinstance(state, dict) else None
        if not isinstance(layers, dict) or set(layers) != set(self.layers):
            theirs = sorted(layers) if isinstance(layers, dict) else layers
            raise ValueError(f"saved factors are for layers {theirs}, this capture has {sorted(self.layers)}")
        if state.get("a_form") != self.a_form:
            raise ValueError(
                f"saved factors have a_form {state.get('a_form')!r}, this capture {self.a_form!r}"
            )
        new = {}
        for name, entry in layers.items():
            module = self.modules[name]
            is_conv = isinstance(module, nn.Conv2d)
            d_in = module.in_channels if is_conv else module.in_features
            if is_conv and self.a_form == "patch":
                d_in *= module.kernel_size[0] * module.kernel_size[1]
            d_out = module.out_channels if is_conv else module.out_features
            dev = module.weight.device
            sums = {}
            for key, d in (("a_sum", d_in), ("g_sum", d_out)):
                t = entry[key]
                if t is not None and tuple(t.shape) != (d, d):
                    raise ValueError(
                        f"saved {key} of {name!r} is {tuple(t.shape)}, the layer needs ({d}, {d})"
                    )
                sums[key] = None if t is None else t.to(dev, self.accum_dtype)
            geo = entry["geometry"]
            new[name] = LayerFactors(
                a_sum=sums["a_sum"],
                g_sum=sums["g_sum"],
                a_rows=int(entry["a_rows"]),
                g_rows=int(entry["g_rows"]),
                examples=int(entry["examples"]),
                geometry=None if geo is None else Geometry(*(int(v) for v in geo)),
                input_shape=None if entry["input_shape"] is None else tuple(entry["input_shape"]),
                max_calls=int(entry["max_calls"]),
                fired=bool(entry["fired"]),
                reached=bool(entry["reached"]),
            )
        self.layers = new
        self.fire_order = [str(n) for n in state["fire_order"]]
        self.batches = int(state["batches"])
        self.skipped_batches = int(state["skipped_batches"])

    # -- hooks -----------------------------------------------------------------------------------
    def _forward_hook(self, name: str) -> Callable:
        # Never traced by torch.compile: the hook's Python state (which layer, calls so far,
        # capture on or off) would otherwise become guards and recompile the model every batch.
        @torch.compiler.disable
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not self._active:
                return
            calls = self._calls.get(name, 0) + 1
            self._calls[name] = calls
            lf = self.layers[name]
            if not lf.fired:
                self.fire_order.append(name)
            lf.fired = True
            if calls > 1 or name not in self.factors_for:
                lf._pending = {}
                return
            x = inputs[0].detach()
            is_conv = isinstance(module, nn.Conv2d)
            n = x.shape[0]
            if lf.geometry is None:
                if is_conv:
                    loc_in, loc_out = x.shape[2] * x.shape[3], output.shape[2] * output.shape[3]
                    k2 = module.kernel_size[0] * module.kernel_size[1]
                else:
                    loc_in = loc_out = x[0].numel() // x.shape[-1]
                    k2 = 1
                c_in = module.in_channels if is_conv else module.in_features
                c_out = module.out_channels if is_conv else module.out_features
                lf.geometry = Geometry(c_in, c_out, loc_in, loc_out, k2)
                lf.input_shape = tuple(x.shape[1:])
            xc = x.to(_compute_dtype(x.dtype))
            # Inside a training step under autocast the products below would run in bf16/fp16
            # (fp16 overflows on large sums): factors are always computed in float32 or better.
            with _autocast_off(x.device):
                if is_conv and self.a_form == "channel":
                    a, rows = conv_channel_a(xc, module, output.shape[2], output.shape[3], self._count_cache)
                elif is_conv:
                    a, rows = conv_patch_a(xc, module)
                else:
                    a, rows = linear_a(xc)
            lf._pending = {"a": a.to(self.accum_dtype), "a_rows": rows, "n": n}
            # Where a backward must reach for this layer's output hook to fire: its input if that
            # carries a gradient (no weight gradient is then computed), else its weight.
            live = inputs[0]
            lf._pending["grad_target"] = live if live.requires_grad else module.weight
            if output.requires_grad:
                output.register_hook(self._grad_hook(name, is_conv))

        return hook

    def _grad_hook(self, name: str, is_conv: bool) -> Callable:
        @torch.compiler.disable
        def hook(grad: torch.Tensor) -> None:
            lf = self.layers[name]
            # The layer's input is no longer needed as a backward target: let it be freed as soon
            # as autograd is done with it, as it would be without capture (holding every layer's
            # input to the end of the backward grows the heap on every step: page faults).
            lf._pending.pop("grad_target", None)
            if not self._active or "a" not in lf._pending:
                return
            with _autocast_off(grad.device):
                g, rows = output_g(grad.detach().to(_compute_dtype(grad.dtype)), is_conv)
            scale = float(self.grad_scale) ** 2
            lf._pending["g"] = g.to(self.accum_dtype) * scale
            lf._pending["g_rows"] = rows
            lf.reached = True

        return hook


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast for ``device``'s type (a no-op where autocast is unknown)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Driving a model over batches
# ---------------------------------------------------------------------------------------------


def split_batch(batch: Any, input_fn: Callable | None) -> tuple[Any, Any]:
    """``(input, target)`` of a batch: a tensor, an ``(input, target, ...)`` tuple, or via ``input_fn``."""
    if input_fn is not None:
        target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        return input_fn(batch), target
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        f"cannot find the model input in a batch of type {type(batch).__name__}; pass "
        "input_fn=lambda batch: ... that returns the model's input"
    )


def target_of(batch: Any) -> Any:
    """The target of an ``(input, target, ...)`` batch, None for any other batch."""
    return batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def default_loss(output: torch.Tensor, target: torch.Tensor, class_dim: int = -1) -> torch.Tensor:
    """Cross-entropy summed over locations, averaged over the ``N`` examples (leading dim)."""
    logits = output.movedim(class_dim, -1)
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat.float(), target.reshape(-1), reduction="sum") / output.shape[0]


def sampled_loss(
    output: torch.Tensor, likelihood: str, class_dim: int, generator: torch.Generator
) -> torch.Tensor:
    """Loss of targets drawn from the model's own predictive distribution, summed over examples.

    Categorical: ``ŷ ~ softmax(logits)`` along ``class_dim``; loss ``Σ −log p(ŷ)``.
    Gaussian (unit variance): ``ŷ = output + ε``, loss ``½ Σ (ŷ − output)²``.
    Its gradient w.r.t. a layer output is the per-example ``D`` of the true Fisher.
    """
    if likelihood == "categorical":
        logits = output.movedim(class_dim, -1)
        flat = logits.reshape(-1, logits.shape[-1]).float()
        with torch.no_grad():
            probs = torch.softmax(flat, dim=-1)
            # Non-finite logits: sample anything; the batch's factors are non-finite and dropped.
            bad = ~torch.isfinite(probs).all(dim=-1, keepdim=True)
            probs = torch.where(bad, torch.ones_like(probs), probs)
            y = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return F.cross_entropy(flat, y, reduction="sum")
    with torch.no_grad():
        eps = torch.randn(output.shape, generator=generator, device=output.device, dtype=torch.float32)
        y = output.detach().float() + eps
    return 0.5 * ((y - output.float()) ** 2).sum()


@dataclass
class CaptureResult:
    layers: dict[str, LayerFactors]
    fire_order: list[str]
    batches: int
    skipped_batches: int


def capture_batch(
    model: nn.Module,
    cap: KFACapture,
    inp: Any,
    target: Any,
    *,
    fisher: str = "true",
    loss_fn: Callable | None = None,
    likelihood: str = "categorical",
    class_dim: int = -1,
    generator: torch.Generator | None = None,
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> bool:
    """One forward and backward of ``model`` on ``inp`` that feeds ``cap`` (hooks already on).

    The forward is ``model(inp)``, or ``forward_fn(model, inp)`` when given (then ``inp`` is the
    whole batch, for models whose ``forward`` takes more than one input).

    The caller chooses the model's mode (eval mode keeps BatchNorm statistics and dropout RNG
    untouched). The backward goes through :func:`torch.autograd.grad` to the hooked layers'
    *inputs* (a floating-point model input is made to carry a gradient for this), so no weight
    gradient is computed and ``.grad`` is never written; a layer whose input carries no gradient
    (e.g. after a frozen stem) is reached through its weight instead. Returns whether the batch
    was committed (finite).

    - ``fisher="true"``: targets are sampled from the model (:func:`sampled_loss`) with
      ``generator``; the global RNG is not used.
    - ``fisher="empirical"``: ``loss_fn(output, target)`` (default :func:`default_loss`), which
      must return the loss averaged over the batch's ``N`` examples; it is multiplied by ``N``.
    """
    if isinstance(inp, torch.Tensor) and inp.is_floating_point() and not inp.requires_grad:
        # A non-leaf alias that requires grad: the backward can stop at the first layer's input.
        inp = inp.detach() + torch.zeros((), dtype=inp.dtype, device=inp.device, requires_grad=True)
    cap.begin_batch()
    try:
        with torch.enable_grad():
            output = model(inp) if forward_fn is None else forward_fn(model, inp)
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"the model returned {type(output).__name__}; curvature capture needs a "
                    "tensor of logits (pass forward_fn=lambda model, batch: ... returning them)"
                )
            n = output.shape[0]
            if fisher == "true":
                loss = sampled_loss(output, likelihood, class_dim, generator)
                cap.grad_scale = 1.0
            else:
                if target is None:
                    raise ValueError("fisher='empirical' needs (input, target) batches; got no target")
                fn = loss_fn or (lambda o, t: default_loss(o, t, class_dim))
                loss = fn(output, target)
                cap.grad_scale = float(n)
            if hasattr(cap, "grad_targets"):
                root = inp if isinstance(inp, torch.Tensor) and inp.requires_grad else None
                targets = cap.grad_targets(root)
            else:  # other captures with the same interface: reach every layer through its weight
                targets = [
                    m.weight
                    for n, m in cap.modules.items()
                    if n in cap.factors_for and m.weight.requires_grad
                ]
            if targets and loss.requires_grad:
                torch.autograd.grad(loss, targets, allow_unused=True)
    except BaseException:
        cap.abort_batch()
        raise
    return cap.end_batch(n)


def capture_factors(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[Any],
    *,
    factors_for: Iterable[str],
    fisher: str = "true",
    loss_fn: Callable | None = None,
    input_fn: Callable | None = None,
    likelihood: str = "categorical",
    class_dim: int = -1,
    generator: torch.Generator | None = None,
    a_form: str = "channel",
    max_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> CaptureResult:
    """Run ``model`` over ``batches`` in eval mode and accumulate K-FAC factors of ``modules``.

    The model is put in eval mode for the capture (BatchNorm uses and keeps its running
    statistics, dropout is off) and its modes are restored afterwards; hooks are removed also on
    errors. See :func:`capture_batch` for the two Fisher types.
    """
    cap = KFACapture(modules, factors_for=factors_for, a_form=a_form)
    drive_capture(
        model,
        cap,
        batches,
        fisher=fisher,
        loss_fn=loss_fn,
        input_fn=input_fn,
        likelihood=likelihood,
        class_dim=class_dim,
        generator=generator,
        max_batches=max_batches,
        what="curvature",
        forward_fn=forward_fn,
    )
    return cap.result()


def drive_capture(
    model: nn.Module,
    cap: Any,
    batches: Iterable[Any],
    *,
    fisher: str = "true",
    loss_fn: Callable | None = None,
    input_fn: Callable | None = None,
    likelihood: str = "categorical",
    class_dim: int = -1,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    what: str = "curvature",
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> int:
    """Feed ``cap`` (a :class:`KFACapture` or any capture with its interface) over ``batches``.

    The model runs in eval mode (modes restored afterwards); the hooks are on only inside this
    call and removed also on errors. The true Fisher's default generator is seeded with 0 on the
    model's device. Returns the number of batches seen; raises if there were none.
    """
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if fisher == "true" and generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    seen = 0
    try:
        with cap:
            for batch in _limit(batches, max_batches):
                seen += 1
                if forward_fn is None:
                    inp, target = split_batch(batch, input_fn)
                else:
                    inp, target = batch, target_of(batch)
                capture_batch(
                    model,
                    cap,
                    to_device(inp, device),
                    to_device(target, device),
                    fisher=fisher,
                    loss_fn=loss_fn,
                    likelihood=likelihood,
                    class_dim=class_dim,
                    generator=generator,
                    forward_fn=forward_fn,
                )
    finally:
        for m, mode in modes.items():
            m.training = mode
    if seen == 0:
        raise ValueError(f"batches is empty: {what} needs at least one batch")
    return seen


def _limit(batches: Iterable[Any], n: int | None) -> Iterator[Any]:
    for i, b in enumerate(batches):
        if n is not None and i >= n:
            return
        yield b
