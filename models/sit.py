"""SiT: a DiT-style transformer that predicts the flow-matching velocity.

State-dict keys follow the REPA codebase's SiT (x_embedder, t_embedder, y_embedder,
blocks.N.*, final_layer.*, pos_embed) so a released REPA checkpoint loads for sampling.
With cond="memory" (GMem) the condition is a memory snippet (B x memory_dim floats, see gmem.py)
instead of a class label; only y_embedder differs (y_embedder.proj.*, y_embedder.null_embedding).
The output has as many channels as the input (velocity only, no learned sigma).

Time convention (used everywhere in this repository): t = 0 is data, t = 1 is noise.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SiTConfig:
    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    qk_norm: bool = False
    cond: str = "class"     # "class": y is a label; "memory": y is a B x memory_dim snippet (GMem)
    memory_dim: int = 0     # snippet dimension, cond="memory" only

    def to_dict(self) -> dict:
        return asdict(self)


_SIZES = {  # name: (depth, hidden, heads)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
SiT_models: dict[str, dict] = {
    f"SiT-{size}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
    for size, (d, h, n) in _SIZES.items()
    for p in (2, 4, 8)
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, D


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of continuous t in [0, 1], then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


CONDS = ("class", "memory")


def _cfg_drop(n: int, device: torch.device, train: bool, p: float, drop: torch.Tensor | None) -> torch.Tensor | None:
    """Which rows get the null condition: `drop` when given (sampling), else a Bernoulli(p) draw
    in training, else none."""
    if drop is not None:
        if drop.shape != (n,):
            raise ValueError(f"drop mask has shape {tuple(drop.shape)}, expected ({n},): one flag per sample")
        return drop.to(device=device, dtype=torch.bool)
    if train and p > 0:
        return torch.rand(n, device=device) < p
    return None


class LabelEmbedder(nn.Module):
    """Class embedding; row `num_classes` is the classifier-free-guidance null class."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, train: bool, drop: torch.Tensor | None = None) -> torch.Tensor:
        if labels.is_floating_point():
            raise ValueError("a class-conditional SiT takes integer labels, got a float tensor (a memory "
                             "snippet?): build the model with cond='memory' for snippets")
        drop = _cfg_drop(labels.shape[0], labels.device, train, self.dropout_prob, drop)
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class MemoryEmbedder(nn.Module):
    """GMem conditioning: Linear(snippet) into the adaLN condition, in place of the class embedding.

    Classifier-free guidance replaces the whole embedding of a dropped sample by one learned null
    vector (like the class table's extra row). Sampling's unconditional branch passes a drop mask
    and gets that same vector, so it is exactly what training showed the network (GMem instead
    trains with element-wise dropout and samples with an all-zeros snippet it never saw).
    """

    def __init__(self, memory_dim: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.memory_dim = memory_dim
        self.dropout_prob = dropout_prob
        self.proj = nn.Linear(memory_dim, hidden_size)
        self.null_embedding = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, snippets: torch.Tensor, train: bool, drop: torch.Tensor | None = None) -> torch.Tensor:
        if not snippets.is_floating_point() or snippets.shape[1:] != (self.memory_dim,):
            raise ValueError(f"a memory-conditioned SiT takes B x {self.memory_dim} float snippets, got "
                             f"{snippets.dtype} {tuple(snippets.shape)}: pass the bank's rows (gmem.MemoryDataset)")
        emb = self.proj(snippets.to(self.proj.weight.dtype))
        drop = _cfg_drop(snippets.shape[0], snippets.device, train, self.dropout_prob, drop)
        if drop is None and train:  # --cfg-prob 0: keep the null vector in the graph (zero gradient), since
            drop = torch.zeros(snippets.shape[0], dtype=torch.bool, device=snippets.device)  # DDP needs every parameter used
        if drop is not None:
            emb = torch.where(drop[:, None], self.null_embedding.to(emb.dtype), emb)
        return emb


QK_NORM_EPS = 1e-5


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        # eps 1e-5: timm's Attention default, what REPA trained its qk-norm with (adaLN norms use 1e-6).
        self.q_norm = nn.LayerNorm(self.head_dim, eps=QK_NORM_EPS) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=QK_NORM_EPS) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, (grid_size**2, dim), row-major over (h, w)."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos embedding")

    def embed_1d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # grid_w varies along columns
    return np.concatenate([embed_1d(dim // 2, grid_w), embed_1d(dim // 2, grid_h)], axis=1)


class SiT(nn.Module):
    def __init__(self, config: SiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.in_channels = self.out_channels = c.in_channels
        self.patch_size = c.patch_size
        self.x_embedder = PatchEmbed(c.input_size, c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        if c.cond not in CONDS:
            raise ValueError(f"unknown conditioning {c.cond!r}; choose one of {', '.join(CONDS)}")
        if c.cond == "memory":
            if c.memory_dim < 1:
                raise ValueError(f"cond='memory' needs memory_dim >= 1 (the snippet size), got {c.memory_dim}")
            self.y_embedder = MemoryEmbedder(c.memory_dim, c.hidden_size, c.class_dropout_prob)
        else:
            self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        grid = c.input_size // c.patch_size
        pos = torch.from_numpy(sincos_pos_embed_2d(c.hidden_size, grid)).float().unsqueeze(0)
        # Fixed (no gradient); a Parameter as in DiT/REPA, so parameter counts and keys match theirs.
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qk_norm) for _ in range(c.depth))
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if isinstance(self.y_embedder, LabelEmbedder):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        else:  # the null vector starts like a class-table row; proj keeps the xavier init above
            nn.init.normal_(self.y_embedder.null_embedding, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_hidden_at: int | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Velocity at (x, t) for condition y: labels (B, int; label `num_classes` = unconditional)
        or, with cond="memory", snippets (B x memory_dim float).

        drop (B, bool) forces the null condition where True and disables the random training
        dropout: sampling's unconditional branch for either kind of condition.
        return_hidden_at=k also returns the tokens after block k (1-based, shape B x N x D),
        from the same forward pass; None (the default) costs nothing.
        """
        x, c = self._embed(x, t, y, drop)
        hidden = None
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, c)
            if i == return_hidden_at:
                hidden = x
        out = self.unpatchify(self.final_layer(x, c))
        if return_hidden_at is None:
            return out
        if hidden is None:
            raise ValueError(f"return_hidden_at={return_hidden_at} is outside 1..{len(self.blocks)}")
        return out, hidden

    def hidden_at(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, depth: int,
                  drop: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens after block `depth` (1-based, B x N x D), running blocks 1..depth only: an
        early exit for passes that need a block's features, not the velocity (e.g. a teacher)."""
        if not 1 <= depth <= len(self.blocks):
            raise ValueError(f"block {depth} is outside 1..{len(self.blocks)}")
        x, c = self._embed(x, t, y, drop)
        for block in self.blocks[:depth]:
            x = block(x, c)
        return x

    def condition_drop(self, n: int, device: torch.device) -> torch.Tensor | None:
        """The classifier-free-guidance mask a forward of n samples would draw (None: no dropout), drawn
        with the same RNG call as inside forward, so passing it as `drop` changes no random number."""
        return _cfg_drop(n, device, self.training, self.y_embedder.dropout_prob, None)

    def _embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               drop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens (with positions) and the adaLN condition (time + label or snippet)."""
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        return x, self.t_embedder(t) + self.y_embedder(y, self.training, drop)


def build_sit(model: str | None = None, **overrides) -> SiT:
    """Build a named SiT ("SiT-XL/2") or a custom one; overrides set any SiTConfig field."""
    fields = {}
    if model is not None:
        if model not in SiT_models:
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(SiT_models)} or give a custom size")
        fields.update(SiT_models[model])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return SiT(SiTConfig(**fields))


# Keys a checkpoint may carry that the SiT never uses: REPA's projector MLPs, and our
# regulariser (TrainModule.reg, e.g. the Repulsor head) in a TrainModule state dict.
TRAINING_ONLY_PREFIXES = ("projectors.", "reg.")
_QK_NORM_KEY = re.compile(r"^blocks\.\d+\.attn\.[qk]_norm\.")


def _plain_key(key: str) -> str:
    """A key without the DDP ("module.") and TrainModule ("sit.") wrappers' prefixes."""
    return key.removeprefix("module.").removeprefix("sit.")


def state_dict_has_qk_norm(state_dict: dict) -> bool:
    """Whether a (possibly wrapped) SiT state dict holds qk-norm LayerNorm weights."""
    return any(_QK_NORM_KEY.match(_plain_key(k)) for k in state_dict)


def _some(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_sit_state_dict(model: SiT, state_dict: dict, log=print) -> None:
    """Load weights strictly by name and shape. Only known training-only keys
    (TRAINING_ONLY_PREFIXES) are skipped, with one log line; any other key the model does not
    have, e.g. qk-norm weights into a model built without qk-norm, is a ValueError."""
    state_dict = {_plain_key(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    skipped = [k for k in unexpected if k.startswith(TRAINING_ONLY_PREFIXES)]
    unknown = [k for k in unexpected if not k.startswith(TRAINING_ONLY_PREFIXES)]
    if missing and all(_QK_NORM_KEY.match(k) for k in missing):
        raise ValueError(f"checkpoint has no qk-norm weights (e.g. {missing[0]!r}) but the model uses qk-norm: "
                         "build it without --qk-norm")
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} SiT weights, e.g. {missing[0]!r}: "
                         "it was not saved from this model family")
    if unknown:
        hint = ("it was trained with qk-norm: pass --qk-norm" if all(_QK_NORM_KEY.match(k) for k in unknown)
                else "build the model with the checkpoint's config")
        raise ValueError(f"checkpoint has {len(unknown)} weights this SiT does not have ({_some(unknown)}): {hint}")
    for k, v in own.items():
        if state_dict[k].shape != v.shape:
            raise ValueError(f"checkpoint weight {k!r} has shape {tuple(state_dict[k].shape)} but the model "
                             f"expects {tuple(v.shape)}: build the model with the checkpoint's config")
    if skipped:
        prefixes = sorted({k.split(".")[0] for k in skipped})
        log(f"skipped {len(skipped)} training-only checkpoint keys (prefixes: {', '.join(prefixes)})")
    model.load_state_dict({k: state_dict[k] for k in own}, strict=True)
