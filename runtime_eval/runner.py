"""``evaluate()``: model + task + data -> report dict (and optionally the JSON file)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from . import report as _report
from .datasets import (
    ClassificationDataset,
    fashion_mnist_dataset,
    imagefolder_dataset,
    imagenet_dataset,
)
from .errors import EvalError
from .latency import measure_latency, parse_batch_sizes
from .loader import default_workers, iter_batches, select_subset
from .metrics import TopKAccuracy
from .model import ModelInfo, load_model_info
from .preprocess import Preprocessing, resolve_preprocessing
from .session import (
    GRAPH_OPT_LEVELS,
    MODES,
    SessionInfo,
    cpu_model,
    cpu_vnni,
    create_session,
    resolve_providers,
    run_session,
)

log = logging.getLogger("runtime_eval")

TASKS = ("imagenet", "imagefolder", "fashion-mnist", "ade20k", "coco")
RUNTIMES = ("ort", "openvino")
CLASSIFICATION_TASKS = ("imagenet", "imagefolder", "fashion-mnist")


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


@contextlib.contextmanager
def _collect_warnings() -> Iterator[_WarningCollector]:
    h = _WarningCollector()
    lg = logging.getLogger("runtime_eval")
    lg.addHandler(h)
    try:
        yield h
    finally:
        lg.removeHandler(h)


class _LineProgress:
    """Off a terminal: a line (done/total, elapsed, ETA) at most every ``MASKAQ_PROGRESS_EVERY``
    seconds (default 10) and one when done, instead of a bar nobody sees (same line format as
    ``maskaq-export``'s; this package does not import maskaq)."""

    def __init__(self, total: int, desc: str) -> None:
        try:
            self.every = max(0.0, float(os.environ.get("MASKAQ_PROGRESS_EVERY", 10)))
        except ValueError:
            self.every = 10.0
        self.total, self.desc, self.n = total, desc, 0
        self.t0 = self.last = time.monotonic()

    @staticmethod
    def _clock(s: float) -> str:
        m, sec = divmod(int(round(max(s, 0.0))), 60)
        h, m = divmod(m, 60)
        return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"

    def _emit(self, text: str) -> None:
        print(f"maskaq-eval: {self.desc}: {text}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every and self.n < self.total:
            self.last = now
            el = now - self.t0
            eta = self._clock(el / self.n * (self.total - self.n)) if self.n else "?"
            self._emit(f"{self.n}/{self.total} images ({100 * self.n / self.total:.0f}%), "
                       f"{self._clock(el)} elapsed, ETA {eta}")

    def close(self) -> None:
        if self.total and self.n >= self.total:
            self._emit(f"{self.n}/{self.total} images, done in {self._clock(time.monotonic() - self.t0)}")
            self.total = 0  # once


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    if enabled and not sys.stderr.isatty():
        return _LineProgress(total, desc)
    return tqdm(
        total=total,
        disable=not enabled,
        file=sys.stderr,
        desc=desc,
        unit="img",
        dynamic_ncols=True,
        leave=False,
    )


def _fixed_batch(info: ModelInfo) -> int | None:
    b = info.input_shape[0] if info.input_shape else None
    return b if isinstance(b, int) and b > 0 else None


def _output_name(info: ModelInfo, preferred: str) -> str:
    return preferred if preferred in info.output_names else info.output_names[0]


def _check_channels(task: str, pre: Preprocessing, info: ModelInfo) -> None:
    c = pre.channels
    if task in ("imagenet", "ade20k", "coco") and c != 3:
        raise EvalError(
            f"{info.path.name} takes {c}-channel input but {task} images are RGB (3 channels)"
        )
    if c not in (1, 3):
        raise EvalError(
            f"{info.path.name} takes {c}-channel input; image tasks feed 1 (grey, L) or 3 (RGB) "
            "channels"
        )


def _build_classification(
    task: str,
    data: Any,
    split: str | None,
    info: ModelInfo,
    class_order: str | None = None,
    class_map: str | Path | None = None,
) -> ClassificationDataset:
    if (class_order is not None or class_map is not None) and task != "imagefolder":
        flag = "--class-order" if class_order is not None else "--class-map"
        raise EvalError(f"{flag} applies to --task imagefolder only, not {task!r}")
    if task == "imagenet":
        ds = imagenet_dataset(data)
    elif task == "imagefolder":
        ds = imagefolder_dataset(
            data,
            labels=info.labels,
            num_classes=info.num_classes,
            class_order=class_order,
            class_map=class_map,
        )
    else:
        ds = fashion_mnist_dataset(data, split=split or "test")
    n_out = info.num_classes
    if info.labels is not None and n_out is not None and len(info.labels) != n_out:
        raise EvalError(
            f"{info.path.name}: maskaq.labels has {len(info.labels)} names but the model has "
            f"{n_out} outputs"
        )
    if n_out is not None and n_out < ds.num_classes:
        raise EvalError(
            f"{info.path.name} has {n_out} outputs but {ds.name} has {ds.num_classes} classes"
        )
    if n_out is not None and task == "imagenet" and n_out != 1000:
        raise EvalError(f"{info.path.name} has {n_out} outputs; imagenet needs a 1000-class model")
    return ds


def _classification_transform(pre: Preprocessing, ds: ClassificationDataset) -> Callable:
    if ds.native_size is not None and ds.native_size == (pre.height, pre.width):
        # e.g. Fashion-MNIST 28x28 into a 28x28 model: no resampling at all
        def tf(img):
            return pre.to_array(img if img.mode == pre.pil_mode else img.convert(pre.pil_mode))

        return tf
    return pre


def _run_classification(
    ds: ClassificationDataset,
    transform: Callable,
    runs: Sequence[tuple[str, SessionInfo, ModelInfo]],
    indices: np.ndarray,
    batch_size: int,
    workers: int,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    accs = {key: TopKAccuracy((1, 5)) for key, _, _ in runs}
    outs = {key: _output_name(mi, "logits") for key, _, mi in runs}
    bar = _progress_bar(len(indices), progress, ds.name)
    try:
        for b_idx, x in iter_batches(indices, batch_size, lambda i: transform(ds.load(i)), workers):
            n = len(b_idx)
            labels = ds.labels[b_idx]
            for key, sess, mi in runs:
                fixed = _fixed_batch(mi)
                xb = x
                if fixed is not None and n < fixed:
                    xb = np.concatenate([x, np.zeros((fixed - n, *x.shape[1:]), x.dtype)])
                y = run_session(sess, {mi.input_name: xb}, [outs[key]])[0]
                if y.ndim != 2 or y.shape[0] < n:
                    raise EvalError(
                        f"{mi.path.name}: output {outs[key]!r} has shape {list(y.shape)}; a "
                        "classifier must give [batch, num_classes] logits"
                    )
                if y.shape[1] < ds.num_classes:
                    raise EvalError(
                        f"{mi.path.name} gives {y.shape[1]} logits but {ds.name} has "
                        f"{ds.num_classes} classes"
                    )
                accs[key].update(y[:n], labels)
            bar.update(n)
    finally:
        bar.close()
    return {key: {**acc.result(), "images": acc.count} for key, acc in accs.items()}


def _resolve_fp32_preprocessing(pre: Preprocessing, fp32_info: ModelInfo) -> None:
    if fp32_info.preprocessing is None:
        log.info("--fp32 model has no preprocessing metadata: using the quantized model's")
        return
    other = resolve_preprocessing(fp32_info)
    a, b = pre.report(), other.report()
    a.pop("source"), b.pop("source")
    if a != b:
        raise EvalError(
            f"the --fp32 model's preprocessing {b} differs from the quantized model's {a}; "
            "they must be evaluated on the same inputs"
        )


def evaluate(
    model_path: str | Path,
    task: str,
    data: str | Path | None = None,
    *,
    fp32: str | Path | None = None,
    mode: str | None = None,
    providers: Sequence[str] | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    workers: int | None = None,
    threads: int = 0,
    graph_opt: str = "all",
    split: str | None = None,
    latency: bool = False,
    latency_batches: str | Sequence[int] = (1, 32),
    latency_iters: int = 50,
    latency_warmup: int = 5,
    progress: bool = False,
    output: str | Path | None = None,
    seg_mode: str | None = None,
    class_order: str | None = None,
    class_map: str | Path | None = None,
    runtime: str = "ort",
    precision: str | None = None,
) -> dict[str, Any]:
    """Evaluate an exported ONNX model in ONNX Runtime (or OpenVINO) and return the report.

    Args:
        model_path: the ``.onnx`` file (its metadata carries preprocessing, labels, source).
        task: ``imagenet``, ``imagefolder``, ``fashion-mnist``, ``ade20k`` or ``coco``.
        data: the dataset folder (fashion-mnist defaults to /usr/share/datasets/fashion-mnist).
        fp32: the float model, evaluated in the same run on the same inputs; deltas reported.
        mode: ``reference`` (exact fake-quant, ``session.disable_quant_qdq=1``; the default
            with ORT) or ``deploy`` (ORT's fused integer kernels). OpenVINO has only ``deploy``
            (its CPU plugin always runs Q/DQ-wrapped layers with its int8 kernels).
        providers: e.g. ``["cuda"]``; default CUDA if usable else CPU. A requested provider
            that is missing or does not start is an error.
        batch_size: images per ``session.run`` (a model with a static batch dim uses its own).
        limit: evaluate only this many images (evenly spaced over the set).
        workers: preprocessing threads (default: CPU count, at most 8).
        threads: ORT intra-op threads (0 = ORT default).
        graph_opt: ORT graph optimisation level: disable, basic, extended, all.
        split: fashion-mnist ``test``/``train``; ade20k ``validation``; coco ``val2017``.
        latency: also time the model alone on random input.
        latency_batches: batch sizes for latency, e.g. ``"1,32"``.
        latency_iters: timed runs per batch size (after ``latency_warmup`` untimed ones).
        progress: show a tqdm bar on stderr.
        output: write the JSON report there (atomically).
        seg_mode: maskaq dense ADE20K graphs: ``whole`` or ``slide`` inference (default: the
            export's ``test_cfg.mode``).
        class_order: imagefolder: ``"sorted"`` = class index is the sorted folder order
            (timm's default), whatever the model's labels.
        class_map: imagefolder: a file mapping folder names to output indices (timm's
            one-name-a-line layout, or JSON ``{folder: index or label}``).
        runtime: ``ort`` (ONNX Runtime, default) or ``openvino`` (OpenVINO's CPU plugin,
            the optional ``maskaq[openvino]`` extra; see :mod:`runtime_eval.openvino_backend`).
        precision: OpenVINO only: ``f32`` (default, comparable with ORT) or ``bf16``, the CPU
            plugin's ``INFERENCE_PRECISION_HINT`` (OpenVINO's own default is bf16 on CPUs
            with AMX/AVX512-BF16).

    Dense exports (``maskaq.dense`` metadata, docs/dense.md) run through their registered
    predictors: for COCO give the export directory or its ``backbone_neck.onnx`` (the other
    parts are opened beside it with the same providers and settings); for ADE20K the UperNet
    graph.

    Returns:
        The report dict (see docs/eval-harness.md).

    Raises:
        EvalError: any bad input (model, data, options), with a one-line message.

    Example:
        >>> r = evaluate("deit_t_w4a4.onnx", "imagenet", "~/imagenet", fp32="deit_t.onnx")  # doctest: +SKIP
        >>> r["metrics"]["top1"], r["deltas"]["top1"]  # doctest: +SKIP
        (70.1, -2.09)
    """
    t_start = time.perf_counter()
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r} (valid: {', '.join(TASKS)})")
    if runtime not in RUNTIMES:
        raise EvalError(f"unknown runtime {runtime!r} (valid: {', '.join(RUNTIMES)})")
    if runtime == "ort":
        if precision is not None:
            raise EvalError("--precision applies to --runtime openvino only (ORT computes in f32)")
        mode = mode or "reference"
    else:
        if mode == "reference":
            raise EvalError(
                "OpenVINO has no exact fake-quant (reference) mode: it always runs Q/DQ-wrapped "
                "layers with its int8 kernels; use --runtime ort for --mode reference"
            )
        if providers:
            raise EvalError("--provider applies to --runtime ort only (OpenVINO runs on its CPU plugin)")
        if graph_opt != "all":
            raise EvalError("--graph-opt applies to --runtime ort only")
        mode = mode or "deploy"
        precision = precision or "f32"
        from .openvino_backend import PRECISIONS, openvino_version

        if precision not in PRECISIONS:
            raise EvalError(f"unknown precision {precision!r} (valid: {', '.join(PRECISIONS)})")
        openvino_version()  # a missing openvino fails before any work
    if mode not in MODES:
        raise EvalError(f"unknown mode {mode!r} (valid: {', '.join(MODES)})")
    if graph_opt not in GRAPH_OPT_LEVELS:
        raise EvalError(
            f"unknown graph optimisation level {graph_opt!r} (valid: {', '.join(GRAPH_OPT_LEVELS)})"
        )
    if batch_size <= 0:
        raise EvalError(f"--batch-size must be positive, got {batch_size}")
    if limit is not None and limit <= 0:
        raise EvalError(f"--limit must be positive, got {limit}")
    if workers is not None and workers <= 0:
        raise EvalError(f"--workers must be positive, got {workers}")
    lat_batches = parse_batch_sizes(latency_batches) if latency else []
    if runtime == "ort":
        resolve_providers(providers)  # a missing provider fails before any work
    if output is not None:
        _report.check_output_path(output)

    with _collect_warnings() as warns:
        model_path = _dense_model_path(model_path)
        fp32 = _dense_model_path(fp32) if fp32 is not None else None
        info, _ = load_model_info(model_path)
        fp32_info = load_model_info(fp32)[0] if fp32 is not None else None
        dense = None
        if "maskaq.dense" in info.metadata:
            if task in CLASSIFICATION_TASKS:
                raise EvalError(
                    f"{info.path.name} is a dense (detection/segmentation) export "
                    f"(maskaq.task={info.task!r}); evaluate it with --task coco or --task ade20k"
                )
            _load_dense_predictors()
            from .dense import evaluation as _dense

            dense = _dense.check_task(info, task)
            pre, pre_report = _dense.dense_preprocessing(info, dense, seg_mode)
        else:
            if seg_mode is not None:
                raise EvalError("--seg-mode applies to maskaq dense ADE20K exports only")
            pre = resolve_preprocessing(info)
            pre_report = pre.report()
        _check_channels(task, pre, info)
        if fp32_info is not None and dense is not None:
            _dense.check_fp32(pre_report, dense, info, fp32_info, task, seg_mode)
        elif fp32_info is not None:
            if "maskaq.dense" in fp32_info.metadata:
                raise EvalError(
                    f"--fp32 model {fp32_info.path.name} is a dense export but {info.path.name} is not"
                )
            _resolve_fp32_preprocessing(pre, fp32_info)
            if fp32_info.input_shape[1:] != info.input_shape[1:] and all(
                isinstance(v, int) for v in fp32_info.input_shape[1:]
            ):
                raise EvalError(
                    f"--fp32 model input {fp32_info.input_shape} does not match {info.input_shape}"
                )

        fixed = _fixed_batch(info)
        fixed32 = _fixed_batch(fp32_info) if fp32_info else None
        if fixed and fixed32 and fixed != fixed32:
            raise EvalError(f"the models have different static batch sizes ({fixed} vs {fixed32})")
        fixed = fixed or fixed32
        if fixed is not None and batch_size != fixed:
            log.info("model has a static batch size %d: using it", fixed)
            batch_size = fixed
        workers = workers or default_workers()

        # ---- data
        if task in CLASSIFICATION_TASKS:
            ds: Any = _build_classification(task, data, split, info, class_order, class_map)
        elif task == "ade20k":
            from .ade20k import NUM_CLASSES, ade20k_dataset

            ds = ade20k_dataset(data, split or "validation")
            if dense is not None:
                _dense.check_dataset(info, dense, NUM_CLASSES, "ADE20K")
        else:
            from .coco import coco_dataset

            ds = coco_dataset(data, split or "val2017")
            if dense is not None:
                _dense.check_dataset(info, dense, len(ds.cat_ids), f"{ds.ann_file.name}")
        indices = select_subset(len(ds), limit)

        # ---- sessions
        if runtime == "openvino":
            from .openvino_backend import create_openvino_session

            def _open(p: Any) -> Any:
                return create_openvino_session(p, precision=str(precision), threads=threads)
        else:

            def _open(p: Any) -> Any:
                return create_session(
                    p, providers=providers, mode=str(mode), graph_opt=graph_opt, threads=threads
                )

        sess = _open(model_path)
        sess32 = _open(fp32) if fp32 is not None else None
        vnni = cpu_vnni()
        on_cpu = sess.providers_used[0] == "CPUExecutionProvider"
        if mode == "deploy" and info.is_quantized and on_cpu:
            if vnni is False:
                log.warning(
                    "this CPU has no VNNI (avx512_vnni/avx_vnni): ORT's fused u8 x s8 kernels can "
                    "saturate with full 8-bit weights in deploy mode; compare with --mode reference"
                )
            elif vnni is None:
                log.warning(
                    "cannot tell whether this CPU has VNNI: fused 8-bit kernels may saturate "
                    "without it; compare with --mode reference"
                )

        # ---- metrics
        if task in CLASSIFICATION_TASKS:
            runs = [("quant", sess, info)] + ([("fp32", sess32, fp32_info)] if sess32 else [])
            res = _run_classification(
                ds, _classification_transform(pre, ds), runs, indices, batch_size, workers, progress
            )
            metrics, metrics32 = res["quant"], res.get("fp32")
        elif task == "ade20k":
            metrics, metrics32 = _run_ade20k(
                ds, pre, sess, info, sess32, fp32_info, indices, workers, progress, seg_mode
            )
        else:
            metrics, metrics32 = _run_coco(
                ds, pre, sess, info, sess32, fp32_info, indices, workers, progress
            )

        # ---- latency
        lat = None
        lat32 = None
        if latency:
            chw = tuple(int(v) for v in pre.input_size)
            if dense is not None and lat_batches != [1]:
                log.info("dense graphs have a fixed batch of 1: timing batch size 1 only")
                lat_batches = [1]
            lat = measure_latency(
                sess,
                info.input_name,
                chw,
                lat_batches,
                fixed_batch=_fixed_batch(info),
                warmup=latency_warmup,
                iters=latency_iters,
            )
            reasons = list(info.sub8bit_reasons)
            if mode == "reference" and info.is_quantized:
                reasons.append("reference mode: Q/DQ run as float fake-quant (no integer kernels)")
            lat["simulated"] = bool(reasons)
            lat["simulated_reasons"] = reasons
            lat["mode"] = mode
            if dense is not None:
                lat["scope"] = (
                    f"{info.path.name} alone (image -> "
                    + ("FPN maps" if info.task != "ade20k_segmentation" else "logits")
                    + "); heads and numpy post-processing not timed"
                )
            if sess32 is not None and fp32_info is not None:
                lat32 = measure_latency(
                    sess32,
                    fp32_info.input_name,
                    chw,
                    lat_batches,
                    fixed_batch=_fixed_batch(fp32_info),
                    warmup=latency_warmup,
                    iters=latency_iters,
                )

        warnings_list = list(warns.messages)

    ds_report = ds.report()
    ds_report["images"] = int(len(indices))
    ds_report["subset"] = (
        {"limit": int(limit), "selection": "evenly spaced"}
        if limit is not None and limit < len(ds)
        else None
    )
    rt = sess.report()
    rt.update(
        {
            "batch_size": batch_size,
            "preprocess_workers": workers,
            "cpu": {"model": cpu_model(), "vnni": "unknown" if vnni is None else vnni},
            "platform": platform.platform(),
            "python": platform.python_version(),
            "ort_device": ort.get_device() if runtime == "ort" else None,
        }
    )
    fp32_section = None
    deltas = None
    if fp32_info is not None and sess32 is not None:
        fp32_section = {
            "model": fp32_info.report(),
            "metrics": metrics32,
            "providers_used": sess32.providers_used,
            "kernels": sess32.report()["kernels"],
            "latency": lat32,
        }
        deltas = _report.numeric_deltas(metrics, metrics32)
    model_report = info.report()
    if dense is not None:
        model_report["dense"] = _dense.parts_report(info) or {"model": dense.get("model")}
        if fp32_section is not None and fp32_info is not None:
            fp32_section["model"]["dense"] = _dense.parts_report(fp32_info) or {
                "model": dense.get("model")
            }
    rep: dict[str, Any] = {
        "schema_version": _report.SCHEMA_VERSION,
        "task": task,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_report,
        "dataset": ds_report,
        "preprocessing": pre_report,
        "runtime": rt,
        "metrics": metrics,
        "fp32": fp32_section,
        "deltas": deltas,
        "latency": lat,
        "warnings": warnings_list,
        "wall_time_s": time.perf_counter() - t_start,
    }
    rep = _report._clean(rep)
    if output is not None:
        _report.write_report(rep, output)
    return rep


def _dense_model_path(path: str | Path) -> str | Path:
    """A dense detection export directory -> its ``backbone_neck.onnx``; anything else as is."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "backbone_neck.onnx").is_file():
        return p / "backbone_neck.onnx"
    return path


def _load_dense_predictors() -> None:
    """Dense-model predictors (``runtime_eval.dense``, where present) register on import."""
    import importlib
    import importlib.util

    name = f"{__package__}.dense"
    if importlib.util.find_spec(name) is not None:
        importlib.import_module(name)


def _run_ade20k(ds, pre, sess, info, sess32, info32, indices, workers, progress, seg_mode=None):
    from .ade20k import (
        NUM_CLASSES,
        SEGMENTATION_PREDICTORS,
        OnnxSegmenter,
        evaluate_segmentation,
    )

    _load_dense_predictors()
    results = []
    for s, mi in ((sess, info), (sess32, info32)):
        if s is None:
            results.append(None)
            continue
        factory = SEGMENTATION_PREDICTORS.get(mi.task or "")
        if factory is not None:
            predict = factory(s, mi, pre, **({"mode": seg_mode} if seg_mode else {}))
        else:
            shape = mi.output_shapes[0]
            if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != NUM_CLASSES):
                raise EvalError(
                    f"{mi.path.name}: output {mi.output_names[0]!r} has shape {shape}; ade20k "
                    f"needs [B, {NUM_CLASSES}, h, w] logits, or a segmentation predictor "
                    f"registered for its maskaq.task ({mi.task!r})"
                )
            predict = OnnxSegmenter(s, mi.input_name, pre)
        bar = _progress_bar(len(indices), progress, "ade20k")
        try:
            results.append(
                evaluate_segmentation(
                    predict, ds, indices=indices, workers=workers, progress=bar.update
                )
            )
        finally:
            bar.close()
    return results[0], results[1]


def _run_coco(ds, pre, sess, info, sess32, info32, indices, workers, progress):
    from .coco import DETECTION_PREDICTORS, evaluate_detection

    _load_dense_predictors()
    results = []
    for s, mi in ((sess, info), (sess32, info32)):
        if s is None:
            results.append(None)
            continue
        factory = DETECTION_PREDICTORS.get(mi.task or "")
        if factory is None:
            known = ", ".join(sorted(DETECTION_PREDICTORS)) or "none registered"
            raise EvalError(
                f"{mi.path.name} (maskaq.task={mi.task!r}) has no detection predictor for --task "
                f"coco (known: {known}); dense models plug into runtime_eval.coco.evaluate_detection"
            )
        bar = _progress_bar(len(indices), progress, "coco")
        try:
            results.append(
                evaluate_detection(
                    factory(s, mi, pre), ds, indices=indices, workers=workers, progress=bar.update
                )
            )
        finally:
            bar.close()
    return results[0], results[1]
