"""Side-by-side timings against the reference implementations (not tests).

    python benchmarks/run.py --list                 the registered benchmarks
    python benchmarks/run.py --only unet            one (or several: --only unet vae)
    python benchmarks/run.py --only unet --rounds 3 --repeat 2 --threads 2
    python benchmarks/run.py --size tiny --rounds 1      everything, on tiny models (a check)
    python benchmarks/run.py --markdown                 the latest results as one table

Every benchmark has two or more *sides* (ours, diffusers, ...). Each side runs in its own
subprocess (so its peak memory is its own), and the sides alternate round by round, so that
whatever else the machine is doing weighs on both alike: compare the ratio, not the seconds.
Results go to benchmarks/results/<name>.json and .md.

Adding a benchmark: write a function ``prepare(workdir, opts) -> dict`` that makes what every side
needs (weights on disk, say) and one ``side(args) -> callable`` per side that loads its model
and returns the zero-argument function to time; register them with ``register(...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass
class Benchmark:
    name: str
    description: str
    prepare: callable  # (workdir: Path, opts) -> dict of JSON-able arguments for the sides
    sides: dict[str, callable] = field(default_factory=dict)  # side -> (args) -> fn to time
    baseline: str = "diffusers"  # the side the ratio is taken against
    flops: callable | None = None  # (args) -> FLOPs of one call: GFLOP/s and share of the peak
    images: int = 0  # images made per call: images/s too
    compiled: callable | None = None  # the "ours-compiled" side (torch.compile), with --compile
    sdcpp: dict[str, callable] = field(default_factory=dict)  # stable-diffusion.cpp, with --sdcpp

    def side_names(self, compile: bool = False, sdcpp: bool = False) -> list[str]:
        return [
            *self.sides,
            *(["ours-compiled"] if compile and self.compiled else []),
            *(self.sdcpp if sdcpp else []),
        ]

    def side(self, name: str) -> callable:
        if name == "ours-compiled":
            return self.compiled
        return self.sdcpp[name] if name in self.sdcpp else self.sides[name]


REGISTRY: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    REGISTRY[benchmark.name] = benchmark
    return benchmark


# ---------------------------------------------------------------------------------------------
# The shared checkpoint: our three models with random weights, in one SD single file. Each
# reference reads its part from that file with diffusers' own single-file converters
# (transformers' CLIP takes the keys as they are), so nothing of ours converts what it is
# compared against.

PROMPT = "a red circle above a blue square"
# Per --size: latent side of the UNet and VAE inputs, and the txt2img image side by default.
SIZES = {"full": {"latent": 64, "image": 512}, "tiny": {"latent": 8, "image": 64}}


def _configs(size: str):
    """(vae, text, unet) configs: SD 1.5's, or each package's tiny() joined up (the UNet's
    context is the text width; 8 heads, which a single file does not record)."""
    import dataclasses

    from sd_clip import CLIPTextConfig
    from sd_unet import UNetConfig
    from sd_vae import AutoencoderKLConfig

    if size == "full":
        return AutoencoderKLConfig.sd15(), CLIPTextConfig.sd15(), UNetConfig.sd15()
    text = CLIPTextConfig.tiny()
    unet = dataclasses.replace(UNetConfig.tiny(), context_dim=text.width, num_heads=8)
    return AutoencoderKLConfig.tiny(), text, unet


def _random_state(model, seed: int) -> dict:
    """Random weights for a model built on the meta device: matrices and kernels scaled by
    1/sqrt(fan-in) (no zero output layers), norm scales 1, other vectors small."""
    import torch

    g = _generator(seed)
    state = {}
    for name, p in model.state_dict().items():
        if p.dim() > 1:
            state[name] = torch.randn(p.shape, generator=g) * (1 / p[0].numel()) ** 0.5
        elif name.endswith("weight"):  # GroupNorm, LayerNorm scales
            state[name] = torch.ones(p.shape)
        else:
            state[name] = torch.randn(p.shape, generator=g) * 0.01
    return state


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _checkpoint_prepare(workdir: Path, opts) -> dict:
    """Write (once, cached) the SD single file and a tokenizer folder for the references."""
    import torch

    from sd_clip import CLIPTextModel, CLIPTokenizer
    from sd_pipeline.files import save_safetensors
    from sd_pipeline.single_file import PREFIXES
    from sd_unet import UNet
    from sd_vae import AutoencoderKL

    size = opts.size
    path = workdir / f"sd15-{size}-random.safetensors"
    tokenizer = workdir / "tokenizer"
    if not (tokenizer / "merges.txt").exists():
        CLIPTokenizer().save(tokenizer)
    if not path.exists():
        state = {}
        for seed, (key, cls, config) in enumerate(
            zip(
                ("vae", "text_encoder", "unet"),
                (AutoencoderKL, CLIPTextModel, UNet),
                _configs(size),
            )
        ):
            with torch.device("meta"):
                model = cls(config)
            part = _random_state(model, seed)
            state.update({PREFIXES[key] + k: v for k, v in part.items()})
            del model, part
        save_safetensors(state, path, {"format": "pt"})
        del state
    return {"weights": str(path), "tokenizer": str(tokenizer), "size": size}


def _read_part(path: str, part: str) -> dict:
    """The tensors of one part of the SD file, keys as stored (prefix included)."""
    from safetensors import safe_open

    from sd_pipeline.single_file import PREFIXES

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIXES[part])}


def _meta_build(build, state: dict):
    """Build a reference model on the meta device and give it ``state`` (strictly)."""
    import torch

    with torch.device("meta"):
        model = build()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _reference_unet(args: dict):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from sd_unet.weights import diffusers_config

    config = {k: v for k, v in diffusers_config(_configs(args["size"])[2]).items() if k[0] != "_"}
    state = convert_ldm_unet_checkpoint(_read_part(args["weights"], "unet"), config)
    return _meta_build(lambda: UNet2DConditionModel(**config), state)


def _reference_vae(args: dict):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from sd_vae.weights import diffusers_config

    config = {k: v for k, v in diffusers_config(_configs(args["size"])[0]).items() if k[0] != "_"}
    state = convert_ldm_vae_checkpoint(_read_part(args["weights"], "vae"), config)
    return _meta_build(lambda: AutoencoderKL(**config), state)


def _reference_text(args: dict):
    import torch
    import transformers

    c = _configs(args["size"])[1]
    config = transformers.CLIPTextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.width,
        intermediate_size=c.mlp_width,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        max_position_embeddings=c.max_positions,
        hidden_act=c.activation,
        layer_norm_eps=c.layer_norm_eps,
    )
    with torch.device("meta"):
        names = set(transformers.CLIPTextModel(config).state_dict())
    from sd_pipeline.single_file import PREFIXES

    state = {}
    for key, value in _read_part(args["weights"], "text_encoder").items():
        key = key.removeprefix(PREFIXES["text_encoder"])
        state[key if key in names else key.removeprefix("text_model.")] = value  # transformers 5
    # position_ids, a buffer the file does not carry: in the state dict where transformers
    # keeps it there (a strict load needs it), else set on the module (.to() refuses meta)
    positions = torch.arange(c.max_positions)[None]
    for key in names - state.keys():
        if key.endswith("position_ids"):
            state[key] = positions
    model = _meta_build(lambda: transformers.CLIPTextModel(config), state)
    for module in model.modules():
        if getattr(module, "position_ids", None) is not None and module.position_ids.is_meta:
            module.position_ids = positions
    return model


def _dtype(args: dict):
    import torch

    return getattr(torch, args.get("dtype", "float32"))


def _device(args: dict) -> str:
    return args.get("device", "cpu")


def _target(args: dict) -> dict:
    """``dtype=`` and ``device=`` of the run, for our loaders and ``.to()``."""
    return {"dtype": _dtype(args), "device": _device(args)}


def _place(model, args: dict):
    """A reference model on the run's device, in its dtype (ours load straight there)."""
    return model.to(**_target(args))


def _put(tensor, args: dict):
    """An input on the run's device; floating-point ones in its dtype."""
    if tensor.is_floating_point():
        return tensor.to(**_target(args))
    return tensor.to(_device(args))


def _latents(args: dict, batch: int = 1, channels: int = 4):
    import torch

    side = SIZES[args["size"]]["latent"]
    return torch.randn(batch, channels, side, side, generator=_generator(1))


# ---------------------------------------------------------------------------------------------
# UNet: one forward of the SD 1.5 UNet, batch 2, 4x64x64 latents, 77x768 context, float32


def _unet_inputs(args: dict):
    import torch

    config = _configs(args["size"])[2]
    x = _latents(args, batch=2)
    context = torch.randn(2, 77, config.context_dim, generator=_generator(2))
    return x, torch.full((2,), 500.0), context


def _unet_ours(args: dict, compile: bool = False):
    import torch

    from sd_unet import UNet, compile_frozen

    model = UNet.from_checkpoint(args["weights"], **_target(args))
    if compile:  # what StableDiffusion.compile does; compiled in the warm-up call
        model = compile_frozen(model)
    x, t, c = (_put(a, args) for a in _unet_inputs(args))

    def run():
        with torch.inference_mode():
            return model(x, t, c)

    return run


def _unet_ours_compiled(args: dict):
    return _unet_ours(args, compile=True)


def _unet_diffusers(args: dict):
    import torch

    model = _place(_reference_unet(args), args)
    x, t, c = (_put(a, args) for a in _unet_inputs(args))

    def run():
        with torch.inference_mode():
            return model(x, t, c).sample

    return run


def _unet_flops(args: dict) -> float:
    """FLOPs of one call (torch.utils.flop_counter), counted on the meta device."""
    import torch

    from sd_unet import UNet

    with torch.device("meta"):
        model = UNet(_configs(args["size"])[2])
        inputs = [t.to("meta") for t in _unet_inputs(args)]
    return _count_flops(lambda: model(*inputs))


def _count_flops(fn) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# CLIP text encoder: batch 2 x 77 tokens (a prompt and its negative, as CFG runs it)


def _clip_ids():
    import torch

    return torch.randint(0, 49408, (2, 77), generator=_generator(3))


def _clip_ours(args: dict):
    import torch

    from sd_clip import CLIPTextModel

    model = CLIPTextModel.from_checkpoint(args["weights"], **_target(args))
    ids = _put(_clip_ids(), args)

    def run():
        with torch.inference_mode():
            return model(ids)

    return run


def _clip_transformers(args: dict):
    import torch

    model = _place(_reference_text(args), args)
    ids = _put(_clip_ids(), args)

    def run():
        with torch.inference_mode():
            return model(input_ids=ids).last_hidden_state

    return run


# ---------------------------------------------------------------------------------------------
# VAE: decode 1x4x64x64 latents to a 512x512 image, encode a 512x512 image, float32


def _image(args: dict):
    import torch

    side = SIZES[args["size"]]["latent"] * 8
    return torch.rand(1, 3, side, side, generator=_generator(4)) * 2 - 1


def _vae_decode_ours(args: dict):
    import torch

    from sd_vae import AutoencoderKL

    model = AutoencoderKL.from_checkpoint(args["weights"], **_target(args))
    z = _put(_latents(args), args)

    def run():
        with torch.inference_mode():
            return model.decode(z)

    return run


def _vae_decode_diffusers(args: dict):
    import torch

    model = _place(_reference_vae(args), args)
    z = _put(_latents(args), args)

    def run():
        with torch.inference_mode():
            return model.decode(z).sample

    return run


def _vae_decode_flops(args: dict) -> float:
    import torch

    from sd_vae import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(_configs(args["size"])[0])
        z = _latents(args).to("meta")
    return _count_flops(lambda: model._decode(z, banded=False))


def _vae_encode_ours(args: dict):
    import torch

    from sd_vae import AutoencoderKL

    model = AutoencoderKL.from_checkpoint(args["weights"], **_target(args))
    x = _put(_image(args), args)

    def run():
        with torch.inference_mode():
            return model.encode(x).mean

    return run


def _vae_encode_diffusers(args: dict):
    import torch

    model = _place(_reference_vae(args), args)
    x = _put(_image(args), args)

    def run():
        with torch.inference_mode():
            return model.encode(x).latent_dist.mean

    return run


# ---------------------------------------------------------------------------------------------
# txt2img: the whole pipeline, 20 DDIM steps with classifier-free guidance (7.5), one image,
# PIL out. The image side is --txt2img-size (default 512 at full size, 64 at tiny).


def _txt2img_prepare(workdir: Path, opts) -> dict:
    image = opts.txt2img_size or SIZES[opts.size]["image"]
    return {**_checkpoint_prepare(workdir, opts), "image": image}


def _txt2img_ours(args: dict, compile: bool = False):
    from sd_pipeline import StableDiffusion

    side = args["image"]
    pipe = StableDiffusion.from_checkpoint(args["weights"], native_size=side, **_target(args))
    if compile:  # compiled here, by a one-step generation of the same shapes: not timed
        pipe.compile().txt2img(PROMPT, steps=1, seed=0, width=side, height=side, progress=False)

    def run():
        return pipe.txt2img(PROMPT, steps=20, guidance_scale=7.5, sampler="ddim", seed=0,
                            width=side, height=side, progress=False)  # fmt: skip

    return run


def _txt2img_ours_compiled(args: dict):
    return _txt2img_ours(args, compile=True)


def _txt2img_diffusers(args: dict):
    import transformers
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    side = args["image"]
    folder = Path(args["tokenizer"])
    tokenizer = transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )
    pipe = StableDiffusionPipeline(
        vae=_reference_vae(args),
        text_encoder=_reference_text(args),
        tokenizer=tokenizer,
        unet=_reference_unet(args),
        scheduler=DDIMScheduler(  # SD 1.x's schedule, as the original DDIM sampler runs it
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing="leading",
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = pipe.to(_device(args), _dtype(args))
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(PROMPT, num_inference_steps=20, guidance_scale=7.5, height=side, width=side,
                    generator=_generator(0)).images  # fmt: skip

    return run


def _txt2img_sdcpp(weight_type: str):
    """stable-diffusion.cpp (through stable-diffusion-cpp-python, built from source: optional,
    `pip install stable-diffusion-cpp-python`) on the same single file, its weights kept as
    they are (f32) or quantized on load (q8_0). Its Euler sampler: each step is the same two
    UNet calls as DDIM's, so the sampler does not weigh on the comparison."""

    def side(args: dict):
        try:
            from stable_diffusion_cpp import StableDiffusion
        except ImportError as e:
            raise SystemExit("--sdcpp needs: pip install stable-diffusion-cpp-python") from e
        if _device(args) != "cpu" or args.get("dtype", "float32") != "float32":
            raise SystemExit("--sdcpp runs on the CPU in float32 weights (f32 or q8_0) only")
        side_px = args["image"]
        model = StableDiffusion(model_path=args["weights"], wtype=weight_type,
                                n_threads=args["threads"], verbose=False)  # fmt: skip

        def run():
            return model.generate_image(PROMPT, width=side_px, height=side_px, sample_steps=20,
                                        cfg_scale=7.5, sample_method="euler", seed=0)  # fmt: skip

        return run

    return side


# ---------------------------------------------------------------------------------------------
# Loading: a full-size single file into StableDiffusion.from_checkpoint, against reading the
# same file with safetensors alone (the floor: goal ratio <= 1.2)


def _load_ours(args: dict):
    from sd_pipeline import StableDiffusion

    return lambda: StableDiffusion.from_checkpoint(args["weights"], **_target(args))


def _load_safetensors(args: dict):
    from safetensors.torch import load_file

    # load_file maps the file lazily: copy every tensor out, so that the file is really read
    # into memory the process owns (as a loaded model holds it), on the run's device and dtype
    def copied(tensor):
        out = _put(tensor, args)
        return out.clone() if out is tensor else out

    return lambda: {k: copied(v) for k, v in load_file(args["weights"]).items()}


# ---------------------------------------------------------------------------------------------
# The practical peak: a large float32 matmul, measured in the same run as the FLOP-counted
# benchmarks (each round), so that their GFLOP/s read as a fraction of what this CPU does.

MATMUL = 4096
DTYPES = ("float32", "float16", "bfloat16")


def _matmul_prepare(workdir: Path, opts) -> dict:
    return {"n": MATMUL}


def _matmul_torch(args: dict):
    import torch

    g = _generator(5)
    a, b = (_put(torch.randn(args["n"], args["n"], generator=g), args) for _ in range(2))
    return lambda: a @ b


register(
    Benchmark(
        name="clip",
        description="CLIP ViT-L/14 text encoder, batch 2 x 77 tokens",
        prepare=_checkpoint_prepare,
        sides={"ours": _clip_ours, "transformers": _clip_transformers},
        baseline="transformers",
    )
)
register(
    Benchmark(
        name="unet",
        description="SD 1.5 UNet forward, batch 2, 4x64x64 latents, 77x768 context",
        prepare=_checkpoint_prepare,
        sides={"ours": _unet_ours, "diffusers": _unet_diffusers},
        flops=_unet_flops,
        compiled=_unet_ours_compiled,
    )
)
register(
    Benchmark(
        name="vae_decode",
        description="SD VAE decode, 1x4x64x64 latents -> 512x512 image",
        prepare=_checkpoint_prepare,
        sides={"ours": _vae_decode_ours, "diffusers": _vae_decode_diffusers},
        flops=_vae_decode_flops,
    )
)
register(
    Benchmark(
        name="vae_encode",
        description="SD VAE encode, 512x512 image -> posterior mean",
        prepare=_checkpoint_prepare,
        sides={"ours": _vae_encode_ours, "diffusers": _vae_encode_diffusers},
    )
)
register(
    Benchmark(
        name="txt2img",
        description="whole txt2img, 20 DDIM steps, CFG 7.5, one image",
        prepare=_txt2img_prepare,
        sides={"ours": _txt2img_ours, "diffusers": _txt2img_diffusers},
        images=1,
        compiled=_txt2img_ours_compiled,
        sdcpp={"sdcpp-f32": _txt2img_sdcpp("f32"), "sdcpp-q8_0": _txt2img_sdcpp("q8_0")},
    )
)
register(
    Benchmark(
        name="load",
        description="load the single-file checkpoint (VAE + CLIP + UNet) into our pipeline",
        prepare=_checkpoint_prepare,
        sides={"ours": _load_ours, "safetensors": _load_safetensors},
        baseline="safetensors",
    )
)
register(
    Benchmark(
        name="matmul",
        description=f"matmul {MATMUL}x{MATMUL} @ {MATMUL}x{MATMUL}: the practical peak",
        prepare=_matmul_prepare,
        sides={"torch": _matmul_torch},
        baseline="torch",
        flops=lambda args: 2.0 * args["n"] ** 3,
    )
)


# ---------------------------------------------------------------------------------------------
# Running


def _worker(name: str, side: str, args: dict, warmup: int, repeat: int) -> dict:
    """In a subprocess: set up one side, time it, report seconds and peak RSS.

    The peak RSS is that of the calls (model resident, warm-up included): the high-water mark
    is reset after setup where Linux allows it, so that reading the weights (a memory-mapped
    file of all three models) does not count. ``setup_peak_rss`` is the peak before that.
    """
    import torch

    call = REGISTRY[name].side(side)(args)
    cuda = _device(args).startswith("cuda")

    def fn():  # on a GPU a call is timed to the end of its kernels
        call()
        if cuda:
            torch.cuda.synchronize()

    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    reset = _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        fn()
    times, cpu_times = [], []
    for _ in range(repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)  # all threads: less hurt by contention
    peak = _peak_rss() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"times": times, "cpu_times": cpu_times, "peak_rss": peak, "setup_peak_rss": setup_peak}
    if cuda:  # what the calls allocated on the GPU at most (weights included)
        out["peak_device"] = torch.cuda.max_memory_allocated()
    return out


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _peak_rss() is not None
    except OSError:
        return False


def _peak_rss() -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return None


def _run_side(name, side, args, opts, warmup=None, repeat=None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
    cmd = [sys.executable, __file__, "--worker", name, side, json.dumps(args)]
    cmd += ["--warmup", str(opts.warmup if warmup is None else warmup)]
    cmd += ["--repeat", str(opts.repeat if repeat is None else repeat)]
    cmd += ["--threads", str(opts.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name}/{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cpus"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "diffusers", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _summary(name: str, runs: dict[str, list[dict]], opts, args: dict, peaks: list) -> dict:
    bench = REGISTRY[name]
    flops = bench.flops(args) if bench.flops else None
    peak = statistics.median(peaks) if peaks else None  # GFLOP/s of the matmul, this run
    sides = {}
    for side, results in runs.items():
        times = [t for r in results for t in r["times"]]
        cpu_times = [t for r in results for t in r["cpu_times"]]
        sides[side] = {
            "cpu_median_s": statistics.median(cpu_times),
            "cpu_times_s": cpu_times,
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "times_s": times,
            "peak_rss_gb": max(r["peak_rss"] for r in results) / 1e9,
        }
        if all("peak_device" in r for r in results):
            sides[side]["peak_device_gb"] = max(r["peak_device"] for r in results) / 1e9
    base = sides[bench.baseline]
    for side, s in sides.items():
        # round-by-round ratios: each pair was measured back to back under the same load
        pairs = [
            statistics.median(a["times"]) / statistics.median(b["times"])
            for a, b in zip(runs[side], runs[bench.baseline])
        ]
        s["ratio"] = s["median_s"] / base["median_s"]
        s["cpu_ratio"] = s["cpu_median_s"] / base["cpu_median_s"]
        s["ratio_per_round"] = pairs
        s["rss_ratio"] = s["peak_rss_gb"] / base["peak_rss_gb"]
        if "peak_device_gb" in s and "peak_device_gb" in base:
            s["device_memory_ratio"] = s["peak_device_gb"] / base["peak_device_gb"]
        if flops:
            s["gflops_per_s"] = flops / s["median_s"] / 1e9
            if peak:
                s["peak_fraction"] = s["gflops_per_s"] / peak
        if bench.images:
            s["images_per_s"] = bench.images / s["median_s"]
    return {
        "benchmark": name,
        "description": bench.description,
        "size": opts.size,
        "inputs": {k: v for k, v in args.items() if k in ("image", "n")},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": _machine(),
        "versions": _versions(),
        "threads": opts.threads,
        "device": args.get("device", "cpu"),
        "dtype": args.get("dtype", "float32"),
        "rounds": opts.rounds,
        "repeat": opts.repeat,
        "warmup": opts.warmup,
        "baseline": bench.baseline,
        "flops": flops,
        "peak_gflops_per_s": peak,
        "sides": sides,
    }


def _setting(s: dict) -> str:
    """Device and dtype of a result (those from before --device/--dtype: the CPU, float32)."""
    return f"{s.get('device', 'cpu')} {s.get('dtype', 'float32')}"


def _header(s: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in s["versions"].items() if v)
    return (
        f"{s['date']}; {s['machine']}; {versions}; {s['threads']} threads; {_setting(s)}; "
        f"{s['size']} size; "
        f"{s['rounds']} rounds of {s['repeat']} timed calls after {s['warmup']} warm-up, sides "
        "alternating, each in its own process."
    )


def _markdown(s: dict) -> str:
    lines = [f"# {s['benchmark']}: {s['description']}", "", _header(s), ""]
    if s["inputs"].get("image"):
        lines[-1:] = [f"Image side {s['inputs']['image']} px.", ""]
    if s["flops"]:
        peak = s["peak_gflops_per_s"]
        lines += [f"{s['flops'] / 1e9:.1f} GFLOP per call (torch.utils.flop_counter; every "
                  "convolution counted as a direct one, so a side that does fewer multiply-adds, "
                  "as ours through Winograd, shows an effective rate)"
                  + (f"; the {MATMUL}x{MATMUL} {s.get('dtype', 'float32')} matmul ran at "
                     f"{peak:.1f} GFLOP/s in the "
                     "same run." if peak else "."), ""]  # fmt: skip
    lines += [
        f"| side | median | min-max | ratio to {s['baseline']} | per-round ratios "
        "| CPU-time median | CPU-time ratio | peak RSS | RSS ratio | extra |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side, r in s["sides"].items():
        per_round = ", ".join(f"{x:.3f}" for x in r["ratio_per_round"])
        lines.append(
            f"| {side} | {r['median_s']:.3f} s | {r['min_s']:.3f}-{r['max_s']:.3f} s | "
            f"{r['ratio']:.3f} | {per_round} | {r['cpu_median_s']:.3f} s | "
            f"{r['cpu_ratio']:.3f} | {r['peak_rss_gb']:.2f} GB | {r['rss_ratio']:.2f} | "
            f"{_extra(r)} |"
        )
    return "\n".join(lines) + "\n"


def _extra(r: dict) -> str:
    parts = []
    if "gflops_per_s" in r:
        parts.append(f"{r['gflops_per_s']:.1f} GFLOP/s")
    if "peak_fraction" in r:
        parts.append(f"{100 * r['peak_fraction']:.0f}% of the matmul peak")
    if "images_per_s" in r:
        parts.append(f"{r['images_per_s']:.4f} images/s")
    if "peak_device_gb" in r:
        parts.append(f"GPU peak {r['peak_device_gb']:.2f} GB ({r['device_memory_ratio']:.2f})")
    return ", ".join(parts)


def _table(summaries: list[dict]) -> str:
    """All benchmarks in one table: ours against each reference (for the README)."""
    if not summaries:
        return "No results yet: run `python benchmarks/run.py` first.\n"
    first = max(summaries, key=lambda s: s["date"])
    versions = ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items() if v)
    lines = [
        f"Measured {first['date']} on {first['machine']}; {versions}; {first['threads']} "
        "threads; random weights; ratios are ours / reference in the same run (each side in its "
        "own process, alternating). Device and dtype: the CPU in float32 where the size column "
        "names none.",
        "",
        "| benchmark | size | ours median (min-max) | reference | reference median (min-max) "
        "| time ratio | ours peak RSS | reference peak RSS | RSS ratio | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        # ours against the baseline, and against stable-diffusion.cpp where it was timed
        pairs = [("ours", s["baseline"], ""), ("ours-compiled", s["baseline"], " (torch.compile)")]
        pairs += [("ours", side, "") for side in s["sides"] if side.startswith("sdcpp")]
        for side, reference, label in pairs:
            if side not in s["sides"]:
                continue
            o, b = s["sides"][side], s["sides"][reference]
            inputs = s.get("inputs", {})  # results from before --size: full size
            size = s.get("size", "full") + (
                f", {inputs['image']} px" if inputs.get("image") else ""
            )
            if _setting(s) != "cpu float32":
                size += f", {_setting(s)}"
            lines.append(
                f"| {s['benchmark']}{label} | {size} | {o['median_s']:.3f} s ({o['min_s']:.3f}-"
                f"{o['max_s']:.3f}) | {reference} | {b['median_s']:.3f} s ({b['min_s']:.3f}-"
                f"{b['max_s']:.3f}) | {o['median_s'] / b['median_s']:.3f} | {o['peak_rss_gb']:.2f} GB | "
                f"{b['peak_rss_gb']:.2f} GB | {o['peak_rss_gb'] / b['peak_rss_gb']:.2f} | {_notes(o, b)} |"
            )
    return "\n".join(lines) + "\n"


def _notes(ours: dict, reference: dict) -> str:
    parts = []
    if "peak_fraction" in ours:
        parts.append(f"ours {ours['gflops_per_s']:.0f} effective GFLOP/s = "
                     f"{100 * ours['peak_fraction']:.0f}% of matmul peak "
                     f"(reference {100 * reference['peak_fraction']:.0f}%)")  # fmt: skip
    elif "gflops_per_s" in ours:
        parts.append(f"ours {ours['gflops_per_s']:.0f} GFLOP/s")
    if "images_per_s" in ours:
        parts.append(f"{ours['images_per_s']:.4f} vs {reference['images_per_s']:.4f} images/s")
    if "device_memory_ratio" in ours:
        parts.append(f"GPU peak {ours['peak_device_gb']:.2f} vs {reference['peak_device_gb']:.2f} "
                     f"GB ({ours['device_memory_ratio']:.2f})")  # fmt: skip
    return "; ".join(parts)


def _load_results(folder: Path) -> list[dict]:
    order = {name: i for i, name in enumerate(REGISTRY)}
    found = [json.loads(p.read_text()) for p in folder.glob("*.json") if p.stem in REGISTRY]
    return sorted(found, key=lambda s: order[s["benchmark"]])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    p.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="leave these out")
    p.add_argument("--size", choices=sorted(SIZES), default="full",
                   help="full: SD 1.5 (default); tiny: each package's tiny() model, to check "
                        "the code in seconds")  # fmt: skip
    p.add_argument("--txt2img-size", type=int, metavar="PX",
                   help="txt2img image side (default 512 at full size, 64 at tiny)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--repeat", type=int, default=1, help="timed calls per process (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda: models and inputs there; a GPU's calls are timed "
                        "to the end of their kernels, and its peak memory reported")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and inputs (default float32; float16, bfloat16 on a GPU)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="also time our side through torch.compile (unet, txt2img): 'ours-compiled'")  # fmt: skip
    p.add_argument("--sdcpp", action="store_true",
                   help="also time stable-diffusion.cpp on txt2img, f32 and q8_0 (needs "
                        "`pip install stable-diffusion-cpp-python`; full size only)")  # fmt: skip
    p.add_argument("--workdir", type=Path, help="where shared inputs (weights) are cached")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--markdown", action="store_true",
                   help="print the latest results (in --out) as one Markdown table and exit")  # fmt: skip
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)

    if opts.worker:
        import torch

        torch.set_num_threads(opts.threads)
        name, side, args = opts.worker
        print(json.dumps(_worker(name, side, json.loads(args), opts.warmup, opts.repeat)))
        return
    if opts.list:
        for b in REGISTRY.values():
            print(f"{b.name:12s} {b.description} (sides: {', '.join(b.sides)})")
        return
    if opts.markdown:
        print(_table(_load_results(opts.out)), end="")
        return
    for flag, value in (("--rounds", opts.rounds), ("--repeat", opts.repeat),
                        ("--threads", opts.threads), ("--txt2img-size", opts.txt2img_size or 8)):  # fmt: skip
        if value < 1:
            raise SystemExit(f"{flag} must be at least 1, got {value}")
    if opts.txt2img_size and opts.txt2img_size % 8:
        raise SystemExit(f"--txt2img-size must be a multiple of 8, got {opts.txt2img_size}")
    if opts.warmup < 0:
        raise SystemExit(f"--warmup must be 0 or more, got {opts.warmup}")
    if opts.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {opts.device}: this torch sees no CUDA GPU")
    elif opts.device != "cpu":
        raise SystemExit(f"--device must be cpu or cuda (cuda:N), got {opts.device!r}")
    setting = {"device": opts.device, "dtype": opts.dtype}
    names = opts.only or [n for n in REGISTRY if n != "matmul"]
    unknown = [n for n in names + opts.skip if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown[0]!r}; choose from: {', '.join(REGISTRY)}")
    names = [n for n in names if n not in opts.skip]
    workdir = opts.workdir or Path(tempfile.gettempdir()) / "sd-benchmarks"
    workdir.mkdir(parents=True, exist_ok=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        bench = REGISTRY[name]
        args = {**bench.prepare(workdir, opts), **setting, "threads": opts.threads}
        runs = {side: [] for side in bench.side_names(opts.compile, opts.sdcpp)}
        peaks = []  # the matmul's GFLOP/s, once a round, beside a FLOP-counted benchmark
        for i in range(opts.rounds):
            if bench.flops and name != "matmul":
                margs = {**_matmul_prepare(workdir, opts), **setting}
                r = _run_side("matmul", "torch", margs, opts, warmup=1, repeat=3)
                peaks.append(2.0 * MATMUL**3 / statistics.median(r["times"]) / 1e9)
                print(f"{name} round {i + 1}/{opts.rounds} matmul peak: {peaks[-1]:.1f} GFLOP/s",
                      flush=True)  # fmt: skip
            for side in runs:
                r = _run_side(name, side, args, opts)
                runs[side].append(r)
                times = ", ".join(f"{t:.2f}" for t in r["times"])
                times += " (CPU " + ", ".join(f"{t:.2f}" for t in r["cpu_times"]) + ")"
                print(f"{name} round {i + 1}/{opts.rounds} {side}: {times} s, "
                      f"peak RSS {r['peak_rss'] / 1e9:.2f} GB", flush=True)  # fmt: skip
        summary = _summary(name, runs, opts, args, peaks)
        (opts.out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
        (opts.out / f"{name}.md").write_text(_markdown(summary))
        print(_markdown(summary))
    table = _table(_load_results(opts.out))
    (opts.out / "summary.md").write_text("# Latest results\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
