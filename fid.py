"""
FID, Inception Score, sFID, precision and recall, computed the way published numbers are (README, "Evaluation").

  python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --inception-weights pt_inception-2015-12-05-6726825d.pth
  python fid.py --save-stats images/ ref_stats.npz --inception-weights pt_inception-2015-12-05-6726825d.pth
  python fid.py --save-stats cifar-10-python.tar.gz cifar10_train.npz \\
      --inception-weights pt_inception-2015-12-05-6726825d.pth

The network is the TF Inception-v3 graph of 2015-12-05 with the FID-specific blocks, fed uint8 images resized
to 299 with TensorFlow-1 bilinear semantics (as torch-fidelity does). FID and precision/recall use the 2048-d
pool features; IS the 1008-way softmax of the bias-free logits over 10 splits (as the ADM evaluator); sFID the
first 7 channels of mixed_6/conv (17×17, flattened in NHWC order, as the ADM evaluator).
"""

import argparse
import contextlib
import json
import os
import zipfile

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import ucgm

#################################################################################
#                 The FID Inception-v3 (torchvision module names)               #
#################################################################################

class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU: TF-Inception's unit."""
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF does not average the padding


class InceptionA(nn.Module):
    """35×35 block: 1×1 | 1×1-5×5 | 1×1-3×3-3×3 | avg-pool-1×1."""
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = ConvBN(cin, 48, 1), ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3×3/2 | 1×1-3×3-3×3/2 | max-pool/2."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convolutions; returns (output, its first 1×1 branch for sFID)."""
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = ConvBN(cin, c7, 1), ConvBN(c7, c7, **row), \
            ConvBN(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = ConvBN(cin, c7, 1), ConvBN(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = ConvBN(c7, c7, **row), ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        first = self.branch1x1(x)
        tower = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        return torch.cat([first, tower, double, self.branch_pool(avg_pool(x))], 1), first


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1×1-3×3/2 | 1×1-1×7-7×1-3×3/2 | max-pool/2."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = ConvBN(cin, 192, 1), ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = ConvBN(cin, 192, 1), ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = ConvBN(192, 192, (7, 1), padding=(3, 0)), ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        tower = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), tower, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8×8 block with split 1×3/3×1 outputs; the last one of the FID graph max-pools its pool branch."""
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = ConvBN(384, 384, (1, 3), padding=(0, 1)), \
            ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = ConvBN(cin, 448, 1), ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = ConvBN(384, 384, (1, 3), padding=(0, 1)), \
            ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                          self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


def resize_tf1(x, size=299):
    """TensorFlow-1 bilinear resize (align_corners=False, no half-pixel offset): source = out · in/out."""
    def weights(n_in):  # (size, n_in) interpolation matrix
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.long()
        frac = src - lo
        matrix = torch.zeros(size, n_in, device=x.device)
        matrix[torch.arange(size), lo] += 1 - frac
        matrix[torch.arange(size), (lo + 1).clamp(max=n_in - 1)] += frac
        return matrix
    return weights(x.shape[2]) @ x @ weights(x.shape[3]).T


class FIDInception(nn.Module):
    """uint8 images (N, 3, H, W) -> {pool (N, 2048), logits (N, 1008) without bias, spatial (N, 2023)}."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.has_fc = True  # False for weights without the classifier: no IS then

    def forward(self, images):
        x = (resize_tf1(images.float()) - 128) / 128  # the graph's input scaling of uint8
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(F.max_pool2d(x, 3, stride=2)))))
        x, _ = self.Mixed_6b(x)
        x, _ = self.Mixed_6c(x)
        x, mixed_6_conv = self.Mixed_6d(x)  # TF's mixed_6 is Mixed_6d; its first conv feeds sFID
        x, _ = self.Mixed_6e(x)
        pool = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x))).mean((2, 3))
        spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).flatten(1)  # NHWC order, as TF
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T if self.has_fc else None}


# pytorch-fid's wrapper stores the same layers as blocks.i.j
PYTORCH_FID_BLOCKS = {"blocks.0.0.": "Conv2d_1a_3x3.", "blocks.0.1.": "Conv2d_2a_3x3.", "blocks.0.2.": "Conv2d_2b_3x3.",
                      "blocks.1.0.": "Conv2d_3b_1x1.", "blocks.1.1.": "Conv2d_4a_3x3.",
                      **{f"blocks.2.{i}.": f"Mixed_{n}." for i, n in enumerate(("5b", "5c", "5d", "6a", "6b", "6c",
                                                                                 "6d", "6e"))},
                      **{f"blocks.3.{i}.": f"Mixed_{n}." for i, n in enumerate(("7a", "7b", "7c"))}}


def load_inception(path, device="cpu"):
    """The FID Inception from pytorch-fid's / torch-fidelity's converted file, or pytorch-fid's wrapper state."""
    if path is None:
        raise ValueError("--inception-weights: required (pt_inception-2015-12-05-6726825d.pth); nothing is downloaded")
    state = ucgm.tensor_dict(ucgm.load_tensor_file(path, "--inception-weights"), f"--inception-weights {path}")
    for old, new in PYTORCH_FID_BLOCKS.items():
        state = {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}
    model = FIDInception()
    model.has_fc = "fc.weight" in state
    if not model.has_fc:
        del model.fc
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits")}
    model.load_state_dict({**model.state_dict(), **ucgm.checked_state_dict(expected, state,
                                                                          f"--inception-weights {path}")})
    return model.to(device).eval().requires_grad_(False)


#################################################################################
#                                 Image sources                                 #
#################################################################################

def check_images(images, where):
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{where}: expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")


def npz_batches(path, batch_size):
    """arr_0 of an .npz in batches of NHWC uint8, streamed from the zip without loading it whole."""
    try:
        archive = zipfile.ZipFile(path)
        member = archive.open("arr_0.npy")
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran, dtype = read_header[np.lib.format.read_magic(member)](member)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as error:
        raise ValueError(f"{path}: not a readable .npz with arr_0 ({error})") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise ValueError(f"{path}: expected arr_0 uint8 (N, H, W, 3), got {dtype} {shape}")
    yield shape[0]
    per_image = int(np.prod(shape[1:]))
    for start in range(0, shape[0], batch_size):
        count = min(batch_size, shape[0] - start)
        data = member.read(count * per_image)
        if len(data) != count * per_image:
            raise ValueError(f"{path}: arr_0 is truncated")
        yield np.frombuffer(data, np.uint8).reshape(count, *shape[1:])


def folder_batches(path, batch_size, image_size=None):
    """The images of a folder (sorted, recursively) as RGB uint8 NHWC batches of equal-size images; with image_size,
    each first ADM-centre-cropped to that size, as extract_latents.py crops the training images."""
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names
                   if n.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
    yield len(files)
    batch = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("RGB")  # grayscale and palette images become RGB
                pixels = np.asarray(ucgm.center_crop(image, image_size) if image_size else image)
        except OSError as error:  # not an image, or cut short
            raise ValueError(f"{file}: not a readable image ({error})") from None
        if batch and (len(batch) == batch_size or pixels.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(pixels)
    if batch:
        yield np.stack(batch)


def array_batches(images, batch_size):
    images = images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    check_images(images, "images")
    yield len(images)
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


#################################################################################
#                                    Metrics                                    #
#################################################################################

@contextlib.contextmanager
def full_fp32():
    """IEEE float32 matmuls and convs inside (the scripts turn TF32 on for CUDA): Inception features and their
    distances are computed in full precision, as the TensorFlow graph did."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32  # the switches of ucgm.use_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


@torch.no_grad()
def extract_features(inception, source, batch_size=200, device=None, progress=True, image_size=None):
    """{pool, spatial, logits} (numpy float64) of an .npz path, an image folder (ADM-centre-cropped to image_size if
    given), a CIFAR-10 archive or folder (its training images), or an NHWC uint8 array/tensor."""
    device = device or next(inception.parameters()).device
    if isinstance(source, (str, os.PathLike)):
        source = str(source)
        cifar10 = ucgm.is_cifar10(source)
        if image_size and (not os.path.isdir(source) or cifar10):
            raise ValueError(f"--image-size {image_size}: crops the images of a folder, but {source} is not one")
        if cifar10:  # CIFAR-10's training images, as EDM's reference statistics
            batches = array_batches(ucgm.read_cifar10(source, "train", "fid.py")[0], batch_size)
        else:
            batches = folder_batches(source, batch_size, image_size) if os.path.isdir(source) \
                else npz_batches(source, batch_size)
    else:
        batches = array_batches(source, batch_size)
    count = next(batches)
    if count < 2:
        raise ValueError(f"{source if isinstance(source, str) else 'images'}: need at least 2 images, got {count}")
    features = {"pool": [], "spatial": [], "logits": []}
    with full_fp32(), tqdm(total=count, disable=not progress, unit="img", desc="inception") as bar:
        for batch in batches:
            out = inception(torch.from_numpy(np.array(batch)).to(device).permute(0, 3, 1, 2))
            for key, value in out.items():
                if value is not None:
                    features[key].append(value.double().cpu().numpy())
            bar.update(len(batch))
    return {key: np.concatenate(value) if value else None for key, value in features.items()}


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½), with tr((S1 S2)^½) = Σ √λ(√S1 S2 √S1): the eigenvalues of a
    symmetric positive semi-definite matrix (covariances are), the same number as scipy's sqrtm of S1 S2 without
    its 24 s per 2048-d matrix on 2 cores, its singular-product offset or its imaginary round-off."""
    mu1, mu2, sigma1, sigma2 = (np.atleast_1d(np.asarray(a, np.float64)) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    values, vectors = scipy.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (vectors * np.sqrt(values.clip(0))) @ vectors.T  # √S1
    product = root @ sigma2 @ root
    trace_sqrt = np.sqrt(scipy.linalg.eigvalsh((product + product.T) / 2).clip(0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) over `splits` consecutive parts (fewer for < 10 images): (mean, std)."""
    logits = torch.from_numpy(np.asarray(logits, np.float64))
    log_p, splits = logits.log_softmax(1), min(splits, len(logits))
    scores = []
    for part in log_p.tensor_split(splits):
        p, log_marginal = part.exp(), part.exp().mean(0).log()
        kl = torch.where(p > 0, p * (part - log_marginal), 0.0)  # 0 · log 0 = 0
        scores.append(float(kl.sum(1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def manifold_radii(x, k=3, block=5000):
    """Squared distance of each feature (a float32 tensor) to its k-th nearest neighbour in the same set."""
    return torch.cat([torch.cdist(x[i:i + block], x).square().kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), block)])


def inside_manifold(q, x, radii, block=5000):
    """Fraction of queries q within the k-NN ball of at least one feature of x (ADM's manifold estimate)."""
    hits = [(torch.cdist(q[i:i + block], x).square() <= radii[None]).any(1) for i in range(0, len(q), block)]
    return float(torch.cat(hits).float().mean())


@torch.no_grad()
def precision_recall(reference, samples, k=3, device="cpu"):
    """Precision: samples inside the reference manifold; recall: references inside the samples' manifold. The
    distances (15 TFLOP for 50k samples against 10k references) are computed on `device`, in IEEE float32."""
    ref, ours = (torch.from_numpy(np.asarray(f, np.float32)).to(device) for f in (reference, samples))
    with full_fp32():
        return inside_manifold(ours, ref, manifold_radii(ref, k)), inside_manifold(ref, ours, manifold_radii(ours, k))


def statistics(features):
    """mu/sigma of the pool and spatial features (float64, unbiased covariance as numpy.cov)."""
    return {"mu": features["pool"].mean(0), "sigma": np.cov(features["pool"], rowvar=False),
            "mu_s": features["spatial"].mean(0), "sigma_s": np.cov(features["spatial"], rowvar=False)}


def load_reference(path, inception, batch_size):
    """Reference statistics (and pool features if the file has images or features): an ADM batch or our stats."""
    try:
        with np.load(path) as ref:
            stats = {k: ref[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "pool") if k in ref.files}
            has_images = "arr_0" in ref.files
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable .npz ({error})") from None
    if "mu" not in stats and not has_images:
        raise ValueError(f"{path}: expected reference statistics (mu, sigma) or images (arr_0)")
    if has_images and ("pool" not in stats or "mu" not in stats):
        features = extract_features(inception, path, batch_size)
        stats = {**statistics(features), **stats, "pool": features["pool"]}
    return stats


def compute_metrics(samples, reference, inception, batch_size=200):
    """All metrics of samples (npz path, folder or NHWC uint8) against a reference .npz (see load_reference)."""
    features = extract_features(inception, samples, batch_size)
    ref = load_reference(reference, inception, batch_size)
    ours = statistics(features)
    metrics = {"num_samples": len(features["pool"]),
               "fid": frechet_distance(ours["mu"], ours["sigma"], ref["mu"], ref["sigma"])}
    if "mu_s" in ref:
        metrics["sfid"] = frechet_distance(ours["mu_s"], ours["sigma_s"], ref["mu_s"], ref["sigma_s"])
    if features["logits"] is not None:
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(features["logits"])
    else:
        print("inception score unavailable: the weights have no 1008-way classifier (fc)")
    if "pool" in ref and min(len(ref["pool"]), len(features["pool"])) > 3:  # k = 3 neighbours besides oneself
        metrics["precision"], metrics["recall"] = precision_recall(ref["pool"], features["pool"],
                                                                   device=next(inception.parameters()).device)
    elif "pool" in ref:
        print("precision/recall unavailable: they need at least 4 images on each side")
    return metrics


def main(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inception = load_inception(args.inception_weights, device)
    if args.save_stats:
        source, out = args.save_stats
        features = extract_features(inception, source, args.batch_size, image_size=args.image_size)
        stats = {**statistics(features), "pool": features["pool"].astype(np.float32)}
        ucgm.atomic_write(out, lambda f: np.savez(f, **stats))
        print(f"{out}: statistics of {len(features['pool'])} images")
        return
    if len(args.sources) != 2:
        raise ValueError("expected SAMPLES REF (or --save-stats SRC OUT)")
    ucgm.require(args.image_size is None, "--image-size: crops the reference images of --save-stats, not samples")
    metrics = compute_metrics(*args.sources, inception, args.batch_size)
    print(json.dumps(metrics, indent=2))
    if args.out:
        ucgm.write_json(args.out, metrics)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", metavar="SAMPLES REF",
                   help="samples (.npz with arr_0, or an image folder) and reference (.npz: ADM batch or --save-stats)")
    p.add_argument("--inception-weights", help="pytorch-fid's or torch-fidelity's pt_inception-2015-12-05 file")
    p.add_argument("--save-stats", nargs=2, metavar=("SRC", "OUT"),
                   help="write the statistics of SRC (as SAMPLES, or a CIFAR-10 archive: its training images) to OUT")
    p.add_argument("--image-size", type=ucgm.number("[1, inf)", int),
                   help="with --save-stats of an image folder: ADM centre crop to this size, as extract_latents.py")
    p.add_argument("--batch-size", type=ucgm.number("[1, inf)", int), default=200,
                   help="images per Inception batch (200)")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    return p.parse_args(argv)


if __name__ == "__main__":
    ucgm.run_script(main, parse_args)
