"""Image-quality metrics for radio maps, as defined in the RadioDiff paper.

All public functions take *model-space* tensors: values in ``[-1, 1]``, shape
``(B, C, H, W)``. Before any metric is computed both prediction and target are mapped to
``[0, 1]`` with ``(x + 1) / 2`` and clamped to ``[0, 1]`` (:func:`to_unit`); every metric
below is on that scale and is computed **per map** (one value per batch element), in
float64.

- ``nmse``  ``sum((p - t)^2) / (sum(t^2) + NMSE_EPS)``. ``NMSE_EPS`` (1e-10) only keeps an
  all-zero target from dividing by zero: a perfect prediction of it scores 0, any other
  prediction of it scores a huge (finite) number.
- ``rmse``  ``sqrt(mean((p - t)^2))`` over all C*H*W values of the map.
- ``ssim``  torchmetrics' SSIM, gaussian window (sigma 1.5, 11 taps), ``data_range=1``,
  k1=0.01, k2=0.03, reflection-padded so the map keeps its size, averaged over the map
  (and channels). Maps of 6 px or more per side use exactly this window. For a map with
  a side below 6 px the window cannot be reflection-padded, so sigma is shrunk until the
  window fits (values for such tiny maps are not comparable with the standard SSIM).
- ``psnr``  ``10 * log10(1 / mse)`` (``data_range=1``) from torchmetrics, clamped to at
  most ``PSNR_MAX_DB`` (100 dB, i.e. mse <= 1e-10) so a perfect reconstruction (inf in
  theory) keeps means finite. (torchmetrics converts ln to log10 with a float32 constant,
  so PSNR is accurate to about 1e-7 relative, not to float64 precision.)

Two conventions (RadioUNet's and RadioDiff's papers):

- per sample, then mean (and std) over samples (RadioDiff's ``calc_loss_test``): the keys above;
- set level (RadioUNet: "the square root of the MSE on the whole test set"): ``nmse_set``
  = sum over every pixel of the set of ``(p - t)^2`` / sum of ``t^2``, and ``rmse_set`` =
  ``sqrt(mean over every pixel of the set of (p - t)^2)``, from the per-map sums ``sq_err``,
  ``target_sq`` and ``pixels`` (:data:`SUM_NAMES`). A set-level RMSE reads higher than a mean
  of per-map RMSEs of the same predictions.

:data:`DB_PER_GRAY_LEVEL`: RadioMapSeer's gray levels span 80 dB of pathloss (RadioUNet: "the
RMSE in dB is 80 times the RMSE of gray level", unthresholded maps).

A *sample* is one radio map: city map x transmitter x simulation. Accumulating over an
evaluation: :class:`MetricAccumulator` keeps the per-sample values (one 1-D float64 CPU
tensor per update and metric) and, optionally, a group id per sample (e.g. the simulation
name). Summaries are the mean and the *population* std (``correction=0``) over samples. For multi-process evaluation gather the per-map tensors from :meth:`values` (and the
group lists from :meth:`groups`, e.g. with ``gather_object``) and call :func:`summarize` /
:func:`summarize_groups` on the concatenation, or combine accumulators with
:meth:`MetricAccumulator.merge` / :meth:`MetricAccumulator.from_state`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

METRIC_NAMES: tuple[str, ...] = ("nmse", "rmse", "ssim", "psnr")
SUM_NAMES: tuple[str, ...] = ("sq_err", "target_sq", "pixels")     # per-map sums for the set level
DB_PER_GRAY_LEVEL = 80.0
NMSE_EPS = 1e-10
PSNR_MAX_DB = 100.0
SSIM_SIGMA = 1.5
SSIM_DATA_RANGE = 1.0


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map a model-space tensor in ``[-1, 1]`` to ``[0, 1]``: ``((x + 1) / 2).clamp(0, 1)``."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("pred and target must be torch tensors")
    if pred.ndim != 4:
        raise ValueError(f"pred must have shape (B, C, H, W), got {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    if min(pred.shape[1:]) == 0:
        raise ValueError(f"maps must be non-empty, got shape {tuple(pred.shape)}")


def _ssim_sigma(height: int, width: int) -> float:
    """Gaussian sigma for SSIM: 1.5, shrunk only for maps with a side below 6 px.

    torchmetrics derives the window radius as ``int(3.5 * sigma + 0.5)`` (5 for sigma 1.5)
    and reflection-pads by it, which needs ``radius < side``.
    """
    side = min(height, width)
    if int(3.5 * SSIM_SIGMA + 0.5) < side:
        return SSIM_SIGMA
    if side <= 1:
        return 0.1  # radius 0: a 1-tap window
    return (side - 1) / 3.5  # radius side - 1


@torch.no_grad()
def per_map_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-map ``nmse``, ``rmse``, ``ssim``, ``psnr`` of ``pred`` vs ``target`` (both in [-1, 1]),
    and the sums ``sq_err``, ``target_sq``, ``pixels`` of the set-level metrics.

    Returns a dict of shape-``(B,)`` float64 CPU tensors (empty ones for ``B == 0``).
    Computed in float64 on the inputs' device (CPU for MPS, which has no float64).
    """
    _check_pair(pred, target)
    if pred.shape[0] == 0:
        return {k: torch.zeros(0, dtype=torch.float64) for k in METRIC_NAMES + SUM_NAMES}
    device = pred.device if pred.device.type != "mps" else torch.device("cpu")
    p = to_unit(pred.detach().to(device=device, dtype=torch.float64))
    t = to_unit(target.detach().to(device=device, dtype=torch.float64))

    sq_err = (p - t).pow(2).flatten(1)
    mse = sq_err.mean(dim=1)
    nmse = sq_err.sum(dim=1) / (t.flatten(1).pow(2).sum(dim=1) + NMSE_EPS)
    rmse = mse.sqrt()
    ssim = structural_similarity_index_measure(
        p,
        t,
        gaussian_kernel=True,
        sigma=_ssim_sigma(p.shape[-2], p.shape[-1]),
        data_range=SSIM_DATA_RANGE,
        reduction="none",
    )
    psnr = peak_signal_noise_ratio(
        p, t, data_range=SSIM_DATA_RANGE, reduction="none", dim=(1, 2, 3)
    ).clamp(max=PSNR_MAX_DB)

    out = {"nmse": nmse, "rmse": rmse, "ssim": ssim, "psnr": psnr, "sq_err": sq_err.sum(dim=1),
           "target_sq": t.flatten(1).pow(2).sum(dim=1),
           "pixels": torch.full_like(mse, float(sq_err.shape[1]))}
    return {k: v.reshape(-1).to(device="cpu", dtype=torch.float64) for k, v in out.items()}


def _check_values(values: Mapping[str, torch.Tensor]) -> int:
    """Validate a per-map values dict; return the number of maps."""
    missing = [n for n in METRIC_NAMES if n not in values]
    if missing:
        raise ValueError(f"per-map values lack metric(s) {missing}; expected {list(METRIC_NAMES)}")
    lengths = {n: values[n].reshape(-1).numel() for n in METRIC_NAMES}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-map values have different lengths: {lengths}")
    return next(iter(lengths.values()))


def summarize(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Mean and population std over samples of per-sample values.

    ``values`` maps each of ``METRIC_NAMES`` to a tensor of per-map values (any shape, it
    is flattened; e.g. the ``torch.cat`` of tensors gathered from several processes).
    Returns ``{name: mean, name + "_std": std, ..., "num_samples": n}`` as Python numbers, and
    ``nmse_set`` / ``rmse_set`` when ``values`` has the sums (:data:`SUM_NAMES`); with no samples
    the means and stds are ``nan`` and ``num_samples`` is 0.
    """
    n = _check_values(values)
    out: dict[str, float] = {}
    if all(k in values for k in SUM_NAMES):
        sums = {k: float(values[k].detach().double().sum()) for k in SUM_NAMES}
        out["nmse_set"] = sums["sq_err"] / (sums["target_sq"] + NMSE_EPS) if n else math.nan
        out["rmse_set"] = math.sqrt(sums["sq_err"] / sums["pixels"]) if n else math.nan
    for name in METRIC_NAMES:
        v = values[name].detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        if n == 0:
            out[name] = math.nan
            out[f"{name}_std"] = math.nan
        else:
            out[name] = v.mean().item()
            out[f"{name}_std"] = v.std(correction=0).item()
    out["num_samples"] = n
    return out


def summarize_groups(
    values: Mapping[str, torch.Tensor], groups: Sequence[str]
) -> dict[str, dict[str, float]]:
    """:func:`summarize` per group; ``groups[i]`` is the group of map ``i``. Keys sorted."""
    n = _check_values(values)
    if len(groups) != n:
        raise ValueError(f"got {len(groups)} group ids for {n} samples")
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(str(g), []).append(i)
    flat = {k: values[k].detach().reshape(-1).cpu() for k in METRIC_NAMES + SUM_NAMES if k in values}
    result: dict[str, dict[str, float]] = {}
    for g in sorted(index):
        idx = torch.tensor(index[g], dtype=torch.long)
        result[g] = summarize({k: v[idx] for k, v in flat.items()})
    return result


class MetricAccumulator:
    """Collects per-map metrics over an evaluation; summarizes overall and per group.

    Either every update passes ``groups`` (one id per map) or none does; mixing raises
    ``ValueError`` so a per-group summary never silently misses maps.
    """

    def __init__(self) -> None:
        self._chunks: dict[str, list[torch.Tensor]] = {n: [] for n in METRIC_NAMES + SUM_NAMES}
        self._groups: list[str] | None = None  # None: no grouped update seen (yet)
        self._num_samples = 0
        self._sums = True         # every update had the set-level sums

    # ------------------------------------------------------------------ filling
    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        groups: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute :func:`per_map_metrics` of a batch, store them and return them."""
        if groups is not None and len(groups) != pred.shape[0]:
            raise ValueError(f"got {len(groups)} group ids for a batch of {pred.shape[0]} samples")
        values = per_map_metrics(pred, target)
        self.add(values, groups)
        return values

    def add(
        self, values: Mapping[str, torch.Tensor], groups: Sequence[str] | None = None
    ) -> None:
        """Store already computed per-map values (and optional group ids)."""
        n = _check_values(values)
        if groups is not None and len(groups) != n:
            raise ValueError(f"got {len(groups)} group ids for {n} samples")
        self._add_groups(groups, n)
        self._sums = self._sums and all(k in values for k in SUM_NAMES)
        for name in METRIC_NAMES + (SUM_NAMES if self._sums else ()):
            self._chunks[name].append(
                values[name].detach().reshape(-1).to(device="cpu", dtype=torch.float64)
            )
        self._num_samples += n

    def _add_groups(self, groups: Sequence[str] | None, n: int) -> None:
        if self._num_samples == 0:  # nothing stored yet: this update decides
            self._groups = None if groups is None else []
        elif (self._groups is not None) != (groups is not None):
            raise ValueError(
                "group ids must be given for every update or for none "
                f"(accumulator {'has' if self._groups is not None else 'has no'} group ids, "
                f"this update {'has' if groups is not None else 'has none'})"
            )
        if groups is not None:
            self._groups.extend(str(g) for g in groups)

    def merge(self, other: "MetricAccumulator") -> "MetricAccumulator":
        """Append all maps of ``other`` (e.g. another process's accumulator); returns self."""
        if other._num_samples == 0:
            return self
        self.add(other.values(), other.groups())
        return self

    def reset(self) -> None:
        """Forget all stored maps."""
        self.__init__()

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._num_samples

    @property
    def num_samples(self) -> int:
        """Number of maps stored."""
        return self._num_samples

    def values(self) -> dict[str, torch.Tensor]:
        """All per-map values: ``{name: (N,) float64 CPU tensor}`` in update order (the
        set-level sums only when every update had them)."""
        names = METRIC_NAMES + (SUM_NAMES if self._sums else ())
        return {
            n: torch.cat(self._chunks[n]) if self._chunks[n] else torch.zeros(0, dtype=torch.float64)
            for n in names
        }

    def groups(self) -> list[str] | None:
        """Group id of every map in update order, or ``None`` if updates had no groups."""
        return None if self._groups is None else list(self._groups)

    def compute(self) -> dict[str, float]:
        """:func:`summarize` over all stored maps."""
        return summarize(self.values())

    def compute_groups(self) -> dict[str, dict[str, float]]:
        """:func:`summarize` per group id (sorted); ``{}`` if updates had no groups."""
        if self._groups is None:
            return {}
        return summarize_groups(self.values(), self._groups)

    # ------------------------------------------------------------------ (de)serialising
    def state(self) -> dict:
        """A plain, picklable snapshot: ``{"values": values(), "groups": groups()}``."""
        return {"values": self.values(), "groups": self.groups()}

    @classmethod
    def from_state(cls, state: Mapping) -> "MetricAccumulator":
        """Rebuild an accumulator from :meth:`state` (or gathered values + groups)."""
        acc = cls()
        values = state["values"]
        if _check_values(values) > 0:
            acc.add(values, state.get("groups"))
        return acc
