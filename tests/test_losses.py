import pytest
import torch

from lib.config import VAELossConfig, VAEModelConfig
from lib.errors import ConfigError
from lib.models.losses import (ADAPTIVE_WEIGHT_MAX, adaptive_weight, discriminator_loss, generator_loss, grad_norm_at,
                               load_perceptual)
from lib.models.vae import PatchDiscriminator, VAEWithLogvar, frozen

MODEL = VAEModelConfig(block_out_channels=[8, 16], layers_per_block=1, latent_channels=2,
                       norm_num_groups=8, mid_block_attention=False)


def setup(seed=0):
    torch.manual_seed(seed)
    gen, disc = VAEWithLogvar(MODEL, 32), PatchDiscriminator(1, 8, 2)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    return gen, disc, x


def grads(module):
    return [p.grad.clone() if p.grad is not None else None for p in module.parameters()]


def test_adversarial_gradient_only_after_disc_start():
    cfg = VAELossConfig(disc_weight=0.5)
    gen, disc, x = setup()
    rec, kl = gen(x, sample_posterior=False)
    with frozen(disc):
        off = generator_loss(x, rec, kl, gen.logvar, cfg, False, disc, gen.last_layer)
    g_off = torch.autograd.grad(off.total, rec, retain_graph=True)[0]
    with frozen(disc):
        on = generator_loss(x, rec, kl, gen.logvar, cfg, True, disc, gen.last_layer)
    g_on = torch.autograd.grad(on.total, rec, retain_graph=True)[0]
    assert off.logs["g_loss"] is None and off.logs["disc_factor"].item() == 0
    assert on.logs["g_loss"] is not None and on.logs["disc_factor"].item() == 1
    assert not torch.allclose(g_on, g_off)                 # the GAN term reaches the generator
    on.total.backward()
    assert all(p.grad is None for p in disc.parameters())  # ... and not the discriminator
    assert all(p.requires_grad for p in disc.parameters())  # frozen() restores the flags
    assert gen.logvar.grad is not None and gen.logvar.grad.abs() > 0


def test_adaptive_weight_formula_and_clamp():
    w = torch.nn.Parameter(torch.randn(4, 4))
    nll, g = (w * 3).sum(), (w * 0.5).sum()
    expect = 0.5 * (torch.full((4, 4), 3.0).norm() / (torch.full((4, 4), 0.5).norm() + 1e-4))
    assert adaptive_weight(grad_norm_at(nll, w), grad_norm_at(g, w), 0.5).item() == pytest.approx(expect.item(), rel=1e-6)
    tiny = (w * 1e-12).sum()
    assert adaptive_weight(grad_norm_at(nll, w), grad_norm_at(tiny, w), 0.5).item() == pytest.approx(0.5 * ADAPTIVE_WEIGHT_MAX)
    out = w * 2.0                                          # a vector-Jacobian product: ||2 * v||
    v = torch.full((4, 4), 0.25)
    assert grad_norm_at(out, w, v).item() == pytest.approx((2.0 * v).norm().item(), rel=1e-6)


def test_gan_term_is_the_reference_formula_with_one_discriminator_pass():
    """The toolkit's generator loss takes the discriminator's gradient once, on a detached copy
    of the reconstruction; its value, adaptive weight and gradients are those of the LDM
    formula ``nll + kl_weight * kl + d_weight * g_loss`` backpropagated through the discriminator."""
    cfg = VAELossConfig(disc_weight=0.5, kl_weight=1e-3)
    gen, disc, x = setup(3)
    rec, kl = gen(x, sample_posterior=False)
    calls = []
    disc.register_forward_hook(lambda *a: calls.append(1))
    with frozen(disc):
        out = generator_loss(x, rec, kl, gen.logvar, cfg, True, disc, gen.last_layer)
    assert len(calls) == 1
    params = [p for p in gen.parameters()]
    got = torch.autograd.grad(out.total, params)

    rec, kl = gen(x, sample_posterior=False)               # the formula, by hand
    diff = x - rec
    nll = ((diff.abs() + diff.pow(2)) / torch.exp(gen.logvar) + gen.logvar).sum() / x.shape[0]
    base = nll + cfg.kl_weight * kl.sum() / x.shape[0]
    with frozen(disc):
        g_loss = -disc(rec).mean()
        nll_grad = torch.autograd.grad(nll, gen.last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, gen.last_layer, retain_graph=True)[0]
        d_weight = 0.5 * torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0, ADAPTIVE_WEIGHT_MAX).detach()
        total = base + d_weight * g_loss
        want = torch.autograd.grad(total, params)
    assert out.logs["d_weight"].item() == pytest.approx(d_weight.item(), rel=1e-5)
    assert out.logs["g_loss"].item() == pytest.approx(g_loss.item(), rel=1e-6)
    assert out.total.item() == pytest.approx(total.item(), rel=1e-6)
    got, want = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want])
    assert (got - want).norm() <= 1e-5 * want.norm()       # float32 rounding apart


def test_nll_uses_learned_logvar():
    cfg = VAELossConfig(kl_weight=0.0)
    gen, disc, x = setup()
    rec, kl = gen(x, sample_posterior=False)
    base = generator_loss(x, rec, kl, torch.tensor(0.0), cfg, False).total.item()
    shifted = generator_loss(x, rec, kl, torch.tensor(1.0), cfg, False)
    n = x[0].numel()
    rec_sum = shifted.logs["rec_loss"].item() * x.numel() / x.shape[0]
    assert shifted.total.item() == pytest.approx(rec_sum / torch.e + n, rel=1e-5)
    assert base == pytest.approx(rec_sum, rel=1e-5)


def test_hinge_discriminator_loss_uses_detached_reconstruction():
    gen, disc, x = setup()
    rec, _ = gen(x, sample_posterior=False)
    loss, logs = discriminator_loss(disc, x, rec)
    logits = disc(torch.cat([x, rec.detach()]))
    real, fake = logits.chunk(2)
    expect = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    assert all(p.grad is not None for p in disc.parameters())


class WeightedL2(torch.nn.Module):
    """A stand-in perceptual network with weights: a fixed 1x1 conv, then a squared distance."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 1, 1, bias=False)

    def forward(self, a, b):
        return (self.proj(a) - self.proj(b)).pow(2).mean(dim=(1, 2, 3))


def test_perceptual_term(tmp_path):
    from safetensors.torch import save_file
    net = WeightedL2()
    with torch.no_grad():
        net.proj.weight.fill_(1.0)
    weights = tmp_path / "p.safetensors"
    save_file(net.state_dict(), str(weights))
    factory = "tests.test_losses:WeightedL2"
    with pytest.raises(ConfigError, match="perceptual_weights = .*file not found"):
        load_perceptual(VAELossConfig(perceptual_weight=1.0, perceptual_network=factory,
                                      perceptual_weights=str(tmp_path / "x.safetensors")))
    with pytest.raises(ConfigError, match="perceptual_network = 'nope:Net': cannot import"):
        load_perceptual(VAELossConfig(perceptual_weight=1.0, perceptual_network="nope:Net",
                                      perceptual_weights=str(weights)))
    cfg = VAELossConfig(perceptual_weight=2.0, perceptual_network=factory, perceptual_weights=str(weights),
                        kl_weight=0.0)
    loaded = load_perceptual(cfg)
    assert torch.equal(loaded.proj.weight, net.proj.weight)
    gen, _, x = setup()
    rec, kl = gen(x, sample_posterior=False)
    with_p = generator_loss(x, rec, kl, gen.logvar, cfg, False, perceptual=loaded).logs["rec_loss"].item()
    without = generator_loss(x, rec, kl, gen.logvar, VAELossConfig(kl_weight=0.0), False).logs["rec_loss"].item()
    per_sample = (3 * (x - rec)).pow(2).mean(dim=(1, 2, 3))      # 1-channel maps repeated to 3
    assert with_p == pytest.approx(without + 2.0 * per_sample.mean().item(), rel=1e-5)
    save_file({"other": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ConfigError, match="does not fit tests.test_losses:WeightedL2"):
        load_perceptual(VAELossConfig(perceptual_weight=1.0, perceptual_network=factory,
                                      perceptual_weights=str(tmp_path / "wrong.safetensors")))


def test_perceptual_without_weights_is_a_config_error():
    from lib.config import load_config
    with pytest.raises(ConfigError, match="vae.loss.perceptual_network = None is invalid"):
        load_config(None, ["vae.loss.perceptual_weight=0.1"])
    with pytest.raises(ConfigError, match="vae.loss.perceptual_weights = None is invalid; expected a path"):
        load_config(None, ["vae.loss.perceptual_weight=0.1", "vae.loss.perceptual_network=a:b"])
