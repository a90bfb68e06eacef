"""Small models shared by the tests."""

from __future__ import annotations

import torch
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
