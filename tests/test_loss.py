import math

import pytest
import torch

from loss import interpolate, path_coefficients, sample_time, velocity_loss


def test_linear_path_hand_values():
    x, eps, t = torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.tensor([0.25])
    x_t, v = interpolate("linear", x, eps, t)
    assert x_t.item() == pytest.approx(0.75 * 2 - 0.25)  # (1 - t) x + t eps
    assert v.item() == pytest.approx(-1.0 - 2.0)  # eps - x


def test_cosine_path_hand_values():
    x, eps, t = torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.tensor([1 / 3])
    x_t, v = interpolate("cosine", x, eps, t)
    a, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    assert x_t.item() == pytest.approx(a * 2 - s, rel=1e-6)
    assert v.item() == pytest.approx(-math.pi / 2 * s * 2 + math.pi / 2 * a * -1, rel=1e-6)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_velocity_is_time_derivative_and_endpoints(path):
    x, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    h = 1e-6
    (xp, _), (xm, _) = interpolate(path, x, eps, t + h), interpolate(path, x, eps, t - h)
    _, v = interpolate(path, x, eps, t)
    torch.testing.assert_close(v, (xp - xm) / (2 * h), rtol=1e-6, atol=1e-6)
    x0, _ = interpolate(path, x, eps, torch.zeros(3, dtype=torch.float64))
    x1, _ = interpolate(path, x, eps, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(x0, x)  # t = 0 is data
    torch.testing.assert_close(x1, eps, atol=1e-7, rtol=0)  # t = 1 is noise


def test_lognormal_time_range_and_median():
    torch.manual_seed(0)
    t = sample_time(200_000, "lognormal", "cpu")
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.01)  # sigma = exp(N(0,1)) has median 1
    # P(t < 0.25) = P(log sigma < log(1/3))
    assert (t < 0.25).float().mean().item() == pytest.approx(0.5 * (1 + math.erf(math.log(1 / 3) / math.sqrt(2))), abs=0.01)
    u = sample_time(100_000, "uniform", "cpu")
    assert 0 <= u.min() and u.max() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.01)


def test_loss_in_fp32_under_bf16_inputs_and_errors():
    pred, target = torch.randn(4, 3).bfloat16(), torch.randn(4, 3)
    loss = velocity_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((pred.float() - target).pow(2).mean().item())
    with pytest.raises(ValueError, match="unknown path type"):
        path_coefficients("vp", torch.rand(2))
    with pytest.raises(ValueError, match="unknown time sampling"):
        sample_time(2, "beta", "cpu")
