"""What one local training step costs on this machine: ours against the diffusers LoRA recipe.

    make bench-train      (or: python tests/benchmark_train.py [--steps N] [--compile])

Runs the same workload twice, each in a fresh process (so that peak memory is its own):
- "ours": app/model.py's LoraUNet.train on latents and text embeddings cached at preparation;
- "recipe": the loop of diffusers' examples/text_to_image/train_text_to_image_lora.py: VAE and
  text encoder run on every batch, `loss.item()` (a host sync) every step, torch's default AdamW.
Both load the same model from the same folder, train the same LoRA (rank, targets, fp32 weights)
at the same batch size and precision, and skip their first steps (warm-up) in the timing.

Workloads: on a CUDA GPU, tiny-sd's architecture (random weights: speed does not depend on their
values) at 512 px, bf16, batch 4. On CPU, the offline tiny model at 64 px: a regression figure for
this code, not a prediction of GPU speed.

MFU (model-FLOPs utilisation) is the LoRA UNet step's FLOPs (forward + backward, counted by torch's
FlopCounterMode on the real model, attention through its math kernel so every FLOP is seen) per
second, over the GPU's dense bf16 peak. The recipe's MFU counts the same useful FLOPs: its VAE and
text-encoder work is overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["HF_HUB_OFFLINE"] = "1"

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (FLOP/s), by a piece of the device name;
# the first match wins. Anything else: pass --peak-tflops.
GPU_PEAK_BF16 = [
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
    ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12),
]
LORA_RANK, LORA_TARGETS, LEARNING_RATE = 8, "to_q,to_k,to_v,to_out.0", 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="timed steps (default: 30 on CUDA, 20 on CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, help="default: 512 on CUDA, 64 on CPU")
    parser.add_argument("--model", choices=("tiny-sd-shaped", "offline-tiny"),
                        help="default: tiny-sd-shaped on CUDA, offline-tiny on CPU")
    parser.add_argument("--compile", action="store_true", help="ours with run setting compile=true")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--worker", choices=("ours", "recipe"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args)))
        return

    import torch

    cuda = torch.cuda.is_available()
    args.model = args.model or ("tiny-sd-shaped" if cuda else "offline-tiny")
    args.resolution = args.resolution or (512 if cuda else 64)
    args.steps = args.steps or (30 if cuda else 20)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-train-") as tmp:
        args.dir = Path(tmp)
        write_workload(args)
        print(f"device: {device}; {args.model} model, {args.resolution} px, batch {args.batch_size}, "
              f"{'bf16' if cuda else 'fp32'}, LoRA r={LORA_RANK} on {LORA_TARGETS}; "
              f"{args.steps} timed steps after {args.warmup}")
        results = {w: run_worker(w, args) for w in ("ours", "recipe")}
    peak = peak_flops(args.peak_tflops) if cuda else None
    mem_name = "peak GPU memory" if cuda else "peak RSS"
    print(f"\n{'':>7} {'images/s':>9} {'ms/step':>9} {mem_name:>16} {'GFLOP/step':>11} {'MFU':>6}")
    useful = results["ours"]["flops_per_step"]  # the LoRA UNet step: the same model in both
    for name, r in results.items():
        mfu = f"{useful / r['seconds_per_step'] / peak:.1%}" if peak else "n/a"
        print(f"{name:>7} {r['images_per_second']:>9.2f} {r['seconds_per_step'] * 1e3:>9.1f} "
              f"{r['peak_memory_bytes'] / 2**20:>12.0f} MiB {r['flops_per_step'] / 1e9:>11.1f} {mfu:>6}")
    ours, recipe = results["ours"], results["recipe"]
    print(f"\nours/recipe: {ours['images_per_second'] / recipe['images_per_second']:.2f}x images/s "
          f"(UNet step {useful / 1e9:.1f} GFLOP; ours achieves {useful / ours['seconds_per_step'] / 1e9:.1f} GFLOP/s)")
    if not cuda:
        print("CPU figures are for regression only; MFU needs a GPU's peak")


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--dir", str(args.dir), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--resolution",
           str(args.resolution)] + (["--compile"] if args.compile else [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    print(f"{name}: done in {time.perf_counter() - t0:.0f} s (process start, model load, warm-up included)")
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def peak_flops(override: float | None) -> float | None:
    import torch

    if override:
        return override * 1e12
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        return None  # it trained in fp32: a bf16 peak would understate it
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in GPU_PEAK_BF16 if key in name), None)


# --- The workload --------------------------------------------------------------------------------

def write_workload(args) -> None:
    from app.offline import write_demo_data, write_tiny_model

    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            write_demo_data(args.dir / "data", orgs=1, images_per_org=16, size=args.resolution)
            if args.model == "offline-tiny":
                write_tiny_model(args.dir / "model")
            else:
                write_tiny_sd_shaped(args.dir / "model")
        finally:
            sys.stdout = stdout


def write_tiny_sd_shaped(out_dir: Path) -> None:
    """segmind/tiny-sd's architecture (../shared/notes/MODELS.md) with random weights: no hub needed."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from app.offline import _tiny_clip_tokenizer

    tokenizer = _tiny_clip_tokenizer()  # any ids do for speed: CLIP-L's width and depth are what cost
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(320, 640, 1280), down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3, mid_block_type=None, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(  # Stable Diffusion 1.x's VAE
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14's text tower
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                            ).save_pretrained(out_dir, safe_serialization=True)


def run_config(args):
    from app.config import RunConfig
    from conftest import tiny_run_config, with_defaults

    return RunConfig.from_flower(with_defaults(tiny_run_config(args.dir / "model", Path("/unused"), **{
        "resolution": args.resolution, "batch-size": args.batch_size, "learning-rate": LEARNING_RATE,
        "lora-rank": LORA_RANK, "lora-alpha": LORA_RANK, "lora-target-modules": LORA_TARGETS,
        "mixed-precision": "auto", "compile": args.compile,
    })))


# --- The two workers -----------------------------------------------------------------------------

def ours(args) -> dict:
    import torch

    from app import model
    from app.config import NodeConfig

    cfg = run_config(args)
    data = model.prepare_data(cfg, NodeConfig(args.dir / "data" / "org-1", "bench", None, args.dir / "cache"))
    net = model.LoraUNet.load(cfg)
    data = data.to(net.device)  # as a process that trains many rounds keeps them
    flops = count_flops(lambda: net.train(data, 1, args.batch_size, LEARNING_RATE, seed=1))
    net.train(data, args.warmup, args.batch_size, LEARNING_RATE, seed=2)
    t0 = time.perf_counter()
    net.train(data, args.steps, args.batch_size, LEARNING_RATE, seed=3)  # returns after its last read of the loss
    seconds = time.perf_counter() - t0
    return result(args, seconds, flops, net.device)


def recipe(args) -> dict:
    """The training loop of diffusers' train_text_to_image_lora.py (v0.3x), without accelerate:
    autocast stands in for accelerate's mixed precision, which is what it applies to the forward."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from app.data import discover, load_image
    from app.model import device_and_dtype

    cfg = run_config(args)
    device, autocast = device_and_dtype(cfg.mixed_precision)
    weight_dtype = autocast or torch.float32
    path = str(args.dir / "model")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                target_modules=list(cfg.lora_targets)))
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    cast_training_params(unet, dtype=torch.float32)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    # Its DataLoader's work (decode, resize, tokenize) is done up front: only the model's work is timed.
    examples = discover(args.dir / "data" / "org-1", None)
    pixels = torch.stack([torch.from_numpy(load_image(e.path, args.resolution)).permute(2, 0, 1) for e in examples])
    input_ids = tokenizer([e.caption for e in examples], max_length=tokenizer.model_max_length, padding="max_length",
                          truncation=True, return_tensors="pt").input_ids
    rng = np.random.default_rng(0)

    def step() -> float:
        idx = torch.from_numpy(rng.choice(len(examples), args.batch_size, replace=False))
        pixel_values, ids = pixels[idx].to(device), input_ids[idx].to(device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            latents = vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps.long())
            encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_layers, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()  # the recipe's train_loss += avg_loss.item() / progress bar: a host sync

    flops = count_flops(step)
    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - t0
    return result(args, seconds, flops, device)


WORKERS = {"ours": ours, "recipe": recipe}


def count_flops(fn) -> int:
    """FLOPs of one call of `fn`, attention through the math kernel (the counter sees its matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def result(args, seconds: float, flops: int, device) -> dict:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"seconds_per_step": seconds / args.steps, "images_per_second": args.steps * args.batch_size / seconds,
            "peak_memory_bytes": peak, "flops_per_step": flops}


if __name__ == "__main__":
    main()
