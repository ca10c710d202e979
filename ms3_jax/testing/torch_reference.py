"""Small PyTorch references with torchvision / timm / MMSeg naming, written independently of
ms3_jax: a ResNet, timm's ViT (DeiT) and MMSeg's `MultiLevelNeck`.

torchvision itself is not a dependency (it pulls a CUDA torch), nor is timm (it requires
torchvision); this module reproduces the parts of torchvision's `resnet50`, MMSeg's `ResNetV1c`
(deep stem, strides, dilations with `contract_dilation`) and timm's `VisionTransformer` that
exported weights must load into.
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


class _TimmAttention(nn.Module):
    """timm's `Attention` (fused qkv with bias, head-major q / k / v blocks, `proj`)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class _TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _TimmAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), _TimmMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TorchViT(nn.Module):
    """The parts of timm's `VisionTransformer` (`deit_base_patch16_224`: class token, qkv bias,
    LayerNorm eps 1e-6, exact GELU, final `norm`) that exported weights must load into, with
    timm's parameter names; `forward_features` as timm's with `dynamic_img_size=True` (position
    embeddings resampled bicubically with antialiasing for other grids). timm itself needs
    torchvision, which is not a dependency."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_dim=3072, num_classes=0):
        super().__init__()
        self.patch = patch_size
        self.grid = img_size // patch_size
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        self.blocks = nn.Sequential(*[_TimmBlock(embed_dim, num_heads, mlp_dim)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()

    def pos_embed_for(self, gh: int, gw: int) -> torch.Tensor:
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        table = self.pos_embed[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        table = torch.nn.functional.interpolate(table, size=(gh, gw), mode="bicubic",
                                                antialias=True, align_corners=False)
        return torch.cat([self.pos_embed[:, :1], table.flatten(2).transpose(1, 2)], dim=1)

    def forward_features(self, x, return_blocks: bool = False):
        gh, gw = x.shape[2] // self.patch, x.shape[3] // self.patch
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed_for(gh, gw)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        x = self.norm(x)
        return (x, outs) if return_blocks else x


class TorchMultiLevelNeck(nn.Module):
    """MMSeg's `MultiLevelNeck` with its defaults (no norm, no activation: convs with bias) and
    its names (`lateral_convs.i.conv`, `convs.i.conv`)."""

    def __init__(self, in_channels, out_channels, scales):
        super().__init__()
        self.scales = scales
        conv = lambda i, o, k: nn.ModuleDict({"conv": nn.Conv2d(i, o, k, padding=k // 2)})
        self.lateral_convs = nn.ModuleList([conv(c, out_channels, 1) for c in in_channels])
        self.convs = nn.ModuleList([conv(out_channels, out_channels, 3) for _ in scales])

    def forward(self, inputs):
        outs = []
        for x, lateral, conv, scale in zip(inputs, self.lateral_convs, self.convs, self.scales):
            x = torch.nn.functional.interpolate(lateral["conv"](x), scale_factor=scale,
                                                mode="bilinear", align_corners=False)
            outs.append(conv["conv"](x))
        return outs


def randomize_vit_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Matrices N(0, 1 / fan_in), `cls_token` / `pos_embed` N(0, 1), LayerNorm weights
    1 + N(0, 0.1), biases N(0, 0.1): a misplaced or untransposed weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("cls_token", "pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:
                base = 1.0 if name.endswith("weight") else 0.0  # LayerNorm weight or a bias
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()
