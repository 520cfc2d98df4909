"""Export a trained stage-2 checkpoint as a diffusers pipeline folder with a model card.

    python -m lib.export --checkpoint runs/m/prior/checkpoints/step-0050000 --out models/radiomap-dpm

The folder (``save_pretrained``: safetensors weights, JSON configs, ``model_index.json``) loads
with ``RadioMapPipeline.from_pretrained(folder)`` (lib/evaluation/pipeline.py: the VAE, the UNet with the
EMA weights when the run kept them, the condition encoder, the objective's scheduler) and holds a
model card, ``README.md``: the data, the split, the threshold, the metric convention, the
evaluation of this checkpoint when ``{output_dir}/eval/metrics.json`` is one (or
``--evaluation``), and the resolved config. It is written whole or not at all, into a new or
empty folder, ready to upload to a model hub as it is (loading it needs this toolkit's
``lib/evaluation/pipeline.py``, as the card says).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import yaml

from lib.errors import UserError, run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a stage-2 checkpoint folder (step-N)")
    p.add_argument("--out", required=True, metavar="FOLDER", help="a new or empty folder for the pipeline")
    p.add_argument("--evaluation", metavar="JSON", default=None,
                   help="evaluate.py's metrics.json for the card (default: {output_dir}/eval/metrics.json of the "
                        "checkpoint's run, when it evaluated this checkpoint)")
    return p


def _cell(d: dict, k: str) -> str:
    return f"{d[k]:.4g} ± {d[k + '_std']:.4g}"


def _measurements(prior: dict) -> str:
    m = prior.get("measurements") or {}
    if m.get("count") is None:
        return "none (a map from the environment alone)"
    return (f"trained with {m['count']} measured pixels outside buildings per map (value and mask channels; "
            f"`predict.py --measurements FILE`), {'corrected near them' if m.get('correct') else 'no correction'}")


def model_card(name: str, state: dict, cfg: dict, evaluation: Optional[dict]) -> str:
    """The model card (``README.md``) of an exported pipeline."""
    data, prior = cfg["data"], cfg["prior"]
    split = state.get("split") or {}
    diffusion = prior["diffusion"]
    lines = ["---", "library_name: diffusers", "tags:", "- radio-map", "- pathloss", "- radiomapseer",
             "- latent-diffusion", f"- {diffusion['objective']}", "---", "",
             f"# {name}", "",
             f"A stage-2 radio-map prior trained with radiodiff-train (`train_unified_prior.py`): from a city's "
             f"building map and a transmitter's position it predicts the {', '.join(state['simulations'])} radio map "
             f"(pathloss as RadioMapSeer's gray levels), through the stage-1 VAE it carries. Objective "
             f"`{diffusion['objective']}`, {diffusion['num_inference_steps']} sampling step(s) by default.", "",
             "## Use", "",
             "```python",
             "import numpy as np",
             "from lib.evaluation.pipeline import RadioMapPipeline      # radiodiff-train's lib/ on the Python path",
             "",
             f'pipe = RadioMapPipeline.from_pretrained("{name}")',
             f"buildings = np.zeros(({data['image_size']}, {data['image_size']}), np.uint8)   # 255 = building",
             f"maps = pipe(buildings, [(40, 60)], simulation={state['simulations'][0]!r})   # (1, S, S), gray levels in [0, 1]",
             "```", "",
             "`python predict.py --checkpoint FOLDER ...` runs the same pipeline on PNG files.", "",
             "## Data", "",
             f"- source: {data['source']} (`{Path(str(data['root'])).name}`), simulations {', '.join(state['simulations'])}, "
             f"{data['image_size']}x{data['image_size']} px",
             f"- split: `{split.get('name', 'unknown')}` ({len(split.get('train', []))} training, "
             f"{len(split.get('val', []))} validation, {len(split.get('test', []))} test maps)",
             f"- threshold: {data['threshold']} (RadioUNet's noise floor; 0: none), cars as an input: {data['cars_input']}",
             f"- stage-1 VAE: `{state.get('vae_checkpoint')}` (step {state.get('vae_step')}), latent scale "
             f"{state.get('latent_scale'):.6g}",
             f"- stage 2: {state['step']} optimizer steps, {'EMA' if prior['train'].get('ema') else 'raw'} weights",
             f"- measurements: {_measurements(prior)}",
             f"- decibels: gray 0 is {data.get('db_range', [-127, -47])[0]} dB, gray 255 "
             f"{data.get('db_range', [-127, -47])[1]} dB (`data.db_range`; `predict.py --units db`)", "",
             "## Metric convention", "",
             "Maps are gray levels in [0, 1] (RadioMapSeer's PNG value / 255). Metrics per map (map x transmitter "
             "x simulation), then mean ± std over maps (RadioDiff's convention: NMSE, RMSE, SSIM, PSNR with data "
             "range 1); NMSE_set and RMSE_set over every pixel of the set (RadioUNet's).", "",
             "## Evaluation", ""]
    if evaluation is None:
        lines.append("Not evaluated: run `python evaluate.py --config ... --checkpoint THIS` and export again.")
    else:
        p = evaluation["protocol"]
        lines += [f"{evaluation['split']} split `{p['split']}`, {p['maps']} maps, {evaluation['num_samples']} samples; "
                  f"{evaluation['sampler']} sampler, {evaluation['num_inference_steps']} step(s):", "",
                  "| method | NMSE | RMSE | SSIM | PSNR (dB) | NMSE_set | RMSE_set |", "|---|---|---|---|---|---|---|"]
        for key, title in (("model", "this model"), ("vae_ceiling", "VAE round trip (ceiling)"),
                           ("distance_baseline", "distance only")):
            d = evaluation[key]
            lines.append(f"| {title} | " + " | ".join(_cell(d, m) for m in ("nmse", "rmse", "ssim", "psnr"))
                         + f" | {d['nmse_set']:.4g} | {d['rmse_set']:.4g} |")
    lines += ["", "## Config", "", "The resolved training config:", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; pass a new one (nothing is overwritten)")
    import torch

    from lib.evaluation.pipeline import pipeline_from_checkpoint
    from lib.outputs import StagedFolder
    pipe = pipeline_from_checkpoint(Path(args.checkpoint), torch.device("cpu"))
    folder = Path(args.checkpoint)
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    cfg: dict[str, Any] = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    evaluation = None
    eval_path = Path(args.evaluation) if args.evaluation else Path(cfg["output_dir"]) / "eval" / "metrics.json"
    if eval_path.is_file():
        found = json.loads(eval_path.read_text(encoding="utf-8"))
        if Path(found["checkpoints"]["prior"]).resolve() == folder.resolve():
            evaluation = found
        elif args.evaluation:
            raise UserError(f"--evaluation {eval_path}: evaluates {found['checkpoints']['prior']}, not {folder}")
    with StagedFolder(out, "export") as work:
        pipe.save_pretrained(str(work), safe_serialization=True)
        (work / "README.md").write_text(model_card(out.name, state, cfg, evaluation), encoding="utf-8")
    print(f"wrote {out} (RadioMapPipeline.from_pretrained loads it; model card {out / 'README.md'}"
          f"{', with the evaluation of ' + str(eval_path) if evaluation else ', not evaluated'})")
    return 0


if __name__ == "__main__":
    run_cli(main)
