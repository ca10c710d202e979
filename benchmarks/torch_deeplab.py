"""PyTorch DeepLab-v3+ / ResNet-50 with the same architecture as `configs/pretrain.py`'s CE model.

torchvision-named ResNet (variant v1, output stride 8: strides 1,2,1,1, dilations 1,1,2,4 with
MMSeg's contract_dilation) from `tests/torch_reference.py`, and MMSeg's
`DepthwiseSeparableASPPHead` (512 channels, c1 48, ASPP rates 12/24/36, image pooling) written with
torch-native modules, plus `conv_seg` (dropout 0.1, 1x1 conv). Used by `benchmarks/train_step.py`
as the PyTorch side of the speed comparison; `train_step` mirrors the JAX CE step (labels
nearest-downsampled to stride 4, cross entropy, SGD momentum 0.9, wd 4e-5).

  python benchmarks/torch_deeplab.py   # prints the parameter count and one step's time at 2x64
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ms3_jax.testing.torch_reference import TorchResNet  # noqa: E402

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def conv_module(cin: int, cout: int, k: int = 1, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    """MMCV ConvModule: conv (no bias) -> BN -> ReLU."""
    pad = dilation * (k - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def separable(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    """MMCV DepthwiseSeparableConvModule: depthwise 3x3 ConvModule -> pointwise 1x1 ConvModule."""
    return nn.Sequential(conv_module(cin, cin, 3, dilation, groups=cin), conv_module(cin, cout, 1))


class DepthwiseSeparableASPPHead(nn.Module):
    """MMSeg DeepLab-v3+ head with conv_seg (dropout 0.1), returns stride-4 logits."""

    def __init__(self, in_ch: int = 2048, c1_in: int = 256, ch: int = 512, c1_ch: int = 48,
                 dilations: tuple[int, ...] = (1, 12, 24, 36), num_classes: int = 342):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_module(in_ch, ch, 1))
        self.aspp_modules = nn.ModuleList(
            [conv_module(in_ch, ch, 1) if d == 1 else separable(in_ch, ch, d) for d in dilations])
        self.bottleneck = conv_module((len(dilations) + 1) * ch, ch, 3)
        self.c1_bottleneck = conv_module(c1_in, c1_ch, 1)
        self.sep_bottleneck = nn.Sequential(separable(ch + c1_ch, ch), separable(ch, ch))
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(ch, num_classes, 1)

    def forward(self, layer1: torch.Tensor, layer4: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(layer4).expand(-1, -1, *layer4.shape[2:])
        x = torch.cat([pooled] + [m(layer4) for m in self.aspp_modules], dim=1)
        x = self.bottleneck(x)
        c1 = self.c1_bottleneck(layer1)
        x = F.interpolate(x, size=c1.shape[2:], mode="bilinear", align_corners=False)
        x = self.sep_bottleneck(torch.cat([x, c1], dim=1))
        return self.conv_seg(self.dropout(x))


class DeepLabV3Plus(nn.Module):
    """ResNet-50 (v1, OS 8) + DepthwiseSeparableASPPHead; input uint8-range NCHW RGB."""

    def __init__(self, num_classes: int = 342):
        super().__init__()
        self.backbone = TorchResNet(variant="v1", strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
        del self.backbone.fc  # not part of the segmentor
        self.decode_head = DepthwiseSeparableASPPHead(num_classes=num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone((images.float() - self.mean) / self.std)
        return self.decode_head(feats["layer1"], feats["layer4"])


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_train_step(model: nn.Module, lr: float = 0.05, bf16: bool = False):
    """One SGD step (momentum 0.9, wd 4e-5) of pixel cross entropy at stride 4 (ignore -1)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5)

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
        h, w = labels.shape[1:]
        hh, ww = logits.shape[2:]
        rows = torch.arange(hh) * h // hh
        cols = torch.arange(ww) * w // ww
        y = labels[:, rows][:, :, cols]
        loss = F.cross_entropy(logits.float(), y, ignore_index=-1)
        loss.backward()
        opt.step()
        return float(loss)

    return step


def build(batch: int, size: int, num_classes: int = 342, channels_last: bool = True, seed: int = 0):
    """Model (train mode), a step function and a random batch (NCHW / channels_last)."""
    torch.manual_seed(seed)
    model = DeepLabV3Plus(num_classes).train()
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).float()
    labels = torch.randint(-1, num_classes, (batch, size, size))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    return model, images, labels


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    m, x, y = build(2, 64)
    print(f"parameters: {num_params(m):,}")
    step = make_train_step(m)
    step(x, y)
    t = time.perf_counter()
    step(x, y)
    print(f"one step at 2x64: {time.perf_counter() - t:.3f} s")
