import pytest
import torch

from checkpoint import CheckpointError, model_from_checkpoint
from models.sit import SiT_models, build_sit, load_sit_state_dict

# Parameter counts from the SiT/DiT papers (REFERENCE.md), for 4x32x32 latents, out = in channels.
PUBLISHED = {"SiT-S/2": 33.0e6, "SiT-B/2": 130.5e6, "SiT-L/2": 458.1e6, "SiT-XL/2": 675.1e6}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_match_published(name):
    with torch.device("meta"):
        model = build_sit(name, input_size=32, in_channels=4, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.005, n


@pytest.mark.parametrize("patch", [2, 4, 8])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_output_shape_each_patch_and_channel_count(patch, channels):
    model = build_sit(depth=1, hidden_size=32, num_heads=2, patch_size=patch, input_size=32,
                      in_channels=channels, num_classes=10)
    x = torch.randn(2, channels, 32, 32)
    assert model(x, torch.rand(2), torch.tensor([0, 10])).shape == x.shape


def test_named_models_have_all_sizes_and_patches():
    assert {f"SiT-{s}/{p}" for s in "S B L XL".split() for p in (2, 4, 8)} == set(SiT_models)


def test_adaln_zero_initial_output_is_zero():
    model = build_sit(depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=4, num_classes=5)
    out = model(torch.randn(3, 4, 16, 16), torch.rand(3), torch.tensor([0, 1, 5]))
    assert torch.equal(out, torch.zeros_like(out))


def test_hidden_tap_returns_the_right_block():
    torch.manual_seed(0)
    model = build_sit(depth=3, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1,
                      num_classes=5, qk_norm=True).eval()
    for p in model.parameters():  # leave adaLN-Zero so blocks are not the identity
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([1, 2])
    captured = []
    hooks = [b.register_forward_hook(lambda m, i, o: captured.append(o)) for b in model.blocks]
    plain = model(x, t, y)
    for h in hooks:
        h.remove()
    for k in (1, 2, 3):
        out, hidden = model(x, t, y, return_hidden_at=k)
        assert torch.equal(out, plain)
        assert torch.equal(hidden, captured[k - 1])
    with pytest.raises(ValueError, match="outside 1..3"):
        model(x, t, y, return_hidden_at=4)


def test_state_dict_keys_follow_repa_layout():
    model = build_sit(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=3)
    keys = set(model.state_dict())
    for k in ["pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
              "y_embedder.embedding_table.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight",
              "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight", "blocks.1.adaLN_modulation.1.weight",
              "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"]:
        assert k in keys, k
    assert model.y_embedder.embedding_table.weight.shape[0] == 4  # + the CFG null class


def test_repa_style_checkpoint_loads_skipping_projectors():
    src = build_sit(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=3)
    state = {k: v + 1 for k, v in src.state_dict().items()}
    state["projectors.0.0.weight"] = torch.zeros(2048, 64)
    logs = []
    dst = build_sit(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=3)
    load_sit_state_dict(dst, state, log=logs.append)
    assert len(logs) == 1 and "projectors" in logs[0]
    assert torch.equal(dst.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    # A bare state dict (REPA's released file) needs the model name, then loads.
    with pytest.raises(CheckpointError, match="pass --model"):
        model_from_checkpoint(state, log=logs.append)


def test_shape_mismatch_names_the_key():
    src = build_sit(depth=1, hidden_size=64, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=3)
    dst = build_sit(depth=1, hidden_size=64, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=7)
    with pytest.raises(ValueError, match=r"'y_embedder.embedding_table.weight' has shape \(4, 64\)"):
        load_sit_state_dict(dst, src.state_dict())


TINY = dict(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=3)


def trained_like(qk_norm: bool) -> torch.nn.Module:
    """A tiny SiT off its adaLN-Zero init, so every weight (also q_norm/k_norm) changes the output."""
    torch.manual_seed(0)
    model = build_sit(**TINY, qk_norm=qk_norm).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_qk_norm_eps_is_timms_and_adaln_norms_keep_1e6():
    block = build_sit(**TINY, qk_norm=True).blocks[0]
    assert block.attn.q_norm.eps == block.attn.k_norm.eps == 1e-5  # timm's default, REPA's qk-norm
    assert block.norm1.eps == block.norm2.eps == 1e-6
    assert build_sit(**TINY).final_layer.norm_final.eps == 1e-6


def test_bare_state_dict_with_qk_norm_is_inferred_and_loads_exactly():
    """A bare REPA-style state dict (qk-norm + projectors, no config) with a config that does not
    say qk-norm: the weights decide, and the loaded model computes what the source did."""
    src = trained_like(qk_norm=True)
    state = {**src.state_dict(), "projectors.0.0.weight": torch.zeros(8, 64)}
    logs = []
    model = model_from_checkpoint(state, config_overrides={"model": "SiT-S/2", **TINY}, log=logs.append).eval()
    assert model.config.qk_norm and len(logs) == 1 and "projectors" in logs[0]
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 2])
    assert torch.equal(model(x, t, y), src(x, t, y))
    plain = trained_like(qk_norm=False)
    model = model_from_checkpoint(plain.state_dict(), config_overrides={"model": "SiT-S/2", **TINY}, log=logs.append)
    assert not model.config.qk_norm
    with pytest.raises(CheckpointError, match="qk_norm=False was given but the checkpoint weights have q_norm"):
        model_from_checkpoint(state, config_overrides={"model": "SiT-S/2", **TINY, "qk_norm": False})


def test_qk_norm_mismatch_and_unknown_keys_are_errors():
    qk_state = trained_like(qk_norm=True).state_dict()
    with pytest.raises(ValueError, match=r"8 weights this SiT does not have \('blocks.0.attn.k_norm.bias', .* "
                                         r"and 5 more\): it was trained with qk-norm: pass --qk-norm"):
        load_sit_state_dict(build_sit(**TINY), qk_state)
    with pytest.raises(ValueError, match="no qk-norm weights .* build it without --qk-norm"):
        load_sit_state_dict(build_sit(**TINY, qk_norm=True), build_sit(**TINY).state_dict())
    state = {**build_sit(**TINY).state_dict(), "blocks.0.attn.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"1 weights this SiT does not have \('blocks.0.attn.extra.weight'\): "
                                         "build the model with the checkpoint's config"):
        load_sit_state_dict(build_sit(**TINY), state)


def test_train_module_state_dict_loads_skipping_the_regulariser():
    """The TrainModule layout (DDP-wrapped too): sit.* are the weights, reg.* is training-only."""
    src = trained_like(qk_norm=False)
    state = {f"module.sit.{k}": v for k, v in src.state_dict().items()}
    state["module.reg.head.0.weight"] = torch.zeros(16, 64)
    logs = []
    dst = build_sit(**TINY)
    load_sit_state_dict(dst, state, log=logs.append)
    assert len(logs) == 1 and "reg" in logs[0]
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
