"""Everything that needs torch/diffusers: the LoRA UNet, the latent cache, training, evaluation.

Imported only by the code paths that train, evaluate or render: every SecAgg+ stage runs in a
fresh ClientApp process, and importing torch + diffusers costs seconds each time.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from flwr.common.logger import log
from logging import INFO, WARNING
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .config import ConfigError, NodeConfig, RunConfig
from .data import SKIP_REASONS, DataError, Example, discover, fingerprint, load_image, split
from .secagg import ADAM_BETAS

CACHE_VERSION = 2  # 2: entries keyed by the path relative to the data folder, not the bare file name
# A first encoding of a large folder can take an hour on CPU: the node's log says how far it is this
# often (the coordinator only sees that it has not answered yet).
PROGRESS_SECONDS = 30.0
# Images per VAE/text-encoder call when a folder is first encoded: a GPU needs batches to be busy.
# The VAE encoder's activations grow with it (not measured at 512 px on CPU: mind 8 GB containers).
ENCODE_BATCH = 8


class ModelNotAvailable(RuntimeError):
    pass


class NonFiniteLoss(FloatingPointError):
    """Training diverged. Carries the loss so that the node can export it before it stops."""

    def __init__(self, loss: float, step: int) -> None:
        super().__init__(f"training loss is {loss} at local step {step}: lower 'learning-rate'")
        self.loss = loss


def device() -> torch.device:
    """Where the model trains and its data stays: the (current) GPU where there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_and_dtype(mixed_precision: str) -> tuple[torch.device, torch.dtype | None]:
    """The device and the autocast dtype (None: full fp32).

    Never fp16: it would need loss scaling (config.py refuses it). A GPU without bf16 gets fp32."""
    where = device()
    if where.type == "cpu":
        if mixed_precision == "bf16":
            log(WARNING, "mixed-precision=%s asked for but no CUDA device: training in fp32 on CPU", mixed_precision)
        return where, None
    # Native bf16 only (Ampere or newer): torch's default also counts slow pre-Ampere emulation.
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if mixed_precision == "no" or (mixed_precision == "auto" and not native_bf16):
        return where, None
    return where, torch.bfloat16


def batch_part(batch_size: int, processes: int, rank: int) -> slice:
    """The contiguous part of each batch that process `rank` of `processes` trains on."""
    if batch_size % processes:
        raise ConfigError(
            f"run setting batch-size={batch_size} does not split evenly across this node's {processes} training "
            f"processes (node setting train-processes): use a batch-size divisible by {processes}, or set the node's "
            f"train-processes to a divisor of {batch_size}")
    part = batch_size // processes
    return slice(rank * part, (rank + 1) * part)


def _from_pretrained(cls, base_model: str, subfolder: str, **kwargs):
    try:
        return cls.from_pretrained(base_model, subfolder=subfolder, **kwargs)
    except OSError as err:
        # An organisation's ClientApp container has no network (docs/isolation.md): a hub id loads
        # only from the models folder its organisation filled beforehand.
        raise ModelNotAvailable(
            f"cannot load {subfolder} of base model {base_model!r} on this node ({err}). The node fetches no "
            f"model while it runs: its organisation runs `make fetch-model MODEL={base_model}` on its host once "
            "(into its models folder), or the run sets 'base-model' to a local diffusers folder such as "
            "/models/<name>"
        ) from None


# --- LoRA weights on the wire -------------------------------------------------------------------

def lora_state(unet: torch.nn.Module) -> dict[str, np.ndarray]:
    """The adapter's tensors by PEFT name, sorted: the one key order both sides rely on."""
    sd = get_peft_model_state_dict(unet)
    return {k: sd[k].detach().float().cpu().numpy() for k in sorted(sd)}


def weights_fingerprint(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def load_lora(unet: torch.nn.Module, names: list[str], arrays: list[np.ndarray]) -> str:
    """Load global LoRA weights into `unet`, prove they landed, and return their fingerprint.

    The public Flower diffusion examples matched PEFT names against unet.state_dict() names
    (which carry '.default') and so never loaded anything; reading back catches that class of bug.
    """
    if len(arrays) != len(names):
        raise ValueError(f"received {len(arrays)} LoRA tensors, this model has {len(names)}: run settings differ?")
    sd = {n: torch.from_numpy(np.asarray(a, dtype=np.float32)) for n, a in zip(names, arrays)}
    result = set_peft_model_state_dict(unet, sd)
    if result.unexpected_keys:
        raise ValueError(f"LoRA tensors not in this model: {result.unexpected_keys[:3]}...")
    loaded = lora_state(unet)
    for name, array in zip(names, arrays):
        if loaded[name].shape != np.shape(array) or not np.array_equal(loaded[name], np.asarray(array, np.float32)):
            raise RuntimeError(f"global LoRA weight {name} did not load into the UNet")
    return weights_fingerprint(list(loaded.values()))


@dataclass
class LoraUNet:
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    device: torch.device
    autocast: torch.dtype | None
    names: list[str]

    @classmethod
    def load(cls, cfg: RunConfig) -> LoraUNet:
        device, autocast = device_and_dtype(cfg.mixed_precision)
        # Frozen base weights in the low-precision dtype save memory; LoRA weights (below) stay
        # fp32 so that Adam's small updates are not rounded away.
        unet = _from_pretrained(UNet2DConditionModel, cfg.base_model, "unet", dtype=autocast or torch.float32)
        unet.requires_grad_(False)
        # Same seed everywhere, so every node (and the server) starts from the same adapter.
        torch.manual_seed(cfg.seed)
        unet.add_adapter(LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
            target_modules=list(cfg.lora_targets),
        ))
        # PyTorch's fused attention (flash / memory-efficient kernels on GPUs), whatever diffusers'
        # default of the day: the math fallback materialises every attention matrix.
        unet.set_attn_processor(AttnProcessor2_0())
        unet.to(device)
        if device.type == "cuda":
            # NHWC: tensor-core convolutions need no layout transposes around every conv.
            unet.to(memory_format=torch.channels_last)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if cfg.compile:
            # In place: the module keeps its names, so the adapter's tensors are found as before.
            unet.compile()
        scheduler = _from_pretrained(DDPMScheduler, cfg.base_model, "scheduler")
        return cls(unet, scheduler, device, autocast, list(lora_state(unet)))

    def _predict(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, unet=None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return (unet or self.unet)(latents, timesteps, embeds).sample.float()

    def _target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.scheduler.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def train(self, data: EncodedData, steps: int, batch_size: int, learning_rate: float, seed: int,
              on_step=None, accelerator=None) -> dict[str, float]:
        """`steps` Adam steps on shuffled epochs of the training latents; returns loss and timings.

        The host never waits for the device inside a step: losses stay on the device and are read
        at the five progress points (log, finiteness check, timings), so a GPU always has the next
        steps queued. The numbers are those of the plain loop (tests/test_train_step.py): every
        random draw comes from one CPU generator in the same order, whatever the device.

        `on_step(seconds)` is called once per step (metrics), at each progress point with the mean
        time per step since the last one: timing single steps would need a host sync each.

        With an `accelerator` of N processes (app/parallel.py) each of them calls this with the same
        arguments. Each draws the whole batch's order, noise and timesteps from the same generator,
        so all hold the random stream of one process, and trains on its own contiguous 1/N of each
        batch; DDP averages the gradients, which is the whole batch's mean gradient, so clipping and
        Adam take the step one process would take (up to the order of float additions)."""
        processes, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
        mine = batch_part(batch_size, processes, rank)
        self.unet.train()
        params = [p for p in self.unet.parameters() if p.requires_grad]
        cuda = self.device.type == "cuda"
        # No weight decay: secagg.adam_update_bound assumes plain Adam steps. Fused: one kernel for
        # all parameters' updates on CUDA; foreach batches them on CPU.
        opt = torch.optim.AdamW(params, lr=learning_rate, betas=ADAM_BETAS, weight_decay=0.0,
                                fused=True if cuda else None, foreach=None if cuda else True)
        gen = torch.Generator().manual_seed(seed)
        n = data.num_train
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(steps * batch_size // n + 1)])
        num_t = self.scheduler.config.num_train_timesteps
        # Resident for the whole run (a no-op where the caller already keeps them on the device).
        order = order[:steps * batch_size].view(steps, batch_size).to(self.device)
        all_latents, all_embeds = data.train_latents.to(self.device), data.train_embeds.to(self.device)
        losses = torch.empty(steps, device=self.device)
        every = max(1, steps // 5)
        # DDP averages the gradients over the processes in each backward; wrapping it broadcasts rank
        # 0's weights (the received adapter) to the others. Per call: the optimizer is new each call too.
        unet = accelerator.prepare_model(self.unet) if processes > 1 else self.unet
        t0 = t_last = time.perf_counter()
        try:
            for lo in range(0, steps, every):
                hi = min(steps, lo + every)
                noise, timesteps = self._draws(gen, hi - lo, (batch_size, *all_latents.shape[1:]), num_t)
                for i, step in enumerate(range(lo, hi)):
                    batch, step_noise, step_t = order[step, mine], noise[i, mine], timesteps[i, mine]
                    latents = all_latents[batch]
                    noisy = self.scheduler.add_noise(latents, step_noise, step_t)
                    pred = self._predict(noisy, step_t, all_embeds[batch], unet)
                    loss = F.mse_loss(pred, self._target(latents, step_noise, step_t))
                    if accelerator:
                        accelerator.backward(loss)
                    else:
                        loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)  # no host sync: it scales by a clamped factor
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses[step] = loss.detach()
                # The progress point: the one place the host waits for the device.
                if processes > 1:
                    # The mean of the processes' means is the whole batch's loss: every process sees the
                    # same figures, and all stop at the same step if one is not finite.
                    losses[lo:hi] = accelerator.reduce(losses[lo:hi], "mean")
                chunk = losses[lo:hi].cpu()
                now = time.perf_counter()
                bad = (~torch.isfinite(chunk)).nonzero()
                if len(bad):
                    # The weights took the bad steps after it: useless, but the run stops here anyway.
                    first = int(bad[0, 0])
                    raise NonFiniteLoss(float(chunk[first]), lo + first)
                per_step, t_last = (now - t_last) / (hi - lo), now
                if on_step:
                    for _ in range(hi - lo):
                        on_step(per_step)
                if rank == 0:  # the others' lines would repeat it
                    log(INFO, "  step %d/%d loss %.4f (%.2f s/step)", hi, steps, float(chunk.mean()), per_step)
        finally:
            if processes > 1:
                accelerator.free_memory()  # lets go of the DDP wrapper
        seconds = time.perf_counter() - t0
        stats = {"train_loss": float(losses.cpu().double().mean()), "train_seconds": seconds,
                 "images_per_second": steps * batch_size / seconds if seconds else 0.0, "train_processes": processes}
        if cuda:
            stats["accelerator_memory_peak_bytes"] = float(torch.cuda.max_memory_allocated(self.device))
        return stats

    def _draws(self, gen: torch.Generator, steps: int, shape: tuple[int, ...], num_t: int):
        """Noise and timesteps for `steps` steps, drawn in the plain loop's order, on the device."""
        noise, timesteps = [], []
        for _ in range(steps):
            noise.append(torch.randn(shape, generator=gen))
            timesteps.append(torch.randint(0, num_t, shape[:1], generator=gen))
        noise, timesteps = torch.stack(noise), torch.stack(timesteps)
        if self.device.type == "cuda":
            # Pinned, so that the copy is queued behind the running steps instead of waiting for them.
            return (noise.pin_memory().to(self.device, non_blocking=True),
                    timesteps.pin_memory().to(self.device, non_blocking=True))
        return noise, timesteps

    @torch.no_grad()
    def heldout_loss(self, data: EncodedData, eval_timesteps: int, seed: int, batch_size: int) -> float:
        """Noise-prediction MSE on the held-out latents over a fixed timestep grid with fixed noise.

        The noise for held-out example i depends only on (seed, i), so the number is comparable
        across rounds and between the base model and any adapter.
        """
        self.unet.eval()
        num_t = self.scheduler.config.num_train_timesteps
        grid = torch.linspace(0, num_t - 1, eval_timesteps).round().long()
        # Summed on the device: the host reads it once, not after every batch.
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for i in range(len(data.heldout_latents)):
            noise = torch.randn((eval_timesteps, *data.heldout_latents.shape[1:]),
                                generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
            latents = data.heldout_latents[i:i + 1].expand(eval_timesteps, -1, -1, -1)
            embeds = data.heldout_embeds[i:i + 1].expand(eval_timesteps, -1, -1)
            for s in range(0, eval_timesteps, batch_size):
                lat, nz, t = (x[s:s + batch_size].to(self.device) for x in (latents, noise, grid))
                pred = self._predict(self.scheduler.add_noise(lat, nz, t), t, embeds[s:s + batch_size].to(self.device))
                total += F.mse_loss(pred, self._target(lat, nz, t), reduction="sum").double() / lat[0].numel()
                count += len(t)
        return float(total) / count


# --- The latent cache ----------------------------------------------------------------------------

@dataclass
class EncodedData:
    train_latents: torch.Tensor
    train_embeds: torch.Tensor
    heldout_latents: torch.Tensor
    heldout_embeds: torch.Tensor
    skipped: list[str]

    @property
    def num_train(self) -> int:
        return len(self.train_latents)

    @property
    def num_heldout(self) -> int:
        return len(self.heldout_latents)

    def to(self, device: torch.device) -> EncodedData:
        """The same data on `device`: a process that trains many times moves them there once."""
        return EncodedData(self.train_latents.to(device), self.train_embeds.to(device),
                           self.heldout_latents.to(device), self.heldout_embeds.to(device), self.skipped)


def prepare_data(cfg: RunConfig, node: NodeConfig) -> EncodedData:
    """Encode the node's images and captions once, then serve them from the cache.

    At 512 px a VAE encode costs as much as a UNet training step, and the text encoder is
    frozen too: both are run once per (model, resolution, file set), never per step or round.
    """
    examples = discover(node.data_dir, node.default_caption)
    key = hashlib.sha256(
        f"v{CACHE_VERSION}\0{cfg.base_model}\0{cfg.resolution}\0{fingerprint(examples)}".encode()
    ).hexdigest()[:24]
    path = node.cache_dir / f"latents-{key}.pt"
    if path.is_file():
        cached = torch.load(path, weights_only=True)
    else:
        log(INFO, "[%s] encoding %d images once (cached for later rounds and runs)", node.org, len(examples))
        cached = _encode(cfg, examples, node.data_dir)
        node.cache_dir.mkdir(parents=True, exist_ok=True)
        # A temporary name of this writer's own: nodes or runs sharing the cache volume may encode
        # the same data at once, and each must rename its own complete file (the contents agree).
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            torch.save(cached, tmp)
            tmp.replace(path)  # atomic: a crash never leaves a half-written cache behind
        finally:
            tmp.unlink(missing_ok=True)
        log(INFO, "[%s] cached %d latents in %s", node.org, len(cached["names"]), path)
    by_name = {n: i for i, n in enumerate(cached["names"])}
    usable = [e for e in examples if e.name in by_name]
    if len(usable) < 2:
        raise DataError(f"only {len(usable)} of {len(examples)} image files is usable, at least 2 are needed; "
                        f"{len(cached['skipped'])} skipped ({SKIP_REASONS})",
                        f"{node.data_dir}, skipped: {', '.join(cached['skipped'])}")
    train, heldout = split(usable, cfg.heldout_fraction, cfg.seed)

    def pick(part: list[Example], field: str) -> torch.Tensor:
        return cached[field][[by_name[e.name] for e in part]]

    return EncodedData(pick(train, "latents"), pick(train, "embeds"),
                       pick(heldout, "latents"), pick(heldout, "embeds"), list(cached["skipped"]))


@torch.no_grad()
def _encode(cfg: RunConfig, examples: list[Example], data_dir: Path) -> dict:
    from transformers import CLIPTextModel, CLIPTokenizer

    device, autocast = device_and_dtype(cfg.mixed_precision)
    dtype = autocast or torch.float32
    vae = _from_pretrained(AutoencoderKL, cfg.base_model, "vae", dtype=dtype).to(device)
    tokenizer = _from_pretrained(CLIPTokenizer, cfg.base_model, "tokenizer")
    text_encoder = _from_pretrained(CLIPTextModel, cfg.base_model, "text_encoder", dtype=dtype).to(device)
    names, latents, embeds, skipped = [], [], [], []
    t0 = last_report = time.perf_counter()
    for first in range(0, len(examples), ENCODE_BATCH):
        chunk, pixels = [], []
        for e in examples[first:first + ENCODE_BATCH]:
            image = load_image(e.path, cfg.resolution)
            if image is None:  # load_image logged why
                skipped.append(e.name)
            else:
                chunk.append(e)
                pixels.append(torch.from_numpy(image).permute(2, 0, 1))
        if chunk:
            x = torch.stack(pixels).to(device, dtype=dtype)
            # The posterior mean, not a sample: the cache must not freeze one random draw.
            latents.append(vae.encode(x).latent_dist.mean.float().cpu() * vae.config.scaling_factor)
            ids = tokenizer([e.caption for e in chunk], max_length=tokenizer.model_max_length,
                            padding="max_length", truncation=True, return_tensors="pt").input_ids
            embeds.append(text_encoder(ids.to(device))[0].float().cpu())
            names += [e.name for e in chunk]
        done, now = min(first + ENCODE_BATCH, len(examples)), time.perf_counter()
        if now - last_report >= PROGRESS_SECONDS and done < len(examples):
            last_report, rate = now, done / (now - t0)
            log(INFO, "encoded %d/%d images (%.1f images/s, about %.0f s left)", done, len(examples), rate,
                (len(examples) - done) / rate)
    if not latents:
        raise DataError(f"none of the {len(examples)} image files in the data folder is usable ({SKIP_REASONS}). "
                        "Add images this node can read, at least half the run's resolution",
                        f"{data_dir}: {', '.join(skipped)}")
    log(INFO, "encoded %d images in %.1f s (%d unusable skipped)", len(names), time.perf_counter() - t0, len(skipped))
    return {"names": names, "latents": torch.cat(latents), "embeds": torch.cat(embeds), "skipped": skipped}


# --- Samples for people to look at --------------------------------------------------------------

class Sampler:
    """Renders a grid of fixed prompts with fixed seeds, so rounds can be compared by eye."""

    def __init__(self, cfg: RunConfig, model: LoraUNet) -> None:
        from diffusers import StableDiffusionPipeline

        self.cfg, self.model = cfg, model
        try:
            self.pipe = StableDiffusionPipeline.from_pretrained(
                cfg.base_model, unet=model.unet, safety_checker=None, requires_safety_checker=False,
                dtype=model.autocast or torch.float32,
            ).to(model.device)
        except OSError as err:
            raise ModelNotAvailable(f"cannot load base model {cfg.base_model!r} to render samples ({err})") from None
        self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def grid(self, arrays: list[np.ndarray] | None):
        """Samples of the base model (arrays=None) or of the given global adapter, one row."""
        from PIL import Image

        unet = self.model.unet
        if arrays is None:
            unet.disable_adapters()
        else:
            unet.enable_adapters()
            load_lora(unet, self.model.names, arrays)
        images = []
        for i, prompt in enumerate(self.cfg.sample_prompts):
            gen = torch.Generator(self.model.device).manual_seed(self.cfg.seed + i)
            with torch.autocast(self.model.device.type, dtype=self.model.autocast,
                                enabled=self.model.autocast is not None):
                images.append(self.pipe(prompt, height=self.cfg.resolution, width=self.cfg.resolution,
                                        num_inference_steps=self.cfg.sample_steps, generator=gen).images[0])
        unet.enable_adapters()
        size = self.cfg.resolution
        sheet = Image.new("RGB", (size * len(images), size), "white")
        for i, img in enumerate(images):
            sheet.paste(img, (i * size, 0))
        return sheet
