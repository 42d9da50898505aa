"""torch.compile under bf16 autocast gives the eager SiT's loss and gradients (issue 11 item 15).

One compile costs ~30 s on the project's 2-core CPU, so this runs only with RUN_COMPILE_TESTS=1;
benchmarks/compile_bf16_nan.py is the full layer-by-layer and train_step check.
"""
import copy
import os

import pytest
import torch

from loss import velocity_loss
from models.sit import build_sit

pytestmark = pytest.mark.skipif(os.environ.get("RUN_COMPILE_TESTS") != "1",
                                reason="torch.compile is slow on CPU: set RUN_COMPILE_TESTS=1")


def _step(sit, x, t, y, drop, target):
    sit.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sit(x, t, y, drop=drop)
    loss = velocity_loss(out, target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in sit.named_parameters() if p.grad is not None}


def test_compiled_bf16_matches_eager_loss_and_grads():
    torch.manual_seed(0)
    eager = build_sit(None, depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1,
                      num_classes=4).train()
    # Leave adaLN-Zero's zero init: with zero gates most gradients would be exactly zero in both.
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.02 * torch.randn_like(p))
    comp = copy.deepcopy(eager)
    comp.compile()
    x, target = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)
    t, y = torch.rand(8), torch.randint(0, 4, (8,))
    drop = torch.tensor([True, False] * 4)  # fixed, so both see the same conditions
    le, ge = _step(eager, x, t, y, drop, target)
    lc, gc = _step(comp, x, t, y, drop, target)
    assert torch.isfinite(lc) and (lc - le).abs() <= 1e-2 * le
    assert set(gc) == set(ge)
    for name in ge:
        assert torch.isfinite(gc[name]).all(), name
        # bf16 rounding differs between fused and unfused kernels: ~1 % measured, 5 % allowed
        assert (gc[name] - ge[name]).norm() <= 0.05 * ge[name].norm() + 1e-6, name
