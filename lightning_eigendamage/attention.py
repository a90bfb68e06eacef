"""Attention heads: where they are, how their output projection is captured, how one is removed.

A *head block* is an attention module whose heads can be removed one at a time. Head ``h`` of a
block with ``H`` heads of ``d`` dimensions owns

- rows ``s·D + h·d + j`` (``s`` = 0, 1, 2 for q, k, v; ``D = H·d``; ``j < d``) of the packed
  in-projection (``nn.MultiheadAttention.in_proj_weight``, or a timm-style ``qkv`` Linear laid out
  as ``(3, H, d)``), or rows ``h·d + j`` of each of separate ``q_proj``/``k_proj``/``v_proj``;
- the input columns ``h·d + j`` of the output projection (``out_proj`` or ``proj``): the block
  of ``W_o`` that reads the head's output ``z_h``. Removing the head removes that block; the loss
  increase is scored and the other heads compensated there, with the input-side Kron-OBS of any
  reader (the head is one "channel" whose ``d`` columns go together).

Four forms are recognised (:func:`find_head_blocks`): ``nn.MultiheadAttention`` with a packed
in-projection (``kdim == vdim == embed_dim``); torchvision's window attentions, Swin V1's
``ShiftedWindowAttention`` (``qkv``, ``proj``, ``num_heads``) and MaxViT's
``RelativePositionalMultiHeadAttention`` (``to_qkv``, ``merge``, ``n_heads``), whose in-projection
is laid out ``(3, H, d)`` and whose relative-position bias table loses the head's column (they
become :class:`~lightning_eigendamage.window_attention.PrunedWindowAttention` and
:class:`~lightning_eigendamage.window_attention.PrunedRelativeAttention`); a module with an integer
``num_heads`` and child Linears ``qkv`` (``3·D`` outputs) and ``proj`` (``D`` inputs); and one
with ``num_heads`` and ``q_proj``/``k_proj``/``v_proj``/``out_proj`` (or ``o_proj``). A module of
the last two forms is only pruned if its ``forward`` still runs with a head fewer once
``num_heads`` is lowered (checked on a copy), with the attributes such code keeps beside it
(:func:`set_head_count`: timm's ``attn_dim``, a ``num_key_value_heads`` equal to ``num_heads``).

``nn.MultiheadAttention`` cannot hold fewer heads than ``embed_dim // head_dim`` (it derives the
head width from ``embed_dim``); a head-pruned one becomes :class:`PrunedHeadsAttention`, a
subclass that keeps ``embed_dim`` and computes with ``num_heads · head_dim`` inner dimensions
(the same object: its class is switched, as ``torch.nn.utils.parametrize`` does). It is never run
by PyTorch's fused kernels (which assume ``num_heads · head_dim == embed_dim``): its
``_qkv_same_embed_dim`` is False, which is what ``nn.TransformerEncoderLayer`` checks.

``nn.MultiheadAttention`` calls ``out_proj`` functionally (and Swin's window attention its
``proj``), so hooks on it never fire. :func:`routed_out_projections` makes it fire during a
capture: the attention runs with an identity stand-in for the projection (``z·I = z`` exactly)
and the real module is then called on ``z``; the outputs are the model's, to float rounding.
"""

from __future__ import annotations

import contextlib
import copy
import math
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .costs import module_path
from .nested import map_tensors


class PrunedHeadsAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with ``num_heads · head_dim`` inner dimensions (fewer than
    ``embed_dim``): ``in_proj_weight`` ``(3·num_heads·head_dim, embed_dim)``, ``out_proj``
    ``Linear(num_heads·head_dim, embed_dim)``, ``bias_k``/``bias_v`` ``(1, 1, num_heads·head_dim)``.

    Same arguments, outputs and attention weights as ``nn.MultiheadAttention.forward`` (boolean or
    float ``attn_mask`` of shape ``(L, S)`` or ``(N·num_heads, L, S)``, ``key_padding_mask``,
    ``need_weights``, ``average_attn_weights``, ``is_causal``, batched or not, ``batch_first``),
    computed with ``F.scaled_dot_product_attention`` (or an explicit softmax when the weights
    are returned): ``softmax(q·kᵀ/√d + mask)·v`` per head, then ``out_proj``.
    """

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested:
            return self._nested_forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        length, n, _ = query.shape
        h, d = self.num_heads, self.head_dim
        inner = h * d
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:inner], None if b is None else b[:inner])
        k = F.linear(key, w[inner : 2 * inner], None if b is None else b[inner : 2 * inner])
        v = F.linear(value, w[2 * inner :], None if b is None else b[2 * inner :])
        float_dtype = q.dtype
        # as torch does: with the causal hint, no padding mask and no weights, the mask is the
        # causal one over every key (bias_k and the zero key included); else attn_mask is used
        hint = is_causal and key_padding_mask is None and not need_weights
        mask = None if hint else _additive(attn_mask, float_dtype)
        if mask is None and is_causal and not hint:
            mask = _causal(length, key.shape[0], float_dtype, q.device)
        pad = _additive(key_padding_mask, float_dtype)
        bias_k, bias_v = self.bias_k, self.bias_v  # (locals: TorchScript refines their Optional)
        if bias_k is not None and bias_v is not None:
            k = torch.cat([k, bias_k.repeat(1, n, 1)])
            v = torch.cat([v, bias_v.repeat(1, n, 1)])
            mask = None if mask is None else F.pad(mask, (0, 1))
            pad = None if pad is None else F.pad(pad, (0, 1))
        q = q.reshape(length, n * h, d).transpose(0, 1)
        k = k.reshape(k.shape[0], n * h, d).transpose(0, 1)
        v = v.reshape(v.shape[0], n * h, d).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n * h, 1, d)], dim=1)
            v = torch.cat([v, v.new_zeros(n * h, 1, d)], dim=1)
            mask = None if mask is None else F.pad(mask, (0, 1))
            pad = None if pad is None else F.pad(pad, (0, 1))
        s = k.shape[1]
        if hint:
            mask = _causal(length, s, float_dtype, q.device)
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.reshape(1, length, s)
            elif mask.shape[0] != n * h:
                raise RuntimeError(  # (str/concatenation: the forward compiles with TorchScript)
                    "attn_mask of shape " + str(list(mask.shape)) + ": a 3-D mask must be "
                    "(batch·num_heads, L, S) = ("
                    + str(n * h)
                    + ", "
                    + str(length)
                    + ", "
                    + str(s)
                    + "); this attention has "
                    + str(h)
                    + " heads (some were pruned)"
                )
        if pad is not None:
            pad = pad.reshape(n, 1, 1, s).expand(n, h, 1, s).reshape(n * h, 1, s)
            mask = pad if mask is None else mask + pad
        p = self.dropout if self.training else 0.0
        weights: torch.Tensor | None = None
        if need_weights:
            logits = torch.bmm(q * (1.0 / math.sqrt(d)), k.transpose(1, 2))
            if mask is not None:
                logits = logits + mask
            weights = torch.softmax(logits, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            z = torch.bmm(weights, v)  # (n·h, L, d)
            weights = weights.reshape(n, h, length, s)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            m4: torch.Tensor | None = None
            if mask is not None:  # (n·h or 1, L or 1, S) → broadcastable (n or 1, h or 1, L or 1, S)
                m4 = (
                    mask.reshape(n, h, mask.shape[1], mask.shape[2]) if mask.shape[0] == n * h else mask[None]
                )
            z = F.scaled_dot_product_attention(
                q.reshape(n, h, length, d),
                k.reshape(n, h, s, d),
                v.reshape(n, h, s, d),
                attn_mask=m4,
                dropout_p=p,
            ).reshape(n * h, length, d)
        z = z.transpose(0, 1).reshape(length, n, inner)
        out = self.out_proj(z)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    @torch.jit.unused
    def _nested_forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention on a nested tensor ``(N, L_i, E)`` (``batch_first``): what
        ``nn.TransformerEncoder`` passes its layers in eval mode when it is given a
        ``src_key_padding_mask`` (it packs the unpadded rows and drops the mask). Computed padded
        to ``max L_i`` with the padding masked out of the keys, the output packed again the same
        way: each sequence's rows are those of the padded computation on it alone."""
        if not (key is query and value is query) or not self.batch_first:
            raise RuntimeError(
                "PrunedHeadsAttention takes a nested tensor only for batch_first self-attention "
                "(query, key and value the same nested tensor), as nn.TransformerEncoder passes it"
            )
        if key_padding_mask is not None:
            raise RuntimeError("a nested tensor carries its own lengths: pass no key_padding_mask with it")
        lengths = [int(t.shape[0]) for t in query.unbind()]
        x = query.to_padded_tensor(0.0)
        ends = torch.tensor(lengths, device=x.device)
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= ends[:, None]  # (N, max L_i)
        out, weights = self.forward(x, x, x, pad, need_weights, attn_mask, average_attn_weights, is_causal)
        packed = torch.nested.nested_tensor([out[i, :n] for i, n in enumerate(lengths)], layout=query.layout)
        return packed, weights


# TorchScript reads the signature of an unused method with a resolver that does not see this
# module's names: its annotations are given as objects, not strings
PrunedHeadsAttention._nested_forward.__annotations__ = typing.get_type_hints(
    PrunedHeadsAttention._nested_forward
)


def _causal(length: int, s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(L, S)``: 0 on and below the diagonal, ``-inf`` above."""
    return torch.full((length, s), float("-inf"), dtype=dtype, device=device).triu(1)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not attended) as ``0 / -inf``, a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


@dataclass
class HeadBlock:
    """One attention module whose heads can be removed (see the module docstring).

    Attributes:
        name: the module's qualified name; ``module``: the module; ``kind``: ``"mha"``, ``"window"``,
            ``"qkv"`` or ``"split"``; ``num_heads``/``head_dim``: ``H`` and ``d`` now; ``reader``: the output
            projection (``out_proj`` / ``proj`` / MaxViT's ``merge``), a Linear with ``H·d`` inputs;
            ``reader_name``.
    """

    name: str
    module: nn.Module
    kind: str
    num_heads: int
    head_dim: int
    reader: nn.Linear
    reader_name: str

    @property
    def producers(self) -> list[nn.Linear]:
        """The Linear layers whose rows are the heads' q, k, v (none for ``"mha"``)."""
        m = self.module
        if self.kind == "window":
            from .window_attention import projections

            return [m._modules[projections(m)[0]]]
        if self.kind == "qkv":
            return [m.qkv]
        if self.kind == "split":
            return [m.q_proj, m.k_proj, m.v_proj]
        return []

    def columns(self, heads: Sequence[int]) -> list[int]:
        """The reader's input columns of ``heads``."""
        d = self.head_dim
        return [h * d + j for h in sorted(heads) for j in range(d)]


_WINDOW_CLASSES = (
    "ShiftedWindowAttention",
    "PrunedWindowAttention",
    "RelativePositionalMultiHeadAttention",
    "PrunedRelativeAttention",
)


def _window(module: Any) -> bool:
    """torchvision's Swin V1 window attention or MaxViT's relative-position attention (or their
    pruned forms; see :mod:`~lightning_eigendamage.window_attention`)."""
    if not type(module).__module__.startswith(("torchvision.", "lightning_eigendamage.")):
        return False
    if type(module).__name__ not in _WINDOW_CLASSES:
        return False
    from .window_attention import is_window_attention

    return is_window_attention(module)


def heads_attribute(module: nn.Module) -> str:
    """The attribute that holds ``module``'s head count: ``n_heads`` for MaxViT's attention (and
    its pruned form), ``num_heads`` for every other form."""
    if _window(module):
        from .window_attention import heads_attribute as window_heads

        return window_heads(module)
    return "num_heads"


def head_count(module: nn.Module) -> int | None:
    """``module``'s head count (:func:`heads_attribute`), or None where it has no integer one."""
    h = getattr(module, heads_attribute(module), None)
    return h if isinstance(h, int) and not isinstance(h, bool) else None


def _linear(m: Any) -> bool:
    return type(m) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def head_block(name: str, module: nn.Module) -> HeadBlock | None:
    """``module`` as a :class:`HeadBlock`, or None if it is none of the four forms."""
    h = head_count(module)
    if isinstance(module, nn.MultiheadAttention):
        packed = module._qkv_same_embed_dim or isinstance(module, PrunedHeadsAttention)
        if module.in_proj_weight is None or not packed:
            return None
        d = module.head_dim
        inner = module.out_proj.in_features
        if d < 1 or inner != d * module.num_heads or module.in_proj_weight.shape[0] != 3 * inner:
            return None
        return HeadBlock(name, module, "mha", module.num_heads, d, module.out_proj, _join(name, "out_proj"))
    if h is None or h < 1:
        return None
    kids = module._modules
    if _window(module):
        from .window_attention import projections

        qkv, proj = projections(module)
        inner = kids[proj].in_features
        d = getattr(module, "head_dim", inner // h)  # Swin V1's torchvision form has none
        if inner % h or d != inner // h or kids[qkv].out_features != 3 * inner:
            return None
        return HeadBlock(name, module, "window", h, d, kids[proj], _join(name, proj))
    if _linear(kids.get("qkv")) and _linear(kids.get("proj")):
        inner = kids["proj"].in_features
        if inner % h == 0 and kids["qkv"].out_features == 3 * inner:
            return HeadBlock(name, module, "qkv", h, inner // h, kids["proj"], _join(name, "proj"))
    out = next((k for k in ("out_proj", "o_proj") if _linear(kids.get(k))), None)
    if out is not None and all(_linear(kids.get(k)) for k in ("q_proj", "k_proj", "v_proj")):
        inner = kids[out].in_features
        if inner % h == 0 and all(kids[k].out_features == inner for k in ("q_proj", "k_proj", "v_proj")):
            return HeadBlock(name, module, "split", h, inner // h, kids[out], _join(name, out))
    return None


# Attributes that attention code written by hand keeps beside its head count and uses in its
# forward: the inner width ``H·d`` (timm's ``attn_dim``, HuggingFace's ``all_head_size``, the
# common ``inner_dim``) and, without grouped queries, the key/value head count (equal to ``H``).
_WIDTH_ATTRIBUTES = ("attn_dim", "all_head_size", "inner_dim")
_COUNT_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads")


def set_head_count(module: nn.Module, heads: int, head_dim: int) -> None:
    """Set ``module``'s head count (:func:`heads_attribute`) to ``heads``, with the attributes
    tied to it (``_WIDTH_ATTRIBUTES`` that equal ``H·head_dim`` become ``heads·head_dim``;
    ``_COUNT_ATTRIBUTES`` that equal ``H`` become ``heads``; ``H`` the count before). Used when
    heads are removed and when a checkpoint of a head-pruned model is loaded into a fresh one."""
    before = head_count(module)
    if before is not None and not isinstance(module, nn.MultiheadAttention) and not _window(module):
        for key in _WIDTH_ATTRIBUTES:
            v = getattr(module, key, None)
            if type(v) is int and v == before * head_dim:
                setattr(module, key, heads * head_dim)
        for key in _COUNT_ATTRIBUTES:
            v = getattr(module, key, None)
            if type(v) is int and v == before:
                setattr(module, key, heads)
    setattr(module, heads_attribute(module), heads)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_head_blocks(model: nn.Module) -> list[HeadBlock]:
    """Every head block of ``model`` (see the module docstring), in module order."""
    out = []
    for name, module in model.named_modules():
        block = head_block(name, module)
        if block is not None:
            out.append(block)
    return out


# ---------------------------------------------------------------------------------------------
# Capture: nn.MultiheadAttention's out_proj through its module call
# ---------------------------------------------------------------------------------------------


class _Identity(nn.Module):
    """Stands in for ``out_proj`` inside ``nn.MultiheadAttention``'s functional call."""

    def __init__(self, real: nn.Linear) -> None:
        super().__init__()
        self.real = [real]  # not a submodule
        w = real.weight
        self.weight = torch.eye(real.in_features, dtype=w.dtype, device=w.device)
        # a zero bias, not None: PyTorch's fused inference path needs one (z·I + 0 = z exactly)
        self.bias = torch.zeros(real.in_features, dtype=w.dtype, device=w.device)


def functional_owners(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """``output projection → its attention module`` for every attention of ``model`` that reads
    its output projection's weights itself: ``nn.MultiheadAttention`` (its ``out_proj``; not
    :class:`PrunedHeadsAttention`, which calls it as a module) and torchvision's Swin window
    attention (its ``proj``; not the pruned form; MaxViT's attention calls ``merge`` as a module)."""
    out: dict[nn.Module, nn.Module] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) and not isinstance(m, PrunedHeadsAttention):
            out[m.out_proj] = m
        elif _window(m) and reads_weights_itself(m):
            out[m.proj] = m
    return out


def reads_weights_itself(module: nn.Module) -> bool:
    """Whether ``module`` applies its child Linears through their weights (``F.linear``), so hooks
    on them never fire: ``nn.MultiheadAttention`` and torchvision's Swin window attention (not
    their pruned forms, which call them as modules, nor MaxViT's attention, which calls
    ``to_qkv`` and ``merge`` as modules)."""
    if isinstance(module, nn.MultiheadAttention):
        return True  # PrunedHeadsAttention calls out_proj, but its in-projection is a parameter
    if not _window(module):
        return False
    from .window_attention import reads_weights_itself as window_reads

    return window_reads(module)


def _reader_key(module: nn.Module) -> str:
    return "out_proj" if isinstance(module, nn.MultiheadAttention) else "proj"


def route_out_projection(mha: nn.Module) -> list[Any]:
    """Hooks on an attention module of :func:`functional_owners` that make its output projection
    run as a module (its hooks fire): a pre-hook swaps in an identity stand-in, a forward hook
    puts the real one back and applies it to the output (``nn.MultiheadAttention``: the first of
    its two outputs; Swin window attention: its output, where ``proj`` is the last per-token
    operation before the windows are put back). Returns the handles (``remove()`` them to undo)."""
    key = _reader_key(mha)

    @torch.compiler.disable
    def pre(module: nn.Module, args: tuple) -> None:
        real = module._modules[key]
        if not isinstance(real, _Identity):
            module._modules[key] = _Identity(real)

    @torch.compiler.disable
    def post(module: nn.Module, args: tuple, output: Any) -> Any:
        standin = module._modules[key]
        if not isinstance(standin, _Identity):
            return None
        real = standin.real[0]
        module._modules[key] = real
        if output is None:  # forward raised: only the real projection is put back
            return None
        if isinstance(output, tuple):
            out, weights = output
            return real(out), weights
        return real(output)

    return [mha.register_forward_pre_hook(pre), mha.register_forward_hook(post, always_call=True)]


@contextlib.contextmanager
def routed_out_projections(owners: dict[nn.Module, nn.Module], hooked: Sequence[nn.Module]) -> Iterator[None]:
    """While inside, every module of ``hooked`` that ``owners`` maps to the MultiheadAttention
    calling it functionally runs as a module (:func:`route_out_projection`)."""
    handles = []
    try:
        for m in hooked:
            if m in owners:
                handles.extend(route_out_projection(owners[m]))
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Removal
# ---------------------------------------------------------------------------------------------


def head_rows(block: HeadBlock, heads: Sequence[int]) -> list[int]:
    """The producer rows of ``heads`` (in a packed ``(3·H·d)`` projection, or in each of the
    separate ``(H·d)`` ones for ``"split"``)."""
    inner = block.num_heads * block.head_dim
    cols = block.columns(heads)
    if block.kind == "split":
        return cols
    return [s * inner + c for s in range(3) for c in cols]


def _keep(n: int, gone: Sequence[int]) -> torch.Tensor:
    drop = set(int(i) for i in gone)
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.int64)


@torch.no_grad()
def _narrow(
    module: nn.Module, key: str, dim: int, keep: torch.Tensor
) -> tuple[nn.Parameter, nn.Parameter, torch.Tensor] | None:
    """Replace ``module.<key>`` by its slice ``keep`` along ``dim``; ``(old, new, flat index)``."""
    old = module._parameters.get(key)
    if old is None:
        return None
    index = (
        torch.arange(old.numel(), device=old.device).reshape(old.shape).index_select(dim, keep.to(old.device))
    )
    new = nn.Parameter(
        old.detach().index_select(dim, keep.to(old.device)).clone(), requires_grad=old.requires_grad
    )
    if old.grad is not None:
        new.grad = old.grad.index_select(dim, keep.to(old.device)).clone()
    module._parameters[key] = new
    return old, new, index.reshape(-1).cpu()


def remove_heads(
    block: HeadBlock, heads: Sequence[int]
) -> list[tuple[str, nn.Parameter, nn.Parameter, torch.Tensor]]:
    """Remove ``heads`` (indices ``< block.num_heads``) from ``block`` in place: the producers'
    rows, the reader's columns, a window attention's bias-table columns, the head count lowered
    (``num_heads``, MaxViT's ``n_heads``; an ``nn.MultiheadAttention`` becomes a
    :class:`PrunedHeadsAttention`, a window attention its pruned form). Returns ``(parameter name
    relative to the block, old, new, flat index of new in old)`` for every narrowed parameter. At
    least one head must stay."""
    heads = sorted(set(int(h) for h in heads))
    if not heads:
        return []
    if heads[0] < 0 or heads[-1] >= block.num_heads or len(heads) >= block.num_heads:
        raise ValueError(f"{block.name}: cannot remove heads {heads} of {block.num_heads}")
    m, out = block.module, []
    rows, cols = head_rows(block, heads), block.columns(heads)  # ``block`` describes it before
    inner = block.num_heads * block.head_dim

    def cut(owner: nn.Module, prefix: str, key: str, dim: int, n: int, gone: list[int]) -> None:
        res = _narrow(owner, key, dim, _keep(n, gone))
        if res is not None:
            out.append((_join(prefix, key), *res))

    if block.kind == "mha":
        cut(m, "", "in_proj_weight", 0, 3 * inner, rows)
        cut(m, "", "in_proj_bias", 0, 3 * inner, rows)
        cut(m, "", "bias_k", 2, inner, cols)
        cut(m, "", "bias_v", 2, inner, cols)
        if not isinstance(m, PrunedHeadsAttention):
            m.__class__ = PrunedHeadsAttention
        m._qkv_same_embed_dim = False
    else:
        names = ["q_proj", "k_proj", "v_proj"] if block.kind == "split" else ["qkv"]
        if block.kind == "window":
            from .window_attention import projections

            names = [projections(m)[0]]
        for k in names:
            lin = m._modules[k]
            cut(lin, k, "weight", 0, lin.out_features, rows)
            cut(lin, k, "bias", 0, lin.out_features, rows)
            lin.out_features -= len(rows)
    reader = block.reader
    rname = block.reader_name[len(block.name) + 1 :] if block.name else block.reader_name
    cut(reader, rname, "weight", 1, reader.in_features, cols)
    reader.in_features -= len(cols)
    if block.kind == "window":  # one relative-position bias column per head
        from .window_attention import as_pruned

        cut(m, "", "relative_position_bias_table", 1, block.num_heads, heads)
        as_pruned(m, block.head_dim)
    set_head_count(m, block.num_heads - len(heads), block.head_dim)
    return out


# ---------------------------------------------------------------------------------------------
# What a head costs, and whether the module runs without it
# ---------------------------------------------------------------------------------------------


def record_calls(blocks: Sequence[HeadBlock], run: Any) -> dict[nn.Module, tuple[tuple, dict]]:
    """The ``(args, kwargs)`` of each block's first call while ``run()`` runs (detached)."""
    calls: dict[nn.Module, tuple[tuple, dict]] = {}
    handles = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module not in calls:
            calls[module] = (_detach(args), _detach(kwargs))

    try:
        for b in blocks:
            handles.append(b.module.register_forward_pre_hook(pre, with_kwargs=True))
        run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _detach(x: Any) -> Any:
    return map_tensors(torch.Tensor.detach, x)


def _shapes(out: Any) -> list[tuple[int, ...]]:
    if torch.is_tensor(out):
        return [tuple(out.shape)]
    if isinstance(out, (tuple, list)):
        return [s for v in out for s in _shapes(v)]
    if isinstance(out, dict):
        return [s for v in out.values() for s in _shapes(v)]
    return []


def _flops(module: nn.Module, call: tuple[tuple, dict]) -> tuple[int, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), module_path(), counter:  # as costs.count_flops, for the same reason
        out = module(*call[0], **call[1])
    return int(counter.get_total_flops()), out


def head_cost(block: HeadBlock, call: tuple[tuple, dict]) -> tuple[int, str | None]:
    """FLOPs one head of ``block`` costs on the recorded ``call`` (the block with one head fewer,
    counted on a copy), and why its heads cannot be removed (its forward fails or changes its
    output shapes with a head fewer), or None."""
    if block.num_heads < 2:
        return 0, "a single head"
    module = block.module
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        full, out = _flops(module, call)
        trial = copy.deepcopy(module)
        trial_block = head_block("", trial)
        if trial_block is None:
            return 0, "its copy is not recognised as attention"
        remove_heads(trial_block, [0])
        try:
            fewer, out2 = _flops(trial, call)
        except Exception as e:  # its forward does not follow num_heads
            first = (str(e).splitlines() or [""])[0][:120]
            return 0, f"its forward fails with a head fewer ({type(e).__name__}: {first})"
        if _shapes(out) != _shapes(out2):
            return 0, "its output shapes change with a head fewer"
        return max(full - fewer, 0), None
    finally:
        for m, mode in modes.items():
            m.training = mode
