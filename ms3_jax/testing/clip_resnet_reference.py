"""A PyTorch CLIP ResNet with open_clip's state-dict names, written independently of ms3_jax.

open_clip itself cannot be imported without torchvision (open_clip 3.3.0: `modified_resnet`
imports `.utils`, which imports `torchvision.ops`; the package `__init__` imports its torchvision
transforms), and torchvision is not a dependency. This module follows open_clip's
`ModifiedResNet` / `AttentionPool2d` and its text `Transformer` (nn.MultiheadAttention), plus the
two dense readings of the attention pool: MaskCLIP's v_proj -> c_proj per location and
DenseCLIP's attention output per location (bilinear position table).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity())
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class AttentionPool2d(nn.Module):
    def __init__(self, grid: int, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, dim) / dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.c_proj = nn.Linear(dim, out_dim)
        self.heads, self.grid = heads, grid

    def forward(self, x):
        """(pooled [B, P], value-dense [B, P, h, w], attention-dense [B, P, h, w])."""
        n, c, h, w = x.shape
        tokens = x.flatten(2).permute(2, 0, 1)  # (hw) N C
        seq = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
        pos = self.positional_embedding
        if (h, w) != (self.grid, self.grid):
            spatial = pos[1:].reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
            spatial = F.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=False)
            pos = torch.cat([pos[:1], spatial.reshape(c, h * w).T], dim=0)
        seq = seq + pos[:, None, :]
        out, _ = F.multi_head_attention_forward(
            query=seq, key=seq, value=seq, embed_dim_to_check=c, num_heads=self.heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False)
        attention = out[1:].permute(1, 2, 0).reshape(n, -1, h, w)
        value = self.c_proj(self.v_proj(tokens)).permute(1, 2, 0).reshape(n, -1, h, w)
        return out[0], value, attention


class ModifiedResNet(nn.Module):
    def __init__(self, layers, output_dim: int, heads: int, image_size: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stage = [Bottleneck(inplanes, planes, 2 if i else 1)]
            stage += [Bottleneck(planes * 4, planes, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * 4
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)

    def forward(self, x):
        for i in (1, 2, 3):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        x = self.avgpool(x)
        for i in (1, 2, 3, 4):
            x = getattr(self, f"layer{i}")(x)
        return self.attnpool(x)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, act: nn.Module):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", act)
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class CLIP(nn.Module):
    """Both towers, open_clip's `CLIP` names (``visual.*``, ``transformer.resblocks.*``, ...)."""

    def __init__(self, embed_dim: int, layers, width: int, image_size: int, vision_heads: int,
                 vocab_size: int, context_length: int, text_width: int, text_heads: int,
                 text_layers: int, quick_gelu: bool = True):
        super().__init__()
        self.visual = ModifiedResNet(layers, embed_dim, vision_heads, image_size, width)
        act = QuickGELU() if quick_gelu else nn.GELU()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(text_width, text_heads, act) for _ in range(text_layers)])
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, text_width) * 0.01)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))
        self.register_buffer("attn_mask", torch.full((context_length, context_length),
                                                     float("-inf")).triu(1), persistent=False)

    def encode_text(self, ids):
        """open_clip's pooling: the position of the largest id (EOS)."""
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]
        x = x.permute(1, 0, 2)
        mask = self.attn_mask[:ids.shape[1], :ids.shape[1]]
        for block in self.transformer.resblocks:
            x = block(x, mask)
        x = self.ln_final(x.permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights of every parameter and random BN statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)
            elif "bn" in name or "downsample.1" in name or "ln" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0)
                        + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()
