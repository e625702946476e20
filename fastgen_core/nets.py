"""Raw denoiser networks and a small classifier.

A network built by `build_network` is a plain function approximator

    F(x, t, s=None, class_labels=None, w=None, cond=None) -> tensor shaped like x

and knows nothing about noise schedules or preconditioning: `t` (and `s`) are already the
*noise labels* chosen by the caller (e.g. c_noise = ln(sigma) / 4), best kept O(1). The
conditioning signals are summed into one embedding vector that modulates every residual
block (adaptive scale/shift), in the spirit of NVlabs' edm2 `networks.py`, much smaller:

- `t`            : fixed Fourier features -> linear, always present.
- `s`            : a second time (flow maps, CTM), own Fourier features; `cfg.second_time`.
- `class_labels` : int64 (N,) in [0, num_classes] (num_classes = unconditional) or a float
                   one-hot (N, num_classes) (all zeros = unconditional); `num_classes > 0`.
- `w`            : a scalar such as the guidance strength, Fourier features; `cfg.scalar_cond`.
- `cond`         : extra input channels concatenated to x, (N, cond_channels, *shape[1:]);
                   zeros when omitted; `cfg.cond_channels > 0`.

Passing a conditioning input the network was not built for is an error, not ignored.
The output layer is zero-initialised, so a fresh network outputs exactly zero.

Architectures: `mlp` (any shape, flattened) and `unet` (images) in two layouts, `ddpm` (the papers'
CIFAR-10 layout) and `lean` (fast on CPU at 8x8-32x32), with optional self-attention at
`attn_resolutions` (docs/design.md "Image networks"; bench/nets.py measures them).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import NetworkConfig

__all__ = ["build_network", "MLPNet", "UNet", "Attention", "LAYOUTS", "Classifier", "ConditionEmbedding",
           "FourierFeatures",
           "count_params"]


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of `module`."""
    return sum(p.numel() for p in module.parameters())


def build_network(cfg: NetworkConfig, shape: tuple[int, ...], num_classes: int = 0) -> nn.Module:
    """The raw network described by `cfg` for samples of shape `shape` (without the batch axis).

    `arch="mlp"` accepts any shape (samples are flattened); `arch="unet"` needs (C, H, W) with
    H and W divisible by 2 ** (len(channel_mult) - 1), and `attn_resolutions` among its feature-map
    sides H, H/2, ..., H/2^(levels - 1).
    """
    shape = tuple(int(d) for d in shape)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if cfg.arch == "mlp":
        return MLPNet(cfg, shape, num_classes)
    if cfg.arch == "unet":
        return UNet(cfg, shape, num_classes)
    if cfg.arch == "classifier":  # num_classes = number of output classes here
        return Classifier(shape, num_classes, width=cfg.width)
    raise ValueError(f"unknown arch {cfg.arch!r}")


# ----------------------------------------------------------------------------- embedding

def _per_sample(v, n: int, device, name: str) -> torch.Tensor:
    """A float32 tensor of shape (n,) from a python number, a 0-d tensor or an (n,)-tensor."""
    v = torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1)
    if v.numel() == 1:
        return v.expand(n)
    if v.numel() != n:
        raise ValueError(f"{name} must have shape () or ({n},), got {v.numel()} values")
    return v


class FourierFeatures(nn.Module):
    """Fixed random Fourier features of a scalar, as edm2's MPFourier: sqrt(2) cos(2 pi (f t + phi)).

    Frequencies f ~ N(0, bandwidth^2) and phases are drawn once from `seed` and stored as buffers.
    """

    def __init__(self, dim: int, bandwidth: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * bandwidth * torch.randn(dim, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(dim, generator=g))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2) * torch.cos(t.float()[:, None] * self.freqs.float() + self.phases.float())


class ConditionEmbedding(nn.Module):
    """Sums the embeddings of t, s, class label and w, then a small MLP; always computed in fp32."""

    def __init__(self, emb_dim: int, num_classes: int = 0, second_time: bool = False, scalar_cond: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.fourier_t, self.map_t = FourierFeatures(emb_dim, seed=0), nn.Linear(emb_dim, emb_dim)
        if second_time:
            self.fourier_s, self.map_s = FourierFeatures(emb_dim, seed=1), nn.Linear(emb_dim, emb_dim)
        if scalar_cond:
            self.fourier_w, self.map_w = FourierFeatures(emb_dim, seed=2), nn.Linear(emb_dim, emb_dim)
        if num_classes > 0:  # no bias: an all-zero one-hot (unconditional) contributes nothing
            self.map_label = nn.Linear(num_classes, emb_dim, bias=False)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU())

    @property
    def second_time(self) -> bool:
        return hasattr(self, "map_s")

    @property
    def scalar_cond(self) -> bool:
        return hasattr(self, "map_w")

    def one_hot(self, labels: torch.Tensor, n: int) -> torch.Tensor:
        """(n, num_classes) float one-hot; integer label `num_classes` -> all zeros (unconditional)."""
        if labels.is_floating_point():
            onehot = labels.float()
        else:
            onehot = F.one_hot(labels.long().reshape(-1), self.num_classes + 1)[:, : self.num_classes].float()
        if onehot.shape != (n, self.num_classes):
            raise ValueError(f"class_labels must be (N,) ints or an (N, {self.num_classes}) one-hot, "
                             f"got shape {tuple(labels.shape)}")
        return onehot

    def forward(self, t, n: int, device, s=None, class_labels=None, w=None) -> torch.Tensor:
        if s is not None and not self.second_time:
            raise ValueError("s given but the network was built without second_time")
        if self.second_time and s is None:
            raise ValueError("this network needs a second time s (second_time=True)")
        if w is not None and not self.scalar_cond:
            raise ValueError("w given but the network was built without scalar_cond")
        if self.scalar_cond and w is None:
            raise ValueError("this network needs the scalar condition w (scalar_cond=True)")
        if class_labels is not None and self.num_classes == 0:
            raise ValueError("class_labels given but the network was built with num_classes=0")
        with torch.autocast(torch.device(device).type, enabled=False):
            emb = self.map_t(self.fourier_t(_per_sample(t, n, device, "t")))
            if self.second_time:
                emb = emb + self.map_s(self.fourier_s(_per_sample(s, n, device, "s")))
            if self.scalar_cond:
                emb = emb + self.map_w(self.fourier_w(_per_sample(w, n, device, "w")))
            if class_labels is not None:
                emb = emb + self.map_label(self.one_hot(class_labels.to(device), n))
            return self.mlp(emb)


class _Net(nn.Module):
    """Shared front end: input/condition checks and the embedding."""

    def __init__(self, cfg: NetworkConfig, shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.shape, self.num_classes, self.cond_channels = tuple(shape), num_classes, cfg.cond_channels
        self.cond_shape = (cfg.cond_channels, *self.shape[1:])
        self.embed = ConditionEmbedding(cfg.emb_dim, num_classes, cfg.second_time, cfg.scalar_cond)

    def _prepare(self, x, t, s, class_labels, w, cond):
        """Returns (x with cond concatenated along dim 1, embedding)."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        n = x.shape[0]
        emb = self.embed(t, n, x.device, s=s, class_labels=class_labels, w=w)
        if self.cond_channels == 0:
            if cond is not None:
                raise ValueError("cond given but the network was built with cond_channels=0")
            return x, emb
        if cond is None:
            cond = x.new_zeros((n, *self.cond_shape))
        if tuple(cond.shape) != (n, *self.cond_shape):
            raise ValueError(f"cond must have shape (N, {', '.join(map(str, self.cond_shape))}), got {tuple(cond.shape)}")
        return torch.cat([x, cond.to(x.dtype)], dim=1), emb


# ----------------------------------------------------------------------------- MLP

class MLPBlock(nn.Module):
    """Pre-norm residual block: LayerNorm -> emb scale/shift -> SiLU -> Linear -> SiLU -> Dropout -> Linear."""

    def __init__(self, width: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.emb = nn.Linear(emb_dim, 2 * width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb(emb).chunk(2, dim=1)
        h = F.silu(self.norm(x) * (1 + scale) + shift)
        h = self.fc2(self.dropout(F.silu(self.fc1(h))))
        return x + h


class MLPNet(_Net):
    """Residual MLP on flattened samples: Linear -> depth x MLPBlock -> LayerNorm, SiLU -> Linear (zero init)."""

    def __init__(self, cfg: NetworkConfig, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__(cfg, shape, num_classes)
        dim_in = math.prod(self.shape) + math.prod(self.cond_shape)
        self.inp = nn.Linear(dim_in, cfg.width)
        self.blocks = nn.ModuleList(MLPBlock(cfg.width, cfg.emb_dim, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, math.prod(self.shape))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, s=None, class_labels=None, w=None, cond=None, return_features=False):
        """`return_features=True`: the bottleneck features (N, width) before the output layer instead
        (e.g. DMD2's GAN head on the fake critic, docs/methods.md §5)."""
        n = x.shape[0]
        x, emb = self._prepare(x, t, s, class_labels, w, cond)
        h = self.inp(x.reshape(n, -1))
        for block in self.blocks:
            h = block(h, emb)
        h = F.silu(self.norm(h))
        return h if return_features else self.out(h).reshape(n, *self.shape)


# ----------------------------------------------------------------------------- U-Net

def _groups(ch: int) -> int:
    """GroupNorm group count: min(32, ch // 4), lowered until it divides ch."""
    g = max(1, min(32, ch // 4))
    while ch % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN, emb scale/shift -> SiLU -> Dropout -> conv3x3, plus a (1x1) skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(in_ch), in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(out_ch), out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class Attention(nn.Module):
    """Self-attention over the H x W positions, as DDPM++/EDM's attention block:
    GroupNorm -> 1x1 conv to q, k, v -> softmax(q k^T / sqrt(d)) v (heads of 64 channels, at least
    one) -> 1x1 conv (zero-initialised, so a fresh block is the identity), added to the input."""

    def __init__(self, ch: int):
        super().__init__()
        self.heads = max(1, ch // 64)
        self.norm, self.qkv = nn.GroupNorm(_groups(ch), ch), nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb=None) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)                      # (n, heads, hw, c / heads)
        return x + self.proj(a.transpose(-1, -2).reshape(n, c, h, w))


class Downsample(nn.Module):
    """Halves H and W: stride-2 3x3 convolution (ddpm layout) or 2x2 average pooling (lean)."""

    def __init__(self, ch: int, conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if conv else None

    def forward(self, x, emb=None):
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour x2 then a 3x3 convolution (ddpm layout), or the
    convolution first, at the low resolution, for a quarter of the cost (lean)."""

    def __init__(self, ch: int, conv_first: bool = False):
        super().__init__()
        self.conv, self.conv_first = nn.Conv2d(ch, ch, 3, padding=1), conv_first

    def forward(self, x, emb=None):
        if self.conv_first:
            return F.interpolate(self.conv(x), scale_factor=2.0, mode="nearest")
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# The two layouts of `UNet` (NetworkConfig.layout); docs/design.md "Networks" has the measurements.
# skips: "all" keeps the input conv's, every res block's and every downsample's output (DDPM),
# "blocks" only the res blocks' outputs; up_blocks: res blocks per level on the way up, beyond `depth`.
LAYOUTS = {
    "ddpm": dict(skips="all", up_extra=1, mid_blocks=2, down_conv=True, up_conv_first=False),
    "lean": dict(skips="blocks", up_extra=0, mid_blocks=1, down_conv=False, up_conv_first=True),
}


class UNet(_Net):
    """U-Net over `len(channel_mult)` resolution levels, `cfg.layout`:

    - "ddpm" (DDPM/DDPM++, what the papers' CIFAR-10 networks use): `depth` ResBlocks per level on
      the way down (the input conv's, each block's and each downsample's output kept as a skip),
      `depth + 1` on the way up (each consuming one skip), two ResBlocks in the middle, stride-2
      conv down, nearest-then-conv up;
    - "lean" (fast on CPU at 8x8-32x32): `depth` ResBlocks per level both ways (only their outputs
      are skips), one middle ResBlock, average-pool down, conv-then-nearest up.

    Self-attention (`Attention`) follows every ResBlock whose feature map has a side in
    `cfg.attn_resolutions`, the middle ones included when the lowest resolution is listed.
    `layout` (a LAYOUTS entry or a dict like one) overrides cfg.layout (bench/nets.py ablations).
    """

    def __init__(self, cfg: NetworkConfig, shape: tuple[int, ...], num_classes: int = 0, layout=None):
        if len(shape) != 3:
            raise ValueError(f"unet needs a (C, H, W) shape, got {shape}")
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(f"H and W must be divisible by {factor} for channel_mult={cfg.channel_mult}, got {shape}")
        sides = [shape[1] // 2**i for i in range(len(cfg.channel_mult))]
        missing = sorted(set(cfg.attn_resolutions) - set(sides))
        if missing:
            raise ValueError(f"attn_resolutions {missing} are not among this network's feature-map sides {sides}")
        super().__init__(cfg, shape, num_classes)
        L = layout if isinstance(layout, dict) else LAYOUTS[layout or cfg.layout]
        E, p, attn = cfg.emb_dim, cfg.dropout, set(cfg.attn_resolutions)
        ch = cfg.width

        def res(i, o, side):  # a ResBlock, followed by attention at the listed sides
            return [ResBlock(i, o, E, p)] + ([Attention(o)] if side in attn else [])

        self.inp = nn.Conv2d(shape[0] + cfg.cond_channels, ch, 3, padding=1)
        self.keep_input = L["skips"] == "all"
        skips, self.down, self.skip_after = [ch] if self.keep_input else [], nn.ModuleList(), set()
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.depth):
                self.down.extend(res(ch, cfg.width * mult, sides[level]))
                ch = cfg.width * mult
                skips.append(ch)
                self.skip_after.add(len(self.down) - 1)  # after the block's attention, if any
            if level < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch, L["down_conv"]))
                if self.keep_input:
                    skips.append(ch)
                    self.skip_after.add(len(self.down) - 1)
        self.mid = nn.ModuleList(m for _ in range(L["mid_blocks"]) for m in res(ch, ch, sides[-1]))
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.depth + L["up_extra"]):
                self.up.extend(res(ch + skips.pop(), cfg.width * mult, sides[level]))
                ch = cfg.width * mult
            if level > 0:
                self.up.append(Upsample(ch, L["up_conv_first"]))
        assert not skips
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.out = nn.Conv2d(ch, shape[0], 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, s=None, class_labels=None, w=None, cond=None, return_features=False):
        """`return_features=True`: the bottleneck features (N, C, H', W') after the middle blocks
        instead (e.g. DMD2's GAN head on the fake critic, docs/methods.md §5)."""
        x, emb = self._prepare(x, t, s, class_labels, w, cond)
        h = self.inp(x)
        skips = [h] if self.keep_input else []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            if i in self.skip_after:
                skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        if return_features:
            return h
        for block in self.up:
            if isinstance(block, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.out(F.silu(self.norm(h)))


# ----------------------------------------------------------------------------- classifier

class Classifier(nn.Module):
    """Small classifier for feature-space metrics (e.g. Fréchet distance on digits).

    Vectors (D,): a two-hidden-layer MLP. Images (C, H, W): two conv blocks (conv-GN-SiLU x2,
    the first followed by 2x2 average pooling) and global average pooling. `features(x)` gives
    the (N, 2 * width) penultimate activations; `forward(x)` the logits.
    """

    def __init__(self, shape: tuple[int, ...], num_classes: int, width: int = 64):
        super().__init__()
        self.shape, self.num_classes = tuple(shape), num_classes
        feat = 2 * width
        if len(self.shape) == 1:
            self.body = nn.Sequential(nn.Linear(self.shape[0], feat), nn.SiLU(), nn.Linear(feat, feat), nn.SiLU())
        elif len(self.shape) == 3:
            def block(i, o):
                return [nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(_groups(o), o), nn.SiLU()]
            self.body = nn.Sequential(
                *block(self.shape[0], width), *block(width, width), nn.AvgPool2d(2, ceil_mode=True),
                *block(width, feat), *block(feat, feat), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            raise ValueError(f"Classifier needs a (D,) or (C, H, W) shape, got {shape}")
        self.head = nn.Linear(feat, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
