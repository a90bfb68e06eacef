"""torchvision's shifted-window attention (Swin V1) with fewer heads.

``torchvision.models.swin_transformer.ShiftedWindowAttention`` reads its ``qkv`` and ``proj``
weights itself (``F.linear`` on ``self.qkv.weight``) and derives the head width from the input
width, ``C // num_heads``, so it cannot run with a head removed. :class:`PrunedWindowAttention`
is the same module computing with ``num_heads · head_dim`` inner dimensions (fewer than ``C``):

- ``qkv``: ``Linear(C, 3·h·d)`` laid out ``(3, h, d)``; ``proj``: ``Linear(h·d, C)``, called as
  modules (their hooks fire);
- ``relative_position_bias_table``: ``((2·Wh−1)(2·Ww−1), h)``, one column per head;
- the same padding, cyclic shift, window partition, shift mask, softmax, dropout and reverse as
  torchvision's ``shifted_window_attention`` (equal to it to float rounding when no head is gone).

This module imports torchvision; :mod:`lightning_eigendamage.attention` loads it only for a model
that holds such a module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.swin_transformer import ShiftedWindowAttention


def is_window_attention(module: object) -> bool:
    """Whether ``module`` is torchvision's Swin V1 window attention (or its pruned form); Swin V2
    (cosine attention, a per-head ``logit_scale`` and a bias MLP) is not."""
    return type(module) in (ShiftedWindowAttention, PrunedWindowAttention)


class PrunedWindowAttention(ShiftedWindowAttention):
    """Swin V1 window attention with ``num_heads`` heads of ``head_dim`` (see the module
    docstring). Input and output ``(B, H, W, C)``."""

    head_dim: int

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
        q, k, v = self.qkv(x).reshape(b * windows, n, 3, h, d).permute(2, 0, 3, 1, 4)
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


def as_pruned(module: ShiftedWindowAttention, head_dim: int) -> None:
    """Make ``module`` a :class:`PrunedWindowAttention` in place (the same object: its class is
    switched) with heads of ``head_dim``."""
    module.__class__ = PrunedWindowAttention
    module.head_dim = head_dim
