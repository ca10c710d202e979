"""A small PyTorch ResNet with torchvision / MMSeg naming, written independently of ms3_jax.

torchvision itself is not a dependency (it pulls a CUDA torch); this module reproduces the
parts of torchvision's `resnet50` and MMSeg's `ResNetV1c` (deep stem, strides, dilations with
`contract_dilation`) that exported weights must load into.
"""
from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes * 4)) if downsample else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    def __init__(self, stage_sizes=(3, 4, 6, 3), variant="v1", strides=(1, 2, 1, 1),
                 dilations=(1, 1, 2, 4), base=64, num_classes=1000):
        super().__init__()
        self.variant = variant
        if variant == "v1":
            self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(base)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, base // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(base // 2), nn.ReLU(inplace=True),
                nn.Conv2d(base // 2, base // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(base // 2), nn.ReLU(inplace=True),
                nn.Conv2d(base // 2, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU(inplace=True))
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = base
        for i, (n, s, d) in enumerate(zip(stage_sizes, strides, dilations)):
            planes = base * 2 ** i
            blocks = []
            for b in range(n):
                # MMSeg contract_dilation: the first block of a dilated stage uses d // 2.
                dil = (d // 2 if d > 1 else d) if b == 0 else d
                blocks.append(Bottleneck(inplanes, planes, s if b == 0 else 1, dil,
                                         b == 0 and (s != 1 or inplanes != planes * 4)))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        feats = {}
        x = self.relu(self.bn1(self.conv1(x))) if self.variant == "v1" else self.stem(x)
        feats["stem"] = x
        x = self.maxpool(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            feats[f"layer{i}"] = x
        return feats


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and random BN statistics (so eval-mode BN is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()
