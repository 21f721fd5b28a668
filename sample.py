"""
Sample a UCGM model with UCGM-S (paper Alg. 2, SPEC §4) into an ADM-format .npz for FID.

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

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import fid
import ucgm


def read_checkpoint(path, weights):
    """(state dict, defaults): our checkpoints, released UCGM ones (`config`) or a bare state dict."""
    if not os.path.isfile(path):
        raise ValueError(f"--ckpt {path}: no such file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    defaults = {}
    if "args" in ckpt:  # ours
        args = ckpt["args"]
        defaults = dict(model=args["model"], transport=args["transport"], lam=args["lam"],
                        latent_multiplier=args["latent_multiplier"], vae=args["vae"], vae_path=args.get("vae_path"))
        if "latent_stats" in ckpt:
            defaults["latent_stats"] = ckpt["latent_stats"]
    elif "config" in ckpt:  # released UCGM: the training config rides along
        config = ckpt["config"]
        defaults = dict(model=config["model"]["type"], transport=config["transport"]["type"],
                        lam=config["transport"]["consistc_ratio"], latent_multiplier=config["data"]["latent_multiplier"])
    return ucgm.weights_of(ckpt, weights if weights in ckpt else "ema"), defaults


def infer_model(state, name=None):
    """(model name, create_model kwargs): the data shape from the weights, the name given or matched by shape."""
    width, channels, patch, _ = state["x_embedder.proj.weight"].shape
    grid = math.isqrt(state["pos_embed"].shape[1])
    table = state.get("y_embedder.embedding_table.weight")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    if name is None:
        family = "TiT" if "blocks.0.mlp.w12.weight" in state else "DiT"
        matches = [n for n, c in ucgm.MODELS.items() if n.startswith(family)
                   and (c["hidden_size"], c["depth"], c["patch_size"]) == (width, depth, patch)]
        if not matches:
            raise ValueError(f"--ckpt: width {width}, depth {depth}, patch {patch} match no model; give --model")
        name = matches[0]
    out_channels = state["final_layer.linear.weight"].shape[0] // patch ** 2
    return name, dict(input_size=grid * patch, in_channels=channels, learn_sigma=out_channels == 2 * channels,
                      num_classes=table.shape[0] - 1 if table is not None else 1)


def resolve_sampler(args, lam):
    """Sampler arguments: explicit flags > the preset for the model's lam (few-step if lam > 0.5) (SPEC §4)."""
    preset = ucgm.SAMPLER_PRESETS["fewstep" if lam > 0.5 else "multistep"]
    explicit = {key: getattr(args, key) for key in preset if getattr(args, key) is not None}
    sampler = dict(preset, **explicit, order=args.order, cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
                   cfg_channels=args.cfg_channels)
    return {key: tuple(value) if isinstance(value, list) else value for key, value in sampler.items()}


def latent_stats(args, defaults, channels):
    """(mean, std) of the latent normalisation: --latent-stats (file or latent folder), else the checkpoint's."""
    if args.latent_stats == "none":
        return ucgm.load_stats(None, channels)
    if args.latent_stats:
        path = ucgm.stats_file(args.latent_stats) if os.path.isdir(args.latent_stats) else args.latent_stats
        if not path or not os.path.isfile(path):
            raise ValueError(f"--latent-stats {args.latent_stats}: no stats file there")
        return ucgm.load_stats(path, channels)
    stats = defaults.get("latent_stats")
    return (stats["mean"].reshape(channels, 1, 1), stats["std"].reshape(channels, 1, 1)) if stats \
        else ucgm.load_stats(None, channels)


def shard_path(out, k):
    return os.path.join(out, "shards", f"{k:06d}.safetensors")


def main(args):
    rank, world, device = ucgm.setup_distributed()
    state, defaults = read_checkpoint(args.ckpt, args.weights)
    name, kwargs = infer_model(state, args.model or defaults.get("model"))
    model = ucgm.create_model(name, **kwargs)
    where = f"--ckpt {args.ckpt} (as --model {name})"
    model.load_state_dict(ucgm.checked_state_dict(model.state_dict(), state, where, strict=True))
    model = model.to(device).eval().requires_grad_(False)
    transport = args.transport or defaults.get("transport", "Linear")
    sampler = resolve_sampler(args, defaults.get("lam", 0.0))
    vae = args.vae or defaults.get("vae", "identity")
    vae_path = args.vae_path or (defaults.get("vae_path") if vae == defaults.get("vae") else None)
    autoencoder = ucgm.create_autoencoder(vae, vae_path).to(device).eval()
    if autoencoder.channels != model.in_channels:
        raise ValueError(f"--vae {vae} decodes {autoencoder.channels}-channel latents, the model makes {model.in_channels}")
    mean, std = (s.to(device) for s in latent_stats(args, defaults, model.in_channels))
    multiplier = args.latent_multiplier or defaults.get("latent_multiplier", 1.0)
    num_classes = model.num_classes if model.y_embedder is not None else 0
    if args.class_id is not None and not 0 <= args.class_id < max(num_classes, 1):
        raise ValueError(f"--class {args.class_id}: expected a class id in [0, {num_classes - 1}]")
    if sampler["cfg_scale"] != 1.0 and not num_classes:
        raise ValueError("--cfg-scale: guidance needs a class-conditional model")

    config = dict(ckpt=os.path.abspath(args.ckpt), weights=args.weights, model=name, transport=transport, vae=vae,
                  multiplier=multiplier, num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                  class_id=args.class_id, sampler={k: list(v) if isinstance(v, tuple) else v for k, v in sampler.items()})
    ucgm.claim_folder(args.out, "sample.json", config, write=rank == 0)
    if rank == 0:
        os.makedirs(os.path.join(args.out, "shards"), exist_ok=True)
        print(json.dumps(config))
    if dist.is_initialized():
        dist.barrier()

    trainer = ucgm.UCGM(transport)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and args.precision == "bf16")
    net = torch.compile(model) if args.compile else model
    num_shards = math.ceil(args.num_samples / args.batch_size)
    todo = [k for k in range(rank, num_shards, world) if not os.path.exists(shard_path(args.out, k))]
    shape = (model.in_channels, model.input_size, model.input_size)
    for k in tqdm(todo, disable=rank != 0, desc="sampling", unit="shard"):
        indices = range(k * args.batch_size, min((k + 1) * args.batch_size, args.num_samples))
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(args.seed * 2**32 + i))
                             for i in indices]).to(device)  # sample i's noise depends on (seed, i) alone
        labels = torch.tensor([args.class_id if args.class_id is not None else i % max(num_classes, 1)
                               for i in indices], device=device)
        generator = torch.Generator(device).manual_seed(args.seed * 2**32 + args.num_samples + k)  # for rho > 0
        with torch.no_grad(), autocast:
            latents = trainer.sample(net, noise, generator=generator, **sampler, **({"y": labels} if num_classes else {}))
            images = torch.cat([autoencoder.decode(z) for z in
                                ucgm.denormalise(latents, mean, std, multiplier).split(args.decode_batch)])
        pixels = ucgm.to_uint8(images).permute(0, 2, 3, 1).cpu()  # NHWC
        ucgm.save_safetensors({"images": pixels.contiguous(), "labels": labels.cpu()}, shard_path(args.out, k))

    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        merge(args, num_shards)
    if dist.is_initialized():
        dist.destroy_process_group()


def merge(args, num_shards):
    """Concatenate the shards into OUT/samples.npz (arr_0 uint8 NHWC, arr_1 labels) and a grid of the first 64."""
    shards = [ucgm.load_safetensors(shard_path(args.out, k)) for k in range(num_shards)]
    images = np.concatenate([s["images"].numpy() for s in shards])
    labels = np.concatenate([s["labels"].numpy() for s in shards])
    path = os.path.join(args.out, "samples.npz")
    ucgm.atomic_write(path, lambda f: np.savez(f, arr_0=images, arr_1=labels))
    first = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
    ucgm.save_image_grid(first, 8, os.path.join(args.out, "samples.png"))
    print(f"{path}: {len(images)} samples of {images.shape[1]}×{images.shape[2]}, "
          f"{len(np.unique(labels))} classes")
    if args.fid_ref:  # FID, IS, sFID, precision and recall right away, through fid.py's API
        inception = fid.load_inception(args.inception_weights, "cuda" if torch.cuda.is_available() else "cpu")
        metrics = fid.compute_metrics(images, args.fid_ref, inception)
        print(json.dumps(metrics, indent=2))
        ucgm.write_json(os.path.join(args.out, "metrics.json"), metrics)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", required=True, help="our checkpoint, a released UCGM one, or a bare state dict")
    g.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of a checkpoint (ema)")
    g.add_argument("--model", choices=sorted(ucgm.MODELS), metavar="NAME",
                   help="architecture (default: the checkpoint's, or matched by the weight shapes)")
    g.add_argument("--transport", choices=sorted(ucgm.TRANSPORTS), help="(default: the checkpoint's, else Linear)")
    g.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="network precision on CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the network")
    g = p.add_argument_group("UCGM-S (SPEC §4); defaults: the preset for the checkpoint's lam")
    g.add_argument("--steps", type=int, help="sampling steps (40 multi-step / 2 few-step)")
    g.add_argument("--rho", help="stochasticity in [0, 1] or 'auto' (0 / 1)")
    g.add_argument("--kappa", type=float, help="extrapolation ratio (0.5 / 0)")
    g.add_argument("--order", type=int, choices=[1, 2], default=1, help="1 Euler, 2 Heun-like (1)")
    g.add_argument("--warp", type=float, nargs=3, help="time warp a b c (1.17 0.8 1.1 / 1 1 1)")
    g.add_argument("--gaps", type=float, nargs=2, help="time-grid gaps g0 g1 (0.001 0.001 / 0.001 0.3)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    g.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), help="guide only for t in [lo, hi]")
    g.add_argument("--cfg-channels", type=int, help="guide only the first k latent channels (all)")
    g = p.add_argument_group("samples and decoding")
    g.add_argument("--num-samples", type=int, default=50_000, help="how many (50000)")
    g.add_argument("--class", dest="class_id", type=int, help="one class for all samples (default: balanced)")
    g.add_argument("--seed", type=int, default=0, help="noise of sample i comes from (seed, i)")
    g.add_argument("--batch-size", type=int, default=250, help="samples per shard and per network batch (250)")
    g.add_argument("--decode-batch", type=int, default=50, help="latents per autoencoder call (50)")
    g.add_argument("--vae", choices=["identity", *ucgm.AUTOENCODERS], help="autoencoder (default: the checkpoint's)")
    g.add_argument("--vae-path", help="its local weight file")
    g.add_argument("--latent-stats", help="mean/std file or latent folder, or 'none' (default: the checkpoint's)")
    g.add_argument("--latent-multiplier", type=float, help="(default: the checkpoint's; 0.18215 for SD-VAE)")
    g.add_argument("--fid-ref", help="reference .npz (ADM batch or fid.py --save-stats): compute the metrics")
    g.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth, for --fid-ref")
    g.add_argument("--out", default="samples", help="output folder: samples.npz, samples.png, shards/")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1 or args.decode_batch < 1:
        p.error("--num-samples, --batch-size and --decode-batch must be >= 1")
    if args.fid_ref and not args.inception_weights:
        p.error("--fid-ref needs --inception-weights")
    if args.rho is not None and args.rho != "auto":
        args.rho = float(args.rho)
    return args


if __name__ == "__main__":
    ucgm.run_script(main, parse_args)
