"""Typed, frozen configuration trees shared by every PRVR model.

A config is ``Config(model=ModelConfig, data=DataConfig, loss=LossConfig, train=TrainConfig)``.
Each ``configs/<model>/<dataset>.py`` has a ``get_config()`` returning one, with the official
hyperparameters; overrides go through :func:`apply_overrides` (``--set train.lr=1e-4``), which checks
the key exists and converts the value to the field's type, so a typo fails at load time.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from jaxprvr.errors import JaxprvrError

# Official dataset names (as the official repos' ``-d`` flag spells them) -> on-disk facts (prvr.md §1.1).
DATASETS = {
    "tvr": dict(collection="tvr", visual_feature="i3d_resnet", visual_feat_dim=3072, q_feat_size=768),
    "act": dict(collection="activitynet", visual_feature="i3d", visual_feat_dim=1024, q_feat_size=1024),
    "cha": dict(collection="charades", visual_feature="i3d_rgb_lgi", visual_feat_dim=1024, q_feat_size=1024),
}


@dataclass(frozen=True)
class ModelConfig:
    name: str = "gmmformer_v2"  # ms_sl | gmmformer | gmmformer_v2 | mtm
    hidden_size: int = 384
    n_heads: int = 4
    input_drop: float = 0.1  # dropout inside LinearLayer (before the Linear) and after the positional LN
    drop: float = 0.1  # attention-probability and hidden dropout
    q_feat_size: int = 768
    visual_feat_dim: int = 3072  # overwritten from shape.txt at run time
    max_desc_l: int = 30
    max_ctx_l: int = 128
    map_size: int = 32
    # GMMFormer v2 / MTM: temperature of the softmax over Gaussian branches (TCM).
    sft_factor: float = 0.09
    # Test-time branch weights of the fused score.
    clip_scale_w: float = 0.7
    frame_scale_w: float = 0.3
    video_scale_w: float = 0.0  # MTM's third (video-level) branch
    # GMMFormer v1 quirk: the Gaussian grid of the frame branch is built on the padded *batch* length.
    # False (official) keeps that; True builds it on the fixed max_ctx_l (docs/quirks.md).
    gmm_fixed_length: bool = False
    # MTM: (Mamba, LayerNorm) pairs in the clip and frame branches (config.num_mamba_layers).
    num_mamba_layers: int = 2
    # Compute dtype of activations and matmuls: "float32" (official, the parity suites) or "bfloat16"
    # (parameters, optimizer state, softmax/LayerNorm statistics, the Mamba scan state, scores and losses stay
    # float32; jaxprvr.models.layers.resolve_compute_dtype validates it when the model is built).
    compute_dtype: str = "float32"
    # How the K Gaussian attention branches of a GMMBlock/DyGMMBlock run (same math, same parameter layout):
    # "batched" (one vmapped computation: ~30% fewer XLA ops, 22-36% shorter compiles), "loop" (K separate
    # modules: on 2 CPU cores their independent ops keep both cores busy, a train step up to 9% faster), or "auto"
    # ("loop" on CPU, "batched" on GPU/TPU). docs/benchmarks.md has the measurements.
    branch_impl: str = "auto"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "tvr"  # tvr | act | cha
    collection: str = "tvr"
    visual_feature: str = "i3d_resnet"
    max_desc_l: int = 30
    max_ctx_l: int = 128
    map_size: int = 32
    eval_query_bsz: int = 50
    eval_context_bsz: int = 100
    prefetch: int = 2  # batches prepared ahead on a background thread (0 = synchronous)
    # Threads building training batches in parallel (batches and their order do not change); 0 = auto:
    # cpu_count // 4, between 1 and 8 (on 2 cores a pool is slower than one thread: benchmarks.prvr "input").
    workers: int = 0
    query_capacity_multiple: int = 8  # padded query count per batch is rounded up to this


@dataclass(frozen=True)
class LossConfig:
    margin: float = 0.1
    # ms_sl: unused (hard-coded 0.02/0.04 clip/frame NCE in the official code);
    # gmmformer: [clipNCE, frameNCE, QDL]; gmmformer_v2: [clipNCE, frameNCE, QDL, OT];
    # mtm: [clipNCE, frameNCE, QDL, OT, videoNCE].
    loss_factor: tuple[float, ...] = (0.05, 0.04, 8e-5, 0.09)
    # gmmformer: [m_q, alpha]; gmmformer_v2: [m_q, alpha, lambda].
    neg_factor: tuple[float, ...] = (0.15, 32.0, 1.0)
    hard_negative_start_epoch: int = 20
    hard_pool_size: int = 20
    # MTM: [clip, frame, video] triplet weights, and the weight of the text + video reconstruction losses.
    triplet_loss_factor: tuple[float, ...] = (1.0, 1.0, 1.0)
    lambda_recon: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-4
    lr_warmup_proportion: float = 0.01
    wd: float = 0.01
    batch_size: int = 128  # videos per batch (all their queries come along)
    n_epoch: int = 100
    max_es_cnt: int = 10
    seed: int = 9527
    max_grad_norm: float = 1.0  # BertAdam's per-tensor clip
    log_every: int = 10
    # MTM: exponential moving average of the weights (Opts/optimization.py EMA), updated after every step;
    # validation, test and the "best" selection then use the averaged weights.
    use_ema: bool = False
    ema_decay: float = 0.9995
    ckpt_every_steps: int = 0  # 0: save "latest" at each epoch end only


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_config_from_dict(d: dict) -> ModelConfig:
    """Rebuilds a ModelConfig saved as JSON (tuples come back as lists); unknown keys are errors."""
    hints = typing.get_type_hints(ModelConfig)
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise JaxprvrError("checkpoint config", f"model fields of {sorted(hints)}", f"unknown {unknown}")
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def make_config(model: str, dataset: str, *, model_kw=None, data_kw=None, loss_kw=None, train_kw=None) -> Config:
    """Builds a Config with the dataset facts of ``DATASETS`` filled in."""
    if dataset not in DATASETS:
        raise JaxprvrError("config", f"a dataset in {sorted(DATASETS)}", repr(dataset))
    facts = DATASETS[dataset]
    m = ModelConfig(name=model, q_feat_size=facts["q_feat_size"], visual_feat_dim=facts["visual_feat_dim"],
                    **(model_kw or {}))
    d = DataConfig(dataset=dataset, collection=facts["collection"], visual_feature=facts["visual_feature"],
                   max_desc_l=m.max_desc_l, max_ctx_l=m.max_ctx_l, map_size=m.map_size, **(data_kw or {}))
    return Config(model=m, data=d, loss=LossConfig(**(loss_kw or {})), train=TrainConfig(**(train_kw or {})))


def _convert(value: str, typ: Any, key: str):
    """Converts the text of ``--set key=value`` to the declared field type."""
    origin = typing.get_origin(typ)
    if typ is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise JaxprvrError(f"--set {key}", "a boolean (true/false)", repr(value))
    if typ in (int, float):
        try:
            return typ(value) if typ is float else int(value)
        except ValueError:
            raise JaxprvrError(f"--set {key}", f"a {typ.__name__}", repr(value)) from None
    if typ is str:
        return value
    if origin is tuple:
        (elem, _ellipsis) = typing.get_args(typ)
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(parsed, (list, tuple)):
            parsed = [parsed]
        return tuple(elem(v) if not isinstance(v, str) else _convert(v.strip(), elem, key) for v in parsed)
    raise JaxprvrError(f"--set {key}", "a field of a supported type", str(typ))


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """Applies ``section.field=value`` overrides; unknown sections or fields are errors."""
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    for key, value in items:
        parts = key.split(".")
        if len(parts) != 2:
            raise JaxprvrError(f"--set {key}", "a key of the form section.field (e.g. train.lr)", repr(key))
        section, name = parts
        sections = {f.name: f for f in dataclasses.fields(cfg)}
        if section not in sections:
            raise JaxprvrError(f"--set {key}", f"a section in {sorted(sections)}", repr(section))
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        if name not in hints:
            raise JaxprvrError(f"--set {key}", f"a field of {section}: {sorted(hints)}", repr(name))
        if isinstance(value, str):
            value = _convert(value, hints[name], key)
        sub = dataclasses.replace(sub, **{name: value})
        cfg = dataclasses.replace(cfg, **{section: sub})
    return _sync(cfg)


def _split(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise JaxprvrError("--set", "key=value", repr(text))
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _sync(cfg: Config) -> Config:
    """Keeps the length fields that model and data share equal (the model's are authoritative)."""
    d = dataclasses.replace(cfg.data, max_desc_l=cfg.model.max_desc_l, max_ctx_l=cfg.model.max_ctx_l,
                            map_size=cfg.model.map_size)
    return dataclasses.replace(cfg, data=d)
