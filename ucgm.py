"""
UCGM: Unified Continuous Generative Models (Sun, Jiang, Lin, 2025; arXiv 2505.07447v2, 20 May 2025).

One trainer (UCGM-T, `UCGM.loss`, Alg. 1) and one sampler (UCGM-S, `ucgm_sampler`, Alg. 2) for diffusion, flow
matching and consistency models (Table 1), selected by the consistency ratio lam (λ) in [0, 1]. The method needs
only a transport and a network F = model(x_t, t, y); it ends at the first network banner. Comments cite Eq. (1)-(6),
algorithm lines ("Alg. 1 l.15"), sections and tables; what the paper lacks is a named README rule ("README rule
..."), and where we follow the released code instead of the paper the README's "Paper and this code" says so.

Reading order (the section banners, in order; a test keeps the list true):
  Transports (paper Eq. (1)-(2), Tables 1 and 6)
  UCGM-T: the unified trainer (paper Alg. 1)
  UCGM-S: the unified sampler (paper Alg. 2)
  The network: DiT / SiT, TiT and LightningDiT
  The network: DDT (decoupled diffusion transformer)
  The network: EDM2 U-Net (magnitude-preserving)
  The network: UNet+ (EDM's SongUNet and DhariwalUNet)
  The autoencoder: LDM AutoencoderKL
  The autoencoder: DC-AE (deep compression)
  Checkpoints: ours, released UCGM, SiT/REPA, LightningDiT, DDT, EDM2, EDM
  File I/O: safetensors, tensor files, atomic writes
  Script plumbing: folders, flags, processes, images
"""

import argparse
import collections
import contextlib
import copy
import datetime
import hashlib
import io
import json
import math
import os
import pickle
import re
import struct
import sys
import tarfile
import warnings
from functools import partial, reduce

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint

HALF_PI = math.pi / 2


#################################################################################
#                 Transports (paper Eq. (1)-(2), Tables 1 and 6)                #
#################################################################################

class Transport:
    """x_t = alpha(t)·z + gamma(t)·x is the network input, F* = alpha_hat(t)·z + gamma_hat(t)·x its target (Eq. (1))."""

    noise_time = 1.0  # the end of [0, 1] where x_t is pure noise

    def D(self, t):
        """D(t) = alpha·gamma_hat − alpha_hat·gamma, the denominator of Eq. (2), nonzero on (0, 1) (Sec. 3.1)."""
        return self.alpha(t) * self.gamma_hat(t) - self.alpha_hat(t) * self.gamma(t)

    def readout(self, F_pred, x_t, t):
        """The x- and z-predictions f^x, f^z of Eq. (2): they invert (z, x) -> (x_t, F) exactly."""
        d = self.D(t)
        x_hat = (self.alpha(t) * F_pred - self.alpha_hat(t) * x_t) / d
        z_hat = (self.gamma_hat(t) * x_t - self.gamma(t) * F_pred) / d
        return x_hat, z_hat


class Linear(Transport):
    """Rectified flow / SiT (Table 6): x_t = t·z + (1−t)·x, F* = z − x."""
    def alpha(self, t): return t
    def gamma(self, t): return 1 - t
    def alpha_hat(self, t): return torch.ones_like(t)
    def gamma_hat(self, t): return -torch.ones_like(t)


class ReLinear(Transport):
    """LightningDiT / DDT (Table 6): the Linear path with time reversed, so t = 0 is noise."""
    noise_time = 0.0
    def alpha(self, t): return 1 - t
    def gamma(self, t): return t
    def alpha_hat(self, t): return -torch.ones_like(t)
    def gamma_hat(self, t): return torch.ones_like(t)


class TrigFlow(Transport):
    """sCM (Tables 1 and 6): x_t = sin(τ)·z + cos(τ)·x with τ = πt/2, F* = cos·z − sin·x = dx_t/dτ, sCM's velocity
    in τ (the velocity in t is (π/2)·F*)."""
    def alpha(self, t): return torch.sin(t * HALF_PI)
    def gamma(self, t): return torch.cos(t * HALF_PI)
    def alpha_hat(self, t): return torch.cos(t * HALF_PI)
    def gamma_hat(self, t): return -torch.sin(t * HALF_PI)


class TrigLinear(TrigFlow):
    """Ablation (Table 6): the TrigFlow input with the Linear target z − x."""
    def alpha_hat(self, t): return torch.ones_like(t)
    def gamma_hat(self, t): return -torch.ones_like(t)


class EDM(Transport):
    """EDM / EDM2 preconditioning (Table 6, App. D.2.4) with sigma_data = 1/2 and sigma(t) = exp(4·(2.68t − 1.59)):
    x_t = c_in·(x + sigma·z), F* is the target of EDM's raw network F_θ, x̂ its denoiser D."""
    def time(self, sigma): return (torch.log(sigma) / 4 + 1.59) / 2.68  # the t of a noise level sigma
    def _sigma_norm(self, t):
        sigma = torch.exp(4 * (2.68 * t - 1.59))
        return sigma, torch.sqrt(sigma ** 2 + 0.25)
    def alpha(self, t): sigma, norm = self._sigma_norm(t); return sigma / norm
    def gamma(self, t): return 1 / self._sigma_norm(t)[1]
    def alpha_hat(self, t): return -0.5 / self._sigma_norm(t)[1]
    def gamma_hat(self, t): sigma, norm = self._sigma_norm(t); return 2 * sigma / norm


class Random(Transport):
    """Ablation (Table 6): an irregular transport, to show UCGM does not need a 'nice' one."""
    def alpha(self, t): return torch.sin(t * HALF_PI)
    def gamma(self, t): return 1 - t
    def alpha_hat(self, t): return torch.ones_like(t)
    def gamma_hat(self, t): return -1 - torch.exp(-5 * t)


TRANSPORTS = {cls.__name__: cls() for cls in (Linear, ReLinear, TrigFlow, TrigLinear, EDM, Random)}


class TimeReversed(Transport):
    """A transport whose noise end is t = 0 seen from the other end: alpha'(t) = alpha(1 − t), gamma'(t) = gamma(1 − t)
    and the hats negated, the path of the network −F(x_t, 1 − t) (README rule "training clock"; ReLinear -> Linear)."""
    def __init__(self, inner): self.inner = inner
    def alpha(self, t): return self.inner.alpha(1 - t)
    def gamma(self, t): return self.inner.gamma(1 - t)
    def alpha_hat(self, t): return -self.inner.alpha_hat(1 - t)
    def gamma_hat(self, t): return -self.inner.gamma_hat(1 - t)


def get_transport(name):
    """Look a transport up by name, failing with the list of known names."""
    require(name in TRANSPORTS, f"transport: expected one of {sorted(TRANSPORTS)}, got {name!r}")
    return TRANSPORTS[name]


def require(condition, message):
    """Argument checks, one line each: a ValueError with `message` unless `condition`."""
    if not condition:
        raise ValueError(message)


#################################################################################
#                   UCGM-T: the unified trainer (paper Alg. 1)                  #
#################################################################################

def view_as_batch(t, x):
    """Reshape per-sample t (N,) to (N, 1, ..., 1) so it broadcasts against x."""
    return t.reshape(-1, *[1] * (x.dim() - 1))


def unwrap(model):
    """The bare network inside DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


ENHANCE_STYLES = ("ft-vs-fe", "fc-vs-xz", "fc-vs-fe")  # what `enhance` compares (README rule "enhanced styles")


class UCGM(nn.Module):
    """UCGM-T (Alg. 1) for any network called as F = model(x_t, t, y); holds the teacher θ_T (README rule "teacher";
    the paper's θ⁻ is the online θ without gradient) and its momentum. `sample` runs UCGM-S (Alg. 2, `ucgm_sampler`)."""

    def __init__(self, transport="Linear", lam=0.0, zeta=0.0, enhance_range=(0.0, 0.75), label_drop=0.1,
                 huber_c=0.0, cosine_loss=False, weighting="cosine", time_dist=(1.0, 1.0, 1.0), teacher_decay=0.999,
                 eps=0.005, enhance_style=None):
        super().__init__()
        raw = get_transport(transport)
        self.transport = TimeReversed(raw) if raw.noise_time == 0.0 else raw  # README rule "training clock"
        require(enhance_style in (None, *ENHANCE_STYLES), f"enhance_style: expected one of {ENHANCE_STYLES} or None, "
                f"got {enhance_style!r}")
        self.enhance_style = enhance_style or ("ft-vs-fe" if lam == 0.0 else "fc-vs-xz")  # the paper's choice by λ
        self_guided = self.enhance_style == "ft-vs-fe" and lam == 0.0  # F^∅_t of the model itself, Alg. 1 l.6
        require(0.0 <= lam <= 1.0, f"lam: the consistency ratio must lie in [0, 1], got {lam}")
        require(math.isfinite(zeta) and not (self_guided and zeta >= 1.0), f"zeta: must be finite, and < 1 with lam = 0 "
                f"and ft-vs-fe (guidance scale 1/(1 - zeta) positive and finite); got {zeta}")
        require(0.0 <= teacher_decay <= 1.0, f"teacher_decay: expected a value in [0, 1], got {teacher_decay}")
        require(not (zeta != 0.0 and self_guided and teacher_decay == 1.0), "teacher_decay: 1 (a frozen teacher) with "
                "lam = 0 needs enhance_style fc-vs-xz or fc-vs-fe (ft-vs-fe's F^∅ must follow training)")
        require(0.0 <= label_drop <= 1.0, f"label_drop: expected a fraction in [0, 1], got {label_drop}")
        require(weighting in (None, "cosine"), f"weighting: expected 'cosine' or None, got {weighting!r}")
        require(len(time_dist) == 3 and min(time_dist) > 0,
                f"time_dist: expected three positive numbers (theta1, theta2, s), got {time_dist}")
        require(len(enhance_range) == 2 and enhance_range[0] <= enhance_range[1],
                f"enhance_range: expected (low, high) with low <= high, got {enhance_range}")
        require(huber_c >= 0 and eps > 0, f"huber_c must be >= 0 and eps > 0, got huber_c={huber_c}, eps={eps}")
        self.transport_name, self.lam, self.zeta = transport, float(lam), float(zeta)
        self.enhance_range, self.label_drop, self.huber_c = tuple(enhance_range), label_drop, huber_c
        self.cosine_loss, self.weighting, self.time_dist = cosine_loss, weighting, tuple(time_dist)
        self.teacher_decay, self.eps = teacher_decay, eps
        self.needs_teacher = zeta != 0.0 and teacher_decay > 0.0  # d = 0 uses the online model itself
        self.teacher = None  # built from the model at the first loss call (or by make_teacher)
        self.teacher_momentum = 0.0  # the warm-up momentum m of README rule "teacher"
        self.nfe = 0  # network evaluations per sample in the last sample() call

    def get_extra_state(self): return {"teacher_momentum": self.teacher_momentum}  # saved in the state dict

    def set_extra_state(self, state): self.teacher_momentum = state["teacher_momentum"]

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load the trainer state; a saved teacher needs make_teacher(model) first, to know its architecture."""
        require(self.teacher is not None or not any(k.startswith("teacher.") for k in state_dict),
                "UCGM state holds a teacher: call make_teacher(model) before load_state_dict")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def make_teacher(self, model):
        """Create the teacher as a frozen copy of `model` if this trainer keeps one and has none yet."""
        if self.needs_teacher and self.teacher is None:
            self.teacher = copy.deepcopy(unwrap(model)).requires_grad_(False).eval()  # no dropout, as `evaluating`

    @torch.no_grad()
    def update_teacher(self, model):
        """The teacher θ_T for Alg. 1 l.6 (README rule "teacher"), after one EMA update: the online model for
        teacher_decay 0, an EMA copy for (0, 1), a frozen copy for 1."""
        if not self.needs_teacher:
            return getattr(model, "module", model)  # d = 0: the online model, skipping DDP's hooks
        self.make_teacher(model)
        if self.teacher_decay < 1.0:
            m = self.teacher_momentum
            online = [p.detach() for p in unwrap(model).parameters()]
            torch._foreach_lerp_(list(self.teacher.parameters()), online, 1.0 - m)  # p_T <- m p_T + (1-m) p
            self.teacher_momentum = m + (1 - m) * (self.teacher_decay - m) / 2  # warm-up towards d
        return self.teacher

    def predict(self, net, x_t, t, y):
        """F(x_t, t, y) in the trainer's clock, in the wider of float32 and the network's dtype (bf16 -> float32): a
        network whose noise end is t = 0 runs at 1 − t with its output negated (README rule "training clock")."""
        F_pred = -net(x_t, 1 - t, y) if isinstance(self.transport, TimeReversed) else net(x_t, t, y)
        return F_pred.to(torch.promote_types(F_pred.dtype, torch.float32))

    def sample_time(self, n, device):
        """t ~ Beta(theta1, theta2) of Alg. 1 l.2, scaled by s and clamped (README rule "time scale"); sync-free:
        the concentrations are filled on the device (no copy) and not validated (no host read)."""
        a, b, s = self.time_dist
        beta = torch.distributions.Beta(torch.full((n,), float(a), device=device),
                                        torch.full((n,), float(b), device=device), validate_args=False)
        return (s * beta.sample()).clamp(0, 1)

    def drop_labels(self, y, null_label):
        """The last round(label_drop · N) rows get the null label ∅ (README rule "label dropping"); return (y, dropped)."""
        n, k = y.shape[0], round(self.label_drop * y.shape[0])
        dropped = torch.arange(n, device=y.device) >= n - k  # all False when k = 0
        return torch.where(dropped, torch.full_like(y, null_label), y), dropped

    def enhance(self, net, x, z, x_t, t, y, dropped, F_t):
        """The enhanced targets (x*, z*) of Alg. 1 l.5-6 (Sec. 3.1, "enhanced target"; App. C.1.3 for lam > 0): with
        the two predictions (P, R) that `enhance_style` compares (README rule "enhanced styles"), a kept row inside
        the enhance range gets x + ζ·(P − R), one outside (x + P)/2, a dropped row (x + R)/2 (README rules "enhance
        range", "dropped rows"); z* alike; (x, z) when zeta = 0."""
        if self.zeta == 0.0:
            return x, z
        tb, teacher = view_as_batch(t, x), self.update_teacher(net)
        null = torch.full_like(y, unwrap(net).num_classes)
        read = lambda F_pred: self.transport.readout(F_pred, x_t, tb)  # noqa: E731  (x̂, ẑ) of Eq. (2)
        if self.enhance_style == "ft-vs-fe":  # Alg. 1 l.6: F_t against the unconditional F^∅_t, of θ_T
            P, R = read(F_t.detach()), read(self.predict(teacher, x_t, t, null))
        elif self.enhance_style == "fc-vs-fe":  # θ_T on y and on ∅, in one doubled batch
            F_c, F_u = self.predict(teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
            P, R = read(F_c), read(F_u)
        else:  # fc-vs-xz, App. C.1.3: a (pre-trained) conditional teacher against the data and noise themselves
            P, R = read(self.predict(teacher, x_t, t, y)), (x, z)
        inside = view_as_batch((t > self.enhance_range[0]) & (t < self.enhance_range[1]), x)
        kept = view_as_batch(~dropped, x)

        def rows(data, p, r):  # the three row cases, for x* (data x) and for z* (data z)
            kept_inside, kept_outside, dropped_row = data + self.zeta * (p - r), (data + p) / 2, (data + r) / 2
            return torch.where(kept, torch.where(inside, kept_inside, kept_outside), dropped_row)
        return rows(x, P[0], R[0]), rows(z, P[1], R[1])

    def denoised(self, net, x_star, z_star, r, y):
        """f^x(F_θ⁻(x*_r, r), x*_r, r) at x*_r = alpha(r)·z* + gamma(r)·x* (Alg. 1 l.9-10, 12-13); θ⁻ = sg(θ)."""
        tr, rb = self.transport, view_as_batch(r, x_star)
        x_r = tr.alpha(rb) * z_star + tr.gamma(rb) * x_star
        return tr.readout(self.predict(net, x_r, r, y), x_r, rb)[0]

    def delta_f(self, net, x_star, z_star, t, y, F_t):
        """Δf^x_t: the difference of Eq. (6) (Alg. 1 l.9-10) for lam < 1, the central difference of Alg. 1 l.12-13
        for lam = 1; before clipping."""
        tr, tb = self.transport, view_as_batch(t, x_star)
        if self.lam == 1.0:  # g(t + eps) and g(t - eps) in one doubled no-grad batch, t + eps at most 1 (README)
            t_plus, t_minus = (t + self.eps).clamp(max=1), t - self.eps  # t >= eps (`loss`): both in [0, 1]
            g_plus, g_minus = self.denoised(net, torch.cat([x_star] * 2), torch.cat([z_star] * 2),
                                            torch.cat([t_plus, t_minus]), torch.cat([y] * 2)).chunk(2)
            step = view_as_batch(1 / (t_plus - t_minus), x_star)  # 1/(2ε), or 1/ε one-sided at t = 1
            return g_plus * step - g_minus * step  # Alg. 1 l.13: each term scaled first, safe in bf16
        h = view_as_batch(t - self.lam * t, x_star)  # Eq. (6): t − λt
        x_star_t = tr.alpha(tb) * z_star + tr.gamma(tb) * x_star
        x_hat_t = tr.readout(F_t.detach(), x_star_t, tb)[0]
        return x_hat_t / h - self.denoised(net, x_star, z_star, self.lam * t, y) / h

    def target(self, net, x_star, z_star, t, y, F_t):
        """F^target_t (Alg. 1 l.15, with sin(πt/2): README "Paper and this code"); no gradient."""
        tr, tb = self.transport, view_as_batch(t, x_star)
        if self.lam == 0.0:  # the direct target alpha_hat·z* + gamma_hat·x*, as released (README "Paper and this code")
            return tr.alpha_hat(tb) * z_star + tr.gamma_hat(tb) * x_star
        delta = self.delta_f(net, x_star, z_star, t, y, F_t).clamp(-1, 1)  # Alg. 1 l.15: clip(Δf, −1, 1)
        weight = tr.alpha(tb) / tr.D(tb) * 4 / torch.sin(tb * HALF_PI)
        return F_t.detach() - weight * delta

    def distance(self, F_t, F_target, t):
        """Alg. 1 l.16 per sample: RMS or pseudo-Huber, plus a cosine term (README rule "Huber and cosine"), times
        cos(πt/2) for weighting "cosine" (the default; None: unweighted)."""
        dims = tuple(range(1, F_t.dim()))
        per_sample = torch.sqrt(((F_t - F_target) ** 2).mean(dims) + self.huber_c ** 2) - self.huber_c
        if self.cosine_loss:
            cosine = F.cosine_similarity(F_t, F_target, dim=1)  # along channels, per position
            per_sample = per_sample + (1 - cosine).reshape(F_t.shape[0], -1).mean(1)
        return per_sample * torch.cos(t * HALF_PI) if self.weighting == "cosine" else per_sample

    def loss(self, model, x, y, t=None, noise=None):
        """UCGM-T loss of one batch (Alg. 1 l.2-16): a scalar with gradient through F_t only; t, given or drawn, runs
        from data (0) to noise (1) for every transport (README rule "training clock"), t >= ε for λ > 0."""
        require(noise is None or noise.shape == x.shape,
                f"noise: expected the shape of x {tuple(x.shape)}, got {tuple(getattr(noise, 'shape', ()))}")
        require(t is None or t.shape == (x.shape[0],),
                f"t: expected shape ({x.shape[0]},), got {tuple(getattr(t, 'shape', ()))}")
        z = torch.randn_like(x) if noise is None else noise  # Alg. 1 l.2: z ~ N(0, I)
        t = self.sample_time(x.shape[0], x.device) if t is None else t  # Alg. 1 l.2: t ~ Beta(θ1, θ2)
        t = t.clamp(min=self.eps) if self.lam > 0 else t  # no 0/0 at t = 0, t − ε >= 0 (README "Paper and this code")
        y, dropped = self.drop_labels(y, unwrap(model).num_classes)  # README rule "label dropping"
        tb = view_as_batch(t, x)
        x_t = self.transport.alpha(tb) * z + self.transport.gamma(tb) * x  # Alg. 1 l.3, Eq. (1)
        F_t = self.predict(model, x_t, t, y)  # Alg. 1 l.4: float32 under bf16 autocast, float64 for float64 checks
        with torch.no_grad(), evaluating(getattr(model, "module", model)) as net:  # no DDP hooks, no dropout
            x_star, z_star = self.enhance(net, x, z, x_t, t, y, dropped, F_t)  # Alg. 1 l.4-7
            F_target = self.target(net, x_star, z_star, t, y, F_t)  # Alg. 1 l.8-15
        return self.distance(F_t, F_target, t).mean()  # Alg. 1 l.16

    def sample(self, model, noise, **settings):
        """UCGM-S (Alg. 2) with this trainer's transport: `ucgm_sampler`; self.nfe counts its evaluations."""
        stats = {}
        out = ucgm_sampler(model, noise, self.transport_name, stats=stats, **settings)
        self.nfe = stats["nfe"]
        return out


#################################################################################
#                   UCGM-S: the unified sampler (paper Alg. 2)                  #
#################################################################################

def time_grid(transport, steps, order=1, warp=(1.0, 1.0, 1.0), gaps=(0.001, 0.001)):
    """The time schedule T of Alg. 2 in float64: n points u in [g0, 1 − g1] (README rule "gaps"), n halved for
    order 2 (Alg. 2 l.1), warped by (1 − (1 − u^a)^b)^c (App. C.1.3), from the noise end, then the data end."""
    require(isinstance(steps, int) and steps >= 1, f"steps: expected an integer >= 1, got {steps!r}")
    require(order in (1, 2), f"order: expected 1 or 2, got {order!r}")
    require(len(warp) == 3 and min(warp) > 0, f"warp: expected three positive numbers (a, b, c), got {warp}")
    start_gap, end_gap = gaps
    require(start_gap >= 0 and end_gap >= 0 and start_gap + end_gap < 1, "gaps: expected g0, g1 >= 0 with g0 + g1 "
            f"< 1 so that [g0, 1 - g1] is not empty, got {tuple(gaps)}")
    n = (steps + 1) // 2 if order == 2 else steps
    u = torch.linspace(start_gap, 1.0, n + 1, dtype=torch.float64)[:-1] if end_gap == 0 else \
        torch.linspace(start_gap, 1.0 - end_gap, n, dtype=torch.float64)  # g1 = 0: n + 1 points to 1, the last dropped
    a, b, c = warp
    f = (1 - (1 - u ** a) ** b) ** c
    noise_at_one = get_transport(transport).noise_time == 1.0
    times = 1 - f if noise_at_one else f
    return torch.cat([times, times.new_tensor([0.0 if noise_at_one else 1.0])])


def guided(model, x, t, dtype, cfg_scale, cfg_interval, cfg_channels, model_kwargs):
    """(F, evaluations): F(x, t) of Alg. 2 l.3 on inputs of `dtype`, guided inside `cfg_interval` on the first
    `cfg_channels` channels (README rules "cfg interval", "cfg channels") as one doubled batch."""
    t_batch, x = torch.full((x.shape[0],), float(t), device=x.device, dtype=dtype), x.to(dtype)
    if cfg_scale == 1.0 or not cfg_interval[0] <= float(t) <= cfg_interval[1]:
        return model(x, t_batch, **model_kwargs).double(), 1
    y = model_kwargs["y"]
    kwargs = {**model_kwargs, "y": torch.cat([y, torch.full_like(y, unwrap(model).num_classes)])}
    F_cond, F_uncond = model(torch.cat([x, x]), t_batch.repeat(2), **kwargs).double().chunk(2)
    k = F_cond.shape[1] if cfg_channels is None else cfg_channels
    F_guided = F_uncond[:, :k] + cfg_scale * (F_cond[:, :k] - F_uncond[:, :k])
    return torch.cat([F_guided, F_cond[:, k:]], dim=1), 2  # one doubled batch costs two evaluations


def check_sampler(noise, transport, times, rho, order, cfg_scale, cfg_interval, cfg_channels, model_kwargs):
    """The arguments of ucgm_sampler, one line each."""
    sign = 1 - 2 * get_transport(transport).noise_time  # the times fall (-1) or rise (+1) towards the data end
    require(times.dim() == 1 and len(times) > 1 and bool((sign * times.diff() > 0).all()), "times: expected a 1-D "
            f"grid of >= 2 times running from the noise end to the data end, got {times.tolist()}")
    require(rho == "auto" or (isinstance(rho, (int, float)) and 0.0 <= rho <= 1.0),
            f"rho: expected a number in [0, 1] or 'auto', got {rho!r}")
    require(cfg_interval[0] <= cfg_interval[1], f"cfg_interval: expected (low, high) with low <= high, got "
            f"{tuple(cfg_interval)}")
    require(cfg_scale == 1.0 or "y" in model_kwargs, "cfg_scale: guidance needs class labels, pass y=...")
    require(cfg_channels is None or 1 <= cfg_channels <= noise.shape[1],
            f"cfg_channels: expected None or 1..{noise.shape[1]}, got {cfg_channels}")
    require(order == 1 or get_transport(transport).gamma(times[0]) != 0, "gaps: order 2 divides by gamma(t_0), which "
            f"is 0 at t_0 = {times[0].item()}; start the grid inside (0, 1): gaps[0] > 0, or a first time off the end")


@torch.no_grad()
def ucgm_sampler(model, noise, transport="Linear", steps=40, rho=0.0, kappa=0.0, order=1, warp=(1.0, 1.0, 1.0),
                 gaps=(0.001, 0.001), cfg_scale=1.0, cfg_interval=(0.0, 1.0), cfg_channels=None, return_all=False,
                 generator=None, stats=None, times=None, **model_kwargs):
    """UCGM-S (Alg. 2): noise -> the last raw x̂ (README "Paper and this code") for any network F = model(x, t,
    **model_kwargs) on the schedule T of `time_grid` or on explicit `times` (1-D, noise end first, data end last;
    steps, warp, gaps unused); inputs and x̂ are float64 for a network with float64 weights, else float32 (or the
    caller's bf16 autocast); with return_all also every raw x̂ (n, *noise.shape); `stats` gets "nfe" per sample."""
    tr, stats = get_transport(transport), {} if stats is None else stats
    times = time_grid(transport, steps, order, warp, gaps) if times is None else \
        torch.as_tensor(times, dtype=torch.float64).cpu()  # on the CPU: reading a time never syncs a GPU
    check_sampler(noise, transport, times, rho, order, cfg_scale, cfg_interval, cfg_channels, model_kwargs)
    dtype = torch.float64 if torch.float64 in {p.dtype for p in getattr(model, "parameters", list)()} else torch.float32
    x_cur, stats["nfe"], n, trajectory = noise.double(), 0, len(times) - 1, []  # x̃ stays in float64 between steps

    def estimate(x, t):  # F at (x, t) and its (x̂, ẑ) of Eq. (2), counting the evaluations (2 for a guided one)
        F_pred, evaluations = guided(model, x, t, dtype, cfg_scale, cfg_interval, cfg_channels, model_kwargs)
        stats["nfe"] += evaluations
        return tr.readout(F_pred, x, t)

    for i in range(n):  # Alg. 2 l.2
        t_cur, t_next = times[i], times[i + 1]
        x_raw, z_raw = x_hat, z_hat = estimate(x_cur, t_cur)  # Alg. 2 l.3, the raw estimates kept for l.4-5
        trajectory += [x_raw.to(dtype)] if return_all else []
        if kappa != 0 and i >= 2:  # Alg. 2 l.4-5 with step i − 1's raw estimates; from i = 2 as released (README)
            x_hat, z_hat = x_raw + kappa * (x_raw - x_prev), z_raw + kappa * (z_raw - z_prev)
        x_prev, z_prev = x_raw, z_raw
        step_rho = (2 * (t_next - t_cur).abs() * tr.alpha(t_cur) / tr.alpha(t_next) ** 2).clamp(0, 1) \
            if rho == "auto" else times.new_tensor(float(rho))  # "auto": App. D.1.7, every step (released: once)
        x_next = tr.gamma(t_next) * x_hat + tr.alpha(t_next) * (1 - step_rho).sqrt() * z_hat  # Alg. 2 l.8
        if step_rho > 0:  # Alg. 2 l.7-8: fresh noise for the stochastic part
            fresh = torch.randn(x_cur.shape, generator=generator, dtype=torch.float64, device=x_cur.device)
            x_next = x_next + tr.alpha(t_next) * step_rho.sqrt() * fresh
        if order == 2 and i < n - 1:  # Alg. 2 l.9-11, averaging ẑ (README "Paper and this code")
            z_next = estimate(x_next, t_next)[1]  # Alg. 2 l.10
            ratio = tr.gamma(t_next) / tr.gamma(t_cur)
            x_next = x_cur * ratio + (tr.alpha(t_next) - tr.alpha(t_cur) * ratio) * (z_hat + z_next) / 2  # l.11
        x_cur = x_next  # Alg. 2 l.13
    return (x_raw.to(dtype), torch.stack(trajectory)) if return_all else x_raw.to(dtype)  # as released


# the released presets of UCGM-S for multi-step and few-step models (App. C.1.3, Table 5)
SAMPLER_PRESETS = {"multistep": dict(steps=40, rho=0.0, kappa=0.5, warp=(1.17, 0.8, 1.1), gaps=(0.001, 0.001)),
                   "fewstep": dict(steps=2, rho=1.0, kappa=0.0, warp=(1.0, 1.0, 1.0), gaps=(0.001, 0.3))}


def sampler_preset(lam):
    """UCGM-S settings for a ratio lam: ρ = λ (Sec. 3.2), few-step above 0.5 (README "Paper and this code")."""
    return {**SAMPLER_PRESETS["fewstep" if lam > 0.5 else "multistep"], "rho": float(lam)}


#################################################################################
#                  The network: DiT / SiT, TiT and LightningDiT                 #
#################################################################################

class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in float32; affine (a learnable `weight`) in LightningDiT."""
    def __init__(self, dim, affine=False, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return x * self.weight if self.weight is not None else x


def modulate(x, shift, scale):
    """adaLN modulation of tokens x (N, T, D) by shift and scale per sample (N, 1, D) or per token (N, T, D)."""
    return x * (1 + scale) + shift


def sincos_1d(dim, pos):
    """Fixed 1-D sin-cos embedding of positions pos (M,) -> (M, dim), float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim, grid_size):
    """DiT's fixed 2-D sin-cos table (grid_size², dim): first half encodes the column, second the row."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)


class Rope2D(nn.Module):
    """2-D rotary embedding (EVA style): first half of each head rotates by row, second half by column."""
    persistent = True  # as in the released TiT checkpoints (feat_rope.freqs_cos / freqs_sin)

    def __init__(self, head_dim, grid_size):
        super().__init__()
        table = self.angles(head_dim, grid_size)  # (T, head_dim), each angle twice: once per element of its pair
        self.register_buffer("freqs_cos", table.cos(), persistent=self.persistent)
        self.register_buffer("freqs_sin", table.sin(), persistent=self.persistent)

    @staticmethod
    def angles(head_dim, grid_size):
        """The angle of each token and element: integer positions, rows in the first half, columns in the second."""
        half = head_dim // 2
        freqs = 1.0 / 10000 ** (torch.arange(0, half, 2).float() / half)  # (head_dim/4,)
        angles = torch.outer(torch.arange(grid_size).float(), freqs).repeat_interleave(2, dim=1)  # (L, head_dim/2)
        rows = angles[:, None, :].expand(grid_size, grid_size, half)
        cols = angles[None, :, :].expand(grid_size, grid_size, half)
        return torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)  # (T, head_dim)

    def forward(self, x):
        """Rotate x (N, H, T, head_dim) pairwise: (a, b) -> (a cos − b sin, b cos + a sin)."""
        rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
        return (x * self.freqs_cos + rotated * self.freqs_sin).type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention, with optional QK-RMSNorm (and, for DDT,
    no qkv bias)."""
    def __init__(self, dim, num_heads, qk_norm=None, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = qk_norm(dim // num_heads) if qk_norm else nn.Identity()  # per head
        self.k_norm = qk_norm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, T, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, head_dim)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """DiT's MLP: Linear -> GELU(tanh) -> Linear."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """TiT's gated MLP: w3(silu(a) · b) with (a, b) = w12(x)."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class BiasFreeSwiGLU(nn.Module):
    """DDT's gated MLP: w2(silu(w1 x) · w3 x), three matrices without bias."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TimestepEmbedder(nn.Module):
    """256-frequency sinusoidal embedding of t in [0, 1] (fed as is, no ×1000), then an MLP; DDT's max period is 10."""
    def __init__(self, dim, freq_dim=256, max_period=10000):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]  # (N, half)
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, the null label `num_classes`, used for guidance."""
    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> tokens (N, T, D) in row-major order: a strided convolution, or (linear, DDT)
    a Linear over the unfolded patches, each flattened in (c, kh, kw) order."""
    def __init__(self, patch_size, in_channels, dim, linear=False):
        super().__init__()
        self.patch_size, self.linear = patch_size, linear
        self.proj = nn.Linear(in_channels * patch_size ** 2, dim) if linear else \
            nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if self.linear:
            patches = F.unfold(x, self.patch_size, stride=self.patch_size).transpose(1, 2)  # (N, T, C·p·p)
            return self.proj(patches)  # (N, T, D)
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


def adaln(dim, chunks, silu=True):
    """The adaLN projection of the condition to `chunks` modulation vectors: Sequential(SiLU, Linear), or (DDT,
    whose caller applies the SiLU) Sequential(Linear), so that the Linear's key is `.1` or `.0`."""
    return nn.Sequential(*([nn.SiLU()] if silu else []), nn.Linear(dim, chunks * dim))


def run_block(block, *inputs, recompute=False):
    """block(*inputs); with recompute (--grad-checkpoint in training) recomputed in the backward, trading compute for
    memory."""
    if recompute:
        return checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


class Block(nn.Module):
    """Transformer block with adaLN-Zero conditioning; DDT's has no MLP or qkv bias and no adaLN SiLU."""
    def __init__(self, dim, num_heads, mlp_ratio, norm, qk_norm, swiglu, qkv_bias=True, mlp_bias=True, adaln_silu=True):
        super().__init__()
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.attn = Attention(dim, num_heads, norm if qk_norm else None, qkv_bias)
        hidden = int(dim * mlp_ratio)
        gated = SwiGLU if mlp_bias else BiasFreeSwiGLU
        self.mlp = gated(dim, int(2 / 3 * hidden)) if swiglu else Mlp(dim, hidden)
        self.adaLN_modulation = adaln(dim, 6, adaln_silu)

    def forward(self, x, c, rope=None):
        """x (N, T, D) conditioned by c per sample (N, 1, D) or per token (N, T, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patches."""
    def __init__(self, dim, patch_size, out_channels, norm, adaln_silu=True):
        super().__init__()
        self.norm_final = norm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = adaln(dim, 2, adaln_silu)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """DiT / SiT, or TiT with rmsnorm, qk_norm, swiglu and rope on (LightningDiT: also affine_norm, without qk_norm);
    forward(x, t, y) returns F."""
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, learn_sigma=False, rmsnorm=False, qk_norm=False, swiglu=False,
                 rope=False, affine_norm=False, grad_checkpoint=False):
        super().__init__()
        if input_size % patch_size or hidden_size % num_heads:
            raise ValueError(f"DiT: input_size {input_size} must be divisible by patch_size {patch_size} "
                             f"and hidden_size {hidden_size} by num_heads {num_heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels  # SiT/DiT checkpoints learn sigma
        self.num_classes = num_classes  # also the null label; 1 means unconditional
        self.grad_checkpoint = grad_checkpoint
        grid = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 1 else None
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, grid).float().unsqueeze(0), requires_grad=False)
        self.feat_rope = Rope2D(hidden_size // num_heads, grid) if rope else None
        if affine_norm and not rmsnorm:
            raise ValueError("DiT: affine_norm (LightningDiT's RMSNorm weights) needs rmsnorm=True")
        norm = partial(RMSNorm, affine=affine_norm) if rmsnorm else \
            partial(nn.LayerNorm, elementwise_affine=False, eps=1e-6)
        self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio, norm, qk_norm, swiglu)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT initialisation: xavier linears, N(0, 0.02) label table and time MLP, zero adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch conv initialised like a linear
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """(N, T, p·p·C) -> (N, C, H, W)."""
        p, c, g = self.patch_size, self.out_channels, self.input_size // self.patch_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, y=None):
        """x (N, C, H, W), t (N,) in [0, 1], y (N,) int64 with num_classes = null label -> F (N, C, H, W)."""
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"DiT: expected x of shape (N, {self.in_channels}, {self.input_size}, "
                             f"{self.input_size}), got {tuple(x.shape)}")
        c = self.t_embedder(t)  # (N, D)
        if self.y_embedder is not None:  # labels are checked where they are loaded: reading y here would sync
            c = c + self.y_embedder(y)
        c = c.unsqueeze(1)  # (N, 1, D): one condition for every token
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        for block in self.blocks:
            x = run_block(block, x, c, self.feat_rope, recompute=self.grad_checkpoint and self.training)
        x = self.unpatchify(self.final_layer(x, c))  # (N, out_channels, H, W)
        return x[:, :self.in_channels]  # a learned-sigma half, if any, is unused

    def flops_per_forward(self):
        """Matmul FLOPs of one forward for one sample, a multiply-add counting 2 (DiT-XL/2 at 256 px: ~237 G)."""
        return matmul_flops(self, lambda name: "adaLN" in name or name.startswith("t_embedder"))


def matmul_flops(model, per_sample):
    """2 × the multiply-adds of one sample: weight matrices whose name `per_sample` picks act once, the others (but
    the label table) once a token, and each block's attention QK^T and AV."""
    tokens = (model.input_size // model.patch_size) ** 2
    matrices = {n: p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1}
    once = sum(v for n, v in matrices.items() if per_sample(n))
    per_token = sum(v for n, v in matrices.items() if not n.startswith("y_embedder")) - once
    width = model.t_embedder.mlp[-1].out_features
    attention = 2 * tokens * tokens * width * len(model.blocks)  # QK^T and AV
    return 2 * (tokens * per_token + once + attention)

# width, depth, heads; T (tiny) is no paper size but the CPU demo of train.py
SIZES = {"T": (128, 4, 4), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
# the switches of each family: DiT / SiT have none; LightningDiT (hustvl/LightningDiT, as released) is TiT with
# learnable RMSNorm weights and without qk-norm
FAMILIES = {"DiT": {}, "TiT": dict(rmsnorm=True, qk_norm=True, swiglu=True, rope=True),
            "LightningDiT": dict(rmsnorm=True, affine_norm=True, swiglu=True, rope=True)}
MODELS = {f"{family}-{size}/{patch}": dict(hidden_size=width, depth=depth, num_heads=heads, patch_size=patch,
                                          **switches)
          for family, switches in FAMILIES.items() for size, (width, depth, heads) in SIZES.items()
          for patch in (1, 2, 4)}


def create_model(name, **kwargs):
    """Build a model from the MODELS table, e.g. create_model("TiT-XL/1", input_size=16, in_channels=32); the DDT,
    EDM2 and UNet+ names build a DDT, an EDM2UNet or an EDMUNet (their sections below)."""
    if name not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}")
    network = DDT if name.startswith("DDT-") else EDM2UNet if name.startswith("EDM2-") else \
        EDMUNet if name.startswith("UNet+") else DiT
    return network(**{**MODELS[name], **kwargs})


#################################################################################
#               The network: DDT (decoupled diffusion transformer)              #
#################################################################################

class DDTRope(Rope2D):
    """DDT's 2-D rotary embedding: fractional positions linspace(0, 16, grid), column and row alternating pair by
    pair; computed, not saved (no state-dict key)."""
    persistent = False

    @staticmethod
    def angles(head_dim, grid_size):
        """Pair 2k turns by column·f_k, pair 2k + 1 by row·f_k, with f_k = 10000^(−4k/head_dim)."""
        pos = torch.linspace(0, 16, grid_size)
        rows, cols = torch.meshgrid(pos, pos, indexing="ij")
        freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 4).float() / head_dim)  # (head_dim/4,)
        pairs = torch.stack([torch.outer(cols.flatten(), freqs), torch.outer(rows.flatten(), freqs)], dim=-1)
        return pairs.flatten(1).repeat_interleave(2, dim=1)  # (T, head_dim)


class DDT(nn.Module):
    """DDT (MCG-NJU/DDT, as LINs-lab/UCGM releases it): `encoder_depth` blocks turn the patches into a per-token
    condition s for the remaining decoder blocks; forward(x, t, y) returns the ReLinear F (t = 0 is noise)."""
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, encoder_depth=22,
                 num_heads=16, mlp_ratio=4.0, num_classes=1000, grad_checkpoint=False):
        super().__init__()
        require(input_size % patch_size == 0 and hidden_size % (4 * num_heads) == 0 and 0 < encoder_depth < depth,
                f"DDT: input_size {input_size} must be divisible by patch_size {patch_size}, hidden_size "
                f"{hidden_size} by 4·num_heads {4 * num_heads}, and 0 < encoder_depth {encoder_depth} < depth {depth}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels, self.num_classes, self.encoder_depth = in_channels, num_classes, encoder_depth
        self.grad_checkpoint = grad_checkpoint
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, linear=True)  # the decoder's tokens
        self.s_embedder = PatchEmbed(patch_size, in_channels, hidden_size, linear=True)  # the encoder's tokens
        self.t_embedder = TimestepEmbedder(hidden_size, max_period=10)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels,
                                      partial(nn.LayerNorm, elementwise_affine=False, eps=1e-6), adaln_silu=False)
        self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio, partial(RMSNorm, affine=True),
                                           qk_norm=True, swiglu=True, qkv_bias=False, mlp_bias=False, adaln_silu=False)
                                     for _ in range(depth)])
        # a fixed table, not a weight: made for real also on the meta device, where load_network builds the model
        # and loading (assign=True) would leave a non-persistent buffer empty
        on_meta = torch.empty(()).is_meta  # inside `with torch.device("meta")` (torch.get_default_device: 2.5+)
        with torch.device("cpu") if on_meta else contextlib.nullcontext():
            self.rope = DDTRope(hidden_size // num_heads, input_size // patch_size)
        self.initialize_weights()

    def initialize_weights(self):
        """As released: xavier patch embeddings, N(0, 0.02) label table and time MLP, zero final layer; the blocks
        keep PyTorch's default initialisation (their adaLN is not zeroed)."""
        for embedder in (self.x_embedder, self.s_embedder):
            nn.init.xavier_uniform_(embedder.proj.weight)
            nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in (self.final_layer.adaLN_modulation[0], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        """x (N, C, H, W), t (N,) in [0, 1] with 0 the noise end, y (N,) int64 with num_classes = null label -> F."""
        require(x.shape[1:] == (self.in_channels, self.input_size, self.input_size), f"DDT: expected x of shape "
                f"(N, {self.in_channels}, {self.input_size}, {self.input_size}), got {tuple(x.shape)}")
        checkpointed = self.grad_checkpoint and self.training
        t_emb = self.t_embedder(t).unsqueeze(1)  # (N, 1, D)
        c = F.silu(t_emb + self.y_embedder(y).unsqueeze(1))  # (N, 1, D): one condition for every token
        s = self.s_embedder(x)  # (N, T, D)
        for block in self.blocks[:self.encoder_depth]:
            s = run_block(block, s, c, self.rope, recompute=checkpointed)
        s = F.silu(t_emb + s)  # (N, T, D): the encoder's output conditions the decoder per token
        h = self.x_embedder(x)  # (N, T, D)
        for block in self.blocks[self.encoder_depth:]:
            h = run_block(block, h, s, self.rope, recompute=checkpointed)
        h = self.final_layer(h, s).transpose(1, 2)  # (N, C·p·p, T), each patch in (c, kh, kw) order
        return F.fold(h, x.shape[-2:], self.patch_size, stride=self.patch_size)  # (N, C, H, W)

    def flops_per_forward(self):
        """Matmul FLOPs of one forward for one sample, a multiply-add counting 2 (DDT-XL/2 at 256 px: ~263 G); the
        decoder's adaLN acts per token."""
        encoder = tuple(f"blocks.{i}.adaLN" for i in range(self.encoder_depth))
        return matmul_flops(self, lambda name: name.startswith(("t_embedder", *encoder)))


# width, depth, encoder depth, heads; T (tiny) is no released size but a CPU test size
DDT_SIZES = {"T": (64, 3, 2, 2), "XL": (1152, 28, 22, 16)}
MODELS.update({f"DDT-{size}/{patch}": dict(hidden_size=width, depth=depth, encoder_depth=encoder, num_heads=heads,
                                           patch_size=patch)
               for size, (width, depth, encoder, heads) in DDT_SIZES.items() for patch in (1, 2, 4)})


#################################################################################
#                 The network: EDM2 U-Net (magnitude-preserving)                #
#################################################################################

# Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2, arXiv 2312.02696): every
# layer keeps unit-RMS activations ("(EDM2)" below: the layer as that paper and NVlabs/edm2 define it)

def mp_normalize(x, dim=None, eps=1e-4):
    """x / (eps + ‖x‖·√(n/N)) with the norms over `dim` (default: all but the first), n of them, N = numel(x): unit
    RMS along `dim`; the norms in float32."""
    dim = list(range(1, x.dim())) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    return x / (eps + norm * math.sqrt(norm.numel() / x.numel())).to(x.dtype)


def mp_silu(x):
    """Magnitude-preserving SiLU (EDM2)."""
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """Magnitude-preserving sum ((1 − t)·a + t·b) / √((1 − t)² + t²) (EDM2)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, t=0.5):
    """Magnitude-preserving concatenation along channels (EDM2): a and b weighted (1 − t) and t by size."""
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(na)), b * (c * t / math.sqrt(nb))], dim=1)


def mp_resample(x, mode):
    """2×2 average pooling ("down"), nearest 2× upsampling ("up") or nothing (None): EDM2's [1, 1] filter."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return F.interpolate(x, scale_factor=2.0, mode="nearest") if mode == "up" else x


class MPFourier(nn.Module):
    """Fourier features √2·cos(freqs·x + phases) of a scalar per sample (EDM2), freqs = 2π·N(0, 1) and
    phases = 2π·U(0, 1): random persistent buffers, so they come from the checkpoint."""
    def __init__(self, channels):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))

    def forward(self, x):
        angles = torch.outer(x.float(), self.freqs.float()) + self.phases.float()  # (N, C)
        return (angles.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or linear layer (kernel ()), no bias (EDM2): the
    weight is normalised per output channel in every call (in training EDM2UNet.forward also stores it normalised)."""
    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, *kernel))

    def forward(self, x, gain=1.0):
        w = mp_normalize(self.weight.float()) * (gain / math.sqrt(self.weight[0].numel()))  # unit fan-in norm
        w = w.to(x.dtype)
        return x @ w.t() if w.dim() == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


class UNetBlock(nn.Module):
    """EDM2's encoder or decoder block (EDM2 Fig. 21): resampling; a residual branch scaled by 1 + the embedding,
    mp_sum-ed into the main path (balance 0.3); optionally self-attention likewise; activations clipped to ±256."""
    def __init__(self, cin, cout, emb_channels, decoder=False, resample=None, attention=False, channels_per_head=64):
        super().__init__()
        self.decoder, self.resample = decoder, resample
        self.num_heads = cout // channels_per_head if attention else 0
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(cin if decoder else cout, cout, (3, 3))
        self.emb_linear = MPConv(emb_channels, cout, ())
        self.conv_res1 = MPConv(cout, cout, (3, 3))
        self.conv_skip = MPConv(cin, cout, (1, 1)) if cin != cout else None
        if self.num_heads:
            self.attn_qkv = MPConv(cout, 3 * cout, (1, 1))
            self.attn_proj = MPConv(cout, cout, (1, 1))

    def attention(self, x):
        """Multi-head self-attention over the H·W positions with pixel-normalised q, k, v."""
        N, C, H, W = x.shape
        qkv = self.attn_qkv(x).reshape(N, self.num_heads, C // self.num_heads, 3, H * W)  # q, k, v per channel
        q, k, v = (u.transpose(2, 3).contiguous() for u in mp_normalize(qkv, dim=2).unbind(3))  # (N, heads, HW, C_h)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C_h) v, (N, heads, HW, C_h)
        return self.attn_proj(y.transpose(2, 3).reshape(N, C, H, W))

    def forward(self, x, emb):
        x = mp_resample(x, self.resample)
        if not self.decoder:
            x = mp_normalize(x if self.conv_skip is None else self.conv_skip(x), dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1  # (N, C)
        y = self.conv_res1(mp_silu(y * scale[:, :, None, None].to(y.dtype)))
        if self.decoder and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, 0.3)
        if self.num_heads:
            x = mp_sum(x, self.attention(x), 0.3)
        return x.clip(-256, 256)


class EDM2UNet(nn.Module):
    """EDM2's U-Net (NVlabs/edm2, as UCGM releases it): forward(x, t, y) returns the raw network output F for the EDM
    transport, whose x_t is EDM2's preconditioned input c_in·(x + σz), at EDM2's noise label ¼·ln σ = 2.68t − 1.59.
    Key names and attention follow the resolutions: level ℓ works at input_size / 2^ℓ."""
    def __init__(self, input_size=64, in_channels=4, num_classes=1000, model_channels=192, channel_mult=(1, 2, 3, 4),
                 num_blocks=3, attn_resolutions=(16, 8), channels_per_head=64, grad_checkpoint=False):
        super().__init__()
        require(input_size % 2 ** (len(channel_mult) - 1) == 0, f"EDM2: input_size {input_size} must be divisible by "
                f"2^{len(channel_mult) - 1} for its {len(channel_mult)} levels")
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes  # 0: unconditional
        self.grad_checkpoint = grad_checkpoint
        widths, emb_channels = [model_channels * m for m in channel_mult], model_channels * max(channel_mult)
        block = partial(UNetBlock, emb_channels=emb_channels, channels_per_head=channels_per_head)
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(model_channels)
        self.emb_noise = MPConv(model_channels, emb_channels, ())
        self.emb_label = MPConv(num_classes, emb_channels, ()) if num_classes else None
        self.enc, self.dec, c = nn.ModuleDict(), nn.ModuleDict(), in_channels + 1  # + a constant channel of ones
        for level, width in enumerate(widths):
            res = input_size >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"], c = MPConv(c, width, (3, 3)), width
            else:
                self.enc[f"{res}x{res}_down"] = block(c, c, resample="down")
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"], c = block(c, width, attention=res in attn_resolutions), width
        skips = [m.weight.shape[0] if isinstance(m, MPConv) else m.conv_res1.weight.shape[0] for m in self.enc.values()]
        for level, width in reversed(list(enumerate(widths))):
            res = input_size >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = block(c, c, decoder=True, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(c, c, decoder=True)
            else:
                self.dec[f"{res}x{res}_up"] = block(c, c, decoder=True, resample="up")
            for i in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = block(c + skips.pop(), width, decoder=True,
                                                         attention=res in attn_resolutions)
                c = width
        self.out_conv = MPConv(c, in_channels, (3, 3))

    @property
    def blocks(self):
        """The encoder and decoder layers in the order they run (train.py compiles each)."""
        return [*self.enc.values(), *self.dec.values()]

    def embedding(self, t, y):
        """The block conditioning: Fourier features of the noise label, mp_sum-ed with the class embedding except on
        rows of the null label `num_classes`, which skip it (UCGM's unconditional rows)."""
        emb = self.emb_noise(self.emb_fourier(2.68 * t.flatten() - 1.59))  # (N, C_emb)
        if self.emb_label is not None and y is not None:
            one_hot = F.one_hot(y, self.num_classes + 1)[:, :self.num_classes]  # the null label: a row of zeros
            labelled = mp_sum(emb, self.emb_label(one_hot.to(emb.dtype) * math.sqrt(self.num_classes)), 0.5)
            emb = torch.where((y == self.num_classes)[:, None], emb, labelled)  # no host read
        return mp_silu(emb)

    def forward(self, x, t, y=None):
        """x (N, C, H, W), t (N,) in [0, 1] (1: noise), y (N,) int64, num_classes the null label -> F (N, C, H, W)."""
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"EDM2: expected x of shape (N, {self.in_channels}, {self.input_size}, "
                             f"{self.input_size}), got {tuple(x.shape)}")
        if self.training and torch.is_grad_enabled():  # not in UCGM's no-grad passes: the grad pass saved these weights
            self.force_weight_normalisation()
        emb = self.embedding(t, y)
        x, skips = torch.cat([x, torch.ones_like(x[:, :1])], dim=1), []
        recompute = self.grad_checkpoint and self.training
        for name, layer in self.enc.items():
            x = run_block(layer, x, recompute=recompute) if name.endswith("_conv") else \
                run_block(layer, x, emb, recompute=recompute)
            skips.append(x)
        for name, layer in self.dec.items():
            x = run_block(layer, mp_cat(x, skips.pop(), 0.5) if "_block" in name else x, emb, recompute=recompute)
        return self.out_conv(x, gain=self.out_gain)

    @torch.no_grad()
    def force_weight_normalisation(self):
        """Replace every stored weight by its normalised self (EDM2), as EDM2 does in each training forward:
        here, outside the blocks, as torch.compile of a block would drop the write and --grad-checkpoint repeat it."""
        for module in self.modules():
            if isinstance(module, MPConv):
                module.weight.copy_(mp_normalize(module.weight.float()))

    def flops_per_forward(self):
        """Matmul FLOPs of one forward for one sample (unet_flops)."""
        return unet_flops(self, "attn_proj.weight")


def unet_flops(model, attention_out):
    """Matmul FLOPs of one forward of an EDM2 or UNet+ U-Net for one sample, a multiply-add counting 2: each conv at
    its layer's resolution (the name's {r}x{r}), attention's QKᵀ and AV at 2·(r²)²·C where `attention_out` ends a
    name."""
    total = 0
    for name, p in model.named_parameters():
        if p.dim() > 1:
            level = re.match(r"(?:enc|dec)\.(\d+)x", name)  # None for the embedding and output layers
            res = int(level[1]) if level else model.input_size
            total += p.numel() * (res * res if p.dim() == 4 else 1)
            if name.endswith(attention_out):
                total += 2 * res ** 4 * p.shape[0]
    return 2 * total


# EDM2's sizes (NVlabs/edm2 train_edm2.py) by model_channels; T (tiny) is no paper size but the tests' CPU model
EDM2_SIZES = {"T": dict(model_channels=32, channel_mult=(1, 2), num_blocks=1, channels_per_head=32),
              **{size: dict(model_channels=mc) for size, mc in
                 (("XS", 128), ("S", 192), ("M", 256), ("L", 320), ("XL", 384), ("XXL", 448))}}
MODELS.update({f"EDM2-{size}": kwargs for size, kwargs in EDM2_SIZES.items()})


#################################################################################
#            The network: UNet+ (EDM's SongUNet and DhariwalUNet)               #
#################################################################################

# Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM, arXiv 2206.00364): the
# DDPM++ / NCSN++ U-Net of Song et al. (EDM's SongUNet) and the ADM U-Net of Dhariwal & Nichol (DhariwalUNet, here
# adm=True) as NVlabs/edm defines them; UCGM releases the first as "UNet+", Table 7's 56M-parameter U-Net. Layer
# names are EDM's, so its weights load unchanged ("(EDM)" below: as that code defines the layer).

def edm_init(layer, init, fan_in, fan_out):
    """EDM's initialisation of a layer's weight and bias: init = (mode, weight gain, bias gain) (EDM)."""
    mode, weight_gain, bias_gain = init
    scale = {"xavier_uniform": math.sqrt(6 / (fan_in + fan_out)), "kaiming_uniform": math.sqrt(3 / fan_in),
             "kaiming_normal": math.sqrt(1 / fan_in)}[mode]
    with torch.no_grad():
        for p, gain in ((layer.weight, weight_gain), (layer.bias, bias_gain)):
            if p is not None:
                noise = torch.randn_like(p) if mode == "kaiming_normal" else torch.rand_like(p) * 2 - 1
                p.copy_(noise * (scale * gain))
    return layer


def edm_linear(cin, cout, init, bias=True):
    """EDM's Linear: torch's, initialised by edm_init."""
    return edm_init(nn.Linear(cin, cout, bias=bias), init, cin, cout)


def edm_group_norm(channels, eps):
    """EDM's GroupNorm: 32 groups of at least 4 channels."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=eps)


class EDMConv(nn.Module):
    """EDM's Conv2d: up- or downsampling (stride 2) by the filter f·fᵀ/(Σf)², a persistent buffer, then a k×k
    convolution (kernel 0: none); fused (NCSN++'s residual encoder, down only): the convolution first."""
    def __init__(self, cin, cout, kernel, init=None, up=False, down=False, resample_filter=(1, 1), fused=False):
        super().__init__()
        self.up, self.down, self.fused = up, down, fused
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.empty(cout)) if kernel else None
        if kernel:
            edm_init(self, init, cin * kernel ** 2, cout * kernel ** 2)
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("resample_filter", torch.outer(f, f)[None, None] / f.sum() ** 2 if up or down else None)

    def forward(self, x):
        f, w = self.resample_filter, self.weight
        pad, depthwise = (f.shape[-1] - 1) // 2 if f is not None else 0, lambda f: f.tile(x.shape[1], 1, 1, 1)
        if self.fused:
            x = F.conv2d(x, w, padding=w.shape[-1] // 2 + pad)
            return F.conv2d(x, depthwise(f), groups=x.shape[1], stride=2) + self.bias.reshape(1, -1, 1, 1)
        if self.up:  # the filter's transpose, times 4: each pixel spread over a 2×2 block
            x = F.conv_transpose2d(x, depthwise(4 * f), groups=x.shape[1], stride=2, padding=pad)
        if self.down:
            x = F.conv2d(x, depthwise(f), groups=x.shape[1], stride=2, padding=pad)
        return x if w is None else F.conv2d(x, w, self.bias, padding=w.shape[-1] // 2)


class EDMBlock(nn.Module):
    """EDM's UNetBlock: GroupNorm-SiLU-conv, the embedding added (adaptive: as scale and shift), dropout, conv, the
    skip added and scaled; then optional self-attention likewise."""
    def __init__(self, cin, cout, emb_channels, up=False, down=False, attention=False, num_heads=None,
                 channels_per_head=64, dropout=0.0, skip_scale=1.0, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        self.in_channels, self.dropout, self.skip_scale, self.adaptive_scale = cin, dropout, skip_scale, adaptive_scale
        self.num_heads = (num_heads or cout // channels_per_head) if attention else 0
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0, self.conv0 = edm_group_norm(cin, eps), EDMConv(cin, cout, 3, init, **resample)
        self.affine = edm_linear(emb_channels, cout * (2 if adaptive_scale else 1), init)
        self.norm1, self.conv1 = edm_group_norm(cout, eps), EDMConv(cout, cout, 3, init_zero)
        self.skip = EDMConv(cin, cout, 1 if resample_proj or cout != cin else 0, init, **resample) \
            if cout != cin or up or down else None
        if self.num_heads:
            self.norm2, self.qkv = edm_group_norm(cout, eps), EDMConv(cout, cout * 3, 1, init_attn or init)
            self.proj = EDMConv(cout, cout, 1, init_zero)

    def forward(self, x, emb):
        y = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(y.dtype)  # (N, C or 2C, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            y = F.silu(shift + self.norm1(y) * (scale + 1))
        else:
            y = F.silu(self.norm1(y + params))
        y = self.conv1(F.dropout(y, p=self.dropout, training=self.training))
        x = (y + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            N, C, H, W = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(N * self.num_heads, C // self.num_heads, 3, H * W)  # (EDM) layout
            q, k, v = (u.transpose(1, 2) for u in qkv.unbind(2))  # (N·heads, HW, C_h)
            a = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C_h) v
            x = (self.proj(a.transpose(1, 2).reshape(N, C, H, W)) + x) * self.skip_scale
        return x


class EDMUNet(nn.Module):
    """EDM's SongUNet (DDPM++: positional embedding, standard encoder, filter [1, 1]; NCSN++: Fourier, residual,
    [1, 3, 3, 1]) or, with adm, its DhariwalUNet; defaults: UCGM's released UNet+ (dropout 0.2; EDM's CIFAR-10 0.13).
    forward(x, t, y) returns the raw network output F of the EDM transport, whose x_t is EDM's c_in·(x + σz), at EDM's
    c_noise = ¼·ln σ = 2.68t − 1.59 (Table 6). num_classes ≤ 1: no label layer (y ignored, as released); else y
    one-hot, the null label num_classes (and y None) the zero vector of EDM's dropped label."""
    def __init__(self, input_size=32, in_channels=3, num_classes=1, augment_dim=0, model_channels=128,
                 channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.2,
                 adm=False, embedding="positional", channel_mult_noise=1, encoder="standard", resample_filter=(1, 1),
                 grad_checkpoint=False):
        super().__init__()
        require(input_size % 2 ** (len(channel_mult) - 1) == 0, f"UNet+: input_size {input_size} must be divisible "
                f"by 2^{len(channel_mult) - 1} for its {len(channel_mult)} levels")
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.adm, self.augment_dim, self.grad_checkpoint = adm, augment_dim, grad_checkpoint
        emb, noise = model_channels * channel_mult_emb, model_channels * (1 if adm else channel_mult_noise)
        if adm:  # (EDM) DhariwalUNet: PyTorch's default init, adaptive scale, 64 channels a head
            init, init_zero = ("kaiming_uniform", math.sqrt(1 / 3), math.sqrt(1 / 3)), ("kaiming_uniform", 0, 0)
            block = partial(EDMBlock, emb_channels=emb, dropout=dropout, init=init, init_zero=init_zero)
        else:
            init, init_zero = ("xavier_uniform", 1, 0), ("xavier_uniform", 1e-5, 0)
            block = partial(EDMBlock, emb_channels=emb, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=("xavier_uniform", math.sqrt(0.2), 0))
        self.map_noise = None  # positional: no state; Fourier (NCSN++): EDM's frequencies 16·N(0, 1), a buffer
        if embedding == "fourier":
            self.map_noise = nn.Module()
            self.map_noise.register_buffer("freqs", 16 * torch.randn(noise // 2))
        self.map_label = edm_linear(num_classes, noise, init) if num_classes > 1 and not adm else None
        self.map_augment = edm_linear(augment_dim, noise, init_zero if adm else init, bias=False) if augment_dim \
            else None
        self.map_layer0, self.map_layer1 = edm_linear(noise, emb, init), edm_linear(emb, emb, init)
        if num_classes > 1 and adm:  # (EDM) ADM's labels join after the mapping layers, so they come after them
            self.map_label = edm_linear(num_classes, emb, ("kaiming_normal", math.sqrt(num_classes), 0), bias=False)
        self.enc, self.dec, c, aux = nn.ModuleDict(), nn.ModuleDict(), in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = input_size >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = EDMConv(c, model_channels * (mult if adm else 1), 3, init)
                c = self.enc[f"{res}x{res}_conv"].weight.shape[0]
            else:
                self.enc[f"{res}x{res}_down"] = block(c, c, down=True)
                if encoder == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = EDMConv(aux, aux, 0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = EDMConv(aux, c, 1, init)
                if encoder == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = EDMConv(aux, c, 3, init, down=True, fused=True,
                                                                    resample_filter=resample_filter)
                    aux = c
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = block(c, model_channels * mult, attention=res in attn_resolutions)
                c = model_channels * mult
        skips = [m.conv1.weight.shape[0] if isinstance(m, EDMBlock) else m.weight.shape[0]
                 for name, m in self.enc.items() if "aux" not in name]
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = input_size >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"], self.dec[f"{res}x{res}_in1"] = block(c, c, attention=True), block(c, c)
            else:
                self.dec[f"{res}x{res}_up"] = block(c, c, up=True)
            for i in range(num_blocks + 1):  # SongUNet attends in the last block of a level only
                self.dec[f"{res}x{res}_block{i}"] = block(c + skips.pop(), model_channels * mult, attention=res in
                                                         attn_resolutions and (adm or i == num_blocks))
                c = model_channels * mult
        head = (edm_group_norm(c, 1e-5 if adm else 1e-6), EDMConv(c, in_channels, 3, init_zero))
        if adm:
            self.out_norm, self.out_conv = head
        else:
            self.dec[f"{input_size}x{input_size}_aux_norm"], self.dec[f"{input_size}x{input_size}_aux_conv"] = head

    def embedding(self, t, y, dtype):
        """SiLU of the mapping network of the noise label and of the labels (EDM): [cos | sin] (SongUNet: [sin | cos])
        of c_noise times 2π·freqs (Fourier) or 10000^(−k/(C/2 − 1)) (positional; ADM: C/2), the latter in float64."""
        c_noise = 2.68 * t.flatten().to(dtype) - 1.59  # EDM's c_noise = ¼·ln σ(t) (Table 6)
        if self.map_noise is not None:
            freqs = 2 * math.pi * self.map_noise.freqs
        else:
            k = torch.arange(self.map_layer0.in_features // 2, dtype=torch.float64, device=t.device)
            freqs = (1 / 10000) ** (k / (len(k) - (not self.adm)))
        angles = torch.outer(c_noise, freqs.to(dtype))  # (N, C/2)
        emb = torch.cat([angles.cos(), angles.sin()] if self.adm else [angles.sin(), angles.cos()], dim=1)
        labels = None
        if self.map_label is not None:
            one_hot = F.one_hot(y, self.num_classes + 1)[:, :self.num_classes].to(dtype) if y is not None else \
                emb.new_zeros(len(emb), self.num_classes)  # the null label: zeros
            labels = self.map_label(one_hot if self.adm else one_hot * math.sqrt(self.num_classes))
        if self.map_augment is not None:  # EDM's label of an unaugmented image, zeros: its weights load, DDP sees them
            emb = emb + self.map_augment(emb.new_zeros(len(emb), self.augment_dim))
        if labels is not None and not self.adm:
            emb = emb + labels
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        return F.silu(emb + labels if labels is not None and self.adm else emb)

    def forward(self, x, t, y=None):
        """x (N, C, H, W), t (N,) in [0, 1] (1: noise), y (N,) int64 or None -> F (N, C, H, W)."""
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"UNet+: expected x of shape (N, {self.in_channels}, {self.input_size}, "
                             f"{self.input_size}), got {tuple(x.shape)}")
        emb, skips, aux, recompute = self.embedding(t, y, x.dtype), [], x, self.grad_checkpoint and self.training
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x) if name.endswith("_conv") else run_block(block, x, emb, recompute=recompute)
                skips.append(x)
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):  # SongUNet's output head
                return self.dec[name.replace("norm", "conv")](F.silu(block(x)))
            x = run_block(block, x if x.shape[1] == block.in_channels else torch.cat([x, skips.pop()], 1), emb,
                          recompute=recompute)
        return self.out_conv(F.silu(self.out_norm(x)))

    @property
    def blocks(self):
        """The U-Net blocks in the order they run (train.py compiles each)."""
        return [m for m in (*self.enc.values(), *self.dec.values()) if isinstance(m, EDMBlock)]

    def flops_per_forward(self):
        """Matmul FLOPs of one forward for one sample (unet_flops)."""
        return unet_flops(self, "proj.weight")


# UCGM's UNet+ (SongUNet DDPM++, the released defaults) and EDM's NCSN++ (CIFAR-10) and ADM (ImageNet-64) U-Nets (EDM
# train.py); T (tiny) is no paper size but the tests' CPU model
MODELS.update({"UNet+": {}, "UNet+-NCSN++": dict(embedding="fourier", channel_mult_noise=2, encoder="residual",
                                                 resample_filter=(1, 3, 3, 1), dropout=0.13),
               "UNet+-ADM": dict(adm=True, model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                                 attn_resolutions=(32, 16, 8), dropout=0.1),
               "UNet+-T": dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                               channel_mult_emb=2, dropout=0.0)})


#################################################################################
#                       The autoencoder: LDM AutoencoderKL                      #
#################################################################################

def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """(GroupNorm -> SiLU -> conv3×3) twice, plus a 1×1 shortcut when the width changes."""
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, with 1×1-conv projections."""
    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.norm(x)
        # (N, 1, H·W, C), contiguous: CUDA's fused kernels need a last-dim stride of 1, else SDPA falls back to the
        # math kernel and its (H·W)² fp32 matrix per image
        q, k, v = (proj(h).reshape(N, 1, C, H * W).transpose(2, 3).contiguous() for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C) v, (N, 1, H·W, C)
        return x + self.proj_out(h.transpose(2, 3).reshape(N, C, H, W))


class Resample(nn.Module):
    """×2 nearest upsampling then conv3×3, or conv3×3 with stride 2 after padding right and bottom by one."""
    def __init__(self, channels, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Level(nn.Module):
    """One resolution: ResNet blocks, each followed by attention at attention levels, then a resampling
    stored as `downsample` or `upsample` (the LDM weight names)."""
    def __init__(self, cin, cout, num_blocks, attention, resample=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(num_blocks if attention else 0))
        self.resample = resample
        if resample:
            self.add_module(resample, Resample(cout, up=resample == "upsample"))

    def forward(self, h):
        for i, block in enumerate(self.block):
            h = block(h)
            h = self.attn[i](h) if self.attn else h
        return getattr(self, self.resample)(h) if self.resample else h


class Middle(nn.Module):
    """ResNet block -> attention -> ResNet block at the lowest resolution."""
    def __init__(self, channels):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (N, 3, H, W) -> posterior moments (N, 2C, H/f, W/f), f = 2^(levels - 1)."""
    def __init__(self, channels, ch_mult, attn_levels, ch=128, num_blocks=2):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList(Level(([ch] + widths)[i], w, num_blocks, i in attn_levels,
                                        "downsample" if i < len(widths) - 1 else None) for i, w in enumerate(widths))
        self.mid = Middle(widths[-1])
        self.norm_out, self.conv_out = group_norm(widths[-1]), nn.Conv2d(widths[-1], 2 * channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latents (N, C, h, w) -> image (N, 3, f·h, f·w); `up[i]` works at the resolution of `down[i]`."""
    def __init__(self, channels, ch_mult, attn_levels, ch=128, num_blocks=2):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(channels, widths[-1], 3, padding=1)
        self.mid = Middle(widths[-1])
        self.up = nn.ModuleList(Level((widths + [widths[-1]])[i + 1], w, num_blocks + 1, i in attn_levels,
                                      "upsample" if i > 0 else None) for i, w in enumerate(widths))
        self.norm_out, self.conv_out = group_norm(widths[0]), nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The LDM KL autoencoder of SD-VAE and VA-VAE; images in [-1, 1] <-> latents. With unit_pixels (EDM2's use of
    SD-VAE) the network sees pixels in [0, 1] and its decode is clamped to [0, 1]."""
    def __init__(self, channels, ch_mult, attn_levels=(), sample_posterior=False, ch=128, unit_pixels=False):
        super().__init__()
        self.channels, self.factor, self.sample_posterior = channels, 2 ** (len(ch_mult) - 1), sample_posterior
        self.unit_pixels = unit_pixels
        self.encoder = Encoder(channels, ch_mult, attn_levels, ch)
        self.decoder = Decoder(channels, ch_mult, attn_levels, ch)
        self.quant_conv = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.post_quant_conv = nn.Conv2d(channels, channels, 1)

    def encode(self, images, noise=None):
        """The posterior mean, or the posterior sample mean + std · noise when noise (N, C, h, w) is given."""
        images = (images + 1) / 2 if self.unit_pixels else images  # EDM2 encodes x/255
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        if noise is None:
            return mean
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise  # LDM's clamp of the log-variance

    def decode(self, latents):
        """Images in [-1, 1] (raw, unclamped), or EDM2's clamp(decode, 0, 1) mapped to [-1, 1] with unit_pixels."""
        images = self.decoder(self.post_quant_conv(latents))
        return images.clamp(0, 1) * 2 - 1 if self.unit_pixels else images


class PixelSpace(nn.Module):
    """The identity autoencoder: the latents are the pixels."""
    channels, factor, sample_posterior = 3, 1, False

    def encode(self, images, noise=None):
        return images

    def decode(self, latents):
        return latents


# SD-VAE (sd-vae-ft-ema / -mse, encoded by the posterior mean) and VA-VAE (LightningDiT's f16d32,
# with attention at the 16×16 level of 256-px images and encoded by a posterior sample, as its models were trained)
# REPA-E's end-to-end tuned E2E-VAEs (e2e-vavae, e2e-sdvae) share these architectures and are encoded by the mean;
# edm2sdvae is SD-VAE (sd-vae-ft-mse) as EDM2 uses it: [0, 1] pixels, a posterior sample, a clamped decode
AUTOENCODERS = {"sdvae": dict(channels=4, ch_mult=(1, 2, 4, 4)),
                "vavae": dict(channels=32, ch_mult=(1, 1, 2, 2, 4), attn_levels=(4,), sample_posterior=True),
                "e2esdvae": dict(channels=4, ch_mult=(1, 2, 4, 4)),
                "e2evavae": dict(channels=32, ch_mult=(1, 1, 2, 2, 4), attn_levels=(4,)),
                "edm2sdvae": dict(channels=4, ch_mult=(1, 2, 4, 4), sample_posterior=True, unit_pixels=True),
                "dcae": dict(channels=32, widths=(128, 256, 512, 512, 1024, 1024), encoder_depths=(0, 4, 8, 2, 2, 2),
                             decoder_depths=(0, 5, 10, 2, 2, 2))}  # DC-AE f32c32 (a DCAE, the section below)
# EDM2's latent statistics in the (mean, std) form of latents_stats.pt: EDM2 maps raw latents by
# (raw − mean)·0.5/raw_std, so std = raw_std / 0.5 (its StabilityVAEEncoder defaults); the default of edm2sdvae
DEFAULT_LATENT_STATS = {"edm2sdvae": dict(mean=torch.tensor([5.81, 3.25, 0.12, -2.15]),
                                          std=torch.tensor([4.17, 4.62, 3.71, 3.28]) / 0.5)}
# the released UCGM configs' `vae.type` names of these autoencoders (sdvae_f8c4 is sd-vae-ft-mse, idae_f1c3 pixels)
RELEASED_AUTOENCODERS = {"sdvae_f8c4": "sdvae", "sdvae_ema_f8c4": "sdvae", "vavae_f16d32": "vavae",
                         "e2evae_f8d4": "e2esdvae", "e2evavae_f16d32": "e2evavae", "idae_f1c3": "identity",
                         "edm2_sdvae_f8c4": "edm2sdvae", "edm2_sdvae_ema_f8c4": "edm2sdvae", "dcae_f32c32": "dcae"}
# the same weights under diffusers' names: (LDM pattern, diffusers replacement) applied in order
DIFFUSERS_NAMES = [(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
                   (r"\.mid\.attn_1\.", ".mid_block.attentions.0."),
                   (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
                   (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
                   (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
                   (r"\.nin_shortcut\.", ".conv_shortcut."), (r"\.norm_out\.", ".conv_norm_out."),
                   (r"\.norm\.", ".group_norm."), (r"\.q\.", ".to_q."), (r"\.k\.", ".to_k."), (r"\.v\.", ".to_v."),
                   (r"\.proj_out\.", ".to_out.0.")]
OLD_DIFFUSERS_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def diffusers_name(key, levels):
    """The diffusers name of an LDM weight name; the decoder's levels are numbered from the bottom there."""
    up = re.match(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.(.*)$", key)
    if up:
        kind = {"block": "resnets", "attn": "attentions", "upsample": "upsamplers.0"}[up[2]]
        key = f"decoder.up_blocks.{levels - 1 - int(up[1])}.{kind}.{up[3]}"
    for pattern, replacement in DIFFUSERS_NAMES:
        key = re.sub(pattern, replacement, key)
    return key


def autoencoder_file(path):
    """The weights of an autoencoder file: a state dict, or a checkpoint holding one as `state_dict`."""
    state = load_tensor_file(path, "--vae-path")
    state = tensor_dict(state.get("state_dict", state) if isinstance(state, dict) else state, f"--vae-path {path}")
    return {k.removeprefix("first_stage_model."): v for k, v in state.items()}  # a whole LDM/SD checkpoint


def load_autoencoder_weights(model, path):
    """Load an LDM-layout, diffusers-layout (.bin/.safetensors) or VA-VAE .pt file; name the first bad key."""
    state, expected = autoencoder_file(path), model.state_dict()
    if any(".down_blocks." in k or ".mid_block." in k for k in state):  # the diffusers layout: rename to LDM
        to_ldm, renamed = {diffusers_name(k, len(model.decoder.up)): k for k in expected}, {}
        for key, value in state.items():
            for old, new in OLD_DIFFUSERS_NAMES.items():
                key = key.replace(old, new)
            key = to_ldm.get(key, key)
            if key in expected and value.dim() == 2 and expected[key].dim() == 4:
                value = value[:, :, None, None]  # diffusers' attention Linear (C, C) -> 1×1 conv (C, C, 1, 1)
            renamed[key] = value
        state = renamed
    state = checked_state_dict(expected, state, f"--vae-path {path}")  # loss/DINOv2 extras dropped
    model.to_empty(device="cpu").load_state_dict(state)  # every weight comes from the file
    return model


def checked_state_dict(expected, state, where, strict=False):
    """The entries of state that match the state dict `expected`; a missing or misshapen key (or, if strict, an
    extra one) is a one-line ValueError naming it."""
    for key, value in expected.items():
        if key not in state:
            raise ValueError(f"{where}: missing key {key!r} (weights of another architecture?)")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{where}: key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    extra = [key for key in state if key not in expected]
    if strict and extra:
        raise ValueError(f"{where}: unexpected key {extra[0]!r} (weights of another architecture?)")
    return {key: state[key] for key in expected}


def autoencoder_architecture(name):
    """The AutoencoderKL, or the DCAE for `dcae`, of an AUTOENCODERS name, with random weights."""
    return (DCAE if name == "dcae" else AutoencoderKL)(**AUTOENCODERS[name])


def create_autoencoder(name, path=None):
    """`identity`, or an autoencoder of AUTOENCODERS loaded from a local weight file (nothing is downloaded)."""
    if name == "identity":
        return PixelSpace()
    if name not in AUTOENCODERS:
        raise ValueError(f"--vae {name}: expected one of {['identity', *AUTOENCODERS]}")
    if path is None:
        raise ValueError(f"--vae {name} needs --vae-path (a local weight file)")
    with torch.device("meta"):  # shapes only: initialising weights that the file replaces takes seconds for DC-AE
        model = autoencoder_architecture(name)
    return (load_dcae_weights if isinstance(model, DCAE) else load_autoencoder_weights)(model, path).eval()


#################################################################################
#                   The autoencoder: DC-AE (deep compression)                   #
#################################################################################

class ChannelRMSNorm(RMSNorm):
    """RMSNorm over the channels of (N, C, H, W) with a weight and a bias, eps 1e-5 (efficientvit's trms2d)."""
    def __init__(self, channels):
        super().__init__(channels, affine=True, eps=1e-5)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return (super().forward(x.movedim(1, -1)) + self.bias).movedim(-1, 1)


class ConvLayer(nn.Module):
    """A conv with "same" padding, then a norm and an activation if given (efficientvit's ConvLayer)."""
    def __init__(self, cin, cout, kernel=3, bias=True, norm=None, act=None, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=bias)
        self.norm, self.act = norm(cout) if norm else None, act

    def forward(self, x):
        x = self.conv(x)
        x = self.norm(x) if self.norm is not None else x
        return self.act(x) if self.act else x


class Ops(nn.Module):
    """Modules applied in order, kept as `op_list` (efficientvit's OpSequential, whose name the weights carry)."""
    def __init__(self, ops):
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x):
        for op in self.op_list:
            x = op(x)
        return x


class Residual(nn.Module):
    """main(x) + shortcut(x), the shortcut a weightless function (the identity if none)."""
    def __init__(self, main, shortcut=None):
        super().__init__()
        self.main, self.shortcut = main, shortcut

    def forward(self, x):
        return self.main(x) + (self.shortcut(x) if self.shortcut else x)


def averaged_channels(x, channels, factor):
    """A Down's shortcut: pixel-unshuffle by factor, then the mean of each run of consecutive channels."""
    x = F.pixel_unshuffle(x, factor)
    return x.unflatten(1, (channels, -1)).mean(2)  # (N, channels, group, h, w) -> (N, channels, h, w)


def duplicated_channels(x, channels, factor):
    """An Up's shortcut: each channel repeated, then pixel-shuffled by factor into `channels` channels."""
    return F.pixel_shuffle(x.repeat_interleave(channels * factor ** 2 // x.shape[1], dim=1), factor)


class Resize(nn.Module):
    """Down: conv3×3 to cout/4 channels, then pixel-unshuffle (half the size); up: conv3×3 to 4·cout channels, then
    pixel-shuffle (twice the size); cout channels either way."""
    def __init__(self, cin, cout, up):
        super().__init__()
        self.conv = ConvLayer(cin, 4 * cout if up else cout // 4)
        self.shuffle = F.pixel_shuffle if up else F.pixel_unshuffle

    def forward(self, x):
        return self.shuffle(self.conv(x), 2)


class ResBlock(nn.Module):
    """conv3×3 with bias -> activation -> conv3×3 without bias -> norm (the residual is a Residual's)."""
    def __init__(self, width, norm, act):
        super().__init__()
        self.conv1 = ConvLayer(width, width, act=act)
        self.conv2 = ConvLayer(width, width, bias=False, norm=norm)

    def forward(self, x):
        return self.conv2(self.conv1(x))


def linear_attention(q, k, v, eps=1e-15):
    """out_n = Σ_m v_m (k_m·q_n) / (Σ_m k_m·q_n + eps) over positions m, n of (N, heads, d, H·W) tensors, as
    (v kᵀ) q: v gets a row of ones, whose product is the denominator."""
    vk = F.pad(v, (0, 0, 0, 1), value=1.0) @ k.transpose(2, 3)  # (N, heads, d + 1, d)
    out = vk @ q  # (N, heads, d + 1, H·W)
    return out[:, :, :-1] / (out[:, :, -1:] + eps)


def quadratic_attention(q, k, v, eps=1e-15):
    """The same out_n as linear_attention, as v (kᵀ q) with the (H·W)² score matrix normalised over m."""
    scores = k.transpose(2, 3) @ q  # (N, heads, H·W keys m, H·W queries n)
    return v @ (scores / (scores.sum(2, keepdim=True) + eps))


class LiteMLA(nn.Module):
    """ReLU linear attention (efficientvit's LiteMLA, no multi-scale branch): head h slices its q, k, v from the
    3·head_dim qkv channels [3·head_dim·h, 3·head_dim·(h + 1)); the linear form when the map has more positions than
    head_dim, else the quadratic one, both in float32; then a 1×1 projection and a norm."""
    def __init__(self, width, norm, head_dim):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = ConvLayer(width, 3 * width, 1, bias=False)
        self.proj = ConvLayer(width, width, 1, bias=False, norm=norm)

    def forward(self, x):
        N, C, H, W = x.shape
        with torch.autocast(x.device.type, enabled=False):
            qkv = self.qkv(x).float().reshape(N, C // self.head_dim, 3 * self.head_dim, H * W)  # (N, heads, 3d, H·W)
            q, k, v = qkv.split(self.head_dim, dim=2)
            attention = linear_attention if H * W > self.head_dim else quadratic_attention
            out = attention(F.relu(q), F.relu(k), v).reshape(N, C, H, W).type_as(x)
        return self.proj(out)


class GLUMBConv(nn.Module):
    """1×1 conv to 2·expand·C with an activation, depthwise 3×3, x·act(gate), 1×1 conv back to C, norm."""
    def __init__(self, width, norm, act, expand=4):
        super().__init__()
        mid = expand * width
        self.inverted_conv = ConvLayer(width, 2 * mid, 1, act=act)
        self.depth_conv = ConvLayer(2 * mid, 2 * mid, 3, groups=2 * mid)
        self.point_conv = ConvLayer(mid, width, 1, bias=False, norm=norm)
        self.act = act

    def forward(self, x):
        x, gate = self.depth_conv(self.inverted_conv(x)).chunk(2, dim=1)
        return self.point_conv(x * self.act(gate))


class EfficientViTBlock(nn.Module):
    """x + LiteMLA(x), then x + GLUMBConv(x)."""
    def __init__(self, width, norm, act, head_dim):
        super().__init__()
        self.context_module = Residual(LiteMLA(width, norm, head_dim))
        self.local_module = Residual(GLUMBConv(width, norm, act))

    def forward(self, x):
        return self.local_module(self.context_module(x))


def resized(cin, cout, up):
    """A stage's Down with its averaging shortcut, or Up with its duplicating shortcut."""
    return Residual(Resize(cin, cout, up), partial(duplicated_channels if up else averaged_channels, channels=cout,
                                                  factor=2))


def dcae_blocks(width, depth, attention, norm, act, head_dim):
    """A stage's `depth` blocks: EfficientViT blocks in attention stages, else ResBlocks with their residual."""
    if attention:
        return [EfficientViTBlock(width, norm, act, head_dim) for _ in range(depth)]
    return [Residual(ResBlock(width, norm, act)) for _ in range(depth)]


class DCAEEncoder(nn.Module):
    """Image (N, 3, H, W) -> latents (N, C, H/f, W/f), f = 2^(stages - 1): a Down to widths[1] (stage 0 is empty),
    each stage's blocks and a Down with an averaging shortcut (but the last), a conv3×3 with one onto the latents."""
    def __init__(self, channels, widths, depths, attention_from, head_dim):
        super().__init__()
        self.project_in = Resize(3, widths[1], up=False)
        last = len(widths) - 1
        self.stages = nn.ModuleList()
        for i, (width, depth) in enumerate(zip(widths, depths)):
            down = [resized(width, widths[i + 1], up=False)] if i < last and depth > 0 else []
            self.stages.append(Ops(dcae_blocks(width, depth, i >= attention_from, ChannelRMSNorm, F.silu, head_dim) +
                                   down))
        self.project_out = Residual(Ops([ConvLayer(widths[-1], channels)]),
                                    partial(averaged_channels, channels=channels, factor=1))

    def forward(self, x):
        x = self.project_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.project_out(x)


class DCAEDecoder(nn.Module):
    """Latents (N, C, h, w) -> image (N, 3, f·h, f·w): a conv3×3 with a duplicating shortcut, the stages from the
    last, each an Up with a duplicating shortcut (but the last) and its blocks (BatchNorm + ReLU in the first
    `batch_norm_stages`, RMSNorm + SiLU after), then RMSNorm, ReLU and an Up to the pixels."""
    def __init__(self, channels, widths, depths, attention_from, head_dim, batch_norm_stages):
        super().__init__()
        self.project_in = Residual(ConvLayer(channels, widths[-1]),
                                   partial(duplicated_channels, channels=widths[-1], factor=1))
        stages, last = [], len(widths) - 1
        for i, (width, depth) in enumerate(zip(widths, depths)):
            norm, act = (nn.BatchNorm2d, F.relu) if i < batch_norm_stages else (ChannelRMSNorm, F.silu)
            up = [resized(widths[i + 1], width, up=True)] if i < last and depth > 0 else []
            stages.append(Ops(up + dcae_blocks(width, depth, i >= attention_from, norm, act, head_dim)))
        self.stages = nn.ModuleList(stages)
        self.project_out = Ops([ChannelRMSNorm(widths[1]), nn.ReLU(), Resize(widths[1], 3, up=True)])

    def forward(self, z):
        h = self.project_in(z)
        for stage in reversed(self.stages):
            h = stage(h)
        return self.project_out(h)


class DCAE(nn.Module):
    """MIT Han Lab's deep-compression autoencoder: images in [-1, 1] <-> latents, deterministic (no posterior).
    Stage i has width widths[i] and depth encoder_depths[i] / decoder_depths[i]; EfficientViT blocks from stage
    `attention_from` on, ResBlocks before; each stage but the last halves the size (stage 0 is empty)."""
    sample_posterior = False

    def __init__(self, channels, widths, encoder_depths, decoder_depths, attention_from=3, batch_norm_stages=3,
                 head_dim=32):
        super().__init__()
        require(encoder_depths[0] == decoder_depths[0] == 0, "DCAE: stage 0 must be empty (depth 0), as in DC-AE")
        self.channels, self.factor = channels, 2 ** (len(widths) - 1)
        self.encoder = DCAEEncoder(channels, widths, encoder_depths, attention_from, head_dim)
        self.decoder = DCAEDecoder(channels, widths, decoder_depths, attention_from, head_dim, batch_norm_stages)

    def encode(self, images, noise=None):
        """The latents; `noise` is unused (there is no posterior to sample)."""
        return self.encoder(images)

    def decode(self, latents):
        return self.decoder(latents)


# diffusers' AutoencoderDC names of the efficientvit weight names: (substring, replacement) applied in order; then
# each fused qkv conv (3C, C, 1, 1) is split in thirds into to_q, to_k, to_v (C, C) and proj into to_out (C, C)
DCAE_DIFFUSERS_NAMES = [("main.", ""), ("op_list.", ""), ("context_module", "attn"), ("local_module", "conv_out"),
                        ("depth_conv.conv", "conv_depth"), ("inverted_conv.conv", "conv_inverted"),
                        ("point_conv.conv", "conv_point"), ("point_conv.norm", "norm"), ("conv.conv.", "conv."),
                        ("conv1.conv", "conv1"), ("conv2.conv", "conv2"), ("conv2.norm", "norm"),
                        ("proj.norm", "norm_out"), ("encoder.project_in.conv", "encoder.conv_in.conv"),
                        ("encoder.project_out.0.conv", "encoder.conv_out"), ("encoder.stages", "encoder.down_blocks"),
                        ("decoder.project_in.conv", "decoder.conv_in"), ("decoder.project_out.0", "decoder.norm_out"),
                        ("decoder.project_out.2.conv", "decoder.conv_out.conv"),
                        ("decoder.stages", "decoder.up_blocks")]


def dcae_from_diffusers(state, expected):
    """A diffusers-layout DC-AE state dict under the efficientvit names of `expected`: to_q, to_k, to_v fused back
    into one qkv 1×1 conv, to_out made the proj 1×1 conv, the rest renamed."""
    to_ours = {reduce(lambda name, rule: name.replace(*rule), DCAE_DIFFUSERS_NAMES, k): k for k in expected}
    state = dict(state)
    for key in [k for k in state if k.endswith(".to_q.weight")]:
        block = key.removesuffix(".to_q.weight")
        if f"{block}.to_k.weight" in state and f"{block}.to_v.weight" in state:
            qkv = torch.cat([state.pop(f"{block}.to_{part}.weight") for part in "qkv"])  # (3C, C)
            state[f"{block}.qkv.conv.weight"] = qkv[:, :, None, None]
    for key in [k for k in state if k.endswith(".to_out.weight")]:
        state[key.replace(".to_out.", ".proj.conv.")] = state.pop(key)[:, :, None, None]
    return {to_ours.get(key, key): value for key, value in state.items()}


def load_dcae_weights(model, path):
    """Load an efficientvit-layout (a state dict, as dcae_f32c32.ckpt or the Hub's model.safetensors) or
    diffusers-layout (AutoencoderDC .safetensors/.bin) DC-AE file, told apart by the keys; name the first bad key."""
    state, expected = autoencoder_file(path), model.state_dict()
    if any(".down_blocks." in k or ".up_blocks." in k for k in state):  # the diffusers layout
        state = dcae_from_diffusers(state, expected)
    model.to_empty(device="cpu").load_state_dict(checked_state_dict(expected, state, f"--vae-path {path}"))
    return model


#################################################################################
#   Checkpoints: ours, released UCGM, SiT/REPA, LightningDiT, DDT, EDM2, EDM    #
#################################################################################

def weights_of(checkpoint, key, where):
    """The `key` weights (model or ema) of a checkpoint that holds them, else the checkpoint itself as a bare state
    dict, without the prefixes that DDP and torch.compile add."""
    state = next((checkpoint[k] for k in (key, "ema", "model") if isinstance(checkpoint.get(k), dict)), checkpoint) \
        if isinstance(checkpoint, dict) else checkpoint
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in tensor_dict(state, where).items()}


# a released UCGM config's `sample` section (the settings behind its published FID) under our argument names
RELEASED_SAMPLER_NAMES = {"sampling_steps": "steps", "stochast_ratio": "rho", "extrapol_ratio": "kappa",
                          "sampling_order": "order", "time_dist_ctrl": "warp", "rfba_gap_steps": "gaps",
                          "cfg_scale": "cfg_scale", "cfg_interval": "cfg_interval"}
# what the weights of each family imply (README, "Reproducing the paper"): LightningDiT was trained on the ReLinear
# path, and its released results guide only the first 3 of its 32 latent channels
FAMILY_SETTINGS = {"DiT": {}, "TiT": {}, "LightningDiT": dict(transport="ReLinear", sampler=dict(cfg_channels=3)),
                   "DDT": dict(transport="ReLinear"),  # DDT guides all its channels
                   "EDM2": dict(transport="EDM", sampler=dict(cfg_scale=1.0)),  # EDM2's released rows: no guidance
                   "UNet+": dict(transport="EDM", sampler=dict(cfg_scale=1.0))}  # EDM's and Table 7's: no guidance
# weights in REPA / REPA-E checkpoints that neither sampling nor UCGM training uses
REPA_EXTRAS = {"projectors.": "REPA's feature-alignment heads", "bn.": "REPA-E's latent BatchNorm statistics"}


def family_of(state):
    """DiT (also SiT, REPA, REPA-E), TiT, LightningDiT, DDT, EDM2 or UNet+, told from the weight names."""
    if "emb_fourier.freqs" in state or "unet.emb_fourier.freqs" in state:  # EDM2's noise embedding (or its Precond's)
        return "EDM2"
    if "map_layer0.weight" in state:  # EDM's mapping network (SongUNet and DhariwalUNet)
        return "UNet+"
    if "s_embedder.proj.weight" in state and state["s_embedder.proj.weight"].dim() == 2:  # DDT's encoder patches
        return "DDT"
    if "blocks.0.norm1.weight" in state:  # only LightningDiT's RMSNorm has a weight
        return "LightningDiT"
    return "TiT" if "blocks.0.mlp.w12.weight" in state else "DiT"


def check_released_autoencoder(settings, where):
    """One line if the released config of a checkpoint names an autoencoder we lack (an explicit --vae skips this)."""
    require(settings.get("released_vae") in (None, *RELEASED_AUTOENCODERS), f"{where}: its config names autoencoder "
            f"{settings.get('released_vae')!r}, which is not supported here (supported: {', '.join(RELEASED_AUTOENCODERS)}"
            f"); give --vae")


def released_settings(config, where):
    """Model, transport, lam, latent handling and sampler defaults of a released UCGM training config."""
    model = re.sub(r"^SiT-", "DiT-", config["model"]["type"])  # UCGM's SiT is our DiT family
    if model not in MODELS:
        raise ValueError(f"{where}: its config names model {config['model']['type']!r}, which is not supported here "
                         f"(DiT/SiT, TiT, LightningDiT, DDT, EDM2 and UNet+ are)")
    vae = config.get("vae", {}).get("type")  # one we lack is named where it would be used, unless --vae is given
    data, sample, family = config.get("data", {}), config.get("sample", {}), FAMILY_SETTINGS[model.split("-")[0]]
    sizes = dict(in_channels=config["model"].get("in_chans"), num_classes=data.get("num_classes"),
                 input_size=data["image_size"] // config["vae"]["downsample_ratio"]
                 if "image_size" in data and "downsample_ratio" in config.get("vae", {}) else None)  # as its eval.py
    sampler = {ours: sample[theirs] for theirs, ours in RELEASED_SAMPLER_NAMES.items() if theirs in sample}
    if "cfg_scale" in sampler and sampler["cfg_scale"] <= 0:  # the released evaluation guides only when > 0
        sampler["cfg_scale"] = 1.0
    return dict(family, model=model, transport=config["transport"]["type"],
                lam=config["transport"].get("consistc_ratio", 0.0), sampler={**family.get("sampler", {}), **sampler},
                latent_multiplier=data.get("latent_multiplier", 1.0), latent_norm=data.get("latent_norm", False),
                vae=RELEASED_AUTOENCODERS.get(vae), released_vae=vae,
                sizes={k: v for k, v in sizes.items() if v is not None}, seed=config.get("train", {}).get("global_seed"),
                released_stats=f"buffers/vaes/stat/{vae}_{data.get('image_size')}.pt")  # its eval.py's stats file


def read_checkpoint(path, weights, flag):
    """(state dict, settings) of our checkpoints, released UCGM ones (with their `config`) or the weights of SiT,
    REPA, REPA-E and LightningDiT; settings say how the model was trained and is meant to be sampled."""
    torch.serialization.add_safe_globals([argparse.Namespace])  # REPA and REPA-E save their flags as a Namespace
    checkpoint = load_tensor_file(path, flag)
    where = f"{flag} {path}"
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    released = isinstance(config, dict) and "type" in config.get("model", {})  # LightningDiT's says model_type
    settings = released_settings(config, where) if released else None  # an unsupported model is named first
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):  # a Lightning checkpoint
        checkpoint = lightning_weights(checkpoint["state_dict"], weights, where)
    state = edm2_weights(weights_of(checkpoint, weights, where), where)
    for prefix, what in REPA_EXTRAS.items():
        extra = [key for key in state if key.startswith(prefix)]
        if extra:
            print(f"{where}: dropping the {len(extra)} weights {prefix}* ({what}), unused here")
            state = {key: value for key, value in state.items() if not key.startswith(prefix)}
    if isinstance(checkpoint.get("args"), dict):  # ours: the resolved train.py flags and the latent statistics
        args = checkpoint["args"]
        settings = dict(model=args["model"], transport=args["transport"], lam=args["lam"],
                        latent_multiplier=args["latent_multiplier"], vae=args["vae"], vae_path=args.get("vae_path"),
                        latent_stats=checkpoint.get("latent_stats"))
    elif not released:
        settings = dict(FAMILY_SETTINGS[family_of(state)])
        if "latent_stats" in checkpoint:  # an EDM2 pickle's, from its latent encoder
            settings["latent_stats"] = checkpoint["latent_stats"]
    return state, settings


def lightning_weights(state, weights, where):
    """The network of an MCG-NJU/DDT Lightning checkpoint's state_dict: ema_denoiser.* (or, for --weights model,
    denoiser.*) without the prefix; the other weights (the online or EMA copy, REPA's diffusion_trainer.*) dropped
    with one line."""
    prefix = {"ema": "ema_denoiser.", "model": "denoiser."}[weights]
    taken = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    dropped = sorted({key.split(".")[0] + ".*" for key in state if not key.startswith(prefix)})
    print(f"{where}: a Lightning checkpoint: taking its {len(taken)} weights {prefix}*, dropping the "
          f"{len(state) - len(taken)} weights {', '.join(dropped) or 'none'}")
    return taken


def infer_ddt(state, name, where, sizes):
    """(name, create_model kwargs) of DDT weights: they hold no position table, so the latent size comes from
    `sizes` (a released config or a flag), the patch size from the name or from sizes' in_channels."""
    width, patch_values = state["x_embedder.proj.weight"].shape  # (D, C·p·p)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    channels = sizes.get("in_channels")

    def fits(patch):  # p² divides the values of a patch, which are in_channels·p² where in_channels is known
        return patch_values % patch ** 2 == 0 and channels in (None, patch_values // patch ** 2)
    if name is None:
        matches = [n for n, c in MODELS.items() if n.startswith("DDT-") and fits(c["patch_size"])
                   and (c["hidden_size"], c["depth"]) == (width, depth)]
        require(len(matches) == 1, f"{where}: a DDT of width {width}, depth {depth} with {patch_values} values a "
                f"patch matches {matches or 'no model'}; give --model")
        name = matches[0]
    require("input_size" in sizes, f"{where}: DDT weights do not tell the latent size (no position table); give "
            "--input-size (32 for DDT-XL/2 at 256 px, 64 at 512 px) or a checkpoint with its released config")
    return name, {"in_channels": patch_values // MODELS[name]["patch_size"] ** 2,
                  "num_classes": state["y_embedder.embedding_table.weight"].shape[0] - 1, **sizes}


def infer_model(state, name=None, where="--ckpt", sizes=None):
    """(model name, create_model kwargs): the data shape from the weights (`sizes`, of a released config or flags,
    give what DDT's weights do not tell), the name given or matched by shape."""
    family = family_of(state)
    if family == "DDT":
        return infer_ddt(state, name, where, sizes or {})
    if family == "EDM2":
        return infer_edm2(state, name, where)
    if family == "UNet+":
        return infer_unetplus(state, name, where)
    width, channels, patch, _ = state["x_embedder.proj.weight"].shape
    grid = math.isqrt(state["pos_embed"].shape[1])
    table = state.get("y_embedder.embedding_table.weight")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    if name is None:
        matches = [n for n, c in MODELS.items() if n.split("-")[0] == family
                   and (c["hidden_size"], c["depth"], c["patch_size"]) == (width, depth, patch)]
        if not matches:
            raise ValueError(f"{where}: a {family} of width {width}, depth {depth}, patch {patch} matches no model; "
                             f"give --model")
        name = matches[0]
    out_channels = state["final_layer.linear.weight"].shape[0] // patch ** 2
    return name, {**(sizes or {}), "input_size": grid * patch, "in_channels": channels,  # the weights tell them all
                  "learn_sigma": out_channels == 2 * channels,
                  "num_classes": table.shape[0] - 1 if table is not None else 1}


def load_network(path, weights="ema", name=None, flag="--ckpt", sizes=None):
    """(model, name, settings): the network of any checkpoint read_checkpoint reads, built and loaded strictly;
    `sizes` (input_size, ...) given by flags win over a released config's."""
    state, settings = read_checkpoint(path, weights, flag)
    if "x_embedder.proj.weight" not in state and family_of(state) not in ("EDM2", "UNet+"):
        raise ValueError(f"{flag} {path}: holds no DiT-family weights (no x_embedder.proj.weight), no EDM2 and no "
                         "UNet+ ones")
    sizes = {**settings.get("sizes", {}), **(sizes or {})}
    name, kwargs = infer_model(state, name or settings.get("model"), f"{flag} {path}", sizes)
    with torch.device("meta"):  # shapes only: initialising weights that are then overwritten takes 10 s at XL size
        model = create_model(name, **kwargs)
    where = f"{flag} {path} (as --model {name})"
    model.load_state_dict(checked_state_dict(model.state_dict(), state, where, strict=True), assign=True)
    return model.float(), name, settings


# ----- EDM2 and EDM: their Precond weights and network pickles, read without running their code ---------------------

def edm2_weights(state, where):
    """The 200 U-Net weights of an EDM2 `Precond` state dict (`unet.` prefix, 203 keys); other states unchanged."""
    if "unet.emb_fourier.freqs" not in state:
        return state
    head = [key for key in state if key.startswith("logvar_")]
    print(f"{where}: dropping the {len(head)} weights logvar_* (EDM2's uncertainty head), unused here")
    return {key.removeprefix("unet."): value for key, value in state.items() if key not in head}


def infer_edm2(state, name, where):
    """(model name, create_model kwargs) of EDM2 U-Net weights: model_channels from emb_noise.weight (C_emb, mc),
    the channels from out_conv, the input size from the first layer's name enc.{r}x{r}_conv, the classes from
    emb_label."""
    first = next((key for key in state if re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", key)), "enc.{r}x{r}_conv.weight")
    missing = next((key for key in ("emb_noise.weight", "out_conv.weight", first) if key not in state), None)
    require(missing is None, f"{where}: missing key {missing!r} (EDM2 weights of another architecture?)")
    channels = state["emb_noise.weight"].shape[1]
    if name is None:
        matches = [n for n, c in MODELS.items() if n.startswith("EDM2-") and c["model_channels"] == channels]
        require(matches, f"{where}: an EDM2 U-Net with {channels} model channels matches no model; give --model")
        name = matches[0]
    label = state.get("emb_label.weight")
    return name, dict(input_size=int(re.match(r"enc\.(\d+)x", first)[1]), in_channels=state["out_conv.weight"].shape[0],
                      num_classes=label.shape[1] if label is not None else 0)


def infer_unetplus(state, name, where):
    """(model name, create_model kwargs) of EDM's SongUNet / DhariwalUNet weights (and UCGM's UNet+): the levels
    {r}x{r} and blocks from the names, the widths from enc.{r}x{r}_block0.conv1, the variant from map_noise.freqs
    (Fourier), aux_residual / aux_skip (encoder), out_conv (ADM) and the resample_filter buffers; dropout not told."""
    first = next((key for key in state if re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", key)), "enc.{r}x{r}_conv.weight")
    missing = next((key for key in ("map_layer0.weight", first) if key not in state), None)
    require(missing is None, f"{where}: missing key {missing!r} (UNet+ weights of another architecture?)")
    adm, fourier = "out_conv.weight" in state, "map_noise.freqs" in state
    name = name or ("UNet+-ADM" if adm else "UNet+-NCSN++" if fourier else "UNet+")
    require(name.startswith("UNet+") and MODELS[name].get("adm", False) == adm,
            f"{where}: {'ADM' if adm else 'SongUNet'} weights, not those of --model {name}")
    levels = sorted({int(m[1]) for key in state if (m := re.match(r"enc\.(\d+)x\1_block", key))}, reverse=True)
    model_channels = state["map_layer0.weight"].shape[1] if adm else state[first].shape[0]
    filters = [v for k, v in state.items() if k.endswith("resample_filter")]  # f·fᵀ/(Σf)²: f ∝ its first row
    widths = [state[f"enc.{r}x{r}_block0.conv1.weight"].shape[0] for r in levels]
    kwargs = dict(input_size=levels[0], in_channels=state[first].shape[1], model_channels=model_channels,
                  channel_mult=tuple(width // model_channels for width in widths),
                  channel_mult_emb=state["map_layer0.weight"].shape[0] // model_channels,
                  num_blocks=sum(bool(re.fullmatch(rf"enc\.{levels[0]}x{levels[0]}_block\d+\.conv1\.weight", k))
                                 for k in state),
                  attn_resolutions=tuple(r for r in levels if f"enc.{r}x{r}_block0.qkv.weight" in state),
                  num_classes=state["map_label.weight"].shape[1] if "map_label.weight" in state else 1,
                  augment_dim=state["map_augment.weight"].shape[1] if "map_augment.weight" in state else 0)
    if not adm:
        kwargs.update(embedding="fourier" if fourier else "positional",
                      channel_mult_noise=state["map_layer0.weight"].shape[1] // model_channels,
                      encoder=next((e for e in ("residual", "skip") if any(f"_aux_{e}." in k for k in state)),
                                   "standard"),
                      resample_filter=tuple((filters[0][0, 0, 0] / filters[0][0, 0, 0, 0]).tolist()) if filters
                      else (1, 1))
    return name, kwargs


class PickledModule(dict):
    """A module of an EDM or EDM2 pickle kept as the dict of its state: a torch.nn.ModuleDict, or (class_name set)
    a torch_utils.persistence record."""
    class_name = None

    def __setstate__(self, state):
        self.update(state)


def persistent_state(meta):
    """An EDM or EDM2 persistent-object record (torch_utils.persistence): its stored state and class name; its
    embedded source never runs."""
    record = PickledModule(meta["state"])
    record.class_name = meta["class_name"]
    return record


# what numpy's pickles name (numpy 1.x and 2.x module names): arrays, dtypes and scalars, built from their bytes,
# which Python 3 writes at protocol 2 as _codecs.encode(text, "latin1")
NUMPY_PICKLE_GLOBALS = {**{f"numpy{core}.multiarray.{name}": function for core in (".core", "._core")
                           for name, function in (("_reconstruct", np.empty(0).__reduce__()[0]),
                                                  ("scalar", np.float32(0).__reduce__()[0]))},
                        "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
                        "_codecs.encode": lambda text, encoding="utf-8": text.encode(encoding)}
# every global an EDM or EDM2 network pickle names, and what it becomes: tensors, numpy values, containers and records
NETWORK_PICKLE_GLOBALS = {
    **NUMPY_PICKLE_GLOBALS, "torch_utils.persistence._reconstruct_persistent_obj": persistent_state,
    "dnnlib.util.EasyDict": dict, "collections.OrderedDict": collections.OrderedDict, "builtins.set": set,
    "torch.nn.modules.container.ModuleDict": PickledModule,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    "torch.storage._load_from_bytes": lambda data: torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)}


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals of `allowed` (name -> what it becomes); any other global is
    refused and kept as `refused`."""
    refused = None

    def __init__(self, file, allowed, **kwargs):
        super().__init__(file, **kwargs)
        self.allowed = allowed

    def find_class(self, module, name):
        if f"{module}.{name}" not in self.allowed:
            self.refused = f"{module}.{name}"
            raise pickle.UnpicklingError(f"global {module}.{name} refused")
        return self.allowed[f"{module}.{name}"]


def pickled_state_dict(module, prefix=""):
    """The state dict of a module state from RestrictedUnpickler: its parameters and persistent buffers, then its
    children's, named by their path as torch names them."""
    skip = module.get("_non_persistent_buffers_set", set())
    state = {prefix + k: v for k, v in module["_parameters"].items() if v is not None}
    state.update({prefix + k: v for k, v in module["_buffers"].items() if v is not None and k not in skip})
    for name, child in module["_modules"].items():
        if child is not None:
            state.update(pickled_state_dict(child, f"{prefix}{name}."))
    return state


# EDM's other preconditionings (NVlabs/edm training/networks.py): why their F is not the EDM transport's
EDM_REFUSED_PRECONDS = {"VPPrecond": "c_out = −σ and c_noise = 999·σ⁻¹_VP(σ): a VP noise prediction",
                        "VEPrecond": "c_in = 1, c_out = σ and c_noise = ln(σ/2): a VE noise prediction",
                        "iDDPMPrecond": "a DDPM step index as c_noise and 2C output channels"}


def edm_precond_weights(ema, where):
    """The SongUNet / DhariwalUNet weights (`model.` prefix) of EDM's EDMPrecond record; EDM's other preconditionings
    are refused with the reason: UCGM's EDM transport is EDMPrecond's F at σ_data 0.5 (Table 6)."""
    require(ema.class_name not in EDM_REFUSED_PRECONDS, f"{where}: its network is EDM's {ema.class_name} "
            f"({EDM_REFUSED_PRECONDS.get(ema.class_name)}), not EDMPrecond, whose F alone is the EDM transport's")
    require(ema.class_name == "EDMPrecond" and ema.get("sigma_data") == 0.5, f"{where}: its 'ema' network is "
            f"{ema.class_name} with sigma_data {ema.get('sigma_data')}, expected EDM's EDMPrecond with 0.5 or EDM2's "
            "Precond")
    model = ema["_modules"].get("model")
    require(getattr(model, "class_name", None) in ("SongUNet", "DhariwalUNet"), f"{where}: its EDMPrecond holds "
            f"{getattr(model, 'class_name', None)}, expected EDM's SongUNet or DhariwalUNet")
    return {key.removeprefix("model."): value for key, value in pickled_state_dict(ema).items()}


def load_network_pickle(path, where):
    """{"ema": its network's weights in float32[, "latent_stats"]} of an EDM network pickle (a plain pickle of
    dict(ema=EDMPrecond, loss_fn, augment_pipe, dataset_kwargs)) or an EDM2 one (EasyDict(encoder, ema=Precond, ...));
    for EDM2, mean = −bias/scale and std = 1/scale undo its latent encoder."""
    with open(path, "rb") as f:
        unpickler = RestrictedUnpickler(f, NETWORK_PICKLE_GLOBALS)
        try:
            data = unpickler.load()
            ema = data["ema"]
            state = pickled_state_dict(ema)
        except Exception as error:  # a refused global, or not a network pickle
            if unpickler.refused:
                raise ValueError(f"{where} {path}: names {unpickler.refused}, which an EDM or EDM2 network pickle "
                                 "does not (unpickling it could run code); if you trust the file, convert it where "
                                 "NVlabs/edm2 (or edm) is cloned: torch.save(pickle.load(f)['ema'].unet.state_dict(), "
                                 "'unet.pt') (EDM: .model)") from None
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"{where} {path}: not an EDM or EDM2 network pickle with an 'ema' network "
                             f"({reason[:160]})") from None
    if getattr(ema, "class_name", None) != "Precond":  # EDM2's is Precond; EDM's EDMPrecond, or one refused here
        state = edm_precond_weights(ema, f"{where} {path}")
    checkpoint = {"ema": {k: v.detach().float() for k, v in state.items()}}
    encoder = data.get("encoder")
    if isinstance(encoder, dict) and {"scale", "bias"} <= set(encoder):  # final latents = raw · scale + bias
        scale, bias = (torch.as_tensor(np.asarray(encoder[k], dtype=np.float32)) for k in ("scale", "bias"))
        checkpoint["latent_stats"] = {"mean": -bias / scale, "std": 1 / scale}
    return checkpoint


#################################################################################
#               File I/O: safetensors, tensor files, atomic writes              #
#################################################################################

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                      "I32": torch.int32, "U8": torch.uint8}


def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, then rename it over path: readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(tensors, path):
    """Write a dict of tensors as safetensors (8-byte little-endian header size, JSON header, raw data), atomically."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for key, tensor in tensors.items():
        if tensor.dtype not in names:
            raise ValueError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected one of {list(names)}")
        blob = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad so the data starts 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    atomic_write(path, write)


def safetensors_entries(header, data_size, path):
    """Check a parsed safetensors header whole against its data section; return {name: (dtype, shape, start, end)}.
    The format: a JSON object of {"dtype", "shape", "data_offsets": [start, end)} entries (and "__metadata__"),
    offsets relative to the data, which the tensors tile without overlapping."""
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object")

    def count(value):  # a JSON integer >= 0 (true and false parse as bool, a subclass of int)
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    entries = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise ValueError(f"{path}: safetensors __metadata__ is not an object")
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"{where}: expected an object with dtype, shape and data_offsets, got {info!r:.80}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{where}: unsupported dtype {dtype!r}, expected one of {list(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(count(n) for n in shape):
            raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(count(n) for n in offsets) \
                or not offsets[0] <= offsets[1] <= data_size:
            raise ValueError(f"{where}: data_offsets {offsets!r} are not [start, end] inside the {data_size}-byte "
                             "data")
        nbytes = math.prod(shape) * torch.empty(0, dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{where}: {dtype} {shape} needs {nbytes} bytes, data_offsets {offsets} hold "
                             f"{offsets[1] - offsets[0]}")
        entries[name] = (SAFETENSORS_DTYPES[dtype], shape, *offsets)
    spans = sorted((start, end, name) for name, (_, _, start, end) in entries.items() if end > start)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{path}: tensor {second!r} overlaps tensor {first!r} in the data")
    return entries


def load_safetensors(path):
    """Read a safetensors file by memory map into a dict of (read-only, zero-copy) tensors; the header is checked
    whole before any data is touched."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8 or struct.unpack("<Q", prefix)[0] > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (header size beyond the {size}-byte file)")
        header_size = struct.unpack("<Q", prefix)[0]
        try:
            header = json.loads(f.read(header_size))
        except ValueError:  # not UTF-8, or not JSON
            raise ValueError(f"{path}: safetensors header is not JSON (not a safetensors file?)") from None
    entries = safetensors_entries(header, size - 8 - header_size, path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size) if size > 8 + header_size else None
    tensors = {}
    for name, (dtype, shape, start, end) in entries.items():
        with warnings.catch_warnings():  # the memory map is read-only; we never write through it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(data[start:end]) if end > start else torch.empty(0, dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def load_tensor_file(path, where, mmap=False):
    """A .safetensors file, or a torch.load file read with weights_only (no pickled code runs) and, with mmap, its
    tensors mapped rather than read; a missing, truncated or foreign file is one ValueError naming `where` (the
    flag) and the file."""
    if not os.path.isfile(path):
        raise ValueError(f"{where} {path}: no such file")
    if str(path).endswith(".safetensors"):
        return load_safetensors(path)
    if str(path).endswith(".pkl"):  # EDM's and EDM2's network pickles, read without running their code
        return load_network_pickle(path, where)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # not a zip, cut short, or a pickle that weights_only refuses
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        advice = "; if you trust its source, re-save its tensors alone, e.g. torch.save(torch.load(path, " \
            "weights_only=False)['state_dict'], new_path) for a Lightning checkpoint" \
            if isinstance(error, pickle.UnpicklingError) else ""  # a pickled object of a class that could run code
        raise ValueError(f"{where} {path}: not a readable PyTorch file ({reason[:160]}){advice}") from None


def tensor_dict(value, where):
    """value, checked to be a dict of tensors (a state dict)."""
    if not isinstance(value, dict) or not value or not all(torch.is_tensor(v) for v in value.values()):
        raise ValueError(f"{where}: expected a state dict (names -> tensors) or a checkpoint holding one")
    return value


def load_stats(path, channels):
    """Per-channel mean and std (C, 1, 1) from a latents_stats .pt or .safetensors file; (0, 1) for None."""
    if path is None:
        return torch.zeros(channels, 1, 1), torch.ones(channels, 1, 1)
    stats = load_tensor_file(path, "--latent-stats")
    if not isinstance(stats, dict) or not all(torch.is_tensor(stats.get(k)) and stats[k].numel() == channels
                                              for k in ("mean", "std")):
        raise ValueError(f"--latent-stats {path}: expected 'mean' and 'std' tensors with {channels} values each")
    return stats["mean"].float().reshape(channels, 1, 1), stats["std"].float().reshape(channels, 1, 1)


def write_json(path, value):
    """Write a JSON file atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=2).encode()))


def stats_file(folder):
    """The latents_stats.pt (or .safetensors) file of a latent folder, or None."""
    paths = [os.path.join(folder, f"latents_stats.{ext}") for ext in ("pt", "safetensors")]
    return next((path for path in paths if os.path.exists(path)), None)


def file_sha256(path):
    """The SHA-256 of a file's bytes, read 16 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


LATENTS_INFO = "latents_info.json"  # what made a latent folder (extract_latents.py; README, "Latents")


def latents_info(folder):
    """The provenance record of a latent folder (autoencoder, its file and SHA-256, image size, crop, images,
    flips), or None for a folder written before records existed."""
    path = os.path.join(folder, LATENTS_INFO)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON record ({error})") from None
    require(isinstance(info, dict) and "autoencoder" in info, f"{path}: expected a record with an 'autoencoder'")
    return info


#################################################################################
#               Script plumbing: folders, flags, processes, images              #
#################################################################################

def claim_folder(folder, name, config, write):
    """Refuse an --out folder holding the work of another configuration (recorded in FOLDER/name); record ours."""
    path = os.path.join(folder, name)
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != config:
                raise ValueError(f"--out {folder}: holds the output of another configuration ({path}); use a new --out")
    if write:
        os.makedirs(folder, exist_ok=True)
        write_json(path, config)


def number(interval="(-inf, inf)", kind=float, words=()):
    """An argparse type: a finite `kind` (float or int) in an interval such as "[0, 1)" or "(0, inf)", or one of
    `words`; anything else makes argparse end with "argument --flag: expected ..., got ..."."""
    low_text, high_text = (bound.strip() for bound in interval[1:-1].split(","))
    low, high, closed_low, closed_high = float(low_text), float(high_text), interval[0] == "[", interval[-1] == "]"
    if high < math.inf:
        bounded = f" in {interval}"
    else:
        bounded = f" {'>=' if closed_low else '>'} {low_text}" if low > -math.inf else ""
    expected = ("an integer" if kind is int else "a number" if bounded else "a finite number") + bounded + \
        "".join(f" or {word!r}" for word in words)

    def parse(text):
        if text in words:
            return text
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        above = low <= value if closed_low else low < value
        below = value <= high if closed_high else value < high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


seed = number("[0, 4294967296)", int)  # seeds combine as seed·2^32 + index, which torch needs below 2^64


def first_to_fail():
    """Whether this process is the first of its torchrun job to fail: a counter in the job's shared store."""
    try:
        return torch.distributed.distributed_c10d._get_default_store().add("ucgm/failures", 1) == 1
    except Exception:  # no process group, or its store went down with the process that hosted it
        return True


def run_script(main, parse_args):
    """Run a script; bad input (a ValueError) ends it with one clear line instead of a traceback. Under torchrun
    the first process to fail says why and exits at once, so that torchrun stops the others; a process failing
    after it (a collective with a peer gone) exits silently, so the first one's words stay the last."""
    distributed = "RANK" in os.environ
    try:
        main(parse_args())
    except ValueError as error:
        if not distributed or first_to_fail():
            print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr, flush=True)
        if distributed:
            os._exit(1)  # skip the process group's teardown, which would wait for the peers
        raise SystemExit(1)
    except Exception:
        if distributed and not first_to_fail():
            os._exit(1)  # a peer failed first and said why; this one only lost its connection to it
        raise


def resolve_compile(compile_flag, device):
    """--compile / --no-compile; unset: compiled on CUDA (fused elementwise work), eager on CPU (compiling costs
    more there than it saves in a short run)."""
    return device.type == "cuda" if compile_flag is None else compile_flag


def resolve_precision(precision, device):
    """--precision: auto is bf16 autocast on CUDA and float32 on CPU (where bf16 is slow without AMX units)."""
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


# long enough for 8 ranks compiling their first step at once and for a checkpoint written to network storage
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def use_tf32():
    """float32 matmuls and convs on CUDA in TF32 (~3x faster, 10 mantissa bits), through the switches every torch
    since 2.4 reads alike: setting only the newer fp32_precision ones leaves a "mix of legacy and new APIs" in which
    the legacy getters (read by max-autotune, torch.utils.benchmark, the profiler) raise."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def process_defaults(local_world):
    """Environment defaults of one of `local_world` processes on a machine, each kept if the user set it."""
    # torch.compile's workers (min(32, cores) in every process by default): the cores shared among the processes
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 1) // local_world)))
    if not {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & set(os.environ):  # read at the first CUDA allocation
        # freed blocks of any size are reused: the grids drawn between steps leave no fragments the next step can't use
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def setup_distributed():
    """Join torchrun's process group if there is one (NCCL on CUDA, gloo on CPU); return (rank, world, device)."""
    distributed = "RANK" in os.environ
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    process_defaults(local_world)
    # LOCAL_RANK modulo the visible GPUs: a process may see only its own (SLURM --gpus-per-task=1)
    device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group, so that NCCL binds this rank to its own GPU
        use_tf32()
    elif "OMP_NUM_THREADS" not in os.environ:  # share the cores among the processes of this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if distributed:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT,
                                             device_id=device if device.type == "cuda" else None)
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    return rank, world, device


def missing_shards(num_shards, path_of, rank, world):
    """This process's share of the shards whose file path_of(k) does not exist yet: the missing ones dealt in turn
    to the processes, so that after an uneven resume each gets as many as the others (± 1); rank 0 lists them before
    any process writes one (the broadcast waits for it), so all deal the same list."""
    distributed = torch.distributed.is_initialized()
    missing = [[k for k in range(num_shards) if not os.path.exists(path_of(k))] if rank == 0 or not distributed
               else None]
    if distributed:  # rank 0's list for all: the nodes may see a shared folder at different times
        torch.distributed.broadcast_object_list(missing, src=0)
    return missing[0][rank::world]


def all_reduce(value, device, op="sum"):
    """value (a number or tensor) reduced over the processes by sum, min or max, as a tensor on `device`: every
    collective of the scripts goes through here, so that NCCL, which has no CPU tensors, always gets a device one."""
    tensor = torch.as_tensor(value).to(device, copy=True)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return tensor


@contextlib.contextmanager
def evaluating(net):
    """`net` in eval mode inside, its mode restored after: the no-grad target passes run without dropout (over 2ε,
    Alg. 1 l.13, two dropout masks would be mostly noise); networks without dropout, or plain functions, unchanged."""
    mode = getattr(net, "training", None)
    try:
        yield net.train(False) if mode is not None else net
    finally:
        if mode is not None:
            net.train(mode)


def indexed_noise(shape, seed, indices):
    """Gaussian noise of `shape` for each index i from (seed, i) alone, stacked: a sample's (or an image's) draw does
    not depend on its batch or on the number of processes."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 2**32 + int(i)))
                        for i in indices])


def decode_latents(autoencoder, latents, mean, std, multiplier, batch):
    """Images of normalised latents: `denormalise`, then the autoencoder's decode, `batch` latents at a time (which
    bounds its memory), in float32 outside any autocast, as the released decode."""
    return torch.cat([autoencoder.decode(z) for z in denormalise(latents, mean, std, multiplier).split(batch)])


def denormalise(latents, mean, std, multiplier):
    """Undo the latent normalisation (latent - mean) / std · multiplier (README, "Latents"): what the autoencoder
    decodes."""
    return latents / multiplier * std + mean


def to_uint8(images, dit_rounding=False):
    """Images in [-1, 1] -> uint8 by clamp((x + 1)·127.5, 0, 255), truncated as ADM does; DiT adds 0.5 first."""
    pixels = (images.float() + 1) * 127.5 + (0.5 if dit_rounding else 0.0)
    return pixels.clamp(0, 255).to(torch.uint8)


def center_crop(image, size):
    """ADM's centre crop of a PIL image: halve with BOX while the short side is >= 2·size, BICUBIC to a short side of
    size, crop the centre square (extract_latents.py, and fid.py --image-size for reference images)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def save_image_grid(images, per_row, path):
    """Save images in [-1, 1] (N, 3, H, W) as one PNG grid, atomically."""
    pixels = to_uint8(images).cpu()
    n, c, h, w = pixels.shape
    rows = -(-n // per_row)
    grid = torch.zeros(c, rows * h, per_row * w, dtype=torch.uint8)
    for i in range(n):
        grid[:, (i // per_row) * h:(i // per_row + 1) * h, (i % per_row) * w:(i % per_row + 1) * w] = pixels[i]
    atomic_write(path, lambda f: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG"))

# CIFAR-10 (Krizhevsky 2009; the paper's Table 7): the batches of each split, in order, and the class names
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def is_cifar10(path):
    """Whether path is a CIFAR-10 archive (a .tar.gz, e.g. cifar-10-python.tar.gz or cifar-10-binary.tar.gz) or a
    folder of its batches (data_batch_1, or data_batch_1.bin, there or in cifar-10-batches-py/-bin)."""
    if not os.path.isdir(path):
        return str(path).endswith((".tar.gz", ".tgz", ".tar"))
    return any(os.path.isfile(os.path.join(path, sub, f"{name}{ext}")) for name in ("data_batch_1", "test_batch")
               for sub in ("", "cifar-10-batches-py", "cifar-10-batches-bin") for ext in ("", ".bin"))


def cifar10_files(path, split, where):
    """{file name: bytes} of the batches of a split in a CIFAR-10 archive or folder (python: data_batch_1, binary:
    data_batch_1.bin)."""
    wanted, found = CIFAR10_BATCHES[split], {}
    if os.path.isdir(path):
        for sub in ("", "cifar-10-batches-py", "cifar-10-batches-bin"):
            for name in (n + ext for n in wanted for ext in ("", ".bin")):
                if os.path.isfile(os.path.join(path, sub, name)):
                    with open(os.path.join(path, sub, name), "rb") as f:
                        found[name] = f.read()
    else:
        try:
            with tarfile.open(path) as archive:
                for member in archive:
                    if member.isfile() and os.path.basename(member.name).removesuffix(".bin") in wanted:
                        found[os.path.basename(member.name)] = archive.extractfile(member).read()
        except (OSError, EOFError, tarfile.TarError) as error:
            raise ValueError(f"{where} {path}: not a readable CIFAR-10 archive ({error})") from None
    missing = [n for n in wanted if n not in found and f"{n}.bin" not in found]
    require(not missing, f"{where} {path}: expected the CIFAR-10 {split} batches {', '.join(wanted)} (python) or their "
            f".bin (binary), missing {', '.join(missing)}")
    return {n if n in found else f"{n}.bin": found.get(n, found.get(f"{n}.bin")) for n in wanted}


def cifar10_batch(name, data, where):
    """(pixels (n, 3072) uint8, labels (n,) int64) of one CIFAR-10 batch: binary, records of a label byte and 3072
    pixel bytes; python, a pickled dict {data, labels, ...} read by RestrictedUnpickler (arrays, dicts, lists and
    bytes only)."""
    if name.endswith(".bin"):
        require(len(data) % 3073 == 0, f"{where}: {len(data)} bytes, not whole records of 3073 bytes")
        records = np.frombuffer(data, np.uint8).reshape(-1, 3073)
        pixels, labels = records[:, 1:], records[:, 0].astype(np.int64)
    else:
        unpickler = RestrictedUnpickler(io.BytesIO(data), NUMPY_PICKLE_GLOBALS, encoding="latin1")  # Python 2's str
        try:
            batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in unpickler.load().items()}
            pixels, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
        except Exception as error:  # a refused global, a cut pickle, or another dict
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"{where}: not a CIFAR-10 batch (python pickle of data and labels, or binary records of "
                             f"3073 bytes): {reason[:160]}") from None
    require(pixels.dtype == np.uint8 and pixels.shape == (len(labels), 3072) and labels.ndim == 1
            and np.isin(labels, range(10)).all(), f"{where}: expected uint8 data (n, 3072) and n labels in 0..9, got "
            f"{pixels.dtype} {pixels.shape} and {labels.shape} labels")
    return pixels, labels


def read_cifar10(path, split="train", where="--images"):
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of the train (data_batch_1..5) or test split of the official
    CIFAR-10 python or binary archive, or of its extracted folder; each row holds the R, G and B planes of 32×32."""
    batches = [cifar10_batch(name, data, f"{where} {path}: {name}")
               for name, data in cifar10_files(path, split, where).items()]
    pixels, labels = (np.concatenate(part) for part in zip(*batches))
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # NCHW planes -> NHWC


if __name__ == "__main__":  # the reading order, then the model table: parameters and forward GFLOPs
    print(__doc__.strip(), end="\n\n")
    for name in MODELS:
        family = name.split("-")[0]
        # SD-VAE f8 latents of 256 px (DiT) or 512 px (EDM2), CIFAR-10 pixels (UNet+), VA-VAE f16d32 of 256 px (others)
        channels, latent = {"DiT": (4, 32), "EDM2": (4, 64), "UNet+": (3, 32)}.get(family, (32, 16))
        with torch.device("meta"):  # shapes only, so the XL models cost nothing
            model = create_model(name, input_size=latent, in_channels=channels)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:9s} {channels:2d}×{latent}×{latent}  {params:8.2f} M params  {model.flops_per_forward() / 1e9:8.1f} GFLOPs")
