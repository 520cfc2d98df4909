"""The stage-1 VAE's latent space as stage 2 uses it: encode, decode, and the scale factor.

Latents are the posterior mean (``latent_dist.mode()``): deterministic, so the scale factor,
the training targets and the VAE round trip draw nothing from the random number generators;
only ``prior.posterior_sample`` (a draw from the posterior per training sample) does.
The diffusion works on latents multiplied by the scale factor (unit variance on the
training data, the LDM convention); :func:`lib.models.objectives.generate_maps` divides it out
before decoding.

Stage 2's latents: from the frozen VAE's encoder on every batch, or from a cache that encoded
the training and validation samples once (``prior.latent_cache: auto | off | PATH``).

The encoder is frozen, so encoding the same maps again every epoch is wasted work (its share of a
stage-2 step: BENCHMARKS.md). The cache holds, per sample, the
posterior's mean (what training uses) and its std (to draw posterior samples,
``prior.posterior_sample``), float32 as the encoder gives them, as memory-mapped ``.npy`` files:
rows are the training split's samples, then the validation split's, in dataset order (a batch's
``index`` is its row).

A cache is keyed by what its numbers depend on (:func:`cache_key`): the VAE's weights (a
SHA-256 of its tensors), the data (the gain folders' file names, sizes and times; the
samples of each split), the image size, the threshold and the simulations. ``auto`` keeps one
cache per key under ``{output_dir}/latent-cache/``; a ``PATH`` whose key differs is refused
with a one-line error saying how to rebuild it. A cache is written to a temporary folder and
renamed into place when complete; under N processes the main process builds it and the
others open it (the trainer calls :func:`open_latent_cache` inside ``main_process_first``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lib.data.batching import collate, eval_batches
from lib.data.cache import folder_fingerprint
from lib.data.dataset import RadioMapDataset
from lib.data.layout import GAIN_DIR
from lib.errors import DataError, UserError
from lib.outputs import filling, require_space, reserved_memmap
from lib.progress import progress


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Maps in [-1, 1] (B, 1, H, W) -> unscaled latents (the posterior mean)."""
    return vae.encode(x).latent_dist.mode()


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Unscaled latents -> maps clamped to [-1, 1]."""
    return vae.decode(z).sample.float().clamp(-1.0, 1.0)


@torch.no_grad()
def measure_latent_scale(latents: Callable[[dict], torch.Tensor], dataset: Dataset, batch_size: int,
                         num_batches: int, log: Optional[Callable[[str], None]] = None) -> float:
    """1 / std of the latents (``latents(batch)``: unscaled, the posterior mean; from the
    encoder or the latent cache) of ``num_batches`` batches of ``dataset``, so that scaled
    latents have unit variance (the LDM convention; RadioMapSeer latents are far from unit scale).

    The samples are spread evenly over the dataset (not its first maps only) and read in a
    fixed order; every process measures the same samples, so all agree on the factor.
    """
    t0 = time.perf_counter()
    n = min(len(dataset), batch_size * num_batches)
    indices = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
    values = []
    with progress(math.ceil(n / batch_size), desc="latent scale", unit="batch", show=log is not None) as bar:
        for b in eval_batches(Subset(dataset, indices), batch_size):
            values.append(latents(b).float().flatten().cpu())
            bar.update(1)
    std = float(torch.cat(values).std())
    if not math.isfinite(std) or std <= 0:
        raise UserError(f"the VAE's latents have std {std} on {n} training samples; the latent "
                        f"scale factor cannot be measured (is the VAE checkpoint trained?)")
    if log is not None:
        log(f"latent scale factor {1.0 / std:.6g} = 1 / std of the latents of {n} training samples "
            f"({time.perf_counter() - t0:.1f} s)")
    return 1.0 / std


VERSION = 1
INDEX = "index.json"
PARTS = ("train", "val")


class LatentCacheError(DataError):
    """A cache that is stale, damaged or cannot be written: one line, what to do about it."""


# --------------------------------------------------------------------------- what a cache depends on
def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes, dtypes and bytes), e.g. the VAE's."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def samples_digest(ds: RadioMapDataset) -> str:
    """SHA-256 of a split's sample list (map, transmitter, simulation of every row)."""
    h = hashlib.sha256()
    for a in ds.sample_keys():
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()


def cache_key(vae: AutoencoderKL, data_cfg: Any, datasets: dict[str, RadioMapDataset]) -> dict[str, Any]:
    """Everything a cached latent depends on."""
    root = Path(data_cfg.root)
    return {"version": VERSION, "vae_weights": weights_digest(vae),
            "image_size": data_cfg.image_size, "threshold": data_cfg.threshold,
            "simulations": list(data_cfg.simulation),
            "data": {s: folder_fingerprint(root / GAIN_DIR / s) for s in data_cfg.simulation},
            "samples": {p: samples_digest(ds) for p, ds in datasets.items()}}


def key_name(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the cache
class LatentCache:
    """An opened cache: ``rows(part, index)`` -> (mean, std) of those samples."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index = json.loads((path / INDEX).read_text(encoding="utf-8"))
        self.mean = np.load(path / "mean.npy", mmap_mode="r")
        self.std = np.load(path / "std.npy", mmap_mode="r")
        self.offsets = self.index["offsets"]            # part -> first row
        self.counts = self.index["counts"]              # part -> rows

    def rows(self, part: str, index: torch.Tensor | np.ndarray, device: torch.device | str
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std (float32) of samples ``index`` of split ``part``, on ``device``.
        ``index`` may live on any device (a batch moved to the GPU carries its ``index`` there)."""
        if isinstance(index, torch.Tensor):
            index = index.detach().cpu().numpy()
        i = np.asarray(index, dtype=np.int64) + self.offsets[part]
        mean = torch.from_numpy(np.ascontiguousarray(self.mean[i])).to(device, non_blocking=True)
        std = torch.from_numpy(np.ascontiguousarray(self.std[i])).to(device, non_blocking=True)
        return mean, std


def _chunks(n: int, size: int) -> list[list[int]]:
    """Index chunks of ``size``; the last two share out a remainder of 1 (a batch of one sample
    takes another convolution path on the CPU, whose last bits differ from a larger batch's)."""
    out = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    if len(out) > 1 and len(out[-1]) == 1 and size > 2:
        out[-1] = out[-2][-1:] + out[-1]
        out[-2] = out[-2][:-1]
    return out


@torch.no_grad()
def build_latent_cache(path: Path, vae: AutoencoderKL, datasets: dict[str, RadioMapDataset], key: dict[str, Any],
                       batch_size: int, device: torch.device | str, num_workers: int = 0,
                       log: Optional[Callable[[str], None]] = None) -> LatentCache:
    """Encode every sample of ``datasets`` (the parts, e.g. train and val) with ``vae`` and
    publish the cache at ``path`` (temporary folder, then a rename)."""
    t0 = time.perf_counter()
    total = sum(len(ds) for ds in datasets.values())
    first = next(iter(datasets.values()))[0]["image"][None].to(device)
    shape = tuple(vae.encode(first).latent_dist.mean.shape[1:])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    nbytes = 2 * 4 * total * int(np.prod(shape)) + 2**20
    with filling(tmp, "prior.latent_cache", path, nbytes, LatentCacheError):   # one line on a full disk
        require_space(tmp, nbytes, "prior.latent_cache", "free space there, or set prior.latent_cache to a folder "
                                                         "on another disk, or to off")
        mean = reserved_memmap(tmp / "mean.npy", (total, *shape), np.float32)
        std = reserved_memmap(tmp / "std.npy", (total, *shape), np.float32)
        offsets, row = {}, 0
        with progress(total, desc="latent cache", unit="sample", show=log is not None) as bar:
            for part in datasets:
                offsets[part] = row
                loader = DataLoader(datasets[part], batch_sampler=_chunks(len(datasets[part]), batch_size),
                                    num_workers=num_workers, collate_fn=collate,
                                    generator=torch.Generator().manual_seed(0))   # leaves the global RNG alone
                for batch in loader:
                    dist = vae.encode(batch["image"].to(device)).latent_dist
                    n = len(batch["image"])
                    mean[row:row + n] = dist.mean.float().cpu().numpy()
                    std[row:row + n] = dist.std.float().cpu().numpy()
                    row += n
                    bar.update(n)
        mean.flush()
        std.flush()
        del mean, std
        index = {"key": key, "offsets": offsets, "counts": {p: len(ds) for p, ds in datasets.items()},
                 "shape": list(shape), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / INDEX).is_file():      # not another process publishing the same cache
                raise
    if log is not None:
        nbytes = sum(f.stat().st_size for f in path.iterdir())
        log(f"prior.latent_cache: encoded {total} samples ({' + '.join(f'{len(ds)} {p}' for p, ds in datasets.items())}) "
            f"into {path} ({nbytes / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
    return LatentCache(path)


def _difference(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    what = {"vae_weights": "another VAE", "image_size": "another data.image_size", "threshold": "another data.threshold",
            "simulations": "other simulations", "data": "other data files (the gain folders changed)",
            "samples": "other samples (another split or data.tx_per_map)", "version": "another version of this toolkit"}
    diffs = [what.get(k, k) for k in what if theirs.get(k) != ours.get(k)]
    return ", ".join(diffs) or "another configuration"


def open_latent_cache(cfg: Any, vae: AutoencoderKL, datasets: dict[str, RadioMapDataset], device: torch.device | str,
                      build: bool = True, log: Optional[Callable[[str], None]] = None) -> Optional[LatentCache]:
    """The cache ``cfg.prior.latent_cache`` names (None when ``off``), built when missing and
    ``build`` (the main process), refused when stale."""
    setting, output_dir, data_cfg, batch_size = (cfg.prior.latent_cache, cfg.output_dir, cfg.data,
                                                 cfg.batch_size("prior"))
    if setting == "off":
        return None
    datasets = {p: datasets[p] for p in PARTS}
    key = cache_key(vae, data_cfg, datasets)
    path = Path(output_dir) / "latent-cache" / key_name(key) if setting == "auto" else Path(setting)
    if (path / INDEX).is_file():
        try:
            cache = LatentCache(path)
        except (OSError, ValueError) as exc:
            raise LatentCacheError(f"prior.latent_cache {path}: unreadable ({exc}); delete the folder to rebuild "
                                   f"it") from None
        if cache.index.get("key") != key:
            raise LatentCacheError(f"prior.latent_cache {path}: built for {_difference(cache.index.get('key', {}), key)}; "
                                   f"delete the folder to rebuild it, or set prior.latent_cache: auto (one cache "
                                   f"per VAE and data under {Path(output_dir) / 'latent-cache'})")
        if log is not None:
            log(f"prior.latent_cache: {path} ({sum(cache.counts.values())} samples)")
        return cache
    if path.exists() and any(path.iterdir()):
        raise LatentCacheError(f"prior.latent_cache {path}: a folder without {INDEX} (not a latent cache); "
                               f"point it at a new folder, or set it to auto")
    if not build:
        raise LatentCacheError(f"prior.latent_cache {path}: not built (the main process builds it first)")
    if path.exists():
        path.rmdir()
    return build_latent_cache(path, vae, datasets, key, batch_size, device, data_cfg.num_workers, log)


class LatentSource:
    """Stage 2's unscaled latents of a batch: the posterior mean, or with ``sample`` a posterior
    sample ``mean + std * eps`` (the noise drawn as diffusers' ``latent_dist.sample`` draws it);
    from the cache when there is one, else from the frozen encoder."""

    def __init__(self, vae: AutoencoderKL, cache: Optional[LatentCache], sample: bool = False) -> None:
        self.vae, self.cache, self.sample = vae, cache, sample

    @torch.no_grad()
    def __call__(self, batch: dict, part: str, device: torch.device | str, sample: Optional[bool] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.cache is not None:
            mean, std = self.cache.rows(part, batch["index"], device)
        else:
            dist = self.vae.encode(batch["image"].to(device, non_blocking=True)).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        if not (self.sample if sample is None else sample):
            return mean
        eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)   # any generator's device
        return mean + std * eps


def place_vae(vae: AutoencoderKL, device: torch.device | str, encoder: bool) -> AutoencoderKL:
    """The frozen VAE on ``device``; without ``encoder`` (a latent cache) its encoder stays on
    the CPU: training never runs it."""
    vae.to(device)
    if not encoder:
        for part in (vae.encoder, getattr(vae, "quant_conv", None)):
            if part is not None:
                part.to("cpu")
    return vae
