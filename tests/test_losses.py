"""Exact maths of the synthesis losses (method.md §2, Eq. 1-14; PSAQ-ViT §4) on hand-made cases."""
from __future__ import annotations

import math

import pytest
import torch

from maskaq import losses as L

C1, C2 = 0.01**2, 0.03**2
LOG_2PIE = math.log(2 * math.pi * math.e)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ce_uniform_logits_is_log_classes():
    assert L.ce_loss(torch.zeros(3, 7), torch.tensor([0, 3, 6])).item() == pytest.approx(math.log(7))


# --- TV (Eq. 2) ------------------------------------------------------------------------------

def _img3x3() -> torch.Tensor:
    return torch.arange(9.0).view(1, 1, 3, 3)  # [[0,1,2],[3,4,5],[6,7,8]]


def test_tv_known_3x3_image():
    # horizontal: six -1 -> sqrt 6; vertical: six -3 -> sqrt 54;
    # anti-diagonal x[1:, :-1] - x[:-1, 1:]: four +2 -> 4; diagonal: four -4 -> 8; diagonals / sqrt 2
    expected = math.sqrt(6) + math.sqrt(54) + (4 + 8) / math.sqrt(2)
    assert L.tv_loss(_img3x3()).item() == pytest.approx(expected, rel=1e-6)


def test_tv_norm_axis_is_the_whole_batch_by_default():
    x = torch.cat([_img3x3(), _img3x3()])
    one = L.tv_loss(_img3x3()).item()
    assert L.tv_loss(x).item() == pytest.approx(math.sqrt(2) * one, rel=1e-6)  # one norm over both
    per = L.tv_loss(torch.cat([_img3x3(), 2 * _img3x3()]), per_image=True)
    assert per.tolist() == pytest.approx([one, 2 * one], rel=1e-6)


def test_tv_constant_image_is_zero():
    assert L.tv_loss(torch.full((2, 3, 5, 5), 0.7)).item() == 0.0


# --- IHA (Eq. 3) -----------------------------------------------------------------------------

def test_iha_identical_heads_is_zero():
    S = torch.randn(2, 1, 6, 6).expand(2, 4, 6, 6)
    assert L.iha_loss([S], prefix=1).item() == 0.0
    assert torch.allclose(L.iha_ssim(S, 1), torch.ones(2, 5, 4, 4))


def test_iha_hand_value_two_heads():
    # every query row: head 0 = [0,1,2,3] -> [0,1/3,2/3,1]; head 1 reversed.
    # mu = 1/2 each, var = 5/36 each, cov = 1/9 - 1/4 = -5/36
    S = torch.zeros(1, 2, 4, 4)
    S[0, 0] = torch.arange(4.0)
    S[0, 1] = torch.arange(4.0).flip(0)
    s01 = ((0.5 + C1) * (-10 / 36 + C2)) / ((0.5 + C1) * (10 / 36 + C2))
    ssim = L.iha_ssim(S, prefix=0)
    assert ssim[0, 0].flatten().tolist() == pytest.approx([1.0, s01, s01, 1.0], abs=1e-6)
    # pairs (0,0),(1,1) give 0, (0,1),(1,0) give 1 - s01^2 -> mean over the 4 pairs
    assert L.iha_loss([S], prefix=0).item() == pytest.approx((1 - s01**2) / 2, abs=1e-6)


def test_iha_drops_prefix_rows_and_columns():
    S = torch.randn(2, 3, 7, 7)
    S2 = S.clone()
    S2[:, :, :2, :] = 1e6  # prefix rows/cols (CLS + distillation token) must not matter
    S2[:, :, :, :2] = -1e6
    assert L.iha_loss([S2], prefix=2).item() == pytest.approx(L.iha_loss([S], prefix=2).item(), abs=1e-7)


@pytest.mark.parametrize("heads", [3, 6])  # both code paths of the fused function
def test_iha_fused_equals_direct_formula_value_and_gradient(heads):
    torch.manual_seed(0)
    S = [(torch.randn(2, heads, 9, 9) * 3 + 1).double().requires_grad_(True) for _ in range(2)]
    fused = L.iha_loss(S, prefix=1)
    direct = torch.stack([(1 - L.iha_ssim(s, 1).square()).mean() for s in S]).mean()
    assert fused.item() == pytest.approx(direct.item(), abs=1e-12)
    for a, b in zip(torch.autograd.grad(fused, S), torch.autograd.grad(direct, S)):
        assert torch.allclose(a, b, atol=1e-12)
    small = (torch.randn(1, heads, 5, 5) * 3).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: L.iha_loss([s], prefix=1), (small,))


def test_grouped_layers_give_the_same_values(monkeypatch):
    # on accelerators same-shaped layers are concatenated into one call; the values must not change
    torch.manual_seed(0)
    S = [torch.randn(2, 3, 7, 7) for _ in range(3)] + [torch.randn(4, 6, 5, 5)]
    g = torch.Generator().manual_seed(0)
    iha, de = L.iha_loss(S, 1).item(), L.de_loss(S, 1, g, num_rows=64).item()
    monkeypatch.setattr(L, "_CONCAT_LAYERS_ON_CPU", True)
    assert L.iha_loss(S, 1).item() == pytest.approx(iha, rel=1e-6)
    assert L.de_loss(S, 1, g, num_rows=64).item() == pytest.approx(de, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_on_cuda_match_cpu():
    torch.manual_seed(0)
    S = [torch.randn(4, 3, 17, 17, dtype=torch.float64) for _ in range(3)]
    Sc = [s.cuda().requires_grad_(True) for s in S]
    S = [s.requires_grad_(True) for s in S]
    a, b = L.iha_loss(S, 1), L.iha_loss(Sc, 1)
    assert b.item() == pytest.approx(a.item(), rel=1e-9)
    for x, y in zip(torch.autograd.grad(a, S), torch.autograd.grad(b, Sc)):
        assert torch.allclose(x, y.cpu(), atol=1e-12)
    g = torch.Generator(device="cuda").manual_seed(0)
    de = L.de_loss([s.detach() for s in Sc], 1, g, num_rows=64).item()
    assert de == pytest.approx(L.de_loss([s.detach() for s in S], 1, torch.Generator(), num_rows=64).item(), rel=1e-9)
    imp = torch.rand(3, 16, device="cuda")
    assert L.adaptive_mask(imp, 0, 10, g).sum(1).tolist() == [6, 6, 6]


def test_iha_per_layer_mean_for_windows():
    a, b = torch.randn(8, 3, 4, 4), torch.randn(2, 6, 4, 4)  # Swin: layers of different shapes
    la, lb = L.iha_loss([a], 0).item(), L.iha_loss([b], 0).item()
    assert L.iha_loss([a, b], 0).item() == pytest.approx((la + lb) / 2, rel=1e-6)


# --- DE (Eq. 5-10) ---------------------------------------------------------------------------

def test_de_known_rows():
    S = torch.eye(2).view(1, 1, 2, 2)  # rows [1,0],[0,1]: C = I, entries 1,0,0,1, var 1/4
    g = torch.Generator().manual_seed(0)
    assert L.de_loss([S], 0, g).item() == pytest.approx(-0.5 * (LOG_2PIE + math.log(0.25 + 1e-8)), rel=1e-6)
    # paper variant: off-diagonal entries only (0, 0): variance 0 -> log(eps)
    assert L.de_loss([S], 0, g, offdiag_only=True).item() == pytest.approx(-0.5 * (LOG_2PIE + math.log(1e-8)), rel=1e-5)


def test_de_head_mean_prefix_and_row_sampling():
    # head 0 = 2*I, head 1 = 0 on the patch block -> head mean = I (scale drops out by normalising);
    # 4 distinct rows of I drawn out of 10 -> C = I_4 -> var = 1/4 - 1/16 = 3/16 whatever rows are drawn
    B, P, k = 3, 10, 4
    S = torch.zeros(B, 2, P + 1, P + 1)
    S[:, 0, 1:, 1:] = 2 * torch.eye(P)
    S[:, :, 0, :] = 5.0  # CLS row/column are dropped
    S[:, :, :, 0] = -5.0
    g = torch.Generator().manual_seed(1)
    assert L.de_loss([S], 1, g, num_rows=k).item() == pytest.approx(-0.5 * (LOG_2PIE + math.log(3 / 16 + 1e-8)), rel=1e-6)


def test_de_uses_the_generator():
    S = torch.randn(2, 3, 101, 101)
    v1 = L.de_loss([S], 1, torch.Generator().manual_seed(5)).item()
    v2 = L.de_loss([S], 1, torch.Generator().manual_seed(5)).item()
    v3 = L.de_loss([S], 1, torch.Generator().manual_seed(6)).item()
    assert v1 == v2 and v1 != v3


# --- adaptive mask (Eq. 11-13) ---------------------------------------------------------------

def test_mask_keep_ratio_anneals_linearly():
    assert L.mask_keep_ratio(0, 100) == pytest.approx(0.5)
    assert L.mask_keep_ratio(50, 100) == pytest.approx(0.3)
    assert L.mask_keep_ratio(100, 100) == pytest.approx(0.1)
    assert L.mask_keep_ratio(99, 100) == pytest.approx(0.1 + 0.4 / 100)  # last step of a run (code)


def test_adaptive_mask_topk_and_keep_counts():
    B, P, T = 4, 16, 10
    imp = torch.rand(B, P, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    m0 = L.adaptive_mask(imp, 0, T, g)  # r=0.5: k = 8, keep round(5.6) = 6 among the top 8
    assert m0.dtype == torch.bool and m0.shape == (B, P)
    assert m0.sum(1).tolist() == [6] * B
    top8 = torch.zeros(B, P, dtype=torch.bool).scatter_(1, imp.topk(8, dim=1).indices, True)
    assert not (m0 & ~top8).any()
    mT = L.adaptive_mask(imp, T, T, g)  # r=0.1: k = max(1, int(1.6)) = 1, keep max(1, round(0.7)) = 1
    assert torch.equal(mT, torch.zeros(B, P, dtype=torch.bool).scatter_(1, imp.argmax(1, keepdim=True), True))
    # no dropping: exactly the top-k
    assert torch.equal(L.adaptive_mask(imp, 0, T, g, drop_prob=0.0), top8)
    # Python rounding (half to even), as the reference: P=10, r=0.5 -> k=5 -> round(3.5) = 4
    assert L.adaptive_mask(torch.rand(2, 10), 0, T, g).sum(1).tolist() == [4, 4]


def test_adaptive_mask_random_subset_follows_generator():
    imp = torch.rand(64, 196)
    a = L.adaptive_mask(imp, 0, 10, torch.Generator().manual_seed(3))
    b = L.adaptive_mask(imp, 0, 10, torch.Generator().manual_seed(3))
    c = L.adaptive_mask(imp, 0, 10, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cls_scores_read_row_zero_without_prefix_columns():
    S = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(2, 2, 4, 4)
    assert torch.equal(L.cls_scores(S, 2), S[:, :, 0, 2:].mean(1))
    with pytest.raises(ValueError):
        L.cls_scores(S, 0)


@pytest.mark.parametrize("shift", [(0, 0), (1, 1), (2, 1)])
def test_windows_to_grid_inverts_timm_partition(shift):
    from timm.models.swin_transformer import window_partition

    B, H, W, ws = 2, 6, 4, (2, 2)
    grid = torch.randn(B, H, W)
    shifted = torch.roll(grid, shifts=(-shift[0], -shift[1]), dims=(1, 2))  # what the block does
    wins = window_partition(shifted.unsqueeze(-1), ws).reshape(-1, ws[0] * ws[1])
    assert torch.equal(L.windows_to_grid(wins, B, (H, W), ws, shift), grid)
    S = torch.randn(B * 6, 3, 4, 4)
    assert torch.allclose(L.received_scores(S), S.mean(1).mean(1))


# --- MAA (Eq. 14) ----------------------------------------------------------------------------

def test_maa_zero_when_p_equals_q():
    a = [torch.randn(3, 16) for _ in range(2)]
    m = torch.rand(3, 16) > 0.5
    assert L.maa_loss(a, [t.clone() for t in a], m).item() == 0.0


def test_maa_hand_value():
    a_p = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 1.0]])]
    a_q = [torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 4.0]])]
    m = torch.tensor([[True, False, True]])
    # layer 1: (1 + 3) / 2 = 2; layer 2: (0 + 3) / 2 = 1.5; mean 1.75
    assert L.maa_loss(a_p, a_q, m).item() == pytest.approx(1.75)
    assert L.maa_loss(a_p, a_q, None).item() == pytest.approx((2 + 1) / 2)
    # the batch is pooled in one masked mean (reference code): (1 + 2 + 6) / 3
    p = [torch.tensor([[1.0, 0.0], [2.0, 6.0]])]
    q = [torch.zeros(2, 2)]
    assert L.maa_loss(p, q, torch.tensor([[True, False], [True, True]])).item() == pytest.approx(3.0)


def test_maa_gradient_reaches_p_and_q():
    p = torch.tensor([[1.0, 2.0]], requires_grad=True)
    q = torch.tensor([[0.0, 3.0]], requires_grad=True)
    L.maa_loss([p], [q], torch.tensor([[True, True]])).backward()
    assert p.grad.tolist() == [[0.5, -0.5]] and q.grad.tolist() == [[-0.5, 0.5]]


# --- PSAQ-ViT (§4) ---------------------------------------------------------------------------

def test_psaq_entropy_two_orthogonal_patches():
    # one image, one head, CLS + 2 patches with orthogonal features -> similarities {1, 0, 0, 1};
    # KDE at linspace(0, 1, 10): p = c/2 at both ends (c = 1/sqrt(2 pi bw^2)), ~0 inside; + 1e-4
    O = torch.zeros(1, 1, 3, 2)
    O[0, 0, 0] = torch.tensor([5.0, 5.0])  # CLS, dropped
    O[0, 0, 1] = torch.tensor([1.0, 0.0])
    O[0, 0, 2] = torch.tensor([0.0, 3.0])
    bw = 0.01
    c = 1 / math.sqrt(2 * math.pi * bw**2)
    xs = [i / 9 for i in range(10)]
    p = [c * 0.5 * (math.exp(-x**2 / (2 * bw**2)) + math.exp(-(x - 1) ** 2 / (2 * bw**2))) + 1e-4 for x in xs]
    f = [-v * math.log(v) for v in p]
    ent = sum((f[i] + f[i + 1]) / 2 * (xs[i + 1] - xs[i]) for i in range(9))
    assert L.psaq_entropy_loss([O], prefix=1, bandwidth=bw).item() == pytest.approx(-ent, rel=1e-5)


def test_psaq_entropy_matches_reference_formulation():
    # PSAQ-ViT's own formulation (cosine_similarity, GaussianKernel KDE, trapz), summed over layers
    torch.manual_seed(0)
    outs = [torch.randn(3, 2, 6, 4) for _ in range(2)]

    def ref(att):
        a = att.mean(dim=1)[:, 1:, :]
        sims = torch.cosine_similarity(a.unsqueeze(1), a.unsqueeze(2), dim=3).view(a.shape[0], -1)
        xp = torch.linspace(sims.min().item(), sims.max().item(), steps=10).repeat(a.shape[0], 1)
        diffs = xp.unsqueeze(-1) - sims.unsqueeze(1)
        pdf = (torch.exp(-diffs**2 / (2 * 0.01**2)) / math.sqrt(2 * math.pi * 0.01**2)).mean(-1) + 1e-4
        return torch.trapz(-pdf * torch.log(pdf), xp, dim=-1).mean()

    expected = -(ref(outs[0]) + ref(outs[1]))
    assert L.psaq_entropy_loss(outs, prefix=1).item() == pytest.approx(expected.item(), rel=1e-4)
