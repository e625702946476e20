"""Tests for fastgen_core.nets: shapes, conditioning paths, fp32 embedding, classifier; the U-Net's
layouts (ddpm, lean), self-attention and per-sample independence."""
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from fastgen_core.config import NetworkConfig
from fastgen_core.nets import Attention, Classifier, ConditionEmbedding, ResBlock, build_network, count_params

MLP = dict(arch="mlp", width=32, depth=2, emb_dim=16)
UNET = dict(arch="unet", width=8, depth=1, channel_mult=[1, 2], emb_dim=16)

LEAN = {**UNET, "layout": "lean"}

CASES = [  # (config kwargs, sample shape)
    (MLP, (2,)),
    (UNET, (1, 8, 8)),
    ({**UNET, "channel_mult": [1, 2, 2]}, (3, 16, 16)),
    (LEAN, (1, 8, 8)),
    ({**LEAN, "channel_mult": [1, 2, 2], "attn_resolutions": [8, 4]}, (3, 16, 16)),
]
IDS = ["mlp-2", "unet-1x8x8", "unet-3x16x16", "lean-1x8x8", "lean-attn-3x16x16"]


def make(kw, shape, num_classes=0, **extra):
    torch.manual_seed(0)
    net = build_network(NetworkConfig(**{**kw, **extra}), shape, num_classes)
    with torch.no_grad():  # the output layer starts at zero: perturb it so conditioning is visible
        net.out.weight.normal_(0, 0.1)
    return net.eval()


def batch(shape, n=4):
    torch.manual_seed(1)
    return torch.randn(n, *shape), torch.linspace(-1, 1, n)


@pytest.mark.parametrize("kw,shape", CASES, ids=IDS)
def test_shape_and_zero_init(kw, shape):
    net = build_network(NetworkConfig(**kw), shape)
    x, t = batch(shape)
    y = net(x, t)
    assert y.shape == x.shape
    assert torch.all(y == 0)  # zero-initialised output layer
    assert count_params(net) > 0


@pytest.mark.parametrize("kw,shape", CASES, ids=IDS)
def test_time_changes_output_and_scalar_t_broadcasts(kw, shape):
    net = make(kw, shape)
    x, t = batch(shape)
    y = net(x, t)
    assert y.abs().max() > 0
    assert not torch.allclose(y, net(x, t + 0.3))
    for t0 in (torch.tensor(0.25), 0.25):
        assert torch.allclose(net(x, t0), net(x, torch.full((4,), 0.25)))


@pytest.mark.parametrize("kw,shape", CASES, ids=IDS)
def test_class_labels(kw, shape):
    net = make(kw, shape, num_classes=3)
    x, t = batch(shape)
    labels = torch.tensor([0, 1, 2, 0])
    y = net(x, t, class_labels=labels)
    assert not torch.allclose(y, net(x, t, class_labels=(labels + 1) % 3))
    onehot = nn.functional.one_hot(labels, 3).float()
    assert torch.allclose(y, net(x, t, class_labels=onehot))
    # unconditional: integer label num_classes == all-zeros one-hot == no labels
    y_int = net(x, t, class_labels=torch.full((4,), 3))
    assert torch.equal(y_int, net(x, t, class_labels=torch.zeros(4, 3)))
    assert torch.equal(y_int, net(x, t))
    assert not torch.allclose(y_int, y)
    with pytest.raises(ValueError, match=r"class_labels must be .* got shape \(4, 5\)"):
        net(x, t, class_labels=torch.zeros(4, 5))


@pytest.mark.parametrize("kw,shape", CASES, ids=IDS)
def test_scalar_cond(kw, shape):
    net = make(kw, shape, scalar_cond=True)
    x, t = batch(shape)
    y = net(x, t, w=torch.full((4,), 1.0))
    assert not torch.allclose(y, net(x, t, w=torch.full((4,), 2.0)))
    assert torch.allclose(y, net(x, t, w=torch.tensor(1.0)))
    with pytest.raises(ValueError, match="needs the scalar condition w"):
        net(x, t)


@pytest.mark.parametrize("kw,shape", CASES, ids=IDS)
def test_second_time(kw, shape):
    net = make(kw, shape, second_time=True)
    x, t = batch(shape)
    y = net(x, t, s=t - 0.5)
    assert not torch.allclose(y, net(x, t, s=t - 0.2))
    with pytest.raises(ValueError, match="second time"):
        net(x, t)


@pytest.mark.parametrize("kw,shape", CASES, ids=IDS)
def test_cond_channels(kw, shape):
    net = make(kw, shape, cond_channels=2)
    x, t = batch(shape)
    cond_shape = (4, 2, *shape[1:])
    zeros = torch.zeros(cond_shape)
    y = net(x, t, cond=zeros)
    assert torch.equal(y, net(x, t))  # omitted cond == zeros
    assert not torch.allclose(y, net(x, t, cond=torch.randn(cond_shape)))
    with pytest.raises(ValueError, match=r"cond must have shape \(N, 2"):
        net(x, t, cond=torch.zeros(4, 3, *shape[1:]))


def test_unexpected_conditioning_is_rejected():
    net = make(MLP, (2,))
    x, t = batch((2,))
    for kwargs in (dict(s=t), dict(w=t), dict(class_labels=torch.zeros(4, dtype=torch.long)),
                   dict(cond=torch.zeros(4, 1))):
        (name,) = kwargs
        with pytest.raises(ValueError, match=f"^{name} given but the network was built with"):
            net(x, t, **kwargs)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2\), got \(4, 3\)"):
        net(torch.randn(4, 3), t)  # wrong sample shape
    with pytest.raises(ValueError, match="t must have shape"):
        net(x, torch.zeros(3))  # t of the wrong length


def test_gradients_reach_every_embedding_parameter():
    net = make(UNET, (1, 8, 8), num_classes=3, second_time=True, scalar_cond=True, cond_channels=1)
    x, t = batch((1, 8, 8))
    y = net(x, t, s=t / 2, class_labels=torch.tensor([0, 1, 2, 3]), w=torch.ones(4), cond=torch.randn(4, 1, 8, 8))
    y.square().sum().backward()
    for name, p in net.embed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mlp_on_images_and_unet_shape_checks():
    net = make(MLP, (1, 8, 8), cond_channels=1)
    x, t = batch((1, 8, 8))
    y = net(x, t, cond=torch.randn(4, 1, 8, 8))
    assert y.shape == x.shape and y.abs().max() > 0
    with pytest.raises(ValueError, match="divisible by 8"):
        build_network(NetworkConfig(**{**UNET, "channel_mult": [1, 2, 2, 2]}), (1, 12, 12))
    with pytest.raises(ValueError, match=r"unet needs a \(C, H, W\) shape"):
        build_network(NetworkConfig(**UNET), (64,))


def test_embedding_is_fp32_under_autocast():
    net = make(UNET, (1, 8, 8), num_classes=3, scalar_cond=True)
    x, t = batch((1, 8, 8))
    ref = net(x, t, w=t, class_labels=torch.tensor([0, 1, 2, 3]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net.embed(t, 4, x.device, w=t, class_labels=torch.tensor([0, 1, 2, 3]))
        y = net(x, t, w=t, class_labels=torch.tensor([0, 1, 2, 3]))
    assert emb.dtype == torch.float32
    assert y.shape == x.shape
    assert torch.allclose(y.float(), ref, atol=0.05 * ref.abs().max().item())


def test_dropout_active_in_train_mode_only():
    net = make(MLP, (2,), dropout=0.5)
    x, t = batch((2,))
    assert torch.equal(net(x, t), net(x, t))
    net.train()
    torch.manual_seed(0)
    a = net(x, t)
    assert not torch.allclose(a, net(x, t))


def test_fourier_embedding_is_deterministic():
    a, b = ConditionEmbedding(16), ConditionEmbedding(16)
    assert torch.equal(a.fourier_t.freqs, b.fourier_t.freqs)
    assert not torch.equal(ConditionEmbedding(16, second_time=True).fourier_s.freqs, a.fourier_t.freqs)


def test_count_params():
    assert count_params(nn.Linear(3, 4)) == 16
    assert count_params(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1, bias=False))) == 20


@pytest.mark.parametrize("shape", [(64,), (1, 8, 8)])
def test_classifier_shapes_and_overfit(shape):
    torch.manual_seed(0)
    clf = Classifier(shape, num_classes=10, width=32)
    x, y = torch.randn(64, *shape), torch.arange(64) % 10
    assert clf.features(x).shape == (64, 64)
    assert clf(x).shape == (64, 10)
    params = list(clf.parameters())
    for _ in range(150):  # plain gradient descent: torch.optim's first use costs seconds of imports
        loss = nn.functional.cross_entropy(clf(x), y)
        with torch.no_grad():
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p -= 0.3 * g
    assert (clf(x).argmax(1) == y).all()
    assert loss.item() < 0.1


# ----------------------------------------------------------------------------- U-Net layouts, attention

def perturbed(net):
    """Every zero-initialised projection (attention outputs) set to random values, so each block acts."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, Attention):
                m.proj.weight.normal_(0, 0.3)
    return net


@pytest.mark.parametrize("layout", ["ddpm", "lean"])
def test_features_are_the_bottleneck_and_see_the_conditioning(layout):
    kw = {**UNET, "layout": layout, "channel_mult": [1, 2, 3]}
    net = make(kw, (3, 16, 16), num_classes=3, second_time=True, scalar_cond=True, cond_channels=1)
    x, t = batch((3, 16, 16))
    cond = dict(s=t / 2, class_labels=torch.tensor([0, 1, 2, 0]), w=torch.ones(4), cond=torch.randn(4, 1, 16, 16))
    h = net(x, t, return_features=True, **cond)
    assert h.shape == (4, 8 * 3, 4, 4)  # width * channel_mult[-1] channels at the lowest resolution
    for change in (dict(s=t), dict(class_labels=torch.tensor([1, 2, 0, 1])), dict(w=torch.zeros(4)),
                   dict(cond=torch.zeros(4, 1, 16, 16))):
        assert not torch.allclose(h, net(x, t, return_features=True, **{**cond, **change})), change


def test_lean_layout_costs_about_half_the_flops():
    """The point of the lean layout (docs/design.md): far fewer convolution multiply-adds (the time on
    CPU) for the same width, counted from the shapes the convolutions see."""
    def macs(layout):
        net = build_network(NetworkConfig(**{**UNET, "width": 32, "layout": layout}), (3, 16, 16), 10)
        total = []
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(lambda mod, inp, out: total.append(
                    out.numel() * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]))
        net(torch.randn(2, 3, 16, 16), torch.zeros(2), class_labels=torch.tensor([0, 1]))
        return sum(total)
    assert macs("lean") < 0.6 * macs("ddpm")


@pytest.mark.parametrize("layout", ["ddpm", "lean"])
def test_attention_sits_at_the_requested_resolutions(layout):
    cfg = NetworkConfig(**{**UNET, "layout": layout, "depth": 2, "channel_mult": [1, 2, 2]}, attn_resolutions=[16, 4])
    net = perturbed(build_network(cfg, (3, 16, 16)))
    seen, blocks = [], []
    for m in net.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-1]))
        if isinstance(m, ResBlock):
            m.register_forward_hook(lambda mod, inp, out: blocks.append(out.shape[-1]))
    x, t = batch((3, 16, 16))
    net(x, t)
    assert sorted(set(seen)) == [4, 16]
    assert seen.count(16) == blocks.count(16) and seen.count(4) == blocks.count(4)  # one after every res block there
    assert blocks.count(8) > 0  # ... and none at 8
    plain = NetworkConfig(**{**UNET, "layout": layout, "depth": 2, "channel_mult": [1, 2, 2]})
    no_attn = build_network(plain, (3, 16, 16))
    assert not any(isinstance(m, Attention) for m in no_attn.modules())


def test_attention_matches_a_direct_transcription():
    """softmax(q k^T / sqrt(d)) v per head over the H*W positions, written out with einsum."""
    torch.manual_seed(0)
    att = Attention(128)  # two heads of 64 channels
    nn.init.normal_(att.proj.weight, 0, 0.1)
    x = torch.randn(2, 128, 4, 4)
    q, k, v = att.qkv(att.norm(x)).flatten(2).chunk(3, dim=1)          # (n, c, hw) each
    heads = lambda a: a.reshape(2, 2, 64, 16)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    weights = torch.softmax(torch.einsum("nhci,nhcj->nhij", q, k) / math.sqrt(64), dim=-1)
    a = torch.einsum("nhij,nhcj->nhci", weights, v).reshape(2, 128, 4, 4)
    assert torch.allclose(att(x), x + att.proj(a), atol=1e-5)
    assert torch.equal(Attention(32)(x[:, :32]), x[:, :32])  # zero-initialised projection: identity


@pytest.mark.parametrize("layout", ["ddpm", "lean"])
def test_samples_do_not_see_each_other(layout):
    """GroupNorm and attention act within a sample: output i and its gradient ignore sample j."""
    net = perturbed(make({**UNET, "layout": layout, "channel_mult": [1, 2]}, (3, 8, 8), num_classes=3,
                         attn_resolutions=[8, 4]))
    x, t = batch((3, 8, 8))
    labels = torch.tensor([0, 1, 2, 0])
    y = net(x, t, class_labels=labels)
    x2, t2 = x.clone(), t.clone()
    x2[1:] = torch.randn(3, 3, 8, 8)
    t2[1:] = -t2[1:]
    y2 = net(x2, t2, class_labels=torch.tensor([0, 2, 0, 1]))
    assert torch.allclose(y[0], y2[0], atol=1e-5) and not torch.allclose(y[1:], y2[1:])
    jac = torch.autograd.functional.jacobian(lambda a: net(a, t, class_labels=labels)[0].sum(), x)
    assert jac[0].abs().sum() > 0 and torch.all(jac[1:] == 0)


def test_bad_attention_resolutions():
    # recipe-level checks (no data needed): FieldError on attn_resolutions
    def blamed(**kw):
        with pytest.raises(ValidationError) as e:
            NetworkConfig(**kw)
        return e.value.errors()[0]["ctx"]["error"].field
    for bad in ([16, 16], [16, 4], [12, 8], [0]):
        assert blamed(**{**UNET, "channel_mult": [1, 2]}, attn_resolutions=bad) == "attn_resolutions"
    assert blamed(**MLP, attn_resolutions=[8]) == "attn_resolutions"
    NetworkConfig(**{**UNET, "channel_mult": [1, 2, 2]}, attn_resolutions=[16, 4])  # a span of 3 levels: fine
    # a side the network does not have at this image size
    with pytest.raises(ValueError, match=r"attn_resolutions \[16\]"):
        build_network(NetworkConfig(**UNET, attn_resolutions=[16]), (1, 8, 8))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16), (3, 32, 32)])
def test_shrunk_paper_network_builds(shape):
    """tests/test_recipes.py shrinks networks (width <= 16, emb_dim <= 32, depth 1, two levels) and
    drops attention sides that vanish: what is left must build, run its attention at side/2, and
    train (20 Adam steps fit a fixed batch: the loss falls to under half)."""
    side = shape[-1]
    torch.manual_seed(0)
    net = build_network(NetworkConfig(arch="unet", width=16, emb_dim=32, depth=1, channel_mult=[2, 2],
                                      attn_resolutions=[side // 2], dropout=0.0), shape, 10)
    seen = []
    for mod in net.modules():
        if isinstance(mod, Attention):
            mod.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
    x, t = batch(shape, n=4)
    target, y = torch.randn_like(x), torch.arange(4)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (net(x, t, class_labels=y) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert seen and set(seen) == {side // 2}, seen
    assert losses[-1] < 0.5 * losses[0], losses
