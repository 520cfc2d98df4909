import pytest
import torch

from lib.config import VAELossConfig, VAEModelConfig
from lib.errors import ConfigError
from lib.losses import (ADAPTIVE_WEIGHT_MAX, adaptive_weight, discriminator_loss, generator_loss,
                        load_perceptual)
from lib.models import PatchDiscriminator, VAEWithLogvar, frozen

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
    assert adaptive_weight(nll, g, w, 0.5).item() == pytest.approx(expect.item(), rel=1e-6)
    tiny = (w * 1e-12).sum()
    assert adaptive_weight(nll, tiny, w, 0.5).item() == pytest.approx(0.5 * ADAPTIVE_WEIGHT_MAX)


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
