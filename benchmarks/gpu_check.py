"""Check a GPU end to end: every stage of the toolkit on it, then the speed suite, in one command.

    python benchmarks/gpu_check.py                         # configs/m.yaml's models
    python benchmarks/gpu_check.py --out runs/gpu-check --skip-suite

Meant to take under 6 minutes on one GPU; it has not run on one yet (BENCHMARKS.md), so its
first run there gives its time. The steps are short; compiling takes most of the time, and
the suite's compiled stage-1 run finds the graphs ``stage1-compile`` compiled in the inductor
cache.

On its own small synthetic dataset (16 maps x 4 transmitters at the config's size, generated
under ``--out``), in fresh processes, with short schedules:

1. ``stage1-bf16``: ``train_vae.py`` in bf16 through ``disc_start`` (validation, checkpoints);
2. ``stage1-compile``: the same with ``compile: true``;
3. ``stage2-cache``: ``train_unified_prior.py`` on stage 1's VAE with the latent cache (the config's
   objective), through a validation;
4. ``objective-<name>``: each other stage-2 objective for a few steps;
5. ``sigterm-resume``: stage 1 stopped by SIGTERM mid-run (exit 3, a checkpoint), then
   ``--resume latest`` continues from that step;
6. ``evaluate`` (``--save-predictions``), ``predict`` (one test map), ``report`` (both runs);
7. ``suite``: ``bench.py --suite gpu`` at the config's full sizes (``--skip-suite``: not run).

Writes ``--out/gpu_check.md`` (a table of the steps, what each showed, the suite's table) and
``--out/gpu_check.json``; logs of every command under ``--out/logs``. Exits 0 when every step
passed, else 1 naming the first step that failed (the steps that need it are skipped, the
others still run). Without a CUDA GPU it says so in one line and exits 2.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lib.models.objectives import REGISTRY  # noqa: E402  (every objective, from its registry)

# Short schedules on small data; the models are the config's.
DATA = ["data.source=synthetic", "data.synthetic.num_maps=16", "data.synthetic.tx_per_map=4", "data.split=random",
        "data.train_maps=10", "data.val_maps=2", "data.test_maps=4", "data.tx_per_map=null", "data.cache=auto"]
STAGE1 = ["vae.train.max_steps=12", "vae.loss.disc_start=6", "vae.train.warmup_steps=0", "vae.train.log_every=2",
          "vae.train.val_every=6", "vae.train.checkpoint_every=6", "vae.train.val_batches=2"]
STAGE2 = ["prior.train.max_steps=6", "prior.train.warmup_steps=0", "prior.train.log_every=2",
          "prior.train.val_every=6", "prior.train.checkpoint_every=6", "prior.train.val_batches=1",
          "prior.train.batch_size=16", "prior.train.gradient_accumulation_steps=1", "prior.latent_scale_batches=2"]


@dataclass
class Step:
    name: str
    what: str
    run: Callable[["Check"], str]          # returns what it showed, one line; raises Failed
    needs: list[str] = field(default_factory=list)


class Failed(Exception):
    """A step's failure, one line."""


class Check:
    """The shared state of a check: where things go, the flags every command gets, the logs."""

    def __init__(self, out: Path, config: str, overrides: list[str]) -> None:
        self.out, self.config, self.overrides = out, config, overrides
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def flags(self, output_dir: str, *extra: str) -> list[str]:
        sets = [*DATA, f"data.root={self.out / 'data'}", f"output_dir={self.out / output_dir}", *extra, *self.overrides]
        return ["--config", self.config] + [x for s in sets for x in ("--set", s)]

    def command(self, name: str, argv: list[str], expect: int = 0, timeout: float = 900) -> subprocess.CompletedProcess:
        """``python *argv`` from the repository root, its output in ``logs/{name}.log``; it must exit
        with ``expect``."""
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
        (self.out / "logs" / f"{name}.log").write_text(f"$ python {' '.join(argv)}\n{r.stdout}{r.stderr}")
        if r.returncode != expect:
            last = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["no output"])[-1]
            raise Failed(f"python {argv[0]} exited {r.returncode} (expected {expect}): {last[:300]}")
        return r

    def records(self, run_dir: Path, split: Optional[str] = None) -> list[dict]:
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            raise Failed(f"{path} is missing")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if split is None or r["split"] == split]


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise Failed(message)


def _rate(records: list[dict]) -> str:
    rates = [r["steps_per_sec"] for r in records if r.get("steps_per_sec")]
    return f"{rates[-1]:.3g} steps/s" if rates else "no rate"


def _stage1(c: Check, name: str, extra: list[str]) -> str:
    c.command(name, ["train_vae.py", *c.flags(name, *STAGE1, *extra)])
    run = c.out / name / "vae"
    train, events = c.records(run, "train"), c.records(run, "event")
    _expect([r["step"] for r in train][-1] == 12, f"{run}: the last training record is not step 12")
    _expect(any(e["event"] == "disc_start" for e in events), f"{run}: no disc_start event")
    after = [r for r in train if r["step"] > 6]
    _expect(all((r.get("d_weight") or 0) > 0 and r.get("disc_loss") is not None for r in after),
            f"{run}: the discriminator did not train after disc_start")
    _expect(len(c.records(run, "val")) == 2, f"{run}: expected validations at steps 6 and 12")
    precision = json.loads((run / "run.json").read_text())["precision"]
    return (f"{precision['mixed_precision']} on {precision['device']}; disc_start at 6, d_weight "
            f"{after[-1]['d_weight']:.3g}; rec_loss {train[-1]['rec_loss']:.4g}; {_rate(train)}")


def stage1_bf16(c: Check) -> str:
    return _stage1(c, "stage1-bf16", ["vae.train.mixed_precision=bf16"])


def stage1_compile(c: Check) -> str:
    return _stage1(c, "stage1-compile", ["vae.train.mixed_precision=bf16", "vae.train.compile=true"])


def _vae_checkpoint(c: Check) -> str:
    return str(c.out / "stage1-bf16" / "vae" / "checkpoints" / "step-0000012")


def stage2_cache(c: Check) -> str:
    c.command("stage2-cache", ["train_unified_prior.py", *c.flags(
        "stage2-cache", *STAGE2, f"prior.vae_checkpoint={_vae_checkpoint(c)}", "prior.latent_cache=auto")])
    run = c.out / "stage2-cache" / "prior"
    log = (run / "train.log").read_text()
    _expect("prior.latent_cache: encoded" in log, f"{run}: the latent cache was not built")
    val = c.records(run, "val")
    _expect(len(val) == 1 and val[0].get("nmse") is not None, f"{run}: no validation at step 6")
    return f"latent cache built; val NMSE {val[0]['nmse']:.4g} (an untrained prior); {_rate(c.records(run, 'train'))}"


def objective(name: str) -> Callable[[Check], str]:
    def run(c: Check) -> str:
        step = f"objective-{name}"
        c.command(step, ["train_unified_prior.py", *c.flags(
            step, *STAGE2, f"prior.vae_checkpoint={_vae_checkpoint(c)}", f"prior.diffusion.objective={name}",
            "prior.train.max_steps=4", "prior.train.val_every=4", "prior.train.checkpoint_every=4")])
        run_dir = c.out / step / "prior"
        train = c.records(run_dir, "train")
        _expect(train[-1]["step"] == 4 and all(r["loss"] == r["loss"] for r in train), f"{run_dir}: no finite loss")
        return f"loss {train[-1]['loss']:.4g} at step 4; val NMSE {c.records(run_dir, 'val')[-1]['nmse']:.4g}"
    return run


def sigterm_resume(c: Check) -> str:
    """Stage 1 in the background until it has logged step 4, SIGTERM (exit 3 and a checkpoint),
    then ``--resume latest`` for four more steps."""
    name, run = "sigterm-resume", c.out / "sigterm-resume" / "vae"
    argv = ["train_vae.py", *c.flags(name, *STAGE1, "vae.train.max_steps=2000", "vae.train.log_every=1",
                                     "vae.train.checkpoint_every=1000", "vae.train.val_every=1000")]
    with open(c.out / "logs" / f"{name}-first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            path = run / "metrics.jsonl"
            if path.is_file() and any(r["step"] >= 4 for r in c.records(run, "train")):
                break
            time.sleep(0.2)
        _expect(proc.poll() is None, f"the run ended (exit {proc.returncode}) before it could be stopped")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=600)
    _expect(code == 3, f"SIGTERM: exit {code}, expected 3 (checkpoint and stop)")
    stopped = [e for e in c.records(run, "event") if e["event"] == "preempted"]
    _expect(len(stopped) == 1, f"{run}: no preempted event")
    at = stopped[0]["step"]
    _expect((run / "checkpoints" / f"step-{at:07d}").is_dir(), f"{run}: no checkpoint at the preempted step {at}")
    c.command(f"{name}-resumed", argv + ["--resume", "latest", "--until-step", str(at + 4)])
    steps = [r["step"] for r in c.records(run, "train")]
    _expect(steps[-5:] == [at, at + 1, at + 2, at + 3, at + 4] and steps.count(at + 1) == 1,
            f"{run}: the resumed run did not continue from step {at}: {steps[-6:]}")
    return f"stopped at step {at} (exit 3, checkpoint written); resumed to step {at + 4}"


def evaluate(c: Check) -> str:
    c.command("evaluate", ["evaluate.py", *c.flags("stage2-cache", "prior.train.batch_size=16"),
                           "--save-predictions", "--max-maps", "2"])
    ev = json.loads((c.out / "stage2-cache" / "eval" / "metrics.json").read_text())
    _expect((c.out / "stage2-cache" / "eval" / "predictions.npz").is_file(), "evaluate: no predictions.npz")
    return (f"{ev['num_samples']} samples: model NMSE {ev['model']['nmse']:.4g}, VAE ceiling "
            f"{ev['vae_ceiling']['nmse']:.4g}, {ev['model']['samples_per_sec']:.4g} samples/s")


def predict(c: Check) -> str:
    ckpt = c.out / "stage2-cache" / "prior" / "checkpoints" / "step-0000006"
    split = json.loads((c.out / "stage2-cache" / "prior" / "run.json").read_text())["split"]
    test_map = split["test"][0] if isinstance(split.get("test"), list) else 0
    sims = json.loads((ckpt / "trainer_state.json").read_text()).get("simulations") or ["DPM"]
    c.command("predict", ["predict.py", "--checkpoint", str(ckpt), "--root", str(c.out / "data"), "--maps",
                          str(test_map), "--simulation", sims[0], "--out", str(c.out / "predict")])
    pngs = sorted((c.out / "predict").rglob("*.png"))
    _expect(len(pngs) >= 1, "predict: no maps written")
    return f"{len(pngs)} maps of city {test_map} ({sims[0]})"


def report(c: Check) -> str:
    for stage, run in (("vae", "stage1-bf16"), ("prior", "stage2-cache")):
        c.command(f"report-{stage}", ["report.py", str(c.out / run / stage)])
    return "both runs reported"


def suite(c: Check) -> str:
    c.command("suite", ["bench.py", "--suite", "gpu", "--config", c.config, "--json", str(c.out / "suite.json"),
                        *[x for o in c.overrides for x in ("--set", o)]], timeout=1800)
    result = json.loads((c.out / "suite.json").read_text())
    _expect(not result.get("failed"), f"suite: failed runs: {', '.join(result.get('failed', []))}")
    return f"{sum(len(v) for v in result['results'].values())} runs in {result['seconds']:.0f} s"


STEPS = [
    Step("stage1-bf16", "stage 1 in bf16 through disc_start", stage1_bf16),
    Step("stage1-compile", "stage 1 in bf16 with compile through disc_start", stage1_compile),
    Step("stage2-cache", "stage 2 on the latent cache, through a validation", stage2_cache, ["stage1-bf16"]),
    *[Step(f"objective-{o}", f"stage 2 with objective {o}", objective(o), ["stage1-bf16"]) for o in REGISTRY],
    Step("sigterm-resume", "SIGTERM, then --resume latest", sigterm_resume),
    Step("evaluate", "evaluate.py --save-predictions", evaluate, ["stage2-cache"]),
    Step("predict", "predict.py on a test map", predict, ["stage2-cache"]),
    Step("report", "report.py on both runs", report, ["stage1-bf16", "stage2-cache"]),
    Step("suite", "bench.py --suite gpu", suite),
]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/m.yaml", help="the models and precision to check (default m.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides for every step")
    p.add_argument("--out", default="runs/gpu-check", help="a new folder for the runs, logs and the summary")
    p.add_argument("--only", default=None, metavar="STEP,...", help="run these steps only")
    p.add_argument("--skip-suite", action="store_true", help="leave out bench.py --suite gpu")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)      # the tests' tiny runs
    a = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available() and not a.allow_cpu:
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a machine with "
              "one", file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    if out.exists():
        print(f"gpu_check: --out {out} exists; pass a new folder (nothing is overwritten)", file=sys.stderr)
        return 2
    names = [s.name for s in STEPS]
    chosen = names if a.only is None else a.only.split(",")
    unknown = [n for n in chosen if n not in names]
    if unknown:
        print(f"gpu_check: --only {','.join(unknown)}: no such step; the steps are {', '.join(names)}", file=sys.stderr)
        return 2
    if a.skip_suite or not torch.cuda.is_available():
        chosen = [n for n in chosen if n != "suite"]
    check = Check(out, a.config, a.set)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (--allow-cpu)"
    results, t_start = [], time.perf_counter()
    for step in STEPS:
        if step.name not in chosen:
            continue
        missing = [n for n in step.needs if n in chosen and next(r for r in results if r["step"] == n)["status"] != "passed"]
        row = {"step": step.name, "what": step.what, "status": "skipped", "seconds": 0.0,
               "result": f"needs {', '.join(missing)}"}
        if not missing:
            print(f"gpu_check: {step.name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                row.update(status="passed", result=step.run(check))
            except (Failed, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as exc:
                row.update(status="FAILED", result=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"gpu_check: {step.name} {row['status']} in {row['seconds']:.0f} s: {row['result']}", flush=True)
        results.append(row)
    failed = [r for r in results if r["status"] == "FAILED"]
    summary = {"gpu": gpu, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
               "config": a.config, "overrides": a.set, "seconds": round(time.perf_counter() - t_start, 1),
               "steps": results, "first_failure": failed[0]["step"] if failed else None}
    suite_json = out / "suite.json"
    if suite_json.is_file():
        summary["suite"] = json.loads(suite_json.read_text())
    lines = [f"# GPU check: {gpu}, torch {torch.__version__}, {summary['date']}", "",
             f"`python benchmarks/gpu_check.py --config {a.config}` on its own synthetic data; "
             f"{summary['seconds']:.0f} s in all.", "",
             "| step | what | status | seconds | result |", "|---|---|---|---|---|",
             *(f"| {r['step']} | {r['what']} | {r['status']} | {r['seconds']:.0f} | {r['result']} |" for r in results)]
    if "suite" in summary:
        lines += ["", "## bench.py --suite gpu", "", summary["suite"]["table"]]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))
    if failed:
        print(f"gpu_check: FAILED at {failed[0]['step']}: {failed[0]['result']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
