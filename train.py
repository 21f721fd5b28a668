"""
Train a UCGM model (UCGM-T, paper Alg. 1) with torchrun DDP.

  torchrun --nproc_per_node=8 train.py --data latents/in1k256_vavae --model TiT-XL/1 --preset multistep
  torchrun --standalone --nproc_per_node=1 train.py --lam 0.5     # the built-in digits demo, on a CPU
"""

import argparse
import contextlib
import copy
import functools
import glob
import importlib
import inspect
import json
import hashlib
import os
import resource
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import fid
import ucgm

#################################################################################
#                              Presets and defaults                             #
#################################################################################

# the defaults of every flag a preset may set; an explicit flag beats a preset, a preset beats the demo
BASE = dict(transport="Linear", lam=0.0, zeta=0.0, enhance_range=(0.0, 0.75), label_drop=0.1, huber_c=0.0,
            cosine_loss=False, weighting="cosine", time_dist=(1.0, 1.0, 1.0), teacher_decay=0.999,
            enhance_style=None, model="TiT-XL/1", global_batch_size=1024, max_steps=1_000_000, optimizer="adamw",
            lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, grad_clip=0.0, ema_decay=0.9999, log_every=100,
            ckpt_every=20_000, sample_every=20_000, sample_cfg=1.0, latent_stats=None)
# tuning a pre-trained model into a 2-step one: the loss and optimiser settings of the later released trainer's
# tuning_few_steps configs (the frozen start weights as teacher, fc-vs-fe), the batch and steps of LINs-lab/UCGM's
# own configs/tuning_few_steps/*.yaml (its README's 0.64 / 0.64 / 0.40 / 0.32 epochs; EDM2: the later trainer's); the
# transport is that of the --init weights (ReLinear for LightningDiT and DDT, EDM for EDM2)
TUNE = dict(lam=1.0, enhance_style="fc-vs-fe", huber_c=5.0, teacher_decay=1.0, enhance_range=(0.0, 0.75),
            time_dist=(0.8, 1.0, 1.0), weighting="cosine", cosine_loss=False, label_drop=0.1, optimizer="radam",
            lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=0.1, ema_decay=0.99, log_every=100)
PRESETS = {
    # the released lengths: multi-step checkpoints at 500k steps (1M for E2E-VAE and DC-AE), few-step at 40k-50k
    "multistep": dict(lam=0.0, zeta=0.47, cosine_loss=True, weighting="cosine", huber_c=0.0, time_dist=(1.0, 1.0, 1.0),
                      teacher_decay=0.999, optimizer="adamw", lr=2e-4, betas=(0.9, 0.95), max_steps=500_000),
    "fewstep": dict(lam=1.0, zeta=2.0, cosine_loss=False, weighting="cosine", huber_c=5.0, time_dist=(0.8, 1.0, 1.0),
                    teacher_decay=1.0, optimizer="radam", lr=1e-4, betas=(0.9, 0.999), grad_clip=0.1, max_steps=50_000,
                    ckpt_every=10_000, sample_every=10_000),
    "tune-lightningdit": dict(TUNE, zeta=3.0, global_batch_size=1024, max_steps=800, ckpt_every=800),
    "tune-repa": dict(TUNE, zeta=1.7, optimizer="clion", global_batch_size=1024, max_steps=800, ckpt_every=800),
    "tune-repae": dict(TUNE, zeta=2.5, global_batch_size=1024, max_steps=500, ckpt_every=500),
    "tune-ddt": dict(TUNE, zeta=1.9, global_batch_size=512, max_steps=800, ckpt_every=800),
    "tune-edm2": dict(TUNE, zeta=1.7, global_batch_size=1024, max_steps=800, ckpt_every=800),
    # Table 7's unconditional CIFAR-10 on pixels (extract_latents.py --unconditional; --latent-stats none), UNet+ and
    # the EDM transport, no label dropping and no ζ (the self-guided ζ needs labels). The multi-step recipe is not
    # released; this follows EDM's CIFAR-10 one (NVlabs/edm train.py) but for its lr ramp-up (10 Mimg), augmentation
    # (p 0.12) and dropout (0.13; UNet+'s released 0.2 here), with our RMS per-sample distance rather than EDM's
    # squared one: Adam (AdamW without decay) at lr 1e-3, betas (0.9,
    # 0.999), no clipping, batch 512 for 200 Mimg (390,625 steps), EMA half-life 0.5 Mimg (0.5^(512/5e5) = 0.99929 a
    # step); the loss on F unweighted (EDM's λ(σ) on D is unit weight on F) and t ~ Beta(9.1, 9.8), the mean and
    # variance of EDM's ln σ ~ N(−1.2, 1.2²) at t = (ln σ/4 + 1.59)/2.68 (Table 6)
    "cifar10": dict(model="UNet+", transport="EDM", lam=0.0, zeta=0.0, label_drop=0.0, weighting="none",
                    time_dist=(9.1, 9.8, 1.0), huber_c=0.0, cosine_loss=False, optimizer="adamw", lr=1e-3,
                    betas=(0.9, 0.999), weight_decay=0.0, grad_clip=0.0, global_batch_size=512, max_steps=390_625,
                    ema_decay=0.99929, latent_stats="none"),
    # the released configs/debug/debug.yaml (its 1-NFE FID "should be 6.197"), tuning the --init weights (ours or an
    # EDM pickle): λ 1, ζ −0.45 against the frozen start weights (fc-vs-xz, App. C.1.3), Beta(3.5, 3.5)·1.2, cosine
    # weight, RMS loss, RAdam lr 1e-4, batch 128, 5000 steps, EMA 0.999; label_drop 0 where the released 0.1 left the
    # last 10% of each batch unenhanced (x* = x: --label-drop 0.1 does the same, as UNet+ ignores the null label)
    "cifar10-fewstep": dict(model="UNet+", transport="EDM", lam=1.0, zeta=-0.45, enhance_style="fc-vs-xz",
                            enhance_range=(0.0, 0.75), label_drop=0.0, huber_c=0.0, cosine_loss=False,
                            weighting="cosine", time_dist=(3.5, 3.5, 1.2), teacher_decay=1.0, optimizer="radam",
                            lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=0.0, global_batch_size=128,
                            max_steps=5000, ema_decay=0.999, log_every=100, ckpt_every=1000, sample_every=1000,
                            latent_stats="none")}
# the digits demo without --data: a 1.3M-parameter TiT on 24×24 pixels (36 tokens), ~0.16 s a step on 2 CPU cores;
# unweighted loss (the cos(πt/2) weight starves the high-noise steps that decide the digit) and guided grids
DEMO = dict(model="TiT-T/4", global_batch_size=48, max_steps=1800, lr=2e-3, weighting="none", log_every=50,
            ckpt_every=600, sample_every=600, sample_cfg=3.5)
STEPS_PICTURE = (1, 2, 4, 8, 40)  # the sampling steps of the final steps_*.png, one column each
BENCH_WARMUP = 3  # --bench times the steps after these (compilation, allocator and cuDNN warm-up)
# dense bf16 TFLOP/s of torch.cuda.get_device_name(), for MFU: the first pattern found in the name decides
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
              ("B200", 2250e12)]
# bytes the grad forward saves for the backward, per image and token, in units of the width: (a block eager, a block
# compiled, the rest) under bf16 autocast and in float32; measured on CPU with saved-tensor hooks, README "Memory"
SAVED_BYTES = {"TiT": {"bf16": (65.6, 40.3, 10.2), "fp32": (99.0, 76.3, 12.4)},
               "LightningDiT": {"bf16": (65.5, 40.1, 14.2), "fp32": (106.9, 76.2, 16.4)},
               "DiT": {"bf16": (48.2, 36.2, 10.2), "fp32": (80.2, 68.2, 12.4)},
               # DDT: the mean block of 22 encoder and 6 decoder blocks (whose adaLN acts per token)
               "DDT": {"bf16": (79.0, 40.8, 12.4), "fp32": (121.8, 81.4, 24.8)}}


#################################################################################
#                                    Data                                       #
#################################################################################

@functools.cache  # a font per size, loaded once per process
def digit_fonts(size):
    return {s: ImageFont.load_default(size=s) for s in range(size + 2, size + 8)}  # a digit is ~0.75 of its size


@functools.lru_cache(maxsize=None)  # each image is drawn once per process (data-loading workers have their own)
def render_digit(index, size=24, seed=0):
    """Digit index mod 10 in RGB (uint8 HWC), drawn with Pillow's built-in font in random colours, offset and scale
    from (seed, index) alone. The bold glyphs fill the square, so that the gap that tells a 5 from a 6 spans a pixel."""
    rng = np.random.default_rng([seed, index])
    background = tuple(int(v) for v in rng.integers(144, 256, 3))  # light random colour
    ink = tuple(int(v) for v in rng.integers(0, 112, 3))  # dark random colour: the class mean shows the digit
    image = Image.new("RGB", (size, size), background)
    center = size / 2 + rng.uniform(-1, 1, 2)  # up to 1 px off centre
    fonts = digit_fonts(size)
    ImageDraw.Draw(image).text(tuple(center), str(index % 10), fill=ink, font=fonts[int(rng.choice(list(fonts)))],
                               anchor="mm", stroke_width=1, stroke_fill=ink)  # bold strokes
    return np.array(image)  # writable, as torch.from_numpy wants


class DigitsDataset(torch.utils.data.Dataset):
    """The built-in demo: 20,000 images of 10 classes, 3×24×24 in [-1, 1], drawn when first read (no flips: a
    mirrored digit is no digit)."""
    num_classes, channels, size, count = 10, 3, 24, 20_000

    def __init__(self, seed=0):
        self.seed = seed

    def __len__(self):
        return self.count

    def __getitem__(self, item):
        index, _ = item
        pixels = torch.from_numpy(render_digit(index, self.size, self.seed)).permute(2, 0, 1)
        return pixels.float() / 127.5 - 1, torch.tensor(index % 10)

    mean, std, multiplier = torch.zeros(3, 1, 1), torch.ones(3, 1, 1), 1.0  # pixels are not normalised


class LatentDataset(torch.utils.data.Dataset):
    """Latent shards of extract_latents.py (safetensors: latents, labels, and latents_flip unless extracted with
    --no-flip), memory-mapped and normalised; with flip=False the flipped latents are never read."""

    def __init__(self, folder, multiplier=1.0, stats=None, flip=True):
        paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        paths = [p for p in paths if not os.path.basename(p).startswith("latents_stats")]
        if not paths:
            raise ValueError(f"--data {folder}: expected a folder of latent shards (*.safetensors), found none")
        self.shards = [ucgm.load_safetensors(p) for p in paths]
        for path, shard in zip(paths, self.shards):
            if not {"latents", "labels"} <= set(shard) or shard["labels"].is_floating_point() \
                    or len(shard["labels"]) and int(shard["labels"].min()) < 0:  # labels are checked here, once
                raise ValueError(f"--data {path}: expected latents and labels (integers >= 0), and latents_flip unless "
                                 f"extracted with --no-flip, got "
                                 f"{ {k: f'{v.dtype} {tuple(v.shape)}' for k, v in shard.items()} }")
            shapes = [tuple(shard[k].shape[1:]) for k in ("latents", "latents_flip") if k in shard]
            if shapes[0] != shapes[-1] or shapes[0] != tuple(self.shards[0]["latents"].shape[1:]):
                raise ValueError(f"--data {path}: latents of shapes {shapes}, expected "
                                 f"{tuple(self.shards[0]['latents'].shape[1:])} as in {paths[0]}")
        self.offsets = np.cumsum([0] + [len(s["labels"]) for s in self.shards])
        self.channels, self.size = self.shards[0]["latents"].shape[1], self.shards[0]["latents"].shape[2]
        self.num_classes = int(max(int(s["labels"].max()) for s in self.shards)) + 1
        stats = stats or ucgm.stats_file(folder)
        if stats is None:  # extract_latents.py writes it last: a folder without it is unfinished or not normalised
            raise ValueError(f"--data {folder}: expected {os.path.join(folder, 'latents_stats.pt')} (written last by "
                             "extract_latents.py); give --latent-stats FILE, or --latent-stats none for raw latents")
        self.mean, self.std = ucgm.load_stats(None if stats == "none" else stats, self.channels)
        self.multiplier = multiplier
        self.flip = flip and all("latents_flip" in shard for shard in self.shards)

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, item):
        index, flip = item
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        data, row = self.shards[shard], index - self.offsets[shard]
        latent = data["latents_flip" if flip and self.flip else "latents"][row].float()
        return (latent - self.mean) / self.std * self.multiplier, data["labels"][row].long()


class SyntheticLatents(torch.utils.data.Dataset):
    """--bench data: Gaussian latents of a given shape with 1000 classes, one batch's worth, made on the fly."""
    num_classes, mean, std, multiplier = 1000, 0.0, 1.0, 1.0

    def __init__(self, channels, size, length):
        self.channels, self.size, self.length = channels, size, length

    def __len__(self):
        return self.length

    def __getitem__(self, item):
        index, _ = item
        generator = torch.Generator().manual_seed(index)
        return torch.randn(self.channels, self.size, self.size, generator=generator), torch.tensor(index % 1000)


class StepBatches(torch.utils.data.Sampler):
    """DistributedSampler semantics by step: epoch e is a permutation seeded by (seed, e); each rank takes its slice.

    Batch `step` is a pure function of (seed, step, rank), so a resumed run reads exactly what it would have read."""

    def __init__(self, size, global_batch, rank, world, seed, start_step, max_steps):
        if size < global_batch:
            raise ValueError(f"--global-batch-size {global_batch} exceeds the {size} examples of the dataset")
        self.size, self.global_batch, self.rank, self.world = size, global_batch, rank, world
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps

    def __len__(self):
        return self.max_steps - self.start_step

    def __iter__(self):
        per_epoch, local = self.size // self.global_batch, self.global_batch // self.world
        for step in range(self.start_step, self.max_steps):
            epoch, position = divmod(step, per_epoch)
            if step == self.start_step or position == 0:
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
                flips = torch.rand(self.size, generator=torch.Generator().manual_seed(self.seed * 100_019 + epoch)) < 0.5
            first = position * self.global_batch + self.rank * local
            yield [(int(order[i]), bool(flips[order[i]])) for i in range(first, first + local)]


#################################################################################
#                       Checkpoints, logs and sample grids                      #
#################################################################################

def every(step, period):
    """Whether a periodic action (log, checkpoint, grid) falls on this step; period 0 means never."""
    return period > 0 and step % period == 0


def save_checkpoint(state, folder, step, keep):
    """Write {step:07d}.pt atomically and point latest.pt at it; besides it keep the multiples of `keep` (0: none)."""
    path = os.path.join(folder, f"{step:07d}.pt")
    ucgm.atomic_write(path, lambda f: torch.save(state, f))
    link = os.path.join(folder, "latest.pt.tmplink")
    with contextlib.suppress(FileNotFoundError):
        os.remove(link)
    latest = os.path.join(folder, "latest.pt")
    try:
        os.link(path, link)
        os.replace(link, latest)  # atomic: latest.pt is always a whole checkpoint
    except OSError:  # a filesystem without hard links (some FUSE and object-store mounts): an atomic copy
        with open(path, "rb") as source:
            ucgm.atomic_write(latest, lambda f: shutil.copyfileobj(source, f))
    for old in glob.glob(os.path.join(folder, "[0-9]" * 7 + ".pt")):
        old_step = int(os.path.basename(old)[:7])
        if old_step != step and not every(old_step, keep):
            os.remove(old)


def append_log(path, record, keep_through=None):
    """Append one JSON line to log.jsonl; with keep_through, first drop the lines of later steps (after a resume)."""
    if keep_through is not None and os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.endswith("\n")]  # a line cut by a kill has no newline
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                if int(json.loads(line)["step"]) <= keep_through:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}: expected a JSON record with a 'step' on every line, line {number} is "
                                 f"{line.strip()[:60]!r}") from None
        ucgm.atomic_write(path, lambda f: f.write("".join(kept).encode()))
    if record is not None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


#################################################################################
#                     Memory, compilation and a frozen teacher                  #
#################################################################################

def no_grad_passes(trainer):
    """The no-grad forwards of a step in micro-batches (Alg. 1): the difference of Eq. (6) for 0 < λ < 1 (one), or
    λ = 1's central difference (l.12-13: both points in one doubled batch); for ζ ≠ 0 the teacher's of l.6 (doubled
    by fc-vs-fe, which asks it on y and on ∅)."""
    passes = [2 if trainer.lam == 1 else 1] if trainer.lam > 0 else []
    return passes + ([2 if trainer.enhance_style == "fc-vs-fe" else 1] if trainer.zeta != 0 else [])


def memory_estimate(model, batch, precision, compiled, grad_checkpoint, teacher, no_grad_rows=0, autoencoder=0):
    """Bytes of rank 0's GPU memory for training `model` on micro-batches of `batch` (README, "Memory"):
    float32 weights, gradients (DDP's buckets are views of them), Adam's m and v, the EMA (rank 0) and a teacher;
    autocast's bf16 weight copies; the activations the grad forward saves (SAVED_BYTES), which with
    --grad-checkpoint are each block's float32 input and one block recomputed at a time; beside them the largest
    no-grad pass (no_grad_rows micro-batches, `no_grad_passes`), about one block's tensors at a time (at most a
    compiled block's saved bytes); `autoencoder` bytes of weights for the grids, decoded between steps."""
    params = sum(p.numel() for p in model.parameters())
    state = params * (4 * (5 + teacher) + 2 * (precision == "bf16"))
    eager, fused, rest = SAVED_BYTES[ucgm.family_of(model.state_dict())][precision]
    tokens, depth = (model.input_size // model.patch_size) ** 2, len(model.blocks)
    width = model.t_embedder.mlp[-1].out_features
    block = fused if compiled else eager
    saved = rest + (4 * depth + block if grad_checkpoint else depth * block)
    return state + autoencoder + batch * tokens * width * (saved + no_grad_rows * (rest + fused))


def what_fits(model, args, micro_batch, budget, **setting):
    """The flags that bring memory_estimate under `budget` bytes: --grad-checkpoint, more --grad-accum, or the
    largest global batch."""
    def fits(batch, grad_checkpoint=args.grad_checkpoint):
        return memory_estimate(model, batch, grad_checkpoint=grad_checkpoint, **setting) <= budget
    options = ["--grad-checkpoint"] if not args.grad_checkpoint and fits(micro_batch, True) else []
    accum = next((k for k in range(2, micro_batch + 1) if micro_batch % k == 0 and fits(micro_batch // k)), None)
    options += [f"--grad-accum {args.grad_accum * accum}"] if accum else []
    largest = max((b for b in range(1, micro_batch) if fits(b)), default=0)
    world = args.global_batch_size // (args.grad_accum * micro_batch)
    options += [f"--global-batch-size {largest * world * args.grad_accum}"] if largest else []
    return " or ".join(options) or "nothing at this size (a smaller --model)"


@contextlib.contextmanager
def first_step_memory(active, advice, what):
    """Turn a CUDA out-of-memory error of the first step into one line naming the flags that fit (advice())."""
    try:
        yield
    except torch.OutOfMemoryError:
        if not active:
            raise
        raise ValueError(f"CUDA out of memory in the first step ({what}): {advice()} fits") from None


def compile_blocks(network):
    """torch.compile each block in place, as the released code does: one static graph serves every block of a shape,
    DDP stays eager around them (its hooks overlap the all-reduce with the backward, block by block), and
    --grad-checkpoint recomputes compiled blocks (a whole-model compile under DDP is split into ~108 graphs)."""
    if torch.distributed.is_initialized():  # DDPOptimizer would split each block's graph at DDP's bucket boundaries
        torch._dynamo.config.optimize_ddp = False
    # EDM2's blocks share one forward at ~20 shapes: room for a graph per block and pass (grad, no-grad, teacher),
    # so that none runs eager after dynamo's 8 recompiles of a code object (before torch 2.7: cache_size_limit)
    config = torch._dynamo.config
    names = ("recompile_limit", "accumulated_recompile_limit") if hasattr(config, "recompile_limit") else \
        ("cache_size_limit", "accumulated_cache_size_limit")
    for name in names:
        setattr(config, name, max(getattr(config, name), 3 * len(network.blocks)))
    for block in network.blocks:
        block.compile(dynamic=False)


def sha256_of(state):
    """A checksum of a state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous()
        digest.update(f"{key} {value.dtype} {tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


#################################################################################
#                                   Training                                    #
#################################################################################

class CautiousLion(torch.optim.Optimizer):
    """Lion with the cautious mask, the optimiser of the released REPA tuning: per tensor, u = sign(β1·m + (1 − β1)·g)
    is applied only where u·g > 0, scaled by numel / (count + 1); then m <- β2·m + (1 − β2)·g; decoupled decay."""
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in (p for p in group["params"] if p.grad is not None):
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = torch.lerp(p.grad, m, beta1).sign_()  # sign(β1·m + (1 − β1)·g)
                mask = (update * p.grad > 0).to(p.dtype)
                p.add_(update * mask * (mask.numel() / (mask.sum() + 1)), alpha=-group["lr"])
                m.lerp_(p.grad, 1 - beta2)


def resolve_autoencoder(args, data):
    """--vae and --vae-path of the grids (and FID): the flags, else the latents' own record (ucgm.LATENTS_INFO), else
    pixels; an explicit --vae that differs from the record is named in one line, and must decode the data's channels."""
    info = ucgm.latents_info(args.data) if args.data and not args.bench else None
    guessed = args.vae is None and not info and args.data  # pixels assumed for a folder without a record
    if info and args.vae in (None, info["autoencoder"]):
        recorded = args.vae_path is None
        args.vae, args.vae_path = info["autoencoder"], args.vae_path or info.get("vae_path")
        needed = args.sample_every or args.fid_every
        ucgm.require(not needed or args.vae_path is None or os.path.isfile(args.vae_path), f"--data {args.data}: the "
                     f"latents were made by {args.vae} from {args.vae_path} ({ucgm.LATENTS_INFO}), not found here; "
                     "give --vae-path FILE, or --sample-every 0 without --fid-every")
        if needed and not recorded and info.get("vae_sha256") not in (None, ucgm.file_sha256(args.vae_path)):
            print(f"--vae-path {args.vae_path}: not the file that made the latents of --data {args.data} (its "
                  f"SHA-256 differs from {ucgm.LATENTS_INFO}'s); the grids decode with it")
    elif info and args.vae != info["autoencoder"]:
        print(f"--vae {args.vae}: the latents of --data {args.data} were made by {info['autoencoder']} "
              f"({ucgm.LATENTS_INFO}); the grids decode with --vae {args.vae}")
    args.vae = args.vae or "identity"
    channels = ucgm.AUTOENCODERS.get(args.vae, {"channels": ucgm.PixelSpace.channels})["channels"]
    ucgm.require(args.bench or channels == data.channels, f"--vae {args.vae} decodes {channels}-channel latents, the "
                 f"data has {data.channels}" + (f" (--data {args.data} has no {ucgm.LATENTS_INFO}: give the --vae "
                                                "that made it)" if guessed else ""))


def build(args, rank, device):
    """(data, model, trainer, ema, optimizer, teacher_file) of a run: the start weights of --init or a new network,
    the EMA on rank 0 only (it alone samples and saves), a frozen --teacher named by its path and checksum."""
    if args.bench:
        data = SyntheticLatents(*args.bench_shape, length=args.global_batch_size)
    else:
        data = LatentDataset(args.data, args.latent_multiplier, args.latent_stats, args.flip) if args.data \
            else DigitsDataset(args.seed)
    init = ucgm.load_network(args.init, args.init_weights, args.model, "--init",  # DDT's weights hold no latent size
                             sizes={"input_size": data.size, "in_channels": data.channels}) if args.init else None
    if init:  # unless given, the architecture and the transport are those of the start weights
        args.model, args.transport = init[1], args.transport or init[2].get("transport", "Linear")
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run
    if init:
        model = init[0].to(device)
        ucgm.require(data.num_classes > 1 or model.num_classes <= 1, f"--init {args.init}: a class-conditional model "
                     f"({model.num_classes} classes), the data has one class (unconditional): every row would train "
                     "as class 0; give class-labelled data or unconditional weights")
        model.grad_checkpoint = args.grad_checkpoint
        ucgm.require((model.in_channels, model.input_size) == (data.channels, data.size) and model.num_classes >=
                     data.num_classes, f"--init {args.init}: the weights are for {model.num_classes} classes of "
                     f"{model.in_channels}×{model.input_size}×{model.input_size} latents, the data has "
                     f"{data.num_classes} classes of {data.channels}×{data.size}×{data.size}")
    else:
        ucgm.require(data.size % ucgm.MODELS[args.model].get("patch_size", 1) == 0, f"--model {args.model}: its patch size "
                     f"does not divide the {data.size}×{data.size} latents")
        model = ucgm.create_model(args.model, input_size=data.size, in_channels=data.channels,
                                  num_classes=data.num_classes, grad_checkpoint=args.grad_checkpoint).to(device)
    resolve_autoencoder(args, data)
    trainer = ucgm.UCGM(args.transport, args.lam, args.zeta, args.enhance_range, args.label_drop, args.huber_c,
                        args.cosine_loss, args.weighting, args.time_dist, args.teacher_decay,
                        enhance_style=args.enhance_style).to(device)
    null_label = args.zeta != 0 and trainer.enhance_style in ("ft-vs-fe", "fc-vs-fe")  # R is a prediction at ∅
    ucgm.require(data.num_classes > 1 or not null_label, f"--zeta {args.zeta} with --enhance-style "
                 f"{trainer.enhance_style}: compares the model with itself at the null label, but the data has one "
                 "class (unconditional); use --enhance-style fc-vs-xz, or --zeta 0")
    # the EMA samples and saves on rank 0; with --fid-every every rank samples, so every rank keeps one (the same)
    ema = copy.deepcopy(model).requires_grad_(False).eval() if rank == 0 or args.fid_every else None
    optimizer = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam, "clion": CautiousLion}[args.optimizer]
    fused = {"fused": True} if device.type == "cuda" and "fused" in inspect.signature(optimizer).parameters else {}
    opt = optimizer(model.parameters(), lr=args.lr, betas=args.betas, weight_decay=args.weight_decay, **fused)
    teacher_file = None
    if args.teacher:
        ucgm.require(trainer.needs_teacher, f"--teacher {args.teacher}: this run has no teacher (it needs --zeta != 0 "
                     "and --teacher-decay > 0)")
        trainer.make_teacher(model)
        state, _ = ucgm.read_checkpoint(args.teacher, "ema", "--teacher")
        where = f"--teacher {args.teacher} (for --model {args.model})"
        state = ucgm.checked_state_dict(trainer.teacher.state_dict(), state, where, strict=True)
        trainer.teacher.load_state_dict(state)
        if args.teacher_decay == 1:  # frozen: checkpoints name the file and its checksum instead of a 2.7 GB copy
            teacher_file = {"path": os.path.abspath(args.teacher), "sha256": sha256_of(state)}
    return data, model, trainer, ema, opt, teacher_file


def same_run(args, data, state, path):
    """Refuse, in one line naming both, a checkpoint of another model, data shape or transport: an --out folder
    of another run. The model and data shape can never change; the transport only with an explicit --resume PATH."""
    saved, shape = state.get("args", {}), (data.channels, data.size, data.size)
    then = (saved.get("model"), tuple(state.get("data_shape", shape)), saved.get("transport"))
    now = (args.model, shape, args.transport)
    if then == now:
        return
    text = "model {}, data {}, transport {}".format
    fixed = then[:2] != now[:2] or args.resume == "auto"
    ucgm.require(not fixed, f"--resume {path}: a checkpoint of {text(then[0], '×'.join(map(str, then[1])), then[2])},"
                 f" this run is {text(now[0], '×'.join(map(str, now[1])), now[2])}; give another --out" +
                 (", or --resume PATH to continue it on purpose" if then[:2] == now[:2] else ""))
    print(f"--resume {path}: continuing a {then[2]} run with transport {now[2]}, as asked")


def resume(args, path, data, model, ema, opt, trainer, teacher_file):
    """(step, skipped) of the checkpoint at path, loaded into the run, memory-mapped (8 ranks share the page cache)."""
    state = ucgm.load_tensor_file(path, "--resume", mmap=True)
    missing = {"model", "ema", "opt", "ucgm", "step", "rng"} - set(state if isinstance(state, dict) else ())
    ucgm.require(not missing, f"--resume {path}: not a train.py checkpoint (it lacks {sorted(missing)})")
    same_run(args, data, state, path)
    ucgm.checked_state_dict(model.state_dict(), state["model"], f"--resume {path} (for --model {args.model})",
                            strict=True)  # a checkpoint older than data_shape: still one line, not a traceback
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    if any(k.startswith("teacher.") for k in state["ucgm"]):
        trainer.make_teacher(model)
    saved = state.get("teacher_file")
    if saved:  # the frozen teacher is the --teacher file the run started with
        ucgm.require(teacher_file is not None and teacher_file["sha256"] == saved["sha256"], f"--resume {path}: "
                     f"trained with the frozen teacher {saved['path']} (sha256 {saved['sha256'][:12]}...); give that "
                     "file as --teacher")
        state["ucgm"] = {**state["ucgm"], **{f"teacher.{k}": v for k, v in trainer.teacher.state_dict().items()}}
    trainer.load_state_dict(state["ucgm"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"], state["skipped"]


def save(args, step, skipped, data, model, ema, opt, trainer, teacher_file):
    """Save everything that moves, so that a resumed run repeats this one exactly (a frozen --teacher by name)."""
    trainer_state = {k: v for k, v in trainer.state_dict().items() if not (teacher_file and k.startswith("teacher."))}
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "ucgm": trainer_state,
             "teacher_file": teacher_file, "args": vars(args), "latent_stats": {"mean": data.mean, "std": data.std},
             "data_shape": (data.channels, data.size, data.size),
             "step": step, "skipped": skipped, "rng": {"torch": torch.get_rng_state()}}
    save_checkpoint(state, os.path.join(args.out, "checkpoints"), step, args.keep_every)


def sample_grids(args, step, trainer, ema, autoencoder, data, autocast):
    """EMA samples with the UCGM-S preset of the model, eight per class (a row each), as OUT/samples_{step}.png;
    after the last step also OUT/steps_{step}.png: the first sample of each class with 1, 2, 4, 8, 40 steps."""
    preset, device = ucgm.sampler_preset(args.lam), next(ema.parameters()).device
    noise = torch.randn(80, data.channels, data.size, data.size, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(80) // 8 % data.num_classes  # eight per class, a row each

    @torch.no_grad()
    def decoded(noise, labels, steps):
        with autocast:
            images = trainer.sample(ema, noise.to(device), y=labels.to(device), **{**preset, "steps": steps},
                                    cfg_scale=args.sample_cfg if data.num_classes > 1 else 1.0)  # 1 class: unguided
        return ucgm.decode_latents(autoencoder, images, data.mean.to(device), data.std.to(device), data.multiplier, 16)
    ucgm.save_image_grid(decoded(noise, labels, preset["steps"]), 8, os.path.join(args.out, f"samples_{step:07d}.png"))
    torch.cuda.empty_cache()  # release the grid's cached blocks, of sizes a step never reuses (no-op on CPU)
    if step == args.max_steps:  # the same noise through ever more steps: a column per step count
        columns = [decoded(noise[::8], labels[::8], steps) for steps in STEPS_PICTURE]
        ucgm.save_image_grid(torch.stack(columns, 1).flatten(0, 1), len(STEPS_PICTURE),
                             os.path.join(args.out, f"steps_{step:07d}.png"))


def setup_fid(args, device, rank):
    """(Inception, reference mu and sigma) of --fid-every: the network on every rank, the reference on rank 0."""
    inception = fid.load_inception(args.inception_weights, device)
    reference = fid.load_reference(args.fid_ref, inception, 200) if rank == 0 else None
    return inception, reference


@torch.no_grad()
def training_fid(args, trainer, ema, autoencoder, data, inception, reference, autocast, rank, world, device):
    """FID of --fid-samples EMA samples (the UCGM-S preset of λ, no guidance, sample i of class i mod K with the
    noise of (--seed, i) as sample.py draws it) against --fid-ref; each rank draws every world-th sample and the
    sums of features and their products meet in one all-reduce. Rank 0 returns the number, the others None."""
    preset = ucgm.sampler_preset(args.lam)
    mine = list(range(rank, args.fid_samples, world))
    width = inception.fc.in_features  # 2048 pool features
    sums = torch.zeros(width + width * width + 1, dtype=torch.float64, device=device)  # Σf, Σff^T, n
    for first in range(0, len(mine), 100):  # 100 samples a call bounds the decoder's memory
        indices = mine[first:first + 100]
        noise = ucgm.indexed_noise((data.channels, data.size, data.size), args.seed, indices).to(device)
        labels = torch.tensor(indices, device=device) % data.num_classes
        with autocast:
            latents = trainer.sample(ema, noise, y=labels, **preset)
        pixels = ucgm.to_uint8(ucgm.decode_latents(autoencoder, latents, data.mean.to(device), data.std.to(device),
                                                   data.multiplier, 25))
        with fid.full_fp32():  # the features in IEEE float32, as fid.py computes them
            pool = inception(pixels)["pool"].double()
        sums += torch.cat([pool.sum(0), (pool.T @ pool).flatten(), pool.new_tensor([len(pool)])])
    sums = ucgm.all_reduce(sums, device).cpu().numpy()  # Σf, Σff^T and n over all ranks
    if rank:
        return None
    n, mu = sums[-1], sums[:width] / sums[-1]
    sigma = (sums[width:-1].reshape(width, width) - n * np.outer(mu, mu)) / (n - 1)  # unbiased, as numpy.cov
    return fid.frechet_distance(mu, sigma, reference["mu"], reference["sigma"])


def open_tracker(args):
    """The writer of each log record: log.jsonl, and W&B (--wandb) or TensorBoard (--tensorboard), optional packages
    imported only when their flag is given."""
    path = os.path.join(args.out, "log.jsonl")
    scalars = lambda record: {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    if args.wandb:
        wandb = optional_package("wandb", "wandb", "--wandb")
        run_id = hashlib.sha256(os.path.abspath(args.out).encode()).hexdigest()[:16]  # a resumed run logs on
        run = wandb.init(project=args.wandb, name=os.path.basename(os.path.normpath(args.out)), config=vars(args),
                         dir=args.out, resume="allow", id=run_id)
        tracker = lambda record: run.log(scalars(record), step=record["step"])
    elif args.tensorboard:
        board = optional_package("torch.utils.tensorboard", "tensorboard", "--tensorboard").SummaryWriter(
            os.path.join(args.out, "tensorboard"))

        def tracker(record):  # flushed at once: its writer thread would hold up to 2 minutes of scalars at exit
            for key, value in scalars(record).items():
                board.add_scalar(key, value, record["step"])
            board.flush()
    else:
        tracker = lambda record: None

    def log(record):
        append_log(path, record)
        tracker(record)
    return log


def optional_package(module, package, flag):
    """Import an optional integration, or one line naming the flag that asked for it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{flag}: needs the optional package {package} (pip install {package})") from None


def train_step(args, net, model, trainer, opt, x, y, autocast):
    """Alg. 1 on one global batch over --grad-accum micro-batches, the gradient norm (clipped with --grad-clip) and,
    if every rank's loss and norm are finite, the optimiser step; returns (loss, grad norm, whether it stepped)."""
    step_loss = torch.zeros((), device=x.device)
    for micro, (xm, ym) in enumerate(zip(x.chunk(args.grad_accum), y.chunk(args.grad_accum))):
        last = micro == args.grad_accum - 1
        with (contextlib.nullcontext() if last or net is model else net.no_sync()), autocast:
            loss = trainer.loss(net, xm, ym) / args.grad_accum
        loss.backward()
        step_loss += loss.detach()
    if args.grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    else:  # the norm for the log and the guard, without clipping's rescale pass over every gradient
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    bad = ucgm.all_reduce((~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))).float(), x.device, "max")
    stepped = not bad.item()  # the guard's one host sync a step, read after the backward has queued; ranks agree
    if stepped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return step_loss, grad_norm, stepped


def main(args):
    """Train until --max-steps; resumable at any point from the newest checkpoint."""
    started = time.time()
    rank, world, device = ucgm.setup_distributed()
    budget = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None  # free, before anything is built
    args.compile = ucgm.resolve_compile(args.compile, device)
    ucgm.require(args.global_batch_size % (world * args.grad_accum) == 0, f"--global-batch-size "
                 f"{args.global_batch_size} must divide by processes × --grad-accum = {world * args.grad_accum}")
    checkpoints, writer = os.path.join(args.out, "checkpoints"), rank == 0 and not args.bench  # --bench writes nothing
    data, model, trainer, ema, opt, teacher_file = build(args, rank, device)
    if ucgm.family_of(model.state_dict()) not in SAVED_BYTES:  # EDM2: no measured activations, so no estimate
        budget = None
    if writer:
        os.makedirs(checkpoints, exist_ok=True)
        for stale in glob.glob(os.path.join(checkpoints, "*.tmp*")):  # left by a run killed while saving
            os.remove(stale)
        ucgm.write_json(os.path.join(args.out, "args.json"), vars(args))
        print(json.dumps(vars(args)))
    start_step, skipped = 0, 0
    path = os.path.join(checkpoints, "latest.pt") if args.resume == "auto" else args.resume
    if path and os.path.exists(path) and not args.bench:
        start_step, skipped = resume(args, path, data, model, ema, opt, trainer, teacher_file)
        if rank == 0:
            print(f"resumed from {path} at step {start_step}")
    ucgm.require(args.resume in (None, "auto") or os.path.exists(args.resume), f"--resume {args.resume}: no such "
                 "checkpoint")
    if writer:
        append_log(os.path.join(args.out, "log.jsonl"), None, keep_through=start_step)
    sampling = (writer and args.sample_every) or args.fid_every  # the grids (rank 0), the FID (every rank) decode
    autoencoder = ucgm.create_autoencoder(args.vae, args.vae_path).to(device) if sampling else None
    fid_setup = setup_fid(args, device, rank) if args.fid_every else None
    log = open_tracker(args) if writer else None

    trainer.make_teacher(model)  # before compiling: the teacher is a copy of the plain network
    if args.compile:  # fuses the elementwise work of every block: ~2.5x less memory traffic on a GPU
        for network in filter(None, (model, trainer.teacher)):  # the teacher's no-grad forwards: 1/4 of a step
            compile_blocks(network)
    # the gradients are views of DDP's buckets (one copy, not two); the RoPE tables never change, so no buffer sync
    # before each forward (torch 2.13 renamed broadcast_buffers forward_sync_buffers)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
              **{no_sync: False}) if dist.is_initialized() else model
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=StepBatches(len(data), args.global_batch_size, rank, world, args.seed, start_step,
                                        args.max_steps), num_workers=args.num_workers, pin_memory=device.type == "cuda")
    precision = ucgm.resolve_precision(args.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    passes = no_grad_passes(trainer)
    flops = model.flops_per_forward() * args.global_batch_size * (3 + sum(passes))  # forward and backward: 3
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = next((v for k, v in PEAK_FLOPS if k in name), None)
    micro_batch = args.global_batch_size // (world * args.grad_accum)
    autoencoder_bytes = 0 if autoencoder is None else \
        sum(v.numel() * v.element_size() for v in autoencoder.state_dict().values())  # for the grids
    setting = dict(precision=precision, compiled=args.compile, teacher=trainer.teacher is not None,
                   no_grad_rows=max(passes, default=0), autoencoder=autoencoder_bytes)
    if budget is not None and rank == 0:
        estimate = memory_estimate(model, micro_batch, grad_checkpoint=args.grad_checkpoint, **setting)
        print(f"memory: ~{estimate / 2**30:.1f} GiB estimated for {micro_batch} images a micro-batch, "
              f"{budget / 2**30:.1f} GiB free on {name}" + ("" if peak else "; MFU: peak FLOP/s of this GPU unknown"))

    model.train()
    warmup, record = min(BENCH_WARMUP, args.max_steps - 1), {}  # --bench reports the steps after the warm-up
    bad_in_a_row, window_loss, window_steps, window_start = 0, torch.zeros((), device=device), 0, time.time()
    window_first = start_step + 1
    bar = tqdm(total=args.max_steps, initial=start_step, disable=rank != 0, dynamic_ncols=True)
    for step, batch in enumerate(loader, start=start_step + 1):
        seed = np.random.SeedSequence([args.seed, rank, step]).generate_state(1)[0]
        torch.manual_seed(int(seed))  # t, noise and label noise of this step: a function of (seed, rank, step)
        x, y = (v.to(device, non_blocking=True) for v in batch)
        with first_step_memory(step == start_step + 1 and budget is not None,  # the first step allocates the most
                               functools.partial(what_fits, model, args, micro_batch, budget, **setting),
                               f"{micro_batch} images a micro-batch on {name}"):
            step_loss, grad_norm, stepped = train_step(args, net, model, trainer, opt, x, y, autocast)
        if stepped and ema is not None:
            # a new network's EMA warms up (early weights fade fast); from --init weights, the constant decay as released
            decay = args.ema_decay if args.init else min(args.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
        bad_in_a_row, skipped = (0, skipped) if stepped else (bad_in_a_row + 1, skipped + 1)
        ucgm.require(bad_in_a_row < args.max_bad_steps, f"stopping: {bad_in_a_row} consecutive non-finite losses or "
                     f"gradients at step {step}; the last good checkpoint is kept in {checkpoints}")
        if stepped:
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
        bar.update(1)
        if every(step, args.log_every) or step == args.max_steps or (args.bench and step == warmup):
            window_loss = ucgm.all_reduce(window_loss, device).item()  # waits for the GPU: the window's time is true
            elapsed, steps_done = time.time() - window_start, step - window_first + 1
            memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            record = {"step": step, "time": round(time.time(), 3), "loss": window_loss / world / window_steps
                      if window_steps else None,
                      "grad_norm": grad_norm.item(), "lr": opt.param_groups[0]["lr"],
                      "img_per_s": steps_done * args.global_batch_size / elapsed, "ms_per_step": 1000 * elapsed / steps_done,
                      "skipped": skipped, "peak_mem_gb": memory / 2 ** 30}
            record.update({"mfu": flops * steps_done / elapsed / world / peak} if peak else {})
            if writer:
                log(record)
                bar.set_postfix(loss=f"{record['loss'] or float('nan'):.4f}", img_s=f"{record['img_per_s']:.0f}")
            window_loss, window_steps, window_start, window_first = torch.zeros((), device=device), 0, time.time(), step + 1
        if writer and (every(step, args.ckpt_every) or step == args.max_steps) and not bad_in_a_row:
            save(args, step, skipped, data, model, ema, opt, trainer, teacher_file)
        grid = args.sample_every and (every(step, args.sample_every) or step == args.max_steps)
        if writer and grid:
            sample_grids(args, step, trainer, ema, autoencoder, data, autocast)
        if args.fid_every and (every(step, args.fid_every) or step == args.max_steps):  # every rank samples
            score = training_fid(args, trainer, ema, autoencoder, data, *fid_setup, autocast, rank, world, device)
            if writer:
                log({"step": step, "time": round(time.time(), 3), "fid": score, "fid_samples": args.fid_samples})
        if dist.is_initialized() and (every(step, args.ckpt_every) or grid):  # the others wait here, not in a collective
            dist.barrier()
    bar.close()
    report(args, record, data, world, precision, started, start_step, model, device)


def report(args, record, data, world, precision, started, start_step, model, device):
    """The last line: the benchmark (its last log window, after the warm-up steps) or the run's wall time; with
    several processes, a checksum of the weights, which DDP keeps equal on every rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and args.bench:
        print(f"bench {args.model} on {data.channels}×{data.size}×{data.size}, batch {args.global_batch_size // world}"
              f"/process, lam {args.lam}, {precision}, {'compiled' if args.compile else 'eager'}: "
              f"{record['img_per_s']:.1f} img/s, {record['ms_per_step']:.1f} ms/step, peak memory "
              f"{record['peak_mem_gb']:.2f} GiB" + (f", MFU {record['mfu']:.1%}" if "mfu" in record else ""))
    elif rank == 0:
        minutes, seconds = divmod(round(time.time() - started), 60)
        print(f"{args.out}: steps {start_step + 1}-{args.max_steps} done, train.py took {minutes} min {seconds} s")
    if world > 1:
        total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
        low, high = ucgm.all_reduce(total, device, "min"), ucgm.all_reduce(total, device, "max")
        if rank == 0:
            print(f"weights identical on all {world} ranks: {bool(low == high)}")
    if dist.is_initialized():
        dist.destroy_process_group()


def defaults(key):
    """How --help shows the default of a preset-controlled flag: the paper's, then each preset's and the demo's."""
    def text(value):
        return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
    layers = [("", BASE), *((f"{name} ", PRESETS[name]) for name in sorted(PRESETS)), ("demo ", DEMO)]
    return " (" + "; ".join(f"{label}{text(layer[key])}" for label, layer in layers if key in layer) + ")"


def parse_args(argv=None):
    """Flags grouped by topic; preset-controlled ones default to None and are resolved by resolve()."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("method (UCGM-T, paper Alg. 1)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="paper recipe; explicit flags override it")
    g.add_argument("--transport", choices=sorted(ucgm.TRANSPORTS), help="transport" + defaults("transport"))
    g.add_argument("--lam", type=ucgm.number("[0, 1]"), help="consistency ratio λ: 0 multi-step .. 1 few-step" + defaults("lam"))
    g.add_argument("--zeta", type=ucgm.number(), help="enhanced-target strength ζ; λ = 0 needs ζ < 1" + defaults("zeta"))
    g.add_argument("--enhance-range", type=ucgm.number("[0, 1]"), nargs=2,
                   help="open t interval where ζ acts" + defaults("enhance_range"))
    g.add_argument("--label-drop", type=ucgm.number("[0, 1]"), help="fraction of labels nulled for guidance" + defaults("label_drop"))
    g.add_argument("--huber-c", type=ucgm.number("[0, inf)"), help="pseudo-Huber constant c; 0 is an RMS loss" + defaults("huber_c"))
    g.add_argument("--cosine-loss", action=argparse.BooleanOptionalAction, help="add 1 - cosine similarity" + defaults("cosine_loss"))
    g.add_argument("--weighting", choices=["cosine", "none"], help="loss weight cos(πt/2) or none" + defaults("weighting"))
    g.add_argument("--time-dist", type=ucgm.number("(0, inf)"), nargs=3,
                   help="t = clamp(s·Beta(θ1, θ2)): θ1 θ2 s" + defaults("time_dist"))
    g.add_argument("--teacher-decay", type=ucgm.number("[0, 1]"),
                   help="teacher: 0 online, (0,1) EMA, 1 frozen" + defaults("teacher_decay"))
    g.add_argument("--enhance-style", choices=ucgm.ENHANCE_STYLES,
                   help="what ζ compares: ft-vs-fe, fc-vs-xz, fc-vs-fe (README rule 'enhanced styles'); default by λ: "
                        "ft-vs-fe for 0, fc-vs-xz above" + defaults("enhance_style"))
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=sorted(ucgm.MODELS), metavar="NAME",
                   help="network, {DiT,TiT}-{T,S,B,L,XL}/{1,2,4}" + defaults("model"))
    g.add_argument("--data", help="folder of latent shards; without it, the built-in digits demo")
    g.add_argument("--latent-multiplier", type=ucgm.number("(0, inf)"), default=1.0,
                   help="scale after normalising (0.18215 SD-VAE)")
    g.add_argument("--latent-stats", help="mean/std file, or 'none' for raw latents (default: DATA/latents_stats.pt, required)")
    g.add_argument("--vae", choices=["identity", *ucgm.AUTOENCODERS],
                   help="autoencoder that decodes the sample grids (default: the one DATA/latents_info.json names)")
    g.add_argument("--vae-path", help="its local weight file (default: the one DATA/latents_info.json names)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="train on the flipped latents half of the time, where the data has them (--no-flip: never)")
    g.add_argument("--out", help="output folder: checkpoints/, log.jsonl, samples (runs/demo without --data; "
                   "runs/PRESET_MODEL_DATA with it)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--global-batch-size", type=ucgm.number("[1, inf)", int),
                   help="images per step over all processes" + defaults("global_batch_size"))
    g.add_argument("--grad-accum", type=ucgm.number("[1, inf)", int), default=1,
                   help="micro-batches per step and process (1)")
    g.add_argument("--max-steps", type=ucgm.number("[1, inf)", int), help="training steps" + defaults("max_steps"))
    g.add_argument("--optimizer", choices=["adamw", "radam", "clion"],
                   help="optimiser (clion: cautious Lion, the released REPA tuning)" + defaults("optimizer"))
    g.add_argument("--lr", type=ucgm.number("(0, inf)"), help="learning rate" + defaults("lr"))
    g.add_argument("--betas", type=ucgm.number("[0, 1)"), nargs=2, help="Adam betas" + defaults("betas"))
    g.add_argument("--weight-decay", type=ucgm.number("[0, inf)"), help="decoupled weight decay" + defaults("weight_decay"))
    g.add_argument("--grad-clip", type=ucgm.number("[0, inf)"), help="gradient-norm clip, 0 = off" + defaults("grad_clip"))
    g.add_argument("--ema-decay", type=ucgm.number("[0, 1]"),
                   help="EMA of the weights for sampling" + defaults("ema_decay"))
    g.add_argument("--max-bad-steps", type=ucgm.number("[1, inf)", int), default=10,
                   help="stop after this many non-finite steps in a row (10)")
    g = p.add_argument_group("speed")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast or float32 (TF32 matmuls on CUDA); auto: bf16 on CUDA, fp32 on CPU (auto)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile each transformer block of the model and its teacher (on CUDA; off on CPU)")
    g.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing: less memory, +1 forward")
    g.add_argument("--num-workers", type=ucgm.number("[0, inf)", int), default=2,
                   help="data-loading processes per rank (2)")
    g.add_argument("--seed", type=ucgm.seed, default=0, help="seed of data order, t and noise (0)")
    g.add_argument("--bench", type=ucgm.number("[2, inf)", int), metavar="N",
                   help="time N steps on synthetic data; write nothing")
    g.add_argument("--bench-shape", type=ucgm.number("[1, inf)", int), nargs=2, default=(32, 16), metavar=("C", "SIZE"),
                   help="latent channels and size of the --bench data (32 16: VA-VAE at 256 px)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=ucgm.number("[0, inf)", int),
                   help="steps between log.jsonl lines, 0: only the last" + defaults("log_every"))
    g.add_argument("--ckpt-every", type=ucgm.number("[0, inf)", int),
                   help="save a checkpoint every this many steps, 0: only the last" + defaults("ckpt_every"))
    g.add_argument("--keep-every", type=ucgm.number("[0, inf)", int), help="keep the checkpoints of the multiples of "
                   "this many steps, and the latest; 0: only the latest (default: --ckpt-every, all)")
    g.add_argument("--sample-every", type=ucgm.number("[0, inf)", int),
                   help="steps between EMA sample grids, 0: none" + defaults("sample_every"))
    g.add_argument("--sample-cfg", type=ucgm.number(), help="guidance scale of the sample grids" + defaults("sample_cfg"))
    g.add_argument("--fid-every", type=ucgm.number("[0, inf)", int), default=0,
                   help="FID of EMA samples every this many steps, all ranks sampling (0: never)")
    g.add_argument("--fid-ref", help="reference .npz for --fid-every (ADM batch or fid.py --save-stats)")
    g.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth, for --fid-every")
    g.add_argument("--fid-samples", type=ucgm.number("[2, inf)", int), default=10_000,
                   help="samples per --fid-every evaluation (10000)")
    g.add_argument("--wandb", metavar="PROJECT", help="also log to this W&B project (needs the wandb package)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log to OUT/tensorboard (needs the tensorboard package)")
    g.add_argument("--resume", default="auto", help="'auto' (newest in OUT/checkpoints), a path, or 'none'")
    g.add_argument("--init", help="start weights, and unless given --model and --transport: any checkpoint "
                   "sample.py reads (ours, released UCGM, SiT, REPA, REPA-E, LightningDiT)")
    g.add_argument("--init-weights", choices=["ema", "model"], default="ema",
                   help="which weights of an --init checkpoint that holds both (ema)")
    g.add_argument("--teacher", help="weights of the frozen teacher (teacher-decay 1), e.g. a multi-step model")
    args = resolve(p.parse_args(argv))
    if args.fid_every and not (args.fid_ref and args.inception_weights):
        p.error("--fid-every needs --fid-ref and --inception-weights")
    return args


def resolve(args):
    """Fill unset flags: explicit flag > --preset > demo (no --data) > BASE; a --data run without --out writes to
    runs/PRESET_MODEL_DATA, never to the demo's runs/demo."""
    for key, value in BASE.items():
        if getattr(args, key) is None and not (args.init and key in ("model", "transport")):  # --init's, in main
            layers = [PRESETS.get(args.preset, {}), {} if args.data else DEMO, BASE]
            setattr(args, key, next(layer[key] for layer in layers if key in layer))
    args.weighting = None if args.weighting == "none" else args.weighting
    args.resume = None if args.resume == "none" else args.resume
    args.keep_every = args.ckpt_every if args.keep_every is None else args.keep_every
    if args.out is None and args.data:
        model = args.model.replace("/", "-") if args.model else os.path.splitext(os.path.basename(args.init))[0]
        args.out = os.path.join("runs", f"{args.preset or 'custom'}_{model}_{os.path.basename(os.path.normpath(args.data))}")
    args.out = args.out or "runs/demo"
    if args.bench:
        args.max_steps = args.log_every = args.bench
    return args


if __name__ == "__main__":
    ucgm.run_script(main, parse_args)
