"""The shared adversarial pieces (fastgen_core/gan.py) and the GAN terms of CTM (docs/methods.md §10)
and of Align Your Flow's adversarial finetune (§3): losses, the adaptive weight, gradient
isolation between generator and discriminator, and short runs where the discriminator learns."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgen_core import gan, loop
from fastgen_core.config import DataConfig
from fastgen_core.data import load_data
from fastgen_core.methods import ayf, ctm
from fastgen_core.methods.base import Context
from fastgen_core.models import LoadedModel
from fastgen_core.noise import EDM
from fastgen_core.config import TrainConfig

from test_methods_consistency import FakeTeacher, _randomise_output


@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig(kind="toy", name="8gaussians", n_train=1000, n_test=100))


def _grads(module: nn.Module) -> list:
    return [p.grad for p in module.parameters()]


# ----------------------------------------------------------------------------- pieces

def test_losses_match_their_formulas():
    r, f = torch.tensor([2.0, -0.5, 0.3]), torch.tensor([-1.5, 0.7, 0.1])
    sp = lambda v: torch.log1p(torch.exp(v))  # noqa: E731
    assert torch.allclose(gan.d_loss(r, f, "softplus"), (sp(-r) + sp(f)).mean())
    assert torch.allclose(gan.g_loss(f, "softplus"), sp(-f).mean())
    assert torch.allclose(gan.d_loss(r, f, "hinge"), (torch.clamp(1 - r, min=0) + torch.clamp(1 + f, min=0)).mean())
    assert torch.allclose(gan.g_loss(f, "hinge"), -f.mean())
    assert torch.allclose(gan.d_loss(r, f, "relativistic"), sp(f - r).mean())
    assert torch.allclose(gan.g_loss(f, "relativistic", r), sp(r - f).mean())
    assert gan.accuracy(r, f) == pytest.approx(3 / 6)  # real right: 2.0, 0.3; fake right: -1.5
    with pytest.raises(ValueError):
        gan.d_loss(r, f, "wasserstein")


def test_adaptive_weight_matches_its_formula():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x, a = torch.randn(5, 3), torch.randn(5, 2)
    out = lin(x)
    l_rec = ((out - a) ** 2).sum()
    l_gan = (out[:, 0] * 0.01).sum()
    # hand-computed gradients w.r.t. the weight W (out = x W^T + b)
    g_rec = (2 * (out - a)).detach().T @ x
    d_out = torch.zeros(5, 2)
    d_out[:, 0] = 0.01
    g_gan = d_out.T @ x
    want = g_rec.norm() / (g_gan.norm() + 1e-4)
    got = gan.adaptive_weight(l_rec, l_gan, lin.weight, clip=(0.0, 1e6))
    assert torch.allclose(got, want, rtol=1e-5) and not got.requires_grad
    assert float(gan.adaptive_weight(l_rec, l_gan, lin.weight)) == 10.0      # clipped to [0.01, 10]
    assert float(gan.adaptive_weight(l_gan, l_rec, lin.weight)) == pytest.approx(max(0.01, float(1 / want)), rel=1e-4)
    (l_rec + got * l_gan).backward()  # the graphs were kept for the real backward
    assert lin.weight.grad is not None


@pytest.mark.parametrize("shape,num_classes", [((2,), 0), ((1, 8, 8), 10)])
def test_discriminator_shapes_and_conditions(shape, num_classes):
    torch.manual_seed(0)
    D = gan.Discriminator(shape, num_classes, width=16, depth=2)
    x = torch.randn(6, *shape)
    y = torch.randint(num_classes, (6,)) if num_classes else None
    out = D(x, None, y)
    assert out.shape == (6,) and torch.isfinite(out).all()
    assert not torch.allclose(D(x, torch.full((6,), 5.0), y), out)  # the noise level is a condition
    if num_classes:
        # the class label is a condition: another label changes every sample's logit
        other = (y + 1 + torch.arange(6) % (num_classes - 1)) % num_classes
        assert ((D(x, None, other) - out).abs() > 1e-6).all()
        # labels go through nets.ConditionEmbedding, whose documented inputs are (N,) ints or an
        # (N, num_classes) one-hot, and whose null label `num_classes` (an all-zero one-hot, no bias)
        # contributes nothing: the same logits as no label at all
        assert torch.allclose(D(x, None, F.one_hot(y, num_classes).float()), out, atol=1e-6)
        null = torch.full((6,), num_classes)
        assert torch.allclose(D(x, None, null), D(x, None, None), atol=1e-6)
        assert torch.allclose(D(x, None, torch.zeros(6, num_classes)), D(x, None, None), atol=1e-6)
        assert not torch.allclose(D(x, None, None), out)
    else:
        with pytest.raises(ValueError, match="num_classes=0"):  # an unconditional D refuses labels
            D(x, None, torch.zeros(6, dtype=torch.long))
    with gan.frozen(D):
        assert all(not p.requires_grad for p in D.parameters())
    assert all(p.requires_grad for p in D.parameters())


# ----------------------------------------------------------------------------- CTM

def _ctm(data, gan_time="max", **adv):
    cfg = ctm.Config(N=8, max_teacher_steps=3, mu=0.9, gan=True, gan_time=gan_time,
                     adversarial=gan.GANConfig(width=32, depth=2, **adv))
    return ctm.Method(cfg, Context(data, EDM(), None, {"teacher": FakeTeacher(data, analytic=False)}))


@pytest.mark.parametrize("loss", ["hinge", "softplus", "relativistic"])
def test_ctm_gan_generator_and_discriminator_gradients_are_isolated(data, loss):
    m = _ctm(data, "ctm" if loss == "relativistic" else "max", loss=loss, noised=loss == "softplus")
    assert [g.name for g in m.groups()] == ["net", "disc"] and m.export == ("net",)
    batch = {"x": data.x[:64]}
    torch.manual_seed(1)
    l_net, logs = m.loss("net", batch, 0)
    l_net.backward()
    assert "gan" in logs and 0.01 <= logs["gan_weight"] <= 10
    assert all(g is None for g in _grads(m.nets["disc"]))              # L_G does not reach D
    assert all(p.requires_grad for p in m.nets["disc"].parameters())   # and D is trainable again
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(m.nets["net"]))
    # the GAN term changes the student's gradient (it is not a no-op)
    g_with = torch.cat([p.grad.flatten() for p in m.nets["net"].parameters() if p.grad is not None])
    m.nets.zero_grad(set_to_none=True)
    m.cfg = m.cfg.model_copy(update={"adversarial": m.cfg.adversarial.model_copy(update={"start": 10**9})})
    torch.manual_seed(1)
    m.loss("net", batch, 0)[0].backward()
    g_without = torch.cat([p.grad.flatten() for p in m.nets["net"].parameters() if p.grad is not None])
    assert not torch.allclose(g_with, g_without)
    m.nets.zero_grad(set_to_none=True)
    real_logits, bias0 = m.nets["disc"](batch["x"]).detach(), m.nets["disc"].out.bias.detach().clone()
    # D's logits centred on a quantile of the real batch's, so that their signs differ (not all one
    # class); the first quantile at which as many real as fake logits are positive is skipped: there
    # the right and the swapped accuracies tie (right − swapped = 2·(#r>0 − #f>0)) and d_acc could not
    # tell them apart (which quantile ties depends on the machine's float rounding)
    for q in (0.5, 0.3, 0.7):
        with torch.no_grad():
            m.nets["disc"].out.bias.copy_(bias0 - real_logits.quantile(q))
        m.nets.zero_grad(set_to_none=True)
        calls = []  # (inputs, logits) of every discriminator call
        hook = m.nets["disc"].register_forward_hook(lambda mod, args, out: calls.append((args, out.detach())))
        try:
            torch.manual_seed(2)
            l_d, logs = m.loss("disc", batch, 0)
        finally:
            hook.remove()
        assert len(calls) == 2
        if (calls[0][1] > 0).sum() != (calls[1][1] > 0).sum():
            break
    l_d.backward()
    # the logged statistics and the loss are those of D's logits on this batch: r (real), f (fake)
    (real_in, sigma_r, _), r = calls[0]
    (_, sigma_f, _), f = calls[1]
    if loss == "softplus":   # noised: both noised to one common σ ~ the EDM law, and D sees it
        assert sigma_r is not None and torch.equal(sigma_r, sigma_f) and not torch.equal(real_in, batch["x"])
    else:
        assert sigma_r is None and sigma_f is None and torch.equal(real_in, batch["x"])
    right, swapped = ((r > 0).sum() + (f <= 0).sum()).item(), ((f > 0).sum() + (r <= 0).sum()).item()
    assert right != swapped and logs["d_acc"] == pytest.approx(right / 128)  # share classified right
    assert logs["d_real"] == pytest.approx(float(r.mean()), abs=1e-6)
    assert logs["d_fake"] == pytest.approx(float(f.mean()), abs=1e-6)
    want = {"hinge": torch.clamp(1 - r, min=0) + torch.clamp(1 + f, min=0),
            "softplus": torch.log1p(torch.exp(-r)) + torch.log1p(torch.exp(f)),
            "relativistic": torch.log1p(torch.exp(f - r))}[loss].mean()
    assert float(l_d.detach()) == pytest.approx(float(want), rel=1e-5)
    assert all(g is None for g in _grads(m.nets["net"])) and all(g is None for g in _grads(m.nets["target"]))
    assert all(g is not None for g in _grads(m.nets["disc"]))


def test_ctm_gan_keeps_the_boundary_and_the_config_round_trips(data):
    m = _ctm(data)
    _randomise_output(m.nets["net"])
    x, t = torch.randn(64, 2), torch.rand(64) * 10 + 0.01
    assert torch.equal(m.G(x, t, t), x)                                # G(x, t, t) = x with the GAN term too
    again = ctm.Config.model_validate(m.cfg.model_dump(mode="json"))   # as saved in model.json
    assert again == m.cfg and again.adversarial.width == 32


def test_ctm_gan_short_run_discriminator_learns(data, tmp_path):
    """D trains from the first iteration, the generator's GAN term from `start` (100). D's accuracy on
    real data vs the student's 1-step samples (chance: 0.5) is read at iteration 100, before the
    generator starts chasing it (afterwards the accuracy of one snapshot of the game swings)."""
    torch.manual_seed(0)
    m = _ctm(data, start=100, lr_scale=2.0)
    seen, acc = [], {}
    x0 = data.x[:512]

    def accuracy(step, logs):
        seen.append(logs)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(4)
            acc[step] = gan.accuracy(m.nets["disc"](x0), m.nets["disc"](m.one_step(x0)))

    states = loop.train(m, TrainConfig(steps=120, batch_size=64, lr=1e-3, log_every=20), tmp_path, progress=False,
                        callback=accuracy)
    assert all(torch.isfinite(torch.tensor(list(lg.values()))).all() for lg in seen)
    assert "net/gan" in seen[-1] and "net/gan" not in seen[-2]           # switched on at `start`
    assert list(states) == ["net"]                                       # the discriminator is not exported
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert any(k.startswith("disc.") for k in ckpt["nets"]) and "disc" in ckpt["opts"]
    assert acc[100] > 0.75, acc
    with torch.no_grad():
        torch.manual_seed(4)
        fake = m.one_step(x0)
        torch.manual_seed(4)
        T = m.sigmas[0]
        assert torch.equal(fake, m.G(x0 + T * torch.randn_like(x0), T, EDM().sigma_min))  # G_θ(x_T, σ_max, σ_min)


# ----------------------------------------------------------------------------- AYF finetune

def _ayf_student(data):
    m0 = ayf.Method(ayf.Config(), Context(data, EDM(), None, {"teacher": FakeTeacher(data, analytic=True)}))
    _randomise_output(m0.nets["net"])
    meta = {"method": "ayf", "method_config": m0.cfg.model_dump(mode="json"),
            "networks": {"net": m0.net_cfgs["net"].model_dump(mode="json")}}
    return LoadedModel(meta, m0.nets, EDM())


def test_ayf_adversarial_finetune_starts_from_the_student_and_isolates_gradients(data, monkeypatch):
    student = _ayf_student(data)
    cfg = ayf.Config(gan=True, gan_steps=3, warmup_steps=0, adversarial=gan.GANConfig(width=32, depth=2, lr_scale=4))
    m = ayf.Method(cfg, Context(data, EDM(), None, {"teacher": FakeTeacher(data, analytic=True), "student": student}))
    for k, v in student.nets["net"].state_dict().items():
        assert torch.equal(m.nets["net"].state_dict()[k], v), k
    assert [g.name for g in m.groups()] == ["net", "disc"]
    batch = {"x": data.x[:64]}
    loss, logs = m.loss("net", batch, 0)
    loss.backward()
    assert {"ayf", "gan", "gan_weight"} <= set(logs)
    assert all(g is None for g in _grads(m.nets["disc"]))
    assert any(g is not None for g in _grads(m.nets["net"]))
    m.nets.zero_grad(set_to_none=True)
    m.loss("disc", batch, 0)[0].backward()
    assert all(g is None for g in _grads(m.nets["net"]))
    assert all(g is not None for g in _grads(m.nets["disc"]))
    # fakes are flow-map samples from noise: k = 1 is one jump f(x, t_max, 0) of the scaled noise.
    # The noise z the fake drew is recorded (whatever the order of its random draws); the jump is
    # transcribed from docs/methods.md §0/§3: x = (1 − t_max)·σ_max·z at t_max = σ_max/(1 + σ_max),
    # f = x + (0 − t_max)·F, F = (x − D)/t_max, D the EDM-preconditioned net at σ = t/(1 − t) = σ_max
    # on x/(1 − t_max), with the s-label ¼·ln max(σ(0), σ_min) = ¼·ln σ_min.
    drawn, randn_like = [], torch.randn_like

    def recording_randn_like(like, **kw):
        drawn.append(randn_like(like, **kw))
        return drawn[-1]

    monkeypatch.setattr(torch, "randn_like", recording_randn_like)
    m.cfg = m.cfg.model_copy(update={"gan_steps": 1})
    with torch.no_grad():
        fake = m.fake(batch["x"])
    monkeypatch.undo()
    assert len(drawn) == 1 and drawn[0].shape == batch["x"].shape
    sig, sd, n = EDM().sigma_max, EDM().sigma_data, len(batch["x"])
    t_max = sig / (1 + sig)
    x = (1 - t_max) * sig * drawn[0]
    y = x / (1 - t_max)
    c_skip, c_out, c_in = sd**2 / (sig**2 + sd**2), sig * sd / (sig**2 + sd**2) ** 0.5, 1 / (sig**2 + sd**2) ** 0.5
    with torch.no_grad():
        net_out = m.nets["net"](c_in * y, torch.full((n,), math.log(sig) / 4),
                                s=torch.full((n,), math.log(EDM().sigma_min) / 4))
    F_hand = (x - (c_skip * y + c_out * net_out)) / t_max
    assert torch.allclose(fake, x + (0 - t_max) * F_hand, rtol=1e-4, atol=1e-5)
    # a short finetune: the discriminator learns to tell real data from the student's fakes, i.e.
    # its mean logit on real data rises against that on 1-step fakes. D runs at 4× the learning rate
    # (lr_scale); measured over 8 discriminator initialisations and training seeds, the gap goes from
    # −0.02…0.02 to 0.10…0.48 in 20 steps (here −0.003 → 0.17; it stays at ~0 when D never steps)
    x_real, z_eval = data.x[:500], torch.randn(500, 2, generator=torch.Generator().manual_seed(7))

    def logit_gap():
        with torch.no_grad():
            fakes = ayf.sample(LoadedModel({"method": "ayf"}, m.nets, EDM()), z_eval, 1)
            return float(m.nets["disc"](x_real).mean() - m.nets["disc"](fakes).mean())

    before = logit_gap()
    loop.train(m, TrainConfig(steps=20, batch_size=64, lr=1e-3), None, progress=False)
    after = logit_gap()
    assert after > before + 0.05, (before, after)


def test_ayf_student_input_must_be_a_flow_map(data):
    teacher = FakeTeacher(data, analytic=False)
    with pytest.raises(ValueError, match="flow map"):
        ayf.Method(ayf.Config(gan=True), Context(data, EDM(), None, {"teacher": teacher, "student": teacher}))


def test_softplus_is_the_non_saturating_logistic_loss():
    """softplus(−D) = −log σ(D): the D loss is the binary cross-entropy with real = 1, fake = 0."""
    r, f = torch.randn(50), torch.randn(50)
    bce = F.binary_cross_entropy_with_logits
    want = bce(r, torch.ones(50)) + bce(f, torch.zeros(50))
    assert torch.allclose(gan.d_loss(r, f, "softplus"), want, atol=1e-6)


def test_ctm_gan_term_sharpens_one_step_samples():
    """docs/methods.md §5/§10 faithful check, small: CTM from scratch with the exact mixture denoiser as
    teacher, 400 iterations with and without the GAN term (equal budget, same seed). The GAN term
    puts more 1-step samples on the support (measured: 0.892 -> 0.728 off support) and lowers
    their NLL. The recipe-scale comparison is `ctm` vs `ctm_gan` in params/toy_ctm.yaml."""
    from fastgen_core import metrics
    from fastgen_core.config import NetworkConfig

    net = NetworkConfig(arch="mlp", width=64, depth=2, emb_dim=32)
    test = load_data(DataConfig(kind="toy", name="8gaussians", n_train=2000, n_test=1000))
    out = {}
    for on in (False, True):
        teacher = FakeTeacher(test, analytic=True, net_cfg=net)
        torch.manual_seed(0)
        cfg = ctm.Config(N=8, max_teacher_steps=3, mu=0.9, gan=on, init_from_teacher=False,
                         adversarial=gan.GANConfig(weight=0.05, lr_scale=4, start=100, width=64, depth=2))
        m = ctm.Method(cfg, Context(test, EDM(), None, {"teacher": teacher}))
        loop.train(m, TrainConfig(steps=400, batch_size=128, lr=1e-3), None, seed=0, progress=False)
        with torch.no_grad():
            torch.manual_seed(0)
            out[on] = metrics.toy_metrics(m.one_step(test.x_test), test.density, test.x_test)
    assert out[True]["off_support"] < out[False]["off_support"] - 0.05, out
    assert out[True]["nll"] < out[False]["nll"], out
