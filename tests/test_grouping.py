"GroupViT pieces (ovseg.grouping): straight-through assignment, competition, eval determinism, stage-wise init."
import pytest
import torch

from ovseg.grouping import (AssignAttention, Block, GroupingBlock, GroupViT, ProjectMLP, gumbel_assign, hard_assign,
                            straight_through, vit_blocks)

torch.set_num_threads(1)


def test_gumbel_straight_through_is_one_hot_with_gradients():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    a = gumbel_assign(logits, dim=1, tau=1.0)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a.sum(1), torch.ones(3, 7))                  # one group per patch
    w = torch.randn_like(a)
    (a * w).sum().backward()
    assert logits.grad.abs().sum() > 0                               # the soft path carries gradients


def test_straight_through_gradient_equals_soft_gradient():
    soft = torch.randn(2, 4, 6).softmax(1).requires_grad_(True)
    w = torch.randn(2, 4, 6)
    (straight_through(soft, 1) * w).sum().backward()
    assert torch.allclose(soft.grad, w)


def test_gumbel_samples_vary_and_eval_is_deterministic():
    torch.manual_seed(0)
    logits = torch.zeros(1, 4, 200)
    a, b = gumbel_assign(logits, 1), gumbel_assign(logits, 1)
    assert not torch.equal(a, b)                                     # noise in training
    assert torch.equal(hard_assign(logits + torch.arange(4.)[:, None], 1).argmax(1), torch.full((1, 200), 3))
    gv = GroupViT(32, 8, 24, 2, (1, 1), group_tokens=6, groups=3).eval()
    x = torch.randn(2, 3, 32, 32)
    o1, o2 = gv(x), gv(x)
    assert torch.equal(o1["tokens"], o2["tokens"]) and torch.equal(o1["assign"]["hard"], o2["assign"]["hard"])
    gv.train()
    assert not torch.equal(gv(x)["assign"]["hard"], gv(x)["assign"]["hard"])


def test_assign_attention_competition_and_normalisation():
    torch.manual_seed(0)
    att = AssignAttention(12, assign_eps=1.0).eval()
    g, x = torch.randn(2, 3, 12), torch.randn(2, 10, 12)
    out, info = att(g, x)
    assert torch.allclose(info["soft"].sum(1), torch.ones(2, 10))    # softmax over the group axis
    assert torch.equal(info["hard"].sum(1), torch.ones(2, 10))
    assert torch.equal(info["hard"].argmax(1), info["soft"].argmax(1))
    logits = att.q_proj(g) @ att.k_proj(x).transpose(1, 2) / 12 ** 0.5
    assert torch.allclose(info["logits"], logits, atol=1e-6)
    hard = torch.nn.functional.one_hot(logits.argmax(1), 3).transpose(1, 2).float()
    expect = att.proj(hard / (hard.sum(-1, keepdim=True) + 1.0) @ att.v_proj(x))
    assert torch.allclose(out, expect, atol=1e-5)


def test_grouping_block_shapes():
    gb = GroupingBlock(16, 2, in_groups=8, out_groups=3)
    out, info = gb(torch.randn(2, 9, 16), torch.randn(2, 8, 16))
    assert out.shape == (2, 3, 16) and info["q"].shape == (2, 3, 16) and info["k"].shape == (2, 9, 16)
    assert gb.mlp_inter.fc1.in_features == 8 and gb.mlp_inter.fc1.out_features == 8   # token MLP 8 -> 0.5*16 -> 3


def test_block_matches_open_clip_block_after_init():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    vit = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=24, layers=4, heads=2,
                                                  mlp_ratio=4.0, output_dim=16).eval()
    gv = GroupViT(32, 8, 24, 2, (3, 1), group_tokens=6, groups=3).eval()
    copied = gv.init_from_vit(vit.state_dict())
    # blocks 0-2 -> stage 1, block 3 -> stage 2, each computing the same function as the source block
    x = torch.randn(2, 5, 24)
    for mine, j in [(gv.stage1[0], 0), (gv.stage1[2], 2), (gv.stage2[0], 3)]:
        ref = vit.transformer.resblocks[j]
        y = ref(x if getattr(vit.transformer, "batch_first", True) else x.transpose(0, 1))
        y = y if getattr(vit.transformer, "batch_first", True) else y.transpose(0, 1)
        assert torch.allclose(mine(x), y, atol=1e-5)
    assert torch.equal(gv.stage2[0].mlp.c_proj.weight, vit.transformer.resblocks[3].mlp.c_proj.weight)
    assert not torch.equal(gv.stage1[0].attn.in_proj_weight, vit.transformer.resblocks[1].attn.in_proj_weight)
    assert torch.equal(gv.patch_embed.weight, vit.conv1.weight) and torch.equal(gv.norm.weight, vit.ln_post.weight)
    assert torch.equal(gv.pos_embed, vit.positional_embedding[1:]) and not gv.patch_embed.bias.any()
    assert not any(k.startswith("grouping.") for k in copied) and len([k for k in copied if k.startswith("stage")]) == 4 * 12
    # prefixed (a whole CLIP's state dict) works too
    sd = {"visual." + k: v for k, v in vit.state_dict().items()}
    assert GroupViT(32, 8, 24, 2, (2, 2), group_tokens=6, groups=3).init_from_vit(sd) == \
        GroupViT(32, 8, 24, 2, (2, 2), group_tokens=6, groups=3).init_from_vit(vit.state_dict())


def test_timm_vit_init_matches_timm_blocks():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=0).eval()
    gv = GroupViT(32, 8, 24, 2, (1, 1), group_tokens=6, groups=3).eval()
    gv.init_from_vit(vit.state_dict())
    x = torch.randn(2, 5, 24)
    assert torch.allclose(gv.stage1[0](x), vit.blocks[0](x), atol=1e-5)
    assert torch.allclose(gv.stage2[0](x), vit.blocks[1](x), atol=1e-5)
    assert torch.equal(gv.patch_embed.bias, vit.patch_embed.proj.bias)
    assert torch.equal(gv.pos_embed, vit.pos_embed[0, 1:])


def test_init_errors():
    open_clip = pytest.importorskip("open_clip")
    vit = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=24, layers=4, heads=2,
                                                  mlp_ratio=4.0, output_dim=16)
    with pytest.raises(ValueError, match="4 blocks but depths 2\\+1"):
        GroupViT(32, 8, 24, 2, (2, 1), group_tokens=6, groups=3).init_from_vit(vit.state_dict())
    with pytest.raises(ValueError, match="shape"):
        GroupViT(32, 8, 32, 2, (2, 2), group_tokens=6, groups=3).init_from_vit(vit.state_dict())
    with pytest.raises(ValueError, match="not a plain ViT"):
        vit_blocks({"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="multiple"):
        GroupViT(30, 8)


def test_pos_embed_interpolation_and_project_mlp():
    gv = GroupViT(32, 8, 24, 2, (1, 1), group_tokens=6, groups=3).eval()
    out = gv(torch.randn(1, 3, 64, 48))
    assert out["grid"] == (8, 6) and out["assign"]["soft"].shape == (1, 3, 48)
    pm = ProjectMLP(24, 32, 8)
    assert pm(torch.randn(4, 24)).shape == (4, 8) and pm(torch.randn(2, 3, 24)).shape == (2, 3, 8)
    assert isinstance(pm.net[1], torch.nn.BatchNorm1d) and len([m for m in pm.net if isinstance(m, torch.nn.Linear)]) == 2
