"""Adversarial pieces shared by the methods' optional GAN terms: CTM's GAN term on real data
(docs/methods.md §10), Align Your Flow's short adversarial finetune (§3), CAF's GAN stage (§2), and
DMD2 (§5: `FeatureHead`, a classifier head on the fake critic's bottleneck features).

Discriminator D(x, σ, y) -> one logit per sample. Vectors: an MLP; images (C, H, W): a small conv
net (stride-2 convolutions, global average pool). The condition (the noise label ¼·ln σ of the
samples it sees, and the class label) is embedded by `nets.ConditionEmbedding` and added to the
first hidden layer; activations are leaky ReLUs (0.2). Without noised inputs the label is a constant.

Losses, with r = D(real), f = D(fake) (per-sample logits, averaged over the batch):
    softplus   (non-saturating logistic; Goodfellow et al. 2014, used by DMD2):
               L_D = softplus(−r) + softplus(f),           L_G = softplus(−f)
    hinge      (used by CTM's public code with its StyleGAN-XL discriminator):
               L_D = relu(1 − r) + relu(1 + f),            L_G = −f
    relativistic (RpGAN, R3GAN; attributed to AYF's adversarial finetune by a third-party
               reimplementation, (unconfirmed) against the paper):
               L_D = softplus(−(r − f)),                   L_G = softplus(−(f − r))
The generator's loss never updates D (D's parameters are frozen while it is evaluated, `frozen`)
and the discriminator's loss never updates the generator (fakes are detached).

Adaptive weight (VQGAN, Esser et al. 2021; CTM's public code `calculate_adaptive_weight`):
    λ_adv = clip( ‖∇_W L_rec‖ / (‖∇_W L_G‖ + 10⁻⁴), λ_lo, λ_hi ),  detached,
with W the generator's last layer (the output layer's weight) and L_rec the method's main loss
(CTM: the consistency loss, without DSM). CTM's code clamps to [0, 10⁴] and then clips to
[0.01, 10] (our defaults). CTM switches the generator's GAN term on after `start` iterations
(`discriminator_start_itr`; in practice its GAN runs resume from a CTM+DSM checkpoint) and steps
the generator every 2nd iteration (`g_learning_period = 2`), the discriminator in between.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from .config import Strict
from .methods.base import Group
from .nets import ConditionEmbedding
from .noise import col

__all__ = ["GANConfig", "Discriminator", "FeatureHead", "d_loss", "g_loss", "adaptive_weight", "last_layer",
           "frozen", "accuracy", "Adversary", "add_discriminator", "gan_groups", "gan_term"]


class GANConfig(Strict):
    """Settings of an adversarial term (shared by the methods that have one)."""

    loss: Literal["softplus", "hinge", "relativistic"] = Field("hinge", description="adversarial loss (see fastgen_core/gan.py)")
    weight: float = Field(1.0, ge=0, description="λ of the generator's adversarial term (times the adaptive weight when on)")
    adaptive: bool = Field(True, description="VQGAN/CTM adaptive weight ‖∇_W L_rec‖/(‖∇_W L_G‖ + 1e-4) on the last layer W")
    adaptive_clip: tuple[float, float] = Field((0.01, 10.0), description="clip of the adaptive weight (CTM's code)")
    start: int = Field(0, ge=0, description="iteration at which the generator's adversarial term switches on")
    g_every: int = Field(1, ge=1, description="generator steps every g_every iterations (CTM's code: 2); D steps every iteration")
    lr_scale: float = Field(1.0, gt=0, description="discriminator learning rate = lr_scale × the stage's lr")
    noised: bool = Field(False, description="D sees real and fake noised to a common σ ~ the EDM training law, and σ")
    width: int = Field(128, gt=0, description="discriminator width (MLP hidden width / conv base channels)")
    depth: int = Field(3, gt=0, description="discriminator hidden layers (MLP) / stride-2 convolutions (images)")

    @field_validator("adaptive_clip")
    @classmethod
    def _clip_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"adaptive_clip {list(v)} must be [low, high] with 0 ≤ low ≤ high")
        return v


# ----------------------------------------------------------------------------- discriminator

def _act(h: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU (slope 0.2), the usual GAN-discriminator activation (no dead or saturated units)."""
    return F.leaky_relu(h, 0.2)


class Discriminator(nn.Module):
    """D(x, σ=None, class_labels=None) -> (N,) logits; an MLP for vectors, a small conv net for images."""

    def __init__(self, shape: tuple[int, ...], num_classes: int = 0, width: int = 128, depth: int = 3):
        super().__init__()
        self.shape, self.image = tuple(shape), len(shape) == 3
        self.embed = ConditionEmbedding(width, num_classes)
        if self.image:
            c = shape[0]
            self.inp = nn.Conv2d(c, width, 3, padding=1)
            self.body = nn.ModuleList(nn.Conv2d(width * min(2**i, 4), width * min(2**(i + 1), 4), 3, stride=2, padding=1)
                                      for i in range(depth))
            self.out = nn.Linear(width * min(2**depth, 4), 1)
        else:
            self.inp = nn.Linear(math.prod(shape), width)
            self.body = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
            self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None = None, class_labels=None) -> torch.Tensor:
        n = x.shape[0]
        label = torch.zeros(n, device=x.device) if sigma is None else torch.as_tensor(sigma, device=x.device).log() / 4
        emb = self.embed(label, n, x.device, class_labels=class_labels)
        if self.image:
            h = self.inp(x) + emb[:, :, None, None]
            for conv in self.body:
                h = conv(_act(h))
            h = _act(h).mean(dim=(2, 3))
        else:
            h = self.inp(x.flatten(1)) + emb
            for fc in self.body:
                h = fc(_act(h))
            h = _act(h)
        return self.out(h).squeeze(1)


class FeatureHead(nn.Module):
    """A classifier head on a network's bottleneck features -> (N,) logits (DMD2's head on the fake
    critic, docs/methods.md §5; its code: conv 4×4/2 – GroupNorm – SiLU – conv down to 1×1 – GroupNorm
    – SiLU – 1×1 conv to one logit). Images (C, H, W): conv 4×4 stride 2 (3×3 stride 1 below 4×4) –
    GroupNorm – SiLU – global average pool – 1×1 conv – GroupNorm – SiLU – 1×1 conv; vectors (C,): the
    same with linear layers."""

    def __init__(self, feature_shape: tuple[int, ...], width: int = 64):
        super().__init__()
        c, groups = feature_shape[0], max(1, min(32, width // 4))
        while width % groups:
            groups -= 1
        if len(feature_shape) == 3:
            down = nn.Conv2d(c, width, 4, 2, 1) if min(feature_shape[1:]) >= 4 else nn.Conv2d(c, width, 3, 1, 1)
            self.body = nn.Sequential(down, nn.GroupNorm(groups, width), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Conv2d(width, width, 1), nn.GroupNorm(groups, width), nn.SiLU(),
                                      nn.Conv2d(width, 1, 1), nn.Flatten())
        else:
            self.body = nn.Sequential(nn.Linear(c, width), nn.GroupNorm(groups, width), nn.SiLU(),
                                      nn.Linear(width, width), nn.GroupNorm(groups, width), nn.SiLU(),
                                      nn.Linear(width, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features.float()).reshape(-1)


# ----------------------------------------------------------------------------- losses

def d_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Discriminator loss from the logits of real and fake samples (module docstring)."""
    if kind == "softplus":
        return (F.softplus(-real) + F.softplus(fake)).mean()
    if kind == "hinge":
        return (F.relu(1 - real) + F.relu(1 + fake)).mean()
    if kind == "relativistic":
        return F.softplus(-(real - fake)).mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def g_loss(fake: torch.Tensor, kind: str, real: torch.Tensor | None = None) -> torch.Tensor:
    """Generator loss from the logits of fake samples (relativistic: also of real ones)."""
    if kind == "softplus":
        return F.softplus(-fake).mean()
    if kind == "hinge":
        return (-fake).mean()
    if kind == "relativistic":
        return F.softplus(-(fake - real)).mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def accuracy(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Share of samples the discriminator classifies right (logit > 0: real)."""
    return float(torch.cat([real > 0, fake <= 0]).float().mean())


def last_layer(net: nn.Module) -> nn.Parameter:
    """W of the adaptive weight: the weight of the network's output layer (`out`)."""
    return net.out.weight


def adaptive_weight(l_rec: torch.Tensor, l_gan: torch.Tensor, W: nn.Parameter,
                    clip: tuple[float, float] = (0.01, 10.0)) -> torch.Tensor:
    """λ_adv = clip(‖∇_W L_rec‖ / (‖∇_W L_G‖ + 10⁻⁴)), detached; both graphs are kept for backward."""
    g_rec = torch.autograd.grad(l_rec, W, retain_graph=True)[0]
    g_gan = torch.autograd.grad(l_gan, W, retain_graph=True)[0]
    lam = g_rec.norm() / (g_gan.norm() + 1e-4)
    return lam.clamp(0.0, 1e4).clamp(*clip).detach()


@contextmanager
def frozen(module: nn.Module):
    """Evaluate `module` without recording gradients for its parameters (the inputs still get them)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


# ----------------------------------------------------------------------------- a method's adversary

class Adversary:
    """The discriminator network of a method plus its two losses; `noise` (an EDM) is used when
    `cfg.noised`: real and fake are noised to the same σ ~ the EDM training law and D sees σ."""

    def __init__(self, cfg: GANConfig, D: Discriminator, noise):
        self.cfg, self.D, self.noise = cfg, D, noise

    def _noised(self, *xs: torch.Tensor):
        if not self.cfg.noised:
            return xs, None
        sigma = self.noise.sample_sigma(xs[0].shape[0], device=xs[0].device)
        return tuple(x + col(sigma, x) * torch.randn_like(x) for x in xs), sigma

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor, class_labels=None) -> tuple[torch.Tensor, dict]:
        """L_D on real data and detached fakes (no gradient reaches the generator)."""
        (real, fake), sigma = self._noised(real, fake.detach())
        r, f = self.D(real, sigma, class_labels), self.D(fake, sigma, class_labels)
        return d_loss(r, f, self.cfg.loss), {"d_acc": accuracy(r, f), "d_real": float(r.detach().mean()), "d_fake": float(f.detach().mean())}

    def generator_loss(self, fake: torch.Tensor, real: torch.Tensor | None = None, class_labels=None) -> torch.Tensor:
        """L_G on fakes that carry the generator's graph; D's parameters get no gradient."""
        with frozen(self.D):
            if self.cfg.loss == "relativistic":
                (fake, real), sigma = self._noised(fake, real)
                return g_loss(self.D(fake, sigma, class_labels), "relativistic", self.D(real, sigma, class_labels))
            (fake,), sigma = self._noised(fake)
            return g_loss(self.D(fake, sigma, class_labels), self.cfg.loss)


# ----------------------------------------------------------------------------- wiring into a method

def add_discriminator(method, cfg: GANConfig) -> Adversary:
    """Own the discriminator network "disc" (not exported; saved in checkpoints) and return the
    adversary of the method's GAN term."""
    data = method.ctx.data
    D = Discriminator(data.shape, data.num_classes, cfg.width, cfg.depth).to(method.ctx.device)
    method.nets["disc"] = D
    return Adversary(cfg, D, method.ctx.noise)


def gan_groups(method, cfg: GANConfig | None) -> list[Group]:
    """The student "net" (every `g_every` iterations) and, with a GAN term, the discriminator "disc"
    (every iteration, lr × `lr_scale`)."""
    if cfg is None:
        return [Group("net", list(method.nets["net"].parameters()))]
    return [Group("net", list(method.nets["net"].parameters()), every=cfg.g_every),
            Group("disc", list(method.nets["disc"].parameters()), lr_scale=cfg.lr_scale)]


def gan_term(adv: Adversary, cfg: GANConfig, l_rec, fake, real, y, net) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_G(fake), λ_GAN): λ_GAN = weight, times the adaptive weight against L_rec when on."""
    l_gan = adv.generator_loss(fake, real, y)
    if not cfg.adaptive:
        return l_gan, torch.tensor(cfg.weight)
    return l_gan, cfg.weight * adaptive_weight(l_rec, l_gan, last_layer(net), cfg.adaptive_clip)
