"""Zero-shot editing (docs/methods.md §1) keeps the known part to float precision; autoguidance and
classifier-free guidance combine denoisers as written (docs/methods.md §12)."""
from __future__ import annotations

import pytest
import torch

from fastgen_core import editing as E
from fastgen_core.config import NetworkConfig
from fastgen_core.methods import cd
from fastgen_core.nets import build_network
from fastgen_core.noise import EDM
from fastgen_core.samplers import autoguided, cfg_guided, edm_sample

torch.set_default_dtype(torch.float32)
NOISE = EDM()

TAUS = NOISE.karras_sigmas(5)[:-1].tolist()


def _f(x, sigma, **cond):
    """A nonlinear stand-in for a consistency model f(x, σ) (any such callable may be edited with)."""
    s = sigma.reshape(-1, *[1] * (x.ndim - 1))
    return torch.tanh(x / (1 + s)) + 0.1 * torch.sin(3 * x.roll(1, dims=-1))


def _images(c=3, n=4, hw=8, seed=0):
    return torch.rand(n, c, hw, hw, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_orthogonal_bases():
    for first in (torch.tensor(E.LUMINANCE), torch.ones(16)):
        Q = E.orthogonal_basis(first)
        assert torch.allclose(Q.T @ Q, torch.eye(len(first), dtype=Q.dtype), atol=1e-12)
        assert torch.allclose(Q[:, 0], first.double() / first.double().norm(), atol=1e-12)


def test_inpainting_keeps_known_pixels_exactly():
    y, z = _images(), torch.randn(4, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1
    out = E.inpaint(_f, y, mask, TAUS, NOISE.sigma_min, z)
    keep = mask.expand_as(y).bool()
    assert torch.equal(out[keep], y[keep])
    assert not torch.allclose(out[~keep], y[~keep], atol=1e-2)


def test_colorization_keeps_luminance():
    y, z = _images(), torch.randn(4, 3, 8, 8)
    out = E.colorize(_f, y, TAUS, NOISE.sigma_min, z)
    assert torch.allclose(E.luminance(out), E.luminance(y), atol=1e-5)
    assert not torch.allclose(out, y, atol=1e-2)                      # the colours were regenerated
    # from a grey image: gray_to_rgb gives an RGB image with exactly that luminance
    L = E.luminance(y)
    assert torch.allclose(E.luminance(E.gray_to_rgb(L)), L, atol=1e-6)
    out2 = E.colorize(_f, E.gray_to_rgb(L), TAUS, NOISE.sigma_min, z)
    assert torch.allclose(E.luminance(out2), L, atol=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_super_resolution_keeps_patch_means(k):
    low = _images(c=1, hw=8 // k, seed=1)
    y, z = E.upsample_nearest(low, k), torch.randn(4, 1, 8, 8)
    out = E.super_resolve(_f, y, k, TAUS, NOISE.sigma_min, z)
    assert torch.allclose(E.patch_means(out, k), low, atol=1e-5)
    assert not torch.allclose(out, y, atol=1e-2)


def test_editing_with_a_consistency_network():
    """A real (random) consistency function on images: same guarantee."""
    net = build_network(NetworkConfig(arch="unet", width=8, depth=1, channel_mult=[1, 2], emb_dim=8), (3, 8, 8))
    torch.nn.init.normal_(net.out.weight, std=0.1)
    f = cd.ConsistencyFn(net, NOISE)
    y, z = _images(n=2), torch.randn(2, 3, 8, 8)
    out = E.colorize(f, y, TAUS, NOISE.sigma_min, z)
    assert torch.allclose(E.luminance(out), E.luminance(y), atol=1e-5)


def test_autoguidance_formula():
    D_main = lambda x, s, **k: 0.9 * x + 0.1  # noqa: E731
    D_weak = lambda x, s, **k: 0.5 * x - 0.2  # noqa: E731
    x, s = torch.randn(16, 2), torch.rand(16)
    assert torch.allclose(autoguided(D_main, D_weak, 1.0)(x, s), D_main(x, s), atol=1e-6)
    assert torch.allclose(autoguided(D_main, D_weak, 0.0)(x, s), D_weak(x, s), atol=1e-6)
    w = 2.5
    assert torch.allclose(autoguided(D_main, D_weak, w)(x, s), D_weak(x, s) + w * (D_main(x, s) - D_weak(x, s)), atol=1e-6)
    # usable by the samplers: a Gaussian N(0, c²) whose exact denoiser is D(x, σ) = c²/(c² + σ²)·x;
    # guiding it with a wider guide sharpens the samples
    exact = lambda c: (lambda x, sig, **k: (c**2 / (c**2 + sig.reshape(-1, 1) ** 2)) * x)  # noqa: E731
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    plain = edm_sample(exact(0.5), z, NOISE, 18)
    guided = edm_sample(autoguided(exact(0.5), exact(0.8), 2.0), z, NOISE, 18)
    assert plain.std().item() == pytest.approx(0.5, rel=0.1)          # 18 Heun steps: ~6% off
    assert guided.std().item() < 0.85 * plain.std().item()


def test_cfg_formula_and_null_label():
    seen = []

    def D(x, s, class_labels=None):
        seen.append(class_labels.clone())
        return x * (1 + class_labels.float()[:, None])

    x, s, y = torch.randn(6, 2), torch.rand(6), torch.tensor([0, 1, 2, 0, 1, 2])
    out = cfg_guided(D, 3.0, num_classes=4)(x, s, class_labels=y)
    cond, uncond = x * (1 + y.float()[:, None]), x * 5.0                # null label = 4
    assert torch.allclose(out, uncond + 3.0 * (cond - uncond), atol=1e-5)
    assert any(bool((lab == 4).all()) for lab in seen)
    assert torch.allclose(cfg_guided(D, 1.0, 4)(x, s, class_labels=y), cond, atol=1e-5)
    assert torch.equal(cfg_guided(lambda x, s: 2 * x, 3.0, 4)(x, s), 2 * x)  # unconditional: unguided
