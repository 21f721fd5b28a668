"""Tests for ucgm.py: every equation against an independent computation (README, "The method in one page"),
and the scripts end to end. Run: python -m pytest -q test_ucgm.py"""

import argparse
import collections
import copy
import importlib
import importlib.util
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import types
import warnings
import weakref

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import torch.distributed.run
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import extract_latents
import fid
import sample
import train
import ucgm
from ucgm import UCGM

torch.set_num_threads(2)
with warnings.catch_warnings():  # the project has no pytest configuration file to register the marker in
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    CUDA_MARK = pytest.mark.cuda


def cuda(test):
    """A CUDA test: skipped without CUDA, and all of them selected by `python -m pytest -q -m cuda test_ucgm.py`."""
    return CUDA_MARK(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


#################################################################################
#                       Helpers: toy networks and oracles                       #
#################################################################################

def test_reading_order_is_true():
    """The module docstring lists every section banner of ucgm.py, in order."""
    banners = re.findall(r"^\s*#\s+(\S.*\S)\s+#$", open(ucgm.__file__).read(), re.M)
    listed = re.findall(r"^  (\S.*)$", ucgm.__doc__.split("Reading order")[1], re.M)
    assert listed == banners and len(banners) >= 8, "the docstring's reading order should read:\n" + "\n".join(
        f"  {title}" for title in banners)


class ToyNet(nn.Module):
    """A smooth class-conditional MLP on flat vectors (N, dim), standing in for the DiT."""
    def __init__(self, dim=4, num_classes=3, hidden=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.num_classes = num_classes
        self.inp = nn.Linear(dim + 1, hidden)
        self.emb = nn.Embedding(num_classes + 1, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, t, y):
        h = torch.tanh(self.inp(torch.cat([x, t[:, None].to(x.dtype)], dim=1)) + self.emb(y).to(x.dtype))
        return self.out(h)


def dropout_unetplus():
    """A tiny UNet+ (EDM's SongUNet) with dropout 0.3 on 3×8×8 inputs, unconditional."""
    torch.manual_seed(0)
    return ucgm.create_model("UNet+-T", input_size=8, in_channels=3, num_classes=1, dropout=0.3)


def tiny_dit(seed=0, **kwargs):
    """A 1-block TiT on 2×8×8 inputs with all weights randomised (so no output is trivially zero)."""
    torch.manual_seed(seed)
    config = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                  rmsnorm=True, qk_norm=True, swiglu=True, rope=True)
    model = ucgm.DiT(**{**config, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


class Coeffs:
    """The transport table (Table 6), written out again with numpy as an independent reference."""
    @staticmethod
    def table(name, t):
        t = np.asarray(t, dtype=np.float64)
        one = np.ones_like(t)
        s, c = np.sin(np.pi * t / 2), np.cos(np.pi * t / 2)
        sigma = np.exp(4 * (2.68 * t - 1.59))
        r = np.sqrt(sigma ** 2 + 0.25)
        return {"Linear": (t, 1 - t, one, -one), "ReLinear": (1 - t, t, -one, one), "TrigFlow": (s, c, c, -s),
                "TrigLinear": (s, c, one, -one), "EDM": (sigma / r, 1 / r, -0.5 / r, 2 * sigma / r),
                "Random": (s, 1 - t, one, -1 - np.exp(-5 * t))}[name]


class PointOracle(nn.Module):
    """The exact F for data that is one point x0: F = alpha_hat·(x_t − gamma·x0)/alpha + gamma_hat·x0; row i of a
    batch (also of a doubled one, as the λ = 1 difference evaluates) belongs to x0[i mod len(x0)]."""
    def __init__(self, transport, x0):
        super().__init__()
        self.tr, self.x0, self.num_classes = ucgm.get_transport(transport), x0, 1

    def forward(self, x_t, t, y=None):
        t = ucgm.view_as_batch(t.double(), x_t)
        x0 = self.x0.repeat(len(x_t) // len(self.x0), *[1] * (x_t.dim() - 1))
        z = (x_t.double() - self.tr.gamma(t) * x0) / self.tr.alpha(t)
        return self.tr.alpha_hat(t) * z + self.tr.gamma_hat(t) * x0


class GaussianOracle(nn.Module):
    """The exact F for data x ~ N(mu, Sigma): E[x | x_t] = mu + gamma Sigma (gamma² Sigma + alpha² I)^-1 (x_t − gamma mu)."""
    def __init__(self, transport, mu, sigma):
        super().__init__()
        self.tr, self.mu, self.sigma, self.num_classes = ucgm.get_transport(transport), mu, sigma, 1
        self.calls = 0

    def forward(self, x_t, t, y=None):
        self.calls += 1
        x_t, t = x_t.double(), t.double()
        a, g = self.tr.alpha(t)[:, None, None], self.tr.gamma(t)[:, None, None]
        cov_t = g ** 2 * self.sigma + a ** 2 * torch.eye(len(self.mu), dtype=torch.float64)  # (N, d, d)
        gain = g * self.sigma @ torch.linalg.inv(cov_t)  # (N, d, d)
        x_mean = self.mu + (gain @ (x_t - g[:, :, 0] * self.mu)[:, :, None])[:, :, 0]
        z_mean = (x_t - g[:, :, 0] * x_mean) / a[:, :, 0]
        return self.tr.alpha_hat(t)[:, None] * z_mean + self.tr.gamma_hat(t)[:, None] * x_mean


def gaussian_problem(d=3, seed=0):
    """A fixed non-isotropic Gaussian N(mu, Sigma)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(d, generator=g, dtype=torch.float64), a @ a.T / d + 0.3 * torch.eye(d, dtype=torch.float64)


def exact_flow(transport, mu, sigma, noise, t0):
    """Closed-form probability-flow ODE from x_{t0} = noise to the data end, for Gaussian data.

    In the eigenbasis of Sigma every coordinate moves as x_t = gamma·mu + sqrt(gamma² λ + alpha²)·w, w constant."""
    tr = ucgm.get_transport(transport)
    lam, vecs = torch.linalg.eigh(sigma)
    t0 = torch.tensor(t0, dtype=torch.float64)
    a0, g0 = tr.alpha(t0), tr.gamma(t0)
    w = (noise.double() - g0 * mu) @ vecs / torch.sqrt(g0 ** 2 * lam + a0 ** 2)
    return mu + (w * lam.sqrt()) @ vecs.T


#################################################################################
#                                 Transports                                    #
#################################################################################

@pytest.mark.parametrize("name", sorted(ucgm.TRANSPORTS))
def test_transport_coefficients_match_the_table(name):
    """Table 6: the six transports' α, γ, α̂, γ̂ against the table written out again in numpy."""
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    tr = ucgm.TRANSPORTS[name]
    ours = [f(t).numpy() for f in (tr.alpha, tr.gamma, tr.alpha_hat, tr.gamma_hat)]
    for got, want in zip(ours, Coeffs.table(name, t.numpy())):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    a, g, ah, gh = Coeffs.table(name, t.numpy())
    np.testing.assert_allclose(tr.D(t).numpy(), a * gh - ah * g, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(ucgm.TRANSPORTS))
def test_readout_inverts_transport(name):
    """Eq. (2): f^x and f^z invert x_t = α z + γ x and F = α̂ z + γ̂ x (Eq. (1)) exactly."""
    tr = ucgm.TRANSPORTS[name]
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(0.01, 0.99, 197, dtype=torch.float64)
    x, z = torch.randn(197, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(197, 3, 4, 4, generator=g,
                                                                                  dtype=torch.float64)
    tb = ucgm.view_as_batch(t, x)
    x_t = tr.alpha(tb) * z + tr.gamma(tb) * x
    F_star = tr.alpha_hat(tb) * z + tr.gamma_hat(tb) * x
    x_hat, z_hat = tr.readout(F_star, x_t, tb)
    assert (x_hat - x).abs().max() < 1e-10 and (z_hat - z).abs().max() < 1e-10


def test_noise_end_of_each_transport():
    """Eq. (1) constraints: x_t is pure noise at t = 1 (t = 0 for ReLinear, Table 6)."""
    for name, tr in ucgm.TRANSPORTS.items():
        noise_end, data_end = torch.tensor(tr.noise_time), torch.tensor(1 - tr.noise_time)
        assert float(tr.alpha(data_end)) < 0.005, name  # x_t is (almost) data at the data end
        assert float(tr.alpha(noise_end)) > 0.99 or name == "Random", name
    assert ucgm.TRANSPORTS["ReLinear"].noise_time == 0.0


def test_unknown_transport_is_refused():
    """A transport outside Table 6 is named in the error."""
    with pytest.raises(ValueError, match="transport"):
        UCGM(transport="Cosine")


#################################################################################
#                              UCGM-T: the loss                                 #
#################################################################################

def batch(n=8, dim=4, seed=0):
    """A batch (x, y, t, noise) of flat toy data."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, dim, generator=g), torch.randint(0, 3, (n,), generator=g),
            0.05 + 0.9 * torch.rand(n, generator=g), torch.randn(n, dim, generator=g))


def test_lam0_equals_rms_flow_matching():
    """Alg. 1 l.16 at λ = 0 with the Linear transport: an RMS flow-matching loss weighted by cos(πt/2) (the default),
    last rows nulled."""
    model = tiny_dit()
    g = torch.Generator().manual_seed(0)
    x, z, t = torch.randn(6, 2, 8, 8, generator=g), torch.randn(6, 2, 8, 8, generator=g), torch.rand(6, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    got = UCGM(label_drop=0.5).loss(model, x, y, t=t, noise=z)
    # independently: rectified flow, x_t = t z + (1 - t) x, velocity target z - x, the last 3 labels nulled
    tt = t[:, None, None, None]
    pred = model(tt * z + (1 - tt) * x, t, torch.tensor([0, 1, 2, 3, 3, 3]))
    want = (((pred - (z - x)) ** 2).mean(dim=(1, 2, 3)).sqrt() * torch.cos(math.pi * t / 2)).mean()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("lam, zeta", [(0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (1.0, 0.0), (1.0, 2.0), (0.3, 1.5)])
@pytest.mark.parametrize("transport", ["Linear", "TrigFlow", "EDM"])
def test_exact_model_has_zero_loss(lam, zeta, transport):
    """Alg. 1 l.2-16: the exact F of point data has zero loss for every λ, ζ and transport."""
    x, y, t, z = batch()
    oracle = PointOracle(transport, x.double())  # each sample's data is its own point
    trainer = UCGM(transport, lam=lam, zeta=zeta, cosine_loss=True, weighting="cosine", teacher_decay=0.0)
    assert trainer.loss(oracle, x.double(), y, t=t.double(), noise=z.double()) < 1e-5


def lam_target_by_hand(model, x, z, t, y, lam, eps=0.005):
    """F^target of Alg. 1 l.9-15 for Linear (alpha = t, D = -1, x̂ = x_t - t F) without enhancement."""
    readout = lambda x_t, r, F: x_t - r[:, None] * F  # noqa: E731
    at = lambda r: r[:, None] * z + (1 - r[:, None]) * x  # noqa: E731
    F_t = model(at(t), t, y)
    if lam == 1.0:
        g_plus = readout(at(t + eps), t + eps, model(at(t + eps), t + eps, y))
        g_minus = readout(at(t - eps), t - eps, model(at(t - eps), t - eps, y))
        delta = (g_plus - g_minus) / (2 * eps)
    else:
        r, h = lam * t, (t - lam * t)[:, None]
        delta = (readout(at(t), t, F_t) - readout(at(r), r, model(at(r), r, y))) / h
    return F_t, delta, F_t + (t * 4 / torch.sin(t * math.pi / 2))[:, None] * delta.clamp(-1, 1)


def test_intermediate_lam_delta_is_the_two_point_difference():
    """Eq. (6), Alg. 1 l.9-10: Δf for 0 < λ < 1 by hand."""
    model = ToyNet().double()
    x, y, t, z = (v.double() if v.is_floating_point() else v for v in batch())
    trainer = UCGM(lam=0.4, label_drop=0.0)
    F_t, want, _ = lam_target_by_hand(model, x, z, t, y, 0.4)
    got = trainer.delta_f(model, x, z, t, y, F_t)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_consistency_loss_matches_hand_computation(lam):
    """Alg. 1 l.9-16 for λ = 0.5 and 1 against a hand computation (Linear)."""
    model = ToyNet()
    x, y, t, z = batch()
    got = UCGM(lam=lam, label_drop=0.0).loss(model, x, y, t=t, noise=z)
    F_t, _, target = lam_target_by_hand(model, x, z, t, y, lam)
    want = (((F_t - target.detach()) ** 2).mean(1).sqrt() * torch.cos(math.pi * t / 2)).mean()  # Alg. 1 l.16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func
@pytest.mark.parametrize("transport", ["Linear", "TrigFlow"])
def test_lam1_finite_difference_matches_jvp(transport):
    """Alg. 1 l.12-13: the central difference is the derivative of f^x along the path (jvp)."""
    model = ToyNet().double()
    x, y, t, z = (v.double() if v.is_floating_point() else v for v in batch())
    tr = ucgm.get_transport(transport)

    def g(r):  # the x-readout along the fixed (x, z) pair, written out again
        rb = r[:, None]
        x_r = tr.alpha(rb) * z + tr.gamma(rb) * x
        F_r = model(x_r, r, y)
        return (tr.alpha(rb) * F_r - tr.alpha_hat(rb) * x_r) / tr.D(rb)

    _, derivative = torch.func.jvp(g, (t,), (torch.ones_like(t),))
    finite_difference = UCGM(transport, lam=1.0).delta_f(model, x, z, t, y, F_t=None)
    assert (finite_difference - derivative).abs().max() < 1e-3
    assert derivative.abs().max() > 0.05  # the comparison is not between two zeros


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func
def test_lam1_loss_in_float64_matches_jvp_to_1e8():
    """Float64 in, float64 out: the whole lam = 1 loss against the exact derivative, with a small eps."""
    model = ToyNet().double()
    x, y, t, z = (v.double() if v.is_floating_point() else v for v in batch())
    tr = ucgm.get_transport("Linear")

    def g(r):  # the x-readout (x_r - r F) along the fixed pair, Linear written out again
        x_r = r[:, None] * z + (1 - r[:, None]) * x
        return x_r - r[:, None] * model(x_r, r, y)

    _, derivative = torch.func.jvp(g, (t,), (torch.ones_like(t),))
    trainer = UCGM(lam=1.0, label_drop=0.0, eps=1e-5)
    torch.testing.assert_close(trainer.delta_f(model, x, z, t, y, F_t=None), derivative, rtol=0, atol=1e-8)
    loss = trainer.loss(model, x, y, t=t, noise=z)
    F_t = model(t[:, None] * z + (1 - t[:, None]) * x, t, y)
    target = F_t + t[:, None] * 4 / torch.sin(t * math.pi / 2)[:, None] * derivative.clamp(-1, 1)  # D = -1
    want = (((F_t - target) ** 2).mean(1).sqrt() * torch.cos(math.pi * t / 2)).mean()  # Alg. 1 l.16
    assert loss.dtype == torch.float64 and abs(loss - want) < 1e-8
    assert derivative.abs().max() > 0.05 and tr.D(torch.tensor(0.3)) == -1


# lam = 1 differences two bf16 outputs 2·eps = 0.01 apart: their rounding (~0.4%) is amplified 100 times, as in the
# released bf16 training; the loss stays finite and near, the central difference is noisy
@pytest.mark.parametrize("lam, zeta, decay, tolerance", [(0.0, 0.5, 0.9, 0.02), (1.0, 1.0, 1.0, 0.2)])
def test_bf16_autocast_on_cpu_gives_a_float32_loss_close_to_float32(lam, zeta, decay, tolerance):
    """Alg. 1 under bf16 autocast: a float32 loss near the float32 one."""
    model = tiny_dit()
    x, y = torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 3
    t, z = torch.linspace(0.1, 0.9, 8), torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    results = {}
    for precision in ("fp32", "bf16"):
        trainer = UCGM(lam=lam, zeta=zeta, teacher_decay=decay, label_drop=0.25, weighting=None)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            results[precision] = trainer.loss(model, x, y, t=t, noise=z)
    assert results["bf16"].dtype == torch.float32 and torch.isfinite(results["bf16"])
    assert abs(results["bf16"] - results["fp32"]) < tolerance * results["fp32"]


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the tensor reads that move a value to the host (on CUDA each one waits for the GPU)."""
    READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lam, zeta, decay", [(0.0, 0.0, 0.0), (0.0, 0.5, 0.99), (0.5, 1.0, 0.0), (1.0, 2.0, 1.0)])
def test_loss_and_backward_read_no_tensor_on_the_host(lam, zeta, decay):
    """Alg. 1 l.2-16 as one queue of GPU work: no sync between the sampled t and the backward."""
    model = tiny_dit()
    trainer = UCGM(lam=lam, zeta=zeta, teacher_decay=decay, label_drop=0.25, huber_c=0.1, cosine_loss=True,
                   weighting="cosine", time_dist=(0.8, 1.0, 1.0))
    x, y = torch.randn(8, 2, 8, 8), torch.arange(8) % 3
    trainer.loss(model, x, y)  # the teacher is built by the first call
    with HostReads() as counter:
        trainer.loss(model, x, y).backward()
    assert counter.reads == []


def test_lam1_difference_runs_as_one_doubled_batch_equal_to_two_forwards():
    """Alg. 1 l.12-13 (λ = 1): g(t + ε) and g(t − ε) of one doubled no-grad batch equal two separate evaluations."""
    model, trainer = ToyNet().double(), UCGM(lam=1.0)
    x_star, y, t, z_star = (v.double() if v.is_floating_point() else v for v in batch())
    batches = []
    counted = lambda x_r, r, labels: batches.append(len(x_r)) or model(x_r, r, labels)  # noqa: E731
    delta = trainer.delta_f(counted, x_star, z_star, t, y, None)
    two = [trainer.denoised(model, x_star, z_star, t + sign * trainer.eps, y) for sign in (1, -1)]
    assert batches == [2 * len(x_star)]
    torch.testing.assert_close(delta, (two[0] - two[1]) / (2 * trainer.eps), rtol=1e-12, atol=1e-9)


def test_gradients_reach_only_the_F_t_branch():
    """Alg. 1 l.15: sg(F_t); the gradient flows through F_t of l.4 only."""
    x, y, t, z = batch()
    trainer = UCGM(lam=1.0, zeta=1.5, teacher_decay=1.0, label_drop=0.25)  # a frozen teacher: same in every call
    model = ToyNet()
    trainer.make_teacher(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the online model moves away from its teacher
    trainer.loss(model, x, y, t=t, noise=z).backward()
    got = [p.grad.clone() for p in model.parameters()]
    assert all(p.grad is None for p in trainer.teacher.parameters())
    # the same loss with a target built separately and detached gives the same gradient ...
    y_dropped, dropped = trainer.drop_labels(y, 3)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    grads = []
    for detach in (True, False):
        model.zero_grad()
        F_t = model(x_t, t, y_dropped)
        with torch.set_grad_enabled(not detach):
            F_in = F_t if not detach else F_t.detach()
            x_star, z_star = trainer.enhance(model, x, z, x_t, t, y_dropped, dropped, F_in)
            target = trainer.target(model, x_star, z_star, t, y_dropped, F_in)
        (((F_t - target) ** 2).mean(1).sqrt() * torch.cos(math.pi * t / 2)).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(got, grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # ... and not the one where gradient also flows through the target
    assert max((a - b).abs().max() for a, b in zip(got, grads[1])) > 1e-4


@pytest.mark.parametrize("lam, style", [(0.0, None), (1.0, None), (0.0, "fc-vs-fe"), (1.0, "fc-vs-fe"),
                                        (0.5, "ft-vs-fe"), (0.0, "fc-vs-xz")])
def test_enhanced_targets_follow_the_three_row_rules(lam, style):
    """Alg. 1 l.5-6 (App. C.1.3 for λ > 0), README rules "enhanced styles", "enhance range", "dropped rows": with
    (P, R) the style's two predictions, kept rows get x + ζ(P − R) inside the range and (x + P)/2 outside, dropped
    rows (x + R)/2; None is ft-vs-fe for λ = 0 and fc-vs-xz for λ > 0."""
    x, y, t, z = batch(n=10)
    t[:5] = torch.tensor([0.1, 0.5, 0.8, 0.9, 0.3])  # rows 2 and 3 fall outside enhance_range (0, 0.75)
    zeta = 0.4 if (lam, style) == (0.0, None) else 1.7
    trainer = UCGM(lam=lam, zeta=zeta, teacher_decay=0.0, label_drop=0.3, enhance_style=style)
    style = style or ("ft-vs-fe" if lam == 0.0 else "fc-vs-xz")
    assert trainer.enhance_style == style
    model = ToyNet()
    y_dropped, dropped = trainer.drop_labels(y, 3)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    F_t = model(x_t, t, y_dropped)
    got_x, got_z = trainer.enhance(model, x, z, x_t, t, y_dropped, dropped, F_t)
    with torch.no_grad():
        F_c, F_u = model(x_t, t, y_dropped), model(x_t, t, torch.full_like(y, 3))  # θ_T = the online model (d = 0)
    for i in range(10):
        ti = float(t[i])
        read = lambda F: (x_t[i] - ti * F[i], x_t[i] + (1 - ti) * F[i])  # noqa: E731  Linear x̂ = x_t − tF, ẑ = x_t + (1 − t)F
        P = read(F_t.detach() if style == "ft-vs-fe" else F_c)
        R = (x[i], z[i]) if style == "fc-vs-xz" else read(F_u)
        for k, (data, got) in enumerate([(x[i], got_x[i]), (z[i], got_z[i])]):
            want = (data + R[k]) / 2 if i >= 7 else data + zeta * (P[k] - R[k]) if 0 < ti < 0.75 \
                else (data + P[k]) / 2
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fc_vs_fe_runs_the_teacher_once_on_a_doubled_batch():
    """README rule "enhanced styles": fc-vs-fe evaluates θ_T on (y, ∅) in one no-grad call of twice the batch, and
    a frozen teacher with λ = 0 is accepted for fc-vs-xz and fc-vs-fe but not ft-vs-fe."""
    x, y, t, z = batch()
    calls = []
    model = ToyNet()
    trainer = UCGM(lam=0.0, zeta=2.0, teacher_decay=1.0, enhance_style="fc-vs-fe")
    trainer.make_teacher(model)
    trainer.teacher.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    trainer.loss(model, x, y, t=t, noise=z)
    assert calls == [2 * x.shape[0]]
    UCGM(lam=0.0, zeta=2.0, teacher_decay=1.0, enhance_style="fc-vs-xz")
    with pytest.raises(ValueError, match="teacher_decay"):
        UCGM(lam=0.0, zeta=0.5, teacher_decay=1.0, enhance_style="ft-vs-fe")
    with pytest.raises(ValueError, match="enhance_style"):
        UCGM(enhance_style="fc-vs-xy")


@pytest.mark.parametrize("lam, zeta, style", [(0.0, 0.0, None), (0.0, 0.5, None), (0.5, 1.2, "fc-vs-fe"),
                                              (1.0, 1.9, "fc-vs-fe")])
def test_relinear_trains_exactly_as_its_linear_wrapping(lam, zeta, style):
    """README rule "training clock": a ReLinear network (noise at t = 0) trains as the Linear network
    −F(x_t, 1 − t, y), with t, the enhance range, the cos(πt/2) weight and ±ε counted from the data end."""
    x, y, t, z = (v.double() if v.is_floating_point() else v for v in batch())
    relinear = ToyNet().double()
    wrapped = lambda x_t, s, labels: -relinear(x_t, 1 - s, labels)  # noqa: E731
    wrapped.num_classes = relinear.num_classes
    settings = dict(lam=lam, zeta=zeta, enhance_style=style, teacher_decay=0.0, huber_c=0.1, weighting="cosine",
                    label_drop=0.25)
    got = UCGM("ReLinear", **settings).loss(relinear, x, y, t=t, noise=z)
    want = UCGM("Linear", **settings).loss(wrapped, x, y, t=t, noise=z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_huber_cosine_term_and_weighting():
    """Alg. 1 l.16 with README rule "Huber and cosine" and the cos(πt/2) weight."""
    model = tiny_dit()
    g = torch.Generator().manual_seed(3)
    x, z, t = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g), torch.rand(4, generator=g)
    y = torch.tensor([0, 1, 2, 1])
    got = UCGM(label_drop=0.0, huber_c=0.7, cosine_loss=True, weighting="cosine").loss(model, x, y, t=t, noise=z)
    tt = t[:, None, None, None]
    pred = model(tt * z + (1 - tt) * x, t, y).detach().double().numpy()
    target = (z - x).double().numpy()
    want = []
    for i in range(4):
        huber = math.sqrt(((pred[i] - target[i]) ** 2).mean() + 0.49) - 0.7
        dots = (pred[i] * target[i]).sum(0) / np.maximum(
            np.linalg.norm(pred[i], axis=0) * np.linalg.norm(target[i], axis=0), 1e-8)  # per pixel, over channels
        want.append((huber + (1 - dots).mean()) * math.cos(math.pi * float(t[i]) / 2))
    assert abs(got.item() - np.mean(want)) < 1e-5


@pytest.mark.parametrize("p, n, k", [(0.1, 10, 1), (0.25, 8, 2), (0.1, 32, 3), (0.04, 10, 0), (0.0, 8, 0)])
def test_label_dropout_takes_the_last_round_pn_rows(p, n, k):
    """README rule "label dropping": the last round(p·N) rows get ∅."""
    seen = []

    class Spy(ToyNet):
        def forward(self, x, t, y):
            seen.append(y.clone())
            return super().forward(x, t, y)

    x, y, t, z = batch(n=n)
    UCGM(label_drop=p).loss(Spy(), x, y, t=t, noise=z)
    want = y.clone()
    want[n - k:] = 3
    assert torch.equal(seen[0], want) and (seen[0] == 3).sum() == k


def test_teacher_ema_warmup_follows_t4():
    """README rule "teacher": the EMA teacher θ_T (Alg. 1 l.6) with its warm-up momentum."""
    decay = 0.9
    trainer = UCGM(zeta=0.3, teacher_decay=decay)
    model = ToyNet()
    x, y, t, z = batch()
    expected, m = None, 0.0
    for step in range(5):
        trainer.loss(model, x, y, t=t, noise=z)
        online = [p.detach().clone() for p in model.parameters()]
        expected = online if expected is None else [m * e + (1 - m) * o for e, o in zip(expected, online)]
        m = m + (1 - m) * (decay - m) / 2
        for e, got in zip(expected, trainer.teacher.parameters()):
            torch.testing.assert_close(got, e)
        assert trainer.teacher_momentum == pytest.approx(m)
        if step == 0:
            assert all(torch.equal(a, b) for a, b in zip(online, trainer.teacher.parameters()))  # m = 0 copies
        with torch.no_grad():  # stand-in for an optimiser step
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))


def test_teacher_modes():
    """README rule "teacher": θ_T online (d = 0), EMA (0 < d < 1) or frozen (d = 1)."""
    x, y, t, z = batch()
    online = UCGM(zeta=0.3, teacher_decay=0.0)  # d = 0: the online model, no copy
    online.loss(ToyNet(), x, y, t=t, noise=z)
    assert online.teacher is None
    frozen, model = UCGM(lam=1.0, zeta=2.0, teacher_decay=1.0), ToyNet()
    frozen.loss(model, x, y, t=t, noise=z)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    frozen.loss(model, x, y, t=t, noise=z)
    assert all(torch.equal(a, b) for a, b in zip(start, frozen.teacher.parameters()))
    assert UCGM(lam=1.0, zeta=0.0, teacher_decay=0.999).needs_teacher is False  # no zeta: no teacher
    with pytest.raises(ValueError, match="teacher_decay"):
        UCGM(lam=0.0, zeta=0.5, teacher_decay=1.0)


def test_trainer_state_dict_roundtrip(tmp_path):
    """The teacher θ_T and its momentum survive a state-dict round trip."""
    x, y, t, z = batch()
    trainer, model = UCGM(zeta=0.4, teacher_decay=0.99), ToyNet()
    for _ in range(3):
        trainer.loss(model, x, y, t=t, noise=z)
        with torch.no_grad():
            model.out.bias.add_(0.3)
    torch.save(trainer.state_dict(), tmp_path / "ucgm.pt")
    restored = UCGM(zeta=0.4, teacher_decay=0.99)
    with pytest.raises(ValueError, match="make_teacher"):
        restored.load_state_dict(torch.load(tmp_path / "ucgm.pt", weights_only=True))
    restored.make_teacher(ToyNet(seed=5))
    restored.load_state_dict(torch.load(tmp_path / "ucgm.pt", weights_only=True))
    assert restored.teacher_momentum == trainer.teacher_momentum > 0
    for a, b in zip(trainer.teacher.parameters(), restored.teacher.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(trainer.loss(model, x, y, t=t, noise=z), restored.loss(model, x, y, t=t, noise=z))


def test_time_distribution_is_scaled_clamped_beta():
    """Alg. 1 l.2 with README rule "time scale": t = clamp(s·Beta(θ1, θ2)) (a KS test)."""
    torch.manual_seed(0)
    t = UCGM(time_dist=(0.8, 1.0, 1.0)).sample_time(20000, "cpu").numpy()
    assert scipy.stats.kstest(t, scipy.stats.beta(0.8, 1.0).cdf).pvalue > 1e-3
    t = UCGM(time_dist=(2.4, 2.4, 1.5)).sample_time(20000, "cpu").numpy()
    clamped = 1 - scipy.stats.beta(2.4, 2.4).cdf(1 / 1.5)  # P(1.5·B >= 1)
    assert abs((t == 1.0).mean() - clamped) < 4 * math.sqrt(clamped * (1 - clamped) / 20000)
    inner = t[t < 1] / 1.5
    assert scipy.stats.kstest(inner, lambda v: scipy.stats.beta(2.4, 2.4).cdf(v) / (1 - clamped)).pvalue > 1e-3


@pytest.mark.parametrize("kwargs, match", [
    (dict(lam=1.5), "lam"), (dict(lam=-0.1), "lam"), (dict(zeta=1.0), "zeta"), (dict(zeta=float("inf"), lam=1.0),
                                                                                  "zeta"),
    (dict(weighting="uniform"), "weighting"), (dict(time_dist=(1, 1)), "time_dist"), (dict(label_drop=2), "label_drop"),
    (dict(enhance_range=(0.8, 0.2)), "enhance_range")])
def test_bad_trainer_arguments_are_refused(kwargs, match):
    """One-line errors for arguments outside Alg. 1's ranges."""
    with pytest.raises(ValueError, match=match):
        UCGM(**kwargs)


def test_bad_loss_inputs_are_refused():
    """One-line errors for inputs of the wrong shape."""
    x, y, t, z = batch()
    with pytest.raises(ValueError, match="noise"):
        UCGM().loss(ToyNet(), x, y, t=t, noise=z[:, :2])
    with pytest.raises(IndexError):
        UCGM().loss(tiny_dit(), torch.randn(2, 2, 8, 8), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="t: expected"):
        UCGM().loss(ToyNet(), x, y, t=t[:3], noise=z)


@pytest.mark.parametrize("lam, zeta, decay", [(1.0, 0.0, 0.0), (0.5, 0.5, 0.999), (0.0, 0.5, 0.0)])
def test_target_passes_run_without_dropout(lam, zeta, decay):
    """The no-grad passes of the loss (Alg. 1 l.6, 9-13) run in eval mode, so dropout (UNet+) adds no noise to
    the λ = 1 difference over 2ε; the grad pass F_t (l.4) trains with it; the mode is restored after."""
    model, modes = dropout_unetplus(), []
    model.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    trainer = UCGM("EDM", lam=lam, zeta=zeta, teacher_decay=decay)
    trainer.make_teacher(model)
    if trainer.teacher is not None:
        trainer.teacher.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    model.train()
    trainer.loss(model, torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    assert modes[0] is True and len(modes) > 1 and not any(modes[1:]) and model.training


@pytest.mark.parametrize("lam", [0.5, 1.0])
@pytest.mark.parametrize("transport", ["Linear", "TrigFlow", "EDM"])
def test_lam_above_0_is_finite_at_both_ends_of_time(lam, transport):
    """Alg. 1 l.9-15 at λ > 0: t = 0 would give 0/0 (α(0)/sin(0), and h = t − λt = 0) and t ± ε would leave [0, 1]:
    t is raised to ε, so the loss at t = 0 is finite and equals the loss at ε, and at t = 1 the difference of
    Alg. 1 l.13 is one-sided, (g(1) − g(1 − ε))/ε; the network sees only times in [0, 1]."""
    x, y, _, z = (v.double() if v.is_floating_point() else v for v in batch(n=4))
    times = []
    model = ToyNet().double()
    model.register_forward_pre_hook(lambda module, args: times.append(args[1].detach().clone()))
    trainer = UCGM(transport, lam=lam, label_drop=0.0)
    ends = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    got = trainer.loss(model, x, y, t=ends, noise=z)
    assert torch.isfinite(got) and got == trainer.loss(model, x, y, t=ends.clamp(min=trainer.eps), noise=z) > 0
    assert all(float(seen.min()) >= 0 and float(seen.max()) <= 1 for seen in times)
    if lam == 1.0:
        one = torch.ones(4, dtype=torch.float64)
        g = [trainer.denoised(model, x, z, one - shift, y) for shift in (0, trainer.eps)]
        torch.testing.assert_close(trainer.delta_f(model, x, z, one, y, None), (g[0] - g[1]) / trainer.eps)


#################################################################################
#                             UCGM-S: the sampler                               #
#################################################################################

def test_time_grids_are_exact():
    """Alg. 2 l.1 and the schedule T (App. C.1.3 warp, README rule "gaps") against hand-computed grids."""
    step = 0.998 / 3  # u = linspace(0.001, 0.999, 4), t = 1 - u, then the data end
    want = [0.999, 0.999 - step, 0.999 - 2 * step, 0.001, 0.0]
    torch.testing.assert_close(ucgm.time_grid("Linear", 4), torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(ucgm.time_grid("Linear", 4, gaps=(0.0, 0.0)),  # n + 1 points, the last dropped
                               torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(ucgm.time_grid("Linear", 5, order=2, gaps=(0.1, 0.3)),  # (5 + 1) // 2 = 3 points
                               torch.tensor([0.9, 0.6, 0.3, 0.0], dtype=torch.float64))
    u = np.linspace(0.001, 0.999, 6)
    warped = (1 - (1 - u ** 1.17) ** 0.8) ** 1.1
    np.testing.assert_allclose(ucgm.time_grid("Linear", 6, warp=(1.17, 0.8, 1.1)).numpy(), np.append(1 - warped, 0),
                               rtol=1e-12)
    np.testing.assert_allclose(ucgm.time_grid("ReLinear", 6, warp=(1.17, 0.8, 1.1)).numpy(), np.append(warped, 1))
    np.testing.assert_allclose(ucgm.time_grid("Linear", 1, gaps=(0.001, 0.3)).numpy(), [0.999, 0.0])


@pytest.mark.parametrize("transport", sorted(ucgm.TRANSPORTS))
def test_one_step_returns_a_point_mass(transport):
    """Alg. 2 l.3 and the output: one step of the exact point-mass denoiser returns the point."""
    x0 = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64).repeat(5, 1)
    noise = torch.randn(5, 3)
    out = UCGM(transport).sample(PointOracle(transport, x0), noise, steps=1, rho=1.0, gaps=(0.001, 0.3))
    torch.testing.assert_close(out, x0.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("transport", ["Linear", "TrigFlow", "ReLinear"])
def test_gaussian_data_is_sampled_with_its_mean_and_covariance(transport):
    """Tolerances: N = 20000 samples give standard errors se(mean_i) = sqrt(S_ii / N) and se(cov_ij) =
    sqrt((S_ii S_jj + S_ij²) / N); we allow 4 of them plus the discretisation error, which is bounded by the
    RMS distance to the exact probability-flow solution from the same noise (checked to fall as 1/steps)."""
    mu, sigma = gaussian_problem()
    oracle, sampler = GaussianOracle(transport, mu, sigma), UCGM(transport)
    noise = torch.randn(20000, 3, generator=torch.Generator().manual_seed(0))
    rms = {}
    for steps in (64, 128, 256):
        out = sampler.sample(oracle, noise, steps=steps).double()
        exact = exact_flow(transport, mu, sigma, noise, float(ucgm.time_grid(transport, steps)[0]))
        rms[steps] = ((out - exact) ** 2).sum(1).mean().sqrt().item()
    assert rms[64] < 0.06 and 1.8 < rms[64] / rms[128] < 2.2 and 1.8 < rms[128] / rms[256] < 2.2  # first order
    n, s = len(noise), sigma.diag()
    assert ((out.mean(0) - mu).abs() < 4 * (s / n).sqrt() + rms[256]).all()
    se_cov = ((s[:, None] * s[None, :] + sigma ** 2) / n).sqrt()
    assert ((torch.cov(out.T) - sigma).abs() < 4 * se_cov + 2 * rms[256] * s.max().sqrt()).all()


@pytest.mark.parametrize("transport", ["Linear", "TrigFlow"])
def test_extrapolation_reduces_the_error_against_the_exact_ode(transport):
    """Alg. 2 l.4-5: κ = 0.5 brings 8-16 steps nearer the exact ODE."""
    mu, sigma = gaussian_problem()
    oracle, sampler = GaussianOracle(transport, mu, sigma), UCGM(transport)
    noise = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1))
    for steps in (8, 12, 16):
        exact = exact_flow(transport, mu, sigma, noise, float(ucgm.time_grid(transport, steps)[0]))
        err = {kappa: ((sampler.sample(oracle, noise, steps=steps, kappa=kappa).double() - exact) ** 2).mean().sqrt()
               for kappa in (0.0, 0.5)}
        assert err[0.5] < 0.8 * err[0.0], (steps, err)


def test_second_order_step_matches_hand_computation():
    """Alg. 2 l.9-11 (with ẑ) against a hand computation."""
    mu, sigma = gaussian_problem()
    oracle, sampler, tr = GaussianOracle("Linear", mu, sigma), UCGM("Linear"), ucgm.TRANSPORTS["Linear"]
    noise = torch.randn(6, 3, dtype=torch.float64)
    got = sampler.sample(oracle, noise, steps=3, order=2, gaps=(0.1, 0.2))  # n = 2: times 0.9, 0.2, 0
    assert sampler.nfe == 3
    t0, t1 = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    F = lambda x, t: oracle(x.float(), t.float().expand(len(x)))  # noqa: E731  (the sampler feeds float32)
    x_hat, z_hat = tr.readout(F(noise, t0), noise, t0)
    euler = (1 - t1) * x_hat + t1 * z_hat
    z_next = tr.readout(F(euler, t1), euler, t1)[1]
    heun = noise * (1 - t1) / (1 - t0) + (t1 - t0 * (1 - t1) / (1 - t0)) * (z_hat + z_next) / 2
    torch.testing.assert_close(got, tr.readout(F(heun, t1), heun, t1)[0].float())
    with pytest.raises(ValueError, match="gaps"):  # gamma(t_0) = 0 would divide by zero
        sampler.sample(oracle, noise, steps=4, order=2, gaps=(0.0, 0.1))


def test_auto_rho_is_recomputed_every_step_with_generator_noise():
    """Alg. 2 l.7-8: ρ = "auto" at every step, noise from the generator."""
    mu, sigma = gaussian_problem()
    oracle, sampler, tr = GaussianOracle("Linear", mu, sigma), UCGM("Linear"), ucgm.TRANSPORTS["Linear"]
    noise = torch.randn(6, 3, dtype=torch.float64)
    got = sampler.sample(oracle, noise, steps=3, rho="auto", gaps=(0.1, 0.1), generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    times = [0.9, 0.5, 0.1, 0.0]
    x = noise
    for t_cur, t_next in zip(times[:-1], times[1:]):
        t_cur, t_next = torch.tensor(t_cur, dtype=torch.float64), torch.tensor(t_next, dtype=torch.float64)
        x_hat, z_hat = tr.readout(oracle(x.float(), t_cur.float().expand(6)), x, t_cur)
        rho = min(abs(t_next - t_cur) * 2 * t_cur / t_next ** 2, 1.0) if t_next > 0 else 1.0
        eps = torch.randn(6, 3, generator=g, dtype=torch.float64)
        x = (1 - t_next) * x_hat + t_next * (math.sqrt(1 - rho) * z_hat + math.sqrt(rho) * eps)
    torch.testing.assert_close(got, x_hat.float())
    again = sampler.sample(oracle, noise, steps=3, rho="auto", gaps=(0.1, 0.1),
                           generator=torch.Generator().manual_seed(7))
    other = sampler.sample(oracle, noise, steps=3, rho=1.0, gaps=(0.1, 0.1), generator=torch.Generator().manual_seed(8))
    assert torch.equal(got, again) and not torch.allclose(got, other)


def test_return_all_gives_the_raw_trajectory():
    """Alg. 2 Ensure: the history of raw x̂_i."""
    mu, sigma = gaussian_problem()
    out, trajectory = UCGM().sample(GaussianOracle("Linear", mu, sigma), torch.randn(5, 3), steps=6, kappa=0.5,
                                    return_all=True)
    assert trajectory.shape == (6, 5, 3) and torch.equal(trajectory[-1], out)


class CountingNet(ToyNet):
    """ToyNet that counts the rows it evaluates."""
    rows = 0

    def forward(self, x, t, y):
        self.rows += len(x)
        return super().forward(x, t, y)


def test_cfg_interval_and_nfe():
    """README rule "cfg interval": guided steps inside the interval count two evaluations."""
    model, sampler = CountingNet(dim=4), UCGM()
    noise, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    sampler.sample(model, noise, steps=10, cfg_scale=3.0, cfg_interval=(0.0, 0.5), y=y)
    inside = int(((ucgm.time_grid("Linear", 10)[:-1] >= 0) & (ucgm.time_grid("Linear", 10)[:-1] <= 0.5)).sum())
    assert 0 < inside < 10 and sampler.nfe == 10 + inside and model.rows == 5 * sampler.nfe
    sampler.sample(model, noise, steps=10, y=y)
    assert sampler.nfe == 10


@pytest.mark.parametrize("channels", [None, 2])
def test_cfg_guides_the_requested_channels(channels):
    """README rule "cfg channels": guidance on the first k channels only."""
    model, sampler = ToyNet(dim=4), UCGM()
    noise, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    got = sampler.sample(model, noise, steps=1, cfg_scale=2.5, cfg_channels=channels, y=y, gaps=(0.2, 0.3))
    t = torch.full((5,), 0.8)
    F_c, F_u = model(noise, t, y).double(), model(noise, t, torch.full_like(y, 3)).double()
    F = F_u + 2.5 * (F_c - F_u)
    if channels is not None:
        F[:, channels:] = F_c[:, channels:]
    torch.testing.assert_close(got, (noise - 0.8 * F).float())  # Linear x̂ = x_t - t F


@pytest.mark.parametrize("kwargs, match", [
    (dict(order=3), "order"), (dict(steps=0), "steps"), (dict(gaps=(0.6, 0.5)), "gaps"), (dict(rho=2.0), "rho"),
    (dict(gaps=(-0.1, 0.1)), "gaps"), (dict(cfg_scale=2.0), "cfg_scale"), (dict(warp=(1, 0, 1)), "warp"),
    (dict(times=[0.5, 0.9, 0.0]), "times"), (dict(times=[1.0]), "times"), (dict(times=[[1.0, 0.0]]), "times")])
def test_bad_sampler_arguments_are_refused(kwargs, match):
    """One-line errors for arguments outside Alg. 2's ranges."""
    with pytest.raises(ValueError, match=match):
        UCGM().sample(ToyNet(), torch.randn(2, 4), **{"steps": 4, **kwargs})


def test_explicit_times_replace_the_grid_and_count_the_evaluations():
    """Alg. 2's schedule T given as `times`: the same samples as the grid it equals, in either direction of the
    clock (ReLinear's noise end is t = 0), steps, warp and gaps unused; order 2 costs 2n − 1 evaluations."""
    mu, sigma = gaussian_problem()
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    for transport in ("Linear", "ReLinear"):
        sampler, oracle = UCGM(transport), GaussianOracle(transport, mu, sigma)
        grid = ucgm.time_grid(transport, 7, order=2, warp=(1.17, 0.8, 1.1))  # 4 times, then the data end
        got = sampler.sample(oracle, noise, times=grid.tolist(), order=2, steps=1, warp=(1, 1, 1), gaps=(0.5, 0.4))
        assert torch.equal(got, sampler.sample(oracle, noise, steps=7, order=2, warp=(1.17, 0.8, 1.1)))
        assert sampler.nfe == 2 * 4 - 1


def test_float64_networks_get_float64_inputs_and_give_float64_samples():
    """Alg. 2 l.3: a network with float64 weights is called in float64 and x̂ comes back in float64; any other in
    float32."""
    seen = []
    for model in (ToyNet(), ToyNet().double()):
        model.register_forward_pre_hook(lambda module, args: seen.append((args[0].dtype, args[1].dtype)))
        out = UCGM().sample(model, torch.randn(2, 4), steps=2, y=torch.tensor([0, 1]))
        assert out.dtype == seen[-1][0] == seen[-1][1]
    assert [dtype for dtype, _ in seen] == [torch.float32] * 2 + [torch.float64] * 2


def test_sampler_preset_sets_rho_to_lam():
    """Sec. 3.2: ρ = λ; the other settings are the released multi-step preset up to λ = 0.5, the few-step one above."""
    for lam in (0.0, 0.3, 0.5, 0.7, 1.0):
        want = ucgm.SAMPLER_PRESETS["fewstep" if lam > 0.5 else "multistep"]
        assert ucgm.sampler_preset(lam) == {**want, "rho": lam}
    assert ucgm.sampler_preset(0.0) == ucgm.SAMPLER_PRESETS["multistep"]
    assert ucgm.sampler_preset(1.0) == ucgm.SAMPLER_PRESETS["fewstep"]


#################################################################################
#    Table 1: diffusion, flow matching and consistency models as special cases  #
#################################################################################

# Data x ~ N(mu, s²·I) in float64, so that every network below is exact: for x_t = a·z + g·x the posterior mean is
# E[x | x_t] = mu + g·s²/(g²·s² + a²)·(x_t − g·mu). Each test writes the other paper's algorithm out again.
TABLE1_MU, TABLE1_S, SIGMA_DATA = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0.7, 0.5


def posterior_mean(x_t, a, g):
    """E[x | x_t] for x_t = a·z + g·x (a Gaussian's conditional mean)."""
    return TABLE1_MU + g * TABLE1_S ** 2 / (g ** 2 * TABLE1_S ** 2 + a ** 2) * (x_t - g * TABLE1_MU)


class Float64Net(nn.Module):
    """F = function(x_t, t (N, 1)) as a network with a float64 weight, which UCGM-S must call in float64."""
    def __init__(self, function):
        super().__init__()
        self.function, self.num_classes = function, 1
        self.unit = nn.Parameter(torch.ones((), dtype=torch.float64), requires_grad=False)

    def forward(self, x_t, t, y=None):
        assert x_t.dtype == t.dtype == torch.float64
        return self.function(x_t, t[:, None]) * self.unit


def edm_preconditioning(sigma):
    """EDM's (c_skip, c_out, c_in) at noise level σ (Karras et al. 2022, Table 1)."""
    norm = (sigma ** 2 + SIGMA_DATA ** 2).sqrt()
    return SIGMA_DATA ** 2 / norm ** 2, sigma * SIGMA_DATA / norm, 1 / norm


def edm_raw_network(x_in, noise_label):
    """EDM's F_θ(c_in·x, c_noise) for the exact denoiser D = c_skip·x + c_out·F_θ (c_noise = ln(σ)/4 as EDM2,
    which UCGM's EDM transport feeds as 2.68t − 1.59)."""
    sigma = torch.exp(4 * noise_label)
    c_skip, c_out, c_in = edm_preconditioning(sigma)
    x = x_in / c_in
    return (posterior_mean(x, sigma, 1.0) - c_skip * x) / c_out


def test_edm_heun_sampler_is_ucgm_s_with_edm_transport_order_2_rho_0():
    """Table 1, diffusion: UCGM-S (EDM transport, ν = 2, ρ = 0, κ = 0; Alg. 2 l.3-11) on sample.py's --schedule edm
    grid is EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1, S_churn = 0; 18 levels, σ 80 -> 0.002,
    ρ = 7) step for step in σ-space (x = x_t/γ(t), σ = α/γ): 35 evaluations, and UCGM's raw x̂ of the last one is
    EDM's last Euler step to σ = 0. UCGM starts from x_t0 = γ(t_0)·σ_0·n where EDM starts from σ_0·n."""
    n = 18
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    sigmas = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # Karras et al. 2022, Eq. (5)
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    calls = []

    def D(x, sigma):  # EDM's preconditioned denoiser
        calls.append(1)
        c_skip, c_out, c_in = edm_preconditioning(sigma)
        return c_skip * x + c_out * edm_raw_network(c_in * x, sigma.log() / 4)

    n_draw = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sigmas[0] * n_draw
    for i in range(n):  # Karras et al. 2022, Alg. 1 with S_churn = 0
        d = (x - D(x, sigmas[i])) / sigmas[i]
        x_next = x + (sigmas[i + 1] - sigmas[i]) * d
        if sigmas[i + 1] != 0:
            d_next = (x_next - D(x_next, sigmas[i + 1])) / sigmas[i + 1]
            x_next = x + (sigmas[i + 1] - sigmas[i]) * (d + d_next) / 2
        x = x_next

    times = sample.edm_times(sample.parse_args(["--ckpt", "-", "--schedule", "edm"]), "EDM", 35, 2)
    to_time = lambda sigma: (sigma.log() / 4 + 1.59) / 2.68  # noqa: E731  σ(t) = exp(4(2.68t − 1.59)) inverted
    torch.testing.assert_close(times, torch.cat([to_time(sigmas[:n]), torch.zeros(1, dtype=torch.float64)]))
    model = Float64Net(lambda x_t, t: edm_raw_network(x_t, 2.68 * t - 1.59))
    start = edm_preconditioning(sigmas[0])[2] * sigmas[0] * n_draw  # c_in·σ_0·n
    flags = sample.parse_args(["--ckpt", "-", "--schedule", "edm", "--order", "2", "--steps", "35"])
    resolved = sample.resolve(flags, {"transport": "EDM", "sampler": {"cfg_scale": 1.0}})  # an EDM pickle's
    assert resolved["kappa"] == (0.0, "schedule edm") and resolved["rho"] == (0.0, "schedule edm")
    sampler = UCGM("EDM")
    got = sampler.sample(model, start, times=times, order=2, rho=resolved["rho"][0], kappa=resolved["kappa"][0])
    assert len(calls) == sampler.nfe == 35 and got.dtype == torch.float64
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="--schedule edm"):
        sample.edm_times(sample.parse_args(["--ckpt", "-", "--schedule", "edm"]), "Linear", 35, 2)


def test_flow_matching_euler_is_ucgm_s_with_linear_order_1_rho_0():
    """Table 1, flow matching: UCGM-S (Linear, ν = 1, ρ = 0, κ = 0; Alg. 2 l.3-8) is Euler's method on the flow ODE
    dx_t/dt = v(x_t, t) = E[z − x | x_t] (Lipman et al. 2023; Liu et al. 2023) on the same grid, and its raw x̂ of
    the last evaluation is the Euler step to t = 0."""
    def velocity(x_t, t):
        x_hat = posterior_mean(x_t, t, 1 - t)
        return (x_t - (1 - t) * x_hat) / t - x_hat  # E[z | x_t] − E[x | x_t]

    times = ucgm.time_grid("Linear", 12, warp=(1.17, 0.8, 1.1))
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = noise
    for t_cur, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t_cur) * velocity(x, t_cur)
    got = UCGM("Linear").sample(Float64Net(velocity), noise, steps=12, warp=(1.17, 0.8, 1.1), rho=0.0, kappa=0.0)
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)


def scm_velocity(x_tau, tau):
    """sCM's exact F(x_τ, τ) = dx_τ/dτ = E[cos τ·z − sin τ·x | x_τ] for x_τ = cos τ·x + sin τ·z (σ_d = 1)."""
    x_hat = posterior_mean(x_tau, tau.sin(), tau.cos())
    return tau.cos() * (x_tau - tau.cos() * x_hat) / tau.sin() - tau.sin() * x_hat


def test_scm_multistep_sampler_is_ucgm_s_with_trigflow_rho_1():
    """Table 1, consistency models: UCGM-S (TrigFlow, ρ = 1, κ = 0; Alg. 2 l.3-8) is sCM's multistep sampler (Lu &
    Song 2024, σ_d = 1): x̂ = cos τ·x_τ − sin τ·F(x_τ, τ), then x_τ' = cos τ'·x̂ + sin τ'·n' with fresh n' (the same
    generator draws), on sCM's τ = (arctan 80, 1.1, 0.5), i.e. t = 2τ/π; TrigFlow's F* is the velocity in τ."""
    taus = torch.tensor([math.atan(80.0), 1.1, 0.5], dtype=torch.float64)
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    generator, x = torch.Generator().manual_seed(3), noise
    for i, tau in enumerate(taus):
        x_hat = tau.cos() * x - tau.sin() * scm_velocity(x, tau)
        if i + 1 < len(taus):
            fresh = torch.randn(noise.shape, generator=generator, dtype=torch.float64)
            x = taus[i + 1].cos() * x_hat + taus[i + 1].sin() * fresh
    model = Float64Net(lambda x_t, t: scm_velocity(x_t, t * math.pi / 2))
    times = torch.cat([taus * 2 / math.pi, torch.zeros(1, dtype=torch.float64)])
    got = UCGM("TrigFlow").sample(model, noise, times=times, rho=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, x_hat, rtol=1e-12, atol=1e-12)


def scm_loss(model, x, z, t, y):
    """sCM's continuous-time consistency-training loss (Lu & Song 2024, σ_d = 1, without its adaptive weight and
    tangent warm-up) per sample: mean((F_θ − F_θ⁻ − g)²) with the tangent g = −cos²τ·(F_θ⁻ − dx_τ/dτ) −
    sin τ·cos τ·(x_τ + dF_θ⁻/dτ), dF_θ⁻/dτ by torch.func.jvp; the network takes UCGM's t = 2τ/π."""
    tau = t[:, None] * math.pi / 2
    x_tau, dx_dtau = tau.cos() * x + tau.sin() * z, tau.cos() * z - tau.sin() * x
    F = lambda x_in, tau_in: model(x_in, tau_in[:, 0] * 2 / math.pi, y)  # noqa: E731
    with torch.no_grad():
        F_minus, dF_dtau = torch.func.jvp(F, (x_tau, tau), (dx_dtau, torch.ones_like(tau)))
    g = -tau.cos() ** 2 * (F_minus - dx_dtau) - tau.sin() * tau.cos() * (x_tau + dF_dtau)
    return ((F(x_tau, tau) - F_minus - g) ** 2).mean(1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func
def test_lam1_trigflow_gradient_is_scms_continuous_time_gradient():
    """Table 1, consistency models: UCGM-T at λ = 1 with TrigFlow and the cos(πt/2) weight (Alg. 1 l.12-16) against
    sCM's loss (`scm_loss`). Its tangent g = cos τ·df/dτ, and UCGM's target F_θ⁻ + 4Δf = F_θ⁻ + 2π·df/dτ + O(ε²):
    with a squared distance the gradient is 2π times sCM's; with UCGM's RMS, one sample's gradient has sCM's
    direction, the RMS dividing by the tangent's size as sCM's normalisation does."""
    model = ToyNet().double()
    with torch.no_grad():  # small outputs and data (below) keep |Δf| < 1
        model.out.weight.mul_(0.2), model.out.bias.mul_(0.2)
    x, y, t, z = (v.double() if v.is_floating_point() else v for v in batch(n=6))
    x, z = 0.2 * x, 0.2 * z
    trainer = UCGM("TrigFlow", lam=1.0, label_drop=0.0, eps=1e-4)
    params = list(model.parameters())
    flat = lambda loss: torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])  # noqa: E731
    tau = t[:, None] * math.pi / 2
    x_t = tau.sin() * z + tau.cos() * x  # Alg. 1 l.3 for TrigFlow
    F_t = trainer.predict(model, x_t, t, y)
    with torch.no_grad():
        assert trainer.delta_f(model, x, z, t, y, F_t).abs().max() < 1  # the clip of Alg. 1 l.15 is inactive
        target = trainer.target(model, x, z, t, y, F_t)
    squared = (((F_t - target) ** 2).mean(1) * torch.cos(t * math.pi / 2)).sum()
    torch.testing.assert_close(flat(squared), 2 * math.pi * flat(scm_loss(model, x, z, t, y).sum()), rtol=1e-6,
                               atol=1e-9)
    ucgm_grad = flat(trainer.loss(model, x[:1], y[:1], t=t[:1], noise=z[:1]))
    scm_grad = flat(scm_loss(model, x[:1], z[:1], t[:1], y[:1]).sum())
    assert F.cosine_similarity(ucgm_grad, scm_grad, dim=0) >= 1 - 1e-6 and scm_grad.norm() > 1e-3


@pytest.mark.parametrize("transport", ["Linear", "EDM"])
def test_lam0_loss_is_flow_matching_and_edm_denoising_loss(transport):
    """Table 1, λ = 0 (Alg. 1 l.15-16, unweighted): the squared per-sample distance times the dimension is flow
    matching's ‖v_θ(x_t, t) − (z − x)‖² (Linear) and EDM's λ(σ)·‖D_θ(x + σn; σ) − x‖² with λ(σ) = (σ² + σ_d²)/(σ·σ_d)²
    and D_θ = c_skip·x + c_out·F_θ (Karras et al. 2022, Table 1; EDM transport): equal values and gradients."""
    model = ToyNet(dim=3).double()
    x, y, t, z = (v.double() if v.is_floating_point() else v for v in batch(n=3, dim=3))
    trainer, params = UCGM(transport, label_drop=0.0, weighting=None), list(model.parameters())
    for i in range(3):
        ours = trainer.loss(model, x[i:i + 1], y[i:i + 1], t=t[i:i + 1], noise=z[i:i + 1]) ** 2 * 3
        ti, xi, zi, yi = t[i:i + 1], x[i:i + 1], z[i:i + 1], y[i:i + 1]
        if transport == "Linear":  # rectified flow: x_t = t·z + (1 − t)·x, target z − x
            theirs = ((model(ti * zi + (1 - ti) * xi, ti, yi) - (zi - xi)) ** 2).sum()
        else:
            sigma = torch.exp(4 * (2.68 * ti - 1.59))
            (c_skip, c_out, c_in), x_noisy = edm_preconditioning(sigma), xi + sigma * zi
            D = c_skip * x_noisy + c_out * model(c_in * x_noisy, ti, yi)
            weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2  # λ(σ), Karras et al. 2022, Table 1
            theirs = (weight * ((D - xi) ** 2).sum(1)).sum()
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)
        for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


#################################################################################
#                                   Network                                     #
#################################################################################

def released_layout(mlp, out_channels, extra, depth=28, width=1152, patch=2, channels=4, grid=16, num_classes=1000):
    """Key -> shape of a released DiT-family checkpoint; `mlp` maps MLP key names to shapes, `extra` adds keys."""
    layout = {"pos_embed": (1, grid * grid, width), "x_embedder.proj.weight": (width, channels, patch, patch),
              "x_embedder.proj.bias": (width,), "t_embedder.mlp.0.weight": (width, 256),
              "t_embedder.mlp.0.bias": (width,), "t_embedder.mlp.2.weight": (width, width),
              "t_embedder.mlp.2.bias": (width,), "y_embedder.embedding_table.weight": (num_classes + 1, width),
              "final_layer.linear.weight": (patch * patch * out_channels, width),
              "final_layer.linear.bias": (patch * patch * out_channels,),
              "final_layer.adaLN_modulation.1.weight": (2 * width, width),
              "final_layer.adaLN_modulation.1.bias": (2 * width,), **extra}
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                       b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                       b + "adaLN_modulation.1.weight": (6 * width, width), b + "adaLN_modulation.1.bias": (6 * width,),
                       **{b + k: shape for k, shape in mlp.items()}})
    return layout


def released_tit_xl1_layout(width=1152, channels=32, grid=16):
    """TiT-XL/1 on VA-VAE latents, as networks/tit.py of LINs-lab/UCGM builds it (SwiGLU, persistent RoPE tables)."""
    hidden = int(2 / 3 * int(width * 4.0))
    mlp = {"mlp.w12.weight": (2 * hidden, width), "mlp.w12.bias": (2 * hidden,),
           "mlp.w3.weight": (width, hidden), "mlp.w3.bias": (width,)}
    rope = {"feat_rope.freqs_cos": (grid * grid, width // 16), "feat_rope.freqs_sin": (grid * grid, width // 16)}
    return released_layout(mlp, channels, rope, patch=1, channels=channels, grid=grid)


def released_sit_xl2_layout(width=1152, channels=4):
    """SiT-XL/2 as willisma/SiT models.py builds it (timm Mlp fc1/fc2, learn_sigma doubles the output, 1001 labels)."""
    mlp = {"mlp.fc1.weight": (4 * width, width), "mlp.fc1.bias": (4 * width,),
           "mlp.fc2.weight": (width, 4 * width), "mlp.fc2.bias": (width,)}
    return released_layout(mlp, 2 * channels, {}, patch=2, channels=channels)


def released_lightningdit_xl1_layout(width=1152, depth=28):
    """LightningDiT-XL/1 as hustvl/LightningDiT models/lightningdit.py builds it for its release: TiT's SwiGLU and
    persistent RoPE tables, a learnable RMSNorm weight in norm1, norm2 and norm_final, and qk-norm off."""
    norms = {f"blocks.{i}.{norm}.weight": (width,) for i in range(depth) for norm in ("norm1", "norm2")}
    return {**released_tit_xl1_layout(width), **norms, "final_layer.norm_final.weight": (width,)}


@pytest.mark.parametrize("name, kwargs, layout, n_keys, n_params", [
    ("TiT-XL/1", dict(input_size=16, in_channels=32), released_tit_xl1_layout(), 294, 675.19),
    ("LightningDiT-XL/1", dict(input_size=16, in_channels=32), released_lightningdit_xl1_layout(), 351, 675.26),
    ("DiT-XL/2", dict(input_size=32, in_channels=4, learn_sigma=True), released_sit_xl2_layout(), 292, 675.13)])
def test_released_layout_loads_strict(name, kwargs, layout, n_keys, n_params):
    """The released TiT-XL/1 and SiT-XL/2 key layouts load with strict=True."""
    with torch.device("meta"):  # shapes only: no 2.7 GB of weights on a CI machine
        model = ucgm.create_model(name, **kwargs)
        state = {k: torch.empty(shape) for k, shape in layout.items()}
    assert len(layout) == n_keys
    model.load_state_dict(state, strict=True, assign=True)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == n_params
    assert ucgm.infer_model(state) == (name, dict(kwargs, learn_sigma=kwargs.get("learn_sigma", False),
                                                  num_classes=1000))  # the family is told from the keys


def test_state_dict_roundtrip_gives_same_outputs():
    """A saved and reloaded network gives the same F."""
    src, dst = tiny_dit(seed=0), tiny_dit(seed=1)
    x, t, y = torch.randn(3, 2, 8, 8), torch.rand(3), torch.tensor([0, 2, 3])
    assert not torch.allclose(src(x, t, y), dst(x, t, y))
    dst.load_state_dict(src.state_dict(), strict=True)
    torch.testing.assert_close(src(x, t, y), dst(x, t, y), rtol=0, atol=0)


def test_sincos_pos_embed_matches_numpy():
    """DiT's fixed 2-D sin-cos table against numpy."""
    dim, grid = 16, 4
    ours = ucgm.sincos_2d(dim, grid).numpy()
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    for h in range(grid):
        for w in range(grid):
            # DiT: the first half encodes the column (w), the second the row (h); sin before cos
            want = np.concatenate([np.sin(w * omega), np.cos(w * omega), np.sin(h * omega), np.cos(h * omega)])
            np.testing.assert_allclose(ours[h * grid + w], want, atol=1e-12)


def test_rope_matches_complex_rotation():
    """TiT's 2-D RoPE against a complex rotation."""
    head_dim, grid = 16, 3
    rope = ucgm.Rope2D(head_dim, grid)
    q = torch.randn(1, 1, grid * grid, head_dim, dtype=torch.float64)
    got = rope(q)[0, 0].numpy()
    freqs = 1.0 / 10000 ** (np.arange(head_dim // 4) * 4 / head_dim)  # one frequency per pair in each half
    for h in range(grid):
        for w in range(grid):
            v = q[0, 0, h * grid + w].numpy()
            pairs = v[0::2] + 1j * v[1::2]  # (head_dim/2,) complex numbers
            angles = np.concatenate([h * freqs, w * freqs])  # first half by row, second by column
            rotated = pairs * np.exp(1j * angles)
            want = np.stack([rotated.real, rotated.imag], axis=1).reshape(-1)
            np.testing.assert_allclose(got[h * grid + w], want, atol=1e-6)


def test_timestep_embedding_and_rmsnorm_match_formulas():
    """The t embedding (t as is) and RMSNorm against their formulas."""
    emb = ucgm.TimestepEmbedder(8)
    t = torch.tensor([0.0, 0.3, 1.0])
    with torch.no_grad():
        emb.mlp[0].weight.copy_(torch.eye(8, 256))  # pass the first 8 frequency features through
        emb.mlp[0].bias.zero_()
        emb.mlp[2].weight.copy_(torch.eye(8))
        emb.mlp[2].bias.zero_()
    freqs = np.exp(-np.log(10000) * np.arange(128) / 128)
    want = np.concatenate([np.cos(t.numpy()[:, None] * freqs), np.sin(t.numpy()[:, None] * freqs)], 1)[:, :8]
    silu = want / (1 + np.exp(-want))
    np.testing.assert_allclose(emb(t).detach().numpy(), silu, atol=1e-6)
    x = torch.randn(5, 7)
    want = x.numpy() / np.sqrt((x.numpy() ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(ucgm.RMSNorm(x.shape[-1])(x).numpy(), want, rtol=1e-5)


def test_dit_init_forward_shapes_and_switches():
    """DiT initialisation, shapes and the TiT switches."""
    for switches in ucgm.FAMILIES.values():
        model = ucgm.DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                         num_classes=5, **switches)
        out = model(torch.randn(4, 3, 8, 8), torch.rand(4), torch.tensor([0, 1, 4, 5]))
        assert out.shape == (4, 3, 8, 8) and out.dtype == torch.float32
        assert out.abs().max() == 0  # adaLN-Zero: the output layer starts at zero
        keys = model.state_dict().keys()
        assert ("blocks.0.mlp.w12.weight" in keys) == bool(switches)
        assert ("feat_rope.freqs_cos" in keys) == bool(switches)
        assert model.y_embedder.embedding_table.weight.shape == (6, 32)  # the null label row
    uncond = ucgm.DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=1)
    assert not any(k.startswith("y_embedder") for k in uncond.state_dict())
    assert uncond(torch.randn(2, 3, 8, 8), torch.rand(2), None).shape == (2, 3, 8, 8)


def test_patchify_roundtrip_and_flops():
    """Unpatchify inverts patchify; DiT-XL/2 is 237 GFLOP a forward."""
    model = tiny_dit()
    x = torch.randn(2, 2, 8, 8)
    p = 2
    tokens = x.reshape(2, 2, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 2)  # (N, T, p·p·C)
    torch.testing.assert_close(model.unpatchify(tokens), x)
    with torch.device("meta"):
        assert abs(ucgm.create_model("DiT-XL/2", input_size=32).flops_per_forward() / 1e9 - 237.2) < 0.5


def test_grad_checkpoint_gives_same_gradients():
    """Activation checkpointing leaves the gradients unchanged."""
    x, t, y = torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([1, 3])
    grads = []
    for flag in (False, True):
        model = tiny_dit(grad_checkpoint=flag)
        model(x, t, y).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_labels_and_shapes_are_refused():
    """Wrong shapes are refused; out-of-range labels fail in the embedding."""
    model = tiny_dit()
    with pytest.raises(IndexError):  # the forward reads no label (that would sync): the embedding refuses it
        model(torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="x of shape"):
        model(torch.randn(2, 2, 6, 6), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="model"):
        ucgm.create_model("DiT-XXL/2")


class SdpaStrides:
    """Records the strides of q, k, v at every F.scaled_dot_product_attention call (patched in ucgm)."""
    def __init__(self, monkeypatch):
        self.calls = []
        real = F.scaled_dot_product_attention

        def spy(q, k, v, *args, **kwargs):
            self.calls.append([tensor.stride() for tensor in (q, k, v)])
            return real(q, k, v, *args, **kwargs)
        monkeypatch.setattr(ucgm.F, "scaled_dot_product_attention", spy)


def test_every_sdpa_call_gets_a_last_dimension_of_stride_1(monkeypatch):
    """CUDA's fused attention kernels need stride 1 along the head dimension; others fall back to the math kernel."""
    spy = SdpaStrides(monkeypatch)
    tiny_dit(depth=2)(torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    autoencoder = ucgm.AutoencoderKL(**{**SMALL_SDVAE, "attn_levels": (1,)})
    autoencoder.decode(autoencoder.encode(torch.randn(1, 3, 16, 16)))
    assert len(spy.calls) == 2 + (2 + 1) + (3 + 1)  # the DiT's blocks; a level's blocks and the middle of each coder
    assert all(stride[-1] == 1 for call in spy.calls for stride in call), spy.calls


@cuda
def test_cuda_bf16_autocast_forward_loss_and_sample():
    """On CUDA under bf16 autocast: forward, Alg. 1 and Alg. 2 run and are finite."""
    model = tiny_dit().cuda()
    x, t, y = torch.randn(4, 2, 8, 8, device="cuda"), torch.rand(4, device="cuda"), torch.tensor([0, 1, 2, 3]).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, y)
        loss = UCGM(lam=1.0, zeta=0.0).loss(model, x, y)
        sample = UCGM().sample(model, x, steps=4, y=y)
    torch.testing.assert_close(out.float(), model(x, t, y), atol=5e-2, rtol=5e-2)
    loss.backward()
    assert torch.isfinite(loss) and sample.dtype == torch.float32 and torch.isfinite(sample).all()


#################################################################################
#                                     DDT                                       #
#################################################################################

def released_ddt_layout(width=1152, depth=28, channels=4, patch=2, num_classes=1000):
    """Key -> shape of networks/ddt.py of LINs-lab/UCGM (the MCG-NJU/DDT denoiser): two Linear patch embeddings,
    bias-free qkv and w1/w3/w2, adaLN as Sequential(Linear) (key .0), no position table."""
    values, hidden = channels * patch * patch, int(2 * int(4 * width) / 3)
    layout = {f"{e}_embedder.proj.{k}": shape for e in ("x", "s") for k, shape in
              (("weight", (width, values)), ("bias", (width,)))}
    layout.update({"t_embedder.mlp.0.weight": (width, 256), "t_embedder.mlp.0.bias": (width,),
                   "t_embedder.mlp.2.weight": (width, width), "t_embedder.mlp.2.bias": (width,),
                   "y_embedder.embedding_table.weight": (num_classes + 1, width),
                   "final_layer.linear.weight": (values, width), "final_layer.linear.bias": (values,),
                   "final_layer.adaLN_modulation.0.weight": (2 * width, width),
                   "final_layer.adaLN_modulation.0.bias": (2 * width,)})
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({b + "norm1.weight": (width,), b + "attn.qkv.weight": (3 * width, width),
                       b + "attn.q_norm.weight": (width // 16,), b + "attn.k_norm.weight": (width // 16,),
                       b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,), b + "norm2.weight": (width,),
                       b + "mlp.w1.weight": (hidden, width), b + "mlp.w3.weight": (hidden, width),
                       b + "mlp.w2.weight": (width, hidden), b + "adaLN_modulation.0.weight": (6 * width, width),
                       b + "adaLN_modulation.0.bias": (6 * width,)})
    return layout


@pytest.mark.parametrize("name, input_size, channels, n_params", [
    ("DDT-XL/2", 32, 4, 674_646_352), ("DDT-XL/2", 64, 4, 674_646_352), ("DDT-XL/1", 16, 32, 674_701_664)])
def test_ddt_released_layout_and_size_on_meta(name, input_size, channels, n_params):
    """DDT-XL/2 at 256 and 512 px and DDT-XL/1 have the released 349 keys and shapes (the rotary table is no key),
    674.65M / 674.70M parameters, and are told from their weights (family and name, sizes from a config)."""
    with torch.device("meta"):
        model = ucgm.create_model(name, input_size=input_size, in_channels=channels, num_classes=1000)
    layout = released_ddt_layout(channels=channels, patch=int(name[-1]))
    state = model.state_dict()
    assert len(layout) == 349 and {k: tuple(v.shape) for k, v in state.items()} == layout
    assert sum(p.numel() for p in model.parameters()) == n_params and not list(model.buffers(recurse=False))
    assert model.rope.freqs_cos.shape == ((input_size // int(name[-1])) ** 2, 72)  # made for real, not on meta
    assert ucgm.family_of(state) == "DDT"
    sizes = dict(input_size=input_size, in_channels=channels)  # what a released config says
    assert ucgm.infer_model(state, sizes=sizes) == (name, dict(sizes, num_classes=1000))


def ddt_oracle(state, x, t, y, patch, heads, encoder_depth):
    """DDT's forward written from its description with plain tensor algebra: patches by reshape, the rotary angles
    by their rule through torch.polar, max-period-10 time features, RMSNorm, softmax attention, w1/w3/w2, fold."""
    n, channels, size, _ = x.shape
    grid, w = size // patch, lambda key: state[key].double()
    tokens = x.double().reshape(n, channels, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5).reshape(
        n, grid * grid, channels * patch * patch)  # token h·grid + w, values in (c, kh, kw) order
    width = state["t_embedder.mlp.2.weight"].shape[0]
    head_dim = width // heads
    pos = [16 * i / (grid - 1) for i in range(grid)]
    angles = torch.zeros(grid * grid, head_dim // 2, dtype=torch.float64)
    for h in range(grid):
        for col in range(grid):
            for i in range(head_dim // 2):  # pair i: column for even i, row for odd i, frequency of i // 2
                angles[h * grid + col, i] = (pos[col] if i % 2 == 0 else pos[h]) * 10000 ** (-4 * (i // 2) / head_dim)
    rotation = torch.polar(torch.ones_like(angles), angles)  # (T, head_dim/2)

    def linear(v, key, bias=True):
        return v @ w(key + ".weight").T + (w(key + ".bias") if bias else 0)

    def rms(v, key):
        return v / torch.sqrt((v ** 2).mean(-1, keepdim=True) + 1e-6) * w(key)

    def rotate(v):  # (n, T, heads, head_dim): each pair (2i, 2i+1) as a complex number times its rotation
        pairs = torch.complex(v[..., 0::2], v[..., 1::2]) * rotation[None, :, None]
        return torch.stack([pairs.real, pairs.imag], -1).flatten(-2)

    def block(v, c, b):
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(c, b + "adaLN_modulation.0").chunk(6, -1)
        q, k, val = linear(rms(v, b + "norm1.weight") * (1 + scale1) + shift1, b + "attn.qkv", False).reshape(
            n, -1, 3, heads, head_dim).unbind(2)
        q, k = rotate(rms(q, b + "attn.q_norm.weight")), rotate(rms(k, b + "attn.k_norm.weight"))
        weights = torch.softmax(torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(head_dim), -1)
        v = v + gate1 * linear(torch.einsum("nhqk,nkhd->nqhd", weights, val).reshape(n, -1, width), b + "attn.proj")
        u = rms(v, b + "norm2.weight") * (1 + scale2) + shift2
        hidden = F.silu(linear(u, b + "mlp.w1", False)) * linear(u, b + "mlp.w3", False)
        return v + gate2 * linear(hidden, b + "mlp.w2", False)

    freqs = torch.exp(-math.log(10) * torch.arange(128, dtype=torch.float64) / 128)
    features = torch.cat([torch.cos(t.double()[:, None] * freqs), torch.sin(t.double()[:, None] * freqs)], 1)
    t_emb = linear(F.silu(linear(features, "t_embedder.mlp.0")), "t_embedder.mlp.2")[:, None]  # (n, 1, D)
    c = F.silu(t_emb + w("y_embedder.embedding_table.weight")[y][:, None])
    s = linear(tokens, "s_embedder.proj")
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    for i in range(encoder_depth):
        s = block(s, c, f"blocks.{i}.")
    s = F.silu(t_emb + s)
    h = linear(tokens, "x_embedder.proj")
    for i in range(encoder_depth, depth):
        h = block(h, s, f"blocks.{i}.")
    shift, scale = linear(s, "final_layer.adaLN_modulation.0").chunk(2, -1)
    h = linear(F.layer_norm(h, (width,), eps=1e-6) * (1 + scale) + shift, "final_layer.linear")
    return h.reshape(n, grid, grid, channels, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)


def test_ddt_forward_matches_a_hand_written_oracle():
    """A tiny DDT's F (encoder 2 blocks, decoder 1, 2 heads, patch 2, 3 channels) equals ddt_oracle with the same
    random weights, the null label included."""
    torch.manual_seed(0)
    model = perturbed(ucgm.create_model("DDT-T/2", input_size=8, in_channels=3, num_classes=10), seed=3)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0.0, 0.4, 1.0]), torch.tensor([0, 7, 10])
    want = ddt_oracle(model.state_dict(), x, t, y, patch=2, heads=2, encoder_depth=2)
    got = model(x, t, y)
    assert got.shape == x.shape and want.abs().max() > 0.1
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_ddt_grad_checkpoint_and_flops():
    """--grad-checkpoint leaves a DDT's gradients unchanged; DDT-XL/2's FLOPs at 256 px by hand (the decoder's
    adaLN and the final layer act per token, the encoder's per sample): 263.0 G."""
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 3])
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = perturbed(ucgm.create_model("DDT-T/2", input_size=8, in_channels=3, num_classes=10,
                                            grad_checkpoint=flag))
        model(x, t, y).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    with torch.device("meta"):
        model = ucgm.create_model("DDT-XL/2", input_size=32)
    T, D, values = 256, 1152, 16
    per_token = 2 * values * D + 28 * (4 * D * D + 3 * 3072 * D) + 6 * 6 * D * D + 2 * D * D + values * D
    per_sample = 256 * D + D * D + 22 * 6 * D * D
    assert model.flops_per_forward() == 2 * (T * per_token + per_sample + 2 * T * T * D * 28)
    assert round(model.flops_per_forward() / 1e9, 1) == 263.0


def test_family_detection_tells_ddt_from_the_dit_families():
    """family_of keys DDT on its 2-D s_embedder patch weight, before LightningDiT's norm weights (which DDT shares)."""
    with torch.device("meta"):
        states = {family: ucgm.create_model(f"{family}-T/4", input_size=16, in_channels=3).state_dict()
                  for family in ("DDT", "LightningDiT", "TiT", "DiT")}
    assert {family: ucgm.family_of(state) for family, state in states.items()} == {f: f for f in states}
    conv = {**states["LightningDiT"], "s_embedder.proj.weight": torch.empty(8, 3, 4, 4, device="meta")}
    assert ucgm.family_of(conv) == "LightningDiT"  # a 4-D patch weight is no DDT's


def test_ddt_lightning_checkpoint_loads_its_ema_and_names_bad_keys(tmp_path, capsys):
    """An MCG-NJU/DDT Lightning file: the ema_denoiser.* weights are taken, denoiser.* and diffusion_trainer.*
    dropped with one line; an ambiguous patch size, a missing latent size and a misshapen key each end in one line."""
    ema = perturbed(ucgm.create_model("DDT-T/2", input_size=8, in_channels=3, num_classes=10))
    state = {**{f"denoiser.{k}": torch.zeros_like(v) for k, v in ema.state_dict().items()},
             **{f"ema_denoiser.{k}": v for k, v in ema.state_dict().items()},
             "diffusion_trainer.proj.0.weight": torch.zeros(4, 64)}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100, "loops": {}}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=r"matches \['DDT-T/1', 'DDT-T/2'\]; give --model$"):
        ucgm.load_network(str(tmp_path / "last.ckpt"), sizes={"input_size": 8})
    assert ucgm.load_network(str(tmp_path / "last.ckpt"), sizes={"input_size": 8, "in_channels": 3})[1] == "DDT-T/2"
    with pytest.raises(ValueError, match="DDT weights do not tell the latent size .* give --input-size"):
        ucgm.load_network(str(tmp_path / "last.ckpt"), name="DDT-T/2")
    capsys.readouterr()
    model, name, settings = ucgm.load_network(str(tmp_path / "last.ckpt"), name="DDT-T/2", sizes={"input_size": 8})
    assert (name, settings, model.in_channels, model.num_classes) == ("DDT-T/2", {"transport": "ReLinear"}, 3, 10)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.state_dict().items())
    assert capsys.readouterr().out.strip().splitlines() == [
        f"--ckpt {tmp_path / 'last.ckpt'}: a Lightning checkpoint: taking its {len(ema.state_dict())} weights "
        f"ema_denoiser.*, dropping the {len(ema.state_dict()) + 1} weights denoiser.*, diffusion_trainer.*"]
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 10])
    torch.testing.assert_close(model(x, t, y), ema(x, t, y), rtol=0, atol=0)  # its rotary table is real
    state["ema_denoiser.blocks.1.mlp.w3.weight"] = torch.zeros(7, 64)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"key 'blocks.1.mlp.w3.weight' has shape \(7, 64\), expected \(170, 64\)"):
        ucgm.load_network(str(tmp_path / "bad.ckpt"), name="DDT-T/2", sizes={"input_size": 8})


# configs/sampling_multi_steps/in1k256_ddt_xl_sdvae_relinear.yaml of LINs-lab/UCGM, the model made tiny and the
# image size 128 (16×16 latents)
DDT_CONFIG = {"data": {"image_size": 128, "num_classes": 10, "latent_norm": False, "latent_multiplier": 0.18215},
              "vae": {"type": "sdvae_ema_f8c4", "downsample_ratio": 8}, "model": {"type": "DDT-T/4", "in_chans": 3},
              "train": {"global_seed": 1}, "transport": {"type": "ReLinear"},
              "sample": {"ckpt": "0000000.pt", "type": "UNI", "cfg_scale": 2.0, "cfg_interval": [0.3, 1.0],
                         "sampling_steps": 50, "stochast_ratio": 0.0, "extrapol_ratio": 0.28, "sampling_order": 1,
                         "time_dist_ctrl": [1.17, 0.8, 1.1], "rfba_gap_steps": [0.001, 0.001], "per_batch_size": 125}}


def test_sample_py_samples_a_released_ddt_config(tmp_path):
    """A released DDT checkpoint ({ema, model, config}, strict) is sized by its config (128 // 8, in_chans, classes)
    and sampled on ReLinear with its CFG 2.0 on [0.3, 1], κ 0.28, warp, all channels guided and global_seed 1."""
    model = perturbed(ucgm.create_model("DDT-T/4", input_size=16, in_channels=3, num_classes=10))
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": DDT_CONFIG}, tmp_path / "ddt.pt")
    args = sample.parse_args(["--ckpt", str(tmp_path / "ddt.pt"), "--vae", "identity", "--num-samples", "2",
                              "--steps", "2", "--out", str(tmp_path / "out")])
    loaded, name, settings = ucgm.load_network(args.ckpt)
    assert (name, loaded.input_size, loaded.in_channels, loaded.num_classes) == ("DDT-T/4", 16, 3, 10)
    resolved = {k: v for k, (v, _) in sample.resolve(args, settings).items()}
    assert resolved == dict(steps=2, rho=0.0, kappa=0.28, warp=(1.17, 0.8, 1.1), gaps=(0.001, 0.001), order=1,
                            cfg_scale=2.0, cfg_interval=(0.3, 1.0), cfg_channels=None, transport="ReLinear",
                            vae="identity", latent_multiplier=0.18215, seed=1)
    sample.main(args)
    assert json.loads((tmp_path / "out" / "sample.json").read_text())["seed"] == 1
    images = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert images.shape == (2, 16, 16, 3) and len(np.unique(images.reshape(2, -1), axis=0)) == 2


#################################################################################
#                                      EDM2                                     #
#################################################################################

EDM2_S_SHAPES = {"out_gain": (), "emb_fourier.freqs": (192,), "emb_noise.weight": (768, 192),
                 "emb_label.weight": (768, 1000), "enc.64x64_conv.weight": (192, 5, 3, 3),
                 "enc.64x64_block0.emb_linear.weight": (192, 768), "enc.32x32_down.conv_res0.weight": (192, 192, 3, 3),
                 "enc.32x32_block0.conv_skip.weight": (384, 192, 1, 1),
                 "enc.16x16_block2.attn_qkv.weight": (1728, 576, 1, 1),
                 "dec.8x8_in0.attn_proj.weight": (768, 768, 1, 1),
                 "dec.8x8_block0.conv_res0.weight": (768, 1536, 3, 3), "out_conv.weight": (4, 192, 3, 3)}


def tiny_edm2(in_channels=3, num_classes=10, seed=0):
    """EDM2-T on 8×8 (levels 8 and 4, attention at 8² and in dec.4x4_in0, 2 heads of 32 channels), its gains made
    non-zero."""
    torch.manual_seed(seed)
    model = perturbed(ucgm.create_model("EDM2-T", input_size=8, in_channels=in_channels, num_classes=num_classes))
    with torch.no_grad():  # the gains start at 0: values in [0.5, 1.5) make the output depend on every weight
        for gain in (p for p in model.parameters() if p.dim() == 0):
            gain.fill_(0.5 + torch.rand(()).item())
    return model.eval()


def edm2_oracle(state, x, t, y, num_classes, per_head=32):
    """EDM2's U-Net from its formulas over a state dict, in float64 (EDM2's MP layers and its Fig. 21 U-Net;
    the (C_h, 3) interleave of q, k, v): an independent check of ucgm.EDM2UNet."""
    def conv(name, h, gain=1.0):  # a weight normalised per output channel to unit fan-in RMS, times gain/√fan_in
        w = state[f"{name}.weight"].double()
        fan_in = w[0].numel()
        w = w / (1e-4 + w.flatten(1).norm(dim=1) / math.sqrt(fan_in)).reshape(-1, *[1] * (w.dim() - 1))
        w = w * gain / math.sqrt(fan_in)
        return h @ w.T if w.dim() == 2 else F.conv2d(h, w, padding=w.shape[-1] // 2)

    def silu(h):
        return F.silu(h) / 0.596

    def msum(a, b, s):
        return ((1 - s) * a + s * b) / math.sqrt((1 - s) ** 2 + s ** 2)

    def unit_rms(h, dim):
        return h / (1e-4 + h.norm(dim=dim, keepdim=True) / math.sqrt(h.shape[dim]))

    def block(name, h, emb):
        N, C = h.shape[:2]
        if name.endswith("_down"):
            h = h.reshape(N, C, h.shape[2] // 2, 2, h.shape[3] // 2, 2).mean((3, 5))
        if name.endswith("_up"):
            h = h.repeat_interleave(2, 2).repeat_interleave(2, 3)
        skip, encoder = f"{name}.conv_skip.weight" in state, name.startswith("enc.")
        if encoder:
            h = unit_rms(conv(f"{name}.conv_skip", h) if skip else h, 1)
        r = conv(f"{name}.conv_res0", silu(h)) * (conv(f"{name}.emb_linear", emb, state[f"{name}.emb_gain"].double())
                                                  + 1)[:, :, None, None]
        r = conv(f"{name}.conv_res1", silu(r))
        h = msum(conv(f"{name}.conv_skip", h) if skip and not encoder else h, r, 0.3)
        if f"{name}.attn_qkv.weight" in state:
            N, C, H, W = h.shape
            qkv = unit_rms(conv(f"{name}.attn_qkv", h).reshape(N, C // per_head, per_head, 3, H * W), 2)
            q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # channel h·3C_h + c·3 + j is q, k, v for j
            weights = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(per_head), dim=-1)
            h = msum(h, conv(f"{name}.attn_proj", torch.einsum("nhqk,nhck->nhcq", weights, v).reshape(N, C, H, W)), 0.3)
        return h.clamp(-256, 256)

    t = t.double()
    fourier = math.sqrt(2) * torch.cos(torch.outer(2.68 * t - 1.59, state["emb_fourier.freqs"].double())
                                       + state["emb_fourier.phases"].double())
    emb = conv("emb_noise", fourier)
    if y is not None:
        emb = msum(emb, conv("emb_label", F.one_hot(y, num_classes).double() * math.sqrt(num_classes)), 0.5)
    emb = silu(emb)
    h, skips = torch.cat([x.double(), torch.ones_like(x[:, :1]).double()], dim=1), []
    layers = lambda part: dict.fromkeys(".".join(k.split(".")[:2]) for k in state if k.startswith(part))  # noqa: E731
    for name in layers("enc."):
        h = conv(name, h) if name.endswith("_conv") else block(name, h, emb)
        skips.append(h)
    for name in layers("dec."):
        if "_block" in name:  # mp_cat with t = 1/2: each part scaled by √((Na + Nb)/2)·(1/2)/√N_part
            a, b = h, skips.pop()
            scale = math.sqrt((a.shape[1] + b.shape[1]) / 0.5) * 0.5
            h = torch.cat([a * scale / math.sqrt(a.shape[1]), b * scale / math.sqrt(b.shape[1])], dim=1)
        h = block(name, h, emb)
    return conv("out_conv", h, state["out_gain"].double())


@pytest.mark.parametrize("size, n_params", [("S", 280_212_709), ("L", 777_497_957), ("XXL", 1_523_164_645)])
def test_edm2_real_sizes_have_the_released_keys_shapes_and_counts(size, n_params):
    """EDM2-S/L/XXL at 64×64×4 (img512), on meta: 200 keys, the released parameter counts, attention where the
    released file puts it (levels 16² and 8², dec.8x8_in0), the Fourier buffers in the state dict; input_size names."""
    with torch.device("meta"):
        model = ucgm.create_model(f"EDM2-{size}", input_size=64, in_channels=4, num_classes=1000)
        small = ucgm.create_model(f"EDM2-{size}", input_size=32, in_channels=4, num_classes=1000)
    state = model.state_dict()
    assert len(state) == 200 and sum(p.numel() for p in model.parameters()) == n_params
    attention = {k.rsplit(".", 2)[0] for k in state if k.endswith("attn_qkv.weight")}
    assert attention == {f"enc.{r}x{r}_block{i}" for r in (16, 8) for i in range(3)} | {"dec.8x8_in0"} | \
        {f"dec.{r}x{r}_block{i}" for r in (16, 8) for i in range(4)}
    assert "emb_fourier.freqs" in state and "emb_fourier.phases" in state and "dec.8x8_in1.emb_gain" in state
    if size == "S":
        assert {k: tuple(state[k].shape) for k in EDM2_S_SHAPES} == EDM2_S_SHAPES
    small_state = small.state_dict()
    assert "enc.32x32_conv.weight" in small_state and "dec.4x4_in0.attn_qkv.weight" in small_state
    assert not any(k.startswith("enc.32x32_block") and "attn" in k for k in small_state)  # 32² has no attention


def test_edm2_forward_matches_an_oracle_written_from_the_formulas():
    """ucgm.EDM2UNet (EDM2-T: skips, downs, ups, 2-head attention, label and noise embeddings) against edm2_oracle."""
    model = tiny_edm2()
    x, t, y = 2 * torch.randn(3, 3, 8, 8), torch.tensor([0.1, 0.5, 0.95]), torch.tensor([0, 4, 9])
    want = edm2_oracle(model.state_dict(), x, t, y, 10)
    with torch.no_grad():
        got = model(x, t, y)
    assert want.abs().mean() > 0.05  # the output depends on the gains
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)
    assert set(model.state_dict()) == set(ucgm.create_model("EDM2-T", input_size=8, in_channels=3,
                                                               num_classes=10).state_dict())


def test_edm2_null_label_rows_get_no_class_embedding_without_a_host_read():
    """A row with y = num_classes equals the unlabelled network (UCGM's unconditional rows skip the label term), the
    other rows keep theirs, all in one batch without a host read (guidance and label dropout)."""
    model = tiny_edm2()
    x, t = torch.randn(4, 3, 8, 8), torch.full((4,), 0.6)
    y = torch.tensor([3, 10, 7, 10])
    with torch.no_grad(), HostReads() as counter:
        mixed = model(x, t, y)
    with torch.no_grad():
        unlabelled, labelled = model(x, t), model(x, t, torch.tensor([3, 0, 7, 0]))
    assert counter.reads == []
    torch.testing.assert_close(mixed[[1, 3]], unlabelled[[1, 3]])
    torch.testing.assert_close(mixed[[0, 2]], labelled[[0, 2]])
    assert not torch.allclose(mixed[0], unlabelled[0], atol=1e-3)
    want = edm2_oracle(model.state_dict(), x, t, None, 10)  # the noise embedding alone
    torch.testing.assert_close(unlabelled.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


def test_edm2_train_mode_forces_weight_normalisation_and_grad_checkpoint_keeps_the_gradients():
    """In train mode each forward first rewrites every stored weight as w / (1e-4 + ‖w_i‖/√fan_in) (EDM2)
    and runs on the rewritten weights; in eval mode the weights stay; grad_checkpoint gives the same gradients."""
    model = tiny_edm2()
    before, checkpointed = copy.deepcopy(model.state_dict()), copy.deepcopy(model)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([1, 10])
    with torch.no_grad():
        evaluated = model(x, t, y)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    trained = model.train()(x, t, y)
    for key, w in before.items():
        if key.endswith(".weight"):
            norms = w.flatten(1).norm(dim=1) / math.sqrt(w[0].numel())
            torch.testing.assert_close(model.state_dict()[key], w / (1e-4 + norms).reshape(-1, *[1] * (w.dim() - 1)))
        else:  # gains and the Fourier buffers are not rewritten
            assert torch.equal(model.state_dict()[key], w)
    trained.square().mean().backward()
    checkpointed.grad_checkpoint = True
    checkpointed.train()(x, t, y).square().mean().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), checkpointed.parameters()))
    with torch.no_grad():  # the forward ran on the rewritten weights, which change the output by O(1e-4) only
        torch.testing.assert_close(trained, model.eval()(x, t, y))
    assert 0 < (trained - evaluated).abs().max() < 1e-3 * evaluated.abs().max()


@pytest.mark.parametrize("lam, zeta", [(1.0, 0.0), (0.5, 0.0), (0.0, 0.5)])
def test_edm2_trains_with_the_no_grad_passes_of_ucgm(lam, zeta):
    """UCGM-T's no-grad passes of the online model (Δf of Alg. 1 l.9-13, θ⁻ = θ for l.6) leave the weights the grad
    pass saved untouched: only a grad-enabled train-mode forward renormalises them."""
    model = tiny_edm2().train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 7, 9])
    ucgm.UCGM("EDM", lam=lam, zeta=zeta, teacher_decay=0.0).loss(model, x, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
               and p.dim() > 1)


def test_edm2_denoiser_is_the_edm_transport_readout():
    """EDM transport ↔ EDM2's preconditioning (σ_data = 1/2, σ = e^(4(2.68t − 1.59))): x_t = c_in·(x + σz), the target
    F* = (x − c_skip·x_noisy)/c_out, and x̂ = f^x(F) of Eq. (2) = c_skip·x_noisy + c_out·F, EDM2's D(x_noisy; σ)."""
    model, edm = tiny_edm2(), ucgm.get_transport("EDM")
    generator = torch.Generator().manual_seed(0)
    x, z = (torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    t, y = torch.tensor([0.02, 0.3, 0.7, 0.99], dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    sigma = torch.exp(4 * (2.68 * t - 1.59)).reshape(-1, 1, 1, 1)
    c_skip, c_in = 0.25 / (sigma ** 2 + 0.25), 1 / (sigma ** 2 + 0.25).sqrt()
    c_out = sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()
    x_noisy, tb = x + sigma * z, t.reshape(-1, 1, 1, 1)
    x_t = edm.alpha(tb) * z + edm.gamma(tb) * x
    torch.testing.assert_close(x_t, c_in * x_noisy)
    torch.testing.assert_close(edm.alpha_hat(tb) * z + edm.gamma_hat(tb) * x, (x - c_skip * x_noisy) / c_out)
    with torch.no_grad():
        F_x = model(x_t.float(), t.float(), y).double()
    torch.testing.assert_close(edm.readout(F_x, x_t, tb)[0], c_skip * x_noisy + c_out * F_x)


class EasyDictStandIn(dict):
    """Pickled as dnnlib.util.EasyDict (its names set below), as EDM2's network pickles hold it."""


def reconstruct_stand_in(meta):
    """Pickled by name as torch_utils.persistence._reconstruct_persistent_obj; never called."""
    raise AssertionError("the reader called the pickle's reconstruction function")


EasyDictStandIn.__module__, EasyDictStandIn.__qualname__ = "dnnlib.util", "EasyDict"
reconstruct_stand_in.__module__ = "torch_utils.persistence"
reconstruct_stand_in.__qualname__ = reconstruct_stand_in.__name__ = "_reconstruct_persistent_obj"


class PersistentPickler(pickle.Pickler):
    """EDM2's network-pickle format: every nn.Module but a ModuleDict a torch_utils.persistence record of its state
    and of a module source that writes `marker` if it is ever run."""
    def __init__(self, f, marker):
        super().__init__(f, protocol=4)
        self.source = f"open({str(marker)!r}, 'w').write('ran')\n"

    def reducer_override(self, obj):
        if isinstance(obj, nn.Module) and not isinstance(obj, nn.ModuleDict):
            meta = dict(type="class", version=6, module_src=self.source, class_name=type(obj).__name__,
                        state=dict(obj.__dict__))
            return reconstruct_stand_in, (meta,)
        return NotImplemented


class Precond(nn.Module):
    """EDM2's Precond layout: the U-Net and the 3 weights of its uncertainty head."""
    def __init__(self, unet):
        super().__init__()
        self.unet, self.logvar_fourier, self.logvar_linear = unet, ucgm.MPFourier(128), ucgm.MPConv(128, 1, ())


class StabilityVAEEncoder(nn.Module):
    """EDM2's latent encoder record: final latents = raw · scale + bias, numpy float32 arrays."""
    def __init__(self, raw_mean, raw_std):
        super().__init__()
        self.scale = np.float32(0.5) / np.float32(raw_std)
        self.bias = -np.float32(raw_mean) * self.scale


def write_edm2_pickle(path, data, marker, monkeypatch):
    """Write data as EDM2 does; its dnnlib and torch_utils modules exist (as stand-ins) only while writing."""
    stand_ins = {"dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": types.ModuleType("dnnlib.util"),
                 "torch_utils": types.ModuleType("torch_utils"),
                 "torch_utils.persistence": types.ModuleType("torch_utils.persistence")}
    stand_ins["dnnlib.util"].EasyDict = EasyDictStandIn
    stand_ins["torch_utils.persistence"]._reconstruct_persistent_obj = reconstruct_stand_in
    with monkeypatch.context() as patch, open(path, "wb") as f:
        for name, module in stand_ins.items():
            patch.setitem(sys.modules, name, module)
        PersistentPickler(f, marker).dump(data)
    assert "dnnlib" not in sys.modules and "torch_utils" not in sys.modules


def test_edm2_pickles_are_read_without_running_their_code_and_other_globals_refused(tmp_path, monkeypatch, capsys):
    """An EDM2 network pickle (EasyDict(encoder, ema=Precond) of persistence records, ModuleDicts, float16 tensors and
    numpy arrays) gives the U-Net weights and the latent statistics (mean −bias/scale, std 1/scale) with nothing
    executed, and sample.py samples it; a pickle naming builtins.eval or os.system is refused by name, unexecuted."""
    marker, unet = tmp_path / "ran", tiny_edm2()
    ema = Precond(copy.deepcopy(unet)).half()
    encoder = StabilityVAEEncoder([5.81, 3.25, 0.12], [4.17, 4.62, 3.71])
    write_edm2_pickle(tmp_path / "net.pkl", EasyDictStandIn(encoder=encoder, dataset_kwargs=EasyDictStandIn(res=8),
                                                            ema=ema), marker, monkeypatch)
    model, name, settings = ucgm.load_network(str(tmp_path / "net.pkl"))
    assert name == "EDM2-T" and not marker.exists() and "dropping the 3 weights logvar_*" in capsys.readouterr().out
    assert all(torch.equal(model.state_dict()[k], v.half().float()) for k, v in unet.state_dict().items())
    assert settings["transport"] == "EDM" and settings["sampler"] == {"cfg_scale": 1.0}
    torch.testing.assert_close(settings["latent_stats"]["mean"], torch.tensor([5.81, 3.25, 0.12]))
    torch.testing.assert_close(settings["latent_stats"]["std"], torch.tensor([8.34, 9.24, 7.42]))
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "net.pkl"), "--num-samples", "2", "--steps", "2",
                                   "--out", str(tmp_path / "samples")]))
    assert np.load(tmp_path / "samples" / "samples.npz")["arr_0"].shape == (2, 8, 8, 3) and not marker.exists()

    class Evil:
        def __init__(self, function, argument):
            self.function, self.argument = function, argument

        def __reduce__(self):
            return self.function, (self.argument,)
    for function, argument, named in ((eval, f"open({str(marker)!r}, 'w')", "builtins.eval"),
                                      (os.system, f"touch {marker}", f"{os.system.__module__}.system")):
        torch.save({}, tmp_path / "evil.pkl")  # replaced below: a file that exists
        with open(tmp_path / "evil.pkl", "wb") as f:
            pickle.dump({"ema": {"_parameters": Evil(function, argument)}}, f)
        with pytest.raises(ValueError, match=rf"evil.pkl: names {re.escape(named)}, .*pickle.load\(f\)\['ema'\]"):
            ucgm.load_network(str(tmp_path / "evil.pkl"))
        assert not marker.exists()


def test_edm2_state_dicts_load_strictly_and_are_told_from_other_families(tmp_path, capsys):
    """A bare 200-key-style state dict and a Precond dict (`unet.`, logvar_* dropped with one line) load as EDM2-T;
    a missing or misshapen key is named; family detection tells EDM2 from the DiT families both ways."""
    model = tiny_edm2()
    state = model.state_dict()
    precond = {**{f"unet.{k}": v for k, v in state.items()}, "logvar_fourier.freqs": torch.zeros(128),
               "logvar_fourier.phases": torch.zeros(128), "logvar_linear.weight": torch.zeros(1, 128)}
    assert ucgm.family_of(state) == ucgm.family_of(precond) == "EDM2" and ucgm.family_of(tiny_dit().state_dict()) == "TiT"
    assert all(ucgm.family_of(ucgm.create_model(n, input_size=16, in_channels=3).state_dict()) == n.split("-")[0]
               for n in ("TiT-T/4", "LightningDiT-T/4", "DiT-T/4"))
    for key, value in (("bare", state), ("precond", precond)):
        torch.save(value, tmp_path / f"{key}.pt")
        loaded, name, settings = ucgm.load_network(str(tmp_path / f"{key}.pt"))
        assert name == "EDM2-T" and settings == {"transport": "EDM", "sampler": {"cfg_scale": 1.0}}
        assert (loaded.input_size, loaded.in_channels, loaded.num_classes) == (8, 3, 10)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    out = capsys.readouterr().out
    assert out.count("dropping the 3 weights logvar_* (EDM2's uncertainty head)") == 1
    broken = {k: v for k, v in state.items() if k != "dec.4x4_in1.emb_gain"}
    torch.save(broken, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing key 'dec.4x4_in1.emb_gain'"):
        ucgm.load_network(str(tmp_path / "missing.pt"))
    torch.save({**state, "enc.8x8_block0.conv_res1.weight": torch.zeros(32, 32, 1, 1)}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"key 'enc.8x8_block0.conv_res1.weight' has shape \(32, 32, 1, 1\)"):
        ucgm.load_network(str(tmp_path / "shape.pt"))


def test_train_py_trains_edm2_with_grad_checkpoint_and_its_checkpoint_loads(tmp_path):
    """train.py on the demo digits (3×24×24: EDM2 levels 24 and 12) with the EDM transport and --grad-checkpoint:
    finite losses, and the checkpoint loads back as EDM2-T trained on EDM."""
    found = train_in_process(tmp_path, "--model", "EDM2-T", "--transport", "EDM", "--grad-checkpoint",
                             "--global-batch-size", "4", "--max-steps", "1")
    assert len(found) == 1 and math.isfinite(found[0])
    model, name, settings = ucgm.load_network(str(tmp_path / "checkpoints" / "latest.pt"))
    assert name == "EDM2-T" and settings["transport"] == "EDM" and "enc.24x24_conv.weight" in model.state_dict()


# configs/sampling_multi_steps/in1k512_edm2_s_sdvae_edm.yaml of LINs-lab/UCGM, the model made tiny, in pixel space
EDM2_CONFIG = {"data": {"image_size": 8, "latent_norm": False, "latent_multiplier": 1.0},
               "model": {"type": "EDM2-T", "in_chans": 3}, "transport": {"type": "EDM"},
               "sample": {"cfg_scale": 0.0, "sampling_steps": 40, "stochast_ratio": 0.0, "extrapol_ratio": 0.4,
                          "sampling_order": 1, "time_dist_ctrl": [1.17, 0.8, 1.1], "rfba_gap_steps": [0.001, 0.001]}}


def test_sample_py_samples_a_released_edm2_checkpoint(tmp_path):
    """A released-config EDM2 checkpoint ({ema, model, config}) sampled at 2 steps by sample.py: EDM transport, no
    guidance, the released κ and warp, and the images UCGM-S gives by hand."""
    model = tiny_edm2()
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": EDM2_CONFIG}, tmp_path / "edm2.pt")
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "edm2.pt"), "--num-samples", "2", "--steps", "2",
                                   "--out", str(tmp_path / "out")]))
    config = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert config["model"] == "EDM2-T" and config["transport"] == "EDM"
    assert {k: config["sampler"][k] for k in ("steps", "kappa", "cfg_scale", "warp")} == \
        {"steps": 2, "kappa": 0.4, "cfg_scale": 1.0, "warp": [1.17, 0.8, 1.1]}
    noise = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    want = ucgm.UCGM("EDM").sample(model, noise, steps=2, kappa=0.4, warp=(1.17, 0.8, 1.1), y=torch.tensor([0, 1]))
    np.testing.assert_allclose(np.load(tmp_path / "out" / "samples.npz")["arr_0"],
                               ucgm.to_uint8(want).permute(0, 2, 3, 1).numpy(), atol=1)


#################################################################################
#        UNet+: EDM's SongUNet and DhariwalUNet; EDM pickles; CIFAR-10          #
#################################################################################

# tiny U-Nets of each kind at 8×8 (levels 8 and 4, attention at 4): DDPM++, NCSN++ with EDM's skip and residual
# encoders, and ADM
TINY_UNETPLUS = {"ddpm++": ("UNet+", dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                                          dropout=0.0)),
                 "ncsn++": ("UNet+-NCSN++", dict(model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                                 attn_resolutions=(4,), dropout=0.0)),
                 "skip": ("UNet+", dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                                        dropout=0.0, encoder="skip")),
                 "adm": ("UNet+-ADM", dict(model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                                           dropout=0.0))}


def tiny_unetplus(kind, num_classes=3, augment_dim=0, seed=0):
    """A tiny U-Net of TINY_UNETPLUS with every weight random (EDM's zero-initialised output layers included)."""
    torch.manual_seed(seed)
    name, kwargs = TINY_UNETPLUS[kind]
    model = ucgm.create_model(name, input_size=8, in_channels=3, num_classes=num_classes, augment_dim=augment_dim,
                              **kwargs)
    with torch.no_grad():
        for key, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if key.endswith("norm0.weight") else 0.3 * torch.randn_like(p))
    return model.eval()


def unetplus_oracle(state, x, t, y, num_classes, adm=False, taps=(1, 1)):
    """EDM's SongUNet / DhariwalUNet (NVlabs/edm training/networks.py) from its formulas in float64, walking the
    layers in the order of the weights: GroupNorm, the separable resampling filter, attention by its softmax."""
    s = {k: v.double() for k, v in state.items()}
    f = torch.tensor(taps, dtype=torch.float64) / sum(taps)
    pad, eps, skip_scale = (len(taps) - 1) // 2, 1e-5 if adm else 1e-6, 1.0 if adm else 0.5 ** 0.5
    silu = lambda h: h / (1 + torch.exp(-h))  # noqa: E731

    def linear(name, h):
        return h @ s[f"{name}.weight"].T + s.get(f"{name}.bias", 0)

    def norm(name, h):
        g = h.reshape(len(h), min(32, h.shape[1] // 4), -1)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
        return g.reshape(h.shape) * s[f"{name}.weight"][:, None, None] + s[f"{name}.bias"][:, None, None]

    def resample(h, mode, p=pad):  # per axis, down: y[i] = Σ f[k]·h[2i + k − p]; up: h[i] adds 2f[k] at 2i + k − p
        for axis in (-1, -2):
            h, n = h.transpose(axis, -1), h.shape[axis]
            if mode == "down":  # (n + 2p − len(f)) / 2 + 1 outputs
                m = (n + 2 * p - len(f)) // 2 + 1
                h = sum(f[k] * F.pad(h, (p, p))[..., k:k + 2 * m - 1:2] for k in range(len(f)))
            else:
                full = torch.zeros(*h.shape[:-1], 2 * n - 2 + len(f), dtype=h.dtype)
                for k in range(len(f)):
                    full[..., k:k + 2 * n - 1:2] += 2 * f[k] * h
                h = full[..., p:p + 2 * n]
            h = h.transpose(axis, -1)
        return h

    def conv(name, h, mode=None, fused=False):
        if fused:  # NCSN++'s residual encoder: the 3×3 convolution over the wider padding, then the filter
            h = resample(F.conv2d(h, s[f"{name}.weight"], padding=1 + pad), "down", p=0)
            return h + s[f"{name}.bias"][:, None, None]
        h = resample(h, mode) if mode else h
        w = s.get(f"{name}.weight")
        return h if w is None else F.conv2d(h, w, padding=w.shape[-1] // 2) + s[f"{name}.bias"][:, None, None]

    def block(name, h, emb):
        mode = "down" if name.endswith("_down") else "up" if name.endswith("_up") else None
        g = conv(f"{name}.conv0", silu(norm(f"{name}.norm0", h)), mode)
        p = linear(f"{name}.affine", emb)[:, :, None, None]
        if adm:
            g = silu(p[:, g.shape[1]:] + norm(f"{name}.norm1", g) * (1 + p[:, :g.shape[1]]))
        else:
            g = silu(norm(f"{name}.norm1", g + p))
        shortcut = conv(f"{name}.skip", h, mode) if any(k.startswith(f"{name}.skip.") for k in s) else h
        h = (conv(f"{name}.conv1", g) + shortcut) * skip_scale
        if f"{name}.qkv.weight" in s:
            N, C, H, W = h.shape
            heads = C // 64 if adm else 1
            qkv = conv(f"{name}.qkv", norm(f"{name}.norm2", h)).reshape(N, heads, C // heads, 3, H * W)
            logits = torch.einsum("nhcq,nhck->nhqk", qkv[..., 0, :], qkv[..., 1, :]) / math.sqrt(C // heads)
            weights = torch.exp(logits - logits.amax(-1, keepdim=True))
            a = torch.einsum("nhqk,nhck->nhcq", weights / weights.sum(-1, keepdim=True), qkv[..., 2, :])
            h = (conv(f"{name}.proj", a.reshape(N, C, H, W)) + h) * skip_scale
        return h

    c = 2.68 * t.double() - 1.59  # ¼·ln σ(t)
    if "map_noise.freqs" in s:
        angles = c[:, None] * 2 * math.pi * s["map_noise.freqs"][None]
    else:
        half = s["map_layer0.weight"].shape[1] // 2
        angles = c[:, None] * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / (half - (not adm)))[None]
    e = torch.cat([angles.cos(), angles.sin()] if adm else [angles.sin(), angles.cos()], 1)
    one_hot = (y[:, None] == torch.arange(num_classes)).double()  # the null label num_classes: zeros
    if "map_label.weight" in s and not adm:
        e = e + linear("map_label", one_hot * math.sqrt(num_classes))
    emb = linear("map_layer1", silu(linear("map_layer0", e)))
    emb = silu(emb + one_hot @ s["map_label.weight"].T if "map_label.weight" in s and adm else emb)
    h, aux, skips = x.double(), x.double(), []
    for name in dict.fromkeys(re.match(r"enc\.[^.]+", k)[0] for k in s if k.startswith("enc.")):
        if name.endswith("_conv"):
            h = conv(name, h)
        elif name.endswith("aux_down"):
            aux = conv(name, aux, "down")
        elif name.endswith("aux_skip"):
            h = skips[-1] = h + conv(name, aux)
        elif name.endswith("aux_residual"):
            h = skips[-1] = aux = (h + conv(name, aux, fused=True)) / math.sqrt(2)
        else:
            h = block(name, h, emb)
        if "aux" not in name:
            skips.append(h)
    for name in dict.fromkeys(re.match(r"dec\.[^.]+", k)[0] for k in s if k.startswith("dec.")):
        if name.endswith("aux_norm"):
            return conv(name.replace("norm", "conv"), silu(norm(name, h)))
        h = block(name, h if h.shape[1] == s[f"{name}.norm0.weight"].shape[0] else torch.cat([h, skips.pop()], 1), emb)
    return conv("out_conv", silu(norm("out_norm", h)))


@pytest.mark.parametrize("kind", sorted(TINY_UNETPLUS))
def test_unetplus_forward_matches_an_oracle_written_from_edms_formulas(kind):
    """UNet+ (DDPM++, NCSN++ with its Fourier embedding, residual encoder and [1, 3, 3, 1] filter, the skip encoder)
    and ADM in float64 against the oracle, conditional with a null-label row and EDM's augment_dim; its F at ¼·ln σ(t)
    (Table 6): an unconditional model ignores y, and its output keeps the input's shape."""
    model = tiny_unetplus(kind, num_classes=3, augment_dim=9).double()
    x, t = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0.02, 0.3, 0.7, 0.99], dtype=torch.float64)
    y = torch.tensor([0, 2, 3, 1])  # 3: the null label
    with torch.no_grad():
        got = model(x, t, y)
    want = unetplus_oracle(model.state_dict(), x, t, y, 3, adm=kind == "adm", taps=(1, 3, 3, 1) if kind == "ncsn++"
                           else (1, 1))
    assert got.shape == x.shape and got.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    unconditional = tiny_unetplus(kind, num_classes=1)
    with torch.no_grad():
        a, b = unconditional(x.float(), t.float(), y), unconditional(x.float(), t.float(), None)
    assert "map_label.weight" not in unconditional.state_dict() and torch.equal(a, b)


@pytest.mark.parametrize("name, kwargs, n_params", [
    ("UNet+", {}, 55_732_739),  # the paper's "56M" (debug.yaml's UNet+)
    ("UNet+", dict(augment_dim=9, num_classes=10), 55_735_299),  # EDM's edm-cifar10-32x32-cond-vp
    ("UNet+-NCSN++", dict(augment_dim=9), 56_397_827),  # EDM's edm-cifar10-32x32-uncond-ve
    ("UNet+-ADM", dict(input_size=64, num_classes=1000), 295_899_267)])  # EDM's edm-imagenet-64x64-cond-adm
def test_unetplus_real_sizes_have_the_released_keys_shapes_and_counts(name, kwargs, n_params):
    """create_model("UNet+", input_size=32, in_channels=3, num_classes=1) has the released UNet+'s 424 keys and
    55,732,739 parameters; EDM's CIFAR-10 and ImageNet-64 models their counts (EDM train.py's settings), built on the
    meta device and read back by infer_model."""
    with torch.device("meta"):
        model = ucgm.create_model(name, **{"input_size": 32, "in_channels": 3, "num_classes": 1, **kwargs})
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == n_params
    if name == "UNet+" and not kwargs:
        assert len(state) == 424 and list(state)[:2] == ["map_layer0.weight", "map_layer0.bias"]
        shapes = {"map_layer1.weight": (512, 512), "enc.32x32_conv.weight": (128, 3, 3, 3),
                  "enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2), "enc.16x16_down.skip.weight": (256, 256, 1, 1),
                  "enc.16x16_block0.qkv.weight": (768, 256, 1, 1), "dec.8x8_in0.proj.weight": (256, 256, 1, 1),
                  "dec.32x32_block4.conv0.weight": (256, 384, 3, 3), "dec.32x32_aux_conv.weight": (3, 256, 3, 3)}
        assert {k: tuple(state[k].shape) for k in shapes} == shapes
        assert sum(k.endswith("qkv.weight") for k in state) == 4 + 1 + 1  # enc 16×16 ×4, dec 8×8 in0, dec 16×16 last
    f = torch.tensor(ucgm.MODELS[name].get("resample_filter", (1, 1)), dtype=torch.float32)
    fake = {k: torch.outer(f, f)[None, None] / f.sum() ** 2 if k.endswith("resample_filter") else v
            for k, v in state.items()}  # shapes alone tell the rest
    inferred, sizes = ucgm.infer_model(fake)
    assert inferred == name and ucgm.family_of(fake) == "UNet+"
    with torch.device("meta"):
        again = ucgm.create_model(inferred, **sizes)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in state.items()}


class EDMPrecond(nn.Module):
    """EDM's EDMPrecond as its network pickles hold it (NVlabs/edm training/networks.py): the U-Net as `model`, its
    settings, and the constructor arguments torch_utils.persistence records."""
    def __init__(self, model, sigma_data=0.5):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = model.input_size, model.in_channels, 0
        self.use_fp16, self.sigma_min, self.sigma_max, self.sigma_data = False, 0, float("inf"), sigma_data
        self._init_kwargs = dict(model_type="SongUNet", channel_mult=[1, 2], dropout=0.13, augment_dim=9)
        self.model = model


class EDMLoss(nn.Module):
    """EDM's loss record (P_mean, P_std, sigma_data), pickled beside the network."""
    def __init__(self):
        super().__init__()
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


def write_edm_pickle(path, model, network, precond, monkeypatch, marker, sigma_data=0.5):
    """An EDM network snapshot, dict(ema=EDMPrecond, loss_fn, augment_pipe, dataset_kwargs), in EDM's pickle format:
    the network's classes under EDM's names (`network`, `precond`), a numpy scalar among the dataset settings."""
    model = copy.deepcopy(model)
    model.__class__ = type(network, (ucgm.EDMUNet,), {})  # pickled as a record of class `network`
    ema = EDMPrecond(model, sigma_data)
    ema.__class__ = type(precond, (EDMPrecond,), {})
    data = dict(ema=ema, loss_fn=EDMLoss(), augment_pipe=None, dataset_kwargs=EasyDictStandIn(
        class_name="training.dataset.ImageFolderDataset", path="datasets/cifar10-32x32.zip", xflip=False,
        max_size=np.int64(50000)))
    write_edm2_pickle(path, data, marker, monkeypatch)


@pytest.mark.parametrize("kind, num_classes, name", [("ddpm++", 3, "UNet+"), ("adm", 1, "UNet+-ADM")])
def test_edm_pickles_load_as_unetplus_on_the_edm_transport_with_nothing_executed(tmp_path, monkeypatch, kind,
                                                                                  num_classes, name):
    """An EDM network snapshot (EDMPrecond of SongUNet or DhariwalUNet, EDM's loss, its dataset settings, all as
    persistence records) gives the U-Net's weights without `model.` and the EDM transport without guidance, nothing
    of its embedded source run; sample.py samples it."""
    marker, model = tmp_path / "ran", tiny_unetplus(kind, num_classes=num_classes, augment_dim=9)
    network = "DhariwalUNet" if kind == "adm" else "SongUNet"
    write_edm_pickle(tmp_path / "edm.pkl", model, network, "EDMPrecond", monkeypatch, marker)
    loaded, got_name, settings = ucgm.load_network(str(tmp_path / "edm.pkl"))
    assert got_name == name and settings == {"transport": "EDM", "sampler": {"cfg_scale": 1.0}}
    assert (loaded.num_classes, loaded.augment_dim, loaded.input_size) == (num_classes, 9, 8)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    if kind == "adm":  # sample.py, once
        sample.main(sample.parse_args(["--ckpt", str(tmp_path / "edm.pkl"), "--num-samples", "2", "--steps", "1",
                                       "--out", str(tmp_path / "samples")]))
        config = json.loads((tmp_path / "samples" / "sample.json").read_text())
        assert config["model"] == name and config["transport"] == "EDM"
        assert np.load(tmp_path / "samples" / "samples.npz")["arr_0"].shape == (2, 8, 8, 3)
    assert not marker.exists()


def test_edm_pickles_of_other_preconditionings_and_foreign_classes_are_refused(tmp_path, monkeypatch):
    """VPPrecond, VEPrecond and iDDPMPrecond are refused with the reason (their F is not the EDM transport's), so are
    another record class, σ_data ≠ 0.5 and a pickle naming EDM's classes as plain globals; nothing runs."""
    marker, model = tmp_path / "ran", tiny_unetplus("ddpm++", num_classes=1)
    for precond, message in (("VPPrecond", r"EDM's VPPrecond \(c_out = −σ"), ("VEPrecond", r"VEPrecond \(c_in = 1"),
                             ("iDDPMPrecond", "iDDPMPrecond .a DDPM step index"),
                             ("ECMPrecond", "'ema' network is ECMPrecond with sigma_data 0.5, expected EDM's")):
        write_edm_pickle(tmp_path / "p.pkl", model, "SongUNet", precond, monkeypatch, marker)
        with pytest.raises(ValueError, match=rf"--ckpt {re.escape(str(tmp_path))}/p.pkl: its .*{message}"):
            ucgm.load_network(str(tmp_path / "p.pkl"))
    write_edm_pickle(tmp_path / "p.pkl", model, "SongUNet", "EDMPrecond", monkeypatch, marker, sigma_data=1.0)
    with pytest.raises(ValueError, match="EDMPrecond with sigma_data 1.0, expected EDM's EDMPrecond with 0.5"):
        ucgm.load_network(str(tmp_path / "p.pkl"))
    write_edm_pickle(tmp_path / "p.pkl", model, "UNetBlock", "EDMPrecond", monkeypatch, marker)
    with pytest.raises(ValueError, match="its EDMPrecond holds UNetBlock, expected EDM's SongUNet or DhariwalUNet"):
        ucgm.load_network(str(tmp_path / "p.pkl"))
    plain = types.ModuleType("training.networks")
    plain.EDMPrecond = type("EDMPrecond", (), {"__module__": "training.networks"})
    with monkeypatch.context() as patch, open(tmp_path / "plain.pkl", "wb") as f:
        patch.setitem(sys.modules, "training", types.ModuleType("training"))
        patch.setitem(sys.modules, "training.networks", plain)
        pickle.dump({"ema": plain.EDMPrecond()}, f)
    with pytest.raises(ValueError, match=r"plain.pkl: names training.networks.EDMPrecond, which an EDM or EDM2"):
        ucgm.load_network(str(tmp_path / "plain.pkl"))
    assert not marker.exists()


# configs/debug/debug.yaml of LINs-lab/UCGM (Table 7's setting), its sections as eval.py reads them
DEBUG_CONFIG = {"data": {"image_size": 8, "num_classes": 1, "latent_norm": False, "latent_multiplier": 1.0},
                "vae": {"type": "idae_f1c3", "downsample_ratio": 1}, "model": {"type": "UNet+", "in_chans": 3},
                "transport": {"type": "EDM", "consistc_ratio": 1.0},
                "sample": {"cfg_scale": 0.0, "sampling_steps": 1, "stochast_ratio": 0.0, "extrapol_ratio": 0.0,
                           "sampling_order": 1, "time_dist_ctrl": [1.1, 0.7, 1.1], "rfba_gap_steps": [0.001, 0.001]}}


def test_sample_py_samples_a_released_unetplus_checkpoint_with_its_debug_yaml_settings(tmp_path):
    """A released-format UNet+ checkpoint ({model, ema, config: debug.yaml}, the U-Net made tiny: its sizes come from
    the weights) is sampled as released: pixels (idae_f1c3), EDM transport, 1 step with warp (1.1, 0.7, 1.1), no
    guidance, unconditional; the images are UCGM-S's by hand."""
    model = tiny_unetplus("ddpm++", num_classes=1)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": DEBUG_CONFIG}, tmp_path / "ucgm.pt")
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "ucgm.pt"), "--num-samples", "2", "--out",
                                   str(tmp_path / "out")]))
    config = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert (config["model"], config["transport"], config["vae"]) == ("UNet+", "EDM", "identity")
    assert {k: config["sampler"][k] for k in ("steps", "rho", "kappa", "warp", "gaps", "cfg_scale")} == \
        {"steps": 1, "rho": 0.0, "kappa": 0.0, "warp": [1.1, 0.7, 1.1], "gaps": [0.001, 0.001], "cfg_scale": 1.0}
    noise = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    want = ucgm.UCGM("EDM").sample(model, noise, steps=1, rho=0.0, kappa=0.0, warp=(1.1, 0.7, 1.1))
    np.testing.assert_allclose(np.load(tmp_path / "out" / "samples.npz")["arr_0"],
                               ucgm.to_uint8(want).permute(0, 2, 3, 1).numpy(), atol=1)


def write_cifar10(root, kind, per_batch=2, seed=0):
    """CIFAR-10's archives in miniature, per_batch images a batch: cifar-10-batches-py/{data_batch_1..5, test_batch},
    pickled dicts (data: rows of the R, G and B planes, labels; the second with bytes keys), or cifar-10-batches-bin/
    *.bin, records of a label byte and the 3072 pixel bytes; as cifar-10-{python,binary}.tar.gz. {split: truth}."""
    rng, folder = np.random.default_rng(seed), root / f"cifar-10-batches-{kind}"
    folder.mkdir(parents=True)
    truth = {"train": ([], []), "test": ([], [])}
    for name in [*ucgm.CIFAR10_BATCHES["train"], "test_batch"]:
        images, labels = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, per_batch)
        rows = np.zeros((per_batch, 3072), np.uint8)
        for c in range(3):  # plane c holds channel c, row-major
            rows[:, c * 1024:(c + 1) * 1024] = images[..., c].reshape(per_batch, 1024)
        if kind == "py":
            keys = [b"data", b"labels"] if name == "data_batch_2" else ["data", "labels"]
            batch = {keys[0]: rows, keys[1]: labels.tolist(), "batch_label": f"{name} of 6", "filenames": ["a.png"]}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        else:
            (folder / f"{name}.bin").write_bytes(np.concatenate([labels[:, None].astype(np.uint8), rows], 1).tobytes())
        truth["test" if name == "test_batch" else "train"][0].append(images)
        truth["test" if name == "test_batch" else "train"][1].append(labels)
    with tarfile.open(root / f"cifar-10-{'python' if kind == 'py' else 'binary'}.tar.gz", "w:gz") as archive:
        archive.add(folder, arcname=folder.name)
    return {split: (np.concatenate(images), np.concatenate(labels)) for split, (images, labels) in truth.items()}


@pytest.mark.parametrize("kind", ["py", "bin"])
def test_cifar10_archives_and_folders_read_exactly_and_bad_ones_in_one_line(tmp_path, kind):
    """The python and binary CIFAR-10 archives, their extracted folders and a folder above: every pixel and label of
    both splits, batches in order; a cut record, a foreign pickle, a missing batch, a label of 10 and a file that is no
    archive are each one line."""
    truth = write_cifar10(tmp_path, kind)
    archive = tmp_path / f"cifar-10-{'python' if kind == 'py' else 'binary'}.tar.gz"
    for source in (archive, tmp_path / f"cifar-10-batches-{kind}", tmp_path):
        assert ucgm.is_cifar10(str(source))
        for split, (images, labels) in truth.items():
            got_images, got_labels = ucgm.read_cifar10(str(source), split)
            assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    assert not ucgm.is_cifar10(str(tmp_path / "cifar-10-batches-py" / "nothing")) and not ucgm.is_cifar10(HERE)
    batch = tmp_path / f"cifar-10-batches-{kind}" / ("data_batch_3" if kind == "py" else "data_batch_3.bin")
    bad = {"py": [(pickle.dumps({"data": os.system}), "not a CIFAR-10 batch .* global posix.system refused"),
                  (pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [10]}), "n labels in 0..9")],
           "bin": [(b"\x01" * 3072, "3072 bytes, not whole records of 3073 bytes"),
                   (bytes([10]) + b"\x00" * 3072, "n labels in 0..9")]}[kind]
    for content, message in bad:
        batch.write_bytes(content)
        with pytest.raises(ValueError, match=rf"--images .*: {batch.name}: .*{message}"):
            ucgm.read_cifar10(str(batch.parent), "train")
    batch.unlink()
    with pytest.raises(ValueError, match=r"expected the CIFAR-10 train batches .* missing data_batch_3"):
        ucgm.read_cifar10(str(batch.parent), "train")
    (tmp_path / "fake.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="fake.tar.gz: not a readable CIFAR-10 archive"):
        ucgm.read_cifar10(str(tmp_path / "fake.tar.gz"), "test")


def test_cifar10_path_extract_train_tune_and_reference_statistics(tmp_path, monkeypatch):
    """The CIFAR path on CPU: extract_latents.py --vae identity --image-size 32 on the python archive gives pixels
    x/127.5 − 1 and their mirror images exactly (--unconditional: label 0; --split test: the test batch); train.py
    --preset cifar10 trains UNet+-T on it, --preset cifar10-fewstep tunes an EDM pickle (with EDM's augmentation
    inputs) on it; fid.py reads the archive's training images."""
    truth = write_cifar10(tmp_path, "py")
    archive, data = str(tmp_path / "cifar-10-python.tar.gz"), tmp_path / "latents"
    common = ["--images", archive, "--vae", "identity", "--image-size", "32", "--num-workers", "0"]
    extract_latents.main(extract_latents.parse_args([*common, "--unconditional", "--out", str(data)]))
    shard = ucgm.load_safetensors(str(data / "latents_00000.safetensors"))
    pixels = torch.from_numpy(truth["train"][0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(shard["latents"], pixels) and torch.equal(shard["latents_flip"], pixels.flip(-1))
    assert shard["labels"].tolist() == [0] * 10
    images, labels, classes = extract_latents.image_source(extract_latents.parse_args([*common, "--split", "test",
                                                                                      "--out", "x"]))
    assert np.array_equal(np.stack(images), truth["test"][0]) and labels == truth["test"][1].tolist()
    assert classes == ucgm.CIFAR10_CLASSES
    with pytest.raises(ValueError, match="--split test: only for a CIFAR-10 archive"):
        extract_latents.main(extract_latents.parse_args(["--images", HERE, "--split", "test", "--out", "x"]))
    tiny = [*TINY[2:], "--data", str(data), "--latent-stats", "none", "--model", "UNet+-T", "--global-batch-size", "4",
            "--max-steps", "1", "--ckpt-every", "0"]
    train.main(train.parse_args([*tiny, "--preset", "cifar10", "--out", str(tmp_path / "run")]))
    _, name, settings = ucgm.load_network(str(tmp_path / "run" / "checkpoints" / "latest.pt"))
    assert (name, settings["transport"], settings["lam"]) == ("UNet+-T", "EDM", 0.0)
    edm = ucgm.create_model("UNet+-T", input_size=32, in_channels=3, num_classes=1, augment_dim=9)
    write_edm_pickle(tmp_path / "edm.pkl", edm, "SongUNet", "EDMPrecond", monkeypatch, tmp_path / "ran")
    train.main(train.parse_args([*tiny, "--preset", "cifar10-fewstep", "--init", str(tmp_path / "edm.pkl"), "--out",
                                 str(tmp_path / "tune")]))
    assert all(math.isfinite(loss) for run in ("run", "tune") for _, loss in losses(tmp_path / run))
    model, name, settings = ucgm.load_network(str(tmp_path / "tune" / "checkpoints" / "latest.pt"))
    assert (name, settings["transport"], settings["lam"], model.num_classes, model.augment_dim) == \
        ("UNet+-T", "EDM", 1.0, 1, 9)

    class Pixels(nn.Module):  # a stand-in Inception whose pool features are the pixels
        def forward(self, images):
            return {"pool": images.flatten(1).float(), "spatial": None, "logits": None}
    features = fid.extract_features(Pixels(), archive, batch_size=4, device="cpu", progress=False)
    assert np.array_equal(features["pool"], truth["train"][0].transpose(0, 3, 1, 2).reshape(10, -1))


def test_cifar10_presets_state_their_sources():
    """--preset cifar10: EDM's CIFAR-10 recipe (batch 512 for 200 Mimg, EMA half-life 0.5 Mimg, t matching ln σ ~
    N(−1.2, 1.2²) in mean and variance); --preset cifar10-fewstep: the released debug.yaml, label_drop 0."""
    edm = train.parse_args(["--preset", "cifar10", "--data", "somewhere"])
    assert (edm.model, edm.transport, edm.lam, edm.zeta, edm.label_drop, edm.optimizer, edm.lr, edm.betas,
            edm.global_batch_size, edm.weighting) == ("UNet+", "EDM", 0.0, 0.0, 0.0, "adamw", 1e-3, (0.9, 0.999), 512,
                                                      None)
    assert edm.max_steps * 512 == 200_000_000 and edm.ema_decay == pytest.approx(0.5 ** (512 / 500_000), abs=1e-5)
    a, b, s = edm.time_dist
    log_sigma = 4 * (2.68 * scipy.stats.beta(a, b).rvs(200_000, random_state=0) * s - 1.59)  # Table 6's σ(t)
    assert abs(log_sigma.mean() + 1.2) < 0.02 and abs(log_sigma.std() - 1.2) < 0.02
    tune = train.parse_args(["--preset", "cifar10-fewstep", "--data", "somewhere", "--init", "edm.pkl"])
    released = dict(consistc_ratio=1.0, enhanced_ratio=-0.45, enhanced_range=[0.0, 0.75],  # configs/debug/debug.yaml
                    time_dist_ctrl=[3.5, 3.5, 1.2], ema_decay_rate=1.0, scaled_cbl_eps=0.0, lr=1e-4, beta1=0.9,
                    beta2=0.999, weight_decay=0.0, global_batch_size=128, max_steps=5000, ckpt_every=1000,
                    ema_decay=0.999)
    assert (tune.lam, tune.zeta, list(tune.enhance_range), list(tune.time_dist), tune.teacher_decay, tune.huber_c,
            tune.lr, *tune.betas, tune.weight_decay, tune.global_batch_size, tune.max_steps, tune.ckpt_every,
            tune.ema_decay) == tuple(released.values())
    assert (tune.optimizer, tune.weighting, tune.enhance_style, tune.label_drop, tune.grad_clip) == \
        ("radam", "cosine", "fc-vs-xz", 0.0, 0.0)


#################################################################################
#                        Autoencoders, extract_latents.py                       #
#################################################################################


SMALL_SDVAE = dict(channels=4, ch_mult=(1, 2, 4, 4), ch=32)  # SD-VAE's layout at a quarter of its width


def diffusers_sdvae_keys():
    """The weight names of diffusers' AutoencoderKL with SD-VAE's config, written out from its module tree."""
    resnet = ["norm1", "conv1", "norm2", "conv2"]
    attention = ["group_norm", "to_q", "to_k", "to_v", "to_out.0"]
    names = ["encoder.conv_in", "encoder.conv_norm_out", "encoder.conv_out", "decoder.conv_in",
             "decoder.conv_norm_out", "decoder.conv_out", "quant_conv", "post_quant_conv"]
    for part in ("encoder", "decoder"):
        names += [f"{part}.mid_block.resnets.{i}.{m}" for i in range(2) for m in resnet]
        names += [f"{part}.mid_block.attentions.0.{m}" for m in attention]
    for i in range(4):
        names += [f"encoder.down_blocks.{i}.resnets.{j}.{m}" for j in range(2) for m in resnet]
        names += [f"decoder.up_blocks.{i}.resnets.{j}.{m}" for j in range(3) for m in resnet]
        names += [f"encoder.down_blocks.{i}.downsamplers.0.conv"] if i < 3 else []
        names += [f"decoder.up_blocks.{i}.upsamplers.0.conv"] if i < 3 else []
    names += [f"encoder.down_blocks.{i}.resnets.0.conv_shortcut" for i in (1, 2)]  # 128->256, 256->512
    names += [f"decoder.up_blocks.{i}.resnets.0.conv_shortcut" for i in (2, 3)]  # 512->256, 256->128
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}


@pytest.mark.parametrize("name, latent_shape", [("sdvae", (4, 8, 8)), ("vavae", (32, 4, 4))])
def test_autoencoder_shapes_and_size(name, latent_shape):
    torch.manual_seed(0)
    vae = ucgm.AutoencoderKL(**ucgm.AUTOENCODERS[name]).eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(images)
        assert latents.shape == (2, *latent_shape) and vae.decode(latents).shape == images.shape
    if name == "sdvae":  # the public sd-vae-ft-* files hold 83,653,863 parameters in 248 tensors
        assert sum(p.numel() for p in vae.parameters()) == 83_653_863 and len(vae.state_dict()) == 248
    identity = ucgm.create_autoencoder("identity")
    assert identity.encode(images) is images and identity.decode(images) is images


def test_autoencoder_attention_and_posterior_match_ldm_formulas():
    torch.manual_seed(0)
    vae = ucgm.AutoencoderKL(**SMALL_SDVAE).eval()
    block, x = vae.encoder.mid.attn_1, torch.randn(2, 128, 3, 5)
    h = block.norm(x)
    q, k, v = (conv(h).reshape(2, 128, 15) for conv in (block.q, block.k, block.v))
    weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(128), dim=2)  # (N, query, key)
    by_hand = x + block.proj_out(torch.bmm(v, weights.transpose(1, 2)).reshape(2, 128, 3, 5))
    torch.testing.assert_close(block(x), by_hand, rtol=1e-4, atol=1e-5)
    images, noise = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 4, 4, 4)
    moments = vae.quant_conv(vae.encoder(images))
    mean, logvar = moments[:, :4], moments[:, 4:]
    torch.testing.assert_close(vae.encode(images), mean)
    torch.testing.assert_close(vae.encode(images, noise), mean + torch.exp(logvar / 2) * noise)
    down = vae.encoder.down[0].downsample  # stride-2 conv on the input padded right and bottom by one zero
    padded = torch.zeros(2, 32, 33, 33)
    padded[:, :, :32, :32] = x32 = torch.randn(2, 32, 32, 32)
    torch.testing.assert_close(down(x32), F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2))
    up = vae.decoder.up[1].upsample  # each pixel copied to a 2×2 block, then a 3×3 conv
    x64 = torch.randn(2, 64, 8, 8)
    doubled = x64.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(up(x64), F.conv2d(doubled, up.conv.weight, up.conv.bias, padding=1))
    latents, mean, std = torch.randn(2, 4, 3, 3), torch.randn(4, 1, 1), torch.rand(4, 1, 1) + 0.5
    torch.testing.assert_close(ucgm.denormalise((latents - mean) / std * 0.18215, mean, std, 0.18215), latents)


def test_diffusers_and_ldm_files_load_the_same_weights(tmp_path):
    torch.manual_seed(0)
    vae = ucgm.AutoencoderKL(**SMALL_SDVAE)
    ldm = vae.state_dict()
    names = {k: ucgm.diffusers_name(k, 4) for k in ldm}
    assert set(names.values()) == diffusers_sdvae_keys()  # every name maps, and onto diffusers' exact set
    diffusers = {names[k]: v.squeeze() if "attentions" in names[k] and v.dim() == 4 else v for k, v in ldm.items()}
    old = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in diffusers.items()}
    files = {"diffusion_pytorch_model.safetensors": None, "diffusion_pytorch_model.bin": diffusers,
             "old_diffusers.bin": old, "ldm.ckpt": {"state_dict": {f"first_stage_model.{k}": v for k, v in ldm.items()}},
             "vavae_style.pt": {"state_dict": {**ldm, "loss.logvar": torch.zeros(()), "linear_proj.weight": torch.ones(1)}}}
    ucgm.save_safetensors(diffusers, tmp_path / "diffusion_pytorch_model.safetensors")
    for name, state in files.items():
        if state is not None:
            torch.save(state, tmp_path / name)
        loaded = ucgm.load_autoencoder_weights(ucgm.AutoencoderKL(**SMALL_SDVAE), str(tmp_path / name)).state_dict()
        assert all(torch.equal(loaded[k], ldm[k]) for k in ldm), name
    del diffusers["decoder.up_blocks.1.resnets.2.conv1.weight"]
    torch.save(diffusers, tmp_path / "broken.bin")
    with pytest.raises(ValueError, match=r"missing key 'decoder.up.2.block.2.conv1.weight'"):
        ucgm.load_autoencoder_weights(ucgm.AutoencoderKL(**SMALL_SDVAE), str(tmp_path / "broken.bin"))
    with pytest.raises(ValueError, match=r"key 'encoder.conv_out.weight' has shape \(8, 128, 3, 3\), expected"):
        ucgm.load_autoencoder_weights(ucgm.AutoencoderKL(channels=8, ch_mult=(1, 2, 4, 4), ch=32),
                                      str(tmp_path / "ldm.ckpt"))
    with pytest.raises(ValueError, match="needs --vae-path"):
        ucgm.create_autoencoder("vavae")


def test_safetensors_bytes_match_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.int32), "c": torch.randn(5).bfloat16()}
    ucgm.save_safetensors(tensors, tmp_path / "ours.safetensors")
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"))
    theirs_read_by_us = ucgm.load_safetensors(tmp_path / "theirs.safetensors")
    ours_read_by_them = st.load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(theirs_read_by_us[k], tensors[k]) and torch.equal(ours_read_by_them[k], tensors[k])
               for k in tensors)


def safetensors_bytes(header, data=b""):
    """A safetensors file with any JSON header: 8-byte little-endian size, the JSON, the data."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_SAFETENSORS = [  # (header, data, what the error says after "FILE: ")
    ([F32], bytes(8), "safetensors header is a JSON list, expected an object"),
    ({"a": "F32"}, bytes(8), "tensor 'a': expected an object with dtype, shape and data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "tensor 'a': expected an object with dtype, shape and"),
    ({"a": {**F32, "dtype": "Q4"}}, bytes(8), "tensor 'a': unsupported dtype 'Q4'"),
    ({"a": {**F32, "shape": [-2]}}, bytes(8), "tensor 'a': shape [-2] is not a list of non-negative integers"),
    ({"a": {**F32, "shape": [2.0]}}, bytes(8), "tensor 'a': shape [2.0] is not a list of non-negative integers"),
    ({"a": {**F32, "shape": [True, 2]}}, bytes(8), "tensor 'a': shape [True, 2] is not a list of non-negative"),
    ({"a": {**F32, "shape": "2"}}, bytes(8), "tensor 'a': shape '2' is not a list of non-negative integers"),
    ({"a": {**F32, "shape": [3]}}, bytes(8), "tensor 'a': F32 [3] needs 12 bytes, data_offsets [0, 8] hold 8"),
    ({"a": {**F32, "data_offsets": [0, 12]}}, bytes(8), "tensor 'a': data_offsets [0, 12] are not [start, end] "
                                                        "inside the 8-byte data"),
    ({"a": {**F32, "data_offsets": [8, 0]}}, bytes(8), "tensor 'a': data_offsets [8, 0] are not [start, end]"),
    ({"a": {**F32, "data_offsets": [0]}}, bytes(8), "tensor 'a': data_offsets [0] are not [start, end]"),
    ({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, bytes(12), "tensor 'b' overlaps tensor 'a' in the data"),
    ({"__metadata__": [], "a": F32}, bytes(8), "safetensors __metadata__ is not an object")]


@pytest.mark.parametrize("header, data, message", BAD_SAFETENSORS, ids=[m[:40] for _, _, m in BAD_SAFETENSORS])
def test_malformed_safetensors_headers_are_named(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    with pytest.raises(ValueError) as error:
        ucgm.load_safetensors(str(path))
    assert str(error.value).startswith(f"{path}: {message}")
    st = pytest.importorskip("safetensors.torch")  # the reference reader refuses every one of them too
    with pytest.raises(Exception):
        st.load_file(str(path))


def test_safetensors_that_are_not_json_or_cut_are_named(tmp_path):
    good = safetensors_bytes({"a": {**F32, "note": "extra keys are ignored, as by the safetensors package"},
                              "__metadata__": {"format": "pt"}}, struct.pack("<2f", 1.5, -2))
    (tmp_path / "good.safetensors").write_bytes(good)
    assert ucgm.load_safetensors(str(tmp_path / "good.safetensors"))["a"].tolist() == [1.5, -2.0]
    cases = {"binary": (b"\xff" * 8 + bytes(8), "truncated safetensors file"),
             "noise": ((4).to_bytes(8, "little") + b"\xff\xfe{]", "safetensors header is not JSON"),
             "short": (good[:5], "truncated safetensors file"),
             "cut": (good[:-1], "tensor 'a': data_offsets [0, 8] are not [start, end] inside the 7-byte data")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: {message}")):
            ucgm.load_safetensors(str(tmp_path / name))


class Unpicklable:  # torch.save pickles it by reference; weights_only loading must refuse to import it
    pass


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, inception_file):
    """Malformed inputs of every kind the scripts read, and a few good ones to pair them with."""
    d = tmp_path_factory.mktemp("bad_files")
    tiny_checkpoint(d / "good.pt")
    good = (d / "good.pt").read_bytes()
    (d / "cut.pt").write_bytes(good[:len(good) // 2])
    (d / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2, 3], d / "list.pt")
    torch.save({"model": Unpicklable()}, d / "pickle.pt")
    torch.save({"avg": torch.zeros(3)}, d / "stats.pt")
    (d / "shards").mkdir()
    (d / "shards" / "latents_00000.safetensors").write_bytes(safetensors_bytes([F32], bytes(8)))
    np.savez(d / "images.npz", arr_0=random_images(4, 16))
    np.savez(d / "float.npz", arr_0=random_images(4, 16).astype(np.float32))
    np.savez(d / "gray.npz", arr_0=random_images(4, 16)[..., 0])
    (d / "cut.npz").write_bytes((d / "images.npz").read_bytes()[:1500])
    (d / "text.npz").write_text("not an archive")
    np.savez(d / "wrong_ref.npz", mean=np.zeros(3))
    (d / "images" / "class0").mkdir(parents=True)
    Image.fromarray(random_images(1, 16)[0]).save(d / "images" / "class0" / "a.png")
    return d, inception_file


def bad_file_cases():
    """(script, flags, the last line's text after 'script: error: ') with {d} the folder of bad_files."""
    sample_ = ["--num-samples", "2", "--steps", "1", "--out", "{d}/out"]
    fid_ = ["--inception-weights", "{w}"]
    return [
        ("sample", ["--ckpt", "{d}/cut.pt", *sample_], "--ckpt {d}/cut.pt: not a readable PyTorch file ("),
        ("sample", ["--ckpt", "{d}/text.pt", *sample_], "--ckpt {d}/text.pt: not a readable PyTorch file ("),
        ("sample", ["--ckpt", "{d}/list.pt", *sample_], "--ckpt {d}/list.pt: expected a state dict (names -> "
                                                          "tensors) or a checkpoint holding one"),
        ("sample", ["--ckpt", "{d}/pickle.pt", *sample_], "--ckpt {d}/pickle.pt: not a readable PyTorch file "
                                                            "(Weights only load failed"),
        ("sample", ["--ckpt", "{d}/good.pt", "--latent-stats", "{d}/stats.pt", *sample_],
         "--latent-stats {d}/stats.pt: expected 'mean' and 'std' tensors with 3 values each"),
        ("train", ["--init", "{d}/cut.pt", "--out", "{d}/run1"], "--init {d}/cut.pt: not a readable PyTorch file ("),
        ("train", ["--resume", "{d}/good.pt", "--out", "{d}/run2"],
         "--resume {d}/good.pt: not a train.py checkpoint (it lacks ['opt', 'rng', 'ucgm'])"),
        ("train", ["--data", "{d}/shards", "--out", "{d}/run3"],
         "{d}/shards/latents_00000.safetensors: safetensors header is a JSON list, expected an object"),
        ("fid", ["{d}/float.npz", "{d}/images.npz", *fid_],
         "{d}/float.npz: expected arr_0 uint8 (N, H, W, 3), got float32 (4, 16, 16, 3)"),
        ("fid", ["{d}/gray.npz", "{d}/images.npz", *fid_], "{d}/gray.npz: expected arr_0 uint8 (N, H, W, 3), got "
                                                            "uint8 (4, 16, 16)"),
        ("fid", ["{d}/cut.npz", "{d}/images.npz", *fid_], "{d}/cut.npz: not a readable .npz with arr_0 ("),
        ("fid", ["{d}/text.npz", "{d}/images.npz", *fid_], "{d}/text.npz: not a readable .npz with arr_0 ("),
        ("fid", ["{d}/images.npz", "{d}/wrong_ref.npz", *fid_],
         "{d}/wrong_ref.npz: expected reference statistics (mu, sigma) or images (arr_0)"),
        ("fid", ["{d}/images.npz", "{d}/images.npz", "--inception-weights", "{d}/cut.pt"],
         "--inception-weights {d}/cut.pt: not a readable PyTorch file ("),
        ("extract_latents", ["--images", "{d}/images", "--out", "{d}/latents", "--vae", "sdvae", "--vae-path",
                             "{d}/cut.pt"], "--vae-path {d}/cut.pt: not a readable PyTorch file (")]


def test_every_script_ends_unreadable_files_with_one_line(bad_files):
    """Each script on each malformed file: exit code 1, the last line of stderr names the file, no traceback."""
    d, weights = bad_files
    fill = lambda text: text.format(d=d, w=weights)  # noqa: E731
    runs = []
    for script, flags, message in bad_file_cases():
        cmd = [sys.executable, os.path.join(HERE, f"{script}.py"), *map(fill, flags)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        runs.append((script, fill(message), subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                             stderr=subprocess.PIPE, text=True)))
    for script, message, run in runs:
        err = run.communicate(timeout=300)[1]
        assert run.returncode == 1 and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith(f"{script}.py: error: {message}"), err[-2000:]
    assert not (d / "out" / "shards").exists() or not list((d / "out" / "shards").iterdir())


def test_adm_center_crop_halves_with_box_then_crops():
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # H, W
    cropped = np.asarray(ucgm.center_crop(Image.fromarray(pixels), 32))
    box = pixels.reshape(32, 2, 48, 2, 3).astype(np.float64).mean((1, 3))  # one BOX halving: 2×2 means
    np.testing.assert_allclose(cropped, box[:, 8:40], atol=1)  # short side already 32: centre columns 8..39
    assert ucgm.center_crop(Image.fromarray(pixels[:50, :70]), 32).size == (32, 32)


def image_folder(root):
    """Three classes of small images, with a grayscale PNG, a CMYK JPEG, a truncated PNG and a non-image."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bee", "cat")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            size = (int(rng.integers(32, 70)), int(rng.integers(32, 70)))
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(root / "bee" / "gray.png")
    Image.fromarray(rng.integers(0, 256, (40, 48, 4), dtype=np.uint8), "CMYK").save(root / "cat" / "cmyk.jpg")
    whole = (root / "ant" / "0.png").read_bytes()
    (root / "ant" / "truncated.png").write_bytes(whole[:len(whole) // 2])
    (root / "cat" / "notes.txt").write_text("not an image")


def test_extract_latents_writes_the_shards_train_reads(tmp_path):
    image_folder(tmp_path / "images")
    torch.manual_seed(0)
    vae = ucgm.AutoencoderKL(**ucgm.AUTOENCODERS["vavae"]).eval()
    ucgm.save_safetensors({k: v.half() for k, v in vae.state_dict().items()}, tmp_path / "vavae.safetensors")
    vae = ucgm.create_autoencoder("vavae", str(tmp_path / "vavae.safetensors"))  # its float16-rounded weights
    flags = ["--images", str(tmp_path / "images"), "--vae", "vavae", "--vae-path", str(tmp_path / "vavae.safetensors"),
             "--image-size", "32", "--shard-size", "8", "--batch-size", "3", "--num-workers", "0", "--seed", "5"]
    with pytest.warns(UserWarning, match="truncated.png"):
        extract_latents.main(extract_latents.parse_args([*flags, "--out", str(tmp_path / "one")]))
    paths, labels, classes = extract_latents.list_images(str(tmp_path / "images"))
    assert classes == ["ant", "bee", "cat"] and len(paths) == 21 and labels == [0] * 7 + [1] * 7 + [2] * 7
    shards = sorted((tmp_path / "one").glob("latents_*.safetensors"))
    assert [s.name for s in shards] == ["latents_00000.safetensors", "latents_00001.safetensors",
                                        "latents_00002.safetensors"]
    data = [ucgm.load_safetensors(s) for s in shards]
    read = [i for i, p in enumerate(paths) if not p.endswith("truncated.png")]
    assert torch.cat([d["labels"] for d in data]).tolist() == [labels[i] for i in read]
    assert json.loads((tmp_path / "one" / "classes.json").read_text()) == classes

    index = paths.index(str(tmp_path / "images" / "cat" / "cmyk.jpg"))  # the flip uses the second noise draw
    with Image.open(paths[index]) as image:
        pixels = np.asarray(ucgm.center_crop(image.convert("RGB"), 32))
    flipped = torch.from_numpy(pixels[:, ::-1].copy()).permute(2, 0, 1).float()[None] / 127.5 - 1
    noise = torch.randn(2, 32, 2, 2, generator=torch.Generator().manual_seed(5 * 2**32 + index))
    with torch.no_grad():
        expected = vae.encode(flipped, noise[1:])
    shard = index // 8  # shards hold file-index ranges; the unreadable file leaves a gap in its shard only
    row = [i for i in read if i // 8 == shard].index(index)
    torch.testing.assert_close(data[shard]["latents_flip"][row][None], expected, rtol=1e-4, atol=1e-4)

    latents = torch.cat([d["latents"] for d in data]).double().numpy()
    stats = torch.load(tmp_path / "one" / "latents_stats.pt", weights_only=True)
    np.testing.assert_allclose(stats["mean"].flatten(), latents.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["std"].flatten(), latents.transpose(1, 0, 2, 3).reshape(32, -1).std(1, ddof=1),
                               rtol=1e-5)
    dataset = train.LatentDataset(str(tmp_path / "one"))
    assert len(dataset) == 20 and dataset.num_classes == 3 and (dataset.channels, dataset.size) == (32, 2)

    before = [s.stat().st_mtime_ns for s in shards]  # a restarted run skips the finished shards
    extract_latents.main(extract_latents.parse_args([*flags, "--out", str(tmp_path / "one")]))
    assert [s.stat().st_mtime_ns for s in shards] == before
    with pytest.raises(ValueError, match="another configuration"):
        extract_latents.main(extract_latents.parse_args([*flags[:-2], "--seed", "6", "--out", str(tmp_path / "one")]))

    for processes in (1, 2):  # in subprocesses with one thread each, so that only the process count differs
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={processes}", os.path.join(HERE, "extract_latents.py"), *flags,
                              "--out", str(tmp_path / f"procs{processes}")],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    for name in [s.name for s in shards] + ["latents_stats.pt", "classes.json", ucgm.LATENTS_INFO]:
        assert (tmp_path / "procs1" / name).read_bytes() == (tmp_path / "procs2" / name).read_bytes(), name

    info = json.loads((tmp_path / "one" / ucgm.LATENTS_INFO).read_text())  # what made the latents
    file = tmp_path / "vavae.safetensors"
    assert info["autoencoder"] == "vavae" and info["vae_path"] == str(file)
    assert info["vae_sha256"] == __import__("hashlib").sha256(file.read_bytes()).hexdigest()
    assert (info["image_size"], info["listed_images"], info["encoded_images"], info["flips"]) == (32, 21, 20, True)
    assert info["stats_images"] == 20 and "ADM" in info["crop"]

    run = run_train(tmp_path / "run", "--data", str(tmp_path / "one"), "--model", "TiT-T/1", "--max-steps", "1",
                    "--sample-every", "1")  # no --vae: the grids decode with the record's autoencoder
    assert run.returncode == 0, run.stderr[-2000:]
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (saved["vae"], saved["vae_path"]) == ("vavae", str(file))
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "run" / "checkpoints" / "latest.pt"), "--steps", "1",
                                   "--num-samples", "2", "--out", str(tmp_path / "samples")]))  # no --vae either
    assert json.loads((tmp_path / "samples" / "sample.json").read_text())["vae"] == "vavae"
    with np.load(tmp_path / "samples" / "samples.npz") as drawn:
        assert drawn["arr_0"].shape == (2, 32, 32, 3)  # decoded by the record's VA-VAE: 2×2 latents to 32 px
    with Image.open(tmp_path / "run" / "samples_0000001.png") as grid:  # 80 decoded 32-px samples, 8 a row
        assert grid.size == (8 * 32, 10 * 32)
    with Image.open(tmp_path / "run" / "steps_0000001.png") as grid:  # the last step: a class a row, 5 step counts
        assert grid.size == (len(train.STEPS_PICTURE) * 32, 10 * 32)


#################################################################################
#                   The autoencoder: DC-AE (deep compression)                   #
#################################################################################

# DC-AE's six stages, interfaces (32 latent channels, factor 32) and block kinds at a few thousandths of its size;
# heads of 8 channels, so that a 64-px image meets both attention forms (8×8 and 4×4 maps linear, 2×2 quadratic)
TINY_DCAE = dict(channels=32, widths=(8, 16, 16, 32, 64, 64), encoder_depths=(0, 1, 1, 1, 1, 1),
                 decoder_depths=(0, 1, 2, 1, 1, 1), head_dim=8)


@pytest.fixture(scope="module")
def diffusers_dc():
    """diffusers' AutoencoderDC and its efficientvit -> diffusers converter: the test-only reference (.ci/run)."""
    try:
        from diffusers import AutoencoderDC
        from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers
    except ImportError as error:
        pytest.fail(f"the DC-AE reference needs diffusers (pip install diffusers, as .ci/run does): {error}")
    return AutoencoderDC, convert_autoencoder_dc_checkpoint_to_diffusers


def diffusers_dc_config(config):
    """AutoencoderDC's arguments for a DCAE configuration: its block, norm and activation lists spelt out."""
    stages, attention = len(config["widths"]), ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    return dict(latent_channels=config["channels"], attention_head_dim=config.get("head_dim", 32),
                encoder_block_types=attention, decoder_block_types=attention,
                encoder_block_out_channels=config["widths"], decoder_block_out_channels=config["widths"],
                encoder_layers_per_block=config["encoder_depths"], decoder_layers_per_block=config["decoder_depths"],
                encoder_qkv_multiscales=((),) * stages, decoder_qkv_multiscales=((),) * stages,
                decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3, decoder_act_fns=("relu",) * 3 + ("silu",) * 3)


def random_dcae(seed=0):
    """The tiny DCAE with every weight and BatchNorm statistic random, scaled to keep activations of order one."""
    torch.manual_seed(seed)
    model = ucgm.DCAE(**TINY_DCAE).eval()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.dim() > 1:
                value.copy_(torch.randn_like(value) / value[0].numel() ** 0.5)
            elif name.endswith("running_var"):
                value.copy_(torch.rand_like(value) + 0.5)
            elif value.is_floating_point():  # norm weights near 1, biases and running means near 0
                value.copy_(0.1 * torch.randn_like(value) + name.endswith("weight"))
    return model


def test_dcae_full_size_keys_and_parameters_on_meta(diffusers_dc):
    """DC-AE f32c32 (on meta): 323,356,460 parameters (encoder 123,172,384, decoder 200,184,076) and 12,815 buffer
    values in 338 efficientvit keys; diffusers' AutoencoderDC of the same configuration has 362 keys, and its state
    dict renamed by ours gives exactly our keys and shapes; the object's interface."""
    AutoencoderDC, _ = diffusers_dc
    with torch.device("meta"):
        ours = ucgm.autoencoder_architecture("dcae")
        theirs = AutoencoderDC(**diffusers_dc_config(ucgm.AUTOENCODERS["dcae"]))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (count(ours), count(ours.encoder), count(ours.decoder)) == (323_356_460, 123_172_384, 200_184_076)
    assert sum(b.numel() for b in ours.buffers()) == 12_815 and count(theirs) == count(ours)
    expected, diffusers_state = ours.state_dict(), theirs.state_dict()
    assert len(expected) == 338 and len(diffusers_state) == 362
    renamed = ucgm.dcae_from_diffusers(diffusers_state, expected)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert (ours.channels, ours.factor, ours.sample_posterior) == (32, 32, False)
    assert ucgm.RELEASED_AUTOENCODERS["dcae_f32c32"] == "dcae"


def test_dcae_encode_and_decode_equal_diffusers_in_both_file_layouts(tmp_path, diffusers_dc):
    """create_autoencoder's loader on the files a user holds (efficientvit: a plain state dict, a `state_dict`
    checkpoint, the Hub's model.safetensors; diffusers: save_pretrained's safetensors and a .bin), with weights that
    diffusers' own converter maps: encode = AutoencoderDC.encode(x).latent and decode = .decode(z).sample to 1e-4."""
    AutoencoderDC, to_diffusers = diffusers_dc
    ours = random_dcae()
    theirs = AutoencoderDC(**diffusers_dc_config(TINY_DCAE)).eval()
    theirs.load_state_dict(to_diffusers(dict(ours.state_dict())))  # strict: their converter covers every key
    theirs.save_pretrained(tmp_path / "diffusers")
    torch.save(theirs.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    torch.save(ours.state_dict(), tmp_path / "dcae.ckpt")
    torch.save({"state_dict": ours.state_dict()}, tmp_path / "efficientvit.pt")
    ucgm.save_safetensors(ours.state_dict(), tmp_path / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    images, z = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.randn(2, 32, 2, 2, generator=g)
    with torch.no_grad():
        latents, decoded = theirs.encode(images).latent, theirs.decode(z).sample
        for path in [tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors", tmp_path / "dcae.ckpt"]:
            loaded = ucgm.load_dcae_weights(ucgm.DCAE(**TINY_DCAE), str(path)).eval()
            torch.testing.assert_close(loaded.encode(images), latents, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(loaded.decode(z), decoded, rtol=1e-4, atol=1e-4)
    assert latents.shape == (2, 32, 2, 2) and decoded.abs().max() > 1.0  # raw and unclamped, as diffusers'
    for name in ("diffusion_pytorch_model.bin", "efficientvit.pt", "model.safetensors"):  # the same weights
        loaded = ucgm.load_dcae_weights(ucgm.DCAE(**TINY_DCAE), str(tmp_path / name)).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in ours.state_dict().items()), name

    state = dict(theirs.state_dict())
    del state["encoder.down_blocks.3.0.attn.to_k.weight"]
    torch.save(state, tmp_path / "broken.bin")
    with pytest.raises(ValueError, match=r"missing key 'encoder.stages.3.op_list.0.context_module.main.qkv.conv"):
        ucgm.load_dcae_weights(ucgm.DCAE(**TINY_DCAE), str(tmp_path / "broken.bin"))
    with pytest.raises(ValueError, match=r"--vae-path .*dcae.ckpt: key 'encoder.project_in.conv.conv.weight' has "
                                         r"shape \(4, 3, 3, 3\), expected \(64, 3, 3, 3\)"):
        ucgm.create_autoencoder("dcae", str(tmp_path / "dcae.ckpt"))  # the full f32c32, whatever the file
    ucgm.save_safetensors(ucgm.AutoencoderKL(**SMALL_SDVAE).state_dict(), tmp_path / "sdvae.safetensors")
    with pytest.raises(ValueError, match=r"missing key 'encoder.project_in.conv.conv.weight'"):
        ucgm.load_dcae_weights(ucgm.DCAE(**TINY_DCAE), str(tmp_path / "sdvae.safetensors"))


def plain_relu_attention(q, k, v, eps=1e-15):
    """out_n = Σ_m v_m (k_m·q_n) / (Σ_m k_m·q_n + eps), one query position n at a time, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    columns = []
    for n in range(q.shape[-1]):
        weights = (k * q[..., n:n + 1]).sum(2)  # (N, heads, H·W): k_m·q_n for every m
        columns.append((v * weights[:, :, None]).sum(-1) / (weights.sum(-1, keepdim=True) + eps))
    return torch.stack(columns, -1)


def test_dcae_attention_forms_equal_a_plain_computation(monkeypatch):
    """The linear and the quadratic form against each other and against plain_relu_attention; LiteMLA takes the
    linear form when a map has more positions than head_dim (DC-AE: 32), slices q, k, v inside each head's
    3·head_dim qkv channels and computes in float32 under bf16 autocast."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 20, generator=g) for _ in range(3))
    q, k = F.relu(q), F.relu(k)
    plain = plain_relu_attention(q, k, v).float()
    torch.testing.assert_close(ucgm.linear_attention(q, k, v), plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ucgm.quadratic_attention(q, k, v), plain, rtol=1e-4, atol=1e-5)

    block = ucgm.LiteMLA(16, ucgm.ChannelRMSNorm, head_dim=8)  # two heads
    used = []
    for form in ("linear_attention", "quadratic_attention"):
        original = getattr(ucgm, form)
        monkeypatch.setattr(ucgm, form, lambda *a, form=form, original=original: used.append(form) or original(*a))
    for size in (3, 2):  # 9 > 8 positions: linear; 4: quadratic
        x = torch.randn(2, 16, size, size, generator=g)
        qkv = F.conv2d(x, block.qkv.conv.weight).reshape(2, 2, 24, size * size)  # (N, heads, 3·8, H·W)
        by_hand = plain_relu_attention(F.relu(qkv[:, :, :8]), F.relu(qkv[:, :, 8:16]), qkv[:, :, 16:])
        want = block.proj(by_hand.reshape(2, 16, size, size).float())
        torch.testing.assert_close(block(x), want, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert block(x).dtype == torch.float32  # ConvLayer's norm is float32 too: the attention ran in float32
    assert used == ["linear_attention"] * 2 + ["quadratic_attention"] * 2


def test_dcae_runs_through_extract_latents_train_and_sample(tmp_path, monkeypatch, capsys):
    """The scripts with `--vae dcae` (its configuration made tiny here, its interfaces kept): extract_latents.py
    writes 32×1×1 latents of 32-px images and their per-channel stats, train.py trains on them and records the
    autoencoder, sample.py decodes into 32-px samples; a --bench line; the bad input ends with one line naming the
    flag and what was expected."""
    monkeypatch.setitem(ucgm.AUTOENCODERS, "dcae", TINY_DCAE)
    image_folder(tmp_path / "images")
    torch.save(random_dcae().state_dict(), tmp_path / "dcae.ckpt")
    vae = ["--vae", "dcae", "--vae-path", str(tmp_path / "dcae.ckpt")]
    extract = ["--images", str(tmp_path / "images"), *vae, "--num-workers", "0", "--batch-size", "16"]
    with pytest.warns(UserWarning, match="truncated.png"):
        extract_latents.main(extract_latents.parse_args([*extract, "--image-size", "32", "--out", str(tmp_path / "z")]))
    latents = ucgm.load_safetensors(tmp_path / "z" / "latents_00000.safetensors")["latents"]
    stats = torch.load(tmp_path / "z" / "latents_stats.pt", weights_only=True)
    assert latents.shape == (20, 32, 1, 1) and stats["mean"].shape == stats["std"].shape == (1, 32, 1, 1)
    torch.testing.assert_close(stats["std"].flatten(), latents.transpose(0, 1).flatten(1).std(1))

    train.main(train.parse_args(["--data", str(tmp_path / "z"), "--out", str(tmp_path / "run"), *vae, "--model",
                                 "TiT-T/1", *TINY, "--global-batch-size", "4", "--max-steps", "1"]))
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "run" / "checkpoints" / "latest.pt"), "--num-samples",
                                   "3", "--steps", "2", "--out", str(tmp_path / "samples")]))  # its vae and stats
    assert np.load(tmp_path / "samples" / "samples.npz")["arr_0"].shape == (3, 32, 32, 3)

    capsys.readouterr()
    extract_latents.main(extract_latents.parse_args(["--bench", "2", "--vae", "dcae", "--image-size", "32"]))
    assert re.fullmatch(r"bench dcae at 32 px on cpu \(\d+ threads\), batch 64: encode [\d.e+]+ img/s, decode "
                        r"[\d.e+]+ img/s; peak memory decoding [\d.]+ GiB \(weights 0.00 GiB\)\n", capsys.readouterr().out)
    with pytest.raises(ValueError, match=r"^--image-size 16: expected a multiple of the dcae factor 32 "):
        extract_latents.main(extract_latents.parse_args([*extract, "--image-size", "16", "--out", str(tmp_path / "x")]))
    tiny_checkpoint(tmp_path / "pixels.pt")  # a model of 3-channel latents
    with pytest.raises(ValueError, match=r"^--vae dcae decodes 32-channel latents, the model makes 3$"):
        sample.main(sample.parse_args(["--ckpt", str(tmp_path / "pixels.pt"), *vae, "--out", str(tmp_path / "y")]))
    assert bad_train_input(tmp_path, *vae) == "--vae dcae decodes 32-channel latents, the data has 3"


def test_released_dcae_configs_resolve_to_dcae():
    """in1k512_tit_xl_dcae.yaml (multi-step and few-step): TiT-XL/1 on DC-AE latents, normalised by the released
    stats file, with their sampler settings (gaps (0, 0.6): t₀ = 1 exactly)."""
    config = {"data": {"image_size": 512, "latent_norm": True, "latent_multiplier": 1.0},
              "vae": {"type": "dcae_f32c32"}, "model": {"type": "TiT-XL/1", "in_chans": 32},
              "transport": {"type": "Linear", "consistc_ratio": 1.0},
              "sample": {"sampling_steps": 2, "stochast_ratio": 1.0, "rfba_gap_steps": [0.0, 0.6]}}
    settings = ucgm.released_settings(config, "--ckpt x")
    assert (settings["model"], settings["vae"], settings["latent_norm"]) == ("TiT-XL/1", "dcae", True)
    assert settings["released_stats"] == "buffers/vaes/stat/dcae_f32c32_512.pt"
    assert settings["sampler"] == dict(steps=2, rho=1.0, gaps=[0.0, 0.6])


#################################################################################
#         Released models: configs, LightningDiT, REPA, E2E-VAE, tuning         #
#################################################################################


# configs/sampling_multi_steps/in1k256_lightningdit_xl_vavae_relinear.yaml of LINs-lab/UCGM, as a released
# checkpoint's `config` holds it (the model made tiny)
LIGHTNINGDIT_CONFIG = {"data": {"image_size": 256, "latent_norm": True, "latent_multiplier": 1.0},
                       "vae": {"type": "vavae_f16d32"}, "model": {"type": "LightningDiT-T/4", "in_chans": 3},
                       "transport": {"type": "ReLinear"},
                       "sample": {"ckpt": "0000000.pt", "type": "UNI", "cfg_scale": 6.7, "cfg_interval": [0.125, 1.0],
                                  "sampling_steps": 50, "stochast_ratio": 0.0, "extrapol_ratio": 0.5,
                                  "sampling_order": 1, "time_dist_ctrl": [1.17, 0.8, 1.1],
                                  "rfba_gap_steps": [0.001, 0.001], "per_batch_size": 125, "fid_sample_num": 50000}}
# configs/training_few_steps/in1k256_tit_xl_vavae.yaml (FID 1.42 at 2 steps), the model made tiny
FEWSTEP_CONFIG = {"data": {"image_size": 256, "latent_norm": True, "latent_multiplier": 1.0},
                  "vae": {"type": "vavae_f16d32"}, "model": {"type": "TiT-T/4", "in_chans": 3},
                  "transport": {"type": "Linear", "consistc_ratio": 1.0, "enhanced_ratio": 2.0, "scaled_cbl_eps": 5.0},
                  "sample": {"cfg_scale": 0.0, "cfg_interval": [0.0, 0.75], "sampling_steps": 2, "stochast_ratio": 1.0,
                             "extrapol_ratio": 0.0, "sampling_order": 1, "time_dist_ctrl": [1.0, 1.0, 1.0],
                             "rfba_gap_steps": [0.001, 0.3]}}


def perturbed(model, seed=0):
    """The model with its zero-initialised layers made non-zero, so that outputs depend on every weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return model


def test_affine_rmsnorm_matches_numpy():
    norm, x = ucgm.RMSNorm(6, affine=True), torch.randn(4, 3, 6, dtype=torch.float64)
    assert torch.equal(norm.weight, torch.ones(6))  # initialised to ones, as released
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-1, 2, 6))
    want = x.numpy() / np.sqrt((x.numpy() ** 2).mean(-1, keepdims=True) + 1e-6) * np.linspace(-1, 2, 6)
    np.testing.assert_allclose(norm(x).detach().numpy(), want, rtol=1e-6)
    model = ucgm.create_model("LightningDiT-T/4", input_size=16, in_channels=3, num_classes=10)
    keys = model.state_dict().keys()
    assert "blocks.0.norm1.weight" in keys and "final_layer.norm_final.weight" in keys
    assert not any("q_norm" in k or "k_norm" in k for k in keys)  # qk-norm off, as released


@pytest.mark.parametrize("config, flags, want", [
    (LIGHTNINGDIT_CONFIG, [], dict(steps=50, rho=0.0, kappa=0.5, warp=(1.17, 0.8, 1.1), gaps=(0.001, 0.001), order=1,
                                   cfg_scale=6.7, cfg_interval=(0.125, 1.0), cfg_channels=3, transport="ReLinear",
                                   vae="vavae", latent_multiplier=1.0)),
    (FEWSTEP_CONFIG, [], dict(steps=2, rho=1.0, kappa=0.0, warp=(1.0, 1.0, 1.0), gaps=(0.001, 0.3), order=1,
                              cfg_scale=1.0, cfg_interval=(0.0, 0.75), cfg_channels=None, transport="Linear",
                              vae="vavae", latent_multiplier=1.0)),
    (LIGHTNINGDIT_CONFIG, ["--steps", "8", "--cfg-scale", "2", "--cfg-channels", "32", "--transport", "Linear"],
     dict(steps=8, cfg_scale=2.0, cfg_channels=32, transport="Linear", kappa=0.5))])
def test_released_config_sets_the_sampler_defaults(tmp_path, config, flags, want):
    family = config["model"]["type"].split("-")[0]
    model = perturbed(ucgm.create_model(config["model"]["type"], input_size=16, in_channels=3, num_classes=10))
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "unigen": {}, "config": config},
               tmp_path / "released.pt")
    args = sample.parse_args(["--ckpt", str(tmp_path / "released.pt"), *flags])
    _, name, settings = ucgm.load_network(args.ckpt)
    resolved = sample.resolve(args, settings)
    assert name == config["model"]["type"] and {k: resolved[k][0] for k in want} == want
    assert all(resolved[k][1] == ("flag" if f"--{k.replace('_', '-')}" in flags else "checkpoint") for k in want
               if k != "cfg_channels" or family == "LightningDiT")  # cfg 0.0 (no guidance) became our 1.0 above
    base = ["--ckpt", str(tmp_path / "released.pt"), "--vae", "identity", "--num-samples", "2", "--steps", "1"]
    with pytest.raises(ValueError, match=r"normalised latents .*buffers/vaes/stat/vavae_f16d32_256.pt"):
        sample.main(sample.parse_args([*base, "--out", str(tmp_path / "a")]))
    sample.main(sample.parse_args([*base, "--latent-stats", "none", "--out", str(tmp_path / "b")]))
    assert np.load(tmp_path / "b" / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)


@pytest.mark.parametrize("model_type, vae_type, match", [
    ("UViT-H/2", "sdvae_ema_f8c4", "model 'UViT-H/2', which is not supported"),
    ("SD15-UNet", "sdvae_f8c4", "model 'SD15-UNet', which is not supported")])
def test_unsupported_released_models_are_named(tmp_path, model_type, vae_type, match):
    config = {**FEWSTEP_CONFIG, "model": {"type": model_type}, "vae": {"type": vae_type}}
    torch.save({"model": {}, "ema": {}, "config": config}, tmp_path / "released.pt")
    run = run_sample(tmp_path / "out", "--ckpt", str(tmp_path / "released.pt"))
    assert run.returncode != 0 and match in run.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_explicit_vae_wins_over_the_released_config(tmp_path):
    """sample.py: --vae decides even where the config names an autoencoder we lack; idae_f1c3 is pixel space, and
    --latent-stats none wins over latent_norm: True."""
    model = perturbed(ucgm.create_model("TiT-T/4", input_size=8, in_channels=3, num_classes=10))
    for vae_type in ("sd3_f8c16", "idae_f1c3"):
        config = {**FEWSTEP_CONFIG, "vae": {"type": vae_type}}
        torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": config}, tmp_path / "r.pt")
        base = ["--ckpt", str(tmp_path / "r.pt"), "--num-samples", "2", "--latent-stats", "none"]
        if vae_type == "sd3_f8c16":
            with pytest.raises(ValueError, match="autoencoder 'sd3_f8c16', which is not supported.*give --vae"):
                sample.main(sample.parse_args([*base, "--out", str(tmp_path / "refused")]))
            assert not (tmp_path / "refused").exists()
            base += ["--vae", "identity"]
        sample.main(sample.parse_args([*base, "--out", str(tmp_path / vae_type)]))
        assert np.load(tmp_path / vae_type / "samples.npz")["arr_0"].shape == (2, 8, 8, 3)


def test_repa_extras_are_dropped_and_other_keys_stay_strict(tmp_path, capsys):
    model = perturbed(ucgm.create_model("DiT-T/4", input_size=16, in_channels=3, num_classes=10, learn_sigma=True))
    extras = {"projectors.0.0.weight": torch.zeros(8, 128), "projectors.0.0.bias": torch.zeros(8),
              "bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3)}
    torch.save({"model": {}, "ema": {**model.state_dict(), **extras}, "args": argparse.Namespace(lr=1e-4), "steps": 4},
               tmp_path / "repa_e.pt")  # REPA-E's checkpoint layout, its args a Namespace
    loaded, name, settings = ucgm.load_network(str(tmp_path / "repa_e.pt"))
    assert name == "DiT-T/4" and loaded.out_channels == 6 and settings == {}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    out = capsys.readouterr().out
    assert "dropping the 2 weights projectors.*" in out and "dropping the 2 weights bn.*" in out
    torch.save({**model.state_dict(), "decoder_blocks.0.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="unexpected key 'decoder_blocks.0.weight'"):
        ucgm.load_network(str(tmp_path / "other.pt"))


def test_edm2_sdvae_decodes_and_encodes_as_edm2():
    """edm2sdvae (EDM2's sd-vae-ft-mse): pixels in [0, 1] into the encoder, clamp(decode, 0, 1) out, stored here
    in [-1, 1], so that to_uint8 gives EDM2's floor(255·clamp(decode, 0, 1)); its default stats undo EDM2's
    scale = 0.5/raw_std, bias = −raw_mean·scale."""
    assert {**ucgm.AUTOENCODERS["edm2sdvae"], "unit_pixels": False, "sample_posterior": False} == \
        {**ucgm.AUTOENCODERS["sdvae"], "unit_pixels": False, "sample_posterior": False}
    torch.manual_seed(0)
    plain = ucgm.AutoencoderKL(**SMALL_SDVAE).eval()
    edm2 = ucgm.AutoencoderKL(**SMALL_SDVAE, unit_pixels=True).eval()
    edm2.load_state_dict(plain.state_dict())
    z, images = torch.randn(2, 4, 4, 4), torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        raw = plain.decode(z) * 3  # spread past [0, 1] so that the clamp acts
        edm2.decoder.conv_out.weight.mul_(3), edm2.decoder.conv_out.bias.mul_(3)
        got = edm2.decode(z)
        assert (raw < 0).any() and (raw > 1).any()
        torch.testing.assert_close(got, raw.clamp(0, 1) * 2 - 1, rtol=1e-5, atol=1e-5)
        edm2_pixels = (raw.clamp(0, 1) * 255).floor()
        assert (ucgm.to_uint8(got).float() - edm2_pixels).abs().max() <= 1
        assert (ucgm.to_uint8(got).float() == edm2_pixels).float().mean() > 0.99
        torch.testing.assert_close(edm2.encode(images), plain.encode((images + 1) / 2))
    raw_mean, raw_std = torch.tensor([5.81, 3.25, 0.12, -2.15]), torch.tensor([4.17, 4.62, 3.71, 3.28])
    scale, bias = 0.5 / raw_std, -raw_mean * 0.5 / raw_std
    stats = ucgm.DEFAULT_LATENT_STATS["edm2sdvae"]
    torch.testing.assert_close(stats["std"], torch.tensor([8.34, 9.24, 7.42, 6.56]))
    final = torch.randn(4, 1, 1)
    torch.testing.assert_close(ucgm.denormalise(final, stats["mean"].reshape(4, 1, 1), stats["std"].reshape(4, 1, 1),
                                                1.0), (final - bias.reshape(4, 1, 1)) / scale.reshape(4, 1, 1))


def test_every_released_autoencoder_name_resolves():
    """README "Reproducing the paper": each `vae.type` of the released configs names an autoencoder we build."""
    released = {"sdvae_f8c4", "sdvae_ema_f8c4", "vavae_f16d32", "e2evavae_f16d32", "idae_f1c3", "edm2_sdvae_f8c4",
                "edm2_sdvae_ema_f8c4"}
    assert released <= set(ucgm.RELEASED_AUTOENCODERS)
    assert all(name == "identity" or name in ucgm.AUTOENCODERS for name in ucgm.RELEASED_AUTOENCODERS.values())
    assert isinstance(ucgm.create_autoencoder(ucgm.RELEASED_AUTOENCODERS["idae_f1c3"]), ucgm.PixelSpace)


def test_e2e_vaes_share_the_architectures_and_are_encoded_by_the_mean(tmp_path):
    for e2e, base in (("e2evavae", "vavae"), ("e2esdvae", "sdvae")):
        assert {**ucgm.AUTOENCODERS[e2e], "sample_posterior": True} == {**ucgm.AUTOENCODERS[base], "sample_posterior": True}
        assert not ucgm.AUTOENCODERS[e2e].get("sample_posterior", False)
    torch.manual_seed(0)
    state = ucgm.AutoencoderKL(**SMALL_SDVAE).state_dict()
    torch.save(state, tmp_path / "e2evae_f8d4.ckpt")  # REPA-E's save_vae_weights.py: a bare LDM-named state dict
    loaded = ucgm.load_autoencoder_weights(ucgm.AutoencoderKL(**SMALL_SDVAE), str(tmp_path / "e2evae_f8d4.ckpt"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_train_py_tunes_released_layouts_into_a_few_step_model(tmp_path):
    size = train.DigitsDataset.size  # the demo data stands in for the latents
    sit = perturbed(ucgm.create_model("DiT-T/4", input_size=size, in_channels=3, num_classes=10, learn_sigma=True))
    lightning = perturbed(ucgm.create_model("LightningDiT-T/4", input_size=size, in_channels=3, num_classes=10), 1)
    torch.save({"ema": {**sit.state_dict(), "projectors.0.0.weight": torch.zeros(8, 128)}}, tmp_path / "repa.pt")
    torch.save({"model": lightning.state_dict(), "ema": lightning.state_dict(), "opt": {}, "config": {"model": {
        "model_type": "LightningDiT-T/4", "use_qknorm": False}}}, tmp_path / "lightningdit.pt")  # hustvl's layout
    for name, model, transport in (("repa", sit, "Linear"), ("lightningdit", lightning, "ReLinear")):
        ckpt = str(tmp_path / f"{name}.pt")
        run = run_train(tmp_path / name, "--init", ckpt, "--teacher", ckpt, "--preset", "fewstep", "--zeta", "3",
                        "--max-steps", "3", "--sample-every", "3", "--ema-decay", "0.99")
        assert run.returncode == 0, run.stderr[-3000:]
        state = torch.load(tmp_path / name / "checkpoints" / "latest.pt", weights_only=True)
        assert (state["args"]["model"], state["args"]["transport"]) == (ucgm.infer_model(model.state_dict())[0],
                                                                       transport)
        assert not any(k.startswith("teacher.") for k in state["ucgm"])  # frozen: named and checksummed, not copied
        assert state["teacher_file"] == {"path": ckpt, "sha256": train.sha256_of(model.state_dict())}
        start = model.state_dict()["blocks.0.attn.qkv.weight"]
        moved = (state["model"]["blocks.0.attn.qkv.weight"] - start).norm()
        assert moved > 0 and (state["ema"]["blocks.0.attn.qkv.weight"] - start).norm() < 0.1 * moved  # EMA 0.99, no warm-up
        assert all(math.isfinite(loss) for _, loss in losses(tmp_path / name))
        assert (tmp_path / name / "samples_0000003.png").exists()
    other = {k: v + 1 if k == "blocks.0.attn.qkv.weight" else v for k, v in sit.state_dict().items()}
    torch.save(other, tmp_path / "other.pt")
    resume = [*TINY, "--init", str(tmp_path / "repa.pt"), "--preset", "fewstep", "--zeta", "3", "--max-steps", "4",
              "--out", str(tmp_path / "repa")]
    with pytest.raises(ValueError, match=re.escape(f"--resume {tmp_path / 'repa' / 'checkpoints' / 'latest.pt'}: "
                                                   f"trained with the frozen teacher {tmp_path / 'repa.pt'} (sha256 ")):
        train.main(train.parse_args([*resume, "--teacher", str(tmp_path / "other.pt")]))
    train.main(train.parse_args([*resume, "--teacher", str(tmp_path / "repa.pt")]))  # the same file resumes
    assert [step for step, _ in losses(tmp_path / "repa")] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def real_size_files(tmp_path_factory, inception_file):
    """A random-weight VA-VAE, a released-format stats file and fid.py statistics of 4 random 256-px images."""
    root = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    torch.save({"state_dict": ucgm.AutoencoderKL(**ucgm.AUTOENCODERS["vavae"]).state_dict()}, root / "vavae.pt")
    torch.save({"mean": torch.randn(1, 32, 1, 1), "std": torch.rand(1, 32, 1, 1) + 0.5}, root / "vavae_f16d32_256.pt")
    np.savez(root / "ref_images.npz", arr_0=np.random.default_rng(0).integers(0, 256, (4, 256, 256, 3), np.uint8))
    fid.main(fid.parse_args(["--save-stats", str(root / "ref_images.npz"), str(root / "ref.npz"),
                             "--inception-weights", inception_file]))
    return root


def test_real_sizes_end_to_end(tmp_path, real_size_files, inception_file):
    """The paper's TiT-XL/1 on 32×16×16 VA-VAE latents as a released UCGM checkpoint, random weights: sample.py at 2
    steps, decoded to 256 px, then fid.py's metrics (the other families' real sizes are checked on `meta`)."""
    with torch.device("meta"):
        shapes = ucgm.create_model("TiT-XL/1", input_size=16, in_channels=32).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {k: 0.02 * torch.randn(v.shape, generator=generator) for k, v in shapes.items()}  # 675M random weights
    torch.save({"model": state, "ema": state, "config": {**FEWSTEP_CONFIG, "model": {"type": "TiT-XL/1"}}},
               tmp_path / "ckpt.pt")  # one copy of the weights on disk: both entries share storage
    del state
    run = run_sample(tmp_path / "out", "--ckpt", str(tmp_path / "ckpt.pt"), "--num-samples", "2", "--batch-size", "2",
                     "--vae", "vavae", "--vae-path", str(real_size_files / "vavae.pt"), "--fid-ref",
                     str(real_size_files / "ref.npz"), "--inception-weights", inception_file, "--latent-stats",
                     str(real_size_files / "vavae_f16d32_256.pt"), threads=os.cpu_count())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "steps = 2 (checkpoint)" in run.stdout
    images = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert images.shape == (2, 256, 256, 3) and images.dtype == np.uint8 and images.std() > 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_samples"] == 2 and math.isfinite(metrics["fid"]) and math.isfinite(metrics["inception_score"])
    assert "precision/recall unavailable: they need at least 4 images" in run.stdout


#################################################################################
#                       train.py: data, presets, resume, DDP                    #
#################################################################################



HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--global-batch-size", "16", "--log-every", "1", "--num-workers", "0", "--sample-every", "0"]  # no grids


def run_train(out, *flags, torchrun=0, wait=True, timeout=600):
    """Start train.py (under torchrun with that many processes, if given) on the demo data."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    cmd = launcher + [os.path.join(HERE, "train.py"), "--out", str(out), *TINY, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_resume_after_sigkill_gives_the_same_losses(tmp_path):
    straight = run_train(tmp_path / "a", "--max-steps", "6", "--ckpt-every", "1")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_train(tmp_path / "b", "--max-steps", "6", "--ckpt-every", "1", wait=False)
    third = tmp_path / "b" / "checkpoints" / "0000003.pt"
    while not third.exists() and killed.poll() is None:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "train.py ended before it could be killed"
    for path in (tmp_path / "b" / "checkpoints").glob("*.pt"):  # every checkpoint left is whole
        assert torch.load(path, weights_only=True)["step"] == int(path.stem) if path.stem != "latest" else True
    assert torch.load(tmp_path / "b" / "checkpoints" / "latest.pt", weights_only=True)["step"] >= 3
    resumed = run_train(tmp_path / "b", "--max-steps", "6", "--ckpt-every", "1", "--sample-every", "1000")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-6)
    assert not list((tmp_path / "b" / "checkpoints").glob("*tmp*"))
    assert (tmp_path / "b" / "samples_0000006.png").exists()


def test_two_process_torchrun_trains_and_checkpoints(tmp_path):
    run = run_train(tmp_path, "--max-steps", "2", "--ckpt-every", "2", torchrun=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "weights identical on all 2 ranks: True" in run.stdout
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 2 and set(state) >= {"model", "ema", "opt", "ucgm", "args", "step", "rng"}
    resumed = run_train(tmp_path, "--max-steps", "4", "--ckpt-every", "2")  # on 1 process (README "Several nodes")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert [step for step, _ in losses(tmp_path)] == [1, 2, 3, 4] and all(np.isfinite(v) for _, v in losses(tmp_path))


def test_a_failure_on_one_rank_ends_every_rank_with_its_one_line(tmp_path):
    """Rank 0 alone reads log.jsonl (to trim it for a resume) while rank 1 waits for it in DDP's first collective."""
    (tmp_path / "log.jsonl").write_text("garbage\n")
    run = run_train(tmp_path, "--max-steps", "2", torchrun=2, timeout=120)  # a hang would last gloo's 30 minutes
    line = (f"train.py: error: {tmp_path / 'log.jsonl'}: expected a JSON record with a 'step' on every line, "
            f"line 1 is 'garbage'")
    assert run.returncode != 0 and run.stderr.splitlines().count(line) == 1, run.stderr[-3000:]
    assert "Connection closed" not in run.stderr and "[rank" not in run.stderr  # rank 1 ends without a word
    both = run_train(tmp_path / "both", "--grad-accum", "3", torchrun=2, timeout=120)  # fails on every rank
    assert both.returncode != 0 and both.stderr.splitlines().count(
        "train.py: error: --global-batch-size 16 must divide by processes × --grad-accum = 6") == 1, both.stderr[-3000:]


def test_zero_periods_mean_never_yet_the_last_checkpoint_is_written(tmp_path):
    run = run_train(tmp_path, "--max-steps", "3", "--log-every", "0", "--ckpt-every", "0", "--sample-every", "0",
                    torchrun=1)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0000003.pt", "latest.pt"]
    assert torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)["step"] == 3
    assert [step for step, _ in losses(tmp_path)] == [3]  # the last line only
    assert not list(tmp_path.glob("samples_*.png"))
    assert "weights identical" not in run.stdout  # one process has no replicas to compare
    assert re.search(r"steps 1-3 done, train.py took \d+ min \d+ s", run.stdout)


def test_save_checkpoint_keeps_the_multiples_of_keep_and_the_latest(tmp_path):
    for keep, kept in ((2, ["0000002.pt", "0000004.pt", "0000005.pt"]), (0, ["0000005.pt"])):
        folder = tmp_path / str(keep)
        folder.mkdir()
        for step in range(1, 6):
            train.save_checkpoint({"step": step}, str(folder), step, keep)
        assert sorted(p.name for p in folder.iterdir()) == [*kept, "latest.pt"]


def pixel_latents(root, images, *flags):
    """A latent folder of 8×8 pixels (--vae identity) of an image folder, made by extract_latents.py."""
    extract_latents.main(extract_latents.parse_args(["--images", str(images), "--out", str(root), "--vae", "identity",
                                                     "--image-size", "8", "--num-workers", "0", *flags]))
    return root


def test_statistics_come_from_a_seeded_random_subset_of_the_whole_set(tmp_path):
    """README "Latents": mean/std of --stats-images images drawn at random from all shards (as the released
    pipelines), not the first ones; 'all' takes every image; the same draw for any number of processes (the
    1-vs-2-process test above compares the files)."""
    values = torch.arange(30, dtype=torch.float64)  # image i's latent is i everywhere: the draw shows in the mean
    for k in range(3):
        latents = values[10 * k:10 * k + 10].reshape(10, 1, 1, 1).expand(10, 2, 2, 2).float().contiguous()
        ucgm.save_safetensors({"latents": latents, "labels": torch.zeros(10, dtype=torch.long)},
                              extract_latents.shard_path(str(tmp_path), k))
    mean, std, used, count = extract_latents.latent_stats(str(tmp_path), 3, 6, seed=4)
    chosen = torch.randperm(30, generator=torch.Generator().manual_seed(4))[:6]
    assert (used, count) == (6, 30) and chosen.max() >= 10  # drawn beyond the first shard
    torch.testing.assert_close(mean.flatten().double(), values[chosen].mean().expand(2), rtol=1e-6, atol=0)
    torch.testing.assert_close(std.flatten().double(), values[chosen].repeat_interleave(4).std().expand(2), rtol=1e-5,
                               atol=0)
    mean, std, used, _ = extract_latents.latent_stats(str(tmp_path), 3, "all", seed=4)
    assert used == 30 and math.isclose(mean.flatten()[0], 14.5, rel_tol=1e-6)
    assert extract_latents.parse_args(["--images", "i", "--out", "o", "--stats-images", "all"]).stats_images == "all"


def test_no_flip_extracts_and_trains_without_mirror_images(tmp_path):
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    pixel_latents(tmp_path / "plain", tmp_path / "img", "--no-flip")
    shard = ucgm.load_safetensors(extract_latents.shard_path(str(tmp_path / "plain"), 0))
    assert set(shard) == {"latents", "labels"}
    assert json.loads((tmp_path / "plain" / ucgm.LATENTS_INFO).read_text())["flips"] is False
    both = train.LatentDataset(str(pixel_latents(tmp_path / "both", tmp_path / "img")))
    never = train.LatentDataset(str(tmp_path / "both"), flip=False)
    assert both.flip and not never.flip and not train.LatentDataset(str(tmp_path / "plain")).flip
    torch.testing.assert_close(both[(1, True)][0], both[(1, False)][0].flip(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(never[(1, True)][0], both[(1, False)][0])
    assert train.parse_args(["--no-flip"]).flip is False


def test_a_data_run_never_writes_into_the_demo_folder_and_refuses_another_runs_checkpoint(tmp_path):
    """README "Training": without --out, runs/PRESET_MODEL_DATA; a folder holding another model's, data shape's or
    transport's checkpoint is refused in one line naming both (--resume PATH continues a transport on purpose)."""
    image_folder(tmp_path / "images")
    with pytest.warns(UserWarning, match="truncated.png"):
        pixel_latents(tmp_path / "pix", tmp_path / "images")
    args = train.parse_args(["--data", str(tmp_path / "pix"), "--model", "TiT-T/4", "--preset", "multistep"])
    assert args.out == os.path.join("runs", "multistep_TiT-T-4_pix") and args.max_steps == 500_000
    assert train.parse_args(["--data", "d", "--model", "TiT-T/4", "--preset", "fewstep"]).max_steps == 50_000
    assert train.parse_args(["--data", "d", "--init", "w/SiT-XL-2-REPA.pt"]).out == os.path.join("runs", "custom_SiT-XL-2-REPA_d")
    assert train.parse_args([]).out == "runs/demo"

    common = [sys.executable, os.path.join(HERE, "train.py"), "--data", str(tmp_path / "pix"), *TINY[:-2],
              "--max-steps", "3", "--ckpt-every", "1", "--keep-every", "2"]
    run = subprocess.run([*common, "--model", "TiT-T/4"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "runs" / "custom_TiT-T-4_pix"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["0000002.pt", "0000003.pt", "latest.pt"]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(abs(r["time"] - time.time()) < 600 for r in rows) and [r["step"] for r in rows] == [1, 2, 3]

    other = subprocess.run([*common, "--model", "TiT-T/2", "--out", str(out)], capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 1 and other.stderr.strip() == (
        f"train.py: error: --resume {out / 'checkpoints' / 'latest.pt'}: a checkpoint of model TiT-T/4, data 3×8×8, "
        f"transport Linear, this run is model TiT-T/2, data 3×8×8, transport Linear; give another --out")
    trig = [*common, "--model", "TiT-T/4", "--out", str(out), "--transport", "TrigFlow", "--max-steps", "4"]
    refused = subprocess.run(trig, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and refused.stderr.strip().endswith(
        "give another --out, or --resume PATH to continue it on purpose"), refused.stderr[-2000:]
    on_purpose = subprocess.run([*trig, "--resume", str(out / "checkpoints" / "0000003.pt")], capture_output=True,
                                text=True, timeout=300)
    assert on_purpose.returncode == 0 and "continuing a Linear run with transport TrigFlow" in on_purpose.stdout
    old = torch.load(out / "checkpoints" / "0000004.pt", weights_only=True)  # as written before data_shape existed
    del old["data_shape"]
    old["args"]["model"] = "TiT-T/2"
    torch.save(old, tmp_path / "old.pt")
    older = subprocess.run([*common, "--model", "TiT-T/2", "--out", str(tmp_path / "o"), "--resume",
                            str(tmp_path / "old.pt")], capture_output=True, text=True, timeout=300)
    assert older.returncode == 1 and re.fullmatch(r"train.py: error: --resume \S+old.pt \(for --model TiT-T/2\): key "
                                                  r"'\S+' has shape \(.*\), expected \(.*\)", older.stderr.strip())


def test_latents_without_a_record_need_their_vae_and_unconditional_data_refuses_a_null_label_comparison(tmp_path):
    (tmp_path / "flat").mkdir()  # one folder of images: one class, unconditional
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    data = pixel_latents(tmp_path / "pix", tmp_path / "flat")
    base = ["--data", str(data), "--model", "TiT-T/4", "--max-steps", "1", "--num-workers", "0",
            "--global-batch-size", "8", "--sample-every", "0", "--out", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=r"^--zeta 0.5 with --enhance-style ft-vs-fe: compares the model with itself "
                       r"at the null label, but the data has one class \(unconditional\); use --enhance-style "
                       r"fc-vs-xz, or --zeta 0$"):
        train.main(train.parse_args([*base, "--zeta", "0.5"]))
    train.main(train.parse_args([*base, "--zeta", "0.5", "--enhance-style", "fc-vs-xz"]))
    conditional = ucgm.create_model("TiT-T/4", input_size=8, in_channels=3, num_classes=10)
    torch.save(conditional.state_dict(), tmp_path / "conditional.pt")
    with pytest.raises(ValueError, match=r"a class-conditional model \(10 classes\), the data has one class"):
        train.main(train.parse_args([*base[:-1], str(tmp_path / "init"), "--init", str(tmp_path / "conditional.pt")]))
    (data / ucgm.LATENTS_INFO).unlink()  # a folder from before the records: --vae as before
    with pytest.raises(ValueError, match=rf"--vae sdvae decodes 4-channel latents, the data has 3$"):
        train.main(train.parse_args([*base, "--vae", "sdvae", "--resume", "none"]))


def test_another_number_of_processes_reads_the_same_global_batches():
    """README "Several nodes": the global batch of a step is the same examples for any number of processes (its
    slices per rank), so a run resumes on another world size; t and noise are drawn per (seed, rank, step), so the
    losses then differ from those of the unchanged world size."""
    one = list(train.StepBatches(100, 12, 0, 1, seed=3, start_step=0, max_steps=20))
    two = [list(train.StepBatches(100, 12, r, 2, seed=3, start_step=0, max_steps=20)) for r in range(2)]
    assert [a + b for a, b in zip(*two)] == one  # the run: test_two_process_torchrun_trains_and_checkpoints


def test_optional_trackers_are_imported_only_when_asked_for(tmp_path, monkeypatch):
    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(log=lambda d, step: logged.append((step, d))))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = argparse.Namespace(out=str(tmp_path), wandb="proj", tensorboard=False)
    train.open_tracker(args)({"step": 3, "loss": 0.5, "time": 1.0, "note": "text"})
    assert logged == [(3, {"loss": 0.5, "time": 1.0})]
    assert json.loads((tmp_path / "log.jsonl").read_text())["loss"] == 0.5
    scalars = []
    board = types.SimpleNamespace(add_scalar=lambda key, value, step: scalars.append((key, value, step)),
                                  flush=lambda: scalars.append("flushed"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=lambda d: board))
    train.open_tracker(argparse.Namespace(out=str(tmp_path), wandb=None, tensorboard=True))({"step": 4, "fid": 9.5})
    assert scalars == [("fid", 9.5, 4), "flushed"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ValueError, match=r"^--wandb: needs the optional package wandb \(pip install wandb\)$"):
        train.open_tracker(args)
    imported = subprocess.run([sys.executable, "-c", "import sys, train; print(sorted({'wandb', "
                               "'torch.utils.tensorboard'} & set(sys.modules)))"], cwd=HERE, capture_output=True,
                              text=True, timeout=120)
    assert imported.stdout.strip() == "[]", imported.stderr[-2000:]


def test_fid_during_training_equals_fid_py_on_sample_py_samples(tmp_path, inception_file):
    """--fid-every: every rank samples its share and the feature sums meet in an all-reduce; the number equals
    fid.py's on the same samples drawn by sample.py from the saved EMA (same noise, labels and UCGM-S preset)."""
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (6, 24, 24, 3), dtype=np.uint8))
    fid_flags = ["--fid-every", "2", "--fid-samples", "6", "--fid-ref", str(tmp_path / "ref.npz"),
                 "--inception-weights", str(inception_file)]
    run = run_train(tmp_path / "run", "--max-steps", "2", "--global-batch-size", "8", *fid_flags, torchrun=2)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    scores = [r["fid"] for r in rows if "fid" in r]
    assert len(scores) == 1 and rows[-1]["fid_samples"] == 6
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "run" / "checkpoints" / "latest.pt"), "--num-samples",
                                   "6", "--batch-size", "3", "--out", str(tmp_path / "s")]))
    inception = fid.load_inception(str(inception_file))
    expected = fid.compute_metrics(str(tmp_path / "s" / "samples.npz"), str(tmp_path / "ref.npz"), inception)["fid"]
    assert math.isclose(scores[0], expected, rel_tol=1e-4), (scores[0], expected)


def test_latest_is_a_copy_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    def refuse(source, target):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(os, "link", refuse)
    for step in (1, 2):
        train.save_checkpoint({"step": step}, str(tmp_path), step, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000002.pt", "latest.pt"]
    assert torch.load(tmp_path / "latest.pt", weights_only=True) == {"step": 2}


def test_every_collective_takes_a_tensor_on_the_process_device(monkeypatch):
    """NCCL has no CPU tensors: the scripts reduce through ucgm.all_reduce, which moves the value to the device."""
    seen = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op: seen.append((tensor.device, op)))
    for value in (3, torch.tensor(2.5)):
        assert ucgm.all_reduce(value, torch.device("meta"), "max").device.type == "meta"
    assert seen == [(torch.device("meta"), torch.distributed.ReduceOp.MAX)] * 2
    for script in ("train.py", "sample.py", "extract_latents.py", "fid.py"):
        with open(os.path.join(HERE, script)) as f:
            assert not re.search(r"(?<!ucgm\.)\b(all_reduce|all_gather|reduce|broadcast|gather|scatter)\(", f.read()), script


def saved_bytes_per_image(model, precision, compiled=False):
    """What the grad forward saves for the backward (saved-tensor hooks, each storage once, parameters aside) per
    image: batch 2 minus batch 1."""
    for block in model.blocks if compiled else ():  # what is saved is the min-cut partitioner's choice, which
        block.compile(dynamic=False, backend="aot_eager_decomp_partition")  # inductor's (same bytes) keeps, 8x faster
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []
    for n in (1, 2):
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor
        x = torch.randn(n, model.in_channels, model.input_size, model.input_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, torch.rand(n), torch.arange(n))
        out.float().sum().backward()
        saved.append(sum(storages.values()))
    return saved[1] - saved[0]


@pytest.mark.parametrize("name, precision, compiled", [
    ("TiT-S/1", "bf16", False), ("TiT-S/1", "fp32", False), ("DiT-S/1", "bf16", False), ("DiT-S/1", "fp32", False),
    ("LightningDiT-S/1", "bf16", False), ("LightningDiT-S/1", "fp32", False), ("TiT-S/1", "bf16", True)])
def test_saved_bytes_match_the_memory_estimate(name, precision, compiled):
    """train.SAVED_BYTES (bytes per image, token, block and unit of width) against a measurement (README, "Memory")."""
    torch._dynamo.reset()
    model = ucgm.create_model(name, input_size=16, in_channels=32, depth=2)  # 256 tokens, as TiT-XL/1 at 256 px
    measured = saved_bytes_per_image(model, precision, compiled)
    estimate = [train.memory_estimate(model, n, precision, compiled, False, False) for n in (1, 2)]
    assert abs(estimate[1] - estimate[0] - measured) < 0.03 * measured, (measured, estimate[1] - estimate[0])


def test_what_fits_names_the_flags_that_bring_the_estimate_under_the_memory():
    with torch.device("meta"):
        model = ucgm.create_model("TiT-XL/1", input_size=16, in_channels=32)
    args = train.parse_args(["--data", "d", "--global-batch-size", "1024", "--grad-accum", "1"])
    setting = dict(precision="bf16", compiled=False, teacher=True)
    per_image = train.memory_estimate(model, 2, **setting, grad_checkpoint=False) - \
        train.memory_estimate(model, 1, **setting, grad_checkpoint=False)
    budget = train.memory_estimate(model, 50, **setting, grad_checkpoint=False) + per_image // 2  # 50 images fit
    assert train.what_fits(model, args, 128, budget, **setting) == \
        "--grad-checkpoint or --grad-accum 4 or --global-batch-size 400"  # 8 processes: 32 and 50 images
    assert "--grad-checkpoint" not in train.what_fits(model, args, 128, budget // 10, **setting)
    with pytest.raises(ValueError, match=r"^CUDA out of memory in the first step \(128 images\): --grad-accum 2 fits$"):
        with train.first_step_memory(True, lambda: "--grad-accum 2", "128 images"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.OutOfMemoryError):  # a later step's error is left as it is
        with train.first_step_memory(False, lambda: "", ""):
            raise torch.OutOfMemoryError("CUDA out of memory")


def test_step_batches_shard_the_global_batch():
    one = list(train.StepBatches(100, 8, 0, 1, seed=3, start_step=0, max_steps=30))
    ranks = [list(train.StepBatches(100, 8, r, 2, seed=3, start_step=0, max_steps=30)) for r in range(2)]
    for step in range(30):
        assert ranks[0][step] + ranks[1][step] == one[step]  # disjoint slices of one global batch
    per_epoch = 100 // 8
    epoch0 = [i for b in one[:per_epoch] for i, _ in b]
    assert len(set(epoch0)) == len(epoch0)  # no repeats inside an epoch
    assert [i for i, _ in one[per_epoch]] != [i for i, _ in one[0]]  # reshuffled for the next epoch
    resumed = list(train.StepBatches(100, 8, 0, 1, seed=3, start_step=17, max_steps=30))
    assert resumed == one[17:]


def test_demo_digits_are_bold_deterministic_and_fill_the_square():
    data = train.DigitsDataset(seed=3)
    images = torch.stack([torch.from_numpy(train.render_digit(i, data.size, 3)).permute(2, 0, 1) for i in range(30)])
    train.render_digit.cache_clear()  # a fresh rendering
    again = torch.stack([torch.from_numpy(train.render_digit(i, data.size, 3)).permute(2, 0, 1) for i in range(30)])
    assert images.shape == (30, 3, 24, 24) and images.dtype == torch.uint8 and torch.equal(images, again)
    assert [int(data[(i, False)][1]) for i in range(30)] == [i % 10 for i in range(30)]
    torch.testing.assert_close(data[(7, False)][0], images[7].float() / 127.5 - 1)  # what training reads
    for image in images.int():
        gray = image.sum(0)
        ink = gray < (gray.max() + gray.min()) / 2  # dark ink on a light background
        rows = ink.any(1).nonzero()
        assert rows.max() - rows.min() + 1 >= 15 and 0.1 < ink.float().mean() < 0.5  # tall, bold, not a blot


def test_presets_and_demo_defaults_resolve():
    args = train.parse_args(["--preset", "fewstep", "--zeta", "1.5", "--data", "somewhere"])
    assert (args.lam, args.zeta, args.optimizer, args.huber_c, args.teacher_decay, args.grad_clip) == \
        (1.0, 1.5, "radam", 5.0, 1.0, 0.1)
    assert args.model == "TiT-XL/1" and args.global_batch_size == 1024
    demo = train.parse_args(["--lam", "0.5"])
    assert demo.model == "TiT-T/4" and demo.lam == 0.5 and demo.zeta == 0.0 and demo.max_steps == 1800
    assert demo.global_batch_size == 48
    assert demo.weighting is None and demo.lr == 2e-3 and demo.sample_cfg == 3.5
    multistep = train.parse_args(["--preset", "multistep", "--weighting", "none"])
    assert multistep.zeta == 0.47 and multistep.cosine_loss and multistep.weighting is None


# configs/tuning_few_steps/*.yaml transcribed: (preset, transport of the --init weights, {released key: value}); the
# batch and steps (train.global_batch_size, max_steps, ckpt_every) from LINs-lab/UCGM's own configs, the loss and
# optimiser from the later released trainer's (EDM2: all from it); README "API" maps each key to its flag
RELEASED_TUNING = [
    ("tune-lightningdit", "ReLinear", dict(enhanced_ratio=3.0, global_batch_size=1024, max_steps=800, ckpt_every=800,
                                           type="RAdam")),
    ("tune-repa", "Linear", dict(enhanced_ratio=1.7, global_batch_size=1024, max_steps=800, ckpt_every=800,
                                 type="CLion")),
    ("tune-repae", "Linear", dict(enhanced_ratio=2.5, global_batch_size=1024, max_steps=500, ckpt_every=500,
                                  type="RAdam")),
    ("tune-ddt", "ReLinear", dict(enhanced_ratio=1.9, global_batch_size=512, max_steps=800, ckpt_every=800,
                                  type="RAdam")),
    ("tune-edm2", "EDM", dict(enhanced_ratio=1.7, global_batch_size=1024, max_steps=800, ckpt_every=800, type="RAdam"))]
RELEASED_TUNING_COMMON = dict(lab_drop_ratio=0.1, consistc_ratio=1.0, enhanced_style="fc-vs-fe", scaled_cbl_eps=5.0,
                              ema_decay_rate=1.0, enhanced_range=[0.0, 0.75], time_dist_ctrl=[0.8, 1.0, 1.0],
                              weight_funcion="Cosine", wt_cosine_loss=False, lr=0.0001, weight_decay=0.0, beta1=0.9,
                              beta2=0.999, max_grad_norm=0.1, ema_decay=0.99, log_every=100)


@pytest.mark.parametrize("preset, transport, released", RELEASED_TUNING)
def test_tuning_presets_are_the_released_tuning_configs(preset, transport, released, tmp_path):
    """train.py --preset tune-*: every setting of the released tuning config, under the README's names, and the
    transport of the start weights (a bare LightningDiT or DDT state dict implies ReLinear)."""
    c = {**RELEASED_TUNING_COMMON, **released}
    args = train.parse_args(["--preset", preset, "--data", "somewhere"])
    got = (args.lam, args.zeta, args.enhance_style, args.huber_c, args.teacher_decay, list(args.enhance_range),
           list(args.time_dist), args.weighting, args.cosine_loss, args.label_drop, args.optimizer, args.lr,
           args.weight_decay, list(args.betas), args.grad_clip, args.ema_decay, args.global_batch_size, args.max_steps,
           args.ckpt_every, args.log_every)
    want = (c["consistc_ratio"], c["enhanced_ratio"], c["enhanced_style"], c["scaled_cbl_eps"], c["ema_decay_rate"],
            c["enhanced_range"], c["time_dist_ctrl"], c["weight_funcion"].lower(), c["wt_cosine_loss"],
            c["lab_drop_ratio"], c["type"].lower(), c["lr"], c["weight_decay"], [c["beta1"], c["beta2"]],
            c["max_grad_norm"], c["ema_decay"], c["global_batch_size"], c["max_steps"], c["ckpt_every"],
            c["log_every"])
    assert got == want
    released_epochs = {"tune-lightningdit": 0.64, "tune-repa": 0.64, "tune-repae": 0.40, "tune-ddt": 0.32}  # its README
    if preset in released_epochs:  # batch × steps over ImageNet-1k's 1,281,167 training images
        assert round(args.global_batch_size * args.max_steps / 1_281_167, 2) == released_epochs[preset]
    family = {"tune-lightningdit": "LightningDiT", "tune-ddt": "DDT", "tune-edm2": "EDM2"}.get(preset, "DiT")
    assert ucgm.FAMILY_SETTINGS[family].get("transport", "Linear") == transport


def test_cautious_lion_steps_match_a_hand_computation():
    """--optimizer clion: two steps of the cautious Lion update against numpy."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 3))
    grads = [torch.randn(5, 3), torch.randn(5, 3)]
    opt = train.CautiousLion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)
    w, m = p.detach().numpy().astype(np.float64).copy(), np.zeros((5, 3))
    for g in grads:
        p.grad = g.clone()
        opt.step()
        g = g.numpy().astype(np.float64)
        w = w * (1 - 0.1 * 0.01)
        u = np.sign(0.9 * m + 0.1 * g)
        mask = (u * g > 0).astype(np.float64)
        w = w - 0.1 * u * mask * mask.size / (mask.sum() + 1)
        m = 0.99 * m + 0.01 * g
    np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), m, rtol=1e-5, atol=1e-7)


def test_latent_dataset_reads_normalised_shards(tmp_path):
    latents, flipped = torch.randn(6, 4, 2, 2), torch.randn(6, 4, 2, 2)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    ucgm.save_safetensors({"latents": latents[:4], "latents_flip": flipped[:4], "labels": labels[:4]},
                          tmp_path / "shard_000.safetensors")
    ucgm.save_safetensors({"latents": latents[4:], "latents_flip": flipped[4:], "labels": labels[4:]},
                          tmp_path / "shard_001.safetensors")
    mean, std = torch.randn(1, 4, 1, 1), torch.rand(1, 4, 1, 1) + 0.5
    torch.save({"mean": mean, "std": std}, tmp_path / "latents_stats.pt")
    data = train.LatentDataset(str(tmp_path), multiplier=0.5)
    assert len(data) == 6 and data.num_classes == 6 and (data.channels, data.size) == (4, 2)
    x, y = data[(5, False)]
    torch.testing.assert_close(x, (latents[5] - mean[0]) / std[0] * 0.5)
    x, y = data[(1, True)]
    torch.testing.assert_close(x, (flipped[1] - mean[0]) / std[0] * 0.5)
    assert y == 1


def test_safetensors_roundtrip_and_truncation(tmp_path):
    tensors = {"f32": torch.randn(3, 2), "f16": torch.randn(4).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32), "u8": torch.arange(7, dtype=torch.uint8)}
    path = tmp_path / "t.safetensors"
    ucgm.save_safetensors(tensors, path)
    back = ucgm.load_safetensors(path)
    assert all(torch.equal(tensors[k], back[k]) and tensors[k].dtype == back[k].dtype for k in tensors)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    with pytest.raises(ValueError, match=r"tensor 'u8': data_offsets \[92, 99\] are not \[start, end\] inside the 94-byte"):
        ucgm.load_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:20])
    with pytest.raises(ValueError, match="truncated"):
        ucgm.load_safetensors(tmp_path / "head.safetensors")


def test_numerics_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = run_train(tmp_path, "--max-steps", "20", "--ckpt-every", "1", "--lr", "1e30", "--max-bad-steps", "3")
    assert run.returncode != 0 and "consecutive non-finite" in run.stderr
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    with open(tmp_path / "log.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    assert last["skipped"] == 2 and last["loss"] is None and state["step"] == 1  # step 1 was the last good one
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def bad_train_input(tmp_path, *flags):
    """train.py's one-line error for flags that must be refused before any training."""
    with pytest.raises(ValueError) as error:
        train.main(train.parse_args(["--out", str(tmp_path / "out"), *TINY, "--max-steps", "1", *flags]))
    assert "\n" not in str(error.value)
    return str(error.value)


def test_bad_train_input_is_refused_with_one_clear_line(tmp_path):
    run = run_train(tmp_path / "run", "--data", str(tmp_path / "missing"))
    assert run.returncode != 0 and run.stderr.strip().splitlines() == \
        [f"train.py: error: --data {tmp_path / 'missing'}: expected a folder of latent shards (*.safetensors), found none"]
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, size in enumerate((4, 2)):
        ucgm.save_safetensors({"latents": torch.randn(4, 4, size, size), "latents_flip": torch.randn(4, 4, size, size),
                               "labels": torch.arange(4)}, shards / f"latents_{i:05d}.safetensors")
    assert "latents of shapes" in bad_train_input(tmp_path, "--data", str(shards))
    (shards / "latents_00000.safetensors").unlink()  # 2×2 latents left
    assert bad_train_input(tmp_path, "--data", str(shards)) == (
        f"--data {shards}: expected {shards / 'latents_stats.pt'} (written last by extract_latents.py); give "
        "--latent-stats FILE, or --latent-stats none for raw latents")  # an unfinished extraction is not trained on
    assert "patch size does not divide" in bad_train_input(tmp_path, "--data", str(shards), "--model", "TiT-T/4",
                                                           "--latent-stats", "none")
    assert bad_train_input(tmp_path, "--data", str(shards), "--latent-stats", str(tmp_path / "nowhere.pt")) == \
        f"--latent-stats {tmp_path / 'nowhere.pt'}: no such file"
    other = ucgm.create_model("DiT-T/2", input_size=32, in_channels=3, num_classes=10)
    torch.save({"model": other.state_dict()}, tmp_path / "other.pt")
    assert "--init" in bad_train_input(tmp_path, "--init", str(tmp_path / "other.pt"), "--model", "TiT-T/4")
    assert "must divide" in bad_train_input(tmp_path, "--grad-accum", "3")


def test_setup_distributed_on_a_gpu_node(monkeypatch):
    """A process seeing one GPU (SLURM --gpus-per-task=1) takes cuda:0 whatever its LOCAL_RANK; TF32 is on through the
    switches whose getters still read (the new fp32_precision ones alone make them raise), and fid.full_fp32 turns
    it off and back; the allocator and compile-worker defaults are set unless the user set them."""
    for name, value in [("LOCAL_RANK", "3"), ("LOCAL_WORLD_SIZE", "4"), ("OMP_NUM_THREADS", "2")]:
        monkeypatch.setenv(name, value)
    for name in ("RANK", "TORCHINDUCTOR_COMPILE_THREADS", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # recorded, so that the test leaves the environment as it found it
        monkeypatch.delenv(name)
    devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    with fid.full_fp32():  # and restores the precision of this process after it
        assert ucgm.setup_distributed() == (0, 1, torch.device("cuda:0")) and devices == [torch.device("cuda:0")]
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        assert (torch.get_float32_matmul_precision(), matmul.allow_tf32, cudnn.allow_tf32) == ("high", True, True)
        with fid.full_fp32():
            assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("highest", False)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("high", True)
    assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == str(max(1, os.cpu_count() // 4))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "7")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")  # the newer name of the same setting
    ucgm.process_defaults(4)
    assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "7" and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_missing_shards_are_dealt_evenly_after_an_uneven_resume(tmp_path):
    """Shards 0, 2, 4, 6, 8 of 10 on disk (rank 0 of 2 finished its k mod 2 share): the five missing ones are dealt
    3 and 2, where k mod 2 would leave all five to rank 1; with nothing on disk the deal is k mod world."""
    path_of = lambda k: str(tmp_path / f"{k:06d}.safetensors")  # noqa: E731
    for k in range(0, 10, 2):
        open(path_of(k), "w").close()
    assert [ucgm.missing_shards(10, path_of, rank, 2) for rank in (0, 1)] == [[1, 5, 9], [3, 7]]
    fresh = lambda k: str(tmp_path / "none" / str(k))  # noqa: E731
    assert [ucgm.missing_shards(10, fresh, rank, 3) for rank in range(3)] == [list(range(r, 10, 3)) for r in range(3)]


def counting_compile(monkeypatch):
    """Module.compile with a backend that keeps each graph dynamo hands it and counts the calls of each compiled
    piece, which it runs as traced (no code generation): (graphs, calls)."""
    graphs, calls = [], []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return lambda *inputs: calls.append(graph) or graph.forward(*inputs)
    compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **settings: compile(self, backend=backend, **settings))
    return graphs, calls


def test_compiled_blocks_stay_whole_graphs_under_ddp(tmp_path, monkeypatch):
    """Under DDP, train.compile_blocks hands dynamo's backend each block whole (one graph); with
    DDPOptimizer (optimize_ddp, on by default) the same forward reaches it in pieces cut at DDP's bucket boundaries
    (the first bucket holds 1 MiB, a TiT-S block ~10 MB). A one-process gloo group: DDPOptimizer cuts alike for any
    number of processes (it acts on the DDP module that runs the forward)."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        with torch._dynamo.config.patch(optimize_ddp=True):  # the default, restored after the test
            pieces, (graphs, calls) = [], counting_compile(monkeypatch)
            per_block = lambda net: [block.compile(dynamic=False) for block in net.blocks]  # noqa: E731
            for compile_blocks in (train.compile_blocks, per_block):
                torch._dynamo.reset()
                graphs.clear(), calls.clear()
                torch._dynamo.config.optimize_ddp = True  # the default
                model = ucgm.create_model("TiT-S/4", input_size=8, in_channels=3, num_classes=10, depth=1)
                compile_blocks(model)
                net = torch.nn.parallel.DistributedDataParallel(model)
                UCGM().loss(net, torch.randn(4, 3, 8, 8), torch.arange(4)).backward()
                assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
                pieces.append((len(graphs), len(calls)))
    finally:
        torch.distributed.destroy_process_group()
    assert pieces[0] == (1, 1)  # the block whole, in one graph
    assert pieces[1][0] > 1 and pieces[1][1] > 1, pieces  # DDPOptimizer's pieces


@pytest.mark.parametrize("name, size, graphs", [("TiT-T/4", 16, 1), ("DDT-T/2", 8, 2), ("EDM2-T", 8, 5)])
def test_each_block_runs_compiled_after_one_step(name, size, graphs, monkeypatch):
    """One λ = 0 step after train.compile_blocks: every block call runs a compiled graph, with no graph break;
    TiT's blocks share one graph, DDT's encoder and decoder blocks one each; a one-level EDM2 has its input conv
    and 5 blocks of 4 kinds that share one forward (a 64-px EDM2 ~20 kinds, past dynamo's default limit of 8
    recompiles): under a limit of 2, two would run eager had compile_blocks not raised it."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    compiled, calls = counting_compile(monkeypatch)
    levels = {"channel_mult": (1,)} if name.startswith("EDM2") else {}
    model = ucgm.create_model(name, input_size=size, in_channels=3, num_classes=10, **levels)
    with config.patch(**{limit: 2}):  # restored after the test, with what compile_blocks raises it to
        train.compile_blocks(model)
        UCGM().loss(model, torch.randn(2, 3, size, size), torch.arange(2)).backward()
    assert dict(counters["graph_break"]) == {} and len(calls) == len(model.blocks)
    assert len(compiled) == graphs


@pytest.mark.parametrize("lam, zeta, style, forwards", [(0.0, 0.0, None, 3), (0.0, 0.5, None, 4), (0.5, 0.5, None, 5),
                                                         (1.0, 2.0, None, 6), (1.0, 2.0, "fc-vs-fe", 7)])
def test_mfu_counts_every_forward_of_a_step(lam, zeta, style, forwards):
    """train.py's FLOPs per step, in forwards of the batch (a backward counts 2): the rows a network is asked for
    under grad (× 3) and without it (the λ passes of Alg. 1 l.9-13, the teacher of l.6)."""
    rows = collections.Counter()

    class Counting(nn.Module):
        num_classes = 10

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x, t, y):
            rows[torch.is_grad_enabled()] += len(x)
            return self.scale * x
    trainer = UCGM(lam=lam, zeta=zeta, teacher_decay=0.0, enhance_style=style)
    trainer.loss(Counting(), torch.randn(8, 2), torch.arange(8)).backward()
    assert (3 * rows[True] + rows[False]) / 8 == 3 + sum(train.no_grad_passes(trainer)) == forwards


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The most bytes that the tensors made inside held at one time (each storage once, until it is freed)."""
    def __init__(self):
        super().__init__()
        self.live, self.peak, self.storages = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            storage = tensor.untyped_storage() if isinstance(tensor, torch.Tensor) else None
            if storage is not None and storage.nbytes() and storage.data_ptr() not in self.storages:
                self.storages.add(storage.data_ptr())
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self.free, storage.data_ptr(), storage.nbytes())
        return out

    def free(self, pointer, nbytes):
        self.storages.discard(pointer)
        self.live -= nbytes


@pytest.mark.parametrize("name, precision", [("TiT-S/1", "bf16"), ("DiT-S/1", "fp32")])
def test_memory_estimate_holds_the_largest_no_grad_pass_and_the_autoencoder(name, precision):
    """A no-grad forward of 2n rows (λ = 1's central difference, fc-vs-fe's teacher) holds at most what the estimate
    adds for it, and not twice as much; the autoencoder's weights add their bytes."""
    model = ucgm.create_model(name, input_size=16, in_channels=32, depth=1).requires_grad_(False)  # 256 tokens
    peaks = []
    for n in (2, 4):  # two rows more: what no_grad_rows=2 adds for one image
        with LiveBytes() as live, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(torch.randn(n, 32, 16, 16), torch.rand(n), torch.arange(n))
        peaks.append(live.peak)
    setting = dict(precision=precision, compiled=False, grad_checkpoint=False, teacher=False)
    added = train.memory_estimate(model, 1, **setting, no_grad_rows=2) - train.memory_estimate(model, 1, **setting)
    assert peaks[1] - peaks[0] <= added < 2 * (peaks[1] - peaks[0]), (peaks[1] - peaks[0], added)
    assert train.memory_estimate(model, 3, **setting, autoencoder=12345) - train.memory_estimate(model, 3, **setting) \
        == 12345


#################################################################################
#                                   sample.py                                   #
#################################################################################



def tiny_checkpoint(path, lam=0.0):
    """Our checkpoint format for a TiT-T/4 on 3×16×16 pixels with 10 classes."""
    torch.manual_seed(0)
    model = ucgm.create_model("TiT-T/4", input_size=16, in_channels=3, num_classes=10)
    with torch.no_grad():  # leave the zero-initialised output, so that samples depend on the weights
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    args = vars(train.parse_args(["--lam", str(lam)]))
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": args, "step": 1,
                "latent_stats": {"mean": torch.zeros(3, 1, 1), "std": torch.ones(3, 1, 1)}}, path)
    return model


def run_sample(out, *flags, torchrun=0, wait=True, threads=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    cmd = launcher + [os.path.join(HERE, "sample.py"), "--out", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_sample_py_is_the_same_for_any_process_count_and_after_a_kill(tmp_path):
    tiny_checkpoint(tmp_path / "ck.pt")
    flags = ["--ckpt", str(tmp_path / "ck.pt"), "--num-samples", "30", "--batch-size", "4", "--steps", "3",
             "--rho", "0.5"]  # stochastic steps: their noise must also be fixed per shard
    single = run_sample(tmp_path / "one", *flags)  # every run here has one thread per process: same arithmetic
    assert single.returncode == 0, single.stderr[-3000:]
    one = np.load(tmp_path / "one" / "samples.npz")
    assert one["arr_0"].shape == (30, 16, 16, 3) and one["arr_0"].dtype == np.uint8
    assert one["arr_1"].tolist() == [i % 10 for i in range(30)]  # balanced: three of each class
    assert len(np.unique(one["arr_0"].reshape(30, -1), axis=0)) == 30
    two = run_sample(tmp_path / "two", *flags, torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "two" / "samples.npz")["arr_0"], one["arr_0"])

    killed = run_sample(tmp_path / "killed", *flags, wait=False)
    third = tmp_path / "killed" / "shards" / "000002.safetensors"
    while not third.exists() and killed.poll() is None:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "sample.py ended before it could be killed"
    assert not (tmp_path / "killed" / "samples.npz").exists()
    resumed = run_sample(tmp_path / "killed", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    back = np.load(tmp_path / "killed" / "samples.npz")
    assert np.array_equal(back["arr_0"], one["arr_0"]) and np.array_equal(back["arr_1"], one["arr_1"])
    assert not list((tmp_path / "killed").rglob("*.tmp*"))


def test_merge_streams_the_shards_into_an_npz_that_numpy_and_fid_read(tmp_path):
    rng, _ = np.random.default_rng(0), (tmp_path / "shards").mkdir()
    shards = [rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for n in (4, 4, 3)]  # the last one is short
    for k, images in enumerate(shards):
        ucgm.save_safetensors({"images": torch.from_numpy(images), "labels": torch.arange(4 * k, 4 * k + len(images))},
                              sample.shard_path(tmp_path, k))
    (tmp_path / "samples.npz").write_bytes(b"an older, unfinished file")
    sample.merge(argparse.Namespace(out=str(tmp_path), fid_ref=None), 3)
    expected = np.concatenate(shards)
    with np.load(tmp_path / "samples.npz") as merged:  # the layout np.savez writes: arr_0 images, arr_1 labels
        assert merged["arr_0"].dtype == np.uint8 and np.array_equal(merged["arr_0"], expected)
        assert merged["arr_1"].tolist() == list(range(11))
    batches = fid.npz_batches(str(tmp_path / "samples.npz"), 5)
    assert next(batches) == 11 and np.array_equal(np.concatenate(list(batches)), expected)
    assert (tmp_path / "samples.png").exists() and not list(tmp_path.glob("*.tmp*"))


def test_sample_py_reads_released_checkpoints_and_bare_state_dicts(tmp_path):
    model = tiny_checkpoint(tmp_path / "ours.pt")
    released = {"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "unigen": {},
                "config": {"model": {"type": "TiT-T/4"}, "transport": {"type": "TrigFlow", "consistc_ratio": 1.0},
                           "data": {"latent_multiplier": 1.0}}}
    torch.save(released, tmp_path / "released.pt")
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "released.pt"), "--num-samples", "4",
                                   "--class", "7", "--out", str(tmp_path / "released")]))
    config = json.loads((tmp_path / "released" / "sample.json").read_text())
    assert config["transport"] == "TrigFlow" and config["sampler"]["steps"] == 2  # lam = 1: the few-step preset
    assert np.load(tmp_path / "released" / "samples.npz")["arr_1"].tolist() == [7] * 4
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert ucgm.infer_model(model.state_dict()) == ("TiT-T/4", dict(input_size=16, in_channels=3,
                                                                       learn_sigma=False, num_classes=10))
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "bare.pt"), "--num-samples", "2", "--steps", "2",
                                   "--transport", "Linear", "--out", str(tmp_path / "bare")]))
    bare = np.load(tmp_path / "bare" / "samples.npz")["arr_0"]
    ours = ucgm.UCGM("Linear").sample(model, torch.stack([torch.randn(3, 16, 16, generator=torch.Generator()
                                      .manual_seed(i)) for i in range(2)]), steps=2, kappa=0.5, warp=(1.17, 0.8, 1.1),
                                      y=torch.tensor([0, 1]))
    np.testing.assert_allclose(bare, ucgm.to_uint8(ours).permute(0, 2, 3, 1).numpy(), atol=1)
    lightning = tmp_path / "lightning.pt"  # a bare LightningDiT state dict: ReLinear, guidance on 3 channels
    torch.save(ucgm.create_model("LightningDiT-T/4", input_size=16, in_channels=3, num_classes=10).state_dict(),
               lightning)
    resolved = sample.resolve(sample.parse_args(["--ckpt", str(lightning)]),
                              ucgm.read_checkpoint(str(lightning), "ema", "--ckpt")[1])
    assert resolved["transport"] == ("ReLinear", "checkpoint") and resolved["cfg_channels"] == (3, "checkpoint")


@pytest.mark.parametrize("flags, match", [
    (["--model", "DiT-T/4"], "as --model DiT-T/4"),
    (["--class", "10"], r"--class 10: expected a class id in \[0, 9\]"),
    (["--vae", "sdvae", "--vae-path", "nowhere.bin"], "--vae-path nowhere.bin: no such file"),
    (["--ckpt", "nowhere.pt"], "--ckpt nowhere.pt: no such file")])
def test_sample_py_bad_input_is_refused(tmp_path, flags, match):
    tiny_checkpoint(tmp_path / "ck.pt")
    with pytest.raises(ValueError, match=match):
        sample.main(sample.parse_args(["--ckpt", str(tmp_path / "ck.pt"), "--num-samples", "2", "--out",
                                       str(tmp_path / "out"), *flags]))


def test_pixels_are_truncated_as_adm_or_rounded_as_dit():
    """ADM's clamp((x + 1)·127.5, 0, 255) truncated, and DiT's + 0.5 first (sample.py --dit-rounding)."""
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 2.0])
    want = np.clip((x.numpy().astype(np.float64) + 1) * 127.5, 0, 255)
    assert ucgm.to_uint8(x).tolist() == np.floor(want).astype(int).tolist()
    assert ucgm.to_uint8(x, dit_rounding=True).tolist() == np.floor(np.clip(want + 0.5, 0, 255)).astype(int).tolist()


def test_sample_py_refuses_a_folder_of_another_configuration(tmp_path):
    tiny_checkpoint(tmp_path / "ck.pt")
    flags = ["--ckpt", str(tmp_path / "ck.pt"), "--num-samples", "2", "--steps", "2", "--out", str(tmp_path / "out")]
    sample.main(sample.parse_args(flags))
    with pytest.raises(ValueError, match="another configuration"):
        sample.main(sample.parse_args([*flags, "--seed", "1"]))
    run = run_sample(tmp_path / "x", "--ckpt", str(tmp_path / "ck.pt"), "--num-samples", "0")
    assert run.returncode != 0 and "--num-samples" in run.stderr.strip().splitlines()[-1]


#################################################################################
#                                     fid.py                                    #
#################################################################################



@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random FID-Inception weights in the torchvision / torch-fidelity layout, with realistic BatchNorm stats."""
    torch.manual_seed(0)
    state = {}
    for key, value in fid.FIDInception().state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith(("running_var", "bn.weight")):
            state[key] = torch.rand_like(value) + 0.5
        elif key.endswith(("running_mean", "bn.bias")):
            state[key] = 0.1 * torch.randn_like(value)
        else:  # He-scaled convolutions keep the activations of order one through the 94 layers
            state[key] = torch.randn_like(value) * (2 / value[0].numel()) ** 0.5
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return str(path)


def random_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 5))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    var1, var2, shift = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5), rng.normal(size=5)
    closed = shift @ shift + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()  # diagonal covariances
    assert fid.frechet_distance(shift, np.diag(var1), np.zeros(5), np.diag(var2)) == pytest.approx(closed, rel=1e-9)
    b = rng.normal(size=(50, 5)) * 2 + 1
    mu2, sigma2 = b.mean(0), np.cov(b, rowvar=False)
    assert fid.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(fid.frechet_distance(mu2, sigma2, mu, sigma))
    singular1, singular2 = np.diag([1.0, 0, 0]), np.diag([4.0, 0, 0])  # rank one: (√1 − √4)² = 1
    assert fid.frechet_distance(np.zeros(3), singular1, np.zeros(3), singular2) == pytest.approx(1.0, abs=1e-9)
    c, d = rng.normal(size=(300, 64)), rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) * 0.3  # against sqrtm
    s1, s2 = np.cov(c, rowvar=False), np.cov(d, rowvar=False)
    by_sqrtm = np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid.frechet_distance(np.zeros(64), s1, np.zeros(64), s2) == pytest.approx(by_sqrtm, rel=1e-9)
    with pytest.raises(ValueError, match="different dimensions"):
        fid.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


def test_tf1_bilinear_resize_matches_a_numpy_loop():
    x = np.random.default_rng(0).uniform(0, 255, (1, 2, 13, 20)).astype(np.float32)
    out = np.empty((1, 2, 299, 299))
    for i in range(299):  # source = out_index · in/out, no half-pixel offset; the upper neighbour clamps
        sy = i * 13 / 299
        y0, wy = int(sy), sy - int(sy)
        y1 = min(y0 + 1, 12)
        for j in range(299):
            sx = j * 20 / 299
            x0, wx = int(sx), sx - int(sx)
            x1 = min(x0 + 1, 19)
            top = x[..., y0, x0] * (1 - wx) + x[..., y0, x1] * wx
            bottom = x[..., y1, x0] * (1 - wx) + x[..., y1, x1] * wx
            out[..., i, j] = top * (1 - wy) + bottom * wy
    np.testing.assert_allclose(fid.resize_tf1(torch.from_numpy(x)).numpy(), out, atol=2e-3)
    same = torch.rand(1, 3, 299, 299)
    torch.testing.assert_close(fid.resize_tf1(same), same)


def test_inception_weight_layouts_give_identical_features(inception_file, tmp_path):
    model = fid.load_inception(inception_file)
    state = model.state_dict()  # torchvision's inception_v3(num_classes=1008, aux_logits=False) layout
    assert len(state) == 566 and sum(p.numel() for p in model.parameters()) == 23_850_960
    wrapper = {}
    for key, value in torch.load(inception_file, weights_only=True).items():
        block = next((b for b, name in fid.PYTORCH_FID_BLOCKS.items() if key.startswith(name)), None)
        if block is not None:  # pytorch-fid's InceptionV3 wrapper: blocks.i.j, no classifier
            wrapper[block + key.split(".", 1)[1]] = value
    assert len(wrapper) == 566 - 94 - 2  # no num_batches_tracked (94 BatchNorms), no fc
    torch.save(wrapper, tmp_path / "pytorch_fid_wrapper.pth")
    images = random_images(3, 40)
    ours = fid.extract_features(model, images, progress=False)
    theirs = fid.extract_features(fid.load_inception(str(tmp_path / "pytorch_fid_wrapper.pth")), images, progress=False)
    assert np.array_equal(ours["pool"], theirs["pool"]) and np.array_equal(ours["spatial"], theirs["spatial"])
    assert ours["pool"].shape == (3, 2048) and ours["spatial"].shape == (3, 7 * 17 * 17)
    assert ours["logits"].shape == (3, 1008) and theirs["logits"] is None
    assert ours["pool"].std(0).mean() > 1e-3  # the random network still tells images apart
    torch.save({"blocks.0.0.conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: key 'Conv2d_1a_3x3.conv.weight' has shape"):
        fid.load_inception(str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="nothing is downloaded"):
        fid.load_inception(None)


def test_inception_score_and_precision_recall_limits():
    assert fid.inception_score(np.zeros((100, 1008)))[0] == pytest.approx(1.0)
    confident = np.full((100, 1008), -1e4)
    confident[np.arange(100), np.arange(100) % 2] = 0  # two equally used classes, each certain: IS = 2
    assert fid.inception_score(confident)[0] == pytest.approx(2.0)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    assert fid.precision_recall(a, a) == (1.0, 1.0)
    assert fid.precision_recall(a, a + 100) == (0.0, 0.0)
    radii = fid.manifold_radii(torch.from_numpy(a).float()).numpy()  # against the brute-force 3rd-nearest-neighbour distance
    d = ((a[:, None] - a[None]) ** 2).sum(-1)
    np.testing.assert_allclose(radii, np.sort(d, axis=1)[:, 3], rtol=1e-4)


def test_folder_npz_and_metrics_end_to_end(inception_file, tmp_path):
    model = fid.load_inception(inception_file)
    images = random_images(6, 32, seed=1)
    (tmp_path / "folder").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "folder" / f"{i:03d}.png")
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=np.arange(6))
    from_folder = fid.extract_features(model, str(tmp_path / "folder"), batch_size=4, progress=False)
    from_npz = fid.extract_features(model, str(tmp_path / "samples.npz"), batch_size=4, progress=False)
    assert all(np.array_equal(from_folder[k], from_npz[k]) for k in from_folder)
    np.savez(tmp_path / "ref.npz", arr_0=images)  # an ADM-style batch with images only
    metrics = fid.compute_metrics(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), model)
    assert abs(metrics["fid"]) < 1e-3 and abs(metrics["sfid"]) < 1e-3
    assert metrics["precision"] == metrics["recall"] == 1.0 and metrics["inception_score"] >= 1.0
    fid.main(fid.parse_args(["--save-stats", str(tmp_path / "folder"), str(tmp_path / "stats.npz"),
                             "--inception-weights", inception_file]))
    with np.load(tmp_path / "stats.npz") as stats:
        np.testing.assert_allclose(stats["mu"], from_npz["pool"].mean(0))
        assert stats["sigma"].shape == (2048, 2048) and stats["pool"].shape == (6, 2048)
    again = fid.compute_metrics(images, str(tmp_path / "stats.npz"), model)
    assert again["fid"] == pytest.approx(metrics["fid"], abs=1e-6)


def test_save_stats_crops_a_folder_as_extraction_does(inception_file, tmp_path):
    """README "Your own data": fid.py --save-stats FOLDER OUT --image-size S writes the reference of the training
    images at the ADM centre crop extract_latents.py uses; a file source with --image-size is refused."""
    rng = np.random.default_rng(2)
    (tmp_path / "own").mkdir()
    crops = []
    for i, (h, w) in enumerate([(40, 57), (64, 33), (35, 35)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "own" / f"{i}.png")
        with Image.open(tmp_path / "own" / f"{i}.png") as image:
            crops.append(np.asarray(ucgm.center_crop(image.convert("RGB"), 24)))
    fid.main(fid.parse_args(["--save-stats", str(tmp_path / "own"), str(tmp_path / "own.npz"), "--image-size", "24",
                             "--inception-weights", inception_file]))
    expected = fid.extract_features(fid.load_inception(inception_file), np.stack(crops), progress=False)["pool"]
    with np.load(tmp_path / "own.npz") as stats:
        np.testing.assert_allclose(stats["mu"], expected.mean(0), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match=r"--image-size 24: crops the images of a folder, but .*own.npz is not one"):
        fid.main(fid.parse_args(["--save-stats", str(tmp_path / "own.npz"), str(tmp_path / "x.npz"), "--image-size",
                                 "24", "--inception-weights", inception_file]))


def test_fid_bad_input_is_refused(inception_file, tmp_path):
    model = fid.load_inception(inception_file)
    with pytest.raises(ValueError, match="expected uint8 images"):
        fid.extract_features(model, random_images(2).astype(np.float32), progress=False)
    with pytest.raises(ValueError, match="expected uint8 images"):
        fid.extract_features(model, random_images(2)[..., :1], progress=False)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.extract_features(model, random_images(1), progress=False)
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="corrupt.npz: not a readable .npz"):
        fid.extract_features(model, str(tmp_path / "corrupt.npz"), progress=False)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="different dimensions"):
        fid.compute_metrics(random_images(2), str(tmp_path / "ref.npz"), model)


def torch_fidelity_inception():
    """torch-fidelity's Inception module (test-only, installed by .ci/run without its dependencies): loaded on its own,
    since the package's __init__ also imports its torchvision-based extractors, which this one does not use."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.fail("the Inception reference needs torch-fidelity (pip install --no-deps torch-fidelity==0.4.0, as "
                    ".ci/run does)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("torch_fidelity", package)
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


def test_features_match_torch_fidelity(inception_file):
    extractor = torch_fidelity_inception()
    theirs = extractor.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=inception_file)
    images = torch.from_numpy(random_images(2, 48)).permute(0, 3, 1, 2)
    ours = fid.load_inception(inception_file)(images)
    pool, logits = theirs(images)
    torch.testing.assert_close(ours["pool"], pool, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours["logits"], logits, rtol=1e-4, atol=1e-4)


def test_sample_py_computes_metrics_after_sampling(tmp_path, inception_file):
    tiny_checkpoint(tmp_path / "ck.pt")
    np.savez(tmp_path / "ref.npz", arr_0=random_images(4, 16))
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "ck.pt"), "--num-samples", "4", "--steps", "2",
                                   "--fid-ref", str(tmp_path / "ref.npz"), "--inception-weights", inception_file,
                                   "--out", str(tmp_path / "out")]))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_samples"] == 4 and metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1


@pytest.fixture
def shallow_demo_model(monkeypatch):
    """The demo's TiT-T/4 with one block: compilation time grows with depth, what these tests check does not."""
    monkeypatch.setitem(ucgm.MODELS, "TiT-T/4", {**ucgm.MODELS["TiT-T/4"], "depth": 1})


def train_in_process(out, *flags):
    """train.py's main on the demo data in this process (where dynamo's counters can be read); its losses."""
    train.main(train.parse_args([*TINY, "--max-steps", "3", "--out", str(out), *flags]))
    return [loss for _, loss in losses(out)]


@pytest.mark.parametrize("flags, graphs", [
    (["--lam", "0", "--zeta", "0.5", "--teacher-decay", "0.9"], 2),  # the online network with grad, the EMA teacher
    (["--lam", "1", "--zeta", "1", "--teacher-decay", "1"], 3)])  # and the online no-grad difference; frozen teacher
def test_train_py_compiles_on_cpu_into_one_graph_per_network_and_mode_and_runs_bf16(tmp_path, shallow_demo_model,
                                                                                    flags, graphs):
    counters = torch._dynamo.utils.counters
    eager = train_in_process(tmp_path / "eager", *flags)
    torch._dynamo.reset()
    counters.clear()
    compiled = train_in_process(tmp_path / "compiled", "--compile", *flags)
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs  # a recompilation would add one
    np.testing.assert_allclose(compiled, eager, rtol=1e-3)  # the same three steps, fused
    bf16 = train_in_process(tmp_path / "bf16", "--precision", "bf16", *flags)
    assert all(math.isfinite(v) for v in bf16)
    np.testing.assert_allclose(bf16, eager, rtol=0.25 if "1" == flags[1] else 0.03)  # see the bf16 loss test


def test_sample_py_compiled_on_cpu_matches_eager(tmp_path, shallow_demo_model):
    counters = torch._dynamo.utils.counters
    tiny_checkpoint(tmp_path / "ck.pt")
    flags = ["--ckpt", str(tmp_path / "ck.pt"), "--num-samples", "4", "--batch-size", "4", "--steps", "3"]
    sample.main(sample.parse_args([*flags, "--out", str(tmp_path / "eager")]))
    torch._dynamo.reset()
    counters.clear()
    sample.main(sample.parse_args([*flags, "--compile", "--out", str(tmp_path / "compiled")]))
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    eager, compiled = (np.load(tmp_path / d / "samples.npz")["arr_0"].astype(int) for d in ("eager", "compiled"))
    assert np.abs(eager - compiled).max() <= 1  # a uint8 level: rounding of fused float32 arithmetic


def test_sample_py_runs_bf16_autocast_on_cpu(tmp_path):
    tiny_checkpoint(tmp_path / "ck.pt")
    flags = ["--ckpt", str(tmp_path / "ck.pt"), "--num-samples", "4", "--batch-size", "4", "--steps", "3"]
    for precision in ("fp32", "bf16"):
        sample.main(sample.parse_args([*flags, "--precision", precision, "--out", str(tmp_path / precision)]))
    fp32, bf16 = (np.load(tmp_path / p / "samples.npz")["arr_0"].astype(int) for p in ("fp32", "bf16"))
    assert np.abs(fp32 - bf16).mean() < 0.5 and not np.array_equal(fp32, bf16)  # near, yet computed in bf16


def test_bench_times_synthetic_steps_and_writes_nothing(tmp_path):
    run = run_train(tmp_path / "bench", "--bench", "5", "--model", "TiT-T/2", "--bench-shape", "4", "8",
                    "--global-batch-size", "4", "--lam", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    line = run.stdout.strip().splitlines()[-1]
    assert line.startswith("bench TiT-T/2 on 4×8×8, batch 4/process, lam 1.0") and "img/s" in line and "ms/step" in line
    assert not (tmp_path / "bench").exists()


#################################################################################
#              Command-line flags: ranges checked at parse time                 #
#################################################################################

SCRIPTS = {"train": (train, []), "sample": (sample, ["--ckpt", "ck.pt"]), "fid": (fid, []),
           "extract_latents": (extract_latents, ["--images", "in", "--out", "out"])}
BAD_FLAGS = [  # (script, flag and values, what argparse says after "argument FLAG: ")
    ("train", ["--lam", "1.5"], "expected a number in [0, 1], got 1.5"),
    ("train", ["--zeta", "nan"], "expected a finite number, got nan"),
    ("train", ["--enhance-range", "0", "2"], "expected a number in [0, 1], got 2"),
    ("train", ["--label-drop", "-0.1"], "expected a number in [0, 1], got -0.1"),
    ("train", ["--huber-c", "-1"], "expected a number >= 0, got -1"),
    ("train", ["--time-dist", "1", "0", "1"], "expected a number > 0, got 0"),
    ("train", ["--teacher-decay", "1.01"], "expected a number in [0, 1], got 1.01"),
    ("train", ["--latent-multiplier", "0"], "expected a number > 0, got 0"),
    ("train", ["--global-batch-size", "0"], "expected an integer >= 1, got 0"),
    ("train", ["--grad-accum", "1.5"], "expected an integer >= 1, got 1.5"),
    ("train", ["--max-steps", "0"], "expected an integer >= 1, got 0"),
    ("train", ["--lr", "-1"], "expected a number > 0, got -1"),
    ("train", ["--lr", "inf"], "expected a number > 0, got inf"),
    ("train", ["--betas", "0.9", "1"], "expected a number in [0, 1), got 1"),
    ("train", ["--weight-decay", "-0.001"], "expected a number >= 0, got -0.001"),
    ("train", ["--grad-clip", "nan"], "expected a number >= 0, got nan"),
    ("train", ["--ema-decay", "2"], "expected a number in [0, 1], got 2"),
    ("train", ["--max-bad-steps", "0"], "expected an integer >= 1, got 0"),
    ("train", ["--num-workers", "-1"], "expected an integer >= 0, got -1"),
    ("train", ["--seed", "-1"], "expected an integer in [0, 4294967296), got -1"),
    ("train", ["--seed", "4294967296"], "expected an integer in [0, 4294967296), got 4294967296"),
    ("train", ["--bench", "1"], "expected an integer >= 2, got 1"),
    ("train", ["--bench-shape", "0", "16"], "expected an integer >= 1, got 0"),
    ("train", ["--log-every", "-1"], "expected an integer >= 0, got -1"),
    ("train", ["--ckpt-every", "x"], "expected an integer >= 0, got x"),
    ("train", ["--sample-every", "-5"], "expected an integer >= 0, got -5"),
    ("train", ["--sample-cfg", "inf"], "expected a finite number, got inf"),
    ("sample", ["--steps", "0"], "expected an integer >= 1, got 0"),
    ("sample", ["--rho", "2"], "expected a number in [0, 1] or 'auto', got 2"),
    ("sample", ["--rho", "nan"], "expected a number in [0, 1] or 'auto', got nan"),
    ("sample", ["--kappa", "inf"], "expected a finite number, got inf"),
    ("sample", ["--order", "3"], "invalid choice: 3 (choose from 1, 2)"),
    ("sample", ["--warp", "1", "0", "1"], "expected a number > 0, got 0"),
    ("sample", ["--gaps", "0.001", "1"], "expected a number in [0, 1), got 1"),
    ("sample", ["--cfg-scale", "nan"], "expected a finite number, got nan"),
    ("sample", ["--cfg-interval", "0", "1.5"], "expected a number in [0, 1], got 1.5"),
    ("sample", ["--cfg-channels", "0"], "expected an integer >= 1, got 0"),
    ("sample", ["--num-samples", "0"], "expected an integer >= 1, got 0"),
    ("sample", ["--class", "-1"], "expected an integer >= 0, got -1"),
    ("sample", ["--seed", "1e3"], "expected an integer in [0, 4294967296), got 1e3"),
    ("sample", ["--batch-size", "0"], "expected an integer >= 1, got 0"),
    ("sample", ["--decode-batch", "0"], "expected an integer >= 1, got 0"),
    ("sample", ["--latent-multiplier", "-0.18215"], "expected a number > 0, got -0.18215"),
    ("fid", ["--batch-size", "0"], "expected an integer >= 1, got 0"),
    ("extract_latents", ["--image-size", "0"], "expected an integer >= 1, got 0"),
    ("extract_latents", ["--shard-size", "0"], "expected an integer >= 1, got 0"),
    ("extract_latents", ["--batch-size", "0"], "expected an integer >= 1, got 0"),
    ("extract_latents", ["--stats-images", "0"], "expected an integer >= 1 or 'all', got 0"),
    ("extract_latents", ["--num-workers", "-1"], "expected an integer >= 0, got -1"),
    ("extract_latents", ["--seed", "1.5"], "expected an integer in [0, 4294967296), got 1.5")]


@pytest.mark.parametrize("script, flags, message", BAD_FLAGS, ids=[f"{s}{f[0]}={f[-1]}" for s, f, _ in BAD_FLAGS])
def test_flags_out_of_range_are_refused_naming_the_flag(script, flags, message, capsys):
    module, required = SCRIPTS[script]
    with pytest.raises(SystemExit) as stop:
        module.parse_args([*required, *flags])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: argument {flags[0]}: {message}")


def test_flags_in_range_are_parsed():
    args = sample.parse_args(["--ckpt", "ck.pt", "--rho", "auto", "--gaps", "0", "0.3", "--cfg-interval", "0", "1",
                              "--kappa", "-0.5", "--seed", "4294967295", "--class", "0"])
    assert (args.rho, args.gaps, args.cfg_interval, args.kappa, args.seed, args.class_id) == \
        ("auto", [0.0, 0.3], [0.0, 1.0], -0.5, 4294967295, 0)
    assert sample.parse_args(["--ckpt", "ck.pt", "--rho", "1"]).rho == 1.0
    args = train.parse_args(["--lam", "1", "--lr", "1e-4", "--betas", "0", "0.999", "--log-every", "0",
                             "--ckpt-every", "0", "--sample-every", "0", "--num-workers", "0", "--bench", "2"])
    assert (args.lam, args.lr, args.betas, args.ckpt_every, args.sample_every, args.max_steps) == \
        (1.0, 1e-4, [0.0, 0.999], 0, 0, 2)


#################################################################################
#             The README's commands, as written, at miniature scale             #
#################################################################################
# Each ```bash block of the README is read as a shell would (its variables, `\` continuations, `&&` and `;`);
# every extract_latents.py and train.py command runs in-process on a few images with tiny models and random-weight
# files of the named kinds (one step); every sample.py and fid.py command goes through its argument parser, and
# every file a command reads must come from an earlier command or from a row of the README's files table.

README_SCRIPTS = {"train.py": train, "sample.py": sample, "fid.py": fid, "extract_latents.py": extract_latents}
OTHER_COMMANDS = {"pip", "wget", "curl", "huggingface-cli", "mkdir", "tar", "salloc", "sbatch", "export"}
SCHEDULER_VARIABLES = {"NODE_RANK": "0", "MASTER_ADDR": "localhost", "SLURM_NODEID": "0"}  # set per node
INPUT_FLAGS = ("--images", "--vae-path", "--latent-stats", "--init", "--teacher", "--ckpt", "--fid-ref",
               "--inception-weights", "--data")
# the start weights a tuning preset expects, when the README names a released file: (model, what it mimics)
PRESET_STARTS = {"tune-lightningdit": "LightningDiT-XL/1", "tune-repa": "DiT-XL/2", "tune-repae": "DiT-XL/1",
                 "tune-ddt": "DDT-XL/2", "tune-edm2": "EDM2-S", "cifar10-fewstep": "UNet+"}


def readme_commands():
    """[(block, argv)] of every command in the README's bash blocks, variables expanded as bash would."""
    with open(os.path.join(HERE, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    commands = []
    for number, block in enumerate(blocks):
        names = dict(SCHEDULER_VARIABLES)
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\$\{?(\w+)\}?", lambda m: names.get(m[1], f"<unset {m[1]}>"), line)
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            statement = []
            for token in [*lexer, ";"]:
                if token not in (";", "&&"):
                    statement.append(token)
                    continue
                while statement and re.fullmatch(r"\w+=.*", statement[0]):  # NAME=value, as many as given
                    name, value = statement.pop(0).split("=", 1)
                    names[name] = value
                if statement:
                    assert not any("<unset" in t for t in statement), f"README block {number}: {statement}"
                    commands.append((number, statement))
                statement = []
    return commands


def script_of(argv, where):
    """(script name, its flags, the launcher's flags) of a README command; None for the commands it may name."""
    if argv[0] == "srun":  # srun's own flags, then the command it starts on every node
        argv = argv[next(i for i, t in enumerate(argv) if t in ("torchrun", "python")):]
    if argv[0] in OTHER_COMMANDS or argv[:3] == ["python", "-m", "pytest"]:
        return None
    position = next((i for i, t in enumerate(argv) if t.endswith(".py")), None)
    assert argv[0] in ("torchrun", "python") and position, f"{where}: an unexpected command"
    assert argv[position] in README_SCRIPTS, f"{where}: {argv[position]} is not one of the scripts"
    first = 1 if argv[0] == "torchrun" else 3 if argv[1:3] == ["-m", "torch.distributed.run"] else position
    return argv[position], argv[position + 1:], argv[first:position]


def flag_values(flags, name):
    return [flags[i + 1] for i, t in enumerate(flags[:-1]) if t == name]


def check_inputs(where, paths, known, table):
    """Every file a README command reads comes from an earlier command or from a row of the README's files table
    (by its path, its name or its top folder, e.g. the released `outputs/`). A checkpoint OUT/checkpoints/N.pt of
    an earlier (one-step) train.py run must be one that run keeps: its last step or a multiple of --keep-every;
    its latest.pt stands in for it."""
    for path in paths:
        run = re.fullmatch(r"(.*)/checkpoints/(\d{7})\.pt", path)
        if run and run[1] in known and isinstance(known[run[1]], tuple) and not os.path.exists(path):
            step, (last, keep) = int(run[2]), known[run[1]]
            assert step == last or (keep and step % keep == 0 and step < last), f"{where}: {path} is not kept by " \
                f"the run that writes {run[1]} ({last} steps, keeping the multiples of {keep})"
            shutil.copy(os.path.join(run[1], "checkpoints", "latest.pt"), path)
        parts = path.split("/")
        made = any(path.startswith(k) for k in known)
        assert made or any(word in table for word in (path, parts[-1], parts[0] + "/")), \
            f"{where}: {path} is neither made by an earlier README command nor in the README's files table"


def miniature_files(flags, known, table, where, monkeypatch):
    """Create what a README training or extraction command reads that no earlier command made: a few images,
    random-weight autoencoders of the named kind, latent statistics, start weights of the preset's family."""
    check_inputs(where, [p for f in INPUT_FLAGS if f != "--data" for p in flag_values(flags, f) if p != "none"],
                 known, table)
    assert all(d in known for d in flag_values(flags, "--data")), f"{where}: --data made by no earlier command"
    images = flag_values(flags, "--images")
    if images and not os.path.exists(images[0]):
        for c in range(2):
            os.makedirs(os.path.join(images[0], f"class{c}"))
            for i in range(3):
                Image.fromarray(np.random.default_rng([c, i]).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    os.path.join(images[0], f"class{c}", f"{i}.png"))
    for kind, path in zip(flag_values(flags, "--vae"), flag_values(flags, "--vae-path")):
        if not os.path.exists(path):
            torch.manual_seed(0)
            state = ucgm.autoencoder_architecture(kind).state_dict()
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            ucgm.save_safetensors(state, path) if path.endswith(".safetensors") else torch.save(state, path)
    data = flag_values(flags, "--data")
    shard = ucgm.load_safetensors(extract_latents.shard_path(data[0], 0)) if data else None
    latents = shard["latents"] if data else None
    for path in flag_values(flags, "--latent-stats"):
        if path != "none" and not os.path.exists(path):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            torch.save({"mean": torch.zeros(latents.shape[1]), "std": torch.ones(latents.shape[1])}, path)
    preset = (flag_values(flags, "--preset") or [None])[0]
    for path in flag_values(flags, "--init") + flag_values(flags, "--teacher"):
        if not os.path.exists(path):
            assert preset in PRESET_STARTS, f"{where}: --init {path}, a released file, for preset {preset}"
            model = ucgm.create_model(PRESET_STARTS[preset], input_size=latents.shape[-1],
                                      in_channels=latents.shape[1], num_classes=int(shard["labels"].max()) + 1)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if path.endswith(".pkl"):  # an EDM network pickle
                write_edm_pickle(path, model, "SongUNet", "EDMPrecond", monkeypatch, os.path.abspath("ran"))
            else:
                torch.save(model.state_dict(), path)


def miniature_models(monkeypatch):
    """Every model and autoencoder of the README at a few thousand parameters (same families, layouts, patches)."""
    tiny = {"DiT": dict(hidden_size=32, depth=2, num_heads=2), "TiT": dict(hidden_size=32, depth=2, num_heads=2),
            "LightningDiT": dict(hidden_size=32, depth=2, num_heads=2)}
    for name, config in list(ucgm.MODELS.items()):
        family = name.split("-")[0]
        if family in tiny and "-XL/" in name:
            monkeypatch.setitem(ucgm.MODELS, name, {**config, **tiny[family]})
        elif family in ("DDT", "EDM2", "UNet+") and not name.endswith(("-T", "-T/1", "-T/2")):
            small = {"DDT": f"DDT-T/{config.get('patch_size')}", "EDM2": "EDM2-T", "UNet+": "UNet+-T"}[family]
            variant = {"adm": config["adm"]} if config.get("adm") else {}  # ADM stays ADM
            monkeypatch.setitem(ucgm.MODELS, name, {**ucgm.MODELS[small], **variant})
    for kind, config in list(ucgm.AUTOENCODERS.items()):
        monkeypatch.setitem(ucgm.AUTOENCODERS, kind, TINY_DCAE if kind == "dcae" else {**config, "ch": 32})


def test_readme_commands_run_as_written(tmp_path, monkeypatch, inception_file):
    commands = readme_commands()
    with open(os.path.join(HERE, "README.md")) as f:
        table = "\n".join(line for line in f if line.startswith("|"))
    assert sum(1 for _, argv in commands if script_of(argv, "") is not None) >= 10
    miniature_models(monkeypatch)
    monkeypatch.chdir(tmp_path)
    known, ran = {}, collections.Counter()
    for number, argv in commands:
        where = f"README block {number}: {' '.join(argv)[:100]}"
        found = script_of(argv, where)
        if found is None:
            continue
        script, flags, launcher = found
        if launcher:  # torchrun's own flags, checked by its parser
            torch.distributed.run.get_args_parser().parse_args([*launcher, script, *flags])
        flags = [f"root{t}" if t.startswith("/") else t for t in flags]  # absolute paths inside the test's folder
        module = README_SCRIPTS[script]
        if script in ("train.py", "extract_latents.py"):
            miniature_files(flags, known, table, where, monkeypatch)
            extra = ["--num-workers", "0"] + (["--batch-size", "4"] if script == "extract_latents.py" else
                                              ["--global-batch-size", "2", "--ckpt-every", "0", "--sample-every", "0"]
                                              + (["--bench", "2"] if "--bench" in flags else ["--max-steps", "1"]))
            args = module.parse_args([*flags, *extra])
            written = module.parse_args(flags) if script == "train.py" else None  # as the README has it
            module.main(args)
            known[args.out] = (written.max_steps, written.keep_every) if written else "made"
        else:  # its flags parse, and what it reads exists or is listed
            args = module.parse_args(flags)
            reads = [getattr(args, f[2:].replace("-", "_"), None) for f in INPUT_FLAGS if f not in ("--images", "--data")]
            reads += [*getattr(args, "sources", []), *(getattr(args, "save_stats", None) or [])[:1]]
            check_inputs(where, [p for p in reads if isinstance(p, str) and p != "none"], known, table)
            known[getattr(args, "out", None) or (getattr(args, "save_stats", None) or ["<none>"])[-1]] = "made"
        ran[script] += 1
    assert ran["train.py"] >= 3 and ran["extract_latents.py"] >= 1 and ran["sample.py"] >= 5 and ran["fid.py"] >= 1


#################################################################################
#           The paper's claims in miniature: 2-D toys (README table)            #
#################################################################################

class ToyFlowNet(nn.Module):
    """F(x, t, y) for 2-D toys: x and sinusoidal features of t, plus a class embedding, through a SiLU MLP."""
    def __init__(self, num_classes=1, hidden=128):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("freqs", torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0]) * math.pi)
        self.inp = nn.Linear(2 + 10, hidden)
        self.emb = nn.Embedding(num_classes + 1, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                  nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, t, y):
        angles = t.float()[:, None] * self.freqs
        h = self.inp(torch.cat([x.float(), angles.sin(), angles.cos()], dim=1)) + self.emb(y)
        return self.body(h).to(x.dtype)


def ring(n, generator):
    """Eight Gaussians (std 0.08) on the unit circle; one class."""
    angle = torch.randint(0, 8, (n,), generator=generator) * math.pi / 4
    centres = torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + 0.08 * torch.randn(n, 2, generator=generator), torch.zeros(n, dtype=torch.long)


def moons(n, generator):
    """Two interleaved half circles (noise 0.05), centred and scaled to about unit spread; one class."""
    theta = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, theta.cos(), 1 - theta.cos())
    y = torch.where(upper, theta.sin(), 0.5 - theta.sin())
    points = torch.stack([x - 0.5, y - 0.25], dim=1) + 0.05 * torch.randn(n, 2, generator=generator)
    return points, torch.zeros(n, dtype=torch.long)


def two_classes(n, generator):
    """Two overlapping classes: N((∓0.6, 0), 0.5²) for labels 0 and 1."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    return torch.randn(n, 2, generator=generator) * 0.5 + torch.stack([1.2 * labels - 0.6, 0 * labels], 1), labels


def sliced_wasserstein(a, b, projections=128):
    """SW2 over fixed random directions (seed 0): sqrt of the mean squared gap of the sorted projections."""
    directions = torch.randn(projections, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    pa, pb = (torch.sort(v.double() @ directions.T, dim=0).values for v in (a, b))
    return float(((pa - pb) ** 2).mean().sqrt())


def train_toy(data, lam=0.0, zeta=0.0, transport="Linear", init=None, steps=1500, num_classes=1, **kwargs):
    """Adam 1e-3 -> 1e-4 (cosine), batch 512, through UCGM.loss, unweighted as the demo; the EMA-free weights."""
    torch.manual_seed(0)
    model = ToyFlowNet(num_classes)
    if init is not None:
        model.load_state_dict(init.state_dict())
    trainer = UCGM(transport, lam, zeta, label_drop=0.1 if num_classes > 1 else 0.0, **{"weighting": None, **kwargs})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = data(512, generator)
        loss = trainer.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


NOISE = torch.randn(4000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def draw(model, transport="Linear", steps=32, y=None, **kwargs):
    """UCGM-S from the fixed noise; y defaults to class 0. Up to 4 steps end at t = 0.3, as the few-step preset."""
    y = torch.zeros(len(NOISE), dtype=torch.long) if y is None else y
    gaps = (0.001, 0.3) if steps <= 4 else (0.001, 0.001)
    with torch.no_grad():
        return UCGM(transport).sample(model, NOISE.clone(), steps=steps, y=y, gaps=gaps,
                                      generator=torch.Generator().manual_seed(3), **kwargs)


@pytest.fixture(scope="module")
def ring_models():
    """λ = 0 from scratch; λ = 1 and λ = 0.5 initialised from it (the paper's few-step recipe), on the ring."""
    lam0 = train_toy(ring)
    lam1 = train_toy(ring, lam=1.0, init=lam0, steps=2000, time_dist=(0.8, 1.0, 1.0))
    lam_half = train_toy(ring, lam=0.5, init=lam0, steps=800)
    reference = ring(len(NOISE), torch.Generator().manual_seed(4))[0]
    return lam0, lam1, lam_half, reference


def test_claim_lam_trades_steps_for_quality(ring_models):
    lam0, lam1, lam_half, reference = ring_models
    sw = {(lam, n): sliced_wasserstein(draw(model, steps=n, rho=float(lam)), reference)  # ρ = λ (claim 3)
          for lam, model in ((0, lam0), (0.5, lam_half), (1, lam1)) for n in (1, 2, 4, 32)}
    print({f"lam={lam}, {n} steps": round(v, 4) for (lam, n), v in sw.items()})
    assert sw[0, 1] > 4 * sw[0, 32] and sw[0, 2] > 2 * sw[0, 32]  # λ = 0: poor at 1-2 steps, good at 32
    assert min(sw[1, 1], sw[1, 2]) < 1.6 * sw[0, 32]  # λ = 1 at 1-2 steps: within a small factor of λ = 0 at 32
    assert sw[0.5, 4] < min(sw[0, 4], sw[1, 4])  # λ = 0.5: best of the three at an intermediate count


def test_claim_lam0_and_lam1_share_the_noise_to_data_map(ring_models):
    lam0, lam1, _, _ = ring_models
    ode, fewstep = draw(lam0, steps=64), draw(lam1, steps=1, rho=1.0)
    paired = (ode - fewstep).norm(dim=1).mean()
    unrelated = (ode - fewstep[torch.randperm(len(NOISE), generator=torch.Generator().manual_seed(5))]).norm(dim=1).mean()
    print(f"paired {paired:.3f}, unrelated {unrelated:.3f}")
    assert paired < 0.25 * unrelated


def test_claim_rho_should_follow_lam(ring_models):
    lam0, lam1, _, reference = ring_models
    few = {rho: sliced_wasserstein(draw(lam1, steps=2, rho=rho), reference) for rho in (0.0, 1.0)}
    many = {rho: sliced_wasserstein(draw(lam0, steps=32, rho=rho), reference) for rho in (0.0, 1.0)}
    print(f"lam=1, 2 steps: {few}; lam=0, 32 steps: {many}")
    assert few[1.0] < few[0.0] and many[0.0] < many[1.0]


def test_claim_extrapolation_approaches_the_ode_solution(ring_models):
    lam0 = ring_models[0]
    exact = draw(lam0, steps=256)
    for steps in (8, 12, 16):
        errors = {kappa: float((draw(lam0, steps=steps, kappa=kappa) - exact).norm(dim=1).mean()) for kappa in (0, 0.5)}
        print(f"{steps} steps: {errors}")
        assert errors[0.5] < errors[0]


def test_claim_zeta_acts_like_guidance():
    plain, enhanced = train_toy(two_classes, num_classes=2), train_toy(two_classes, zeta=0.5, num_classes=2)
    y = torch.arange(len(NOISE)) % 2
    guided = draw(plain, y=y, cfg_scale=2.0)  # 1 / (1 - ζ) = 2
    to_guided = sliced_wasserstein(draw(enhanced, y=y), guided)
    to_plain = sliced_wasserstein(draw(enhanced, y=y), draw(plain, y=y))
    print(f"ζ = 0.5 model: SW to the CFG-2 samples {to_guided:.4f}, to the unguided ones {to_plain:.4f}")
    assert to_guided < to_plain


def test_claim_transports_train_alike():
    reference = moons(len(NOISE), torch.Generator().manual_seed(4))[0]
    sw = {name: sliced_wasserstein(draw(train_toy(moons, transport=name), transport=name), reference)
          for name in ("Linear", "TrigFlow", "EDM")}
    print(sw)
    assert max(sw.values()) < 1.6 * min(sw.values()) and max(sw.values()) < 0.13


#################################################################################
#       On a GPU: NCCL, fused attention, no syncs, memory, resume, figures      #
#################################################################################
# README, "GPU readiness": python -m pytest -q -s -m cuda test_ucgm.py, < 8 min on one H100; in two halves with
# -k "not figure" and -k figure. Each figure is printed as measured and appended to gpu_figures.txt ($OUT or .).

GPU_BATCH = 64  # images per step or draw of every TiT-XL/1 figure: one static shape, so compiled graphs are reused


@pytest.fixture(scope="module")
def figure():
    """figure(line): print a measured figure at once and append it, timed, to gpu_figures.txt, so that a check stopped
    early keeps what it measured; the file's first line names the device."""
    path = os.path.join(os.environ.get("OUT", "."), "gpu_figures.txt")

    def write(line):
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")
    total = torch.cuda.get_device_properties(0).total_memory
    write(f"device: {torch.cuda.get_device_name()}, {total / 2**30:.1f} GiB, torch {torch.__version__}")
    return write


@pytest.fixture
def script_precision():
    """float32 matmuls and convs in TF32 as the scripts run them (ucgm.use_tf32), for one test."""
    with fid.full_fp32():  # which restores the settings it found
        ucgm.use_tf32()
        yield


def nccl_run(script, *flags, timeout=300):
    """A script under torchrun with one process, whose process group on CUDA is NCCL."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(HERE, script), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@cuda
def test_cuda_scripts_run_under_nccl(tmp_path, figure):
    """extract_latents.py -> train.py (λ = 1 + ζ, frozen teacher, compiled blocks under --grad-checkpoint, sample
    grids) -> sample.py, each under torchrun's NCCL group: every collective gets a CUDA tensor."""
    image_folder(tmp_path / "images")
    torch.manual_seed(0)
    torch.save({"state_dict": ucgm.AutoencoderKL(**ucgm.AUTOENCODERS["sdvae"]).state_dict()}, tmp_path / "vae.pt")
    vae = ["--vae", "sdvae", "--vae-path", str(tmp_path / "vae.pt")]
    started = time.time()
    run = nccl_run("extract_latents.py", "--images", str(tmp_path / "images"), *vae, "--image-size", "64",
                   "--shard-size", "8", "--num-workers", "0", "--out", str(tmp_path / "latents"))
    assert run.returncode == 0 and (tmp_path / "latents" / "latents_stats.pt").exists(), run.stderr[-3000:]
    out, extracted = tmp_path / "run", time.time()
    run = nccl_run("train.py", "--data", str(tmp_path / "latents"), *vae, "--model", "TiT-T/2", "--lam", "1",
                   "--zeta", "1", "--teacher-decay", "1", "--grad-checkpoint", "--compile", "--global-batch-size", "8",
                   "--max-steps", "3", "--log-every", "1", "--sample-every", "3", "--num-workers", "0",
                   "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert all(math.isfinite(loss) for _, loss in losses(out)) and (out / "samples_0000003.png").exists()
    trained = time.time()
    run = nccl_run("sample.py", "--ckpt", str(out / "checkpoints" / "latest.pt"), "--num-samples", "6",
                   "--batch-size", "4", "--no-compile", "--out", str(tmp_path / "samples"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert np.load(tmp_path / "samples" / "samples.npz")["arr_0"].shape == (6, 64, 64, 3)
    figure(f"torchrun under NCCL: extract_latents.py {extracted - started:.0f} s, train.py (3 steps, λ = 1 + ζ, "
           f"compiled, --grad-checkpoint) {trained - extracted:.0f} s, sample.py {time.time() - trained:.0f} s")


@cuda
def test_cuda_every_sdpa_call_runs_a_fused_kernel():
    """No fallback to the math kernel (it would raise): TiT-XL's and DDT-XL's heads of 72 and EDM2's heads of 64
    (16×16 and 8×8 positions) in bf16 training (forward and backward) and in float32 sampling (sample.py's default),
    and the SD-VAE's single head of 512 in float32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    models = [(ucgm.create_model("TiT-XL/1", input_size=16, in_channels=32, depth=2), 32, 16),
              (ucgm.create_model("DDT-XL/2", input_size=16, in_channels=32, depth=2, encoder_depth=1), 32, 16),
              (ucgm.create_model("EDM2-XS", input_size=32, in_channels=4), 4, 32)]
    autoencoder = ucgm.AutoencoderKL(**ucgm.AUTOENCODERS["sdvae"]).cuda()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        for model, channels, size in models:
            model = model.cuda()
            x, t, y = torch.randn(4, channels, size, size, device="cuda"), torch.rand(4, device="cuda"), \
                torch.arange(4, device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(x, t, y).float().square().sum().backward()
            with torch.no_grad():
                assert torch.isfinite(model(x, t, y)).all()
        with torch.no_grad():
            autoencoder.decode(autoencoder.encode(torch.randn(2, 3, 128, 128, device="cuda")))


@cuda
@pytest.mark.parametrize("preset, compiled", [("multistep", False), ("fewstep", True)])
def test_cuda_training_step_has_no_sync_but_the_guard(preset, compiled, tmp_path):
    """train.train_step (Alg. 1 under bf16 autocast, the gradient norm, clipped by fewstep, fused AdamW or RAdam) and
    the EMA: set_sync_debug_mode("warn") reports one host sync, the guard's read. fewstep with compiled blocks under
    DDP (a one-process NCCL group), as train.py runs it."""
    args = train.parse_args(["--preset", preset, "--data", str(tmp_path)])
    torch.manual_seed(0)
    model = ucgm.create_model("TiT-T/2", input_size=8, in_channels=4, num_classes=10).cuda()
    ema = copy.deepcopy(model).requires_grad_(False)
    trainer = UCGM(lam=args.lam, zeta=args.zeta, huber_c=args.huber_c, cosine_loss=args.cosine_loss,
                   time_dist=args.time_dist, teacher_decay=args.teacher_decay)
    trainer.make_teacher(model)
    fused = {"fused": True} if args.optimizer == "adamw" else {}
    opt = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[args.optimizer](model.parameters(), lr=1e-4, **fused)
    net, device = model, torch.device("cuda", torch.cuda.current_device())
    if compiled:
        torch.distributed.init_process_group("nccl", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                             rank=0, world_size=1, device_id=device)
        for network in (model, trainer.teacher):
            train.compile_blocks(network)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index], gradient_as_bucket_view=True)
    x, y = torch.randn(8, 4, 8, 8, device=device), torch.arange(8, device=device) % 10
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    def step():
        stepped = train.train_step(args, net, model, trainer, opt, x, y, autocast)[2]
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1e-3)
        return stepped
    try:
        step(), step()  # compiles, builds the optimiser state and then DDP's buckets
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                stepped = step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert stepped and len(syncs) == 1, syncs


@cuda
@pytest.mark.parametrize("lam, zeta, decay, tolerance", [(0.0, 0.5, 0.9, 0.02), (1.0, 1.0, 1.0, 0.2)])
def test_cuda_bf16_loss_is_near_the_float32_loss(lam, zeta, decay, tolerance):
    model = ucgm.create_model("TiT-S/2", input_size=16, in_channels=4, num_classes=10).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # leave the zero-initialised output layers
    g = torch.Generator("cuda").manual_seed(0)
    x, z = (torch.randn(32, 4, 16, 16, device="cuda", generator=g) for _ in range(2))
    t, y = torch.linspace(0.05, 0.95, 32, device="cuda"), torch.arange(32, device="cuda") % 10
    results = {}
    for precision in ("fp32", "bf16"):
        trainer = UCGM(lam=lam, zeta=zeta, teacher_decay=decay, label_drop=0.25, weighting=None)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            results[precision] = float(trainer.loss(model, x, y, t=t, noise=z))
    assert abs(results["bf16"] - results["fp32"]) < tolerance * results["fp32"], results


@cuda
def test_cuda_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """To 2%: flash attention's backward accumulates with atomics, so CUDA gradients are not bit-reproducible."""
    steps = ["--ckpt-every", "2", "--no-compile"]
    assert run_train(tmp_path / "a", "--max-steps", "4", *steps).returncode == 0
    assert run_train(tmp_path / "b", "--max-steps", "2", *steps).returncode == 0
    resumed = run_train(tmp_path / "b", "--max-steps", "4", *steps)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    np.testing.assert_allclose([v for _, v in losses(tmp_path / "a")], [v for _, v in losses(tmp_path / "b")],
                               rtol=0.02)


@cuda
def test_cuda_figure_training_tit_xl(figure):
    """TiT-XL/1 training on one GPU, train.py --bench at GPU_BATCH images a step: compiled λ = 0 + ζ (multistep)
    and λ = 1 + ζ (fewstep, frozen teacher), eager λ = 0 + ζ; then each run's MFU > 0, its peak memory under the
    card's and the memory estimate it printed at its start within 15% of that peak."""
    total, checks = torch.cuda.get_device_properties(0).total_memory / 2**30, []
    for flags in (["--preset", "multistep", "--compile"], ["--preset", "fewstep", "--compile"],
                  ["--preset", "multistep", "--no-compile"]):
        started = time.time()
        run = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--bench", "6", "--model", "TiT-XL/1",
                              "--global-batch-size", str(GPU_BATCH), *flags], capture_output=True, text=True,
                             timeout=300)
        lines = [line for line in run.stdout.splitlines() if line.startswith("bench ")]
        estimate = re.search(r"memory: ~([\d.]+) GiB estimated", run.stdout)
        figure(f"{lines[0]} (--preset {flags[1]}; {estimate and estimate[1]} GiB estimated; the process took "
               f"{time.time() - started:.0f} s)" if lines else
               f"train.py --bench {' '.join(flags)} failed: {run.stderr.strip().splitlines()[-1:]}")
        checks.append((flags, run.returncode, lines[0] if lines else "", float(estimate[1]) if estimate else None))
    for flags, returncode, line, estimate in checks:
        assert returncode == 0 and line, flags
        peak = float(re.search(r"peak memory ([\d.]+) GiB", line)[1])
        assert 0 < peak < total and float(re.search(r"MFU ([\d.]+)%", line)[1]) > 0, line
        assert abs(estimate - peak) < 0.15 * peak, (flags, estimate, peak)


def timed(work):
    """(seconds, result) of one call of work() on the GPU."""
    torch.cuda.synchronize()
    start = time.time()
    result = work()
    torch.cuda.synchronize()
    return time.time() - start, result


@cuda
def test_cuda_figure_sampling_tit_xl(figure, script_precision):
    """sample.py's work on GPU_BATCH images: TiT-XL/1 (random weights, blocks compiled) in float32 with TF32 matmuls,
    at 2 and 40 steps, then the VA-VAE decode to 256 px in batches of 50; the images are finite."""
    torch.manual_seed(0)
    model = ucgm.create_model("TiT-XL/1", input_size=16, in_channels=32).cuda().eval().requires_grad_(False)
    train.compile_blocks(model)
    autoencoder = ucgm.autoencoder_architecture("vavae").cuda().eval().requires_grad_(False)
    noise, y = torch.randn(GPU_BATCH, 32, 16, 16, device="cuda"), torch.arange(GPU_BATCH, device="cuda")
    for preset in ("fewstep", "multistep"):
        settings = ucgm.SAMPLER_PRESETS[preset]

        @torch.no_grad()
        def draw():
            latents = UCGM().sample(model, noise, y=y, **settings)
            return torch.cat([autoencoder.decode(z) for z in latents.split(50)])
        if preset == "fewstep":
            timed(draw)  # compiles the blocks
        seconds, images = timed(draw)
        rate = GPU_BATCH / seconds
        figure(f"sampling TiT-XL/1, {settings['steps']} steps, float32 (TF32), blocks compiled, with the VA-VAE decode "
               f"to 256 px: {rate:.1f} img/s; 50,000 on 8 GPUs in {50_000 / 8 / rate / 60:.1f} min")
        assert images.shape == (GPU_BATCH, 3, 256, 256) and torch.isfinite(images).all()


@cuda
def test_cuda_figure_dcae_decode(figure, script_precision):
    """DC-AE f32c32 (random weights) decoding 32×16×16 latents to 512 px in float32 (TF32), 16 at a time."""
    autoencoder = ucgm.autoencoder_architecture("dcae").cuda().eval().requires_grad_(False)
    latents = torch.randn(16, 32, 16, 16, device="cuda")
    with torch.no_grad():
        timed(lambda: autoencoder.decode(latents))
        torch.cuda.reset_peak_memory_stats()
        seconds, images = timed(lambda: autoencoder.decode(latents))
    peak = torch.cuda.max_memory_allocated() / 2**30
    figure(f"DC-AE decode to 512 px, batch 16, float32 (TF32): {16 / seconds:.1f} img/s; peak memory {peak:.1f} GiB")
    assert images.shape == (16, 3, 512, 512) and torch.isfinite(images).all()


@cuda
def test_cuda_figure_inception(figure, inception_file):
    """fid.py's Inception pass (IEEE float32, as the TensorFlow graph) over 1,000 random 256-px images."""
    inception = fid.load_inception(inception_file, "cuda")
    images = random_images(1000, size=256)
    fid.extract_features(inception, images[:200], progress=False)  # cuDNN's plans
    seconds, features = timed(lambda: fid.extract_features(inception, images, progress=False))
    figure(f"Inception pass at 256 px: {1000 / seconds:.0f} img/s; 50,000 in {50 * seconds:.0f} s")
    assert np.isfinite(features["pool"]).all()
