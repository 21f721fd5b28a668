"""
Encode an ImageNet-style folder into the latent shards that train.py reads (README, "Latents").

  torchrun --nproc_per_node=8 extract_latents.py --images /data/imagenet/train --vae vavae \\
      --vae-path vavae-imagenet256-f16d32-dinov2.pt --image-size 256 --out latents/in1k256_vavae
  torchrun --nproc_per_node=8 extract_latents.py --images /data/imagenet/train --vae dcae \\
      --vae-path dc-ae-f32c32-in-1.0/model.safetensors --image-size 512 --out latents/in1k512_dcae
  python extract_latents.py --images cifar-10-python.tar.gz --vae identity --image-size 32 --unconditional \\
      --out latents/cifar10_train
  python extract_latents.py --bench 4 --vae dcae --image-size 512 --batch-size 2   # img/s and memory, no files

Shard k holds images [k·S, (k+1)·S) of the sorted file list (S = --shard-size) and process r encodes shards
r, r + W, r + 2W, ... in order, so the output does not depend on the number of processes. Finished shards
are skipped when a run is restarted. An unreadable image is skipped with a warning.
"""

import argparse
import math
import os
import resource
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import ucgm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def list_images(root):
    """(paths, labels, class names): sorted class folders give labels 0..K-1; a flat folder is one class."""
    if not os.path.isdir(root):
        raise ValueError(f"--images {root}: not a folder")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    folders = [os.path.join(root, c) for c in classes] if classes else [root]
    paths, labels = [], []
    for label, folder in enumerate(folders):
        for dirpath, _, names in sorted(os.walk(folder)):
            found = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
            paths += [os.path.join(dirpath, n) for n in found]
            labels += [label] * len(found)
    if not paths:
        raise ValueError(f"--images {root}: expected image files ({', '.join(IMAGE_EXTENSIONS)}), found none")
    return paths, labels, classes or [os.path.basename(os.path.normpath(root))]


def image_source(args):
    """(images, labels, class names) of --images: a CIFAR-10 archive or folder (the --split, images as arrays) or an
    image folder (file paths); with --unconditional every label is 0 (one class, as Table 7's CIFAR-10)."""
    if ucgm.is_cifar10(args.images):
        images, labels = ucgm.read_cifar10(args.images, args.split or "train")
        images, labels, classes = list(images), labels.tolist(), ucgm.CIFAR10_CLASSES
    else:
        ucgm.require(args.split is None, f"--split {args.split}: only for a CIFAR-10 archive, and --images "
                     f"{args.images} is none")
        images, labels, classes = list_images(args.images)
    return (images, [0] * len(labels), ["unconditional"]) if args.unconditional else (images, labels, classes)


def open_image(item):
    """A PIL image of a file path, or of an (H, W, 3) uint8 array (a CIFAR-10 image)."""
    return Image.fromarray(item) if isinstance(item, np.ndarray) else Image.open(item)


class ImageFiles(torch.utils.data.Dataset):
    """(index, image in [-1, 1] (3, size, size)) per file; an unreadable file gives (index, None) and a warning."""

    def __init__(self, paths, indices, size):
        self.paths, self.indices, self.size = paths, indices, size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        try:
            with open_image(self.paths[index]) as image:
                pixels = np.asarray(ucgm.center_crop(image.convert("RGB"), self.size))
        except Exception as error:  # a truncated or corrupt file must not kill a 1.28M-image run
            warnings.warn(f"skipping unreadable image {self.paths[index]}: {error}")
            return index, None
        return index, torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1


def keep_readable(items):
    """Collate (index, image) pairs, dropping the unreadable ones; also return how many were dropped."""
    good = [(i, x) for i, x in items if x is not None]
    images = torch.stack([x for _, x in good]) if good else None
    return torch.tensor([i for i, _ in good], dtype=torch.long), images, len(items) - len(good)


def encode(autoencoder, images, indices, seed, autocast, flip=True):
    """Latents of the images and (with flip) of their horizontal flips; a posterior sample draws its noise from
    (seed, index), the same draws with and without flips."""
    views = 2 if flip else 1
    batch = torch.cat([images, images.flip(-1)][:views])
    noise = None
    if autoencoder.sample_posterior:
        shape = (2, autoencoder.channels, images.shape[-2] // autoencoder.factor, images.shape[-1] // autoencoder.factor)
        noise = ucgm.indexed_noise(shape, seed, indices)  # (N, 2, C, h, w): a draw for the image, one for its flip
        noise = noise[:, :views].transpose(0, 1).reshape(-1, *shape[1:]).to(images.device)
    with torch.no_grad(), autocast:
        latents = autoencoder.encode(batch, noise).float()
    return latents.chunk(views)


def shard_path(out, k):
    return os.path.join(out, f"latents_{k:05d}.safetensors")


def check_image_size(args, autoencoder):
    """--image-size must be a multiple of the autoencoder's factor (a 512-px image gives 16×16 DC-AE latents)."""
    ucgm.require(args.image_size % autoencoder.factor == 0, f"--image-size {args.image_size}: expected a multiple of "
                 f"the {args.vae} factor {autoencoder.factor} (the latents are --image-size / {autoencoder.factor})")


def timed(work, batches, device):
    """Seconds of work on all batches, after a first call on CUDA to warm up (cuDNN plans, the allocator)."""
    if device.type == "cuda":
        work(batches[0])
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        work(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(args, device):
    """--bench N: decode then encode N random latents and images (--image-size, batches of --batch-size) with a
    random-weight --vae in float32, reading and writing nothing; print img/s and the peak memory of the decoding
    (CUDA: allocated; CPU: the process's resident high-water mark, so decoding comes first)."""
    ucgm.require(args.vae != "identity", "--bench: give the --vae to measure (identity does no work)")
    torch.manual_seed(0)
    autoencoder = ucgm.autoencoder_architecture(args.vae).to(device).eval().requires_grad_(False)
    check_image_size(args, autoencoder)
    latent = args.image_size // autoencoder.factor
    latents = torch.randn(args.bench, autoencoder.channels, latent, latent, device=device).split(args.batch_size)
    images = (torch.rand(args.bench, 3, args.image_size, args.image_size, device=device) * 2 - 1).split(args.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        decoding = timed(autoencoder.decode, latents, device)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        encoding = timed(autoencoder.encode, images, device)
    weights = sum(p.numel() * p.element_size() for p in autoencoder.parameters())
    print(f"bench {args.vae} at {args.image_size} px on {device.type} ({torch.get_num_threads()} threads), batch "
          f"{args.batch_size}: encode {args.bench / encoding:.3g} img/s, decode {args.bench / decoding:.3g} img/s; "
          f"peak memory decoding {peak / 2**30:.2f} GiB (weights {weights / 2**30:.2f} GiB)")


def main(args):
    rank, world, device = ucgm.setup_distributed()
    if args.bench:
        return bench(args, device)
    paths, labels, classes = image_source(args)
    autoencoder = ucgm.create_autoencoder(args.vae, args.vae_path).to(device)
    check_image_size(args, autoencoder)
    config = {"images": os.path.abspath(args.images), "count": len(paths), "vae": args.vae,
              "image_size": args.image_size, "shard_size": args.shard_size, "seed": args.seed, "flip": args.flip}
    ucgm.claim_folder(args.out, "extract.json", config, write=rank == 0)
    if rank == 0:
        ucgm.write_json(os.path.join(args.out, "classes.json"), classes)
    if dist.is_initialized():
        dist.barrier()

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    num_shards = math.ceil(len(paths) / args.shard_size)
    todo = ucgm.missing_shards(num_shards, lambda k: shard_path(args.out, k), rank, world)  # dealt evenly
    bar = tqdm(total=sum(min(args.shard_size, len(paths) - k * args.shard_size) for k in todo),
               disable=rank != 0, unit="img", desc="encoding")
    skipped = 0
    for k in todo:
        files = ImageFiles(paths, range(k * args.shard_size, min((k + 1) * args.shard_size, len(paths))),
                           args.image_size)
        loader = torch.utils.data.DataLoader(files, args.batch_size, num_workers=args.num_workers,
                                             collate_fn=keep_readable)
        shard = {"latents": [], "latents_flip": [], "labels": []} if args.flip else {"latents": [], "labels": []}
        for indices, images, dropped in loader:
            skipped += dropped
            bar.update(len(indices) + dropped)
            if images is None:
                continue
            views = encode(autoencoder, images.to(device), indices, args.seed, autocast, args.flip)
            for key, latents in zip(("latents", "latents_flip"), views):
                shard[key].append(latents.cpu())
            shard["labels"].append(torch.tensor([labels[i] for i in indices]))
        if shard["labels"]:
            ucgm.save_safetensors({key: torch.cat(value) for key, value in shard.items()}, shard_path(args.out, k))
    bar.close()

    total_skipped = ucgm.all_reduce(skipped, device)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        mean, std, used, encoded = latent_stats(args.out, num_shards, args.stats_images, args.seed)
        ucgm.atomic_write(os.path.join(args.out, "latents_stats.pt"), lambda f: torch.save({"mean": mean, "std": std}, f))
        ucgm.write_json(os.path.join(args.out, ucgm.LATENTS_INFO), provenance(args, len(paths), encoded, used))
        print(f"{args.out}: {encoded} of {len(paths)} images in {num_shards} shards; {int(total_skipped)} unreadable "
              f"images skipped in this run; latent mean {mean.flatten()[:4].tolist()}..., std "
              f"{std.flatten()[:4].tolist()}... of {used} random images")
    if dist.is_initialized():
        dist.destroy_process_group()


def latent_stats(out, num_shards, stats_images, seed):
    """(mean, std, images used, images encoded): per-channel mean and std (1, C, 1, 1) of the latents of
    `stats_images` images drawn at random (seeded) from the whole set, or of all ("all"), as the released pipelines
    do; the shards alone decide the draw, so it is the same for any number of processes."""
    shards = [ucgm.load_safetensors(shard_path(out, k))["latents"] for k in range(num_shards)
              if os.path.exists(shard_path(out, k))]  # a shard of unreadable images only is never written
    ucgm.require(shards, f"--out {out}: no latent shard was written (every image unreadable?)")
    offsets = np.cumsum([0] + [len(latents) for latents in shards])
    count = int(offsets[-1])
    chosen = torch.arange(count) if stats_images == "all" or stats_images >= count else \
        torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:stats_images].sort().values
    total = torch.zeros(shards[0].shape[1], dtype=torch.float64)
    square = torch.zeros_like(total)
    for k, latents in enumerate(shards):  # one shard's chosen rows at a time: memory holds no more than a shard
        rows = chosen[(chosen >= offsets[k]) & (chosen < offsets[k + 1])] - int(offsets[k])
        picked = latents[rows].double()
        total += picked.sum((0, 2, 3))
        square += picked.square().sum((0, 2, 3))
    n = len(chosen) * shards[0].shape[2] * shards[0].shape[3]  # values per channel
    mean = total / n
    std = ((square - n * mean.square()) / (n - 1)).clamp_min(0).sqrt()  # the unbiased std, as torch.std
    return mean.reshape(1, -1, 1, 1).float(), std.reshape(1, -1, 1, 1).float(), len(chosen), count


def provenance(args, listed, encoded, stats_images):
    """The record of what made the latents (ucgm.LATENTS_INFO): train.py and sample.py take the autoencoder from it."""
    vae_path = os.path.abspath(args.vae_path) if args.vae_path else None
    return {"autoencoder": args.vae, "vae_path": vae_path, "vae_sha256": vae_path and ucgm.file_sha256(vae_path),
            "images": os.path.abspath(args.images), "image_size": args.image_size,
            "crop": "ADM centre crop (BOX halving, BICUBIC resize, centre square)", "listed_images": listed,
            "encoded_images": encoded, "split": args.split, "unconditional": args.unconditional, "flips": args.flip,
            "stats_images": stats_images, "seed": args.seed, "precision": args.precision}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="an ImageFolder (one folder per class), a flat folder, or CIFAR-10's python or "
                   "binary archive (.tar.gz) or its folder (required)")
    p.add_argument("--split", choices=["train", "test"], help="the CIFAR-10 split (train: data_batch_1..5)")
    p.add_argument("--unconditional", action="store_true", help="label 0 for every image: one class, an "
                   "unconditional model (Table 7's CIFAR-10)")
    p.add_argument("--out", help="the output folder of latent shards (required)")
    p.add_argument("--vae", default="vavae", choices=["identity", *ucgm.AUTOENCODERS], help="the autoencoder")
    p.add_argument("--vae-path", help="its local weight file (LDM, diffusers, VA-VAE or efficientvit layout)")
    p.add_argument("--image-size", type=ucgm.number("[1, inf)", int), default=256,
                   help="ADM centre crop to this many pixels")
    p.add_argument("--shard-size", type=ucgm.number("[1, inf)", int), default=10_000, help="images per shard")
    p.add_argument("--batch-size", type=ucgm.number("[1, inf)", int), default=64,
                   help="images per encoder call (and their flips)")
    p.add_argument("--stats-images", type=ucgm.number("[1, inf)", int, words=["all"]), default=10_000,
                   help="random images (seeded by --seed) for the per-channel mean/std, or 'all' (10000)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="also encode each image's horizontal flip (--no-flip for text, digits, some medical images)")
    p.add_argument("--num-workers", type=ucgm.number("[0, inf)", int), default=4,
                   help="image-decoding processes per rank")
    p.add_argument("--seed", type=ucgm.seed, default=0, help="seed of the posterior samples (VA-VAE)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="encoder precision: fp32 as the released extraction (TF32 matmuls on CUDA), or bf16 autocast")
    p.add_argument("--bench", type=ucgm.number("[1, inf)", int), metavar="N",
                   help="only time N random images through a random-weight --vae (no --images, --out or files)")
    args = p.parse_args(argv)
    if not args.bench and not (args.images and args.out):
        p.error("--images and --out are required (but with --bench)")
    return args


if __name__ == "__main__":
    ucgm.run_script(main, parse_args)
