"""Repulsor, Dispersive and the memory bank against independent references (issue 3).

The references below are written with explicit Python loops over samples and negatives, in
float64, so they do not share code or vectorisation tricks with loss.py. Training-level checks
run train.py as a subprocess on a tiny synthetic dataset (one module-scoped batch of runs, two
at a time), and one torchrun launch checks the two-rank gather / enqueue.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from dataset import write_dataset  # noqa: E402
from loss import (  # noqa: E402
    REGULARISERS, Context, Dispersive, NoRegulariser, Repulsor, build_regulariser, default_reg_depth,
    dispersive_loss, effective_rank, interpolate, repulsor_loss,
)
from memory_bank import MemoryBank  # noqa: E402
from models.sit import build_sit  # noqa: E402
from train import get_args  # noqa: E402

# ----------------------------------------------------------------------------- references


def ref_repulsor_terms(rows: Sequence[torch.Tensor], anchors: Sequence[int], bank: Sequence[torch.Tensor],
                       tau: float) -> list[torch.Tensor]:
    """L_i = log(sum over negatives exp(<z_i, n> / tau)) - log(#negatives), one loop per sum.

    `rows` is the whole global batch (a list of vectors, some may require grad), `anchors`
    the indices of this rank's samples, `bank` the bank rows.
    """
    terms = []
    for i in anchors:
        logits = []
        for j, other in enumerate(rows):
            if j != i:
                logits.append(torch.dot(rows[i], other) / tau)
        for neg in bank:
            logits.append(torch.dot(rows[i], neg) / tau)
        top = max(float(v.detach()) for v in logits)
        total = sum(torch.exp(v - top) for v in logits)
        terms.append(torch.log(total) + top - math.log(len(logits)))
    return terms


def ref_repulsor(rows: Sequence[torch.Tensor], anchors: Sequence[int], bank: Sequence[torch.Tensor], tau: float,
                 mask: Sequence[float] | None = None) -> torch.Tensor:
    """Masked mean of the per-sample terms over this rank's anchors."""
    terms = ref_repulsor_terms(rows, anchors, bank, tau)
    weights = [1.0] * len(terms) if mask is None else [float(mask[k]) for k in range(len(terms))]
    return sum(w * v for w, v in zip(weights, terms)) / max(sum(weights), 1.0)


def ref_dispersive(z: torch.Tensor, variant: str, tau: float = 0.5, margin: float = 1.0) -> float:
    """The Dispersive variants by their definitions, in float64 Python loops."""
    x = z.double().reshape(z.shape[0], -1).tolist()
    n, d = len(x), len(x[0])

    def sqdist(a: list[float], b: list[float]) -> float:
        return sum((p - q) ** 2 for p, q in zip(a, b))

    if variant == "infonce_l2":  # official: log mean_{i,j incl. diagonal} exp(-||zi - zj||^2 / (d tau))
        return math.log(sum(math.exp(-sqdist(x[i], x[j]) / (d * tau)) for i in range(n) for j in range(n)) / n ** 2)
    if variant == "infonce_cos":
        norms = [math.sqrt(sum(v * v for v in a)) for a in x]
        cos = [[sum(p * q for p, q in zip(x[i], x[j])) / (norms[i] * norms[j]) for j in range(n)] for i in range(n)]
        return math.log(sum(math.exp(cos[i][j] / tau) for i in range(n) for j in range(n)) / n ** 2)
    if variant == "hinge":
        vals = [max(0.0, margin - sqdist(x[i], x[j]) / d) ** 2 for i in range(n) for j in range(n) if i != j]
        return sum(vals) / len(vals)
    if variant == "covariance":
        mu = [sum(x[i][m] for i in range(n)) / n for m in range(d)]
        total = 0.0
        for m in range(d):
            for k in range(d):
                if m != k:
                    c = sum((x[i][m] - mu[m]) * (x[i][k] - mu[k]) for i in range(n)) / (n - 1)
                    total += c * c
        return total / d
    raise AssertionError(variant)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def rows64(z: torch.Tensor) -> list[torch.Tensor]:
    return list(z.double().unbind(0))


def close(a: torch.Tensor | float, b: torch.Tensor | float, rel: float = 1e-5, abs_: float = 1e-6) -> bool:
    a, b = (float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in (a, b))
    return a == pytest.approx(b, rel=rel, abs=abs_)


# ----------------------------------------------------------------------------- repulsor loss


@pytest.mark.parametrize("bank_rows", [0, 9])
def test_repulsor_loss_matches_loop_reference(bank_rows):
    z, bank, tau = unit(6, 4, 0), unit(bank_rows, 4, 1), 0.2
    loss, logs = repulsor_loss(z, bank, tau)
    ref = ref_repulsor(rows64(z), range(6), rows64(bank), tau)
    assert close(loss, ref), (loss.item(), float(ref))
    assert loss.dtype == torch.float32
    assert ("bank_cos_mean" in logs) == (bank_rows > 0)
    if bank_rows:
        assert close(logs["bank_cos_mean"], (z @ bank.T).mean()) and close(logs["bank_cos_max"], (z @ bank.T).max())


def test_repulsor_loss_mask_and_log_mean_normalisation():
    z, bank, tau = unit(5, 3, 2), unit(4, 3, 3), 0.5
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    loss, _ = repulsor_loss(z, bank, tau, mask)
    assert close(loss, ref_repulsor(rows64(z), range(5), rows64(bank), tau, mask.tolist()))
    # Identical vectors everywhere: every logit is 1/tau, so the log-mean-exp is exactly 1/tau.
    same = F.normalize(torch.ones(3, 3), dim=1)
    loss_same, _ = repulsor_loss(same, same[:2].clone(), tau)
    assert close(loss_same, 1 / tau)


def test_repulsor_loss_gradient_matches_reference_and_skips_the_bank():
    z, bank, tau = unit(5, 4, 4), unit(6, 4, 5), 0.25
    zz = z.clone().requires_grad_(True)
    bank_leaf = bank.clone()
    loss, _ = repulsor_loss(zz, bank_leaf, tau)
    loss.backward()
    ref_z = z.double().requires_grad_(True)
    ref_repulsor(list(ref_z.unbind(0)), range(5), rows64(bank), tau).backward()
    torch.testing.assert_close(zz.grad.double(), ref_z.grad, rtol=1e-4, atol=1e-6)
    assert bank_leaf.grad is None


def ref_pairs(rows: Sequence[torch.Tensor], anchors: Sequence[int], bank: Sequence[torch.Tensor], tau: float,
              local: int, mask: Sequence[float] | None = None) -> torch.Tensor:
    """InfoNCE with the noise twin as positive, one loop per sum: rows are the global batch in rank
    blocks of `local` rows, each block [images, same images]; the twin of global row g is the row
    half a block away in the same block."""
    terms = []
    for i in anchors:
        block, j = divmod(i, local)
        twin = block * local + (j + local // 2) % local
        logits = [torch.dot(rows[i], other) / tau for k, other in enumerate(rows) if k != i]
        logits += [torch.dot(rows[i], neg) / tau for neg in bank]
        top = max(float(v.detach()) for v in logits)
        lse = torch.log(sum(torch.exp(v - top) for v in logits)) + top
        terms.append(lse - torch.dot(rows[i], rows[twin]) / tau)  # -log softmax of the positive
    weights = [1.0] * len(terms) if mask is None else [float(mask[k]) for k in anchors]
    return sum(w * v for w, v in zip(weights, terms)) / max(sum(weights), 1.0)


@pytest.mark.parametrize("bank_rows", [0, 5])
def test_repulsor_pairs_loss_is_infonce_with_the_twin_as_positive(bank_rows):
    z, bank, tau = unit(6, 4, 6), unit(bank_rows, 4, 7), 0.3
    zz = z.clone().requires_grad_(True)
    loss, logs = repulsor_loss(zz, bank, tau, pairs=True)
    loss.backward()
    ref_z = z.double().requires_grad_(True)
    ref = ref_pairs(list(ref_z.unbind(0)), range(6), rows64(bank), tau, local=6)
    ref.backward()
    assert close(loss, ref), (loss.item(), float(ref))
    torch.testing.assert_close(zz.grad.double(), ref_z.grad, rtol=1e-4, atol=1e-6)
    assert close(logs["pair_cos"], (z[:3] * z[3:]).sum(1).mean())  # rows i and i + 3 are twins
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    masked, _ = repulsor_loss(z, bank, tau, mask, pairs=True)
    assert close(masked, ref_pairs(rows64(z), range(6), rows64(bank), tau, 6, mask.tolist()))
    # A twin identical to its anchor and orthogonal to everything else: the positive dominates.
    eye = torch.eye(4)
    easy, _ = repulsor_loss(torch.cat([eye[:2], eye[:2]]), torch.empty(0, 4), 0.05, pairs=True)
    assert float(easy) < 1e-6
    with pytest.raises(ValueError, match="even batch per rank"):
        repulsor_loss(unit(5, 4, 0), bank, tau, pairs=True)


def small_repulsor(bank_steps: int = 3, global_batch: int = 4, hidden: int = 8, seed: int = 0, **kw) -> Repulsor:
    torch.manual_seed(seed)
    return Repulsor(hidden, depth=1, proj_dim=4, proj_hidden=16, temperature=0.3,
                    bank_size=bank_steps * global_batch, global_batch=global_batch, **kw)


def ref_projections(rep: Repulsor, hidden: torch.Tensor, kind: str = "standardised") -> torch.Tensor:
    """Independent reference of the head: pool tokens, MLP, centre over the batch (or not), unit norm."""
    u = rep.head(hidden.mean(dim=1)).double()
    if kind in ("centred", "standardised"):
        u = u - u.mean(0)
    if kind == "standardised":
        u = u / (u.pow(2).mean(0) + 1e-5).sqrt()
    return (u / u.norm(dim=1, keepdim=True)).float()


@pytest.mark.parametrize("kind", ["centred", "standardised", "mlp"])
def test_repulsor_head_kinds_match_reference(kind):
    rep = small_repulsor(head=kind)
    h = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(rep.project(h), ref_projections(rep, h, kind), rtol=1e-5, atol=1e-6)
    assert (rep.head[-1].bias is None) == (kind != "mlp")  # a bias would be centred away


def test_repulsor_running_statistics_in_eval_and_running_head():
    """Running mean: the plain average of the batch means over the first 1 / (1 - m) steps; eval mode
    centres single images with it; the `running` head centres with it (current batch included)."""
    rep = small_repulsor(head="running")
    g = torch.Generator().manual_seed(5)
    hs = [torch.randn(4, 3, 8, generator=g) + 2.0 for _ in range(3)]
    means = []
    for i, h in enumerate(hs):
        with torch.no_grad():
            u = rep.head(h.mean(dim=1))
            means.append(u.mean(0))
            centre = torch.stack(means).mean(0)
            torch.testing.assert_close(rep.project(h), F.normalize(u - centre, dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rep.running_mean, torch.stack(means).mean(0))
    assert rep.running_steps.item() == 3
    rep.eval()
    one = hs[0][:1]
    with torch.no_grad():
        torch.testing.assert_close(rep.project(one), F.normalize(rep.head(one.mean(dim=1)) - rep.running_mean, dim=1))
    before = rep.running_mean.clone()
    rep.train()
    with torch.no_grad():
        rep.project(torch.full((4, 3, 8), float("nan")))  # a skipped (non-finite) step leaves the statistics
    torch.testing.assert_close(rep.running_mean, before)
    assert rep.running_steps.item() == 3


def test_repulsor_module_pools_projects_and_uses_only_the_filled_bank():
    rep = small_repulsor(bank_steps=3)
    g = torch.Generator().manual_seed(7)
    h1, h2 = torch.randn(4, 5, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    t = torch.full((4,), 0.5)
    with torch.no_grad():
        z1, z2 = ref_projections(rep, h1), ref_projections(rep, h2)
    torch.testing.assert_close(rep.project(h1).detach(), z1)
    torch.testing.assert_close(z1.norm(dim=1), torch.ones(4))
    out1 = rep(Context(hidden=h1, t=t))  # empty bank: in-batch negatives only
    assert close(out1["reg"], ref_repulsor(rows64(z1), range(4), [], 0.3))
    assert out1["bank_fill"].item() == pytest.approx(1 / 3)
    out2 = rep(Context(hidden=h2, t=t))  # partial bank: the 4 rows of step 1, not the 8 zero rows
    assert close(out2["reg"], ref_repulsor(rows64(z2), range(4), rows64(z1), 0.3))
    assert out2["bank_fill"].item() == pytest.approx(2 / 3)
    torch.testing.assert_close(rep.bank.negatives(), torch.cat([z1, z2]))


def test_repulsor_module_t_max_masks_anchors():
    rep = small_repulsor(t_max=0.5)
    h = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([0.1, 0.9, 0.5, 0.7])
    with torch.no_grad():
        z = rep.project(h)
    out = rep(Context(hidden=h, t=t))
    assert close(out["reg"], ref_repulsor(rows64(z), range(4), [], 0.3, [1.0, 0.0, 1.0, 0.0]))


def test_repulsor_gradient_reaches_only_current_projections():
    """Step 2 backprops into this step's hidden state and head only: the bank (step 1's
    projections) is a constant, and no graph of step 1 is kept alive through it."""
    rep = small_repulsor(bank_steps=2)
    g = torch.Generator().manual_seed(9)
    h1 = torch.randn(4, 3, 8, generator=g).requires_grad_(True)
    h2 = torch.randn(4, 3, 8, generator=g).requires_grad_(True)
    t = torch.full((4,), 0.5)
    rep(Context(hidden=h1, t=t))["reg"].backward()
    rep.zero_grad()
    h1.grad = None
    negatives = rep.bank.negatives()
    out = rep(Context(hidden=h2, t=t))
    out["reg"].backward()  # would raise if the bank held step 1's graph
    assert h1.grad is None
    assert not rep.bank.queue.requires_grad and rep.bank.queue.grad is None
    got_h, got_head = h2.grad.clone(), [p.grad.clone() for p in rep.head.parameters()]
    # Reference: the loop loss on this step's projections with the bank as a constant.
    rep.zero_grad()
    h2_ref = h2.detach().clone().requires_grad_(True)
    z = rep.project(h2_ref)
    ref_repulsor(list(z.double().unbind(0)), range(4), rows64(negatives), 0.3).backward()
    torch.testing.assert_close(got_h, h2_ref.grad, rtol=1e-4, atol=1e-7)
    for got, p in zip(got_head, rep.head.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-7)
    assert any(p.abs().sum() > 0 for p in got_head)


def test_repulsor_global_batch_one_with_bank_first_step_is_finite():
    """Global batch 1 with a bank: the first step has no negatives at all (empty bank, no other
    sample). Either the constructor refuses the setting with a clear ValueError, or that step
    gives a finite loss (no crash, no NaN)."""
    try:
        rep = small_repulsor(bank_steps=4, global_batch=1)
    except ValueError as e:
        assert "global batch" in str(e)
        return
    out = rep(Context(hidden=torch.randn(1, 3, 8), t=torch.full((1,), 0.5)))
    assert torch.isfinite(out["reg"])
    out2 = rep(Context(hidden=torch.randn(1, 3, 8), t=torch.full((1,), 0.5)))  # now one bank negative
    assert torch.isfinite(out2["reg"])


def test_loss_math_is_fp32_under_bf16_autocast():
    """loss.py promises fp32 loss math under autocast: the similarity / distance products must
    not be autocast to bf16 (bf16 cancellation in ||a||^2 + ||b||^2 - 2ab ruins infonce_l2)."""
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(8, 4, 16, generator=g) + 4.0  # a large shared component, like real activations
    t = torch.full((8,), 0.5)
    for variant in Dispersive.VARIANTS:
        disp = Dispersive(1, variant, temperature=0.5, margin=40.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = disp(Context(hidden=hidden, t=t))["reg"]
        assert out.dtype == torch.float32, variant
        assert close(out, ref_dispersive(hidden, variant, 0.5, 40.0), rel=1e-4, abs_=1e-5), (variant, out.item())
    rep = small_repulsor(bank_steps=3, global_batch=8, hidden=16)
    rep.bank.enqueue(unit(8, 4, 11))
    negatives = rep.bank.negatives()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = rep.project(hidden).detach()  # the head itself may run in bf16
        out = rep(Context(hidden=hidden, t=t))["reg"]
    assert out.dtype == torch.float32
    assert close(out, ref_repulsor(rows64(z), range(8), rows64(negatives), 0.3), rel=1e-4)


# ----------------------------------------------------------------------------- dispersive


@pytest.mark.parametrize("variant", Dispersive.VARIANTS)
def test_dispersive_variants_match_hand_computation(variant):
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(12))
    margin = 2.0  # with d = 5 Gaussian features ||zi - zj||^2 / d is about 2: some pairs active, some not
    got = dispersive_loss(z, variant, temperature=0.7, margin=margin)
    assert got.dtype == torch.float32
    assert close(got, ref_dispersive(z, variant, 0.7, margin), rel=1e-5, abs_=1e-6), (variant, got.item())
    if variant == "hinge":
        d2 = torch.cdist(z.double(), z.double()).pow(2) / 5
        off = ~torch.eye(6, dtype=torch.bool)
        assert (d2[off] < margin).any() and (d2[off] > margin).any()


def test_dispersive_infonce_l2_official_formula_and_module():
    """The official form: flatten per sample, d = features per sample, diagonal included."""
    hidden = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(13))
    z = hidden.reshape(5, -1).double()
    n, d, tau = 5, 12, 0.5
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += math.exp(-float(((z[i] - z[j]) ** 2).sum()) / (d * tau))
    official = math.log(total / (n * n))
    disp = Dispersive(depth=1, variant="infonce_l2", temperature=tau)
    assert close(disp(Context(hidden=hidden, t=torch.full((5,), 0.3)))["reg"], official)
    # Identical samples: every term is exp(0), the loss is exactly log 1 = 0.
    assert dispersive_loss(torch.ones(4, 7), "infonce_l2").item() == pytest.approx(0.0, abs=1e-6)
    # t_max drops samples before the batch statistic; fewer than 2 left gives a zero that still backprops.
    masked = Dispersive(1, "infonce_l2", tau, t_max=0.5)
    t = torch.tensor([0.1, 0.9, 0.4, 0.8, 0.2])
    got = masked(Context(hidden=hidden, t=t))["reg"]
    assert close(got, ref_dispersive(hidden[[0, 2, 4]], "infonce_l2", tau))
    h = hidden.clone().requires_grad_(True)
    lone = masked(Context(hidden=h, t=torch.tensor([0.1, 0.9, 0.9, 0.9, 0.9])))["reg"]
    lone.backward()
    assert lone.item() == 0.0 and h.grad is not None


class NoHostSync(TorchDispatchMode):
    """Fails on every op that makes a GPU wait for the host: reading a value (.item(), bool(),
    .all() in an `if`) or a data-dependent shape (nonzero, masked_select, boolean indexing).
    On the CPU nothing really syncs, so the ops themselves are checked."""

    SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name in self.SYNC_OPS or bool_index:
            raise AssertionError(f"device->host sync: {func}")
        return func(*args, **(kwargs or {}))


def test_default_regularisers_never_sync_with_the_host():
    """At the default t_max 1 neither regulariser reads a tensor value on the host, forward
    or backward (Dispersive used to test keep.all() and index by it; hinge indexed the pairs)."""
    hidden = torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(21)).requires_grad_(True)
    t = torch.rand(6, generator=torch.Generator().manual_seed(22))
    rep = small_repulsor(bank_steps=2, global_batch=6)
    rep(Context(hidden=hidden.detach(), t=t))  # a partly filled bank: the bank branch runs too
    with NoHostSync():
        for variant in Dispersive.VARIANTS:
            Dispersive(1, variant, margin=2.0)(Context(hidden=hidden, t=t))["reg"].backward()
        out = rep(Context(hidden=hidden, t=t))
        out["reg"].backward()
    assert "bank_cos_max" in out
    with pytest.raises(AssertionError, match="sync"), NoHostSync():  # the check does see a sync
        hidden[t > 0.5]
    with pytest.raises(AssertionError, match="sync"), NoHostSync():
        bool((t <= 1).all())


def test_unknown_dispersive_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown dispersive variant 'l1'"):
        Dispersive(1, "l1")
    with pytest.raises(ValueError, match="unknown dispersive variant"):
        dispersive_loss(torch.randn(3, 2), "l1")
    with pytest.raises(SystemExit) as e:  # the CLI refuses it before anything starts
        get_args(["--data-dir", "x", "--reg", "dispersive", "--disp-variant", "l1"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- builder


SIX_BLOCKS = ["--model", "custom", "--depth", "6", "--hidden-size", "64", "--num-heads", "2", "--patch-size", "4"]


def _args(*extra: str):
    return get_args(["--data-dir", "unused", *extra])


def _sit(depth: int = 6):
    return build_sit(None, depth=depth, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1,
                     num_classes=4)


def test_default_reg_depth_and_builder():
    assert default_reg_depth("repulsor", "SiT-B/2", 12) == 4
    assert default_reg_depth("repulsor", "SiT-XL/2", 28) == 8
    assert default_reg_depth("repulsor", None, 12) == 4
    assert default_reg_depth("dispersive", "SiT-XL/2", 28) == 7
    assert default_reg_depth("repa", "SiT-L/2", 24) == 8
    assert {"none", "dispersive", "repulsor", "repa"} <= set(REGULARISERS)  # repa: tests/test_repa.py
    sit = _sit()
    reg = build_regulariser(_args(*SIX_BLOCKS, "--reg", "repulsor", "--bank-size", "32", "--proj-hidden", "16",
                                  "--proj-dim", "8"), sit, 16, "cpu")
    assert isinstance(reg, Repulsor) and reg.depth == 2 and reg.temperature == 0.5 and reg.bank.size == 32
    assert reg.head[0].in_features == 64  # the builder read the built SiT's width
    reg = build_regulariser(_args(*SIX_BLOCKS, "--reg", "dispersive", "--reg-depth", "3"), sit, 16, "cpu")
    assert isinstance(reg, Dispersive) and reg.depth == 3 and reg.temperature == 0.5
    assert build_regulariser(_args(*SIX_BLOCKS), sit, 16, "cpu").depth is None
    # The named size comes from --model, unless --depth overrides it (then the custom rule, depth // 3).
    assert build_regulariser(_args("--model", "SiT-B/2", "--reg", "repulsor", "--proj-hidden", "8"),
                             sit, 16, "cpu").depth == 4
    assert build_regulariser(_args("--model", "SiT-B/2", "--depth", "6", "--reg", "repulsor", "--proj-hidden", "8"),
                             sit, 16, "cpu").depth == 2
    # The older call (model name, width, depth instead of the SiT) still builds the same regulariser.
    old = build_regulariser(_args("--reg", "dispersive"), None, 64, 6, 16, "cpu")
    assert isinstance(old, Dispersive) and old.depth == 1


@pytest.mark.parametrize("depth", ["7", "-1", "0"])
def test_reg_depth_out_of_range_is_an_error(depth):
    with pytest.raises(ValueError, match=f"--reg-depth {depth} is outside 1..6"):
        build_regulariser(_args(*SIX_BLOCKS, "--reg", "dispersive", "--reg-depth", depth), _sit(), 16, "cpu")


def test_bank_size_not_multiple_of_global_batch_is_an_error():
    with pytest.raises(ValueError, match="bank size 60 is not a multiple of the global batch 16"):
        MemoryBank(60, 8, 16)
    with pytest.raises(ValueError, match="not a multiple"):
        build_regulariser(_args(*SIX_BLOCKS, "--reg", "repulsor", "--bank-size", "60", "--proj-hidden", "8"), _sit(),
                          16, "cpu")


# ----------------------------------------------------------------------------- memory bank


def test_bank_fifo_wraparound_and_partial_fill():
    bank = MemoryBank(size=6, dim=2, global_batch=2)
    batches = [torch.tensor([[10.0 * s + 1, 0.0], [10.0 * s + 2, 0.0]]) for s in range(5)]
    assert bank.negatives().shape == (0, 2) and bank.fill_fraction == 0.0
    bank.enqueue(batches[0])
    torch.testing.assert_close(bank.negatives(), batches[0])  # partial: only the filled rows
    assert bank.fill_fraction == pytest.approx(1 / 3) and bank.ptr == 2
    bank.enqueue(batches[1])
    bank.enqueue(batches[2])
    torch.testing.assert_close(bank.negatives(), torch.cat(batches[:3]))  # full, in arrival order
    assert bank.fill_fraction == 1.0 and bank.ptr == 0
    bank.enqueue(batches[3])  # wraps: the oldest batch (0) is overwritten first
    torch.testing.assert_close(bank.negatives(), torch.cat([batches[3], batches[1], batches[2]]))
    bank.enqueue(batches[4])
    torch.testing.assert_close(bank.negatives(), torch.cat([batches[3], batches[4], batches[2]]))
    assert bank.ptr == 4 and bank.filled == 6


def test_bank_negatives_are_a_copy_state_round_trip_and_errors():
    bank = MemoryBank(4, 3, 2, dtype="bf16")
    first = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.25, 1.0 / 3.0]])
    bank.enqueue(first.requires_grad_(True))
    neg = bank.negatives()
    assert neg.dtype == torch.float32 and not neg.requires_grad and bank.queue.dtype == torch.bfloat16
    torch.testing.assert_close(neg, first.detach().bfloat16().float())
    bank.enqueue(torch.zeros(2, 3))
    bank.enqueue(torch.full((2, 3), 7.0))  # overwrites rows 0-1
    torch.testing.assert_close(neg, first.detach().bfloat16().float())  # the earlier copy is untouched
    state = bank.state_dict()
    other = MemoryBank(4, 3, 2, dtype="bf16")
    other.load_state_dict(state)
    assert torch.equal(other.queue, bank.queue) and (other.ptr, other.filled) == (bank.ptr, bank.filled) == (2, 4)
    with pytest.raises(ValueError, match="resume with the same --bank-size"):
        MemoryBank(8, 3, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="enqueue got"):
        bank.enqueue(torch.zeros(3, 3))
    empty = MemoryBank(0, 3, 2)
    empty.enqueue(torch.zeros(2, 3))
    assert empty.negatives().shape == (0, 3) and empty.fill_fraction == 0.0


# ----------------------------------------------------------------------------- two ranks (torchrun)


def test_two_rank_bank_and_loss(two_rank_run):
    """Both ranks' banks are identical and hold every rank's vectors in global-rank order (with
    wrap-around); the per-rank Repulsor losses average to the single-process loss on the
    concatenated batch, and the gradients match it (see below)."""
    import dist_bank_worker as w

    tmp_path = two_rank_run

    def expected_rows(steps: Sequence[int]) -> torch.Tensor:
        return torch.cat([torch.cat([w.bank_vectors(s, r) for r in range(2)]) for s in steps])

    banks = [torch.load(tmp_path / f"bank_rank{r}.pt") for r in range(2)]
    assert torch.equal(banks[0]["queue"], banks[1]["queue"])
    # 5 steps into a 3-step queue: slots hold steps 3, 4, 2; each step as rank 0's rows then rank 1's.
    assert torch.equal(banks[0]["queue"], expected_rows([3, 4, 2]))
    assert (banks[0]["ptr"], banks[0]["filled"]) == (banks[1]["ptr"], banks[1]["filled"]) == (8, 12)
    partial = [torch.load(tmp_path / f"bank_partial_rank{r}.pt") for r in range(2)]
    for p in partial:
        assert torch.equal(p["negatives"], expected_rows([0, 1])) and p["fill"] == pytest.approx(2 / 3)

    z, bank, mask = w.loss_inputs(2)
    b = w.LOSS_LOCAL_BATCH
    # One process holding the whole batch: the masked mean over the global batch, and its gradient.
    z64 = z.double().requires_grad_(True)
    global_ref = ref_repulsor(list(z64.unbind(0)), range(2 * b), rows64(bank), w.LOSS_TAU, mask.tolist())
    global_ref.backward()
    per_rank, per_rank_nomask = [], []
    for r in range(2):
        got = torch.load(tmp_path / f"loss_rank{r}.pt")
        per_rank.append(float(got["loss"]))
        per_rank_nomask.append(float(got["loss_nomask"]))
        # The gather's backward sums every rank's loss gradient for this rank's rows: the
        # gradient of (sum over ranks of the losses) = 2 x the global loss's, which DDP's
        # averaging over 2 ranks turns back into the single-process gradient.
        torch.testing.assert_close(got["grad"].double(), 2 * z64.grad[r * b:(r + 1) * b], rtol=1e-4, atol=1e-7)
    assert close(sum(per_rank) / 2, global_ref)  # unequal kept counts per rank: global normalisation
    single, _ = repulsor_loss(z, bank, w.LOSS_TAU)  # one process holding the whole batch
    assert close(sum(per_rank_nomask) / 2, single)

    # Noise pairs: each rank's twin sits half a block away in its OWN block (rank offset included).
    zp, bank_p = w.pair_inputs(2)
    zp64 = zp.double().requires_grad_(True)
    pair_ref = ref_pairs(list(zp64.unbind(0)), range(len(zp)), rows64(bank_p), w.LOSS_TAU, w.PAIR_LOCAL)
    pair_ref.backward()
    got = [torch.load(tmp_path / f"pairs_rank{r}.pt") for r in range(2)]
    assert close(sum(float(g["loss"]) for g in got) / 2, pair_ref)
    for r, g in enumerate(got):
        sl = slice(r * w.PAIR_LOCAL, (r + 1) * w.PAIR_LOCAL)
        torch.testing.assert_close(g["grad"].double(), 2 * zp64.grad[sl], rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """One torchrun launch of tests/dist_bank_worker.py for every two-rank test."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for `import dist_bank_worker`
    out = tmp_path_factory.mktemp("tworank")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "dist_bank_worker.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("config", ["nobank", "bank", "bank_mask", "bank_centred", "bank_running", "bank_mlp"])
def test_two_ranks_train_like_one_process_with_the_whole_batch(two_rank_run, config):
    """DDP over 2 ranks x b gives the parameter gradients of 1 process x 2b (the Repulsor's
    negatives from the other rank carry gradient), with and without a bank and with the t_max
    mask, and with every projection head (centring statistics over the gathered global batch, so a
    per-rank BatchNorm would fail here); each micro-step all-gathers once (loss and enqueue share it) and all-reduces once
    in backward (the gather's; DDP's own reduction is not a Python-level call)."""
    import dist_bank_worker as w

    ranks = [torch.load(two_rank_run / f"ddp_{config}_rank{r}.pt") for r in range(2)]
    module = w.ddp_module(config)
    for step in range(w.DDP_STEPS):
        w.ddp_step(module, w.ddp_inputs(step))
        ref = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
        module.zero_grad(set_to_none=True)
        for r, got in enumerate(ranks):
            assert got["grads"][step].keys() == ref.keys()
            for k in ref:
                torch.testing.assert_close(got["grads"][step][k], ref[k], rtol=1e-4, atol=1e-6,
                                           msg=lambda m, k=k, r=r: f"step {step} rank {r} {k}: {m}")
        assert any(v.abs().sum() > 0 for k, v in ref.items() if k.startswith("reg.head"))
    for got in ranks:
        assert got["calls"] == {"all_gather": w.DDP_STEPS, "all_reduce": w.DDP_STEPS}
        ref_bank = module.reg.bank.state_dict()
        assert (got["bank"]["ptr"], got["bank"]["filled"]) == (ref_bank["ptr"], ref_bank["filled"])
        torch.testing.assert_close(got["bank"]["queue"], ref_bank["queue"])  # rank order, as one process


# ----------------------------------------------------------------------------- train.py runs

TINY = ["--model", "custom", "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--patch-size", "4",
        "--global-batch-size", "16", "--num-workers", "0", "--device", "cpu", "--log-every", "4",
        "--proj-hidden", "32", "--proj-dim", "16", "--ema-decay", "0.9"]
STEPS, HALF = 10, 5  # 64 items / batch 16 = 4 steps an epoch: HALF resumes mid-epoch
BANK = "48"  # 3 global batches: wrapped and full at HALF (ptr 32) and at STEPS (ptr 16)


def tiny_dataset(path: str, n: int = 64, size: int = 16, num_classes: int = 4) -> str:
    rng = np.random.default_rng(0)
    patterns = rng.uniform(-1, 1, (num_classes, 1, size, size))
    labels = rng.integers(0, num_classes, n)
    mean = patterns[labels] + 0.05 * rng.standard_normal((n, 1, size, size))
    write_dataset(path, mean.astype(np.float16), None, labels, num_classes=num_classes, shard_size=40)
    return path


def train(data: str, results: str, exp: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data-dir", data, "--results-dir", results,
           "--exp-name", exp, *TINY, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """All train.py runs of this module, two at a time; maps a name to its final checkpoint
    (or to the CompletedProcess for the runs that must fail)."""
    root = tmp_path_factory.mktemp("regruns")
    data = tiny_dataset(str(root / "data"))
    res = str(root / "results")
    steps = ["--max-steps", str(STEPS), "--ckpt-every", str(STEPS)]
    rep = ["--reg", "repulsor", "--bank-size", BANK]

    def resumed(name: str, *flags: str) -> None:
        train(data, res, name, *flags, "--max-steps", str(HALF), "--ckpt-every", str(HALF))
        train(data, res, name, *flags, *steps)  # --resume auto picks up step HALF

    jobs = {
        "none": lambda: train(data, res, "none", *steps),
        "rep_lambda0": lambda: train(data, res, "rep_lambda0", *rep, "--reg-weight", "0", *steps),
        "disp_lambda0": lambda: train(data, res, "disp_lambda0", "--reg", "dispersive", "--reg-weight", "0", *steps),
        "rep_straight": lambda: train(data, res, "rep_straight", *rep, *steps),
        "rep_resumed": lambda: resumed("rep_resumed", *rep),
        "pairs_straight": lambda: train(data, res, "pairs_straight", *rep, "--noise-pairs", *steps),
        "pairs_resumed": lambda: resumed("pairs_resumed", *rep, "--noise-pairs"),
        "pairs_odd": lambda: train(data, res, "pairs_odd", "--noise-pairs", "--global-batch-size", "15", *steps,
                                   check=False),
        "disp": lambda: train(data, res, "disp", "--reg", "dispersive", "--max-steps", "4", "--ckpt-every", "4"),
        "bad_bank": lambda: train(data, res, "bad_bank", "--reg", "repulsor", "--bank-size", "60", *steps, check=False),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(f) for k, f in jobs.items()}
        done = {k: f.result() for k, f in futures.items()}
    out = {k: os.path.join(res, k, "checkpoints", f"{4 if k == 'disp' else STEPS:07d}.pt") for k in jobs}
    out["bad_bank"], out["pairs_odd"] = done["bad_bank"], done["pairs_odd"]
    return out


def assert_state_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max |diff| {(a[k].float() - b[k].float()).abs().max()})"


@pytest.mark.parametrize("reg", ["rep_lambda0", "disp_lambda0"])
def test_lambda_zero_trains_exactly_like_reg_none(runs, reg):
    base, other = load_checkpoint(runs["none"]), load_checkpoint(runs[reg])
    assert other["args"]["reg"] != "none" and other["args"]["reg_weight"] == 0.0
    assert_state_equal(base["model"], other["model"], "model")
    assert_state_equal(base["ema"], other["ema"], "ema")


def test_exact_resume_with_bank(runs):
    straight, resumed = load_checkpoint(runs["rep_straight"]), load_checkpoint(runs["rep_resumed"])
    assert straight["step"] == resumed["step"] == STEPS
    bank_a, bank_b = straight["reg_extra"]["bank"], resumed["reg_extra"]["bank"]
    assert (bank_a["ptr"], bank_a["filled"]) == (bank_b["ptr"], bank_b["filled"]) == ((STEPS * 16) % int(BANK), int(BANK))
    assert torch.equal(bank_a["queue"], bank_b["queue"]), "bank differs after resume"
    assert_state_equal(straight["model"], resumed["model"], "model")
    assert_state_equal(straight["ema"], resumed["ema"], "ema")
    assert_state_equal(straight["regulariser"], resumed["regulariser"], "regulariser head")


@pytest.mark.parametrize("name", ["none", "disp", "rep_straight"])
def test_trained_model_builds_plain_sit_for_sampling(runs, name):
    ckpt = load_checkpoint(runs[name])
    model = model_from_checkpoint(ckpt, weights="ema", log=lambda *a: None)
    fresh = build_sit(None, depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1,
                      num_classes=4)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in fresh.parameters())
    assert model.state_dict().keys() == fresh.state_dict().keys()
    assert_state_equal(model.state_dict(), ckpt["ema"], "ema weights")
    if name == "rep_straight":  # the head is trained and checkpointed, but never part of the SiT
        assert ckpt["regulariser"] and not set(ckpt["regulariser"]) & set(ckpt["model"])
    x = torch.randn(2, 1, 16, 16)
    assert model(x, torch.rand(2), torch.tensor([0, 4])).shape == x.shape


def test_train_rejects_bank_size_not_multiple_of_global_batch(runs):
    proc = runs["bad_bank"]
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "bank size 60" in lines[0] and "global batch 16" in lines[0]


def test_noise_pairs_resume_exactly_and_count_images_per_step(runs):
    """--noise-pairs: 8 images x 2 noise levels per step, so an epoch of 64 items is 8 steps (HALF
    resumes mid-epoch); the twin positive trains, and a resumed run equals the straight one."""
    straight, resumed = load_checkpoint(runs["pairs_straight"]), load_checkpoint(runs["pairs_resumed"])
    assert straight["args"]["noise_pairs"] and straight["data_position"]["steps_per_epoch"] == 8
    assert straight["reg_extra"]["bank"]["ptr"] == (STEPS * 16) % int(BANK)  # 16 projections a step
    for key in ("model", "ema", "regulariser"):
        assert_state_equal(straight[key], resumed[key], key)
    assert torch.equal(straight["reg_extra"]["bank"]["queue"], resumed["reg_extra"]["bank"]["queue"])
    rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(os.path.dirname(runs["pairs_straight"])),
                                                            "metrics.jsonl"))]
    assert all("pair_cos" in r for r in rows)
    proc = runs["pairs_odd"]
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --global-batch-size 15 is not divisible by world size 1 x --grad-accum-steps 1 x 2 (--noise-pairs)")


def test_noise_pairs_step_sees_each_image_twice_at_independent_times_and_noises():
    """Seen through the seam, as any regulariser sees a step: [images, same images], each at its own
    time and noise, with the context's x_t and target from those."""
    import train as train_mod

    seen = []

    class Spy(NoRegulariser):
        def forward(self, ctx):
            seen.append(ctx)
            return {}

    args = get_args(["--data-dir", "unused", "--model", "custom", "--depth", "2", "--hidden-size", "32",
                     "--num-heads", "2", "--patch-size", "4", "--global-batch-size", "8", "--noise-pairs"])
    torch.manual_seed(0)
    sit = build_sit(None, depth=2, hidden_size=32, num_heads=2, patch_size=4, input_size=8, in_channels=1,
                    num_classes=3)
    module = train_mod.TrainModule(sit, Spy())
    params = list(module.parameters())
    opt = train_mod.make_optimizer(params, args)
    batch = (torch.randn(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 1]))
    one, zero = torch.ones(1, 1, 1), torch.zeros(1, 1, 1)
    train_mod.train_step(module, opt, torch.amp.GradScaler("cpu", enabled=False), params, batch, args, one, zero,
                         None)
    ctx = seen[0]
    x, noise, t = ctx.x, ctx.noise, ctx.t
    assert x.shape[0] == 8 and torch.equal(x[:4], batch[0]) and torch.equal(x[4:], batch[0])
    assert torch.equal(ctx.y, torch.tensor([0, 1, 2, 1, 0, 1, 2, 1]))
    assert (noise[:4] - noise[4:]).abs().amin(dim=(1, 2, 3)).gt(0).all() and (t[:4] != t[4:]).all()
    x_t, target = interpolate(args.path_type, x, noise, t)
    assert torch.equal(ctx.x_t, x_t) and torch.equal(ctx.target, target) and ctx.pred.shape == x.shape
    assert ctx.hidden is None and ctx.sit is sit and ctx.ema is None  # no block asked for, no EMA attached


def _train_head_alone(head: str, steps: int = 60, batch: int = 32, hidden: int = 32) -> tuple[dict, dict]:
    """The collapse of issue 19 in seconds: pooled features with a large shared mean (as block outputs
    have), the Repulsor head trained alone with Adam against a bank of 32 stale batches."""
    torch.manual_seed(0)
    rep = Repulsor(hidden, 1, proj_dim=16, proj_hidden=64, temperature=0.5, bank_size=32 * batch,
                   global_batch=batch, head=head)
    opt = torch.optim.Adam(rep.parameters(), lr=1e-3)
    mean = 3 * torch.randn(hidden)
    for _ in range(steps):
        out = rep(Context(hidden=mean + 0.3 * torch.randn(batch, 4, hidden), t=torch.rand(batch)))
        opt.zero_grad()
        out["reg"].backward()
        opt.step()
    return {k: v.item() for k, v in out.items()}, rep.diagnostics()


def test_old_head_collapses_and_centred_head_stays_spread():
    """Regression test of the fix: the uncentred head (--proj-head mlp) sends the whole batch to one
    point (mean in-batch cosine ~1, the term stuck near 1 / tau, effective rank ~1); the default
    standardised head (and plain centring) keep the batch and the bank spread."""
    old, old_diag = _train_head_alone("mlp")
    assert old["batch_cos_mean"] > 0.9 and old_diag["batch_eff_rank"] < 2
    for kind in ("standardised", "centred"):
        new, new_diag = _train_head_alone(kind)
        assert new["batch_cos_mean"] < 0.5, kind
        assert new_diag["batch_eff_rank"] >= 8 and new_diag["proj_eff_rank"] >= 8, kind  # of 16 dimensions
        assert abs(new["reg"] - 1 / 0.5) > 0.5, kind


def test_effective_rank_reference():
    assert effective_rank(torch.eye(8)) == pytest.approx(8.0)
    assert effective_rank(torch.ones(20, 8)) == pytest.approx(1.0)  # every row the same direction
    m = torch.diag(torch.tensor([3.0, 1.0]))
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(m) == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    wide = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))  # either Gram matrix: the same rank
    assert effective_rank(wide) == pytest.approx(effective_rank(wide.T), rel=1e-6)
    assert 3 < effective_rank(wide) < 5


def test_dispersive_logs_uniformity():
    disp = Dispersive(1, "infonce_l2")
    h = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(3))
    out = disp(Context(hidden=h, t=torch.full((6,), 0.5)))
    u = F.normalize(h.reshape(6, -1), dim=1)
    cos = u @ u.T
    assert close(out["batch_cos_mean"], (cos.sum() - cos.diagonal().sum()) / 30)
    assert 1 <= disp.diagnostics()["batch_eff_rank"] <= 6
