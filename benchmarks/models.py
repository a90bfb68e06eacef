"""The paper's CIFAR architectures (VGG19-BN, wide ResNet-32) and narrow variants for CPU runs."""

from __future__ import annotations

import torch
from torch import nn

VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]


class VGG(nn.Module):
    """VGG-BN for 32×32 inputs: bias-free 3×3 convs + BN + ReLU, max-pools, one Linear classifier.

    ``width`` scales every stage (1.0 = the paper's 64…512 widths).
    """

    def __init__(
        self, n_classes: int = 10, width: float = 1.0, in_channels: int = 3, cfg: list | None = None
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg or VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            w = max(1, int(round(v * width)))
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet with ``depth = 6n+2`` (ResNet-32: n=5) and stage widths ``widths``.

    The paper's "wide" ResNet-32 uses widths (64, 128, 256) and 1×1 conv + BN shortcuts; the
    classic narrow one (16, 32, 64).
    """

    def __init__(
        self,
        depth: int = 32,
        widths: tuple[int, int, int] = (64, 128, 256),
        n_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks = []
        c = widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(self.pool(out).flatten(1))


def vgg19(n_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> VGG:
    return VGG(n_classes, width, in_channels)


def resnet32(
    n_classes: int = 10, widths: tuple[int, int, int] = (64, 128, 256), in_channels: int = 3
) -> ResNetCifar:
    return ResNetCifar(32, widths, n_classes, in_channels)


class InvertedResidual(nn.Module):
    """MobileNet-V2's block: 1×1 expansion (×``t``) + BN + ReLU6, 3×3 depthwise + BN + ReLU6,
    1×1 projection + BN, added to the input when the shapes agree (stride 1, same width)."""

    def __init__(self, c_in: int, c_out: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = c_in * t
        layers: list[nn.Module] = []
        if t != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


# (expansion t, width c, blocks n, first stride s) for 28×28 inputs: MobileNet-V2's layout at
# half width with 12 inverted residuals, downsampling early (28 → 14 → 7 → 4) so that a training
# step on one CPU thread costs about ResNet-20's (11 MFLOPs, 172k parameters).
MOBILENET_NARROW_CFG = [
    (1, 8, 1, 1),
    (6, 12, 2, 2),
    (6, 16, 3, 2),
    (6, 32, 3, 1),
    (6, 48, 2, 2),
    (6, 80, 1, 1),
]


class MobileNetV2Cifar(nn.Module):
    """MobileNet-V2 for small inputs: a 3×3 stem (stride 1), inverted residuals with depthwise
    convs and ReLU6 (``cfg``), a 1×1 conv to ``last`` channels, average pool, one Linear."""

    def __init__(
        self,
        n_classes: int = 10,
        in_channels: int = 3,
        cfg: list[tuple[int, int, int, int]] = MOBILENET_NARROW_CFG,
        stem: int = 16,
        last: int = 320,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU6(inplace=True),
        ]
        c = stem
        for t, w, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(c, w, s if i == 0 else 1, t))
                c = w
        layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))
