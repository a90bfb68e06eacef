"""torchvision's window attentions (Swin V1, MaxViT) with fewer heads.

Two torchvision attentions compute within windows, hold a relative-position bias table of one
column per head, and cannot run with a head removed:

- Swin V1's ``torchvision.models.swin_transformer.ShiftedWindowAttention`` reads its ``qkv`` and
  ``proj`` weights itself (``F.linear`` on ``self.qkv.weight``) and derives the head width from the
  input width, ``C // num_heads``;
- MaxViT's ``torchvision.models.maxvit.RelativePositionalMultiHeadAttention`` (``n_heads`` heads of
  ``head_dim``, ``to_qkv`` and ``merge`` called as modules) reshapes its heads' output to its input
  width ``D`` before ``merge``.

Their pruned forms are the same modules computing with ``h·d`` inner dimensions (``h`` heads of
``d``, fewer than the input width), one shape for both:

- the in-projection (``qkv`` / ``to_qkv``): ``Linear(C, 3·h·d)`` laid out ``(3, h, d)``; the output
  projection (``proj`` / ``merge``): ``Linear(h·d, C)``; both called as modules (their hooks fire);
- ``relative_position_bias_table``: ``((2·Wh−1)(2·Ww−1), h)``, one column per kept head;
- :class:`PrunedWindowAttention` (Swin V1): the same padding, cyclic shift, window partition, shift
  mask, softmax, dropout and reverse as torchvision's ``shifted_window_attention``, queries scaled
  by ``d**-0.5``; :class:`PrunedRelativeAttention` (MaxViT): the same attention over each group's
  ``P`` tokens, keys scaled by the module's ``scale_factor`` as built (``D**-0.5`` of the original
  width: not recomputed from the smaller one). Each equals torchvision's module to float rounding
  when no head is gone.

:func:`is_window_attention` recognises the four classes, :func:`projections` and
:func:`heads_attribute` name their children and their head count (``num_heads`` / ``n_heads``),
:func:`as_pruned` switches a module to its pruned form. This module imports torchvision;
:mod:`lightning_eigendamage.attention` loads it only for a model that holds such a module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import ShiftedWindowAttention


def is_window_attention(module: object) -> bool:
    """Whether ``module`` is torchvision's Swin V1 window attention or MaxViT's relative-position
    attention (or their pruned forms); Swin V2 (cosine attention, a per-head ``logit_scale`` and a
    bias MLP) is not."""
    return type(module) in _PRUNED or type(module) in _PRUNED.values()


def _is_maxvit(module: object) -> bool:
    return type(module) in (RelativePositionalMultiHeadAttention, PrunedRelativeAttention)


def projections(module: nn.Module) -> tuple[str, str]:
    """The child names of a window attention's in-projection (``3·h·d`` outputs) and output
    projection (``h·d`` inputs): ``("qkv", "proj")`` (Swin V1), ``("to_qkv", "merge")`` (MaxViT)."""
    return ("to_qkv", "merge") if _is_maxvit(module) else ("qkv", "proj")


def heads_attribute(module: nn.Module) -> str:
    """The attribute holding a window attention's head count: ``num_heads`` (Swin V1),
    ``n_heads`` (MaxViT)."""
    return "n_heads" if _is_maxvit(module) else "num_heads"


def reads_weights_itself(module: nn.Module) -> bool:
    """Whether the window attention ``module`` applies its projections through their weights (Swin
    V1's torchvision form); MaxViT's and the pruned forms call them as modules."""
    return type(module) is ShiftedWindowAttention


class PrunedWindowAttention(ShiftedWindowAttention):
    """Swin V1 window attention with ``num_heads`` heads of ``head_dim`` (see the module
    docstring). Input and output ``(B, H, W, C)``; ``qkv``: ``(3·num_heads·head_dim, C)``,
    ``proj``: ``(C, num_heads·head_dim)``. Scriptable (``torch.jit.script``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, height, width, _ = x.shape
        wh, ww = self.window_size
        h, d = self.num_heads, self.head_dim
        x = F.pad(x, (0, 0, 0, (ww - width % ww) % ww, 0, (wh - height % wh) % wh))
        _, ph, pw, c = x.shape
        shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = (ph // wh) * (pw // ww)
        n = wh * ww
        x = x.view(b, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * windows, n, c)
        qkv = self.qkv(x).reshape(b * windows, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (indexed: TorchScript unpacks no tensor)
        attn = (q * d**-0.5).matmul(k.transpose(-2, -1)) + self.get_relative_position_bias()
        if sum(shift) > 0:
            attn = attn.view(b, windows, h, n, n) + _shift_mask(ph, pw, (wh, ww), shift, x)[None, :, None]
            attn = attn.view(-1, h, n, n)
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        x = self.proj(attn.matmul(v).transpose(1, 2).reshape(b * windows, n, h * d))
        x = F.dropout(x, p=self.dropout, training=self.training)
        out = x.shape[-1]
        x = x.view(b, ph // wh, pw // ww, wh, ww, out).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, out)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


def _shift_mask(
    ph: int, pw: int, window: tuple[int, int], shift: list[int], like: torch.Tensor
) -> torch.Tensor:
    """``(windows, N, N)``: 0 between tokens of the same region of the shifted map, −100 else."""
    wh, ww = window
    region = like.new_zeros((ph, pw))
    count = 0
    for hs in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
        for ws in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
            region[hs[0] : hs[1], ws[0] : ws[1]] = count
            count += 1
    region = region.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class PrunedRelativeAttention(RelativePositionalMultiHeadAttention):
    """MaxViT's relative-position attention with ``n_heads`` heads of ``head_dim`` (see the module
    docstring). Input and output ``(B, G, P, D)`` (``G`` groups of ``P`` tokens); ``to_qkv``:
    ``(3·n_heads·head_dim, D)``, ``merge``: ``(D, n_heads·head_dim)``, ``relative_position_bias_table``:
    ``((2·size−1)², n_heads)``; ``scale_factor`` as built. Scriptable (``torch.jit.script``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, _ = x.shape
        h, d = self.n_heads, self.head_dim
        # torchvision chunks the 3·h·d outputs into q, k, v, each reshaped to (h, d)
        qkv = self.to_qkv(x).reshape(b, g, p, 3, h, d).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, G, h, P, d) each
        attn = q.matmul((k * self.scale_factor).transpose(-2, -1)) + self.get_relative_positional_bias()
        out = F.softmax(attn, dim=-1).matmul(v)  # (B, G, h, P, d)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, h * d))


_PRUNED: dict[type, type] = {
    ShiftedWindowAttention: PrunedWindowAttention,
    RelativePositionalMultiHeadAttention: PrunedRelativeAttention,
}


def as_pruned(module: nn.Module, head_dim: int) -> None:
    """Make the window attention ``module`` its pruned form in place (the same object: its class is
    switched), with heads of ``head_dim``: :class:`PrunedWindowAttention` for Swin V1,
    :class:`PrunedRelativeAttention` for MaxViT (a pruned form stays as it is)."""
    module.__class__ = _PRUNED.get(type(module), type(module))
    module.head_dim = head_dim
