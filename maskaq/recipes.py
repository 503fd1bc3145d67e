"""Every method in one place: synthesis loss terms, objectives and method recipes.

A **method** (``--method``) is one :class:`Recipe`: where its calibration images come from
(synthesis, Gaussian noise, real images), the settings it puts on top of a budget preset
(synthesis objective and weights, augmentation, optimiser and schedule, calibration), its image
budget per preset, its calibration stage (``kd``: :func:`maskaq.calibration.calibrate`;
``minmax``: :func:`maskaq.calibration.minmax_calibrate`), its ablations and any per-model
settings. A synthesis **objective** (``synth.objective``) is an ordered list of loss
**terms**; a term is a function of the step's context (:class:`maskaq.synthesis.StepContext`)
with the SynthConfig fields that hold its weight and its on/off switch, and the attention
records it reads.

Adding a method = its loss functions (in :mod:`maskaq.losses`), a :func:`term` for each, one
:class:`Objective` and one :class:`Recipe` entry below. Nothing else changes: the pipeline,
the CLIs (``--method`` choices) and the results table read these registries.

==========================  ========================================================  ===========
method                      synthesis (objective: terms)                              calibration
==========================  ========================================================  ===========
maskaq                      maskaq: iha + ce + tv + de + maa, with the current Q;      kd (+refresh)
                            regenerated every R epochs
mimiq                       mimiq: iha + ce + tv, P only, once                         kd, unmasked L_HD
psaq                        psaq: PSAQ-ViT's own recipe (method.md §6): entropy + ce  minmax, 32 images
                            + 0.05 |TV - v|; Adam 0.2 (0.5, 0.9), 2 rounds warm-up +
                            cosine, roll 15/30 px + flip
psaq_maskaq_settings        psaq objective with MaskAQ's synthesis settings (the       minmax
                            project's earlier PSAQ arm, kept for comparison)
spdfq                       spdfq: alpha1 APA + soft-label CE over the image and its   kd
                            MSR crops + 0.05 TV (method.md §7)
noise                       N(0, 1) images                                             kd
real                        real images                                                kd
==========================  ========================================================  ===========

Synthesis sizes [ours]: roll offsets are given in px at ``synth.size_ref`` (224) px and scaled
to the input size (:func:`maskaq.losses.scaled_offset`), and TV values are scaled to what they
would be at 224 x 224 (:func:`maskaq.losses.size_factor`), so every weight keeps the meaning
it has at 224 px, where the original values are reproduced exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from . import losses as L

if TYPE_CHECKING:  # pragma: no cover
    from .synthesis import StepContext

log = logging.getLogger(__name__)

__all__ = ["Term", "TERMS", "term", "Objective", "OBJECTIVES", "Recipe", "RECIPES", "register",
           "get_recipe", "method_names", "spdfq_alpha1"]


# --- loss terms -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """One synthesis loss term.

    ``weight``: the SynthConfig field holding its weight; ``switch``: the bool SynthConfig
    field that turns it on (None: always on); ``needs``: attention records it reads
    (``logits``, ``probs``, ``head_out``) and ``"q"`` when it runs the current Q.
    """

    name: str
    fn: Callable[["StepContext"], torch.Tensor]
    weight: str
    switch: str | None = None
    needs: frozenset[str] = frozenset()


TERMS: dict[str, Term] = {}


def term(name: str, weight: str, switch: str | None = None, needs: tuple[str, ...] = ()) -> Callable:
    """Decorator registering ``fn(ctx) -> scalar`` as the synthesis term ``name``."""
    def deco(fn: Callable[["StepContext"], torch.Tensor]) -> Callable[["StepContext"], torch.Tensor]:
        if name in TERMS:
            raise ValueError(f"synthesis term {name!r} is registered twice")
        TERMS[name] = Term(name, fn, weight, switch, frozenset(needs))
        return fn
    return deco


@term("iha", "w_iha", "use_iha", ("logits",))
def _iha(ctx: "StepContext") -> torch.Tensor:
    return L.iha_loss(ctx.patch_blocks(), 0, ctx.cfg.ssim_c1, ctx.cfg.ssim_c2)


@term("ce", "w_ce", "use_ce")
def _ce(ctx: "StepContext") -> torch.Tensor:
    return L.ce_loss(ctx.logits, ctx.labels)


@term("tv", "w_tv", "use_tv")
def _tv(ctx: "StepContext") -> torch.Tensor:
    """``synth.tv_form``: ``eq2`` MaskAQ's Eq. 2 over the un-augmented images; ``psaq``
    PSAQ-ViT's ``|TV_l2(x_jittered) - v|``; ``l2`` ``TV_l2(x_jittered)`` (SPDFQ [I]). Every
    form is scaled to 224 x 224 px (:func:`maskaq.losses.size_factor`)."""
    cfg = ctx.cfg
    f = L.size_factor(ctx.x.shape[-2], ctx.x.shape[-1], cfg.size_ref)
    if cfg.tv_form == "eq2":
        return L.tv_loss(ctx.x) * f if f != 1.0 else L.tv_loss(ctx.x)
    tv = L.tv_l2(ctx.xa)
    tv = tv * f if f != 1.0 else tv
    if cfg.tv_form == "l2":
        return tv
    return (tv - ctx.state["tv_target"].to(tv)).abs()


@term("de", "alpha", "use_de", ("logits",))
def _de(ctx: "StepContext") -> torch.Tensor:
    cfg = ctx.cfg
    return L.de_loss(ctx.patch_blocks(), 0, ctx.gen, cfg.de_rows, cfg.de_offdiag_only, cfg.de_eps)


@term("maa", "beta", "use_maa", ("logits", "q"))
def _maa(ctx: "StepContext") -> torch.Tensor:
    cfg = ctx.cfg
    a_p = ctx.token_scores(ctx.recs)
    if cfg.use_mask:
        importance = torch.stack([a.detach() for a in a_p]).mean(dim=0)  # Eq. 11: mean over layers
        ctx.mask = L.adaptive_mask(importance, ctx.step, ctx.steps, ctx.gen, start_ratio=cfg.mask_start,
                                   end_ratio=cfg.mask_end, drop_prob=cfg.mask_drop)
    qrecs = ctx.run_q(("logits",))
    return L.maa_loss(a_p, ctx.token_scores(qrecs), ctx.mask)


@term("psaq", "w_psaq", None, ("head_out",))
def _psaq(ctx: "StepContext") -> torch.Tensor:
    return L.psaq_entropy_loss([r.head_out for r in ctx.recs], ctx.prefixes, ctx.cfg.psaq_bandwidth,
                               ctx.cfg.psaq_points)


@term("apa", "w_apa", "use_apa", ("probs",))
def _apa(ctx: "StepContext") -> torch.Tensor:
    idx, depth = apa_layers(len(ctx.recs))
    rows = []
    for i in idx:
        r, lay = ctx.recs[i], ctx.layers[i]
        rows.append(L.window_mean_attention(r.probs, ctx.batch) if lay.windowed else L.cls_attention(r.probs, lay.prefix))
    priors = [p.to(ctx.x.device) for p in ctx.state["priors"]]
    return L.apa_loss(rows, priors, depth, len(ctx.recs))


@term("sl", "w_ce", "use_ce")
def _sl(ctx: "StepContext") -> torch.Tensor:
    """Soft-label CE of the whole images, plus (MSR) that of their crops, each a batch mean."""
    st = ctx.state
    loss = L.soft_ce(ctx.logits, st["soft"].to(ctx.x.device))
    if st["crop_soft"].shape[0]:
        crops = L.msr_crops(ctx.x, st["boxes"])  # regions of the un-augmented images [I]
        loss = loss + L.soft_ce(ctx.class_logits(ctx.P(crops)), st["crop_soft"].to(ctx.x.device))
    return loss


# --- objectives -------------------------------------------------------------------------------

def apa_layers(num_layers: int) -> tuple[list[int], list[int]]:
    """SPDFQ's APA layers ``l >= L/2`` (1-based depth): ``(0-based indices, depths)``."""
    depth = [l for l in range(1, num_layers + 1) if l >= num_layers / 2]
    return [d - 1 for d in depth], depth


def _hard_labels(host: torch.Generator, n: int, num_classes: int, cfg: Any, layout: Any,
                 chw: tuple[int, int, int]) -> dict[str, Any]:
    return {"labels": torch.randint(0, num_classes, (n,), generator=host)}


def _psaq_state(host: torch.Generator, n: int, num_classes: int, cfg: Any, layout: Any,
                chw: tuple[int, int, int]) -> dict[str, Any]:
    """Labels and PSAQ-ViT's TV target ``v ~ U(lo, hi)``, drawn once per batch. The range is
    for ``tv_target_batch`` images of 3 channels at 224 px; TV is already scaled to 224 px,
    and a whole-batch norm grows with sqrt(images * channels), so v is scaled by
    ``sqrt(n * C / (tv_target_batch * 3))`` (1 for the reference batch)."""
    st = _hard_labels(host, n, num_classes, cfg, layout, chw)
    lo, hi = cfg.tv_target
    v = lo + (hi - lo) * torch.rand((), generator=host)
    ratio = n * chw[0] / (cfg.tv_target_batch * 3)
    st["tv_target"] = v * math.sqrt(ratio) if ratio != 1 else v
    return st


def _spdfq_state(host: torch.Generator, n: int, num_classes: int, cfg: Any, layout: Any,
                 chw: tuple[int, int, int]) -> dict[str, Any]:
    """Per batch, on the host generator: MSR boxes and their classes (``m ~ U{1..4}`` per
    image, when MSR and the CE term are on), the soft targets of the images and the crops, and
    one GMM prior per image, APA layer and head (windowed layers: on the window grid, u = 0)."""
    _, H, W = chw
    msr = cfg.use_msr and cfg.use_ce
    boxes, img_classes, crop_classes = [], [], []
    for _ in range(n):
        bx = L.msr_boxes(host, H, W, cfg.msr_max_crops) if msr else []
        cs = torch.randint(0, num_classes, (max(1, len(bx)),), generator=host).tolist()
        boxes.append(bx)
        img_classes.append(cs)
        crop_classes.extend([[c] for c in cs[:len(bx)]])
    labels = torch.tensor([cs[0] for cs in img_classes], dtype=torch.long)
    if cfg.soft_labels:
        soft = L.soft_targets(host, img_classes, num_classes)
        crop_soft = L.soft_targets(host, crop_classes, num_classes) if crop_classes else torch.zeros(0, num_classes)
    else:  # one-hot (a whole image with several crop classes: uniform over them)
        def hot(rows: list[list[int]]) -> torch.Tensor:
            t = torch.zeros(len(rows), num_classes)
            for i, cs in enumerate(rows):
                t[i, cs] = 1.0 / len(cs)
            return t
        soft, crop_soft = hot(img_classes), hot(crop_classes)
    priors = []
    if cfg.use_apa:
        layers = list(layout.layers.values())
        idx, _ = apa_layers(len(layers))
        for i in idx:
            lay = layers[i]
            grid = lay.window if lay.windowed else lay.grid
            priors.append(L.gmm_priors(host, (n, lay.heads), grid, cls_mass=not lay.windowed))
    return {"labels": labels, "boxes": boxes, "soft": soft, "crop_soft": crop_soft, "priors": priors}


@dataclass(frozen=True)
class Objective:
    """A synthesis objective: its terms in recording order and the per-batch state it draws
    once per batch from the host generator (``init(host, n, num_classes, cfg, layout, chw)`` ->
    dict with at least ``labels`` ``[n]``)."""

    name: str
    terms: tuple[str, ...]
    init: Callable[..., dict[str, Any]] = _hard_labels

    @property
    def uses_q(self) -> bool:
        return any("q" in TERMS[t].needs for t in self.terms)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("maskaq", ("iha", "ce", "tv", "de", "maa")),
    Objective("mimiq", ("iha", "ce", "tv")),
    Objective("psaq", ("psaq", "ce", "tv"), _psaq_state),
    Objective("spdfq", ("apa", "sl", "tv"), _spdfq_state),
)}


# --- recipes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """One method, declared.

    Args:
        name: the ``--method`` name. title: its name in tables and figures.
        data: ``synth`` (the objective in ``settings['synth.objective']``), ``noise`` or ``real``.
        settings: dotted overrides (``synth.*``, ``calib.*``, ``num_images``) put on every preset.
        budget: per preset name, dotted overrides for the image budget and step counts.
        ptq: ``kd`` (distillation calibration) or ``minmax`` (plain min/max PTQ, no training).
        ablations: name -> dotted overrides (``--ablation``).
        model_settings: ``fn(model name) -> dotted overrides`` (e.g. SPDFQ's alpha1 per model).
        dense: offered by the dense entry point (``maskaq.dense``).
        summary: one line for ``--help``.

    Order of precedence when a run is resolved: preset < settings < budget < model_settings <
    ablations < the user's ``--set`` overrides.
    """

    name: str
    title: str
    data: str = "synth"
    settings: Mapping[str, Any] = field(default_factory=dict)
    budget: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    ptq: str = "kd"
    ablations: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    model_settings: Callable[[str], Mapping[str, Any]] | None = None
    dense: bool = True
    summary: str = ""

    def __post_init__(self) -> None:
        if self.data not in ("synth", "noise", "real"):
            raise ValueError(f"recipe {self.name!r}: data {self.data!r} is not synth, noise or real")
        if self.ptq not in ("kd", "minmax"):
            raise ValueError(f"recipe {self.name!r}: ptq {self.ptq!r} is not kd or minmax")
        if self.data == "synth" and self.settings.get("synth.objective") not in OBJECTIVES:
            raise ValueError(f"recipe {self.name!r}: synth.objective must be one of {', '.join(OBJECTIVES)}")

    def overrides_for(self, preset: str, model: str, ablations: tuple[str, ...] = ()) -> list[Mapping[str, Any]]:
        """The recipe's dotted overrides for one run, in the order they apply."""
        out: list[Mapping[str, Any]] = [self.settings, self.budget.get(preset, {})]
        if self.model_settings is not None:
            out.append(self.model_settings(model))
        out.extend(self.ablations[a] for a in ablations)
        return out

    def quant_overrides_for(self, ablations: tuple[str, ...] = ()) -> dict[str, Any]:
        """The ``quant.*`` keys of the recipe's settings and of ``ablations`` (later wins): they
        configure the quantizers, not the budget preset (e.g. SPDFQ's log2 attention quantizer)."""
        out: dict[str, Any] = {}
        for o in [self.settings, *(self.ablations[a] for a in ablations)]:
            out.update({k: v for k, v in o.items() if str(k).startswith("quant.")})
        return out


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add a method (its objective and terms must be registered already)."""
    if recipe.name in RECIPES:
        raise ValueError(f"method {recipe.name!r} is registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The recipe of ``name``; ValueError listing the valid ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[name]


def method_names(dense: bool = False) -> tuple[str, ...]:
    """Every registered method (``dense=True``: those the dense entry point offers)."""
    return tuple(n for n, r in RECIPES.items() if r.dense or not dense)


# The optimiser / schedule / jitter of PSAQ-ViT's generate_data.py (method.md §6); SPDFQ's
# paper gives the same Adam settings and says nothing of schedule and jitter, for which we take
# PSAQ-ViT's (the code base SPDFQ reports its PSAQ-ViT numbers with) [I].
_PSAQ_OPT = {
    "synth.optimizer": "adam", "synth.lr": 0.2, "synth.lr_windowed": 0.25, "synth.betas": (0.5, 0.9),
    "synth.adam_eps": 1e-8, "synth.weight_decay": 0.0, "synth.lr_schedule": "warmup_cosine",
    "synth.warmup_frac": 0.2, "synth.lr_min": 0.0, "synth.augment": "roll_flip", "synth.jitter": 15,
    "synth.jitter_late": 30,
}

#: SPDFQ's alpha1 per model (paper) by timm architecture prefix; others: :data:`SPDFQ_ALPHA1_DEFAULT`.
SPDFQ_ALPHA1: dict[str, float] = {
    "deit_tiny": 1e5, "deit_small": 1e5, "deit_base": 1e4, "vit_base": 100.0, "swin_base": 100.0,
    "swin_small": 10.0, "vit_small": 1.0,
}
#: Chosen on the Fashion-MNIST validation slices of both reference models (``fmnist_vit``, patch 4,
#: 49 tokens; ``fmnist_vit_p7``, patch 7, 16 tokens; 4w4a, seed 0, SPDFQ's 32 images; evidence in
#: benchmarks/results/spdfq_alpha1_choice.md, by benchmarks/spdfq_alpha1.py --num-images 32): the value
#: whose worse model is closest to that model's best. Also the fallback for models the paper does
#: not list (a warning says so: choose it on a validation slice of your own).
SPDFQ_ALPHA1_DEFAULT = 1e3
SPDFQ_ALPHA1_CHOSEN: dict[str, float] = {"fmnist_vit": SPDFQ_ALPHA1_DEFAULT, "fmnist_vit_p7": SPDFQ_ALPHA1_DEFAULT}


def spdfq_alpha1(model: str) -> float | None:
    """alpha1 of SPDFQ for ``model`` (alias, timm name or file): the paper's value where it gives
    one, the validation-slice choice for the project's reference models, else None."""
    if model in SPDFQ_ALPHA1_CHOSEN:
        return SPDFQ_ALPHA1_CHOSEN[model]
    name = model
    try:
        from .models import ALIASES

        name = ALIASES.get(model, model)
    except ImportError:  # pragma: no cover
        pass
    base = str(name).split("/")[-1].split(".")[0]
    for prefix, v in SPDFQ_ALPHA1.items():
        if base.startswith(prefix):
            return v
    return None


def _spdfq_model_settings(model: str) -> dict[str, Any]:
    a = spdfq_alpha1(model)
    if a is None:
        log.warning("SPDFQ: the paper gives no alpha1 for %r; using %g (chosen on the validation slices "
                    "of fmnist_vit and fmnist_vit_p7); choose it on a validation slice of yours with --set synth.w_apa=...",
                    model, SPDFQ_ALPHA1_DEFAULT)
        a = SPDFQ_ALPHA1_DEFAULT
    return {"synth.w_apa": a}


_MASKAQ_ONLY_OFF = {"synth.use_de": False, "synth.use_maa": False, "synth.use_mask": False}

register(Recipe(
    "maskaq", "MaskAQ",
    settings={"synth.objective": "maskaq", "synth.use_de": True, "synth.use_maa": True, "synth.use_mask": True},
    ablations={"no_de": {"synth.use_de": False}, "no_maa": {"synth.use_maa": False},
               "no_calib_mask": {"calib.head_mask": "none"}, "no_refresh": {"calib.refresh_every": 0}},
    summary="MaskAQ synthesis with the current Q, regenerated every R epochs; KD + masked L_HD"))
register(Recipe(
    "mimiq", "MimiQ",
    settings={"synth.objective": "mimiq", **_MASKAQ_ONLY_OFF, "calib.head_mask": "none", "calib.refresh_every": 0},
    summary="MimiQ: IHA + CE + TV synthesis with P only, once; KD + unmasked L_HD"))
register(Recipe(
    "psaq", "PSAQ-ViT",
    settings={"synth.objective": "psaq", **_MASKAQ_ONLY_OFF, **_PSAQ_OPT, "synth.restarts": 2,
              "synth.tv_form": "psaq", "synth.w_tv": 0.05, "synth.w_ce": 1.0, "synth.w_psaq": 1.0,
              "calib.refresh_every": 0},
    budget={"paper": {"num_images": 32, "synth.batch_size": 32, "synth.steps": 1000},
            "cpu": {"num_images": 32, "synth.batch_size": 32, "synth.steps": 200}},
    ptq="minmax",
    summary="PSAQ-ViT's own recipe: Adam 0.2, 2 x 500 iterations, roll 15/30 + flip, 0.05|TV-v|; min/max PTQ on 32 images"))
register(Recipe(
    "psaq_maskaq_settings", "PSAQ-ViT (MaskAQ's synthesis settings)",
    settings={"synth.objective": "psaq", **_MASKAQ_ONLY_OFF, "calib.refresh_every": 0},
    ptq="minmax",
    summary="PSAQ-ViT's entropy loss with MaskAQ's synthesis settings and budget (earlier arm); min/max PTQ"))
register(Recipe(
    "spdfq", "SPDFQ",
    settings={"synth.objective": "spdfq", **_MASKAQ_ONLY_OFF, **_PSAQ_OPT, "synth.restarts": 1,
              "synth.tv_form": "l2", "synth.w_tv": 0.05, "synth.w_ce": 1.0, "calib.refresh_every": 0},
    # The shared calibration gets the preset's image count, as every other calibrated arm (SPDFQ's
    # own 32 images feed a 24-epoch distillation that over-fits them unseen by the 4-image guard:
    # docs/RESULTS.md "SPDFQ"); its 1,000 iterations (paper) / 200 (cpu, as PSAQ-ViT's).
    budget={"paper": {"synth.batch_size": 32, "synth.steps": 1000},
            "cpu": {"synth.batch_size": 32, "synth.steps": 200}},
    model_settings=_spdfq_model_settings,
    # SPDFQ as its paper runs it (method.md §7): its 32 images, then its own quantized-network stage:
    # block-wise output reconstruction (100 Adam iterations at 4e-5, cosine) from the range search,
    # attention probabilities through the log2 quantizer wherever they are below 8 bit (linear at
    # 8); no distillation epochs.
    ablations={"own_stage": {"num_images": 32, "calib.stage": "blockwise", "quant.softmax_quant": "log2"}},
    summary="SPDFQ: attention-prior alignment + multi-semantic crops with soft labels + TV; KD + L_HD"))
register(Recipe("noise", "Gaussian noise", data="noise", settings={"calib.refresh_every": 0},
                summary="N(0, 1) images; KD + masked L_HD"))
register(Recipe("real", "real", data="real", settings={"calib.refresh_every": 0}, dense=False,
                summary="real images (upper bound, not data-free); KD + masked L_HD"))
