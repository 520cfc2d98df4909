"""Stage 2's latent cache (lib/models/latents.py): the encoder's numbers, the same training, stale
caches refused, built once."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train_unified_prior
from lib.config import load_config
from lib.data.dataset import build_datasets
from lib.models.latents import LatentCacheError, LatentSource, _chunks, open_latent_cache
from lib.train.weights import load_vae
from tests.helpers import TRAINERS, checkpoint_tensors, max_abs_diff, read_records, run_main, trainer_config


@pytest.fixture
def prior_trainer(tiny_data):
    return replace(TRAINERS["prior"], data_root=tiny_data)


def setup(tmp_path, prior_trainer, **sections):
    cfg = load_config(trainer_config(tmp_path, prior_trainer, **sections))
    vae = load_vae(Path(cfg.prior.vae_checkpoint), cfg).vae
    data = build_datasets(cfg.data, cfg.seed, ("train", "val"), lambda m: None)
    return cfg, vae, data


def with_cache(cfg, setting, output_dir):
    return replace(cfg, output_dir=str(output_dir), prior=replace(cfg.prior, latent_cache=setting))


def test_cached_means_are_the_encoders(tmp_path, prior_trainer):
    cfg, vae, data = setup(tmp_path, prior_trainer)
    lines = []
    cache = open_latent_cache(with_cache(cfg, "auto", tmp_path / "out"), vae, data, "cpu", log=lines.append)
    assert len(lines) == 1 and "encoded" in lines[0] and str(tmp_path / "out" / "latent-cache") in lines[0]
    for part, ds in data.items():
        assert cache.counts[part] == len(ds)
        for chunk in _chunks(len(ds), 4):                   # batches as training draws them: any composition
            batch = ds.__getitems__(chunk[::-1])
            dist = vae.encode(batch["image"]).latent_dist
            mean, std = cache.rows(part, batch["index"], "cpu")
            assert torch.equal(mean, dist.mean)             # exact
            assert torch.equal(std, dist.std)
            assert torch.equal(LatentSource(vae, cache)(batch, part, "cpu"), LatentSource(vae, None)(batch, part, "cpu"))
    # posterior samples: mean + std * eps, the noise drawn as diffusers' latent_dist.sample draws it
    batch = data["train"].__getitems__([0, 1])
    drawn = LatentSource(vae, None, sample=True)(batch, "train", "cpu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, vae.encode(batch["image"]).latent_dist.sample(torch.Generator().manual_seed(3)))
    cached = LatentSource(vae, cache, sample=True)(batch, "train", "cpu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(cached, drawn) and not torch.equal(cached, LatentSource(vae, cache)(batch, "train", "cpu"))
    # opened again: not rebuilt
    again = open_latent_cache(with_cache(cfg, "auto", tmp_path / "out"), vae, data, "cpu", log=lines.append)
    assert again.path == cache.path and "encoded" not in lines[1]


class OnAnotherDevice(torch.Tensor):
    """A tensor as a batch moved to a GPU holds its ``index``: NumPy cannot read it in place
    (what a CUDA tensor raises), ``.cpu()`` gives a plain CPU tensor."""

    def __array__(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def test_rows_take_an_index_from_another_device(tmp_path, prior_trainer):
    """Validation moves the whole batch to the device, ``index`` included (the first GPU run of
    stage 2 died there at its first validation)."""
    cfg, vae, data = setup(tmp_path, prior_trainer)
    cache = open_latent_cache(with_cache(cfg, "auto", tmp_path / "out"), vae, data, "cpu")
    index = torch.tensor([3, 0, 2])
    on_device = index.as_subclass(OnAnotherDevice)
    with pytest.raises(TypeError):
        import numpy as np
        np.asarray(on_device)                            # the stand-in behaves like a CUDA tensor
    for part in ("train", "val"):
        mean, std = cache.rows(part, on_device, "cpu")
        expected = cache.rows(part, index.numpy(), "cpu")
        assert type(mean) is torch.Tensor and torch.equal(mean, expected[0]) and torch.equal(std, expected[1])


def test_stale_cache_is_refused(tmp_path, prior_trainer):
    cfg, vae, data = setup(tmp_path, prior_trainer)
    mine = with_cache(cfg, str(tmp_path / "mine"), tmp_path)
    open_latent_cache(mine, vae, data, "cpu")
    other = load_vae(Path(cfg.prior.vae_checkpoint), cfg).vae
    with torch.no_grad():
        other.decoder.conv_out.bias += 1e-3                 # another VAE (its encoder is the same: still stale)
    with pytest.raises(LatentCacheError, match=r"mine: built for another VAE; delete the folder to rebuild it, or "
                                               r"set prior.latent_cache: auto"):
        open_latent_cache(mine, other, data, "cpu")
    thr = replace(mine, data=replace(cfg.data, threshold=0.2))
    with pytest.raises(LatentCacheError, match=r"built for another data.threshold;"):
        open_latent_cache(thr, vae, build_datasets(thr.data, 0, ("train", "val"), lambda m: None), "cpu")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(LatentCacheError, match="not a latent cache"):
        open_latent_cache(with_cache(cfg, str(tmp_path / "junk"), tmp_path), vae, data, "cpu")


def run(monkeypatch, cfg, *extra):
    return run_main(train_unified_prior, ["--config", cfg, *extra], monkeypatch)


def test_resumed_run_with_the_cache_equals_a_run_without_it(tmp_path, prior_trainer, monkeypatch):
    two_sims = {"data": {"simulation": ["DPM", "IRT2"]}}
    plain = trainer_config(tmp_path, prior_trainer, "a.yaml", output_dir=str(tmp_path / "a"), **two_sims,
                           **{"prior": {**prior_trainer.setup(prior_trainer.data_root)["prior"], "latent_cache": "off"}})
    assert run(monkeypatch, plain) == 0
    cached = trainer_config(tmp_path, prior_trainer, "b.yaml", output_dir=str(tmp_path / "b"), **two_sims)
    assert load_config(cached).prior.latent_cache == "auto"
    assert run(monkeypatch, cached, "--until-step", "3") == 0
    assert run(monkeypatch, cached, "--resume", "latest") == 0
    a, b = tmp_path / "a" / "prior", tmp_path / "b" / "prior"
    assert not (tmp_path / "a" / "latent-cache").exists() and len(list((tmp_path / "b" / "latent-cache").iterdir())) == 1
    log = (b / "train.log").read_text()
    assert log.count("prior.latent_cache: encoded") == 1 and log.count("prior.latent_cache: ") == 2   # built once
    final = lambda d: checkpoint_tensors(d / "checkpoints" / "step-0000006")
    assert max_abs_diff(final(a), final(b)) == 0.0
    for split in ("train", "val"):
        keep = lambda r: {k: v for k, v in r.items() if k not in ("time", "seconds", "steps_per_sec")}
        assert [keep(r) for r in read_records(a, split)] == [keep(r) for r in read_records(b, split)]


def test_a_full_disk_while_encoding_is_one_line_and_leaves_nothing(tmp_path, prior_trainer, monkeypatch):
    import errno

    import lib.outputs as outputs
    cfg, vae, data = setup(tmp_path, prior_trainer)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(outputs.os, "posix_fallocate", full)
    with pytest.raises(LatentCacheError, match=r"^prior.latent_cache: cannot write .*\(No space left on device, "
                                               r"[0-9.]+ (KiB|MiB) needed\); set prior.latent_cache to a writable"):
        open_latent_cache(with_cache(cfg, "auto", tmp_path / "out"), vae, data, "cpu")
    assert [p.name for p in (tmp_path / "out" / "latent-cache").iterdir()] == []
