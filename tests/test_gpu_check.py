"""benchmarks/gpu_check.py on the CPU, as far as the CPU allows: its steps on a tiny config (the
compile step and the suite need more than a test's time or a GPU; tests/test_accel.py compiles),
its summary, the first failure named with the steps that need it skipped, and its one-line
refusal without a GPU."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from tests.helpers import ROOT, TINY_PRIOR, reset_accelerate, tiny_config


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module                      # (its dataclasses look it up)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_in_one_line(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a machine "
                   "with one"]
    assert not (tmp_path / "out").exists()


def test_steps_run_and_the_summary_says_what_each_showed(gpu_check, tmp_path, tiny_data, capsys):
    cfg = tiny_config(tmp_path, tiny_data, prior=dict(TINY_PRIOR))
    out = tmp_path / "check"
    steps = ["stage1-bf16", "stage2-cache", "objective-flow", "sigterm-resume", "evaluate", "predict", "report"]
    reset_accelerate()
    assert gpu_check.main(["--config", str(cfg), "--out", str(out), "--allow-cpu", "--only", ",".join(steps)]) == 0
    summary = json.loads((out / "gpu_check.json").read_text())
    assert [r["step"] for r in summary["steps"]] == steps
    assert all(r["status"] == "passed" for r in summary["steps"]) and summary["first_failure"] is None
    result = {r["step"]: r["result"] for r in summary["steps"]}
    assert result["stage1-bf16"].startswith("bf16 on cpu; disc_start at 6, d_weight")
    assert result["stage2-cache"].startswith("latent cache built; val NMSE")
    assert result["sigterm-resume"].startswith("stopped at step ") and "(exit 3, checkpoint written)" in result["sigterm-resume"]
    ev = json.loads((out / "stage2-cache" / "eval" / "metrics.json").read_text())
    assert f"model NMSE {ev['model']['nmse']:.4g}" in result["evaluate"]
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("# GPU check: no GPU (--allow-cpu), torch ")
    assert all(f"| {s} | " in table for s in steps) and table in capsys.readouterr().out
    assert (out / "logs" / "stage1-bf16.log").read_text().startswith("$ python train_vae.py --config ")


def test_the_first_failure_is_named_and_what_needs_it_is_skipped(gpu_check, tmp_path, tiny_data, capsys):
    cfg = tiny_config(tmp_path, tiny_data, prior=dict(TINY_PRIOR))
    out = tmp_path / "check"
    # stage 2 without stage 1: no VAE to train on
    assert gpu_check.main(["--config", str(cfg), "--out", str(out), "--allow-cpu", "--only", "stage2-cache,evaluate"]) == 1
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["first_failure"] == "stage2-cache"
    assert [(r["step"], r["status"]) for r in summary["steps"]] == [("stage2-cache", "FAILED"), ("evaluate", "skipped")]
    assert summary["steps"][1]["result"] == "needs stage2-cache"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpu_check: FAILED at stage2-cache: python train_unified_prior.py exited 2 (expected 0): ")
    assert gpu_check.main(["--out", str(out), "--allow-cpu"]) == 2                # nothing is overwritten
    assert gpu_check.main(["--out", str(tmp_path / "x"), "--allow-cpu", "--only", "stage3"]) == 2
    assert "--only stage3: no such step" in capsys.readouterr().err
