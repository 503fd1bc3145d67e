"""numpy harness ops (runtime_eval.dense.ops) against torch / torchvision (tests only)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as tvo

from runtime_eval.dense import ops

rng = np.random.default_rng(0)


def _boxes(n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(thr):
    b = _boxes(300)
    s = rng.random(300).astype(np.float32)
    ref = tvo.nms(torch.from_numpy(b), torch.from_numpy(s), thr).numpy()
    np.testing.assert_array_equal(ops.nms(b, s, thr), ref)
    idx = rng.integers(0, 5, 300)
    ref = tvo.batched_nms(torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(idx), thr).numpy()
    np.testing.assert_array_equal(ops.batched_nms(b, s, idx, thr), ref)


@pytest.mark.parametrize("sampling", [0, 2])
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 16])
def test_roi_align_matches_torchvision(sampling, scale):
    feat = rng.standard_normal((3, 23, 31)).astype(np.float32)
    H, W = 23 / scale, 31 / scale
    rois = np.concatenate([_boxes(40, min(H, W)),
                           np.array([[-5, -5, 3, 2], [W - 2, H - 2, W + 8, H + 9], [4, 4, 4, 4]], np.float32)])
    ref = tvo.roi_align(torch.from_numpy(feat)[None], [torch.from_numpy(rois)], 7, scale, sampling, aligned=True)
    np.testing.assert_allclose(ops.roi_align(feat, rois, 7, scale, sampling, True), ref.numpy(), atol=1e-5, rtol=1e-5)


def test_anchors_and_delta_decode():
    base = ops.base_anchors(4, [8], [0.5, 1.0, 2.0])
    np.testing.assert_allclose(base[1], [-16, -16, 16, 16])
    np.testing.assert_allclose(base[0, 2] - base[0, 0], 32 / np.sqrt(0.5), rtol=1e-6)  # ratio h/w = 0.5
    a = ops.grid_anchors(base, (2, 3), 4)
    assert a.shape == (18, 4)
    np.testing.assert_allclose(a[3 * 1 + 1], base[1] + [4, 0, 4, 0])  # position (0, 1), anchor 1
    rois = _boxes(10).astype(np.float64)
    np.testing.assert_allclose(ops.delta2bbox(rois, np.zeros((10, 4))), rois)
    d = np.tile([[0.1, -0.2, 0.3, 5.0]], (10, 1))
    out = ops.delta2bbox(rois, d, stds=(0.1, 0.1, 0.2, 0.2), max_shape=(60, 70))
    w = rois[:, 2] - rois[:, 0]
    cx = (rois[:, 0] + rois[:, 2]) / 2 + w * 0.01
    gw = w * np.exp(0.06)
    np.testing.assert_allclose(out[:, 0], np.clip(cx - gw / 2, 0, 70))
    assert out[:, 3].max() <= 60 and out[:, 1].min() >= 0


def test_map_roi_levels():
    r = np.array([[0, 0, 30, 30], [0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 500, 500], [0, 0, 2000, 2000]], float)
    np.testing.assert_array_equal(ops.map_roi_levels(r, 4, 56), [0, 1, 2, 3, 3])


def _mmdet_paste(masks, boxes, h, w):
    """mmdet 2.x _do_paste_mask with skip_empty=False (GPU path), in torch."""
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    img_y = torch.arange(0, h, dtype=torch.float64) + 0.5
    img_x = torch.arange(0, w, dtype=torch.float64) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    N = masks.shape[0]
    gx = img_x[:, None, :].expand(N, h, w)
    gy = img_y[:, :, None].expand(N, h, w)
    grid = torch.stack([gx, gy], dim=3)
    return F.grid_sample(masks[:, None], grid, align_corners=False)[:, 0]


def test_paste_masks_matches_grid_sample():
    m = rng.random((5, 28, 28))
    boxes = np.array([[3.2, 4.7, 40.1, 30.3], [0, 0, 63, 47], [50, 40, 70, 60], [10.5, 2, 12, 5], [-4, -3, 20, 15]])
    ref = _mmdet_paste(torch.from_numpy(m), torch.from_numpy(boxes), 48, 64).numpy() >= 0.5
    np.testing.assert_array_equal(ops.paste_masks(m, boxes, 48, 64), ref)


@pytest.mark.parametrize("size", [(17, 29), (80, 120)])
def test_resize_matches_torch_bilinear(size):
    img = rng.integers(0, 256, (40, 60, 3)).astype(np.uint8)
    ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].double(), size=size, mode="bilinear",
                        align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
    out = ops.resize_image(img, size[1], size[0])
    assert np.abs(out - np.clip(np.rint(ref), 0, 255)).max() <= 1
    assert ops.rescale_size(640, 427, (1333, 800)) == (1199, 800)
    assert ops.rescale_size(500, 2000, (1333, 800)) == (333, 1333)
