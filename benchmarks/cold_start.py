"""Cold start (not a test): a fresh process, from its start to the PNG on disk, for
``sd-generate`` on an SD 1.5 single file of random weights, against diffusers'
``StableDiffusionPipeline.from_single_file`` + the same generation and ``image.save``.

    python benchmarks/cold_start.py                          512 px, 20 DDIM steps (long)
    python benchmarks/cold_start.py --size 128 --steps 1 --rounds 3   load-dominated: a smoke run

Each round starts one process per side, alternating (the page cache is warm for both after the
first: the file was read before; what is measured is import, load, sampling, decode, write).
Each side reports, from its own clock, when it had the model loaded and when the PNG was
written, so "load" (process start to a ready pipeline, imports included) is apart from the
rest. Both use the same file (run.py's random SD 1.5 weights, made here if missing), DDIM with
SD 1.x's schedule, CFG 7.5, one image, 2 torch threads.

diffusers reads its components' configs from a local folder written here (``config=``: the
model's shapes, no weights), since nothing may be fetched from the Hub.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import _machine, _versions

HERE = Path(__file__).resolve().parent
PROMPT = "a red circle above a blue square"

DIFFUSERS = r"""
import time, sys, json
t0 = float(sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[6]))
from diffusers import DDIMScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_single_file(sys.argv[2], config=sys.argv[3],
    local_files_only=True, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
loaded = time.time() - t0
size, steps = int(sys.argv[4]), int(sys.argv[5])
image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(sys.argv[7])
print(json.dumps({"loaded": loaded, "done": time.time() - t0}))
""".replace("PROMPT", repr(PROMPT))

OURS = r"""
import time, sys, json
t0 = float(sys.argv[1])
from sd_pipeline import cli, pipeline
marks = {}
real = pipeline.StableDiffusion.from_checkpoint.__func__
def timed(cls, *args, **kwargs):
    pipe = real(cls, *args, **kwargs)
    marks["loaded"] = time.time() - t0
    return pipe
pipeline.StableDiffusion.from_checkpoint = classmethod(timed)
code = cli.main(sys.argv[2:])
marks["done"] = time.time() - t0
print(json.dumps(marks))
sys.exit(code)
"""


def diffusers_config_folder(folder: Path) -> Path:
    """A diffusers model root of SD 1.5's configs (no weights), for ``from_single_file``."""
    if (folder / "model_index.json").exists():
        return folder
    import diffusers
    import transformers
    from run import _configs

    from sd_clip import CLIPTokenizer
    from sd_unet.weights import diffusers_config as unet_config
    from sd_vae.weights import diffusers_config as vae_config

    vae, _, unet = _configs("full")
    folder.mkdir(parents=True, exist_ok=True)
    for name, cls, config in (("unet", diffusers.UNet2DConditionModel, unet_config(unet)),
                              ("vae", diffusers.AutoencoderKL, vae_config(vae))):  # fmt: skip
        (folder / name).mkdir(exist_ok=True)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        (folder / name / "config.json").write_text(
            json.dumps({"_class_name": cls.__name__, **config}, indent=2))  # fmt: skip
    # the text encoder: CLIP ViT-L/14's config in transformers' terms
    transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    ).save_pretrained(folder / "text_encoder")  # fmt: skip
    words = folder / "tokenizer-files"
    CLIPTokenizer().save(words)
    transformers.CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"),
                               model_max_length=77).save_pretrained(folder / "tokenizer")  # fmt: skip
    diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    ).save_config(folder / "scheduler")  # fmt: skip
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def run_side(side: str, opts, weights: Path, config: Path, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
    start = time.time()
    if side == "ours":
        argv = [PROMPT, "--checkpoint", str(weights), "--steps", str(opts.steps), "--width",
                str(opts.size), "--height", str(opts.size), "--sampler", "ddim", "--cfg", "7.5",
                "--seed", "0", "-o", str(out), "--overwrite", "--no-progress"]  # fmt: skip
        cmd = [sys.executable, "-c", OURS, repr(start), *argv]
    else:
        cmd = [sys.executable, "-c", DIFFUSERS, repr(start), str(weights), str(config),
               str(opts.size), str(opts.steps), str(opts.threads), str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if done.returncode or not out.exists():
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall": wall, **marks}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results")
    opts = p.parse_args(argv)
    work = Path(tempfile.gettempdir()) / "sd-benchmarks"
    weights = work / "sd15-full-random.safetensors"
    if not weights.exists():
        from run import _checkpoint_prepare

        _checkpoint_prepare(work, argparse.Namespace(size="full"))
    config = diffusers_config_folder(work / "diffusers-sd15-config")
    load = [os.getloadavg()[0]]
    runs = {"ours": [], "diffusers": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.rounds):
            for side in ("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours"):
                r = run_side(side, opts, weights, config, Path(tmp) / f"{side}.png")
                runs[side].append(r)
                print(f"round {i + 1}/{opts.rounds} {side}: loaded at {r['loaded']:.2f} s, PNG "
                      f"at {r['done']:.2f} s (wall {r['wall']:.2f} s)", flush=True)  # fmt: skip
    load.append(os.getloadavg()[0])
    summary = {"benchmark": "cold_start", "image": opts.size, "steps": opts.steps,
               "date": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(),
               "versions": _versions(), "threads": opts.threads, "rounds": opts.rounds,
               "load_average": load, "runs": runs}  # fmt: skip
    opts.out.mkdir(parents=True, exist_ok=True)
    name = f"cold_start-{opts.size}px-{opts.steps}steps"
    (opts.out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (opts.out / f"{name}.md").write_text(markdown(summary))
    print(markdown(summary))


def markdown(s: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in s["versions"].items() if v)
    lines = [
        f"# cold_start: process start to PNG, {s['image']} px, {s['steps']} DDIM steps", "",
        f"{s['date']}; {s['machine']}; {versions}; {s['threads']} threads; SD 1.5 single file "
        f"of random weights; {s['rounds']} rounds, a fresh process per side and round, sides "
        f"alternating. Load average {s['load_average'][0]:.1f} at the start, "
        f"{s['load_average'][1]:.1f} at the end (the benchmark's own {s['threads']} threads "
        "count in it; more is other work on the machine): read the ratios.", "",
        "| side | loaded (median, min-max) | PNG written (median, min-max) | load ratio | "
        "PNG ratio | per-round PNG ratios |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    med = {side: {k: statistics.median(r[k] for r in runs) for k in ("loaded", "done")}
           for side, runs in s["runs"].items()}  # fmt: skip
    for side, runs in s["runs"].items():
        per_round = ", ".join(f"{a['done'] / b['done']:.3f}"
                              for a, b in zip(runs, s["runs"]["diffusers"]))  # fmt: skip
        loaded, done = [r["loaded"] for r in runs], [r["done"] for r in runs]
        lines.append(
            f"| {side} | {med[side]['loaded']:.2f} s ({min(loaded):.2f}-{max(loaded):.2f}) | "
            f"{med[side]['done']:.2f} s ({min(done):.2f}-{max(done):.2f}) | "
            f"{med[side]['loaded'] / med['diffusers']['loaded']:.3f} | "
            f"{med[side]['done'] / med['diffusers']['done']:.3f} | {per_round} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
