"""
Sample a UCGM model with UCGM-S (paper Alg. 2) into an ADM-format .npz for FID.

  torchrun --nproc_per_node=8 sample.py --ckpt run/checkpoints/latest.pt --num-samples 50000 --out samples/
  python sample.py --ckpt SiT-XL-2-256.pt --model DiT-XL/2 --transport Linear --vae sdvae \\
      --vae-path sd-vae-ft-ema/diffusion_pytorch_model.safetensors --latent-multiplier 0.18215 --out sit/

Reads our checkpoints, the released UCGM ones and bare state dicts. Sample i has class i mod K (or --class)
and its noise comes from (--seed, i); shard k holds samples [k·B, (k+1)·B) and is drawn as one batch, so the
samples do not depend on the number of processes. Finished shards are skipped when a run is restarted.
"""

import argparse
import json
import math
import os
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import fid
import ucgm


# defaults of the settings that neither a flag nor the checkpoint set, besides the UCGM-S preset of the model
DEFAULTS = dict(order=1, cfg_scale=1.0, cfg_interval=(0.0, 1.0), cfg_channels=None, transport="Linear", vae="identity",
                latent_multiplier=1.0, seed=0)


def resolve(args, settings):
    """{setting: (value, source)}: an explicit flag, else the checkpoint's (its released `sample` section), else the
    UCGM-S preset for the checkpoint's lam (`ucgm.sampler_preset`: ρ = λ, few-step if lam > 0.5), else DEFAULTS;
    --schedule edm is EDM's deterministic sampler (Table 1), so it sets κ = 0 and ρ = 0 above the checkpoint's."""
    preset = ucgm.sampler_preset(settings.get("lam", 0.0))
    edm = {"kappa": 0.0, "rho": 0.0} if getattr(args, "schedule", "warp") == "edm" else {}
    layers = [("flag", vars(args)), ("schedule edm", edm), ("checkpoint", {**settings, **settings.get("sampler", {})}),
              ("preset", preset), ("default", DEFAULTS)]
    resolved = {}
    for key in (*preset, *DEFAULTS):
        source, value = next((source, layer[key]) for source, layer in layers
                             if layer.get(key) is not None or source == "default")
        resolved[key] = (tuple(value) if isinstance(value, list) else value, source)
    return resolved


def latent_stats(args, settings, channels, vae):
    """(mean, std) of the latent normalisation: --latent-stats (file, latent folder or none), else the checkpoint's,
    else the autoencoder's own (EDM2's constants for edm2sdvae)."""
    if args.latent_stats == "none":
        return ucgm.load_stats(None, channels)
    if args.latent_stats:
        path = ucgm.stats_file(args.latent_stats) if os.path.isdir(args.latent_stats) else args.latent_stats
        if not path or not os.path.isfile(path):
            raise ValueError(f"--latent-stats {args.latent_stats}: no stats file there")
        return ucgm.load_stats(path, channels)
    stats = settings.get("latent_stats") or (ucgm.DEFAULT_LATENT_STATS.get(vae) if settings.get("latent_norm", True)
                                              else None)  # a config saying raw latents keeps them raw
    if stats is None and settings.get("latent_norm"):  # a released model on normalised latents: stats in a file
        raise ValueError(f"--ckpt {args.ckpt}: the model was trained on normalised latents (data.latent_norm); give "
                         f"--latent-stats (the released pipeline reads {settings['released_stats']})")
    return (stats["mean"].reshape(channels, 1, 1), stats["std"].reshape(channels, 1, 1)) if stats \
        else ucgm.load_stats(None, channels)


def edm_times(args, transport, steps, order, rho=7.0):
    """--schedule edm: EDM's noise levels (Karras et al. 2022, Eq. (5), ρ = 7), n of them from --sigma-max down to
    --sigma-min evenly in σ^(1/ρ), n = steps halved for order 2 (UCGM-S's count, Alg. 2 l.1), as EDM transport times
    (float64), then the data end t = 0; with --order 2 --steps 35 EDM's own 18 levels and 35 evaluations."""
    if transport != "EDM":
        raise ValueError(f"--schedule edm: EDM's noise levels need the EDM transport, the model's is {transport}")
    edm = ucgm.TRANSPORTS["EDM"]
    sigma_at_data_end = float(edm.alpha(torch.tensor(0.0)) / edm.gamma(torch.tensor(0.0)))  # σ = α/γ at t = 0
    if not sigma_at_data_end < args.sigma_min < args.sigma_max:
        raise ValueError(f"--sigma-min {args.sigma_min} --sigma-max {args.sigma_max}: expected "
                         f"{sigma_at_data_end:.5f} (σ at the EDM transport's data end) < sigma-min < sigma-max")
    n = (steps + 1) // 2 if order == 2 else steps
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    top, bottom = args.sigma_max ** (1 / rho), args.sigma_min ** (1 / rho)
    return torch.cat([edm.time((top + ramp * (bottom - top)) ** rho), torch.zeros(1, dtype=torch.float64)])


def shard_path(out, k):
    return os.path.join(out, "shards", f"{k:06d}.safetensors")


def main(args):
    rank, world, device = ucgm.setup_distributed()
    model, name, settings = ucgm.load_network(args.ckpt, args.weights, args.model,
                                              sizes={"input_size": args.input_size} if args.input_size else None)
    model = model.to(device).eval().requires_grad_(False)
    resolved = resolve(args, settings)
    sampler = {key: value for key, (value, _) in resolved.items()}
    transport, vae, multiplier, seed = (sampler.pop(key) for key in ("transport", "vae", "latent_multiplier", "seed"))
    times = edm_times(args, transport, sampler["steps"], sampler["order"]) if args.schedule == "edm" else None
    if args.vae is None:  # an explicit --vae wins over the checkpoint's, even one we lack
        ucgm.check_released_autoencoder(settings, f"--ckpt {args.ckpt}")
    vae_path = args.vae_path or (settings.get("vae_path") if vae == settings.get("vae") else None)
    autoencoder = ucgm.create_autoencoder(vae, vae_path).to(device).eval()
    if autoencoder.channels != model.in_channels:
        raise ValueError(f"--vae {vae} decodes {autoencoder.channels}-channel latents, the model makes {model.in_channels}")
    mean, std = (s.to(device) for s in latent_stats(args, settings, model.in_channels, vae))
    num_classes = model.num_classes if model.num_classes > 1 else 0  # DiT: 1, EDM2: 0 is unconditional
    if args.class_id is not None and not 0 <= args.class_id < max(num_classes, 1):
        raise ValueError(f"--class {args.class_id}: expected a class id in [0, {num_classes - 1}]")
    if sampler["cfg_scale"] != 1.0 and not num_classes:
        raise ValueError("--cfg-scale: guidance needs a class-conditional model")

    config = dict(ckpt=os.path.abspath(args.ckpt), weights=args.weights, model=name, transport=transport, vae=vae,
                  multiplier=multiplier, num_samples=args.num_samples, batch_size=args.batch_size, seed=seed,
                  class_id=args.class_id, dit_rounding=args.dit_rounding, schedule=args.schedule,
                  sigma_range=[args.sigma_min, args.sigma_max] if times is not None else None,
                  sampler={k: list(v) if isinstance(v, tuple) else v for k, v in sampler.items()})
    ucgm.claim_folder(args.out, "sample.json", config, write=rank == 0)
    if rank == 0:
        os.makedirs(os.path.join(args.out, "shards"), exist_ok=True)
        print(f"{args.ckpt}: {name}, transport {transport}")
        for key, (value, source) in resolved.items():
            print(f"  {key} = {value} ({source})")
        if times is not None:  # EDM's levels replace the warp and gaps
            print(f"  schedule = edm: {len(times) - 1} noise levels from {args.sigma_max} to {args.sigma_min}")
    if dist.is_initialized():
        dist.barrier()

    trainer = ucgm.UCGM(transport)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    if ucgm.resolve_compile(args.compile, device):
        model.compile(dynamic=False)  # static graphs: batch B, 2B inside cfg_interval, and a short last shard
    num_shards = math.ceil(args.num_samples / args.batch_size)
    todo = ucgm.missing_shards(num_shards, lambda k: shard_path(args.out, k), rank, world)  # dealt evenly
    shape = (model.in_channels, model.input_size, model.input_size)
    for k in tqdm(todo, disable=rank != 0, desc="sampling", unit="shard"):
        indices = range(k * args.batch_size, min((k + 1) * args.batch_size, args.num_samples))
        noise = ucgm.indexed_noise(shape, seed, indices).to(device)  # sample i's noise depends on (seed, i) alone
        labels = torch.tensor([args.class_id if args.class_id is not None else i % max(num_classes, 1)
                               for i in indices], device=device)
        generator = torch.Generator(device).manual_seed(seed * 2**32 + args.num_samples + k)  # for rho > 0
        with torch.no_grad():
            with autocast:
                latents = trainer.sample(model, noise, generator=generator, times=times, **sampler,
                                         **({"y": labels} if num_classes else {}))
            images = ucgm.decode_latents(autoencoder, latents, mean, std, multiplier, args.decode_batch)
        pixels = ucgm.to_uint8(images, args.dit_rounding).permute(0, 2, 3, 1).cpu()  # NHWC
        ucgm.save_safetensors({"images": pixels.contiguous(), "labels": labels.cpu()}, shard_path(args.out, k))

    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        merge(args, num_shards)
    if dist.is_initialized():
        dist.destroy_process_group()


def merge(args, num_shards):
    """Stream the shards into OUT/samples.npz (ADM layout: arr_0 uint8 NHWC, arr_1 labels) one shard at a time, so
    that memory holds one shard and never all images; draw a grid of the first 64."""
    paths = [shard_path(args.out, k) for k in range(num_shards)]
    shards = [ucgm.load_safetensors(path) for path in paths]  # memory maps: only the labels are read here
    total = (sum(len(shard["images"]) for shard in shards), *shards[0]["images"].shape[1:])
    labels = np.concatenate([shard["labels"].numpy() for shard in shards])
    del shards  # the images are mapped again one shard at a time, so that their pages can leave memory after use

    def write(f):  # the bytes np.savez writes, produced piecewise: a stored (uncompressed) zip of .npy members
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:  # force: its size is not known yet
                np.lib.format.write_array_header_2_0(member, {"descr": "|u1", "fortran_order": False, "shape": total})
                for path in paths:
                    member.write(ucgm.load_safetensors(path)["images"].numpy().data)  # one shard's pages at a time
            with archive.open("arr_1.npy", "w") as member:
                np.lib.format.write_array(member, labels)

    path = os.path.join(args.out, "samples.npz")
    ucgm.atomic_write(path, write)
    first = ucgm.load_safetensors(paths[0])["images"][:64].permute(0, 3, 1, 2).float() / 127.5 - 1
    ucgm.save_image_grid(first, 8, os.path.join(args.out, "samples.png"))
    print(f"{path}: {total[0]} samples of {total[1]}×{total[2]}, {len(np.unique(labels))} classes")
    if args.fid_ref:  # FID, IS, sFID, precision and recall right away, through fid.py's API (streamed from the file)
        inception = fid.load_inception(args.inception_weights, "cuda" if torch.cuda.is_available() else "cpu")
        metrics = fid.compute_metrics(path, args.fid_ref, inception)
        print(json.dumps(metrics, indent=2))
        ucgm.write_json(os.path.join(args.out, "metrics.json"), metrics)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", required=True, help="our checkpoint, a released UCGM one, or a bare state dict")
    g.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of a checkpoint (ema)")
    g.add_argument("--model", choices=sorted(ucgm.MODELS), metavar="NAME",
                   help="architecture (default: the checkpoint's, or matched by the weight shapes)")
    g.add_argument("--input-size", type=ucgm.number("[1, inf)", int),
                   help="latent size, for weights that do not tell it (DDT without its config: 32 at 256 px, 64 at 512)")
    g.add_argument("--transport", choices=sorted(ucgm.TRANSPORTS), help="(default: the checkpoint's, else Linear)")
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="network precision: fp32 as the released evaluation (TF32 matmuls on CUDA), or bf16 autocast, "
                        "faster; the decode is always float32 (fp32)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the network (default: on CUDA, not on CPU)")
    g = p.add_argument_group("UCGM-S; defaults: the released checkpoint's settings, else the preset for its lam")
    g.add_argument("--steps", type=ucgm.number("[1, inf)", int), help="sampling steps (40 multi-step / 2 few-step)")
    g.add_argument("--rho", type=ucgm.number("[0, 1]", words=["auto"]),
                   help="stochasticity in [0, 1] or 'auto' (0 / 1)")
    g.add_argument("--kappa", type=ucgm.number(), help="extrapolation ratio (0.5 / 0)")
    g.add_argument("--order", type=int, choices=[1, 2], help="1 Euler, 2 Heun-like (1)")
    g.add_argument("--warp", type=ucgm.number("(0, inf)"), nargs=3, help="time warp a b c (1.17 0.8 1.1 / 1 1 1)")
    g.add_argument("--gaps", type=ucgm.number("[0, 1)"), nargs=2,
                   help="time-grid gaps g0 g1 (0.001 0.001 / 0.001 0.3)")
    g.add_argument("--schedule", choices=["warp", "edm"], default="warp",
                   help="time grid: UCGM-S's, warped (--warp, --gaps), or EDM's noise levels (Karras et al. 2022, "
                        "rho 7; EDM transport only) between --sigma-min and --sigma-max (warp)")
    g.add_argument("--sigma-min", type=ucgm.number("(0, inf)"), default=0.002,
                   help="--schedule edm: the lowest noise level (0.002)")
    g.add_argument("--sigma-max", type=ucgm.number("(0, inf)"), default=80.0,
                   help="--schedule edm: the highest noise level (80)")
    g.add_argument("--cfg-scale", type=ucgm.number(), help="classifier-free guidance scale (1: none)")
    g.add_argument("--cfg-interval", type=ucgm.number("[0, 1]"), nargs=2, help="guide only for t in [lo, hi] (0 1)")
    g.add_argument("--cfg-channels", type=ucgm.number("[1, inf)", int),
                   help="guide only the first k latent channels (all; LightningDiT 3)")
    g = p.add_argument_group("samples and decoding")
    g.add_argument("--num-samples", type=ucgm.number("[1, inf)", int), default=50_000, help="how many (50000)")
    g.add_argument("--class", dest="class_id", type=ucgm.number("[0, inf)", int),
                   help="one class for all samples (default: balanced)")
    g.add_argument("--seed", type=ucgm.seed,
                   help="noise of sample i comes from (seed, i) (default: a released config's global_seed, else 0)")
    g.add_argument("--batch-size", type=ucgm.number("[1, inf)", int), default=250,
                   help="samples per shard and per network batch (250)")
    g.add_argument("--decode-batch", type=ucgm.number("[1, inf)", int), default=50,
                   help="latents per autoencoder call (50)")
    g.add_argument("--vae", choices=["identity", *ucgm.AUTOENCODERS], help="autoencoder (default: the checkpoint's)")
    g.add_argument("--vae-path", help="its local weight file")
    g.add_argument("--latent-stats", help="mean/std file or latent folder, or 'none' (default: the checkpoint's)")
    g.add_argument("--latent-multiplier", type=ucgm.number("(0, inf)"),
                   help="(default: the checkpoint's; 0.18215 for SD-VAE)")
    g.add_argument("--dit-rounding", action="store_true",
                   help="pixels as DiT's sample_ddp.py: + 0.5 before truncating (default: ADM's truncation)")
    g.add_argument("--fid-ref", help="reference .npz (ADM batch or fid.py --save-stats): compute the metrics")
    g.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth, for --fid-ref")
    g.add_argument("--out", default="samples", help="output folder: samples.npz, samples.png, shards/")
    args = p.parse_args(argv)
    if args.fid_ref and not args.inception_weights:
        p.error("--fid-ref needs --inception-weights")
    return args


if __name__ == "__main__":
    ucgm.run_script(main, parse_args)
