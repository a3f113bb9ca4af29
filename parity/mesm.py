"""MESM's parity pieces (lntzm/MESM @ 8501bdea, AAAI'24): conversion of the official checkpoint files both ways and
every row of ``python -m parity.check --model mesm``.

Flax model: :class:`jaxprvr.models.mesm.MESM`; twin: :class:`torch_ref.mesm.MESM` (+ :mod:`torch_ref.mesm_loss`);
key table: :mod:`parity.mesm_keys` (273 keys, 289 with TACoS's ``T2VEncoder_TwoMLP``; kinds ``linear`` incl. the
fused ``in_proj_weight``, ``bias``, ``layernorm``, ``embedding``, ``param``).

Official files (``train.py`` L185-214, ``eval.py`` L505-522, ``utils/config.py`` L155-246):

* ``model_{split}_best.ckpt`` / ``model_latest.ckpt``: ``{"model": state_dict without text_encoder.*, "optimizer",
  "lr_scheduler", "epoch": the 0-based epoch index, "opt": argparse.Namespace}``. The pickled ``opt`` is the parsed
  one: ``v_feat_dim`` already holds the TEF's ``+ 2`` (``utils/config.py`` L242-243 run after ``display_save``) and
  ``device`` is a ``torch.device``;
* ``opt.json`` beside it (``display_save``, written BEFORE the ``+ 2``: ``v_feat_dim`` is the features' width);
  ``eval.py`` (``TestOptions``) rebuilds the model from it, adds the 2 again and loads ``model_test_best.ckpt``
  (QVHighlights ``model_val_best.ckpt``) with a strict ``load_state_dict`` (the CLIP text weights re-inserted).

Conversion (``python -m parity.convert {torch2jax,jax2torch} --model mesm --config C ...``):

* ``torch2jax FILE OUT``: the official checkpoint, read without running its pickle (:func:`read_official`: a
  restricted unpickler that knows tensors, ``argparse.Namespace`` and ``torch.device``; ``opt.json`` beside the file
  when the file has no ``opt``) -> ``OUT/ckpt/best`` (float32 params, bit-exact) + ``OUT/config.json``. The
  official options (the file's ``opt``, else ``opt.json``) decide the architecture, loss, recipe and evaluation
  fields (:data:`OPT_FIELDS`); ``--set`` overrides are applied after them; the fields where the options differ from
  ``--config`` are listed in the result (``from_opt``). ``--clip-weights FILE`` (MESM's ``clip_text_encoder.pth`` or
  OpenAI's ``ViT-B-32.pt``; also ``--set model.clip=FILE``) is checked (its text width must be ``t_feat_dim``) and
  recorded as ``model.clip``. ``meta``: the epoch (``best_epoch`` = the official 0-based epoch, ``next_epoch`` =
  epoch + 1). The AdamW moments are not converted (the file's ``optimizer`` is ignored; the result says so).
* ``jax2torch RUN OUT.ckpt``: ``{"model": state_dict (official key order, float32), "epoch": N}`` and ``opt.json``
  beside it (:func:`official_options`: the official option names, ``v_feat_dim`` without the TEF's 2) -- what
  ``eval.py --trained_result_dir DIR`` loads when ``OUT`` is ``DIR/model_test_best.ckpt`` (QVHighlights
  ``model_val_best.ckpt``). The state dict is loaded strictly into :class:`torch_ref.mesm.MESM` before writing.
  Both directions are bit-exact.

``parity.check`` (:class:`MESMCheck`): see its docstring and docs/parity.md (MESM).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import pickle
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxprvr.errors import JaxprvrError
from parity import mesm_keys as K
from parity.base import FamilyCheck, FamilySpec, OwnStages, checkpoint_config, prepare_out_dir
from parity.keys import to_torch
from parity.rows import Row, as_numpy, close_row, join_notes, nonfinite

_np = as_numpy
QUIRK_BITES = 1e-3  # the head-major mask "bites" on a batch when it moves an output by more than this
TIE = 1e-6  # two scores this close may order either way in the two frameworks (metrics rows)
NO_GRAD_REASONS = {
    "txt_position_embed.": "built, unused without use_txt_pos (model.py L169-172, L225-228)",
    "ss_reconstructor.output_sent_proj.": "projed_recon_feat enters no loss term (model.py L486-487, criterion.py)",
}
DEC0_SELF_ATTN = ("decoder layer 0's self-attention: its target is zero, so every value is sa_v_proj's bias and the "
                  "output does not depend on the attention weights")
KEY_BIAS = ("a constant added to every key of a query's softmax (the key projection's bias): zero in exact "
            "arithmetic (softmax shift-invariance)")

# ---------------------------------------------------------------------------------------------- official options

# official option name -> (config section, field). v_feat_dim is the features' width (opt.json's value).
OPT_FIELDS = {
    **{k: ("model", k) for k in (
        "v_feat_dim", "t_feat_dim", "use_tef", "tokenizer_type", "load_vocab_pkl", "hidden_dim", "nheads",
        "dim_feedforward", "dropout", "input_dropout", "n_input_proj", "num_recfw_layers", "t2v_layers", "enc_layers",
        "dec_layers", "num_recss_layers", "num_queries", "share_MLP", "rec_fw", "rec_ss", "aux_loss", "use_txt_pos",
        "max_words_l", "max_video_l", "vocab_size")},
    **{k: ("loss", k) for k in (
        "set_cost_span", "set_cost_giou", "set_cost_class", "loss_span_coef", "loss_giou_coef", "loss_label_coef",
        "loss_saliency_coef", "eos_coef", "loss_recfw_coef", "loss_recss_coef", "iou_gamma", "recss_tau", "rank_coef",
        "use_triplet", "saliency_margin")},
    "lr": ("train", "lr"), "weight_decay": ("train", "wd"), "lr_drop": ("train", "lr_drop"),
    "gamma": ("train", "lr_gamma"), "grad_clip": ("train", "max_grad_norm"), "seed": ("train", "seed"),
    "batch_size": ("train", "batch_size"), "n_epoch": ("train", "n_epoch"), "max_es_cnt": ("train", "max_es_cnt"),
    "stop_score": ("train", "stop_score"),
    **{k: ("data", k) for k in ("clip_len", "contra_samples", "max_gather_size", "max_windows", "eval_batch_size",
                                "max_ts_val")},
}


def official_options(cfg) -> dict:
    """The official ``opt.json`` of a config (``utils/config.py`` option names, the values ``display_save`` writes:
    ``v_feat_dim`` WITHOUT the TEF's 2, ``device`` a string), with the dataset's files as the official config json
    names them (``./data/...``)."""
    from jaxprvr.tasks.vmr_detr import facts_of

    f = facts_of(cfg)
    out: dict[str, Any] = {"exp_id": f.variant, "dataset_name": f.official_name, "ann_path": f"./{f.ann_path}",
                           "feat_files": [f"./{p}" for p in f.feat_files]}
    for name, (section, field) in OPT_FIELDS.items():
        v = getattr(getattr(cfg, section), field)
        out[name] = list(v) if isinstance(v, tuple) else v
    out.update(bpe_path="./pretrained_models/bpe_simple_vocab_16e6.txt.gz", normalize_video=True, normalize_txt=True,
               num_workers=8, pin_memory=True, device="cuda", text_model_path=f"./{f.text_model_path}",
               pre_norm=False, position_embedding="sine", span_loss_type="l1", resume=None, resume_all=False,
               start_epoch=None, eval_untrained=False, save_interval=50, result_root=f"./results/{f.official_name}",
               ctx_mode=None, eval_epoch_interval=1, sort_results=True, nms_thd=-1, max_before_nms=10,
               max_after_nms=10, is_inference=False)
    return out


def config_from_options(cfg, opt: Mapping, overrides=()) -> tuple[Any, dict]:
    """``cfg`` with the fields of the official options ``opt`` (:data:`OPT_FIELDS`; ``opt["v_feat_dim"]`` the
    features' width, as in opt.json), then ``overrides`` (``--set``). Returns ``(cfg, {"section.field": [config
    value, option value]} of the fields the options changed)``."""
    from jaxprvr.config import apply_overrides

    changed, sets = {}, {}
    for name, (section, field) in OPT_FIELDS.items():
        if name not in opt or opt[name] is None:
            continue
        old = getattr(getattr(cfg, section), field)
        new = opt[name]
        if isinstance(old, bool):
            new = bool(new)
        elif isinstance(old, int) and not isinstance(old, bool):
            if float(new) != int(float(new)):
                raise JaxprvrError(f"official option {name}", "an integer", repr(new))
            new = int(new)
        elif isinstance(old, float):
            new = float(new)
        if new != old:
            changed[f"{section}.{field}"] = [old, new]
            sets[f"{section}.{field}"] = new
    out = apply_overrides(cfg, sets) if sets else cfg
    return apply_overrides(out, list(overrides)), changed


# ---------------------------------------------------------------------------------------------- official files


class _Options:
    """``argparse.Namespace`` in an official checkpoint, read as a plain attribute bag (no code runs)."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"an argparse.Namespace whose state is a {type(state).__name__}")
        self.attrs = dict(state)


def _device(*args):
    """``torch.device`` in a pickle -> its text (``"cuda"``, ``"cuda:0"``)."""
    return ":".join(str(a) for a in args if a is not None)


def _ckpt_unpickler():
    from jaxprvr.data import torch_pt

    class Unpickler(torch_pt._StateUnpickler):
        """:func:`jaxprvr.data.torch_pt.read_state_dict`'s restricted unpickler plus the two globals of an official
        MESM checkpoint's ``opt``: ``argparse.Namespace`` (an attribute bag) and ``torch.device`` (its text)."""

        def find_class(self, module: str, name: str):
            if (module, name) == ("argparse", "Namespace"):
                return _Options
            if (module, name) == ("torch", "device"):
                return _device
            return super().find_class(module, name)

    return Unpickler


def _tensors(obj, path):
    """Replaces every tensor spec of a nested structure by its numpy array."""
    from jaxprvr.data import torch_pt

    if isinstance(obj, torch_pt._TensorSpec):
        return torch_pt._view(obj, path)
    if isinstance(obj, dict):
        return type(obj)((k, _tensors(v, path)) for k, v in obj.items()) if isinstance(obj, OrderedDict) else {
            k: _tensors(v, path) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v, path) for v in obj)
    return obj


def read_official(path) -> dict:
    """An official MESM checkpoint file -> ``{"model": OrderedDict[str, np.ndarray] (``module.`` stripped),
    "epoch": int | None, "opt": dict | None (the pickled Namespace: ``v_feat_dim`` incl. the TEF's 2),
    "opt_json": dict | None (``opt.json`` beside the file), "optimizer": bool}`` (a bare state dict is accepted as
    ``model``). Read with a restricted unpickler (tensors, ``OrderedDict``, ``argparse.Namespace``,
    ``torch.device``): nothing in the file runs."""
    from jaxprvr.data import torch_pt

    path = Path(path)
    expected = "an official MESM checkpoint ({model, optimizer, lr_scheduler, epoch, opt}, torch.save)"
    if not path.is_file():
        raise JaxprvrError(path, expected, "no such file")
    if not zipfile.is_zipfile(path):
        raise JaxprvrError(path, expected + " in the torch-zip format (torch >= 1.6)", "not a zip archive")
    root = torch_pt._unpickle(path, _ckpt_unpickler(), expected,
                              (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, AttributeError, TypeError))
    if not isinstance(root, dict):
        raise JaxprvrError(path, expected, f"a pickled {type(root).__name__}")
    model = root.get("model", root if all(isinstance(v, torch_pt._TensorSpec) for v in root.values()) else None)
    if not isinstance(model, dict) or not model:
        raise JaxprvrError(path, expected, f"no 'model' state dict (keys {sorted(root)[:6]})")
    sd = OrderedDict()
    for k, v in model.items():
        if not isinstance(v, torch_pt._TensorSpec):
            raise JaxprvrError(path, "tensors in 'model'", f"{k}: a {type(v).__name__}")
        sd[k[7:] if k.startswith("module.") else k] = torch_pt._view(v, path)
    opt = root.get("opt")
    if isinstance(opt, _Options):
        opt = _tensors(opt.attrs, path)
    elif isinstance(opt, dict):
        opt = _tensors(opt, path)
    elif opt is not None:
        raise JaxprvrError(path, "'opt' an argparse.Namespace or a dict", f"a {type(opt).__name__}")
    opt_json = None
    side = path.parent / "opt.json"
    if side.is_file():
        try:
            opt_json = json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise JaxprvrError(side, "the official opt.json (JSON)", f"{e}") from None
    epoch = root.get("epoch")
    return {"model": sd, "epoch": None if epoch is None else int(epoch), "opt": opt, "opt_json": opt_json,
            "optimizer": isinstance(root.get("optimizer"), dict)}


def options_of(obj: Mapping, where) -> dict | None:
    """The official options of a :func:`read_official` result as opt.json holds them (``v_feat_dim`` without the
    TEF's 2): the file's ``opt`` (its ``v_feat_dim - 2`` when ``use_tef``), else ``opt.json``, else None."""
    opt = obj.get("opt")
    if opt is not None:
        opt = dict(opt)
        if opt.get("use_tef") and opt.get("v_feat_dim") is not None:
            opt["v_feat_dim"] = int(opt["v_feat_dim"]) - 2  # utils/config.py L242-243 ran before the save
        return opt
    return obj.get("opt_json")


def save_official(path, cfg, state_dict: Mapping, *, epoch: int = 0, optimizer=None, lr_scheduler=None,
                  with_opt: bool = True, opt_json: bool = True) -> Path:
    """Writes an official checkpoint as ``train.py`` L185-192 does: ``{"model", "optimizer", "lr_scheduler",
    "epoch", "opt"}`` (``opt``: the parsed Namespace, ``v_feat_dim + 2`` with TEF, ``device`` a ``torch.device``;
    ``optimizer`` / ``lr_scheduler`` state dicts or None) and, with ``opt_json``, ``opt.json`` beside it
    (:func:`official_options`)."""
    import torch

    from parity.convert import to_tensor
    from parity.prvr import _atomic

    opts = official_options(cfg)
    obj: dict[str, Any] = {"model": OrderedDict((k, v if torch.is_tensor(v) else to_tensor(np.asarray(v)))
                                                for k, v in state_dict.items())}
    if optimizer is not None:
        obj["optimizer"] = optimizer
    if lr_scheduler is not None:
        obj["lr_scheduler"] = lr_scheduler
    obj["epoch"] = int(epoch)
    if with_opt:
        parsed = dict(opts, device=torch.device("cpu"))
        if parsed["use_tef"]:
            parsed["v_feat_dim"] += 2
        obj["opt"] = argparse.Namespace(**parsed)
    out = _atomic(path, lambda tmp: torch.save(obj, tmp))
    if opt_json:
        (out.parent / "opt.json").write_text(json.dumps(opts, indent=4))
    return out


# ---------------------------------------------------------------------------------------------- the spec


def make_table(model_cfg) -> tuple:
    return K.make_table(model_cfg)


def twin_params(model_cfg, twin, dtype=None) -> dict:
    """The twin's weights as Flax params (numpy, each tensor's dtype unless ``dtype``)."""
    sd = OrderedDict((k, v.detach().cpu()) for k, v in twin.state_dict().items())
    return K.torch_to_params(sd, model_cfg, dtype=dtype, check_shapes=False)


def _flatten(tree) -> dict:
    from parity.convert import flatten

    return flatten(tree)


def _nltk_tagger() -> bool:
    try:
        import nltk

        for r in ("taggers/averaged_perceptron_tagger_eng", "taggers/averaged_perceptron_tagger"):
            try:
                nltk.data.find(r)
                return True
            except LookupError:
                pass
    except ImportError:
        pass
    return False


@dataclasses.dataclass
class Case:
    """One batch in both layouts: ``official`` (the official collate dict, numpy: the twin's input), ``static``
    (the padded static dict the Flax model and the loss read, ``words_feat`` filled), ``words`` (the text features
    the twin gets, ``(B, Lw, Dt)``; None for glove.pkl, whose vectors are the official ``words_id``), ``items`` (the
    query rows of each item, batch order)."""

    official: dict
    static: dict
    words: np.ndarray | None
    items: tuple

    @property
    def n_rows(self) -> int:
        return int(self.static["num_rows"])

    def flax(self) -> dict:
        from jaxprvr.tasks.vmr_detr import BATCH_KEYS

        return {k: self.static[k] for k in BATCH_KEYS if k in self.static}


class _CheckText:
    """:class:`jaxprvr.tasks.vmr_detr.TextFeatures` of a random CLIP tower (``model.clip = ""``: seed 0, the
    ``model.clip_*`` sizes, ``model.clip_dtype``), initialised by one jitted call; the same features per token row
    (the ``last_hidden_state``, float32), cached per distinct row."""

    kind = "CLIP"

    def __init__(self, cfg):
        import jax
        import jax.numpy as jnp

        from jaxprvr.models.clip import PRECISIONS, CLIPDims, TextTower

        m = cfg.model
        dims = CLIPDims(embed_dim=m.clip_width, text_width=m.clip_width, text_layers=m.clip_layers,
                        text_heads=m.clip_heads, vocab_size=m.clip_vocab_size,
                        context_length=m.clip_context_length).validate("model.clip_*")
        if dims.text_width != m.t_feat_dim:
            raise JaxprvrError("model.clip_width", f"the text width model.t_feat_dim = {m.t_feat_dim}",
                               str(dims.text_width))
        if m.clip_dtype not in ("fp16", "fp32"):
            raise JaxprvrError("model.clip_dtype", "fp16 | fp32", repr(m.clip_dtype))
        tower = TextTower(dims, PRECISIONS[m.clip_dtype])
        self.dims = dims
        self.params = jax.jit(lambda k: tower.init(k, jnp.zeros((1, 4), jnp.int32))["params"])(jax.random.PRNGKey(0))
        self._run = jax.jit(lambda p, ids: tower.apply({"params": p}, ids)["hidden"].astype(jnp.float32))
        self.cache: dict[bytes, np.ndarray] = {}

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        rows = [r.tobytes() for r in ids]
        todo = list(dict.fromkeys(r for r in rows if r not in self.cache))
        if todo:
            block = np.stack([np.frombuffer(r, ids.dtype) for r in todo])
            n, width = len(block), ids.shape[0]
            pad = -(-n // width) * width
            block = np.concatenate([block, np.zeros((pad - n, block.shape[1]), block.dtype)])
            out = np.concatenate([np.asarray(self._run(self.params, block[i:i + width]))
                                  for i in range(0, pad, width)])
            for r, v in zip(todo, out[:n]):
                self.cache[r] = v
        return np.stack([self.cache[r] for r in rows])


@dataclasses.dataclass
class _StaticOnly:
    static: dict


class Spec(OwnStages, FamilySpec):
    name = "mesm"
    check_class = "MESMCheck"
    official_layout = "{model, optimizer, lr_scheduler, epoch, opt} (model_<split>_best.ckpt) + opt.json"

    @property
    def table(self):
        from jaxprvr.config import load_config

        return make_table(load_config("qvhighlights", "mesm").model)

    def table_for(self, model_cfg):
        return make_table(model_cfg)

    def read_variables(self, path, cfg, overrides=()):
        """``jaxprvr.load``: MESM's ``{model, optimizer, lr_scheduler, epoch, opt}`` (its ``opt`` / ``opt.json`` fix
        the model's options, as ``parity.convert torch2jax --model mesm`` reads them)."""
        from parity import mesm_keys as K

        obj = read_official(path)
        opt = options_of(obj, path)
        if opt is not None:
            cfg, _ = config_from_options(cfg, opt, list(overrides))
        return cfg, K.torch_to_params(obj["model"], cfg.model, dtype=np.float32, where=str(path)), {}

    def describe(self, cfg) -> str:
        m = cfg.model
        enh = "TwoMLP" if not m.share_MLP else "shared MLP"
        return (f"hidden {m.hidden_dim}, {m.nheads} heads, ffn {m.dim_feedforward}, layers enhancer "
                f"{m.num_recfw_layers} ({enh}) / aligner {m.t2v_layers} / enc {m.enc_layers} / dec {m.dec_layers} / "
                f"SS {m.num_recss_layers}, "
                f"{m.num_queries} queries, video {m.v_feat_dim}+{2 if m.use_tef else 0}, text {m.t_feat_dim} "
                f"({m.tokenizer_type}{', glove.pkl' if m.load_vocab_pkl else ''}), t2v_mask {m.t2v_mask}, "
                f"{len(make_table(m))} keys")

    # -- gradients
    def zero_parts(self, cfg) -> list[tuple[str, Any, str]]:
        """The gradients that are zero in exact arithmetic: ``(torch name pattern, entries (a slice, None = all),
        reason)``. The key third of every ``nn.MultiheadAttention`` ``in_proj_bias`` and the decoder's key biases
        (softmax shift-invariance); without attention dropout also decoder layer 0's self-attention query/key
        projections (its target is zero, so every value is ``sa_v_proj``'s bias and the output does not depend on
        the attention weights, transformer.py L346-348, L734-754)."""
        d = cfg.model.hidden_dim
        parts = [(r".*\.self_attn\.in_proj_bias", slice(d, 2 * d), KEY_BIAS),
                 (r"transformer\.decoder\.layers\.\d+\.(sa_kcontent_proj|sa_kpos_proj|ca_kcontent_proj|ca_kpos_proj)"
                  r"\.bias", None, KEY_BIAS)]
        if cfg.model.dropout == 0.0:
            parts.append((r"transformer\.decoder\.layers\.0\.(sa_qcontent_proj|sa_qpos_proj|sa_kcontent_proj|"
                          r"sa_kpos_proj)\.(weight|bias)", None, DEC0_SELF_ATTN))
        return parts

    def zero_gradients(self, cfg) -> tuple:
        """:meth:`zero_parts` as :class:`parity.prvr.ZeroGrad` s (``partial`` where only some entries are zero): the
        train stage bounds their AdamW drift by :meth:`adam_step_bound`."""
        from parity.prvr import ZeroGrad

        return tuple(ZeroGrad(p, r, partial=sl is not None) for p, sl, r in self.zero_parts(cfg))

    def no_grad_names(self, cfg) -> dict:
        """The tensors the official loss never gives a gradient (``TASK``'s ``trainable_mask`` False): torch name ->
        reason."""
        from jaxprvr.tasks import vmr_detr
        from parity.convert import unflatten

        tab = make_table(cfg.model)
        zeros = unflatten({e.flax: 0 for e in tab})  # the parameter tree's structure
        mask = _flatten(vmr_detr.trainable_mask(zeros, cfg.model))
        return {e.torch: next((r for k, r in NO_GRAD_REASONS.items() if e.torch.startswith(k)), "no official gradient")
                for e in tab if not mask[e.flax]}

    def adam_step_bound(self, cfg, steps: int, lrs) -> float:
        """The most two AdamW runs from the same weights can move one entry apart in ``steps`` steps whatever their
        gradients (bias-corrected moments, Cauchy-Schwarz on the two moving averages), twice (:mod:`parity.mrnet`)."""
        b1, b2 = cfg.train.adam_b1, cfg.train.adam_b2
        total = 0.0
        for t in range(1, steps + 1):
            ratio = ((1 - b1) / math.sqrt(1 - b2) * math.sqrt(sum((b1 * b1 / b2) ** k for k in range(t)))
                     * math.sqrt(1 - b2 ** t) / (1 - b1 ** t))
            total += float(lrs[t - 1]) * ratio
        return 2.0 * total * (1.0 + 1e-3)

    def no_dropout(self, cfg):
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0, input_dropout=0.0))

    # -- inputs
    def check_config(self, cfg):
        """The config a check runs: the text tower of ``model.clip = ""`` at the text width (``clip_width =
        t_feat_dim``, at most 2 layers, 2 heads when the width allows); NLTK's tagger only where its data is
        installed (else the rule tagger: the POS weights only feed the injected MLM positions)."""
        m, d = cfg.model, cfg.data
        if m.tokenizer_type == "CLIP" and not m.clip:
            heads = 2 if m.t_feat_dim % 2 == 0 and m.t_feat_dim >= 4 else 1
            m = dataclasses.replace(m, clip_width=m.t_feat_dim, clip_heads=heads, clip_layers=min(m.clip_layers, 2))
        if d.pos_tagger == "nltk" and not _nltk_tagger():
            d = dataclasses.replace(d, pos_tagger="rule")
        return dataclasses.replace(cfg, model=m, data=d)

    def synthetic_root(self, cfg, out_dir, seed: int = 0, sizes=None) -> Path:
        """A synthetic dataset of the config's (dataset, variant) at the config's feature widths, small."""
        from jaxprvr.data import synthetic_mesm as syn
        from jaxprvr.tasks.vmr_detr import facts_of

        f = facts_of(cfg)
        dims = {Path(p).name.split(".")[0]: int(w) for p, w in zip(f.feat_files, f.feat_dims)}
        default = {"charades": {"train": 6, "test": 6}, "charades_cg": {"train": 6, "novel_composition": 4,
                                                                      "novel_word": 4, "test_trivial": 3},
                   "charades_cd": {"train": 6, "val": 3, "test_iid": 3, "test_ood": 4},
                   "qvhighlights": {"train": 5, "val": 4, "test": 2}, "tacos": {"train": 3, "val": 2, "test": 2}}
        return syn.write(f.dataset, f.variant, out_dir, sizes=sizes or default[f.dataset], seed=seed, feat_dims=dims)

    def open_split(self, cfg, root, split: str):
        """The task's :class:`~jaxprvr.tasks.vmr_detr.MESMSet` of ``split``; a random CLIP tower (``model.clip =
        ""``) is initialised by one compiled program (:class:`_CheckText`) instead of op by op."""
        from unittest import mock

        from jaxprvr.tasks import vmr_detr as V

        original = V.TextFeatures

        def text(cfg_, root_, tok=None):
            if cfg_.model.tokenizer_type == "CLIP" and not cfg_.model.clip and not cfg_.model.load_vocab_pkl:
                return _CheckText(cfg_)
            return original(cfg_, root_, tok)

        with mock.patch.object(V, "TextFeatures", text):
            return V.MESMSet(cfg, root, split)

    def make_batch(self, cfg, n_items: int = 3, seed: int = 0, root=None, ds=None, order=None,
                   rows: int | None = None) -> Case:
        """A batch of ``n_items`` items of the synthetic (or ``root``'s) train split, up to 3 queries each (items
        with several queries first, drawn by ``seed``; ``order``: the items' order), collated officially
        (:meth:`jaxprvr.data.mesm.MESMSplit.collate`) and padded statically with ``rows`` row slots (default 3
        ``n_items`` + 1: at least one padding row beyond the real rows), the split's frame capacity, ``max_words_l``
        words and (QVHighlights) the windows and ``ss_video_feat``; the text features of the task's
        :class:`~jaxprvr.tasks.vmr_detr.TextFeatures` (CLIP tower / GloVe table), zero on padding rows."""
        from jaxprvr.data.mesm import to_static

        if ds is None:
            if root is None:
                raise JaxprvrError("MESM make_batch", "a data root or an opened split", "neither")
            ds = self.open_split(cfg, root, "train")
        rng = np.random.default_rng(seed)
        items = list(ds.ds.items)
        multi = [i for i in rng.permutation(len(items)) if len(items[i].rows) > 1]
        single = [i for i in rng.permutation(len(items)) if len(items[i].rows) == 1]
        chosen = (multi + single)[:n_items]
        if len(chosen) < 2:
            raise JaxprvrError("MESM make_batch", "a split with at least 2 items", f"{len(items)}")
        groups = [tuple(items[i].rows[:3]) for i in chosen]
        if order is not None:
            groups = [groups[i] for i in order]
        official = ds.ds.collate(groups, np.random.default_rng(seed + 1))
        b = len(official["qid"])
        caps = ds.ds.capacities(True)
        caps = dataclasses.replace(caps, rows=rows or (3 * n_items + 1), items=max(caps.items, n_items))
        static = to_static(official, caps)
        static = ds.static(_StaticOnly(static))
        words = None
        if not (cfg.model.tokenizer_type == "GloVeNLTK" and cfg.model.load_vocab_pkl):
            words = np.asarray(static["words_feat"][:b])
        return Case(official, static, words, tuple(groups))


SPEC = Spec()


# ---------------------------------------------------------------------------------------------- conversion CLI


def _clip_weights(args, cfg):
    """``--clip-weights FILE`` (when the CLI has it) or ``model.clip``: checked and recorded as an absolute path."""
    from jaxprvr.config import apply_overrides

    path = getattr(args, "clip_weights", None) or cfg.model.clip
    if not path:
        return cfg, None
    p = Path(path).expanduser()
    if not p.exists():
        raise JaxprvrError(p, "CLIP weights (clip_text_encoder.pth, ViT-B-32.pt or a clip2jax folder)", "no such file")
    from parity.clip import load_clip_weights

    dims, _, _ = load_clip_weights(p)
    if dims.text_width != cfg.model.t_feat_dim:
        raise JaxprvrError(p, f"a CLIP text tower of width model.t_feat_dim = {cfg.model.t_feat_dim}",
                           f"width {dims.text_width}")
    cfg = apply_overrides(cfg, {"model.clip": str(p.absolute())})
    return cfg, str(p.absolute())


def torch2jax(args, cfg) -> dict:
    """``python -m parity.convert torch2jax --model mesm --config C FILE OUT`` (module docstring)."""
    from jaxprvr.checkpoint import Checkpoints
    from parity.convert import flatten

    src = Path(args.input)
    obj = read_official(src)
    opt = options_of(obj, src)
    from_opt = {}
    if opt is not None:
        cfg, from_opt = config_from_options(cfg, opt, getattr(args, "overrides", ()))
    cfg, clip = _clip_weights(args, cfg)
    params = K.torch_to_params(obj["model"], cfg.model, dtype=np.float32, where=str(src))
    dtypes = sorted({str(a.dtype) for a in obj["model"].values()})
    out, ckpt_dir = prepare_out_dir(args.out_dir, args.force)
    epoch = obj["epoch"]
    meta = dict(config=cfg.to_dict(), source=str(src.absolute()), source_layout=SPEC.official_layout,
                source_dtypes=dtypes, epoch=epoch, best_epoch=-1 if epoch is None else epoch,
                next_epoch=0 if epoch is None else epoch + 1, global_step=0)
    ckpts = Checkpoints(ckpt_dir, slots=("best",))
    ckpts.save("best", 0, params, None, meta=meta)
    ckpts.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return dict(model=cfg.model.name, input=str(src), out=str(out), tensors=len(make_table(cfg.model)),
                parameters=int(sum(np.size(a) for a in flatten(params).values())), source_dtypes=dtypes,
                epoch=epoch, options="opt" if obj["opt"] is not None else ("opt.json" if opt is not None else None),
                from_opt=from_opt, clip=clip, optimizer_state="not converted (the AdamW moments stay in the file)"
                if obj["optimizer"] else None, slots=["best"])


def jax2torch(args, cfg) -> dict:
    """``python -m parity.convert jax2torch --model mesm --config C RUN OUT.ckpt`` (module docstring)."""
    import jax
    import torch

    from jaxprvr.checkpoint import load_params, read_meta, resolve_params_dir
    from jaxprvr.models import build_model
    from jaxprvr.train import init_variables
    from parity.convert import to_tensor
    from parity.prvr import _atomic
    from torch_ref.mesm import build_mesm

    step_dir = resolve_params_dir(args.input)
    meta = read_meta(step_dir)
    cfg = checkpoint_config(step_dir, cfg, args.overrides)
    saved_data = meta.get("config", {}).get("data", {})
    from jaxprvr.tasks.vmr_detr import MESMTask

    keep = {f"data.{k}": (tuple(v) if isinstance(v, list) else v) for k, v in saved_data.items()
            if k in MESMTask.checkpoint_data_fields}
    if keep:
        from jaxprvr.config import apply_overrides

        cfg = apply_overrides(apply_overrides(cfg, keep), list(args.overrides))
    model = build_model(cfg.model)
    abstract, _ = jax.eval_shape(lambda: init_variables(model, cfg, jax.random.PRNGKey(0)))
    params, _ = load_params(step_dir, abstract)
    sd = K.params_to_torch(jax.device_get(params), cfg.model, where=str(step_dir))
    tensors = OrderedDict((k, to_tensor(a)) for k, a in sd.items())
    with torch.random.fork_rng():
        twin = build_mesm(cfg.model, cfg.loss)
    twin.load_state_dict(tensors, strict=True)  # what eval.py's load_state_dict does (text_encoder.* re-inserted)
    epoch = meta.get("best_epoch", meta.get("epoch"))
    if epoch is None or int(epoch) < 0:
        epoch = max(int(meta.get("next_epoch", 1)) - 1, 0)
    epoch = int(epoch)
    path = _atomic(args.output, lambda tmp: torch.save({"model": tensors, "epoch": epoch}, tmp))
    opts = official_options(cfg)
    (path.parent / "opt.json").write_text(json.dumps(opts, indent=4))
    return dict(model=cfg.model.name, input=str(step_dir), output=str(path), opt_json=str(path.parent / "opt.json"),
                tensors=len(tensors), layout='{"model": state_dict, "epoch": N} + opt.json', epoch=epoch,
                v_feat_dim=opts["v_feat_dim"])


# ---------------------------------------------------------------------------------------------- parity.check

_COMPILED: dict = {}  # (kind, config, ...) -> jitted function, shared by the checks of one process


def clear_compiled(*kinds: str) -> None:
    """Forgets the compiled programs (of ``kinds``: ``"fwd"``, ``"block"``, ``"loss"``, ``"match"``, ``"grad"``,
    ``"update"``, ``"draw"``; default all): a test that patches the model must trace it again."""
    for k in list(_COMPILED):
        if not kinds or k[0] in kinds:
            del _COMPILED[k]


def _compiled(key, make):
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = make()
    return fn


def _cut(j, t) -> np.ndarray:
    """The Flax (static) array cut to the twin's (dynamic) shape: a prefix on every axis."""
    j, t = np.asarray(j), _np(t)
    if j.ndim != t.ndim or any(a < b for a, b in zip(j.shape, t.shape)):
        return j
    return j[tuple(slice(0, s) for s in t.shape)]


def _pad_to(x, shape, fill=0) -> np.ndarray:
    """A twin array zero-padded (``fill``) to the static ``shape`` (the prefix of every axis)."""
    x = _np(x)
    out = np.full(shape, fill, x.dtype)
    out[tuple(slice(0, s) for s in x.shape)] = x
    return out


def _prefix_index(flax_shape):
    """:class:`torch_ref.dropout.Draw` ``index``: the counters of a twin tensor (the dynamic batch) inside the Flax
    draw of ``flax_shape`` (the static padded batch), element ``(i, j, ...)`` at the same position of the padded
    array (every twin tensor of MESM is a prefix of its Flax counterpart on every axis: rows, frames, words, slots,
    heads)."""

    def index(shape, device):
        import torch

        if len(shape) != len(flax_shape) or any(a > b for a, b in zip(shape, flax_shape)):
            from torch_ref.dropout import SharedDropoutError

            raise SharedDropoutError(f"a twin dropout of shape {tuple(shape)} is no prefix of the Flax draw "
                                     f"{tuple(flax_shape)}")
        out = torch.zeros(tuple(shape), dtype=torch.int64, device=device)
        stride = 1
        for ax in range(len(shape) - 1, -1, -1):
            view = [1] * len(shape)
            view[ax] = shape[ax]
            out = out + torch.arange(shape[ax], dtype=torch.int64, device=device).reshape(view) * stride
            stride *= int(flax_shape[ax])
        return out

    return index


def _indices_to_jax(ind, rows: int, windows: int, multi: bool) -> np.ndarray:
    """The twin's matching (single-moment ``(B, 2) [query, 0]``; QVH a list of ``(query_idx, window_idx)``) ->
    the ``(R, W)`` query-per-window array of :mod:`jaxprvr.losses.mesm` (-1: none)."""
    out = np.full((rows, windows), -1, np.int32)
    if multi:
        for b, (i, j) in enumerate(ind):
            out[b, _np(j).astype(int)] = _np(i).astype(int)
    else:
        a = _np(ind).astype(int)
        out[:len(a), 0] = a[:, 0]
    return out


def _indices_to_twin(idx, n_rows: int, multi: bool):
    """``(R, W)`` query-per-window -> the twin's format (single: ``(B,)`` queries; QVH: ``(query_idx,
    window_idx)`` per row, windows ascending)."""
    idx = np.asarray(idx)
    if not multi:
        return idx[:n_rows, 0].astype(np.int64)
    out = []
    for b in range(n_rows):
        w = np.flatnonzero(idx[b] >= 0)
        out.append((idx[b, w].astype(np.int64), w.astype(np.int64)))
    return out


def _dict_row(stage, j: dict, t: dict, note="", explained=None) -> Row:
    """Metric dicts: identical (``explained``: ``(ok, note)`` of the float32 rounding explanation when not)."""
    missing = [k for k in t if k not in j]
    if missing:
        return Row("metrics", stage, float("inf"), float("inf"), "identical", False, f"keys missing in jax: {missing}")
    vals = [(float(j[k]), float(t[k])) for k in t if t[k] is not None and j[k] is not None]
    nones = [k for k in t if (t[k] is None) != (j[k] is None)]
    bad = nonfinite("metrics", jax=np.asarray([a for a, _ in vals]), torch=np.asarray([b for _, b in vals]))
    d = max([abs(a - b) for a, b in vals] or [0.0])
    same = d == 0.0 and not nones and not bad
    tol = "identical"
    if not same and explained is not None:
        ok, why = explained
        tol += " (float32: or every differing submission row a rounding-boundary crossing)"
        return Row("metrics", stage, d, d, tol, ok and not bad and not nones, join_notes(bad, why, note))
    return Row("metrics", stage, d, d, tol, same, join_notes(bad, f"None differs: {nones}" if nones else "", note))


class MESMCheck(FamilyCheck):
    """The rows of ``parity.check --model mesm`` (docs/parity.md, MESM). The twin runs on the CPU.

    Inputs: a small synthetic dataset of the config's (dataset, variant) at its feature widths (or ``--data-root``),
    batches of ``--videos`` items with up to 3 queries each (:meth:`Spec.make_batch`: the official collate dict for
    the twin, the static padded dict with a padding row for Flax; QVHighlights: windows and ``ss_video_feat``);
    the text features of the task's text encoder (a random CLIP tower at ``t_feat_dim``, or the GloVe table). The
    negatives and the masked words are drawn by the task's samplers (:func:`jaxprvr.models.mesm.sample_outclass_neg`
    / ``sample_mlm_mask``, from the key ``TASK.loss`` would use) and injected into the twin.

    * ``convert``: the twin's state dict -> Flax -> state dict, bit-exact, key order and dtypes kept (float32 and
      float64 twins; 273 / 289 keys at the official layer counts).
    * ``block``: the sine positions, the T2V layer in both ``t2v_mask`` modes (each against the twin in that mode)
      and that they differ (the head-major mask acts on the batch), TwoMLP's MLM FFN, the enhancer, SS-MESM
      (``recon_feat``), the aligner, the encoder (``memory``, ``memory_global``), the decoder (``hs`` and the heads'
      reference per layer), the heads, the gradient through the decoder into the span head (the reference not
      detached), the CLIP text tower (fp32); float32 misses judged by the bounded float64 arbiter.
    * ``model``: every output of the official ``out`` dict and the named intermediates, eval and train (dropout
      off); two items swapped: outputs still equal, and changed by the head-major mask in both frameworks alike.
    * ``loss``: every criterion term with an injected matching and with each framework's own (indices equal).
    * ``grad``: per tensor, ``TASK.loss`` vs the twin's criterion backward; the gradients zero in exact arithmetic
      (:meth:`Spec.zero_parts`) as noise bounded by the whole gradient's scale; the no-gradient tensors.
    * ``train``: ``steps`` steps of ``TASK.optimizer`` vs ``official_optimizer`` + ``official_step`` (2 steps per
      epoch, StepLR every epoch), two alternating batches: the parameters after every step, the learning rates,
      the never-updated tensors.
    * ``dropout``: dropout ON with the same masks in both frameworks (:mod:`torch_ref.dropout`): outputs, loss
      terms and (``dropout_grads``) the gradients.
    * ``metrics``: a whole synthetic evaluation split: :class:`jaxprvr.tasks.vmr_detr.Evaluator` vs the twin's
      outputs through the official post-processing and metrics (submissions, metric dicts).
    """

    train_label = "steps of TASK.optimizer"
    dropout_grads = True  # the dropout group also compares the gradients (one more compiled program)

    def __init__(self, spec, cfg, *, ckpt, data_root, seed, n_videos, steps, device, say, compiler_options, tol,
                 perturb):
        import jax
        import torch

        from jaxprvr.models import build_model
        from jaxprvr.tasks.vmr_detr import facts_of
        from parity.check import perturb_twin, with_compute_dtype
        from torch_ref.mesm import build_mesm

        self._setup(spec, seed=seed, steps=steps, say=say, data_root=data_root, tol=tol, perturb=perturb,
                    compiler_options=compiler_options, n_videos=n_videos)
        cfg = spec.check_config(cfg)
        self.facts = facts_of(cfg)
        self.dataset = self.facts.official_name
        self.multi = self.facts.qvh
        torch.manual_seed(seed)
        twin32 = build_mesm(cfg.model, cfg.loss)
        self.source = "official init"
        if ckpt is not None:
            obj = read_official(ckpt)
            sd = OrderedDict((k, torch.from_numpy(np.array(v, np.float32))) for k, v in obj["model"].items())
            try:
                twin32.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise JaxprvrError(ckpt, "a MESM checkpoint matching the config", str(e).splitlines()[0]) from None
            self.source = f"checkpoint {ckpt}"
        if perturb == "all":
            twin32 = perturb_twin(twin32, seed)
        self.set_twin(twin32)
        if self.f64:
            cfg = with_compute_dtype(cfg, "float64")
        self.cfg = cfg
        self.model = build_model(cfg.model)
        self.model_nd = build_model(spec.no_dropout(cfg).model)
        self._tmp = None
        if data_root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mesm_parity_")
            self.root = spec.synthetic_root(cfg, Path(self._tmp.name) / "data", seed)
        else:
            self.root = Path(data_root)
        self.ds = spec.open_split(cfg, self.root, "train")
        self.n_items = max(2, int(n_videos))
        self.case = self.cast_case(spec.make_batch(cfg, self.n_items, seed, ds=self.ds))
        self.case2 = self.cast_case(spec.make_batch(cfg, self.n_items, seed + 1, ds=self.ds))
        self.key = jax.random.key(seed)
        self._nd = {}

    # -- helpers
    def cast_case(self, case: Case) -> Case:
        if not self.f64:
            return case
        from parity.check import cast_batch

        return Case(case.official, cast_batch(case.static, "float64"),
                    None if case.words is None else case.words.astype(np.float64), case.items)

    @staticmethod
    def is64(tw) -> bool:
        import torch

        return next(tw.parameters()).dtype == torch.float64

    def params(self, twin) -> dict:
        return twin_params(self.cfg.model, twin)

    def T(self, x, tw):
        import torch

        a = np.asarray(x)
        if np.issubdtype(a.dtype, np.floating):
            return torch.as_tensor(a, dtype=next(tw.parameters()).dtype)
        return torch.as_tensor(a)

    def twin_nd(self, tw):
        """A copy of ``tw`` built from the no-dropout config (every rate 0), same weights and dtype."""
        import torch

        from torch_ref.mesm import build_mesm

        tcfg = self.spec.no_dropout(self.cfg)
        with torch.random.fork_rng():
            t = build_mesm(tcfg.model, tcfg.loss)
        t = t.to(next(tw.parameters()).dtype)
        t.load_state_dict(tw.state_dict(), strict=True)
        return t.eval()

    def criterion(self, tw):
        from torch_ref.mesm_loss import build_criterion

        return build_criterion(tw, dataset_name=self.dataset, giou_float32=not self.is64(tw))

    def words_width(self, case: Case) -> int:
        o = case.official
        w = o["words_mask"] if o.get("words_mask") is not None else o["words_id"]
        return min(np.shape(w)[1], self.cfg.model.max_words_l)

    def injected(self, case: Case, key) -> tuple[np.ndarray, np.ndarray]:
        """``(neg_index (R,), mlm_mask (R, Lw))`` drawn as ``TASK.loss`` draws them from its ``sample`` key."""
        import jax

        from jaxprvr.models.mesm import sample_mlm_mask, sample_outclass_neg

        def make():
            def draw(k, rg, nr, wm, ww):
                k_neg, k_mlm = jax.random.split(k)
                return sample_outclass_neg(k_neg, rg, nr), sample_mlm_mask(k_mlm, wm, ww)

            return jax.jit(draw)

        s = case.static
        neg, mlm = _compiled(("draw",), make)(key, s["row_group"], s["num_rows"], s["words_mask"],
                                              s["words_weight"])
        return np.asarray(neg), np.asarray(mlm)

    def flax_forward(self, params, case: Case, train: bool, neg, mlm, model=None, capture=False, dkey=None):
        """The Flax model on the static batch (jitted, shared): ``(outputs, aux)`` (``capture``: and the
        ``dropout_keys`` collection)."""
        import jax

        model = model or self.model

        def make():
            def fwd(p, b, neg, mlm, k):
                kw = dict(train=train, with_neg=True, neg_index=neg, mlm_mask=mlm, rngs={"dropout": k})
                if capture:
                    return model.apply({"params": p}, b, mutable=["dropout_keys"], **kw)
                return model.apply({"params": p}, b, **kw)

            return jax.jit(fwd, compiler_options=self.compiler_options or None)

        fn = _compiled(("fwd", model.cfg, model.max_group_rows, train, capture), make)
        res = fn(params, case.flax(), neg, mlm, jax.random.key(0) if dkey is None else dkey)
        return jax.device_get(res)

    def twin_run(self, tw, case: Case, train: bool, neg, mlm, grad: bool = False):
        """The twin's official forward (``is_training=train``) on the official batch: ``(out, aux)``."""
        import torch

        b, lw = case.n_rows, self.words_width(case)
        tw.train(train)
        try:
            with self.mode(tw), (contextlib.nullcontext() if grad else torch.no_grad()):
                out, aux = tw(case.official, words_feat=None if case.words is None else self.T(case.words, tw),
                              dataset_name=self.dataset, is_training=train,
                              neg_index=torch.as_tensor(np.array(neg[:b], np.int64)),
                              masked_words=torch.as_tensor(np.array(mlm[:b, :lw], bool)), return_aux=True)
        finally:
            if not grad:
                tw.eval()
        return out, aux

    def output_rows(self, group, j_out, t_out, suffix, rtol_atol) -> list[Row]:
        """One row per entry of the official ``out`` dict (the Flax array cut to the twin's dynamic shape)."""
        from parity.check import missing_row

        rows = []
        for k, t in t_out.items():
            if k not in j_out:
                rows.append(missing_row(group, f"out[{k}]{suffix}"))
            elif k == "aux_outputs":
                for i, (ja, ta) in enumerate(zip(j_out[k], t)):
                    for kk, tv in ta.items():
                        rows.append(close_row(group, f"out[aux_outputs][{i}][{kk}]{suffix}", _cut(ja[kk], tv), _np(tv),
                                              *rtol_atol))
                if len(j_out[k]) != len(t):
                    rows.append(missing_row(group, f"out[aux_outputs]: {len(j_out[k])} vs {len(t)} layers{suffix}"))
            else:
                rows.append(close_row(group, f"out[{k}]{suffix}", _cut(j_out[k], t), _np(t), *rtol_atol))
        return rows

    def aux_row(self, group, j_aux, t_aux, suffix, rtol_atol) -> Row:
        """Every named intermediate both frameworks record (:data:`jaxprvr.models.mesm.AUX_NAMES`), elementwise at
        ``rtol_atol``: one row, the worst stage and the failing ones named."""
        pairs = []
        for k in t_aux:
            if k not in j_aux:
                continue
            t, j = t_aux[k], j_aux[k]
            if isinstance(t, (list, tuple)):
                pairs += [(f"{k}[{i}]", jj, tt) for i, (jj, tt) in enumerate(zip(j, t))]
                if len(j) != len(t):
                    pairs.append((f"{k} (length {len(j)} vs {len(t)})", np.zeros(1), np.ones(1)))
            else:
                pairs.append((k, j, t))
        worst_abs = worst_rel = 0.0
        worst, failing = "", []
        for name, j, t in pairs:
            r = close_row(group, name, _cut(j, t), _np(t), *rtol_atol)
            if r.max_rel >= worst_rel:
                worst_rel, worst = r.max_rel, name
            worst_abs = max(worst_abs, r.max_abs)
            if not r.passed:
                failing.append(f"{name} ({r.note or f'max abs {r.max_abs:.1e}'})")
        note = f"worst: {worst}" + (f"; failing: {', '.join(failing[:4])}" + (f" ... ({len(failing)})" if len(
            failing) > 4 else "") if failing else "")
        return Row(group, f"named intermediates ({len(pairs)} stages of both, lists per layer){suffix}", worst_abs,
                   worst_rel, f"rtol {rtol_atol[0]:g} atol {rtol_atol[1]:g} each", not failing and bool(pairs), note)

    # -- convert
    def conversion_rows(self) -> list[Row]:
        rows = []
        for tw in (self.twin32, self.twin64):
            sd = OrderedDict((k, v.detach().cpu()) for k, v in tw.state_dict().items())
            params = K.torch_to_params(sd, self.cfg.model, dtype=None, where="twin")
            back = K.params_to_torch(params, self.cfg.model)
            exact, worst = list(back) == list(sd), 0.0
            for k, v in sd.items():
                a, b = v.numpy(), np.asarray(back[k])
                exact = exact and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
                if a.size and a.shape == b.shape:
                    worst = max(worst, float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()))
            dt = str(next(tw.parameters()).dtype).replace("torch.", "")
            n_exp = 289 if not self.cfg.model.share_MLP else 273
            full = all(getattr(self.cfg.model, f) == getattr(type(self.cfg.model)(), f) for f in (
                "num_recfw_layers", "t2v_layers", "enc_layers", "dec_layers", "num_recss_layers", "n_input_proj"))
            note = f"official count {n_exp} at the official layer counts" if full else "reduced layer counts"
            rows.append(Row("convert", f"torch -> flax -> torch ({len(sd)} tensors, {dt}; key order and dtypes kept)",
                            worst, worst, "bit-exact", exact and (not full or len(sd) == n_exp), note))
        return rows

    # -- blocks
    def japply(self, key, module, params, *args, method=None, **kw):
        """``module.apply({"params": params}, *args, **kw)`` jitted once per ``key`` and config."""
        import jax

        def make():
            return jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=method, **kw))

        return jax.device_get(_compiled(("block", key, self.cfg.model), make)(params, *args))

    def block_rows(self, suffix="") -> list[Row]:
        import jax
        import torch

        import torch_ref.mesm as tm
        from jaxprvr.models import mesm as fm
        from jaxprvr.models.layers import resolve_compute_dtype, stat_dtype

        c, tol, case = self.cfg.model, self.tol.block, self.case
        dt = resolve_compute_dtype(c)
        st = stat_dtype(dt)
        fdt = np.float64 if self.f64 else np.float32
        params = self.params(self.twin)
        s, B = case.static, case.n_rows
        R, Lv = s["video_mask"].shape
        Lw = s["words_mask"].shape[1]
        lv, lw = np.shape(case.official["video_mask"])[1], self.words_width(case)
        d, nq = c.hidden_dim, c.num_queries
        rng = np.random.default_rng(self.seed + 11)
        vm, wm = np.asarray(s["video_mask"], bool), np.asarray(s["words_mask"], bool)
        T = self.T
        rows = []

        def torch_fn(fn):
            def run(tw):
                with torch.no_grad():
                    return _np(fn(tw))
            return run

        def seq(x, tw):  # (B, L, d) numpy -> sequence-first tensor
            return T(x, tw).permute(1, 0, 2)

        def normal(*shape):
            return rng.standard_normal(shape).astype(fdt)

        # positions
        j = np.asarray(_compiled(("block", "positions", d, str(st)), lambda: jax.jit(
            lambda m: fm.sine_position_embedding(m, d, st)))(vm))[:B, :lv]
        rows.append(self.arbiter_row(f"video positions (PositionEmbeddingSine over the mask, {d} channels){suffix}", j,
                                     torch_fn(lambda tw: tm.sine_position(torch.as_tensor(vm[:B, :lv]), d).to(
                                         next(tw.parameters()).dtype)), tol))
        anchors = rng.uniform(0.05, 0.95, (B, nq, 2)).astype(fdt)
        j = np.asarray(_compiled(("block", "dab_sine", d), lambda: jax.jit(
            lambda a: fm.sine_embed_for_position(a, d)))(anchors))
        rows.append(self.arbiter_row(f"DAB sine embedding of the (center, width) anchors{suffix}", j, torch_fn(
            lambda tw: tm.gen_sineembed_for_position(T(anchors, tw).permute(1, 0, 2), d).permute(1, 0, 2)), tol))

        # the T2V layer (MLM orientation: queries = words, keys = GT frames compacted left) on masks of random
        # lengths (one row full on each side), so that the head-major mask acts; both masks
        n_clip = np.asarray(s["clip_mask"], bool).sum(1)
        klen = int(n_clip[:B].max())
        q_len = np.where(np.arange(R) < B, rng.integers(1, lw + 1, R), 0)
        k_len = np.where(np.arange(R) < B, rng.integers(1, klen + 1, R), 0)
        q_len[0], k_len[min(1, B - 1)] = lw, klen
        wm = np.arange(Lw)[None, :] < q_len[:, None]
        km = np.arange(Lv)[None, :] < k_len[:, None]
        xq, xk, pq, pk = normal(R, Lw, d), normal(R, Lv, d), normal(R, Lw, d), normal(R, Lv, d)
        lp = params["enhance_encoder"]["t2v_encoder"]["layers_0"]
        two = not c.share_MLP
        outs = {}
        for mode in ("head_major", "per_row"):
            cm = dataclasses.replace(c, t2v_mask=mode)
            for mlm in ((False, True) if two else (False,)):
                j = self.japply(("t2v", mode, mlm), fm.T2VLayer(cm, "xavier", two, dt), lp, xk, xq, ~km, ~wm, pk,
                                pq, np.int32(B), is_mlm=mlm)[:B, :lw]

                def t_layer(tw, mode=mode, mlm=mlm):
                    layer = tw.enhance_encoder.t2v_encoder.layers[0]
                    old, layer.t2v_mask = layer.t2v_mask, mode
                    try:
                        return layer(seq(xk[:B, :klen], tw), seq(xq[:B, :lw], tw), torch.as_tensor(~km[:B, :klen]),
                                     seq(pk[:B, :klen], tw), torch.as_tensor(~wm[:B, :lw]), seq(pq[:B, :lw], tw),
                                     is_MLM=mlm).permute(1, 0, 2)
                    finally:
                        layer.t2v_mask = old

                what = " MLM pass (TwoMLP: linear{1,2}_1, norm{1,2}_1)" if mlm else ""
                rows.append(self.arbiter_row(f"T2V layer enhance_encoder.layers.0{what}, {mode} mask (word queries, "
                                             f"frame keys, random lengths; {B} rows + {R - B} padding){suffix}", j,
                                             torch_fn(t_layer), tol))
                if not mlm:
                    outs[mode] = (j, torch_fn(t_layer)(self.twin))
        valid = wm[:B, :lw]
        dj = float(np.abs(outs["head_major"][0] - outs["per_row"][0])[valid].max())
        dtw = float(np.abs(outs["head_major"][1] - outs["per_row"][1])[valid].max())
        rows.append(Row("block", f"the head-major mask bites on this batch: T2V layer head_major vs per_row at valid "
                                 f"queries (jax {dj:.2e}, torch {dtw:.2e}){suffix}", dj, dtw,
                        f"both > {QUIRK_BITES:g}", dj > QUIRK_BITES and dtw > QUIRK_BITES,
                        "row b, head h reads the mask of row (b * nheads + h) mod B (transformer.py L528-530)"))

        # the FW-MESM enhancer: video queries attend the words (positions on the video)
        wm = np.asarray(s["words_mask"], bool)
        xv, xw, pv = normal(R, Lv, d), normal(R, Lw, d), normal(R, Lv, d)
        j = self.japply("enhancer", fm.T2VEncoder(c, c.num_recfw_layers, two, dt), params["enhance_encoder"], xw, xv,
                        ~wm, ~vm, None, pv, np.int32(B))[0][:B, :lv]
        rows.append(self.arbiter_row(f"FW-MESM enhancer ({c.num_recfw_layers} T2V layers: video queries, word keys)"
                                     f"{suffix}", j, torch_fn(lambda tw: tw.enhance_encoder(
                                         T(xw[:B, :lw], tw), T(xv[:B, :lv], tw), torch.as_tensor(~wm[:B, :lw]), None,
                                         torch.as_tensor(~vm[:B, :lv]), T(pv[:B, :lv], tw))), tol))

        # SS-MESM: the item's sentences (own slot masked) attend the video; recon_feat
        rg = np.asarray(s["row_group"], np.int32)
        slot_rows, slot_valid, own = _group_slots(rg, R)
        sent_rows = normal(R, d)
        sent = np.where(slot_valid[..., None], sent_rows[slot_rows], 0).astype(fdt)
        if self.multi:
            svm = np.asarray(s["ss_video_mask"], bool)
        else:
            svm = vm
        sv = normal(R, svm.shape[1], d)
        slen = int(svm[:B].sum(1).max())
        nc = torch.as_tensor(np.asarray(case.official["num_clips"], np.int64))
        jr, jp, _ = self.japply("ss", fm.SegSenRecon(c, dt), params["ss_reconstructor"], sv, svm, sent, slot_valid,
                                own, np.int32(B)) if c.rec_ss else (None, None, None)

        def t_ss(tw, which):
            bs, bm = tm._split_expand_pad(nc, nc, T(sent_rows[:B], tw))
            return tw.ss_reconstructor(T(sv[:B, :slen], tw), torch.as_tensor(svm[:B, :slen]), bs, bm, nc)[which]

        if c.rec_ss:
            where = "the item's windows (ss_video_feat)" if self.multi else "the row's video"
            for i, name in enumerate(("recon_feat", "projed_recon_feat (output_sent_proj)")):
                rows.append(self.arbiter_row(f"SS-MESM {name} ({c.num_recss_layers} T2V layers: the item's sentence "
                                             f"slots attend {where}, no positions){suffix}", (jr, jp)[i][:B],
                                             torch_fn(lambda tw, i=i: t_ss(tw, i)), tol))

        # the aligner: enhanced video attends [recon ; words]
        xe = normal(R, Lw + 1, d)
        em = np.concatenate([np.ones((R, 1), bool), wm], axis=1)
        j = self.japply("aligner", fm.T2VEncoder(c, c.t2v_layers, False, dt), params["t2v_encoder"], xe, xv, ~em, ~vm,
                        None, pv, np.int32(B))[0][:B, :lv]
        rows.append(self.arbiter_row(f"T2V aligner ({c.t2v_layers} layers: video queries, [recon ; words] keys)"
                                     f"{suffix}", j, torch_fn(lambda tw: tw.t2v_encoder(
                                         T(xe[:B, :lw + 1], tw), T(xv[:B, :lv], tw), torch.as_tensor(~em[:B, :lw + 1]),
                                         None, torch.as_tensor(~vm[:B, :lv]), T(pv[:B, :lv], tw))), tol))

        # the transformer: the key-masked global token, the encoder, the DAB decoder
        src, pos = normal(R, Lv, d), normal(R, Lv, d)
        qe = np.asarray(params["query_embed"]["embedding"])
        g_tok = np.broadcast_to(np.asarray(params["global_rep_token"]), (R, 1, d)).astype(fdt)
        g_pos = np.broadcast_to(np.asarray(params["global_rep_pos"]), (R, 1, d)).astype(fdt)
        hs, refs, mem, memg, _ = self.japply("transformer", fm.Transformer(c, dt), params["transformer"], src, ~vm, qe,
                                             pos, g_tok, g_pos)

        def t_tr(tw, i, layer=None):
            out = tw.transformer(T(src[:B, :lv], tw), torch.as_tensor(~vm[:B, :lv]), tw.query_embed.weight,
                                 T(pos[:B, :lv], tw), T(g_tok[:B], tw), T(g_pos[:B], tw))[i]
            return out if layer is None else out[layer]

        rows.append(self.arbiter_row(f"encoder memory ({c.enc_layers} post-norm layers; global token key-masked)"
                                     f"{suffix}", mem[:B, :lv], torch_fn(lambda tw: t_tr(tw, 2)), tol))
        rows.append(self.arbiter_row(f"encoder memory_global (the global token's output){suffix}", memg[:B],
                                     torch_fn(lambda tw: t_tr(tw, 3)), tol))
        for layer in range(c.dec_layers):
            rows.append(self.arbiter_row(f"decoder layer {layer}: hs (final LayerNorm){suffix}", hs[layer, :B],
                                         torch_fn(lambda tw, i=layer: t_tr(tw, 0, i)), tol))
            rows.append(self.arbiter_row(f"decoder layer {layer}: the heads' reference{suffix}", refs[layer, :B],
                                         torch_fn(lambda tw, i=layer: t_tr(tw, 1, i)), tol))

        rows.append(self.transformer_grad_row(src, ~vm, qe, pos, g_tok, g_pos, B, lv, suffix))

        # the heads
        h_in, mem_in, memg_in = normal(R, nq, d), normal(R, Lv, d), normal(R, d)
        ref_in = rng.uniform(0.02, 0.98, (R, nq, 2)).astype(fdt)

        def heads(m, h, r, mm, mg):
            return (m.class_embed(h), jax_sigmoid(m.span_embed(h) + fm.inverse_sigmoid(r)), m._saliency(mm, mg))

        jh = self.japply("heads", self.model, params, h_in, ref_in, mem_in, memg_in, method=heads)

        def t_heads(tw, i):
            h, r = T(h_in[:B], tw), T(ref_in[:B], tw)
            if i == 0:
                return tw.class_embed(h)
            if i == 1:
                return (tw.span_embed(h) + tm.inverse_sigmoid(r)).sigmoid()
            m, g = T(mem_in[:B, :lv], tw), T(memg_in[:B], tw)
            return torch.sum(tw.saliency_proj1(m) * tw.saliency_proj2(g).unsqueeze(1), dim=-1) / np.sqrt(d)

        for i, name in enumerate(("class_embed -> pred_logits", "sigmoid(span_embed + inverse_sigmoid(reference)) -> "
                                  "pred_spans", "saliency <proj1(memory), proj2(memory_global)> / sqrt(d)")):
            rows.append(self.arbiter_row(f"heads: {name}{suffix}", (jh[0][:B], jh[1][:B], jh[2][:B, :lv])[i],
                                         torch_fn(lambda tw, i=i: t_heads(tw, i)), tol))
        if not suffix:
            rows += self.clip_rows()
        return rows

    def transformer_grad_row(self, src, pad, qe, pos, g_tok, g_pos, B, lv, suffix="") -> Row:
        """Gradients of ``sum(w * pred_spans)`` over every decoder layer (the transformer, then ``sigmoid(span_embed(hs)
        + inverse_sigmoid(reference))``) w.r.t. the transformer's and ``span_embed``'s tensors: the heads read the
        refined reference BEFORE ``.detach()`` (transformer.py L393-397), so the last layer's spans reach
        ``bbox_embed`` and the earlier layers. Per tensor ``||d|| <= rel ||g||`` (float32: the bounded arbiter); the
        gradients :meth:`Spec.zero_parts` lists are left out (noise). A failing float32 row is re-judged as
        :meth:`kink_row` does: the same float32 gradients with every PReLU on the float64 forward's side."""
        import re

        import flax.linen as nn
        import jax
        import jax.numpy as jnp
        import torch

        import torch_ref.mesm as tm
        from jaxprvr.models import mesm as fm
        from jaxprvr.models.layers import resolve_compute_dtype
        from parity.check import _arbiter_ok, _norm, with_compute_dtype

        c = self.cfg.model
        dt = resolve_compute_dtype(c)
        rng = np.random.default_rng(self.seed + 13)
        w = rng.standard_normal((c.dec_layers, src.shape[0], c.num_queries, 2)).astype(src.dtype)
        w[:, B:] = 0.0
        params = self.params(self.twin)
        args = (src, pad, qe, pos, g_tok, g_pos)

        def spans_sum(p_tr, p_sp, *a):
            hs, refs, _, _, _ = fm.Transformer(c, dt).apply({"params": p_tr}, *a)
            spans = jax.nn.sigmoid(fm.MLP(c.hidden_dim, 2, 3, c.hidden_dim, dt).apply({"params": p_sp}, hs)
                                   + fm.inverse_sigmoid(refs))
            return (spans * w).sum()

        def make():
            return jax.jit(jax.grad(spans_sum, argnums=(0, 1)))

        def make_forced():
            def loss(p_tr, p_sp, br, *a):
                crossed = {}
                with nn.intercept_methods(_prelu_forcer(br, crossed)):
                    val = spans_sum(p_tr, p_sp, *a)
                return val, crossed

            return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))

        def branches64():
            """The float64 forward's side of every PReLU input of the transformer call."""
            with jax.enable_x64(True):
                c64 = with_compute_dtype(self.cfg, "float64").model
                to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)  # noqa: E731
                a64 = [np.asarray(x, np.float64) if np.issubdtype(np.asarray(x).dtype, np.floating) else x
                       for x in args]

                def fwd(p_tr, *a):
                    seen = {}
                    with nn.intercept_methods(_prelu_recorder(seen)):
                        fm.Transformer(c64, jnp.float64).apply({"params": p_tr}, *a)
                    return seen

                return {k: np.asarray(v) for k, v in jax.jit(fwd)(to64(params["transformer"]), *a64).items()}

        def flat_of(g_tr, g_sp):
            return {**{f"transformer/{k}": v for k, v in _flatten(g_tr).items()},
                    **{f"span_embed/{k}": v for k, v in _flatten(g_sp).items()}}

        flat = flat_of(*jax.device_get(_compiled(("block", "transformer_grad", c), make)(
            params["transformer"], params["span_embed"], *args)))
        entries = [e for e in make_table(c) if e.flax in flat]
        zero = [re.compile(p) for p, sl, _ in self.spec.zero_parts(self.spec.no_dropout(self.cfg)) if sl is None]

        def twin_grads(tw):
            tw.zero_grad(set_to_none=True)
            with self.mode(tw):
                hs, refs, _, _ = tw.transformer(self.T(src[:B, :lv], tw), torch.as_tensor(pad[:B, :lv]),
                                                tw.query_embed.weight, self.T(pos[:B, :lv], tw), self.T(g_tok[:B], tw),
                                                self.T(g_pos[:B], tw))
                spans = (tw.span_embed(hs) + tm.inverse_sigmoid(refs)).sigmoid()
                (spans * self.T(w[:, :B], tw)).sum().backward()
            named = dict(tw.named_parameters())
            out = {e.torch: np.zeros(tuple(named[e.torch].shape)) if named[e.torch].grad is None else
                   _np(named[e.torch].grad) for e in entries}
            tw.zero_grad(set_to_none=True)
            return out

        t32, t64 = twin_grads(self.twin32), twin_grads(self.twin64)
        tg = t64 if self.f64 else t32
        rel = self.tol.grad_rel

        def judge(flat_):
            worst, worst_key, failing, n = 0.0, "", [], 0
            for e in entries:
                if any(z.fullmatch(e.torch) for z in zero):
                    continue
                n += 1
                a, t = (to_torch(e.kind, np.asarray(flat_[e.flax])).astype(np.float64),
                        np.asarray(tg[e.torch], np.float64))
                bad = nonfinite(e.torch, jax=a, torch=t)
                d, nt = _norm(a - t), _norm(t)
                r = d / nt if nt > 0 else (0.0 if d == 0 else float("inf"))
                if r >= worst:
                    worst, worst_key = r, e.torch
                if bad:
                    failing.append(bad)
                elif d > rel * nt:
                    t_64 = np.asarray(t64[e.torch], np.float64)
                    if self.f64 or not _arbiter_ok(_norm(a - t_64), _norm(t - t_64), rel * _norm(t_64)):
                        failing.append(f"{e.torch} (rel {r:.1e})")
            return Row("block", f"d sum(w * pred_spans of every decoder layer) / d (transformer, span_embed) ({n} "
                                f"tensors; the heads' reference not detached){suffix}", worst, worst,
                       f"||d|| <= {rel:g} ||g||" + ("" if self.f64 else " or f64 arbiter"), not failing,
                       join_notes(f"worst: {worst_key}", "failing: " + ", ".join(failing[:4]) if failing else ""))

        row = judge(flat)
        if row.passed or self.f64:
            return row
        (g_tr, g_sp), crossed = _compiled(("block", "transformer_grad_forced", c), make_forced)(
            params["transformer"], params["span_embed"], {k: jnp.asarray(v) for k, v in branches64().items()}, *args)
        flips = _flips(crossed)
        if not flips:
            return dataclasses.replace(row, note=join_notes("no PReLU input crosses 0 between float32 and float64",
                                                            row.note))
        return _rejudged(row, judge(flat_of(*jax.device_get((g_tr, g_sp)))), flips)

    def clip_rows(self) -> list[Row]:
        """The task's CLIP text tower (fp32; float64 in float64 mode) vs :class:`torch_ref.mesm.CLIPTextEncoder`
        (fp16 off) on the batch's token ids: ``last_hidden_state`` after ``ln_final``."""
        import jax
        import torch

        from jaxprvr.models.clip import CLIPDims, TextTower
        from parity.clip import params_to_state_dict
        from torch_ref.mesm import CLIPTextEncoder

        text = self.ds.text
        if getattr(text, "kind", None) != "CLIP":
            return []
        p = jax.device_get(text.params)
        flat = _flatten(p)
        n_layers = len({k.split("/")[1] for k in flat if k.startswith("transformer/resblocks_")})
        w = np.shape(flat["ln_final/scale"])[0]
        dims = CLIPDims(embed_dim=np.shape(flat["text_projection"])[1], text_width=w, text_layers=n_layers,
                        text_heads=self.cfg.model.clip_heads, vocab_size=np.shape(flat["token_embedding/embedding"])[0],
                        context_length=np.shape(flat["positional_embedding"])[0]).validate("model.clip_*")
        sd = params_to_state_dict(dims, {"text": p})
        with torch.random.fork_rng():
            tower32 = CLIPTextEncoder(dims.embed_dim, dims.context_length, dims.vocab_size, w, dims.t_heads, n_layers,
                                      fp16=False)
        tower32.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()}, strict=True)
        tower32.eval()
        tower64 = copy.deepcopy(tower32).double()
        fdt = np.float64 if self.f64 else np.float32
        ids = np.asarray(self.case.official["words_id"], np.int32)
        pt = jax.tree_util.tree_map(lambda a: np.asarray(a, fdt), p)
        j = self.japply(("clip", fdt), TextTower(dims, fdt), pt, ids)["hidden"]

        def t_tower(tw):
            tower = tower64 if self.is64(tw) else tower32
            with torch.no_grad():
                return _np(tower(torch.as_tensor(ids.astype(np.int64)))["last_hidden_state"])

        lens = (ids > 0).sum(1).tolist()
        return [self.arbiter_row(f"CLIP text tower (fp32, {n_layers} layers x {w}, causal) last_hidden_state on the "
                                 f"batch's ids ({len(lens)} rows of {min(lens)}-{max(lens)} tokens, width "
                                 f"{ids.shape[1]})", j, t_tower, self.tol.block)]

    # -- whole model
    def model_rows(self, suffix="") -> list[Row]:
        """Eval mode and train mode (dropout off; the MLM pass and the negative branch with injected ``neg_index`` /
        ``mlm_mask``): every output of the official ``out`` dict and the named intermediates; then two items
        swapped."""
        tol = self.tol.model
        case = self.case
        neg, mlm = self.injected(case, self.key)
        params = self.params(self.twin)
        rows = []
        j_out, j_aux = self.flax_forward(params, case, False, neg, mlm)
        t_out, t_aux = self.twin_run(self.twin, case, False, neg, mlm)
        rows += self.output_rows("model", j_out, t_out, " [eval]" + suffix, tol)
        rows.append(self.aux_row("model", j_aux, t_aux, " [eval]" + suffix, tol))
        tw = self.twin_nd(self.twin)
        j_out, j_aux = self.flax_forward(params, case, True, neg, mlm, model=self.model_nd)
        t_out, t_aux = self.twin_run(tw, case, True, neg, mlm)
        rows += self.output_rows("model", j_out, t_out, " [train, dropout off]" + suffix, tol)
        rows.append(self.aux_row("model", j_aux, t_aux, " [train, dropout off]" + suffix, tol))
        return rows + self.reorder_rows(params, suffix)

    def reorder_rows(self, params, suffix="") -> list[Row]:
        """Items 0 and another (of another row count or video length) swapped in the batch (eval mode): the Flax
        outputs still equal the twin's, and the head-major mask changes each row's outputs in both frameworks alike
        (``per_row``, or a batch where no row pads both its queries and its keys: no change)."""
        case = self.case
        n = len(case.items)
        vm = np.asarray(case.official["video_mask"], bool).sum(1)
        starts0 = np.cumsum([0] + [len(it) for it in case.items])
        shape = [(len(it), int(vm[starts0[i]])) for i, it in enumerate(case.items)]
        other = next((i for i in range(1, n) if shape[i] != shape[0]), 1)  # an item the masks tell apart
        order = list(range(n))
        order[0], order[other] = other, 0
        sw = self.cast_case(self.spec.make_batch(self.cfg, self.n_items, self.seed, ds=self.ds, order=order))
        sizes = [len(it) for it in case.items]
        starts = np.cumsum([0] + sizes)
        perm = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in order])  # swapped row -> original row
        outs = {}
        for name, c in (("orig", case), ("swap", sw)):
            neg, mlm = self.injected(c, self.key)
            j, _ = self.flax_forward(params, c, False, neg, mlm)
            t, _ = self.twin_run(self.twin, c, False, neg, mlm)
            outs[name] = (j, t)
        rows, keys = [], ("pred_logits", "pred_spans", "saliency_scores")
        b = case.n_rows
        for k in keys:
            t_sw = _np(outs["swap"][1][k])
            rows.append(close_row("model", f"out[{k}] [eval, items 0 and {other} swapped]{suffix}",
                                  _cut(outs["swap"][0][k], t_sw), t_sw, *self.tol.model))
        dj = dt = noise = 0.0
        lv = np.shape(case.official["video_mask"])[1]
        for k in keys:
            j_o, t_o = _cut(outs["orig"][0][k], outs["orig"][1][k]), _np(outs["orig"][1][k])
            j_s, t_s = _cut(outs["swap"][0][k], outs["swap"][1][k]), _np(outs["swap"][1][k])
            noise = max(noise, float(np.abs(j_o - t_o).max()), float(np.abs(j_s - t_s).max()))
            if k == "saliency_scores":  # only the frames of each row's own video
                m = np.asarray(case.official["video_mask"], bool)
                j_o, t_o = np.where(m, j_o, 0), np.where(m, t_o, 0)
                ms = np.asarray(sw.official["video_mask"], bool)
                j_s, t_s = np.where(ms, j_s, 0), np.where(ms, t_s, 0)
            inv = np.empty(b, int)
            inv[perm] = np.arange(b)
            dj = max(dj, float(np.abs(j_s[inv] - j_o).max()))
            dt = max(dt, float(np.abs(t_s[inv] - t_o).max()))
        del lv
        head = self.cfg.model.t2v_mask == "head_major"
        s = case.static
        rg = np.asarray(s["row_group"]) >= 0
        vpad, wpad = ~np.asarray(s["video_mask"], bool)[rg], ~np.asarray(s["words_mask"], bool)[rg]
        uses = [(vpad, wpad)]  # enhancer and aligner: video queries, word keys
        if self.cfg.model.rec_ss:
            slots = ~_group_slots(np.asarray(s["row_group"]), len(rg))[1][rg]
            sv = ~np.asarray(s["ss_video_mask" if self.multi else "video_mask"], bool)[rg]
            uses.append((slots, sv))
        may_bite = any(bool(np.any(q.any(1) & k.any(1))) for q, k in uses)
        if head and not may_bite:
            ok = dj <= self.tol.model[1] * 10 and dt <= self.tol.model[1] * 10
            crit = "both ~0 (no row of this batch pads both its queries and its keys: the mask cannot act)"
        elif head:
            # real, not rounding: each change is >= 10x the frameworks' own disagreement (and > 100 eps), and the two
            # changes agree to that disagreement (|max|a| - max|b|| <= max|a - b| <= the noise of both orders)
            floor = max(10 * noise, 100 * self.tol.eps)
            ok = dj > floor and dt > floor and abs(dj - dt) <= 2 * noise + 1e-12
            crit = (f"both > 10 x max|jax - torch| ({floor:.1e}), equal to 2 x {noise:.1e} (head_major: outputs "
                    "depend on the batch order, alike)")
        else:
            ok = dj <= self.tol.model[1] * 10 and dt <= self.tol.model[1] * 10
            crit = "both ~0 (per_row: outputs independent of the batch order)"
        rows.append(Row("model", f"batch-order dependence: items 0 and {other} swapped changes each row's outputs by "
                                 f"jax {dj:.2e}, torch {dt:.2e}{suffix}", dj, dt, crit, ok,
                        f"t2v_mask {self.cfg.model.t2v_mask}"))
        return rows

    # -- losses
    def padded_outputs(self, t_out, case: Case) -> dict:
        """The twin's ``out`` dict padded to the static batch (the layout :func:`jaxprvr.losses.mesm.mesm_loss`
        reads)."""
        s = case.static
        R, Lv = s["video_mask"].shape
        Lw = s["words_mask"].shape[1]
        out = {}
        for k, v in t_out.items():
            if k == "aux_outputs":
                out[k] = [{kk: _pad_to(vv, (R,) + tuple(_np(vv).shape[1:])) for kk, vv in a.items()} for a in v]
                continue
            a = _np(v)
            shape = list(a.shape)
            shape[0] = R
            if k in ("saliency_scores", "neg_saliency_scores", "projed_video_feat", "enhanced_video_feat"):
                shape[1] = Lv
            elif k in ("words_mask", "recfw_words_logit", "projed_words_feat"):
                shape[1] = Lw
            elif k in ("expanded_words_feat", "expanded_words_mask"):
                shape[1] = Lw + 1
            out[k] = _pad_to(a, tuple(shape))
        return out

    def jax_loss(self, outputs, case: Case, indices=None):
        import jax

        from jaxprvr.losses.mesm import mesm_loss

        cfg = self.cfg

        def make():
            def fn(o, b, ind):
                return mesm_loss(o, b, cfg.loss, multi_clip=self.multi, indices=ind,
                                 stable_neg_pair=cfg.loss.stable_neg_pair)

            return jax.jit(fn)

        total, terms = _compiled(("loss", cfg.loss, self.multi, indices is None, len(outputs.get("aux_outputs", ()))),
                                 make)(outputs, case.flax(), indices)
        return float(total), {k: np.asarray(v) for k, v in jax.device_get(terms).items()}

    def jax_match(self, outputs, case: Case) -> list:
        import jax

        from jaxprvr.losses.mesm import match_all

        cfg = self.cfg
        fn = _compiled(("match", cfg.loss, self.multi, len(outputs.get("aux_outputs", ()))), lambda: jax.jit(
            lambda o, b: match_all(o, b, cfg.loss, self.multi)))
        return [np.asarray(a) for a in jax.device_get(fn(outputs, case.flax()))]

    def loss_rows(self) -> list[Row]:
        """The criterion on the twin's train-mode outputs (dropout off): every term and the total with an injected
        matching (a fixed assignment given to both), then with each framework's own matching (indices equal)."""
        import torch


        case = self.case
        tw = self.twin_nd(self.twin)
        neg, mlm = self.injected(case, self.key)
        t_out, _ = self.twin_run(tw, case, True, neg, mlm)
        j_in = self.padded_outputs(t_out, case)
        crit = self.criterion(tw)
        R, W = case.static["span_mask"].shape
        B, nq = case.n_rows, self.cfg.model.num_queries
        rows = []
        # an injected matching: row b's windows get queries (b, b + 1, ...) mod nq, per layer shifted
        layers = 1 + len(t_out.get("aux_outputs", []))
        inj = []
        for layer in range(layers):
            a = np.full((R, W), -1, np.int32)
            for b in range(B):
                w = np.flatnonzero(case.static["span_mask"][b])
                a[b, w] = (b + 2 * layer + np.arange(len(w))) % nq
            inj.append(a)
        with self.mode(tw), torch.no_grad():
            t_terms, t_total = crit(t_out, case.official, is_training=True,
                                    indices=_indices_to_twin(inj[0], B, self.multi),
                                    aux_indices=[_indices_to_twin(a, B, self.multi) for a in inj[1:]])
        jl, jterms = self.jax_loss(j_in, case, inj)
        rows += _loss_rows_f32("loss", jl, jterms, float(_np(t_total)), {k: float(_np(v)) for k, v in t_terms.items()},
                           self.tol.loss, " [injected matching]")
        # each framework's own matching
        with self.mode(tw), torch.no_grad():
            t_terms, t_total = crit(t_out, case.official, is_training=True)
        t_idx = [crit.last_indices["main"]] + list(crit.last_indices["aux"])
        t_idx = [_indices_to_jax(i, R, W, self.multi) for i in t_idx]
        j_idx = self.jax_match(j_in, case)
        diff = sum(int(np.sum(a != b)) for a, b in zip(j_idx, t_idx))
        what = "Hungarian per row over its windows" if self.multi else "argmin query per row"
        rows.append(Row("loss", f"matching ({what}; final + {layers - 1} aux layers): jax match_all == the twin's "
                                f"HungarianMatcher (scipy)", float(diff), float(diff), "identical", diff == 0,
                        f"{diff} window assignments differ" if diff else ""))
        jl, jterms = self.jax_loss(j_in, case)
        rows += _loss_rows_f32("loss", jl, jterms, float(_np(t_total)), {k: float(_np(v)) for k, v in t_terms.items()},
                           self.tol.loss, " [own matching]")
        return rows

    # -- gradients
    def torch_grads(self, tw, case: Case, neg, mlm):
        """The twin's official loss (train mode, ``is_training=True``, the criterion with its own matching) and its
        gradients by name (``None`` -> zeros, and the set of ``None`` names)."""
        tw.zero_grad(set_to_none=True)
        crit = self.criterion(tw)
        out, _ = self.twin_run(tw, case, True, neg, mlm, grad=True)
        with self.mode(tw):
            terms, loss = crit(out, case.official, is_training=True)
            loss.backward()
        tw.eval()
        none = {n for n, p in tw.named_parameters() if p.grad is None}
        g = {n: (np.zeros(tuple(p.shape)) if p.grad is None else p.grad.detach().cpu().numpy())
             for n, p in tw.named_parameters()}
        return float(_np(loss.detach())), g, none, {k: float(_np(v)) for k, v in terms.items()}

    def grad_tree(self, params, case: Case, skey, cfg=None, model=None, dkey=None):
        """``TASK.loss`` (its negatives and masked words drawn from ``skey``) and its gradient tree, jitted once per
        config (the grad, train and dropout groups share it)."""
        import jax

        from jaxprvr.tasks.vmr_detr import TASK

        tcfg = cfg or self.spec.no_dropout(self.cfg)
        model = model or self.model_nd

        def make():
            return jax.jit(jax.value_and_grad(TASK.loss(model, tcfg, 1), has_aux=True),
                           compiler_options=self.compiler_options or None)

        fn = _compiled(("grad", tcfg.model, tcfg.loss, tcfg.data.dataset), make)
        rngs = {"dropout": jax.random.key(0) if dkey is None else dkey, "sample": skey}
        (jl, (terms, _)), jg = fn(params, case.flax(), rngs, np.int32(0), {})
        return jl, jg, terms

    def jax_grads(self, params, case: Case, skey, cfg=None, model=None, dkey=None):
        """:meth:`grad_tree` as ``(loss, {torch name: gradient (torch layout)}, terms)``."""
        import jax

        jl, jg, terms = self.grad_tree(params, case, skey, cfg, model, dkey)
        flat = _flatten(jax.device_get(jg))
        tab = make_table((cfg or self.cfg).model)
        return (float(jl), {e.torch: to_torch(e.kind, np.asarray(flat[e.flax])) for e in tab},
                {k: np.asarray(v) for k, v in jax.device_get(terms).items()})

    def grad_rows(self) -> list[Row]:
        skey = self._grad_key()
        neg, mlm = self.injected(self.case, skey)
        t32, t64 = self.twin_nd(self.twin32), self.twin_nd(self.twin64)
        tl32, g32, none32, _ = self.torch_grads(t32, self.case, neg, mlm)
        tl64, g64, none64, _ = self.torch_grads(t64, self.case, neg, mlm)
        params = self.params(t64 if self.f64 else t32)
        jl, jg, _ = self.jax_grads(params, self.case, skey)
        tl_, tg = (tl64, g64) if self.f64 else (tl32, g32)
        stage = (f"d loss / d param ({len(tg)} tensors; TASK.loss vs the twin's criterion backward, train mode, "
                 "dropout off)")
        cfg_nd = self.spec.no_dropout(self.cfg)
        rows = self.grad_compare(jl, jg, tl_, tg, g32, g64, stage, cfg_nd,
                                 loss_stage="training loss (TASK.loss vs the official criterion)")
        if not self.f64 and not rows[1].passed:
            rows[1] = self.kink_row(rows[1], params, neg, mlm, skey, tl_, tg, g32, g64, stage, cfg_nd)
        rows.append(self.no_grad_row(jg, none64 if self.f64 else none32, "grad"))
        return rows

    # -- float32 gradients across a PReLU kink
    def prelu_branches(self, params, case: Case, neg, mlm) -> dict:
        """``{"<module path>#<call>": x >= 0}`` of every PReLU input of the train-mode forward (dropout off) run in
        float64 (the float64 twin's branches: the float64 groups show the two frameworks equal there)."""
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        from jaxprvr.models import build_model
        from parity.check import cast_batch, with_compute_dtype

        with jax.enable_x64(True):
            model = build_model(with_compute_dtype(self.spec.no_dropout(self.cfg), "float64").model)
            p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
            b64 = cast_batch(case.flax(), "float64")

            def fwd(p, b):
                seen = {}
                with nn.intercept_methods(_prelu_recorder(seen)):
                    model.apply({"params": p}, b, train=True, with_neg=True, neg_index=neg, mlm_mask=mlm,
                                rngs={"dropout": jax.random.key(0)})
                return seen

            return {k: np.asarray(v) for k, v in jax.jit(fwd)(p64, b64).items()}

    def kink_grads(self, params, case: Case, skey, branches: dict):
        """:meth:`jax_grads` (float32) with every PReLU taking the slope of ``branches`` (float64's side) and the
        PReLU inputs on the other side of 0 in float32: ``(loss, grads, [(call, count, max |x|)])``."""
        import jax

        jl, jg, flips = self.kink_grad_tree(params, case, skey, branches)
        flat = _flatten(jax.device_get(jg))
        grads = {e.torch: to_torch(e.kind, np.asarray(flat[e.flax])) for e in make_table(self.cfg.model)}
        return float(jl), grads, flips

    def kink_grad_tree(self, params, case: Case, skey, branches: dict):
        """:meth:`kink_grads` with the gradient as the Flax tree."""
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        from jaxprvr.tasks.vmr_detr import TASK

        tcfg = self.spec.no_dropout(self.cfg)
        loss_fn = TASK.loss(self.model_nd, tcfg, 1)

        def loss(p, b, rngs, br):
            crossed = {}
            with nn.intercept_methods(_prelu_forcer(br, crossed)):
                val, aux = loss_fn(p, b, rngs, np.int32(0), {})
            return val, (aux, crossed)

        fn = _compiled(("kink", tcfg.model, tcfg.loss, tcfg.data.dataset),
                       lambda: jax.jit(jax.value_and_grad(loss, has_aux=True),
                                       compiler_options=self.compiler_options or None))
        rngs = {"dropout": jax.random.key(0), "sample": skey}
        (jl, (_, crossed)), jg = fn(params, case.flax(), rngs, {k: jnp.asarray(v) for k, v in branches.items()})
        return jl, jg, _flips(crossed)

    def kink_row(self, row: Row, params, neg, mlm, skey, tl_, tg, g32, g64, stage, cfg_nd) -> Row:
        """A failing float32 gradient row re-judged where XLA's float32 forward put PReLU inputs on the other side of
        0 than float64 (each takes the other slope, 1 vs a: a difference no float32 implementation avoids; torch's
        float32 forward may land elsewhere). The same float32 gradients with float64's branch at those inputs must
        pass the same criterion; with no crossing the row stays as it is."""
        branches = self.prelu_branches(params, self.case, neg, mlm)
        jl, jg, flips = self.kink_grads(params, self.case, skey, branches)
        if not flips:
            return dataclasses.replace(row, note=join_notes(row.note, "no PReLU input crosses 0 between float32 "
                                                                      "and float64"))
        return _rejudged(row, self.grad_compare(jl, jg, tl_, tg, g32, g64, stage, cfg_nd)[1], flips)

    def grad_compare(self, jl, jg, tl_, tg, g32, g64, stage, cfg, group="grad", loss_stage="training loss") -> list:
        """:func:`parity.check._grad_rows` (per tensor ``||d|| <= rel ||g||``, float32: the bounded float64 arbiter)
        on every tensor except the entries :meth:`Spec.zero_parts` lists, and one row for those: float noise on
        both sides, where one implementation's noise may be another's exact 0 (a softmax whose probabilities sum
        to exactly 1 in one and not in the other), so each is bounded by the scale of the whole gradient: JAX's
        ``||g|| <= 100 eps ||dL/dtheta||`` (eps of the mode), and the float64 twin's ``<= 100 eps64
        ||dL/dtheta||`` (the listed entries are zero: the list is checked)."""
        import re

        from parity.check import ZERO_NOISE_FACTOR, _grad_rows, _norm
        from parity.rows import EPS64

        parts = [(re.compile(p), sl, r) for p, sl, r in self.spec.zero_parts(cfg)]

        def split(name, a):
            a = np.asarray(a)
            for rx, sl, _ in parts:
                if rx.fullmatch(name):
                    if sl is None:
                        return None, a
                    keep = np.ones(a.shape[0], bool)
                    keep[sl] = False
                    return a[keep], a[sl]
            return a, None

        def rest(g):
            return {k: split(k, g[k])[0] for k in tg if split(k, g[k])[0] is not None}

        class NoZeros:
            @staticmethod
            def zero_gradients(_):
                return ()

        rows = _grad_rows(NoZeros(), cfg, jl, rest(jg), tl_, rest(tg), rest(g32), rest(g64), self.tol, stage,
                          group=group, loss_stage=loss_stage)
        scale = _norm(np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in g64.values()]))
        eps = self.tol.eps
        n, worst, worst_abs, worst64, failing, reasons = 0, 0.0, 0.0, 0.0, [], set()
        for k in tg:
            _, zj = split(k, jg[k])
            if zj is None:
                continue
            n += 1
            reasons.add(next(r for rx, _, r in parts if rx.fullmatch(k)))
            z64 = split(k, g64[k])[1]
            bad = nonfinite(k, jax=zj)
            rj = _norm(zj) / max(ZERO_NOISE_FACTOR * eps * scale, 1e-300)
            r64 = _norm(z64) / max(ZERO_NOISE_FACTOR * EPS64 * scale, 1e-300)
            worst, worst64 = max(worst, rj), max(worst64, r64)
            worst_abs = max(worst_abs, float(np.abs(zj).max()) if zj.size else 0.0)
            if bad or not rj <= 1.0:
                failing.append(bad or f"{k} (||g_jax|| {_norm(zj):.1e})")
            if not r64 <= 1.0:
                failing.append(f"{k}: the float64 twin's gradient {_norm(z64):.1e} is not noise (not a zero)")
        note = (f"||dL/dtheta|| = {scale:.2e}; worst ||g_jax|| / bound {worst:.2e}, float64 twin {worst64:.2e}; "
                + " | ".join(sorted(reasons)))
        if failing:
            note += "; failing: " + ", ".join(failing[:4]) + (f" ... ({len(failing)})" if len(failing) > 4 else "")
        rows.append(Row(group, f"gradients zero in exact arithmetic ({n} tensors or parts): noise on both sides",
                        worst_abs, worst, f"||g_jax|| <= {ZERO_NOISE_FACTOR:g} eps ||dL/dtheta||; float64 twin <= "
                        f"{ZERO_NOISE_FACTOR:g} eps64 ||dL/dtheta||", not failing and n > 0, note))
        return rows

    def _grad_key(self):
        import jax

        return jax.random.fold_in(self.key, 3)

    def no_grad_row(self, jg, none, group) -> Row:
        """The tensors without an official gradient: torch's ``grad`` is None exactly for the listed ones, and
        JAX's gradient of each is exactly 0."""
        listed = self.spec.no_grad_names(self.cfg)
        bad = []
        if set(listed) != set(none):
            bad.append(f"torch grad None for {sorted(set(none) - set(listed))[:3]} not listed, listed "
                       f"{sorted(set(listed) - set(none))[:3]} have a gradient")
        nz = [k for k in listed if np.any(np.asarray(jg[k]) != 0)]
        if nz:
            bad.append(f"non-zero JAX gradient of {nz[:3]}")
        worst = max([float(np.abs(np.asarray(jg[k])).max()) for k in listed] or [0.0])
        groups = sorted({next((p for p in NO_GRAD_REASONS if k.startswith(p)), k) for k in listed})
        note = "; ".join(f"{g}*: {NO_GRAD_REASONS.get(g, '')}" for g in groups)
        return Row(group, f"tensors without an official gradient ({len(listed)}: grad None in torch, exactly 0 in "
                          "JAX)", worst, worst, "identical (None / 0)", not bad and bool(listed) == bool(none),
                   join_notes(note, *bad))

    # -- training
    def train_rows(self) -> list[Row]:
        """:meth:`train_run`; in float32, failing rows are re-run with every JAX gradient taken on float64's side of
        each PReLU kink (:meth:`kink_row`'s rule, the branches at each step's float64 twin parameters): the rows of
        that run replace them when XLA's float32 forward crossed a kink in some step."""
        rows, _ = self.train_run(kink=False)
        if self.f64 or all(r.passed for r in rows):
            return rows
        again, crossings = self.train_run(kink=True)
        if not crossings:
            return [dataclasses.replace(r, note=join_notes(r.note, "no PReLU input crosses 0 between float32 and "
                                                                   "float64 in any step")) for r in rows]
        flips = [(f"step {i + 1} {k}", c, m) for i, k, c, m in crossings]
        return [old if old.passed else _rejudged(old, new, flips) for old, new in zip(rows, again)]

    def train_run(self, kink: bool = False) -> tuple[list[Row], list]:
        """``steps`` steps of ``TASK.optimizer`` (``clip_grad_norm_`` + AdamW under StepLR, the ``trainable_mask``)
        + ``TASK.loss`` vs ``official_optimizer`` + ``official_step`` (torch_ref.mesm_loss), dropout off, 2 steps per
        epoch with ``lr_drop`` 1 (the rate drops after every epoch: steps 3+ at lr x gamma, 5+ at lr x gamma^2), two
        alternating batches, the negatives and masked words of each step drawn from that step's ``sample`` key and
        injected into the twin. Float32: a float64 twin trains alongside (the bounded arbiter, and the AdamW replay
        of :class:`parity.check.AdamWReplay`)."""
        import jax
        import optax
        import torch

        from jaxprvr.tasks import vmr_detr
        from jaxprvr.tasks.vmr_detr import TASK
        from parity.check import AdamWReplay, ZeroList, _compare_trained
        from torch_ref.mesm_loss import official_optimizer, official_step

        spe = 2
        tcfg = self.spec.no_dropout(self.cfg)
        tcfg = dataclasses.replace(tcfg, train=dataclasses.replace(tcfg.train, lr_drop=1,
                                                                   n_epoch=max(tcfg.train.n_epoch, self.steps)))
        t = tcfg.train
        cases = [self.case, self.case2]
        twins = [self.twin_nd(self.twin64)] if self.f64 else [self.twin_nd(self.twin32), self.twin_nd(self.twin64)]
        init = {n: p.detach().clone() for n, p in twins[0].named_parameters()}
        opts = [official_optimizer(tw, t.lr, t.wd, t.lr_drop, t.lr_gamma) for tw in twins]
        crits = [self.criterion(tw) for tw in twins]
        params = self.params(twins[0])
        tx = TASK.optimizer(tcfg, params, spe)
        mask = tuple(sorted(k for k, v in _flatten(vmr_detr.trainable_mask(params, tcfg.model)).items() if not v))
        state = _compiled(("update", "init", tcfg, spe, mask), lambda: jax.jit(tx.init))(params)

        def make_update():
            def update(g, s, p):
                u, s = tx.update(g, s, p)
                return optax.apply_updates(p, u), s

            return jax.jit(update)

        update = _compiled(("update", tcfg, spe, mask), make_update)
        tab = make_table(tcfg.model)
        replay = None if self.f64 else AdamWReplay({n: _np(p) for n, p in init.items()}, t.adam_b1, t.adam_b2,
                                                   t.adam_eps, t.wd, t.max_grad_norm, self.tol.grad_rel)
        lrs, t_lrs, steps_seen = [], [], []
        crossings = []  # (step, PReLU call, inputs across 0, max |x|) of the kink run
        zero = ZeroList(self.spec.zero_gradients(tcfg))
        for i in range(self.steps):
            c = cases[i % 2]
            skey = jax.random.fold_in(self.key, 100 + i)
            neg, mlm = self.injected(c, skey)
            b, lw = c.n_rows, self.words_width(c)
            if replay is not None:  # JAX's gradient at the float64 twin's parameters of this step
                p64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), self.params(twins[1]))
                g_at64 = _flatten(jax.device_get(self.grad_tree(p64, c, skey, tcfg)[1]))
                if kink:  # float64's branches at this step's float64 parameters
                    branches = self.prelu_branches(self.params(twins[1]), c, neg, mlm)
            t_lrs.append(float(opts[0][0].param_groups[0]["lr"]))
            for tw, (opt, sched), crit in zip(twins, opts, crits):
                with self.mode(tw):
                    official_step(tw, crit, c.official, opt, t.max_grad_norm, dataset_name=self.dataset,
                                  words_feat=None if c.words is None else self.T(c.words, tw),
                                  neg_index=torch.as_tensor(np.array(neg[:b], np.int64)),
                                  masked_words=torch.as_tensor(np.array(mlm[:b, :lw], bool)))
                tw.eval()
                if (i + 1) % spe == 0:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        sched.step()
            lrs.append(float(TASK.lr_at(tcfg, spe)(i)))
            if kink and replay is not None:
                _, g, flips = self.kink_grad_tree(params, c, skey, branches)
                crossings += [(i, k, n, m) for k, n, m in flips]
            else:
                g = self.grad_tree(params, c, skey, tcfg)[1]
            params, state = update(g, state, params)
            if replay is not None:
                gt = [{n: _np(p.grad) for n, p in tw.named_parameters() if p.grad is not None} for tw in twins]
                gflat = _flatten(jax.device_get(g))
                names = [e for e in tab if e.torch in gt[1]]
                replay.step({e.torch: to_torch(e.kind, np.asarray(gflat[e.flax])) for e in names}, lrs[-1], gt[1],
                            gt[0], {e.torch: to_torch(e.kind, np.asarray(g_at64[e.flax])) for e in names})
            if i < self.steps - 1:  # the parameters after every step (the last one: the row below)
                row = _compare_trained(f"params after step {i + 1}", tab, jax.device_get(params),
                                       dict(twins[0].named_parameters()), None if self.f64 else dict(
                                           twins[1].named_parameters()), self.tol, zero,
                                       self.spec.adam_step_bound(tcfg, i + 1, lrs), replay)
                steps_seen.append(row)
        bound = self.spec.adam_step_bound(tcfg, self.steps, lrs)
        named = dict(twins[0].named_parameters())
        named64 = None if self.f64 else dict(twins[1].named_parameters())
        params = jax.device_get(params)
        rows = [_compare_trained(f"params after {self.steps} steps of TASK.optimizer (clip_grad_norm_ "
                                 f"{t.max_grad_norm:g}, AdamW wd {t.wd:g}, StepLR every epoch x {t.lr_gamma:g}, "
                                 f"2 steps per epoch; lr {', '.join(f'{x:.3g}' for x in lrs)}) vs official_optimizer + "
                                 "official_step", tab, params, named, named64, self.tol, zero, bound, replay)]
        worst = max(steps_seen, key=lambda r: r.max_rel) if steps_seen else None
        if worst is not None:
            bad = [r.stage for r in steps_seen if not r.passed]
            rows.insert(0, Row("train", f"params after each of steps 1-{self.steps - 1} (worst: {worst.stage})",
                               max(r.max_abs for r in steps_seen), worst.max_rel, worst.tolerance, not bad,
                               join_notes(f"failing: {', '.join(bad)}" if bad else "", worst.note[:200])))
        rows.append(close_row("train", f"learning rate of each step: TASK.lr_at vs the official StepLR stepped every "
                                       f"{spe} steps ({', '.join(f'{x:.3g}' for x in t_lrs)})", np.asarray(lrs),
                              np.asarray(t_lrs), 2 * self.tol.eps, 0.0, "JAX's schedule in the default float dtype"))
        listed = [n for n, p in twins[0].named_parameters() if p.grad is None]
        flat = _flatten(params)
        fl = {e.torch: e for e in tab}
        bad = [k for k in listed if not (torch.equal(named[k].detach(), init[k]) and np.array_equal(
            to_torch(fl[k].kind, np.asarray(flat[fl[k].flax])), _np(init[k])))]
        rows.append(Row("train", f"never-updated tensors ({len(listed)}: grad None in torch, trainable_mask False) "
                                 "bit-identical to their start (no AdamW step, no decay)", 0.0 if not bad else
                        float("inf"), 0.0, "bit-identical", not bad and bool(listed),
                        f"changed: {bad[:4]}" if bad else ", ".join(listed[:3]) + (" ..." if len(listed) > 3 else "")))
        return rows, crossings

    # -- dropout on
    def dropout_shapes(self, params, case: Case, neg, mlm, dkey) -> dict:
        """The input shape of every train-mode Flax dropout call with a rate > 0, by module path, in call order."""
        import flax.linen as nn
        import jax

        from jaxprvr.models.layers import Dropout

        shapes: dict[str, list] = {}

        def record(next_fun, args, kwargs, context):
            m = context.module
            if isinstance(m, Dropout) and context.method_name == "__call__":
                det = kwargs.get("deterministic", args[1] if len(args) > 1 else False)
                if not det and m.rate > 0:
                    shapes.setdefault("/".join(m.path), []).append(tuple(args[0].shape))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            jax.eval_shape(lambda p: self.model.apply({"params": p}, case.flax(), train=True, with_neg=True,
                                                      neg_index=neg, mlm_mask=mlm, rngs={"dropout": dkey}), params)
        return shapes

    def dropout_rows(self) -> list[Row]:
        """Dropout ON (the config's rates: ``input_dropout`` in the LinearLayers, ``dropout`` in the T2V / encoder /
        decoder layers and on every attention's probabilities), the same masks in both frameworks: each Flax
        dropout call's key drives the twin's :class:`~torch_ref.dropout.HashDropout` at the same module, its
        counters those of the same element in the padded static batch (:func:`_prefix_index`); the twin's
        negative branch also runs the decoder (its outputs are discarded officially; Flax skips it), whose dropouts
        get masks of their own. Outputs, every loss term and the gradients."""
        import jax

        from torch_ref.dropout import Draw, SharedDropoutError, arm, collect_keys, hash_dropouts, key_seeds, \
            torch_dropout_name

        c = self.cfg.model
        if c.dropout == 0.0 and c.input_dropout == 0.0:
            return [Row("dropout", "no dropout in this config (model.dropout = model.input_dropout = 0)", 0.0, 0.0,
                        "-", True)]
        case = self.case
        dkey, skey = jax.random.fold_in(self.key, 7), jax.random.fold_in(self.key, 8)
        neg, mlm = self.injected(case, skey)
        t32, t64 = copy.deepcopy(self.twin32), copy.deepcopy(self.twin64)
        params = self.params(t64 if self.f64 else t32)
        (j_out, j_aux), new = self.flax_forward(params, case, True, neg, mlm, capture=True, dkey=dkey)
        keys = collect_keys(new.get("dropout_keys", {}))
        shapes = self.dropout_shapes(params, case, neg, mlm, dkey)

        def draws_for(tw):
            draws: dict[str, list] = {}
            for path, ks in keys.items():
                if len(shapes.get(path, ())) != len(ks):
                    raise SharedDropoutError(f"{path}: {len(ks)} keys but {len(shapes.get(path, ()))} shapes")
                name = torch_dropout_name(tw, path)
                draws.setdefault(name, []).extend(
                    Draw(key_seeds(k), _prefix_index(shapes[path][i]), f"{path} call {i}") for i, k in enumerate(ks))
            for name, m in hash_dropouts(tw).items():
                if name.startswith("transformer.decoder.") and m.p > 0:
                    draws.setdefault(name, []).append(Draw((0x5EED, 0xD0), None, "the negative branch's decoder"))
            return draws

        outs, grads, losses = {}, {}, {}
        try:
            for tw in (t32, t64):
                f64 = self.is64(tw)
                with arm(tw, draws_for(tw)):
                    outs[f64] = self.twin_run(tw, case, True, neg, mlm)
                if self.dropout_grads:
                    with arm(tw, draws_for(tw)):
                        tl_, g, none, terms = self.torch_grads(tw, case, neg, mlm)
                    grads[f64], losses[f64] = g, (tl_, terms)
        except SharedDropoutError as e:
            return [Row("dropout", "the same dropout calls in both frameworks", float("inf"), float("inf"),
                        "every Flax draw consumed by the twin, and only those", False, str(e))]
        rows = []
        t_out, t_aux = outs[self.f64]
        rows += self.output_rows("dropout", j_out, t_out, " [train, dropout on]", self.tol.model)
        rows.append(self.aux_row("dropout", j_aux, t_aux, " [train, dropout on]", self.tol.model))
        j_nd, _ = self.flax_forward(params, case, True, neg, mlm, model=self.model_nd)
        dd = float(np.abs(np.asarray(j_out["pred_spans"]) - np.asarray(j_nd["pred_spans"]))[:case.n_rows].max())
        rows.append(Row("dropout", f"dropout is on: pred_spans differ from the dropout-off forward by {dd:.2e}", dd, dd,
                        f"> {QUIRK_BITES:g}", dd > QUIRK_BITES))
        if self.dropout_grads:
            jl, jg, jterms = self.jax_grads(params, case, skey, cfg=self.cfg, model=self.model, dkey=dkey)
            tl_, tterms = losses[self.f64]
            rows += _loss_rows_f32("dropout", jl, jterms, tl_, tterms, self.tol.loss, " [dropout on]")[:-1]
            rows += self.grad_compare(jl, jg, tl_, grads[self.f64], grads[False], grads[True],
                                      f"d loss / d param, dropout on ({len(jg)} tensors)", self.cfg,
                                      group="dropout", loss_stage="training loss, dropout on")
        else:  # the criterion on each framework's own dropout-on outputs (no second compiled gradient program)
            import torch

            crit = self.criterion(t64 if self.f64 else t32)
            with self.mode(t64 if self.f64 else t32), torch.no_grad():
                tterms, tl_ = crit(t_out, case.official, is_training=True)
            jl, jterms = self.jax_loss({k: v for k, v in j_out.items()}, case)
            rows += _loss_rows_f32("dropout", jl, jterms, float(_np(tl_)), {k: float(_np(v)) for k, v in tterms.items()},
                               self.tol.loss, " [dropout on, each framework's outputs]")
        n_calls = sum(len(v) for v in keys.values())
        rows.append(Row("dropout", f"dropout calls mapped (Flax draw -> the twin's module, padded counters): "
                                   f"{len(keys)} modules, {n_calls} calls", 0.0, 0.0, "all consumed", True,
                        ", ".join(sorted(keys))[:160]))
        return rows

    # -- metrics
    def metric_rows(self) -> list[Row]:
        """A whole synthetic evaluation split (the config's selection split): :class:`jaxprvr.tasks.vmr_detr.
        Evaluator` (the Flax model, the task's batches, the official post-processing and metrics) vs the twin's
        outputs on the official batches of the same plan through :func:`jaxprvr.metrics.moments.postprocess` +
        :func:`~jaxprvr.metrics.moments.eval_submission`: the submissions and the metric dicts. Float32: a
        difference passes only where every differing submission row is a rounding-boundary crossing (one rounding
        unit per field)."""
        from jaxprvr.metrics.moments import eval_submission, official_dataset_name, postprocess
        from jaxprvr.tasks.vmr_detr import Evaluator

        d = self.cfg.data
        split = self.facts.official_selection[0]
        ds = self.spec.open_split(self.cfg, self.root, split)
        params = self.params(self.twin)
        j_res = Evaluator(self.model, self.cfg).evaluate(params, ds, keep_outputs=True)
        t_sub, n_batches, durations = [], 0, {}
        for b, s in ds.batches(None, False):
            o = b.official
            n = len(o["qid"])
            qs = [ds.ds.queries[r] for item in b.items for r in item]
            durations.update((q.qid, q.duration) for q in qs)
            starts = np.cumsum([0] + [len(it) for it in b.items])  # the negatives: the next item's first row
            neg = np.concatenate([np.full(len(it), starts[(i + 1) % len(b.items)]) for i, it in enumerate(b.items)])
            case = Case(o, s, None if np.ndim(o["words_id"]) == 3 else s["words_feat"][:n], b.items)
            t_out, _ = self.twin_run(self.twin, case, False, neg, np.zeros(np.shape(s["words_mask"]), bool))
            t_sub += postprocess(*(_np(t_out[k]) for k in ("pred_logits", "pred_spans", "saliency_scores")),
                                 np.asarray([q.duration for q in qs]), clip_len=d.clip_len, max_ts_val=d.max_ts_val,
                                 qid=[q.qid for q in qs], query=[q.sentence for q in qs], vid=[q.video_id for q in qs],
                                 video_mask=np.asarray(o["video_mask"]))
            n_batches += 1
        t_res = eval_submission(t_sub, ds.ds.gt_rows(), official_dataset_name(d.dataset))
        n_q = len(t_sub)
        explained = None if self.f64 else _rounding_explained(j_res["_submission"], t_sub, d.clip_len, durations,
                                                              float(sum(self.tol.model)))
        same = sum(a["pred_relevant_windows"] == b["pred_relevant_windows"]
                   and a.get("pred_saliency_scores") == b.get("pred_saliency_scores")
                   for a, b in zip(j_res["_submission"], t_sub))
        ok = same == n_q == len(j_res["_submission"]) or (explained is not None and explained[0])
        rows = [Row("metrics", f"submission rows of a whole synthetic {split} split ({n_q} queries, {n_batches} "
                               f"batches): identical in {same}", float(n_q - same), float(n_q - same),
                    "identical" + ("" if self.f64 else " or rounding-boundary crossings"), ok,
                    "" if same == n_q else (explained[1] if explained else ""))]
        rows.append(_dict_row(f"metrics of the {split} split (Evaluator vs the twin's outputs -> postprocess + "
                              "eval_submission)", {k: v for k, v in j_res.items() if not k.startswith("_")},
                              dict(t_res["brief"]), f"{n_q} queries", explained))
        return rows


def _prelu_recorder(seen: dict):
    """A Flax method interceptor recording ``seen["<module path>#<call>"] = x >= 0`` for every PReLU call (the
    branch each input takes)."""
    import collections

    from jaxprvr.models.mesm import PReLU

    counts = collections.Counter()

    def icpt(next_fun, args, kwargs, ctx):
        if isinstance(ctx.module, PReLU) and ctx.method_name == "__call__":
            path = "/".join(ctx.module.path)
            counts[path] += 1
            seen[f"{path}#{counts[path]}"] = args[0] >= 0
        return next_fun(*args, **kwargs)

    return icpt


def _prelu_forcer(branches: Mapping, crossed: dict):
    """An interceptor making every PReLU call take the slope of ``branches`` (as :func:`_prelu_recorder` keyed) and
    recording ``crossed[tag] = (count, max |x|)`` of the inputs on the other side of 0."""
    import collections

    import jax.numpy as jnp

    from jaxprvr.models.mesm import PReLU

    counts = collections.Counter()

    def icpt(next_fun, args, kwargs, ctx):
        if isinstance(ctx.module, PReLU) and ctx.method_name == "__call__":
            path = "/".join(ctx.module.path)
            counts[path] += 1
            tag = f"{path}#{counts[path]}"
            x, a = args[0], ctx.module.get_variable("params", "weight")
            other = (x >= 0) != branches[tag]
            crossed[tag] = (jnp.sum(other), jnp.max(jnp.where(other, jnp.abs(x), 0)))
            return jnp.where(branches[tag], x, a.astype(x.dtype) * x)
        return next_fun(*args, **kwargs)

    return icpt


def _rejudged(old: Row, new: Row, flips: list) -> Row:
    """``new`` (a float32 row recomputed with float64's PReLU branches) labelled as such: how many inputs crossed 0,
    the first crossings (``(where, count, max |x|)``) and what ``old`` (float32's own branches) gave."""
    n = sum(c for _, c, _ in flips)
    what = ", ".join(f"{k}: {c} (|x| <= {m:.1e})" for k, c, m in flips[:3])
    return dataclasses.replace(new, stage=f"{new.stage} [float32 with float64's PReLU branch at the {n} inputs that "
                                          f"cross 0]", note=join_notes(
        f"float32's own branches: {'PASS' if old.passed else 'FAIL'} ({old.max_abs:.2e}, {old.max_rel:.2e}); "
        f"crossings: {what}", new.note))


def _flips(crossed) -> list:
    """``[(call, count, max |x|)]`` of the PReLU calls with inputs across 0 (from :func:`_prelu_forcer`)."""
    import jax

    return [(k, int(n), float(m)) for k, (n, m) in jax.device_get(crossed).items() if int(n)]


def _loss_rows_f32(group, jl, jterms, tl_, tterms, rtol_atol, suffix="") -> list[Row]:
    """:func:`parity.check._loss_rows` with the two logged accuracies at their official float32 resolution in every
    mode (``.float()``, criterion.py L135-137, L293-294): ``class_error`` (a percentage: atol 100 x 4 eps32) and
    ``rec_fw_acc`` (atol 4 eps32)."""
    from parity.check import _loss_rows
    from parity.rows import EPS32

    rows = _loss_rows(group, jl, jterms, tl_, tterms, rtol_atol, suffix)
    for i, r in enumerate(rows):
        for term, scale in (("class_error", 100.0), ("rec_fw_acc", 1.0)):
            key = r.stage[len("term "):].split(" ")[0]
            if r.stage.startswith(f"term {term}") and key in jterms and key in tterms:
                tol = (max(rtol_atol[0], 4 * EPS32), max(rtol_atol[1], 4 * EPS32 * scale))
                rows[i] = close_row(group, r.stage, jterms[key], tterms[key], *tol,
                                    note="computed in float32 officially (.float())")
    return rows


def _group_slots(row_group, slots: int):
    """SS-MESM's slot layout in numpy (``split_expand_and_pad(num_clips, num_clips, ...)``, model.py L199): row b's
    slot j holds row ``start_b + j`` of its item for ``j < n_b``; ``(slot_rows, slot_valid, own slot)``."""
    g = np.asarray(row_group)
    r = len(g)
    start = np.array([int(np.flatnonzero(g == g[b])[0]) if g[b] >= 0 else b for b in range(r)])
    n = np.array([int(np.sum(g == g[b])) if g[b] >= 0 else 0 for b in range(r)])
    j = np.arange(slots)[None, :]
    return (np.clip(start[:, None] + j, 0, r - 1).astype(np.int32), j < n[:, None],
            (np.arange(r) - start).astype(np.int32))


def _rounding_explained(j_sub, t_sub, clip_len, durations=None, out_tol: float = 0.0) -> tuple[bool, str]:
    """Whether two float32 submissions differ only by rounding-boundary crossings: per query the same windows up to
    one rounding unit per field (``clip_len`` for the windows, 1e-4 for scores and ``clip_len = -1`` windows) and
    ``pred_saliency_scores`` up to one float16 step. Returns ``(ok, note)``.

    ``out_tol``: the elementwise tolerance the model-output rows grant the normalised outputs (``rtol + atol``: spans
    in [0, 1], logits), carried through the post-processing: a window edge ``(c -+ w/2) * duration`` moves by up to
    ``1.5 out_tol * duration`` seconds (``durations[qid]``), a score ``softmax(logits)[0]`` by up to ``out_tol /
    2`` and a saliency score by ``out_tol * max(|s|, 1)``, before its rounding. Where the rounding unit is coarser
    than that (windows of Charades, QVHighlights: 1 s, 2 s clips) nothing changes; float16 saliency scores near 0 have
    steps of ~1e-7, below float32's absolute noise (TACoS at the official size: 2.4e-7 apart at 1.7e-4, two steps)."""
    changed = explained = 0
    for a, b in zip(j_sub, t_sub):
        if a["pred_relevant_windows"] == b["pred_relevant_windows"] and a.get("pred_saliency_scores") == b.get(
                "pred_saliency_scores"):
            continue
        changed += 1
        wa, wb = np.asarray(a["pred_relevant_windows"], np.float64), np.asarray(b["pred_relevant_windows"], np.float64)
        unit = np.asarray([clip_len, clip_len, 1e-4] if clip_len > 0 else [1e-4] * 3)
        dur = float(durations[a["qid"]]) if durations is not None else 0.0
        unit = unit + np.asarray([1.5 * out_tol * dur, 1.5 * out_tol * dur, out_tol / 2])
        ok = wa.shape == wb.shape
        if ok:  # one rounding unit, plus the float32 spacing the rounded values are stored with
            sa, sb = wa[np.lexsort(wa.T[::-1])], wb[np.lexsort(wb.T[::-1])]
            room = unit + 4 * np.spacing(np.maximum(np.abs(sa), np.abs(sb)).astype(np.float32)).astype(np.float64)
            ok = bool(np.all(np.abs(sa - sb) <= room))
        sal_a, sal_b = a.get("pred_saliency_scores"), b.get("pred_saliency_scores")
        if ok and sal_a is not None and sal_b is not None:
            x, y = np.asarray(sal_a, np.float16), np.asarray(sal_b, np.float16)
            big = np.maximum(np.abs(x), np.abs(y)).astype(np.float64)
            ok = x.shape == y.shape and bool(np.all(np.abs(x.astype(np.float64) - y.astype(np.float64)) <= np.spacing(
                np.maximum(np.abs(x), np.abs(y))).astype(np.float64) * 1.0001 + out_tol * np.maximum(big, 1.0)))
        explained += ok
    return changed == explained, (f"{changed} submission rows differ, {explained} of them by one rounding step"
                                  + (f" after the model outputs' tolerance {out_tol:g}" if out_tol else ""))


def jax_sigmoid(x):
    import jax

    return jax.nn.sigmoid(x)


def _sine_position64(mask, num_pos_feats, temperature=10000.0, normalize=True, scale=2 * math.pi):
    """``PositionEmbeddingSine`` (position_encoding.py L61-72) in float64 (the float64 twin's positions: the
    official code builds them in float32, which a float64 comparison must not inherit)."""
    import torch

    x = mask.cumsum(1, dtype=torch.float64)
    if normalize:
        x = x / (x[:, -1:] + 1e-6) * scale
    dim_t = temperature ** (2 * torch.div(torch.arange(num_pos_feats, dtype=torch.float64), 2,
                                          rounding_mode="trunc") / num_pos_feats)
    p = x[:, :, None] / dim_t
    return torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2)


def _sine_embed64(pos_tensor, dim):
    """``gen_sineembed_for_position`` (transformer.py L43-59) with a float64 ``dim_t``."""
    import torch

    each = dim // 2
    dim_t = 10000 ** (2 * torch.div(torch.arange(each, dtype=torch.float64), 2, rounding_mode="trunc") / each)
    out = []
    for c in (0, 1):
        p = (pos_tensor[:, :, c] * (2 * math.pi))[:, :, None] / dim_t
        out.append(torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2))
    return torch.cat(out, dim=2)


@contextlib.contextmanager
def _twin_mode(twin):
    """A float64 twin computes in float64 throughout: torch's default dtype float64 (the decoder's zero ``tgt``,
    the criterion's constants) and the two position functions in float64 (:func:`_sine_position64`,
    :func:`_sine_embed64`), as the Flax model does under ``compute_dtype=float64``. A float32 twin runs as is (the
    official arithmetic: float32 positions, as the Flax model's in float32)."""
    import torch

    import torch_ref.mesm as tm

    if next(twin.parameters()).dtype != torch.float64:
        yield
        return
    old = (torch.get_default_dtype(), tm.sine_position, tm.gen_sineembed_for_position)
    torch.set_default_dtype(torch.float64)
    tm.sine_position, tm.gen_sineembed_for_position = _sine_position64, _sine_embed64
    try:
        yield
    finally:
        torch.set_default_dtype(old[0])
        tm.sine_position, tm.gen_sineembed_for_position = old[1], old[2]


Spec.twin_mode = staticmethod(_twin_mode)
