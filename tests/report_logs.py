"""Builders of small training logs for the report tests (no tests here).

Two formats: run folders of this toolkit (metrics.jsonl, run.json, config.yaml) and text logs
of the original RadioDiff trainer (a config dict as the first line, ``[Train Step]`` lines with
five-decimal values, generator and discriminator lines sharing a step).
"""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

from lib.config import load_config, save_config
from lib.train.schedule import lr_at

T0 = 1_700_000_000.0
ORIG_T0 = dt.datetime(2025, 1, 2, 10, 0, 0)


# --------------------------------------------------------------------------- this toolkit
def vae_values(step: int, disc_on: bool) -> dict[str, Any]:
    rec = 0.05 + 0.5 * math.exp(-step / 500) + 0.002 * math.sin(step / 37)
    kl = 1e5 + 10.0 * step
    nll = rec * 1000
    g = -0.4 + 0.01 * math.sin(step / 13) if disc_on else None
    dw = 5000.0 if disc_on else 0.0
    total = nll + 1e-6 * kl + (dw * g if disc_on else 0.0)
    return {"total_loss": total, "rec_loss": rec, "nll_loss": nll, "kl_loss": kl, "g_loss": g,
            "disc_loss": (1.0 + 0.05 * math.sin(step / 7)) if disc_on else None,
            "d_weight": dw, "disc_factor": 1.0 if disc_on else 0.0, "logvar": -1e-4 * step / 100,
            "logits_real": (0.1 * math.cos(step / 5)) if disc_on else None,
            "logits_fake": (-0.1 * math.cos(step / 3)) if disc_on else None,
            "grad_norm": 0.5 + 0.1 * math.sin(step / 11),
            "grad_norm_disc": (0.3 + 0.05 * math.sin(step / 17)) if disc_on else None,
            "steps_per_sec": 2.0, "nonfinite_skipped": 0}


def prior_values(step: int) -> dict[str, Any]:
    return {"loss": 0.05 + 1.0 * math.exp(-step / 400) + 0.003 * math.sin(step / 29),
            "grad_norm": 0.8 + 0.1 * math.sin(step / 7), "steps_per_sec": 4.0}


def toolkit_run(root: Path, stage: str = "vae", segments: Optional[list[list[int]]] = None,
                resume_from: Optional[list[int]] = None, overrides: tuple[str, ...] = (),
                edit: Optional[Callable[[int, dict], dict]] = None, val_every: int = 1000,
                changes: Optional[list[dict]] = None, end: bool = True) -> Path:
    """A run folder ``root/out/<stage>``: records every 100 steps to 5,000 (max_steps),
    disc_start 2001, the LR exactly as ``lib.train.schedule.lr_at`` says. ``segments`` and
    ``resume_from`` build a resumed run (a ``resume`` event and a run.json entry between
    segments); ``edit(step, record)`` changes a train record (e.g. inject a fault)."""
    cfg = load_config(None, [f"{stage}.train.max_steps=5000", f"{stage}.train.log_every=100",
                             f"{stage}.train.warmup_steps=0", "vae.loss.disc_start=2001", *overrides])
    run = root / "out" / stage
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    tcfg = cfg.vae.train if stage == "vae" else cfg.prior.train
    segments = segments or [list(range(100, 5001, 100))]
    resume_from = resume_from or []
    lines = [{"step": 0, "split": "event", "time": T0, "event": "start", "message": "training to step 5000"}]
    resumes = []
    t = T0
    for k, seg in enumerate(segments):
        if k:
            frm = resume_from[k - 1]
            ch = (changes or [{}] * len(segments))[k - 1] if changes else {}
            t += 600.0
            lines.append({"step": frm, "split": "event", "time": t, "event": "resume",
                          "message": f"resumed from ckpt/step-{frm:07d} at step {frm}",
                          "from_checkpoint": f"ckpt/step-{frm:07d}", "from_step": frm, "changes": ch})
            resumes.append({"from_checkpoint": f"ckpt/step-{frm:07d}", "step": frm, "changes": ch,
                            "time": "2025-01-01T01:00:00+00:00"})
        for s in seg:
            t += 50.0
            vals = vae_values(s, s >= 2001) if stage == "vae" else prior_values(s)
            rec = {"step": s, "split": "train", "time": t, "lr": lr_at(tcfg, s)}
            if stage == "vae":
                rec["lr_disc"] = rec["lr"]
            rec.update(vals)
            if edit is not None:
                rec = edit(s, rec)
            if stage == "vae" and s - 100 < 2001 <= s:      # the trainer's event, at the exact step
                lines.append({"step": 2001, "split": "event", "time": t - 1, "event": "disc_start",
                              "message": "discriminator starts training"})
            lines.append(rec)
            if s % val_every == 0:
                if stage == "vae":
                    val = {"rec_loss": vals["rec_loss"] * 1.1, "psnr": 20 + s / 1000, "ssim": 0.5 + s / 20000,
                           "nmse": 0.1 - s / 100000, "rmse": 0.2 - s / 50000}
                else:
                    val = {"nmse": 0.1 - s / 100000, "rmse": 0.2 - s / 50000, "ssim": 0.5 + s / 20000,
                           "psnr": 20 + s / 1000}
                lines.append({"step": s, "split": "val", "time": t, **val, "num_samples": 64, "seconds": 1.5})
    if end:
        lines.append({"step": segments[-1][-1], "split": "event", "time": t + 1, "event": "end",
                      "message": "finished"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "run.json").write_text(json.dumps({
        "stage": stage, "command": ["train_vae.py"], "started": "2025-01-01T00:00:00+00:00",
        "versions": {"python": "3.11"}, "git_commit": None, "resumes": resumes}))
    return run


# --------------------------------------------------------------------------- the original trainer
ORIG_CONFIG = {"model": {"embed_dim": 3, "lossconfig": {"disc_start": 1001, "kl_weight": 1e-06,
                                                        "disc_weight": 0.5}},
               "trainer": {"gradient_accumulate_every": 1, "lr": 5e-06, "min_lr": 5e-07,
                           "train_num_steps": 3000, "log_freq": 100, "amp": False}}


def original_lr(config: dict, step: int, power: float = 0.95) -> float:
    tr = config["trainer"]
    return tr["lr"] * max((1 - step / tr["train_num_steps"]) ** power, tr["min_lr"])


def stamp(seconds: float) -> str:
    t = ORIG_T0 + dt.timedelta(seconds=seconds)
    return f"{t:%Y-%m-%d %H:%M:%S},{t.microsecond // 1000:03d}"


def orig_line(step: int, total: int, pairs: dict[str, float], seconds: float) -> str:
    body = "".join(f"{k}: {v:.5f}, " for k, v in pairs.items())
    return f"{stamp(seconds)} [Train Step] {step}/{total}: {body}"


def gen_pairs(step: int, lr: float, disc_start: int = 1001, frozen_logvar: bool = False) -> dict[str, float]:
    v = vae_values(step, step >= disc_start)
    return {"train/total_loss": v["total_loss"], "train/logvar": 0.0 if frozen_logvar else v["logvar"],
            "train/kl_loss": v["kl_loss"],
            "train/nll_loss": v["nll_loss"], "train/rec_loss": v["rec_loss"],
            "train/d_weight": v["d_weight"], "train/disc_factor": v["disc_factor"],
            "train/g_loss": v["g_loss"] if v["g_loss"] is not None else 0.0, "lr": lr}


def disc_pairs(step: int, lr: float) -> dict[str, float]:
    return {"train/disc_loss": 1.0 + 0.05 * math.sin(step / 7),
            "train/logits_real": 0.1 * math.cos(step / 5),
            "train/logits_fake": -0.1 * math.cos(step / 3), "lr": lr}


def original_log(path: Path, steps: list[int], config: Optional[dict] = ORIG_CONFIG,
                 disc_lines: bool = True, t0: float = 0.0, config_text: Optional[str] = None,
                 lr_fn: Optional[Callable[[int], float]] = None, stage: str = "vae",
                 frozen_logvar: bool = False) -> Path:
    """A log of the original trainer: the config dict as the first line, then one generator
    line per step (plus a discriminator line of the same step once disc_factor is 1)."""
    cfg = config or ORIG_CONFIG
    total = cfg["trainer"]["train_num_steps"]
    disc_start = cfg["model"]["lossconfig"]["disc_start"]
    out = []
    if config_text is not None:
        out.append(f"{stamp(t0)} {config_text}")
    elif config is not None:
        out.append(f"{stamp(t0)} {config!r}")
    for i, s in enumerate(steps):
        sec = t0 + 10.0 * (i + 1)
        lr = lr_fn(s) if lr_fn else original_lr(cfg, s, 0.95 if stage == "vae" else 0.96)
        if stage == "vae":
            out.append(orig_line(s, total, gen_pairs(s, lr, disc_start, frozen_logvar), sec))
            if disc_lines and s >= disc_start:
                out.append(orig_line(s, total, disc_pairs(s, lr), sec))
        else:
            loss = 0.05 + math.exp(-s / 400)
            out.append(orig_line(s, total, {"loss_simple": loss, "loss_vlb": loss / 100,
                                            "total_loss": loss * 1.01, "lr": lr}, sec))
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path
