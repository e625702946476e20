"""Tests for fastgen_core.nets: shapes, conditioning paths, fp32 embedding, classifier."""
import pytest
import torch
from torch import nn

from fastgen_core.config import NetworkConfig
from fastgen_core.nets import Classifier, ConditionEmbedding, build_network, count_params

MLP = dict(arch="mlp", width=32, depth=2, emb_dim=16)
UNET = dict(arch="unet", width=8, depth=1, channel_mult=[1, 2], emb_dim=16)

CASES = [  # (config kwargs, sample shape)
    (MLP, (2,)),
    (UNET, (1, 8, 8)),
    ({**UNET, "channel_mult": [1, 2, 2]}, (3, 16, 16)),
]
IDS = ["mlp-2", "unet-1x8x8", "unet-3x16x16"]


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
    with pytest.raises(ValueError):
        net(x, t, class_labels=torch.zeros(4, 5))


@pytest.mark.parametrize("kw,shape", CASES, ids=IDS)
def test_scalar_cond(kw, shape):
    net = make(kw, shape, scalar_cond=True)
    x, t = batch(shape)
    y = net(x, t, w=torch.full((4,), 1.0))
    assert not torch.allclose(y, net(x, t, w=torch.full((4,), 2.0)))
    assert torch.allclose(y, net(x, t, w=torch.tensor(1.0)))
    with pytest.raises(ValueError):
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
    with pytest.raises(ValueError):
        net(x, t, cond=torch.zeros(4, 3, *shape[1:]))


def test_unexpected_conditioning_is_rejected():
    net = make(MLP, (2,))
    x, t = batch((2,))
    for kwargs in (dict(s=t), dict(w=t), dict(class_labels=torch.zeros(4, dtype=torch.long)),
                   dict(cond=torch.zeros(4, 1))):
        with pytest.raises(ValueError):
            net(x, t, **kwargs)
    with pytest.raises(ValueError):
        net(torch.randn(4, 3), t)  # wrong sample shape
    with pytest.raises(ValueError):
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
    with pytest.raises(ValueError):
        build_network(NetworkConfig(**{**UNET, "channel_mult": [1, 2, 2, 2]}), (1, 12, 12))
    with pytest.raises(ValueError):
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
