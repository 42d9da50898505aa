"""Samplers (analytic Gaussian case, guidance), per-image inputs, and sample_ddp.py end to end."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import loss
import sample_ddp
import samplers
from checkpoint import save_checkpoint
from models.sit import build_sit
from samplers import (
    SampleError,
    decode,
    draw_label,
    generate,
    load_vae,
    make_inputs,
    path_at,
    per_image_noise,
    sample,
    save_grid,
    score_from_velocity,
    setup_from_checkpoint,
    time_grid,
    to_uint8,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (badly so on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Analytic case: Gaussian data x ~ N(mu, cov), flattened over C x H x W.
# With x_t = a x + s eps and v = a' x + s' eps, (v, x_t) are jointly Gaussian, so the exact
# velocity is E[v | x_t] = a' mu + (a a' cov + s s' I) S^-1 (x_t - a mu), S = a^2 cov + s^2 I,
# and the exact score is -S^-1 (x_t - a mu). The ODE flow maps x_1 to mu + cov^1/2 x_1.


class GaussianVelocity(nn.Module):
    def __init__(self, mu: torch.Tensor, cov: torch.Tensor, path_type: str):
        super().__init__()
        self.register_buffer("mu", mu.double())
        self.register_buffer("cov", cov.double())
        self.path_type = path_type

    def moments(self, t: float):
        a, s, da, ds = path_at(self.path_type, t)
        eye = torch.eye(len(self.mu), dtype=torch.float64)
        return a, da, a * a * self.cov + s * s * eye, a * da * self.cov + s * ds * eye

    def forward(self, x, t, y):
        assert torch.all(t == t[0])
        a, da, S, C = self.moments(float(t[0]))
        flat = x.reshape(len(x), -1).double()
        v = da * self.mu + (flat - a * self.mu) @ torch.linalg.solve(S, C)  # S, C commute
        return v.reshape(x.shape).to(x.dtype)

    def exact_score(self, x, t: float):
        a, _, S, _ = self.moments(t)
        flat = x.reshape(len(x), -1).double()
        return (-(flat - a * self.mu) @ torch.linalg.inv(S)).reshape(x.shape)


class DiagonalGaussianVelocity(nn.Module):
    """Same, with a diagonal covariance: purely elementwise, so bitwise independent of batching."""

    def __init__(self, mu, var, path_type):
        super().__init__()
        self.register_buffer("mu", mu.double())
        self.register_buffer("var", var.double())
        self.path_type = path_type

    def forward(self, x, t, y):
        a, s, da, ds = path_at(self.path_type, float(t[0]))
        flat = x.reshape(len(x), -1).double()
        v = da * self.mu + (a * da * self.var + s * ds) / (a * a * self.var + s * s) * (flat - a * self.mu)
        return v.reshape(x.shape).to(x.dtype)


def _gaussian(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.5
    cov = A @ A.T + 0.1 * torch.eye(4, dtype=torch.float64)
    mu = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
    return mu, cov, g


def _sqrtm(cov):
    ev, U = torch.linalg.eigh(cov)
    return U @ torch.diag(ev.sqrt()) @ U.T


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_score_from_velocity_matches_exact_score(path_type):
    mu, cov, g = _gaussian()
    model = GaussianVelocity(mu, cov, path_type)
    x = torch.randn(64, 1, 2, 2, generator=g, dtype=torch.float64)
    for t in (0.04, 0.3, 0.7, 1.0):
        v = model(x, torch.full((64,), t, dtype=torch.float64), None)
        torch.testing.assert_close(score_from_velocity(v, x, t, path_type), model.exact_score(x, t),
                                   rtol=1e-9, atol=1e-9)


def test_one_path_definition_shared_by_training_samplers_and_score(monkeypatch):
    """loss.py defines the paths once; a path added there alone reaches interpolate (training),
    the samplers' coefficients, the score conversion and the ODE."""
    assert not hasattr(samplers, "PATH_TYPES") and not hasattr(samplers, "path_coefficients")
    assert sample_ddp.PATH_TYPES is loss.PATH_TYPES
    real = loss.path_coefficients
    for path in ("linear", "cosine"):
        for t in (0.0, 0.3, 0.96):
            assert path_at(path, t) == tuple(c.item() for c in real(path, torch.tensor(t, dtype=torch.float64)))

    def with_quadratic(path_type, t):  # alpha = 1 - t^2, sigma = t
        if path_type == "quadratic":
            return 1 - t * t, t, -2 * t, torch.ones_like(t)
        return real(path_type, t)

    monkeypatch.setattr(loss, "PATH_TYPES", loss.PATH_TYPES + ("quadratic",))
    monkeypatch.setattr(loss, "path_coefficients", with_quadratic)
    x, eps = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x_t, v = loss.interpolate("quadratic", x, eps, t)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - tt ** 2) * x + tt * eps)
    torch.testing.assert_close(v, -2 * tt * x + eps)
    assert path_at("quadratic", 0.5) == (0.75, 0.5, -1.0, 1.0)

    mu, cov, g = _gaussian()
    model = GaussianVelocity(mu, cov, "quadratic")
    xs = torch.randn(64, 1, 2, 2, generator=g, dtype=torch.float64)
    for t in (0.04, 0.5, 1.0):
        v = model(xs, torch.full((64,), t, dtype=torch.float64), None)
        torch.testing.assert_close(score_from_velocity(v, xs, t, "quadratic"), model.exact_score(xs, t),
                                   rtol=1e-9, atol=1e-9)
    x1 = torch.randn(200, 1, 2, 2, generator=g)
    out = sample(model, x1, torch.zeros(200, dtype=torch.long), mode="ode", num_steps=32, heun=True,
                 path_type="quadratic").double().reshape(-1, 4)
    exact = mu + x1.reshape(-1, 4).double() @ _sqrtm(cov)  # any path: the flow map of N(mu, cov)
    assert (out - exact).abs().max() < 0.01  # 32 Heun steps


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_ode_lands_on_the_data_gaussian_and_heun_converges_faster(path_type):
    mu, cov, g = _gaussian()
    model = GaussianVelocity(mu, cov, path_type)
    x1 = torch.randn(20000, 1, 2, 2, generator=g)
    y = torch.zeros(20000, dtype=torch.long)
    out = sample(model, x1, y, mode="ode", num_steps=32, heun=True, path_type=path_type).double().reshape(-1, 4)
    assert (out.mean(0) - mu).abs().max() < 0.05
    assert (torch.cov(out.T) - cov).abs().max() < 0.1

    # Against the exact flow map: Euler error halves per doubling (order 1), Heun quarters (order 2).
    exact = mu + x1[:500].reshape(-1, 4).double() @ _sqrtm(cov)
    errors = {}
    for heun in (False, True):
        errors[heun] = [(sample(model, x1[:500], y[:500], mode="ode", num_steps=n, heun=heun, path_type=path_type)
                         .double().reshape(-1, 4) - exact).abs().max().item() for n in (8, 16, 32)]
    euler_rate = errors[False][1] / errors[False][2]
    heun_rate = errors[True][1] / errors[True][2]
    assert 1.7 < euler_rate < 2.3, errors
    assert 3.3 < heun_rate < 4.7, errors
    assert errors[True][2] < errors[False][2] / 10


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_lands_on_the_data_gaussian(path_type):
    mu, cov, g = _gaussian()
    model = GaussianVelocity(mu, cov, path_type)
    x1 = torch.randn(20000, 1, 2, 2, generator=g)
    y = torch.zeros(20000, dtype=torch.long)
    out = sample(model, x1, y, mode="sde", num_steps=250, path_type=path_type,
                 generator=torch.Generator().manual_seed(1)).double().reshape(-1, 4)
    assert (out.mean(0) - mu).abs().max() < 0.05
    assert (torch.cov(out.T) - cov).abs().max() < 0.1
    ode = sample(model, x1[:100], y[:100], mode="ode", num_steps=50, path_type=path_type).double().reshape(-1, 4)
    assert (out[:100] - ode).abs().mean() > 0.1  # the SDE really injects noise


def test_time_grids():
    assert time_grid("ode", 4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    sde = time_grid("sde", 250)
    assert len(sde) == 251 and sde[0] == 1.0 and sde[-2] == pytest.approx(0.04) and sde[-1] == 0.0


def test_sde_update_is_the_repa_form():
    """Two steps by hand: grid [1, 0.04, 0], w(t) = 2t, noise only in the first step."""
    model = LabelVelocity()
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1])
    out = sample(model, x, y, mode="sde", num_steps=2, path_type="cosine", generator=torch.Generator().manual_seed(3))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).double()
    expected = x
    for t, dt, noise in ((1.0, -0.96, z), (0.04, -0.04, 0)):
        v = model.table[y] + 0.5 * expected
        drift = v - 0.5 * (2 * t) * score_from_velocity(v, expected, t, "cosine")
        expected = expected + dt * drift + (2 * t * -dt) ** 0.5 * noise
    torch.testing.assert_close(out, expected.float())


def test_sde_per_image_generators_make_images_batch_independent():
    model = DiagonalGaussianVelocity(torch.linspace(-1, 1, 16), torch.linspace(0.2, 2, 16), "linear")
    noise, labels, _ = make_inputs(range(7), seed=5, latent_shape=(1, 4, 4), num_classes=3)

    def run(splits):
        outs = []
        for a, b in splits:
            _, _, gens = make_inputs(range(a, b), seed=5, latent_shape=(1, 4, 4), num_classes=3)
            outs.append(sample(model, noise[a:b], labels[a:b], mode="sde", num_steps=6, generator=gens))
        return torch.cat(outs)

    whole = run([(0, 7)])
    assert torch.equal(whole, run([(0, 3), (3, 5), (5, 7)]))
    assert not torch.equal(whole[0], whole[1])


def _gens():
    return [torch.Generator().manual_seed(s) for s in (1, 2, 3)]


def test_per_image_noise_is_each_generators_draw_and_pins_for_cuda(monkeypatch):
    ref = torch.stack([torch.randn(2, 3, generator=g) for g in _gens()])
    z = per_image_noise(_gens(), (2, 3), "cpu")
    assert torch.equal(z, ref) and z.dtype == torch.float32 and not z.is_pinned()

    # For CUDA: a pinned host buffer and an asynchronous copy (faked: no GPU needed).
    seen = {}
    real_empty = torch.empty

    def fake_empty(*a, pin_memory=False, **k):
        seen["pin_memory"] = pin_memory
        return real_empty(*a, **k)

    def fake_to(self, *a, **k):
        seen["to"] = (a, k)
        return self

    monkeypatch.setattr(torch, "empty", fake_empty)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    z = per_image_noise(_gens(), (2, 3), "cuda")
    monkeypatch.undo()
    assert seen == {"pin_memory": True, "to": ((torch.device("cuda"),), {"non_blocking": True})}
    assert torch.equal(z, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_per_image_noise_on_a_gpu_equals_the_cpu_draws():
    z = per_image_noise(_gens(), (2, 3), "cuda")
    assert z.is_cuda and torch.equal(z.cpu(), per_image_noise(_gens(), (2, 3), "cpu"))


# ----------------------------------------------------------------------------------------------
# Guidance


class LabelVelocity(nn.Module):
    """v = table[y] + 0.5 x: a label-dependent field whose paths diverge once guided."""

    def __init__(self, num_classes=3, channels=4, size=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("table", torch.randn(num_classes + 1, channels, size, size, generator=g,
                                                  dtype=torch.float64))
        self.config = type("Cfg", (), {"num_classes": num_classes})()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((float(t[0]), len(x), x[: len(x)].clone()))
        return self.table[y] + 0.5 * x


def test_cfg_scale_one_skips_the_unconditional_pass_and_matches_unguided():
    model = LabelVelocity()
    x = torch.randn(5, 4, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    plain = sample(model, x, y, mode="ode", num_steps=6)
    assert all(n == 5 for _, n, _ in model.calls)
    model.calls.clear()
    one = sample(model, x, y, mode="ode", num_steps=6, cfg_scale=1.0, guidance_low=0.2, guidance_high=0.8)
    assert torch.equal(plain, one) and all(n == 5 for _, n, _ in model.calls)
    # An interval that holds no grid time: guided == unguided, bit for bit.
    empty = sample(model, x, y, mode="ode", num_steps=6, cfg_scale=4.0, guidance_low=0.55, guidance_high=0.6)
    assert torch.equal(plain, empty)


def test_guidance_acts_on_all_channels_with_one_batched_forward():
    model = LabelVelocity()
    model.table[..., :] = 0
    model.table[0] = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1)  # class 0
    model.table[3] = torch.tensor([0.5, 0.5, 0.5, 0.5]).view(4, 1, 1)  # null class
    x = torch.zeros(2, 4, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 0])
    model.calls.clear()
    out = sample(model, x, y, mode="ode", num_steps=1, cfg_scale=3.0)  # one Euler step from 1 to 0
    assert [n for _, n, _ in model.calls] == [4]  # conditional and unconditional halves together
    guided = 0.5 + 3.0 * (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 0.5)
    torch.testing.assert_close(out[0, :, 0, 0], -guided)  # x_0 = x_1 - v: every channel is guided


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_paths_agree_outside_the_guidance_interval(mode):
    model = LabelVelocity()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    kw = dict(mode=mode, num_steps=10, generator=torch.Generator().manual_seed(0) if mode == "sde" else None)
    model.calls.clear()
    plain = sample(model, x, y, **kw)
    plain_calls = list(model.calls)
    model.calls.clear()
    kw["generator"] = torch.Generator().manual_seed(0) if mode == "sde" else None
    guided = sample(model, x, y, cfg_scale=3.0, guidance_low=0.0, guidance_high=0.5, **kw)
    for (t, n, xs), (t2, n2, xs2) in zip(plain_calls, model.calls):
        assert t == t2
        if t > 0.5:  # outside the interval: same state, single (conditional) pass
            assert n2 == 3 and torch.equal(xs, xs2)
        else:
            assert n2 == 6
    assert not torch.equal(plain, guided)


def _heun_reference(model, x, y, num_steps, cfg, low, high, rule):
    """Heun with guidance on [low, high], decided per evaluation ("evaluation": ours) or by the
    step's start time for both evaluations ("start": REPA's euler_sampler)."""
    null = torch.full_like(y, model.config.num_classes)

    def vel(x, t, guided):
        tt = torch.full((len(x),), t, dtype=torch.float64)
        cond = model(x, tt, y)
        if not guided:
            return cond
        uncond = model(x, tt, null)
        return uncond + cfg * (cond - uncond)

    ts = time_grid("ode", num_steps)
    for i in range(num_steps):
        t, t_next = ts[i], ts[i + 1]
        d = vel(x, t, low <= t <= high)
        x_next = x + (t_next - t) * d
        if i < num_steps - 1:
            guided = low <= (t_next if rule == "evaluation" else t) <= high
            x_next = x + (t_next - t) * 0.5 * (d + vel(x_next, t_next, guided))
        x = x_next
    return x


def test_heun_guidance_follows_the_evaluation_time_not_the_step_start():
    """Pinned on purpose (README, samplers docstring): in the step 0.75 -> 0.5 with guidance on
    [0, 0.5], our corrector at t = 0.5 is guided; REPA's is not (its step starts at 0.75)."""
    model = LabelVelocity()
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1])
    out = sample(model, x, y, mode="ode", num_steps=4, heun=True, cfg_scale=2.0, guidance_low=0.0,
                 guidance_high=0.5)
    assert [(t, n) for t, n, _ in model.calls] == [(1.0, 2), (0.75, 2), (0.75, 2), (0.5, 4), (0.5, 4),
                                                  (0.25, 4), (0.25, 4)]
    ours = _heun_reference(model, x, y, 4, 2.0, 0.0, 0.5, "evaluation").float()
    repa = _heun_reference(model, x, y, 4, 2.0, 0.0, 0.5, "start").float()
    torch.testing.assert_close(out, ours, rtol=1e-6, atol=1e-6)
    assert (out - repa).abs().max() > 0.01


def test_sampler_argument_errors():
    model = LabelVelocity()
    x, y = torch.randn(2, 4, 2, 2), torch.tensor([0, 1])
    with pytest.raises(SampleError, match="ODE sampler only"):
        sample(model, x, y, mode="sde", heun=True)
    with pytest.raises(SampleError, match="empty"):
        sample(model, x, y, guidance_low=0.8, guidance_high=0.2)
    with pytest.raises(SampleError, match="path type"):
        sample(model, x, y, path_type="vp")


# ----------------------------------------------------------------------------------------------
# Inputs and pixels


def test_make_inputs_are_per_image_with_uniform_labels_by_default():
    noise, labels, _ = make_inputs(range(10), seed=3, latent_shape=(2, 4, 4), num_classes=4)
    part, part_labels, _ = make_inputs([7, 8], seed=3, latent_shape=(2, 4, 4), num_classes=4)
    assert torch.equal(noise[7:9], part) and torch.equal(labels[7:9], part_labels)
    other, other_labels, _ = make_inputs(range(10), seed=4, latent_shape=(2, 4, 4), num_classes=4)
    assert not torch.equal(noise, other) and not torch.equal(labels, other_labels)
    # Uniform at random, from the image's own hash of (seed, i, LABEL_STREAM), not i % C.
    assert labels.tolist() != [i % 4 for i in range(10)]
    assert draw_label(3, 5, 4) == int(np.random.SeedSequence([3, 5, 1]).generate_state(1, np.uint64)[0]) % 4
    many = np.array([draw_label(0, i, 10) for i in range(5000)])
    counts = np.bincount(many, minlength=10)
    assert ((counts - 500) ** 2 / 500).sum() < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    assert (many[1:] == many[:-1]).mean() == pytest.approx(0.1, abs=0.02)  # no serial pattern
    # --class-balanced: i % C, with the same noise (labels have their own stream).
    balanced_noise, balanced, _ = make_inputs(range(10), seed=3, latent_shape=(2, 4, 4), num_classes=4,
                                              class_balanced=True)
    assert balanced.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert torch.equal(balanced_noise, noise)


def test_to_uint8_rounds_clamps_and_repeats_grayscale():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, 1 / 255]).view(1, 1, 1, 8)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 1, 8, 3)
    assert u[0, 0, :, 0].tolist() == [0, 0, 64, 128, 191, 255, 255, 128]  # round(127.5 x + 127.5)
    assert (u[..., 0] == u[..., 1]).all() and (u[..., 0] == u[..., 2]).all()
    with pytest.raises(SampleError, match="NaN"):
        to_uint8(torch.full((1, 3, 2, 2), float("nan")))


def test_decode_unscales_per_channel_and_uses_the_vae(tmp_path):
    z = torch.ones(1, 2, 2, 2)
    scale = torch.tensor([2.0, 4.0]).view(2, 1, 1)
    shift = torch.tensor([0.5, -1.0]).view(2, 1, 1)
    out = decode(z, None, scale, shift)
    assert out[0, 0, 0, 0] == 1.0 and out[0, 1, 0, 0] == -0.75
    vae_dir = make_vae(tmp_path / "vae")
    vae = load_vae(str(vae_dir))
    assert decode(torch.randn(2, 4, 4, 4), vae, torch.ones(4, 1, 1), torch.zeros(4, 1, 1)).shape == (2, 3, 8, 8)
    assert load_vae("none") is None
    with pytest.raises(SampleError, match="does not exist"):
        load_vae(str(tmp_path / "missing-vae"))


def test_save_grid(tmp_path):
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    save_grid(images, str(tmp_path / "g.png"), nrow=3, min_size=0)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 6 + 2, 3 * 8 + 2, 3)
    assert (grid[2:6, 2:8] == images[0]).all() and (grid[8:12, 2:8] == images[3]).all()
    save_grid(images, str(tmp_path / "big.png"), nrow=3)  # default: enlarged (nearest) to >= 512 px
    big = np.asarray(Image.open(tmp_path / "big.png"))
    factor = -(-512 // 14)  # ceil(512 / the shorter side)
    assert big.shape == (14 * factor, 26 * factor, 3) and min(big.shape[:2]) >= 512
    assert (big[::factor, ::factor] == grid).all()


# ----------------------------------------------------------------------------------------------
# Checkpoints and sample_ddp.py


def make_vae(path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  layers_per_block=1, norm_num_groups=4, sample_size=16).save_pretrained(path)
    return path


def tiny_sit(in_channels=1, input_size=8, num_classes=4, seed=0, hidden_size=32):
    torch.manual_seed(seed)
    model = build_sit(depth=2, hidden_size=hidden_size, num_heads=2, patch_size=2, input_size=input_size,
                      in_channels=in_channels, num_classes=num_classes)
    with torch.no_grad():  # adaLN-Zero starts at zero velocity: perturb every trainable weight
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_ckpt(path: Path, *, in_channels=1, num_classes=4, vae="none", scale=1.0, shift=0.0, path_type="linear"):
    model = tiny_sit(in_channels=in_channels, num_classes=num_classes)
    sd = model.state_dict()
    save_checkpoint(str(path), {
        "model": sd, "ema": sd, "model_config": model.config.to_dict(), "args": {"path_type": path_type},
        "data": dict(vae=vae, latent_scale=scale, latent_shift=shift, latent_shape=[in_channels, 8, 8],
                     num_classes=num_classes, class_names=None),
        "step": 7,
    })
    return path


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = sample_ddp.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_pixel_space_grayscale_run_writes_an_adm_npz(tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "ckpt.pt")
    out = tmp_path / "s" / "set.npz"
    code, stdout, err = run_main(capsys, "--ckpt", ckpt, "--num-samples", 10, "--per-proc-batch-size", 4,
                                 "--mode", "ode", "--num-steps", 4, "--heun", "--chunk-size", 4, "--out", out,
                                 "--save-png", "--cfg-scale", 2.0, "--class-balanced")
    assert code == 0, err
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 8, 8, 3)
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
    assert images.min() < 64 and images.max() > 192  # a real range, not a constant image
    assert labels.tolist() == [i % 4 for i in range(10)]  # --class-balanced
    assert np.bincount(labels).tolist() == [3, 3, 2, 2]
    record = json.loads((tmp_path / "s" / "set.json").read_text())
    assert record["settings"]["labels"] == "class-balanced" and "i % num_classes" in record["labels"]
    assert (tmp_path / "s" / "set.grid.png").is_file() and (tmp_path / "s" / "set.json").is_file()
    assert not (tmp_path / "s" / "set.parts").exists()  # removed without --keep-parts
    from PIL import Image

    assert sorted(os.listdir(tmp_path / "s" / "set-png")) == [f"{i:06d}.png" for i in range(10)]
    assert (np.asarray(Image.open(tmp_path / "s" / "set-png" / "000007.png")) == images[7]).all()
    # Same images from the Python API (the code path train.py uses for grids).
    setup = setup_from_checkpoint(torch.load(ckpt, weights_only=False), log=lambda *a: None)
    api, _ = generate(setup, None, range(4, 7), seed=0, mode="ode", num_steps=4, heun=True, cfg_scale=2.0,
                      class_balanced=True)
    assert (api == images[4:7]).all()
    # A rerun with the same settings has nothing to do.
    code, stdout, _ = run_main(capsys, "--ckpt", ckpt, "--num-samples", 10, "--per-proc-batch-size", 4,
                               "--mode", "ode", "--num-steps", 4, "--heun", "--chunk-size", 4, "--out", out,
                               "--cfg-scale", 2.0, "--class-balanced")
    assert code == 0 and "nothing to do" in stdout and not (tmp_path / "s" / "set.parts").exists()


def test_resume_after_an_interrupted_run_gives_the_same_npz(tmp_path, capsys, monkeypatch):
    ckpt = make_ckpt(tmp_path / "ckpt.pt", num_classes=3)
    common = ["--ckpt", ckpt, "--num-samples", 11, "--per-proc-batch-size", 3, "--mode", "sde", "--num-steps", 4,
              "--chunk-size", 3, "--precision", "fp64", "--seed", 9]
    assert run_main(capsys, *common, "--out", tmp_path / "ref.npz")[0] == 0

    saved = []
    real_save = sample_ddp.save_chunk

    def crash_after_two(*a, **k):
        if len(saved) == 2:
            raise KeyboardInterrupt  # as if the job were killed mid-run
        saved.append(a[1])
        real_save(*a, **k)

    monkeypatch.setattr(sample_ddp, "save_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        sample_ddp.main([str(a) for a in common + ["--out", tmp_path / "run.npz"]])
    capsys.readouterr()
    assert not (tmp_path / "run.npz").exists()
    monkeypatch.setattr(sample_ddp, "save_chunk", real_save)
    code, stdout, err = run_main(capsys, *common, "--out", tmp_path / "run.npz", "--per-proc-batch-size", 4)
    assert code == 0, err
    assert "resuming: 2 of 4 chunks already done" in stdout
    assert sha(tmp_path / "run.npz") == sha(tmp_path / "ref.npz")

    # Different settings do not mix with the chunks of an unfinished run.
    (tmp_path / "x.parts").mkdir()
    (tmp_path / "x.parts" / "settings.json").write_text('{"cfg_scale": 9.0}')
    code, _, err = run_main(capsys, *common, "--out", tmp_path / "x.npz")
    assert code == 2 and "other settings" in err and "cfg_scale" in err


def test_sigterm_drops_the_chunk_in_flight_and_the_rerun_completes_the_same_npz(tmp_path, capsys, monkeypatch):
    """A preempted job: SIGTERM during the fourth batch (images 6, 7). The run finishes that batch, keeps
    the two chunks it completed (images 0..5), drops the one in flight (6..8), leaves no npz and returns
    --preempt-exit-code; the same command then completes a set identical to an uninterrupted run."""
    import signal

    ckpt = make_ckpt(tmp_path / "ckpt.pt", num_classes=3)
    common = ["--ckpt", ckpt, "--num-samples", 11, "--per-proc-batch-size", 2, "--mode", "ode", "--num-steps", 2,
              "--chunk-size", 3, "--precision", "fp64"]
    assert run_main(capsys, *common, "--out", tmp_path / "ref.npz")[0] == 0
    calls = []
    real_generate = sample_ddp.generate

    def signalled_on_fourth_batch(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_generate(*a, **k)

    monkeypatch.setattr(sample_ddp, "generate", signalled_on_fourth_batch)
    code, stdout, err = run_main(capsys, *common, "--out", tmp_path / "run.npz", "--preempt-exit-code", 5)
    assert code == 5 and len(calls) == 4, err
    assert "stopped by SIGTERM: 2 of 4 chunks are saved" in stdout and "run the same command to resume" in stdout
    assert sorted(f for f in os.listdir(tmp_path / "run.parts") if f.endswith(".npy")) == [
        "00000000-00000003.labels.npy", "00000000-00000003.npy", "00000003-00000006.labels.npy",
        "00000003-00000006.npy"]
    assert not (tmp_path / "run.npz").exists() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.setattr(sample_ddp, "generate", real_generate)
    code, stdout, err = run_main(capsys, *common, "--out", tmp_path / "run.npz")
    assert code == 0 and "resuming: 2 of 4 chunks already done" in stdout, err
    assert sha(tmp_path / "run.npz") == sha(tmp_path / "ref.npz")


def test_world_size_and_batch_invariance_with_torchrun(tmp_path, capsys):
    """1 rank with batch 3 vs 2 ranks with batch 5 (and another chunk size): byte-identical npz,
    labels included (drawn at random per image). torchrun runs from another working directory.

    Latent model + tiny VAE, SDE with per-image noise, guidance with an interval. float64 makes
    the network's arithmetic batch-size independent for practical purposes (CPU fp32 matmuls
    differ by ~1e-7 between batch sizes, enough to flip a few uint8 values)."""
    vae = make_vae(tmp_path / "vae")
    ckpt = make_ckpt(tmp_path / "ckpt.pt", in_channels=4, vae=str(vae), scale=[0.5, 0.6, 0.7, 0.8],
                     shift=[0.1, 0.0, 0.0, -0.1])
    common = ["--ckpt", ckpt, "--num-samples", 11, "--mode", "sde", "--num-steps", 5, "--cfg-scale", 2.5,
              "--guidance-high", 0.7, "--precision", "fp64", "--seed", 1]
    code, _, err = run_main(capsys, *common, "--per-proc-batch-size", 3, "--chunk-size", 4,
                            "--out", tmp_path / "one.npz")
    assert code == 0, err
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "sample_ddp.py"), *map(str, common), "--per-proc-batch-size", "5", "--chunk-size", "3",
         "--out", str(tmp_path / "two.npz")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sha(tmp_path / "one.npz") == sha(tmp_path / "two.npz")
    with np.load(tmp_path / "one.npz") as f, np.load(tmp_path / "two.npz") as g:
        assert f["arr_0"].shape == (11, 16, 16, 3) and f["arr_1"].tolist() == g["arr_1"].tolist()
        assert f["arr_1"].tolist() == [draw_label(1, i, 4) for i in range(11)] != [i % 4 for i in range(11)]
    assert json.loads((tmp_path / "two.json").read_text())["settings"]["labels"] == "uniform"


def test_python_api_and_repa_style_bare_state_dict(tmp_path):
    """A REPA-released checkpoint is a bare state dict, with projector weights SiT does not use."""
    model = tiny_sit(in_channels=4, num_classes=5)
    sd = dict(model.state_dict())
    sd["projectors.0.0.weight"] = torch.zeros(8, 32)
    overrides = dict(model="SiT-S/2", depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=5)
    logs = []
    setup = setup_from_checkpoint(sd, config_overrides=overrides, log=logs.append)
    assert setup.vae == "stabilityai/sd-vae-ft-ema" and setup.path_type == "linear"
    assert setup.scale.flatten().tolist() == pytest.approx([0.18215] * 4) and setup.num_classes == 5
    assert any("projectors" in line for line in logs) and setup.notes
    z = sample(setup.model, *make_inputs(range(2), seed=0, latent_shape=setup.latent_shape, num_classes=5)[:2],
               num_steps=2, cfg_scale=1.5)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32 and torch.isfinite(z).all()
    ref = model.eval()(torch.ones(1, 4, 8, 8), torch.tensor([0.5]), torch.tensor([1]))
    assert torch.equal(setup.model(torch.ones(1, 4, 8, 8), torch.tensor([0.5]), torch.tensor([1])), ref)


def test_path_type_comes_from_the_checkpoint_and_sampling_uses_eval_mode(tmp_path):
    ckpt = torch.load(make_ckpt(tmp_path / "c.pt", path_type="cosine"), weights_only=False)
    assert setup_from_checkpoint(ckpt, log=lambda *a: None).path_type == "cosine"
    assert setup_from_checkpoint(ckpt, path_type="linear", log=lambda *a: None).path_type == "linear"
    assert setup_from_checkpoint(ckpt, log=lambda *a: None).step == 7

    model = tiny_sit()
    model.y_embedder.dropout_prob = 1.0  # in train mode every label would become the null class
    noise, labels, _ = make_inputs(range(3), seed=0, latent_shape=(1, 8, 8), num_classes=4)
    model.train()
    out = sample(model, noise, labels, num_steps=2)
    assert model.training  # restored
    assert torch.equal(out, sample(model.eval(), noise, labels, num_steps=2))


def test_clear_errors(tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "ckpt.pt")
    base = ["--num-samples", 8, "--mode", "ode", "--num-steps", 2]

    def error_of(*argv):
        code, _, err = run_main(capsys, *base, *argv)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert not (tmp_path / "out").exists()  # every check comes before any directory is made
        return err

    assert "does not exist" in error_of("--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "out" / "a.npz")
    (tmp_path / "cut.pt").write_bytes(Path(ckpt).read_bytes()[:300])  # a copy cut off
    err = error_of("--ckpt", tmp_path / "cut.pt", "--out", tmp_path / "out" / "a.npz")
    assert f"checkpoint {tmp_path / 'cut.pt'} is damaged (300 bytes, truncated or not written by torch.save) and " \
           "cannot be read: pass another --ckpt" in err and "_use_new_zipfile_serialization" not in err
    # Incompatible: the config says hidden size 64, the weights were made at 32.
    bad = tmp_path / "bad.pt"
    good = torch.load(ckpt, weights_only=False)
    good["model_config"]["hidden_size"] = 64
    save_checkpoint(str(bad), good)
    err = error_of("--ckpt", bad, "--out", tmp_path / "out" / "b.npz")
    assert "incompatible checkpoint" in err and "'pos_embed'" in err and "(1, 16, 32)" in err and "(1, 16, 64)" in err
    err = error_of("--ckpt", ckpt, "--num-samples", 3, "--class-balanced", "--out", tmp_path / "out" / "c.npz")
    assert "smaller than the 4 classes" in err
    (tmp_path / "file").write_text("x")
    assert "not writable" in error_of("--ckpt", ckpt, "--out", tmp_path / "file" / "d.npz")
    assert "does not exist" in error_of("--ckpt", ckpt, "--vae", tmp_path / "no-vae", "--out", tmp_path / "out" / "e.npz")
    assert "--heun applies" in error_of("--ckpt", ckpt, "--mode", "sde", "--heun", "--out", tmp_path / "out" / "f.npz")
    assert run_main(capsys, *base, "--ckpt", ckpt, "--num-samples", 3, "--out", tmp_path / "g.npz")[0] == 0  # uniform


def test_read_only_output_fails_before_any_work(tmp_path, capsys, monkeypatch):
    ckpt = make_ckpt(tmp_path / "ckpt.pt")

    def no_work(*a, **k):
        raise AssertionError("the checkpoint was loaded before the output was checked")

    monkeypatch.setattr(sample_ddp, "load_checkpoint", no_work)

    def error_of(out):
        code, _, err = run_main(capsys, "--ckpt", ckpt, "--out", out)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "not writable" in err
        return err

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access  # root ignores chmod: fake the permission check instead
    monkeypatch.setattr(os, "access", lambda p, mode, **k: os.path.abspath(p) != str(read_only)
                        and real_access(p, mode, **k))
    assert "no write permission in " + str(read_only) in error_of(read_only / "sub" / "x.npz")
    monkeypatch.setattr(os, "access", real_access)
    assert os.listdir(read_only) == []
    if os.path.isdir("/proc"):  # takes no new files, even for root
        error_of("/proc/repulsor-sit-test/x.npz")
    if os.geteuid() != 0:
        read_only.chmod(0o500)
        try:
            error_of(read_only / "x.npz")
        finally:
            read_only.chmod(0o700)


def test_a_finished_set_is_not_overwritten_by_a_rerun_with_other_settings(tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "ckpt.pt")
    out = tmp_path / "set.npz"
    base = ["--ckpt", ckpt, "--num-samples", 6, "--mode", "ode", "--num-steps", 2, "--chunk-size", 4]
    assert run_main(capsys, *base, "--out", out)[0] == 0
    first, record = sha(out), (tmp_path / "set.json").read_text()

    def refused(*argv):
        code, _, err = run_main(capsys, *base, "--out", out, *argv)
        assert code == 2 and err.count("\n") == 1 and "--overwrite" in err, err
        assert sha(out) == first and (tmp_path / "set.json").read_text() == record
        assert not (tmp_path / "set.parts").exists()
        return err

    assert "seed: 0 then, 1 now" in refused("--seed", "1")
    assert "num_samples: 6 then, 8 now" in refused("--num-samples", "8")
    assert "tf32: True then, False now" in refused("--no-tf32")
    code, stdout, _ = run_main(capsys, *base, "--out", out)  # same settings: done, nothing made
    assert code == 0 and "nothing to do" in stdout and not (tmp_path / "set.parts").exists()

    code, stdout, err = run_main(capsys, *base, "--out", out, "--seed", 1, "--overwrite")
    assert code == 0 and "--overwrite: removed" in stdout, err
    assert json.loads((tmp_path / "set.json").read_text())["settings"]["seed"] == 1
    assert run_main(capsys, *base, "--seed", 1, "--out", tmp_path / "fresh.npz")[0] == 0
    assert sha(out) == sha(tmp_path / "fresh.npz") != first

    # A set whose origin is unknown, and images of an earlier run, are not replaced silently either.
    (tmp_path / "json-less.npz").write_bytes(b"x")
    assert "no readable json-less.json" in run_main(capsys, *base, "--out", tmp_path / "json-less.npz")[2]
    (tmp_path / "p-png").mkdir()
    (tmp_path / "p-png" / "000000.png").write_bytes(b"old")
    assert "holds images of an earlier run" in run_main(capsys, *base, "--out", tmp_path / "p.npz", "--save-png")[2]
    assert run_main(capsys, *base, "--out", tmp_path / "p.npz", "--save-png", "--overwrite")[0] == 0
    assert (tmp_path / "p-png" / "000000.png").read_bytes()[:4] == b"\x89PNG"


def test_tf32_is_allowed_by_default_recorded_and_restored(tmp_path, capsys, monkeypatch):
    ckpt = make_ckpt(tmp_path / "ckpt.pt")
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    seen = []
    real_generate = sample_ddp.generate

    def spy(*a, **k):
        seen.append(flags())
        return real_generate(*a, **k)

    monkeypatch.setattr(sample_ddp, "generate", spy)
    base = ["--ckpt", ckpt, "--num-samples", 2, "--mode", "ode", "--num-steps", 1]
    for extra, name, expected in (([], "a", True), (["--no-tf32"], "b", False), (["--precision", "fp64"], "c", False)):
        seen.clear()
        assert run_main(capsys, *base, *extra, "--out", tmp_path / f"{name}.npz")[0] == 0
        assert seen == [(expected, expected)] and flags() == before
        assert json.loads((tmp_path / f"{name}.json").read_text())["settings"]["tf32"] is expected
    # Importing sample_ddp changes nothing either.
    code = ("import torch; f = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32); "
            "b = f(); import sample_ddp; assert f() == b, f()")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_runs_from_another_working_directory(tmp_path):
    """python /abs/path/sample_ddp.py from elsewhere, relative paths taken from there; -P: the
    script's directory is not put on sys.path by Python (torchrun: see the invariance test)."""
    make_ckpt(tmp_path / "ckpt.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-P", str(REPO / "sample_ddp.py"), "--ckpt", "../ckpt.pt",
                           "--num-samples", "4", "--mode", "ode", "--num-steps", "1", "--out", "out/x.npz",
                           "--device", "cpu"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(elsewhere / "out" / "x.npz") as f:
        assert f["arr_0"].shape == (4, 8, 8, 3)
