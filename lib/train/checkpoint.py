"""Checkpoint folders: written atomically, found again reliably, rotated without loss.

Layout of ``{run_dir}/checkpoints/step-{N:07d}/`` (the state after N optimizer steps)::

    accelerate/            accelerator.save_state: models, optimizers, schedulers, RNG, scaler
    <stage files>          e.g. vae/ (save_pretrained), discriminator.safetensors, ema.safetensors
    config.yaml            the resolved config of the run that wrote it
    trainer_state.json     written last: step, data position, validation result, file manifest

A checkpoint is written into ``.tmp-step-N`` and renamed when complete, so a crash (even
``kill -9``) mid-write leaves no folder named ``step-*``. ``trainer_state.json`` lists every
file with its size and SHA-256; a folder whose files do not match (copied half-way, truncated,
or damaged in place) is reported and skipped, never loaded: listing compares the sizes, and
resolving a checkpoint to load (:func:`resolve`) also the contents, falling back to the newest
intact one with a warning that names the damaged one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from lib.errors import CheckpointError, one_line
from lib.outputs import disk_full

if TYPE_CHECKING:
    from accelerate import Accelerator

    from lib.config import Config
    from lib.train.runlog import RunLog

STATE_FILE = "trainer_state.json"
KEEP_FILE = "KEEP"          # a checkpoint holding this file is never rotated away
NAME_RE = re.compile(r"^step-(\d{7,})$")
TMP_PREFIX = ".tmp-"
DELETING_PREFIX = ".deleting-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    state: dict[str, Any]

    @property
    def val_loss(self) -> float:
        """The validation loss recorded with this checkpoint (inf when none)."""
        v = self.state.get("val_loss")
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def check_complete(folder: Path, verify: bool = False) -> Optional[str]:
    """None if ``folder`` is a complete checkpoint, else the reason it is not: a missing file or
    one of another size; with ``verify``, also one whose contents changed (SHA-256)."""
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        return f"no {STATE_FILE} (the write did not finish)"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{STATE_FILE} is not valid JSON"
    files = state.get("files")
    if not isinstance(files, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} has no step or file manifest"
    if verify and "state_sha256" in state and state_digest(state) != state["state_sha256"]:
        return f"{STATE_FILE} was changed after it was written (its SHA-256 differs from the one it records)"
    for rel, entry in files.items():
        size, digest = (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get("sha256"))
        p = folder / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != size:
            return f"file {rel} has {p.stat().st_size} bytes, expected {size}"
        if verify and digest is not None and _sha256(p) != digest:
            return f"file {rel} is damaged (its SHA-256 differs from the one recorded when it was written)"
    return None


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of a trainer state without its own ``state_sha256`` (sorted keys): the state file
    carries the digest of everything else in it, so that an edit of it (a latent scale, a step)
    is found like a damaged weight file."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True).encode()).hexdigest()


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))


def list_checkpoints(ckpt_dir: Path, warn: Callable[[str], None] = print) -> list[CheckpointInfo]:
    """Complete checkpoints under ``ckpt_dir``, oldest first; incomplete ones are named in a warning."""
    out: list[CheckpointInfo] = []
    if not ckpt_dir.is_dir():
        return out
    for folder in ckpt_dir.iterdir():
        m = NAME_RE.match(folder.name)
        if not m or not folder.is_dir():
            continue
        reason = check_complete(folder)
        if reason:
            warn(f"skipping incomplete checkpoint {folder}: {reason}")
            continue
        out.append(CheckpointInfo(folder, int(m.group(1)), read_state(folder)))
    out.sort(key=lambda c: c.step)
    return out


def best_of(infos: list[CheckpointInfo]) -> Optional[CheckpointInfo]:
    """The checkpoint with the lowest recorded validation loss (the newest on ties)."""
    scored = [c for c in infos if math.isfinite(c.val_loss)]
    return min(reversed(scored), key=lambda c: c.val_loss) if scored else None


def intact(infos: list[CheckpointInfo], warn: Callable[[str], None] = print) -> list[CheckpointInfo]:
    """The checkpoints of ``infos`` whose contents are as written (SHA-256), newest last; the
    damaged ones are named in a warning."""
    out = []
    for info in infos:
        reason = check_complete(info.path, verify=True)
        if reason:
            warn(f"skipping damaged checkpoint {info.path}: {reason}")
        else:
            out.append(info)
    return out


def newest_intact(infos: list[CheckpointInfo], warn: Callable[[str], None] = print) -> Optional[CheckpointInfo]:
    """The newest checkpoint of ``infos`` (oldest first) whose contents are as written; the
    damaged newer ones are named in a warning. Verifies only as many as it needs to."""
    for info in reversed(infos):
        if intact([info], warn):
            return info
    return None


def resolve(spec: str, ckpt_dir: Path, warn: Callable[[str], None] = print, option: str = "--resume",
            what: str = "", hint: str = "start without --resume", weights: Optional[str] = None,
            best_after: Optional[int] = None) -> CheckpointInfo:
    """``latest`` | ``best`` | a path to a ``step-N`` folder -> a complete checkpoint whose
    files are as written, or a one-line error: the one resolver of ``--resume``,
    ``--checkpoint`` and ``prior.vae_checkpoint`` (``option``: how the user named it; ``what``:
    the kind of checkpoint, e.g. "stage-1 VAE "; ``hint``: what to do when there is none;
    ``weights``: a file a folder of that kind holds). ``latest`` and ``best`` skip damaged
    checkpoints (falling back to the newest intact one) with a warning naming each; ``best``
    is the lowest validation loss, among the checkpoints after ``best_after`` when the run went
    past that step (stage 1: ``disc_start``, lib/train/weights.py)."""
    if spec in ("latest", "best"):
        infos = list_checkpoints(ckpt_dir, warn)
        latest = newest_intact(infos, warn)
        if latest is None:
            raise CheckpointError(f"{option} {spec}: no complete {what}checkpoint under {ckpt_dir}; {hint} "
                                  f"(or pass a checkpoint folder)")
        if spec == "latest":
            return latest
        if best_after is not None and infos[-1].step > best_after:
            infos = [c for c in infos if c.step > best_after]
        best = best_of(intact(infos, lambda message: None))      # the damaged ones were named above
        if best is None:
            raise CheckpointError(f"{option} best: no {what}checkpoint under {ckpt_dir} has a validation result "
                                  f"(damaged ones are skipped; use latest)")
        return best
    folder = Path(spec)
    if not folder.is_dir():
        raise CheckpointError(f"{option} {spec}: no such checkpoint folder; {hint}, or pass latest, best or a "
                              f"path like {ckpt_dir}/step-0005000")
    if weights is not None and not (folder / weights).is_file():
        raise CheckpointError(f"{option} {spec}: not a {what}checkpoint (no {weights})")
    reason = check_complete(folder, verify=True)
    if reason:
        raise CheckpointError(f"{option} {spec}: not a complete checkpoint: {reason}")
    state = read_state(folder)
    return CheckpointInfo(folder, int(state["step"]), state)


def resolve_resume(spec: Optional[str], ckpt_dir: Path, warn: Callable[[str], None] = print,
                   info: Callable[[str], None] = print) -> Optional[CheckpointInfo]:
    """A trainer's ``--resume``: None for a fresh start. ``latest`` with no checkpoint yet starts
    fresh and says so, as diffusers' examples do, so that a requeued job can always pass it
    (also one killed before its first checkpoint); otherwise :func:`resolve` (checkpoints that
    exist but are all damaged are an error, not a fresh start)."""
    if spec is None:
        return None
    if spec == "latest" and not list_checkpoints(ckpt_dir, lambda message: None):
        info(f"--resume latest: no checkpoint under {ckpt_dir} yet; starting a fresh run")
        return None
    return resolve(spec, ckpt_dir, warn)


def clean_temporaries(ckpt_dir: Path) -> list[Path]:
    """Remove ``.tmp-*`` folders left by a write that was killed and ``.deleting-*`` ones left by a
    rotation that was killed (only one writer per run)."""
    removed = []
    if ckpt_dir.is_dir():
        for folder in ckpt_dir.iterdir():
            if folder.name.startswith((TMP_PREFIX, DELETING_PREFIX)) and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def begin(ckpt_dir: Path, step: int) -> Path:
    """Create (empty) the temporary folder that step ``step``'s checkpoint is written into."""
    tmp = ckpt_dir / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict[str, Any]) -> Path:
    """Seal ``tmp`` with its manifest and state, fsync, and rename it to ``step-N``.

    An existing ``step-N`` (left by a run that was later resumed from an earlier step) is
    moved aside to ``step-N.replaced-<time>``, never deleted.
    """
    step = int(state["step"])
    state = dict(state, files=_manifest(tmp), saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    state["state_sha256"] = state_digest(state)
    state_path = tmp / STATE_FILE
    with open(state_path, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())
    for p in tmp.rglob("*"):
        if p.is_file():
            _fsync_path(p)
    _fsync_path(tmp)
    final = tmp.parent / checkpoint_name(step)
    if final.exists():
        final.rename(final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
    os.replace(tmp, final)
    _fsync_path(tmp.parent)
    return final


def rotate(ckpt_dir: Path, keep_last: int, warn: Callable[[str], None] = print) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, the best one, and any
    marked with a ``KEEP`` file (e.g. the last good one before a divergence).

    Incomplete folders are never counted as kept and never deleted here (they are named
    by :func:`list_checkpoints` so a person can look at them).
    """
    infos = list_checkpoints(ckpt_dir, lambda message: None)     # incomplete ones were named at the start
    keep = {c.path for c in infos[-keep_last:]} | {c.path for c in infos if (c.path / KEEP_FILE).exists()}
    best = best_of(infos)
    if best is not None:
        keep.add(best.path)
    removed = []
    for c in infos:
        if c.path not in keep:
            remove(c.path)
            removed.append(c.path)
    return removed


def remove(folder: Path) -> None:
    """Delete a checkpoint folder: renamed first to a hidden ``.deleting-*`` name (one atomic
    step), then deleted, so that a kill in between leaves no half-deleted ``step-N`` but a
    leftover that :func:`clean_temporaries` removes at the next start."""
    doomed = folder.with_name(f"{DELETING_PREFIX}{folder.name}")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------------------------- writing a checkpoint
def write_file(folder: Path, name: str, obj: Any) -> None:
    """Write ``obj`` as ``folder / name``: a diffusers model with ``save_pretrained`` (a folder,
    safetensors weights), a torch module (its state dict) or a dict of tensors (a safetensors
    file), or any other dict (a JSON file)."""
    import torch
    from safetensors.torch import save_file
    path = folder / name
    if hasattr(obj, "save_pretrained"):
        obj.save_pretrained(path, safe_serialization=True)
    elif isinstance(obj, torch.nn.Module):
        save_file({k: v.detach().contiguous() for k, v in obj.state_dict().items()}, str(path))
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        save_file({k: v.detach().contiguous() for k, v in obj.items()}, str(path))
    elif isinstance(obj, dict):
        path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    else:
        raise TypeError(f"cannot write {type(obj).__name__} as {name}")


def _trained_models(accelerator: "Accelerator") -> Any:
    """The models Accelerate saves in ``accelerate/`` (e.g. the VAE with its learned log-variance)."""
    import torch
    return torch.nn.ModuleList([accelerator.unwrap_model(m) for m in getattr(accelerator, "_models", [])])


def nonfinite_weights(files: dict[str, Any]) -> Optional[str]:
    """The name of the first of ``files``' models or tensor dicts that holds a NaN or infinity,
    else None: such weights are never written as a checkpoint (a run stopped for non-finite
    values then points at its last finite checkpoint, from which the advised resume works)."""
    import torch
    for name, obj in files.items():
        if isinstance(obj, torch.nn.Module):
            tensors = list(obj.state_dict().values())
        elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            tensors = list(obj.values())
        else:
            continue
        floats = [t for t in tensors if t.is_floating_point()]
        if floats and not bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):
            return name
    return None


def save_checkpoint(accelerator: "Accelerator", ckpt_dir: Path, step: int, cfg: "Config",
                    state: dict[str, Any], files: dict[str, Any], keep_last: int,
                    log: "RunLog") -> Optional[Path]:
    """Write ``checkpoints/step-{step:07d}``: the Accelerate state (models, optimizers,
    schedules, every process's RNG) under ``accelerate/``, ``files`` (:func:`write_file`),
    ``config.yaml`` and ``trainer_state.json`` (``state`` + step + file manifest), atomically;
    then rotate old checkpoints (:func:`rotate`). Every process calls it; the main one writes
    the files. Logs a ``checkpoint`` event with the seconds it took; returns the folder."""
    from lib.config import save_config
    t0 = time.perf_counter()
    bad = nonfinite_weights({**files, "the training state (accelerate/)": _trained_models(accelerator)})
    if bad:      # every process decides alike: the weights are the same on every process
        newest = newest_intact(list_checkpoints(ckpt_dir, lambda message: None), lambda message: None)
        log.event("checkpoint_skipped", step, f"not written: {bad} holds non-finite weights at step {step}; "
                  + (f"the newest checkpoint, {newest.path}, keeps the last finite weights" if newest else
                     "no earlier checkpoint exists"), level="WARNING", weights=bad,
                  kept=str(newest.path) if newest else None)
        return None
    tmp = ckpt_dir / f"{TMP_PREFIX}{checkpoint_name(step)}"
    try:
        if accelerator.is_main_process:
            begin(ckpt_dir, step)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))
        accelerator.wait_for_everyone()
        final = None
        if accelerator.is_main_process:
            for name, obj in files.items():
                write_file(tmp, name, obj)
            save_config(cfg, tmp / "config.yaml")
            final = commit(tmp, dict(state, step=step))
    except Exception as exc:      # a full disk, a quota, a read-only mount: the earlier checkpoints stand
        if not (isinstance(exc, OSError) or disk_full(exc)):    # torch and safetensors wrap a full disk
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        newest = newest_intact(list_checkpoints(ckpt_dir, lambda message: None), lambda message: None)
        free = shutil.disk_usage(ckpt_dir).free if ckpt_dir.is_dir() else None
        raise CheckpointError(
            f"cannot write checkpoint {checkpoint_name(step)} in {ckpt_dir} ({getattr(exc, 'strerror', None) or one_line(str(exc))}"
            + (f"; {free / 2**20:.0f} MiB free" if free is not None else "") + "); "
            + (f"the checkpoints already there are intact (newest: {newest.path.name}): " if newest else "")
            + "make room, then continue with --resume latest") from None
    if accelerator.is_main_process:
        removed = rotate(ckpt_dir, keep_last, log.warning)
        log.event("checkpoint", step, f"checkpoint {final}" + (f" (removed {len(removed)} older)" if removed else ""),
                  level="INFO", path=str(final), seconds=round(time.perf_counter() - t0, 4))
    accelerator.wait_for_everyone()
    return final
