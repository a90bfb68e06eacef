"""Small models shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


class ConvNet(nn.Module):
    """Stride 2, dilation with ``padding="same"``, reflect padding, bias, in-place ReLU, BN."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 24, 3, dilation=2, padding="same"),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.Conv2d(24, 32, 3, padding=1, padding_mode="reflect", bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 1, stride=2),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.features(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


class ResBlock(nn.Module):
    """Two 3×3 conv + BN, a 1×1 conv shortcut when the shape changes, activation ``act``."""

    def __init__(self, c_in: int, c_out: int, stride: int, act: Callable = F.relu) -> None:
        super().__init__()
        self.act = act
        self.c1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.sc = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.sc = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.b1(self.c1(x)))
        return self.act(self.b2(self.c2(h)) + self.sc(x))


class TinyResNet(nn.Module):
    """Stem (3→8) + identity block + strided block (8→12) with a 1×1 shortcut + Linear(12, 5);
    with ``heads=2`` also ``aux = Linear(12, 3)``, returned as ``(logits, {"aux": …})``."""

    def __init__(self, act: Callable = F.relu, heads: int = 1) -> None:
        super().__init__()
        self.act = act
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.l1 = ResBlock(8, 8, 1, act)
        self.l2 = ResBlock(8, 12, 2, act)
        self.fc = nn.Linear(12, 5)
        self.aux = nn.Linear(12, 3) if heads == 2 else None

    def forward(self, x: torch.Tensor):
        h = self.l2(self.l1(self.act(self.bn(self.stem(x))))).mean((2, 3))
        return self.fc(h) if self.aux is None else (self.fc(h), {"aux": self.aux(h)})


class TinyTransformer(nn.Module):
    """Linear layers on token sequences around an ``nn.TransformerEncoderLayer``."""

    def __init__(self, d_in: int = 12, d: int = 32, n_classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.enc = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 64), nn.GELU(), nn.Linear(64, d))
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.embed(x))
        h = h + self.mlp(h)
        return self.head(h.mean(1))


def resnet18(n_classes: int = 10) -> nn.Module:
    return torchvision.models.resnet18(num_classes=n_classes)


def conv_batches(n_batches: int = 3, n: int = 16, size: int = 16, n_classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, size, size, generator=g), torch.randint(0, n_classes, (n,), generator=g))
        for _ in range(n_batches)
    ]


def seq_batches(
    n_batches: int = 3, n: int = 16, t: int = 7, d_in: int = 12, n_classes: int = 5, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, t, d_in, generator=g), torch.randint(0, n_classes, (n,), generator=g))
        for _ in range(n_batches)
    ]


def warm_up_bn(model: nn.Module, batches) -> None:
    """Give BatchNorm layers non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    model.eval()


def layer_patches(model: nn.Module, layer: nn.Conv2d, batches: list) -> torch.Tensor:
    """Every input patch of ``layer`` over ``batches`` (eval mode): ``(N·T, C_in·k²)`` float64."""
    xs: list[torch.Tensor] = []
    h = layer.register_forward_hook(lambda m, i, o: xs.append(i[0].detach().double()))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    h.remove()
    cols = [
        nn.functional.unfold(x, layer.kernel_size, padding=layer.padding)
        .transpose(1, 2)
        .reshape(-1, x.shape[1] * layer.kernel_size[0] * layer.kernel_size[1])
        for x in xs
    ]
    return torch.cat(cols)


def least_squares_refit(
    w: torch.Tensor, p: torch.Tensor, removed: list[int], block: int, damping: float
) -> torch.Tensor:
    """``w`` ``(C_out, C·block)`` refitted from its kept input channels: the damped least squares
    ``W'_K = W_K + W_S·A_SK·A_KK⁻¹`` (``A = PᵀP / rows``), zeros on the removed columns."""
    a = p.T @ p / p.shape[0]
    a = a + damping * torch.trace(a) / a.shape[0] * torch.eye(a.shape[0], dtype=torch.float64)
    cols = [c * block + t for c in removed for t in range(block)]
    kept = [i for i in range(a.shape[0]) if i not in cols]
    s, k = torch.tensor(cols), torch.tensor(kept)
    out = torch.zeros_like(w)
    out[:, k] = w[:, k] + w[:, s] @ a[s][:, k] @ torch.linalg.inv(a[k][:, k])
    return out


class TextClassifier(nn.Module):
    """Embedding, two ``batch_first`` ``nn.TransformerEncoderLayer`` (32 wide, 4 heads, feed-forward
    64), mean-pool, Linear(32, 5): a stock text classifier."""

    def __init__(self, norm_first: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(
            32, 4, 64, dropout=dropout, batch_first=True, norm_first=norm_first
        )
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(self.emb(x)).mean(1))


def token_batches() -> list:
    """Three ``(tokens (8, 12), labels (8,))`` batches for :class:`TextClassifier`."""
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 50, (8, 12), generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(3)
    ]


class TextDecoder(nn.Module):
    """Embedding, two ``batch_first``, ``norm_first`` ``nn.TransformerDecoderLayer`` attending to the
    embedded tokens themselves (the first ``memory`` of them, all by default), mean-pool, Linear."""

    def __init__(self, memory: int | None = None) -> None:
        super().__init__()
        self.memory = memory
        self.emb = nn.Embedding(50, 32)
        layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.dec = nn.TransformerDecoder(layer, 2)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.fc(self.dec(h, h[:, : self.memory]).mean(1))


LOADERS = ("restore_pruned", "hook", "restore_channels")


def reloaded(make: Callable[[], nn.Module], pruned: nn.Module, path, example, load: str) -> nn.Module:
    """A fresh ``make()`` given ``pruned``'s weights (saved as a state_dict at ``path``) by one of
    the three loaders (:data:`LOADERS`): ``restore_pruned``, ``enable_pruned_loading`` then
    ``load_state_dict``, or ``restore_channels`` on a copy of the state_dict without its metadata
    (widths and heads from the shapes alone, traced on ``example``). In eval mode."""
    from lightning_eigendamage import enable_pruned_loading, restore_channels, restore_pruned

    fresh = make()
    if load == "restore_pruned":
        restore_pruned(fresh, path)
    elif load == "hook":
        enable_pruned_loading(fresh)
        fresh.load_state_dict(torch.load(path, weights_only=True))
    elif load == "restore_channels":
        restore_channels(fresh, {k: v.clone() for k, v in pruned.state_dict().items()}, example)
    else:
        raise ValueError(f"load must be one of {LOADERS}, got {load!r}")
    return fresh.eval()


def tiny_swin(
    depths: tuple[int, int] = (1, 1), heads: tuple[int, int] = (1, 1), window: int = 2
) -> nn.Module:
    """torchvision's Swin V1 at toy size (embedding 16, patches of 4, 10 classes), in eval mode: two
    stages of ``depths`` blocks with ``heads`` heads each, windows of ``window``."""
    from torchvision.models import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=list(depths),
        num_heads=list(heads),
        window_size=[window, window],
        stochastic_depth_prob=0.0,
        num_classes=10,
    ).eval()


def tiny_maxvit(channels: int = 16, head_dim: int = 8, layers: int = 1) -> nn.Module:
    """torchvision's MaxViT at toy size (stem 8, partitions of 2 on 32×32 inputs, 10 classes): one
    stage of ``layers`` blocks ``channels`` wide, attention heads of ``head_dim`` (``channels //
    head_dim`` heads in each block's window and grid attention)."""
    from torchvision.models import MaxVit

    return MaxVit(
        input_size=(32, 32),
        stem_channels=8,
        partition_size=2,
        block_channels=[channels],
        block_layers=[layers],
        head_dim=head_dim,
        stochastic_depth_prob=0.0,
        num_classes=10,
    )
