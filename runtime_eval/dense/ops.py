"""FP32 numpy implementations of the non-learned dense-model steps (mmdet 2.x / mmcv semantics):
anchors, delta box coding, NMS, RoIAlign (aligned=True), RoI level mapping, mask pasting and the
image resizes of the mmdet/mmseg test pipelines. numpy only (no torch)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "bilinear_matrix", "rescale_size", "resize_image", "base_anchors", "grid_anchors",
    "delta2bbox", "nms", "batched_nms", "roi_align", "map_roi_levels", "paste_masks",
]


def bilinear_matrix(n_out: int, n_in: int, scale: float | None = None) -> np.ndarray:
    """[n_out, n_in] interpolation matrix, half-pixel centres, edge clamp (torch
    ``interpolate(align_corners=False)`` / cv2 ``INTER_LINEAR``)."""
    s = n_in / n_out if scale is None else scale
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * s - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = src - i0
    w = np.zeros((n_out, n_in), np.float64)
    r = np.arange(n_out)
    np.add.at(w, (r, i0), 1.0 - l1)
    np.add.at(w, (r, i1), l1)
    return w.astype(np.float32)


def rescale_size(w: int, h: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` with a (long, short) bound: keep ratio, fit in ``scale``."""
    long_edge, short_edge = max(scale), min(scale)
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * f + 0.5), int(h * f + 0.5)


def resize_image(img: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    """Bilinear resize of an HWC uint8/float image (cv2 INTER_LINEAR semantics, no antialias),
    rounded back to the uint8 grid as mmcv's ``imresize`` of a uint8 image returns."""
    h, w = img.shape[:2]
    if (h, w) == (new_h, new_w):
        return img.astype(np.float32)
    wy, wx = bilinear_matrix(new_h, h), bilinear_matrix(new_w, w)
    out = np.einsum("Hh,hwc->Hwc", wy, img.astype(np.float32), optimize=True)
    out = np.einsum("Ww,Hwc->HWc", wx, out, optimize=True)
    return np.clip(np.rint(out), 0, 255).astype(np.float32)


# --- anchors and box coding ------------------------------------------------------------------

def base_anchors(stride: int, scales: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """mmdet 2.x ``AnchorGenerator`` base anchors (centre offset 0, scale-major): [A, 4]."""
    hr = np.sqrt(np.asarray(ratios, np.float64))
    wr = 1.0 / hr
    sc = np.asarray(scales, np.float64)
    ws = (stride * wr[:, None] * sc[None, :]).reshape(-1)
    hs = (stride * hr[:, None] * sc[None, :]).reshape(-1)
    return np.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], axis=1)


def grid_anchors(base: np.ndarray, feat_hw: tuple[int, int], stride: int) -> np.ndarray:
    """All anchors of one level, position-major then anchor: [h*w*A, 4] (matches
    ``permute(1, 2, 0).reshape(-1)`` of an [A, h, w] head output)."""
    h, w = feat_hw
    sx, sy = np.meshgrid(np.arange(w) * stride, np.arange(h) * stride)
    shifts = np.stack([sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel()], axis=1).astype(np.float64)
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)


def delta2bbox(rois: np.ndarray, deltas: np.ndarray, stds: Sequence[float] = (1, 1, 1, 1),
               means: Sequence[float] = (0, 0, 0, 0), max_shape: tuple[int, int] | None = None,
               wh_ratio_clip: float = 16 / 1000) -> np.ndarray:
    """mmdet 2.x ``DeltaXYWHBBoxCoder.decode``: rois [N, 4], deltas [N, 4k] -> boxes [N, 4k],
    clipped to ``max_shape`` (h, w) when given."""
    rois = rois.astype(np.float64)
    d = deltas.astype(np.float64).reshape(deltas.shape[0], -1, 4) * np.asarray(stds) + np.asarray(means)
    max_ratio = abs(math.log(wh_ratio_clip))
    dx, dy = d[..., 0], d[..., 1]
    dw, dh = np.clip(d[..., 2], -max_ratio, max_ratio), np.clip(d[..., 3], -max_ratio, max_ratio)
    px = ((rois[:, 0] + rois[:, 2]) * 0.5)[:, None]
    py = ((rois[:, 1] + rois[:, 3]) * 0.5)[:, None]
    pw = (rois[:, 2] - rois[:, 0])[:, None]
    ph = (rois[:, 3] - rois[:, 1])[:, None]
    gw, gh = pw * np.exp(dw), ph * np.exp(dh)
    gx, gy = px + pw * dx, py + ph * dy
    x1, y1, x2, y2 = gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5
    if max_shape is not None:
        H, W = max_shape
        x1, x2 = np.clip(x1, 0, W), np.clip(x2, 0, W)
        y1, y2 = np.clip(y1, 0, H), np.clip(y2, 0, H)
    return np.stack([x1, y1, x2, y2], axis=-1).reshape(deltas.shape[0], -1)


# --- NMS -------------------------------------------------------------------------------------

def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS (torchvision / mmcv offset=0): indices kept, by decreasing score."""
    if boxes.shape[0] == 0:
        return np.zeros(0, np.int64)
    b = boxes.astype(np.float64)
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    order = np.argsort(-scores, kind="stable")
    keep = []
    suppressed = np.zeros(len(b), bool)
    for idx in range(len(order)):
        i = order[idx]
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[idx + 1:]
        rest = rest[~suppressed[rest]]
        if rest.size == 0:
            continue
        xx1 = np.maximum(b[i, 0], b[rest, 0])
        yy1 = np.maximum(b[i, 1], b[rest, 1])
        xx2 = np.minimum(b[i, 2], b[rest, 2])
        yy2 = np.minimum(b[i, 3], b[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou > iou_threshold]] = True
    return np.asarray(keep, np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> np.ndarray:
    """NMS within each group of ``idxs`` (mmcv's coordinate-offset trick); kept indices sorted
    by decreasing score."""
    if boxes.shape[0] == 0:
        return np.zeros(0, np.int64)
    offsets = idxs.astype(np.float64) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


# --- RoIAlign --------------------------------------------------------------------------------

def _sample_weights(starts: float, bin_size: float, pooled: int, grid: int, size: int) -> np.ndarray:
    """[pooled, size] weights: mean over ``grid`` bilinear samples per bin (RoIAlign along one
    axis; out-of-range samples (< -1 or > size) contribute 0)."""
    pos = starts + np.arange(pooled)[:, None] * bin_size + (np.arange(grid)[None, :] + 0.5) * bin_size / grid
    pos = pos.reshape(-1)
    valid = (pos >= -1.0) & (pos <= size)
    p = np.maximum(pos, 0.0)
    lo = np.floor(p).astype(np.int64)
    at_end = lo >= size - 1
    lo = np.where(at_end, size - 1, lo)
    hi = np.where(at_end, size - 1, lo + 1)
    p = np.where(at_end, lo.astype(np.float64), p)
    lw = p - lo
    w = np.zeros((pos.size, size), np.float64)
    r = np.arange(pos.size)
    np.add.at(w, (r, lo), np.where(valid, 1.0 - lw, 0.0))
    np.add.at(w, (r, hi), np.where(valid, lw, 0.0))
    return w.reshape(pooled, grid, size).mean(axis=1)


def roi_align(feat: np.ndarray, rois: np.ndarray, output_size: int, spatial_scale: float,
              sampling_ratio: int = 0, aligned: bool = True) -> np.ndarray:
    """mmcv / torchvision ``roi_align`` on one image: feat [C, H, W], rois [N, 4] xyxy in image
    pixels -> [N, C, out, out]. Bilinear sampling is separable, so each RoI is two small
    matrix products."""
    C, H, W = feat.shape
    out = np.zeros((rois.shape[0], C, output_size, output_size), np.float32)
    off = 0.5 if aligned else 0.0
    f = feat.astype(np.float32)
    for n, (x1, y1, x2, y2) in enumerate(rois.astype(np.float64)):
        sx, sy = x1 * spatial_scale - off, y1 * spatial_scale - off
        rw, rh = x2 * spatial_scale - off - sx, y2 * spatial_scale - off - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bw, bh = rw / output_size, rh / output_size
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rh / output_size))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rw / output_size))
        if gh <= 0 or gw <= 0:  # degenerate RoI: no samples, output 0 (as mmcv/torchvision)
            continue
        wy = _sample_weights(sy, bh, output_size, gh, H)
        wx = _sample_weights(sx, bw, output_size, gw, W)
        ry = np.nonzero(wy.any(axis=0))[0]
        rx = np.nonzero(wx.any(axis=0))[0]
        if ry.size == 0 or rx.size == 0:
            continue
        y0, y1i, x0, x1i = ry[0], ry[-1] + 1, rx[0], rx[-1] + 1
        sub = f[:, y0:y1i, x0:x1i]
        out[n] = np.einsum("ph,chw,qw->cpq", wy[:, y0:y1i].astype(np.float32), sub,
                           wx[:, x0:x1i].astype(np.float32), optimize=True)
    return out


def map_roi_levels(rois: np.ndarray, num_levels: int, finest_scale: float = 56) -> np.ndarray:
    """mmdet ``SingleRoIExtractor.map_roi_levels``: floor(log2(sqrt(wh) / finest + 1e-6))."""
    scale = np.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
    lv = np.floor(np.log2(scale / finest_scale + 1e-6))
    return np.clip(lv, 0, num_levels - 1).astype(np.int64)


# --- masks -----------------------------------------------------------------------------------

def _paste_weights(lo: float, hi: float, m: int, n_img: int, start: int, stop: int) -> np.ndarray:
    """[stop-start, m] weights of ``grid_sample(align_corners=False, zeros padding)`` sampling an
    m-pixel mask stretched over [lo, hi] at image pixel centres start..stop-1."""
    centres = np.arange(start, stop, dtype=np.float64) + 0.5
    g = (centres - lo) / max(hi - lo, 1e-12) * 2 - 1
    u = ((g + 1) * m - 1) / 2
    u0 = np.floor(u).astype(np.int64)
    lw = u - u0
    w = np.zeros((centres.size, m), np.float64)
    r = np.arange(centres.size)
    for idx, wt in ((u0, 1 - lw), (u0 + 1, lw)):
        ok = (idx >= 0) & (idx < m)
        np.add.at(w, (r[ok], idx[ok]), wt[ok])
    return w


def paste_masks(masks: np.ndarray, boxes: np.ndarray, img_h: int, img_w: int, threshold: float = 0.5) -> np.ndarray:
    """mmdet 2.x ``_do_paste_mask`` (whole-image grid, as on GPU) + binarisation: masks [N, m, m]
    probabilities, boxes [N, 4] in image pixels -> [N, img_h, img_w] bool."""
    out = np.zeros((masks.shape[0], img_h, img_w), bool)
    for n in range(masks.shape[0]):
        x0, y0, x1, y1 = boxes[n].astype(np.float64)
        m = masks[n].astype(np.float64)
        mh, mw = m.shape
        # outside the box by more than one mask pixel grid_sample reads only zero padding
        px, py = (x1 - x0) / mw, (y1 - y0) / mh
        xa, xb = max(int(math.floor(x0 - px)) - 1, 0), min(int(math.ceil(x1 + px)) + 1, img_w)
        ya, yb = max(int(math.floor(y0 - py)) - 1, 0), min(int(math.ceil(y1 + py)) + 1, img_h)
        if xa >= xb or ya >= yb:
            continue
        wy = _paste_weights(y0, y1, mh, img_h, ya, yb)
        wx = _paste_weights(x0, x1, mw, img_w, xa, xb)
        out[n, ya:yb, xa:xb] = (wy @ m @ wx.T) >= threshold
    return out
