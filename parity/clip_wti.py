"""BackBone_tvr (``clip_wti``): the key table, checkpoint conversion and ``python -m parity.check --model clip_wti``.

BackBone_tvr saves ``torch.save(model.state_dict())`` (``main_retrieval.py`` L205-212): 359 keys for ViT-B/32 with
4 seqTransf blocks, in ``named_parameters`` order -- ``clip.`` + OpenAI's 302 (:mod:`parity.clip`),
``text_weight_fc.{0,2}``, ``video_weight_fc.{0,2}``, ``frame_position_embeddings.weight``,
``transformerClip.resblocks.{i}`` (CLIP-style blocks whose LayerNorms are ``until_module.LayerNorm``: same key
names). The CLIP tensors are float32 from a CPU run and float16 from a CUDA run (``convert_weights``); both are
read, cast to float32, and their dtypes kept for the way back.

Conversion (``python -m parity.convert``, :func:`torch2jax` / :func:`jax2torch`):

* ``torch2jax --model clip_wti --config C FILE OUT``: a BackBone_tvr state dict (``pytorch_model.bin.N``,
  ``best.pth``; read without running its pickle, :func:`jaxprvr.data.torch_pt.read_state_dict_any`) ->
  ``OUT/ckpt/best`` (float32 params; ``meta``: the config with the weights' CLIP sizes and ``model.clip = ""``,
  the source, each key's stored dtype ``source_dtypes``, the epoch of a ``.bin.N`` name), which
  ``python -m jaxprvr.evaluate --config C --model clip_wti --ckpt OUT`` loads.
* ``jax2torch --model clip_wti --config C RUN OUT.bin``: the official state dict (the 359 keys in
  ``named_parameters`` order, strict-loadable into :class:`torch_ref.clip_wti.BackBoneTVR`), each tensor in the
  dtype it came in with (``source_dtypes`` of a converted checkpoint: a CUDA run's fp16 CLIP tensors come back
  fp16, bit-exact) or float32 (a jaxprvr run).

``parity.check`` (:class:`ClipWTICheck`; docs/parity.md, "CLIP + seqTransf + WTI"): every row compares the Flax
model (:mod:`jaxprvr.models.clip_wti`) with the twin (:mod:`torch_ref.clip_wti`) on the same weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np

from jaxprvr.errors import JaxprvrError
from jaxprvr.models.clip_wti import clip_dims, with_clip_dims
from parity.base import FamilyCheck, FamilySpec, OwnStages, checkpoint_config, prepare_out_dir
from parity.clip import _flatten, _unflatten, clip_rows, transformer_rows
from parity.keys import Entry, check_table, linear, to_flax, to_torch
from parity.rows import EPS32, Row, as_numpy, close_row, join_notes, nonfinite
from torch_ref.t2v_eval import official_compute_metrics


def key_rows(model_cfg) -> list[Entry]:
    dims = clip_dims(model_cfg)
    rows = clip_rows(dims, prefix="clip.", fprefix="clip/")
    for head in ("text_weight_fc", "video_weight_fc"):
        rows += linear(f"{head}.0", f"{head}/fc_0") + linear(f"{head}.2", f"{head}/fc_2")
    if model_cfg.agg_module == "seqTransf":
        rows.append(Entry("frame_position_embeddings.weight", "frame_position_embeddings/embedding", "embedding"))
        rows += transformer_rows("transformerClip", "transformerClip", model_cfg.num_hidden_layers)
    return rows


def make_table(model_cfg) -> tuple:
    return check_table(key_rows(model_cfg))


def _dims_of(sd: Mapping, model_cfg, where):
    """The CLIP sizes of a BackBone_tvr state dict (:meth:`CLIPDims.from_state_dict` under ``clip.``) with the head
    counts of ``model_cfg`` (the weights do not record them: 0 = OpenAI's ``width // 64``)."""
    from jaxprvr.models.clip import CLIPDims

    class Unchecked(CLIPDims):  # the heads are not known yet: validated below with the configured ones
        def validate(self, where="CLIPDims"):
            return self

    raw = Unchecked.from_state_dict(sd, "clip.", where)
    kw = {f.name: getattr(raw, f.name) for f in dataclasses.fields(CLIPDims)}
    kw.update(vision_heads=model_cfg.vision_heads, text_heads=model_cfg.text_heads)
    try:
        return CLIPDims(**kw).validate(where)
    except JaxprvrError as e:
        raise JaxprvrError(where, e.expected, e.found, hint="a state dict does not record head counts: set "
                           "model.vision_heads / model.text_heads (0 = width // 64)") from None


def torch_to_params(model_cfg, state_dict: Mapping, where="state_dict", dtype=np.float32):
    """A BackBone_tvr ``state_dict`` -> ``(model_cfg with the weights' CLIP sizes, params in ``dtype`` (float32;
    float64 for the float64 parity runs), the stored dtypes)``; keys must match exactly (``module.`` prefixes of a
    DDP save stripped). The head counts are the config's (``model.vision_heads`` / ``model.text_heads``; 0 =
    OpenAI's ``width // 64``): a state dict does not record them."""
    from parity.convert import to_numpy

    sd = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in state_dict.items())
    dims = _dims_of(sd, model_cfg, where)
    cfg = with_clip_dims(model_cfg, dims)
    table = make_table(cfg)
    expected = [e.torch for e in table]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in set(expected) and k[5:] not in ("input_resolution", "context_length",
                                                                            "vocab_size")]
    if missing or unexpected:
        raise JaxprvrError(where, f"the {len(expected)} BackBone_tvr keys (agg_module {cfg.agg_module}, "
                           f"{cfg.num_hidden_layers} seqTransf blocks)",
                           f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                           f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    flat, dtypes = {}, OrderedDict()
    for e in table:
        a = to_numpy(sd[e.torch])
        dtypes[e.torch] = str(a.dtype)
        flat[e.flax] = to_flax(e.kind, a.astype(dtype))
    params = _unflatten(flat)
    _check_shapes(cfg, params, where)
    return cfg, params, dtypes


def _check_shapes(cfg, params, where):
    import jax

    from jaxprvr.models.clip_wti import ClipWTI

    r, t = cfg.image_resolution, 2
    shapes = jax.eval_shape(lambda: ClipWTI(cfg).init(
        jax.random.key(0), np.zeros((1, 4), np.int32), np.ones((1, 4), np.int32),
        np.zeros((1, t, 3, r, r), np.float32), np.ones((1, t), np.int32), method="forward")["params"])
    want, got = _flatten(shapes), _flatten(params)
    for path in sorted(set(want) | set(got)):
        if path not in got or path not in want:
            raise JaxprvrError(where, "the parameters ClipWTI creates", f"{'missing' if path not in got else 'extra'} "
                               f"{path}")
        if tuple(np.shape(got[path])) != tuple(want[path].shape):
            raise JaxprvrError(where, f"{path} of shape {tuple(want[path].shape)}", f"{tuple(np.shape(got[path]))}")


def params_to_torch(model_cfg, params: Mapping, dtypes: Mapping | None = None,
                    where="params") -> "OrderedDict[str, np.ndarray]":
    """Flax params -> the BackBone_tvr ``state_dict`` (official order), each key in ``dtypes[key]`` (default: the
    array's own dtype): the inverse of :func:`torch_to_params`, bit-exact."""
    flat = _flatten(params)
    out = OrderedDict()
    for e in make_table(model_cfg):
        if e.flax not in flat:
            raise JaxprvrError(where, f"the Flax parameter {e.flax}", "none")
        a = to_torch(e.kind, np.asarray(flat[e.flax]))
        out[e.torch] = a.astype(dtypes[e.torch]) if dtypes and e.torch in dtypes else a
    return out



# ---------------------------------------------------------------------------------------------- the twin


def twin_dims(model_cfg) -> dict:
    """The :class:`torch_ref.clip.CLIP` sizes of a :class:`~jaxprvr.config.ClipWTIConfig` (heads as the Flax model
    resolves them: the configured count, else OpenAI's ``width // 64``)."""
    d = clip_dims(model_cfg)
    return dict(embed_dim=d.embed_dim, image_resolution=d.image_resolution, vision_layers=d.vision_layers,
                vision_width=d.vision_width, vision_patch_size=d.vision_patch_size, context_length=d.context_length,
                vocab_size=d.vocab_size, transformer_width=d.text_width, transformer_heads=d.t_heads,
                transformer_layers=d.text_layers, vision_heads=d.v_heads)


BIAS_LN_STD = 0.1  # the random twin's biases and LayerNorm scales/shifts: + N(0, 0.1^2)
SHIFT_BIAS = ("weight-MLP output bias: one constant added to every token's logit before the softmax over tokens "
              "(softmax shift-invariance)")


def _perturb_bias_ln(model, generator, skip: str | None = None):
    """Every bias and LayerNorm tensor of ``model`` (the official inits leave them 0 / 1: a swapped or dropped one
    would go unseen; names starting with ``skip`` excepted) ``+ N(0, BIAS_LN_STD^2)``."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if skip is not None and n.startswith(skip):
                continue
            if n.endswith("bias") or ".ln_" in "." + n:
                p.add_(BIAS_LN_STD * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype))


def random_twin(model_cfg, seed: int = 0):
    """The twin as the official construction builds it (:func:`torch_ref.clip_wti.official_init`: ``init_weights``,
    the CLIP load, the initialisation trick) from a random CLIP at the config's sizes (torch's / OpenAI's init,
    ``logit_scale = ln(1/0.07)``), the CLIP's biases and LayerNorms perturbed before the load and the head's
    (weight MLPs, seqTransf) after it. Global RNG state untouched."""
    import torch

    from torch_ref.clip import CLIP
    from torch_ref.clip_wti import official_init

    dims = twin_dims(model_cfg)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip = CLIP(**dims)
        g = torch.Generator().manual_seed(500 + seed)
        _perturb_bias_ln(clip, g)
        with torch.no_grad():
            clip.logit_scale.fill_(math.log(1 / 0.07))
        twin = official_init(clip.state_dict(), model_cfg.agg_module, model_cfg.num_hidden_layers, seed=42 + seed,
                             dims=dims)
    _perturb_bias_ln(twin, g, skip="clip.")  # the head's zero biases and unit TF LayerNorms
    return twin.eval()


def read_backbone(path) -> "OrderedDict[str, np.ndarray]":
    """A BackBone_tvr checkpoint file (``torch.save(model.state_dict())``) as numpy arrays by key."""
    from jaxprvr.data.torch_pt import read_state_dict_any

    path = Path(path)
    if not path.is_file():
        raise JaxprvrError(path, "a BackBone_tvr state dict (pytorch_model.bin.N / best.pth)", "no such file")
    return read_state_dict_any(path)


def twin_from_state_dict(model_cfg, sd: Mapping, where="state_dict"):
    """``(model_cfg with the weights' CLIP sizes, float32 twin holding ``sd``)``; the keys are checked by
    :func:`torch_to_params` (one error naming the missing / unexpected ones)."""
    import torch

    from torch_ref.clip_wti import BackBoneTVR

    cfg, _, _ = torch_to_params(model_cfg, sd, where)
    sd = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in sd.items())
    with torch.random.fork_rng():
        twin = BackBoneTVR(twin_dims(cfg), cfg.agg_module, cfg.num_hidden_layers)
    tensors = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in sd.items()
               if k[5:] not in ("input_resolution", "context_length", "vocab_size")}
    try:
        twin.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise JaxprvrError(where, "a BackBone_tvr state dict matching the config",
                           str(e).splitlines()[0]) from None
    return cfg, twin.eval()


def twin_params(model_cfg, twin) -> dict:
    """The Flax params of ``twin``'s weights (numpy, the twin's dtype), through the key table."""
    sd = {k: v.detach().cpu().numpy() for k, v in twin.state_dict().items()}
    return _unflatten({e.flax: to_flax(e.kind, sd[e.torch]) for e in make_table(model_cfg)})


# ---------------------------------------------------------------------------------------------- the spec


class Spec(OwnStages, FamilySpec):
    name = "clip_wti"
    check_class = "ClipWTICheck"
    official_layout = "BackBone_tvr state_dict (torch.save(model.state_dict()): pytorch_model.bin.N / best.pth)"

    @property
    def table(self):
        from jaxprvr.config import ClipWTIConfig

        return make_table(ClipWTIConfig())

    def table_for(self, model_cfg):
        return make_table(model_cfg)

    def read_variables(self, path, cfg, overrides=()):
        """``jaxprvr.load``: BackBone_tvr's ``pytorch_model.bin.N``: the CLIP sizes come from the file, the CLIP is in
        the parameters."""
        model_cfg, params, _ = torch_to_params(cfg.model, read_backbone(path), where=str(path))
        return dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, clip="")), params, {}

    _resolved = None  # (the config a check ran on, its model config with a --ckpt's CLIP sizes)

    def describe(self, cfg) -> str:
        m = cfg.model
        if self._resolved is not None and self._resolved[0] is cfg:  # the sizes of the checkpoint the check read
            m = self._resolved[1]
        d = clip_dims(m)
        agg = (f"seqTransf {m.num_hidden_layers} blocks" if m.agg_module == "seqTransf" else "agg None")
        return (f"CLIP ViT {d.vision_width}w x {d.vision_layers} (patch {d.vision_patch_size}, {d.image_resolution} "
                f"px, {d.v_heads} heads), text {d.text_width}w x {d.text_layers} ({d.t_heads} heads, vocab "
                f"{d.vocab_size}), embed {d.embed_dim}; {agg}; max_words {m.max_words}, max_frames {m.max_frames}")

    def zero_gradients(self, cfg) -> tuple:
        """The last bias of each weight MLP: one constant added to every token's weight logit before the softmax
        over the tokens (``masked_fill`` then replaces only the padded ones), so its gradient is zero in exact
        arithmetic (softmax shift-invariance) and float noise in both frameworks."""
        from parity.prvr import ZeroGrad

        return tuple(ZeroGrad(rf"{h}_weight_fc\.2\.bias", SHIFT_BIAS) for h in ("text", "video"))

    def adam_step_bound(self, cfg, lrs) -> float:
        """The most two BertAdam runs (no bias correction, ``eps`` added to ``sqrt(v)``) from the same weights can
        move one entry of a head tensor apart whatever its gradients: per step ``lr_t |m_t / sqrt(v_t)| <= lr_t
        (1 - b1) / sqrt(1 - b2) sqrt(sum_{k<t} (b1^2 / b2)^k)`` (Cauchy-Schwarz on the two moving averages),
        summed over the steps, twice (one per framework)."""
        b1, b2 = cfg.train.adam_b1, cfg.train.adam_b2
        total = sum(float(lr) * (1 - b1) / math.sqrt(1 - b2) * math.sqrt(sum((b1 * b1 / b2) ** k for k in range(t)))
                    for t, lr in enumerate(lrs, 1))
        return 2.0 * total * (1.0 + 1e-3)

    def make_batch(self, model_cfg, n_videos: int = 4, seed: int = 0, counts=None) -> dict:
        """``n_videos`` (caption, video) pairs: captions of several lengths (SOT ... EOT, 0-padded; one filling
        ``max_words``; ``counts``: the caption lengths instead), videos with padded frames (zeros, mask 0: one
        full, one with a single frame, ...); the frames are N(0, 1) pixels (the scale of normalised images)."""
        m = model_cfg
        rng = np.random.default_rng(seed)
        n, L, T, R, V = n_videos, m.max_words, m.max_frames, m.image_resolution, m.vocab_size
        lengths = [L, 3, max(3, L // 2 + 1), max(3, L - 2)]
        frames = [T, 1, max(1, T - 1), max(1, (T + 1) // 2)]
        ids = np.zeros((n, L), np.int32)
        tm = np.zeros((n, L), np.int32)
        video = np.zeros((n, T, 3, R, R), np.float32)
        vm = np.zeros((n, T), np.int32)
        for b in range(n):
            k = min(L, lengths[b % len(lengths)]) if counts is None else int(counts[b])
            ids[b, 0], ids[b, k - 1] = V - 2, V - 1  # SOT, EOT (the largest id: argmax)
            ids[b, 1:k - 1] = rng.integers(1, V - 2, k - 2)
            tm[b, :k] = 1
            f = frames[b % len(frames)]
            video[b, :f] = rng.standard_normal((f, 3, R, R))
            vm[b, :f] = 1
        return {"text_ids": ids, "text_mask": tm, "video": video, "video_mask": vm}


SPEC = Spec()


# ---------------------------------------------------------------------------------------------- conversion CLI


def _epoch_of(path: Path) -> int | None:
    """``N`` of the official ``pytorch_model.bin.N`` (``save_model``'s epoch suffix), else ``None``."""
    suffix = path.name.rsplit(".", 1)[-1]
    return int(suffix) if path.name.startswith("pytorch_model.bin.") and suffix.isdigit() else None


def torch2jax(args, cfg) -> dict:
    from jaxprvr.checkpoint import Checkpoints
    from parity.convert import flatten

    src = Path(args.input)
    sd = read_backbone(src)
    model_cfg, params, dtypes = torch_to_params(cfg.model, sd, where=str(src))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, clip=""))  # the CLIP is in the params
    out, ckpt_dir = prepare_out_dir(args.out_dir, args.force)
    epoch = _epoch_of(src)
    meta = dict(config=cfg.to_dict(), source=str(src.absolute()), source_layout=SPEC.official_layout,
                source_dtypes=dict(dtypes), epoch=-1 if epoch is None else epoch)
    ckpts = Checkpoints(ckpt_dir, slots=("best",))
    ckpts.save("best", 0, params, None, meta=meta)
    ckpts.close()
    kinds = sorted(set(dtypes.values()))
    return dict(model=cfg.model.name, input=str(src), out=str(out), tensors=len(dtypes),
                parameters=int(sum(np.size(a) for a in flatten(params).values())), source_dtypes=kinds,
                clip=f"ViT {model_cfg.vision_width}w x {model_cfg.vision_layers}, patch {model_cfg.vision_patch_size}, "
                     f"{model_cfg.image_resolution} px; text {model_cfg.text_width}w x {model_cfg.text_layers}",
                agg_module=model_cfg.agg_module, num_hidden_layers=model_cfg.num_hidden_layers, slots=["best"],
                epoch=epoch)


def jax2torch(args, cfg) -> dict:
    import jax
    import torch

    from jaxprvr.checkpoint import load_params, read_meta, resolve_params_dir
    from parity.convert import _abstract_params, to_tensor
    from parity.prvr import _atomic
    from torch_ref.clip_wti import backbone_keys

    step_dir = resolve_params_dir(args.input)
    meta = read_meta(step_dir)
    cfg = checkpoint_config(step_dir, cfg, args.overrides)
    if cfg.model.clip:  # a jaxprvr run started from CLIP weights: the sizes are the weights'
        from jaxprvr.tasks.t2v import weights_dims

        cfg = weights_dims(cfg)
    params, _ = load_params(step_dir, _abstract_params(cfg))
    dtypes = meta.get("source_dtypes") or {}
    arrays = params_to_torch(cfg.model, jax.device_get(params), dtypes, where=str(step_dir))
    with torch.device("meta"):
        want = backbone_keys(twin_dims(cfg.model), cfg.model.agg_module, cfg.model.num_hidden_layers)
    if list(arrays) != want:  # the table and the twin disagree: a bug, never a user error
        raise JaxprvrError(step_dir, f"the twin's {len(want)} state_dict keys", f"{len(arrays)} table keys")
    sd = OrderedDict((k, to_tensor(a)) for k, a in arrays.items())
    path = _atomic(args.output, lambda tmp: torch.save(sd, tmp))
    return dict(model=cfg.model.name, input=str(step_dir), output=str(path), tensors=len(sd),
                layout=SPEC.official_layout,
                dtypes=("as the source file's (source_dtypes): " + ", ".join(sorted(set(dtypes.values())))
                        if dtypes else "float32 (no source_dtypes in the checkpoint)"))


# ---------------------------------------------------------------------------------------------- parity.check

TIE = 1e-6  # two scores of one query this close may order either way in the two frameworks
EVAL_SIM_TOL = (1e-5, 1e-5)  # rtol, atol of a full evaluation's similarity matrix (float32 sim, both modes)
TRAIN_T_TOTAL = 20  # warmup_cosine over 20 steps, warmup 0.1: steps 0 (lr 0) and 1 in the warmup, then cosine
CLAMP_START = 0.05  # the train row starts logit_scale this far above ln 100: the clamp acts at step 1


def official_transform(frame: np.ndarray, size: int):
    """``dataloader_retrieval.py`` L57-64 on one decoded frame (``Image.fromarray(vr[i].asnumpy())``), torchvision's
    PIL path written out: ``Resize(size, BICUBIC)`` (short side ``size``, long ``int(size * long / short)``, an
    image already at that size returned as is), ``CenterCrop(size)`` (``int(round((h - size) / 2.0))``),
    ``convert("RGB")``, ``ToTensor`` (``torch.from_numpy(np.array(pic)).permute(2, 0, 1).float().div(255)``),
    ``Normalize`` (``sub_(mean[:, None, None]).div_(std[:, None, None])``, float32 tensors)."""
    import torch
    from PIL import Image

    img = Image.fromarray(frame)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_short, new_long = size, int(size * long / short)
        ow, oh = (new_short, new_long) if w <= h else (new_long, new_short)
        img = img.resize((ow, oh), Image.BICUBIC)
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    t = torch.from_numpy(np.array(img, np.uint8, copy=True))
    t = t.view(img.size[1], img.size[0], len(img.getbands())).permute((2, 0, 1)).contiguous()
    t = t.to(dtype=torch.float32).div(255)
    mean = torch.as_tensor((0.48145466, 0.4578275, 0.40821073), dtype=t.dtype)
    std = torch.as_tensor((0.26862954, 0.26130258, 0.27577711), dtype=t.dtype)
    t = t.clone()
    t.sub_(mean[:, None, None]).div_(std[:, None, None])
    return t.numpy()


class MemorySplit:
    """A split held in memory with the attributes :class:`jaxprvr.tasks.t2v.Evaluator` reads (the fallback of the
    evaluation row when :mod:`jaxprvr.data.synthetic_t2v` cannot write a synthetic dataset): captions tokenised
    by :func:`jaxprvr.text.clip_bpe.clip_sequences`, frames preprocessed by :func:`jaxprvr.data.video.preprocess`."""

    def __init__(self, captions, videos, masks):
        from jaxprvr.text.clip_bpe import clip_sequences

        self.captions = list(captions)
        self._videos, self._masks = videos, masks
        self.max_words = None
        self.video_ids = [f"video{i}" for i in range(len(videos))]
        self.caption_video = np.arange(len(self.captions), dtype=np.int64)
        self._clip_sequences = clip_sequences
        self.text_ids = self.text_mask = None

    def tokenise(self, max_words):
        self.text_ids, self.text_mask, _ = self._clip_sequences(self.captions, max_words)
        return self

    def __len__(self):
        return len(self.captions)

    @property
    def n_videos(self):
        return len(self.video_ids)

    def video(self, i, rng=None):
        return self._videos[i], self._masks[i]

    def report(self) -> dict:
        return {"pairs": len(self), "videos": self.n_videos}


def _memory_split(model_cfg, seed: int, n: int = 6) -> MemorySplit:
    from jaxprvr.data.video import preprocess

    rng = np.random.default_rng(seed + 5)
    T, R = model_cfg.max_frames, model_cfg.image_resolution
    colours, shapes, moves = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle", "star"), (
        "left", "right", "up", "down")
    captions, videos, masks = [], np.zeros((n, T, 3, R, R), np.float32), np.zeros((n, T), np.int32)
    for i in range(n):
        captions.append(f"a {colours[i % 4]} {shapes[(i // 2) % 4]} moves to the {moves[(i + 1) % 4]}")
        f = 1 + (i % T)
        h, w = int(rng.integers(R // 2 + 1, 3 * R)), int(rng.integers(R // 2 + 1, 3 * R))
        frames = rng.integers(0, 256, (f, h, w, 3), dtype=np.uint8)
        videos[i, :f] = preprocess(frames, R)
        masks[i, :f] = 1
    return MemorySplit(captions, videos, masks).tokenise(model_cfg.max_words)


def _metric_row(stage, j: dict, t: dict, note="") -> Row:
    """Identical metric dicts (the official keys of ``t``; ``cols`` compared as lists)."""
    missing = [k for k in t if k not in j]
    if missing:
        return Row("metrics", stage, float("inf"), float("inf"), "identical", False, f"keys missing in jax: {missing}")
    vals = [k for k in t if k != "cols"]
    bad = nonfinite("metrics", jax=np.asarray([j[k] for k in vals], np.float64),
                    torch=np.asarray([t[k] for k in vals], np.float64))
    d = max(abs(float(j[k]) - float(t[k])) for k in vals)
    same_cols = "cols" not in t or list(map(int, j["cols"])) == list(t["cols"])
    shown = ", ".join(f"{k} {float(t[k]):.4g}" for k in ("R1", "R5", "R10", "MR", "MeanR") if k in t)
    return Row("metrics", stage, d, d, "identical", d == 0.0 and same_cols and not bad,
               join_notes(bad, "" if same_cols else "rank lists differ", note, shown))


def _jax_official_keys(m: dict) -> dict:
    """jaxprvr's :func:`~jaxprvr.metrics.t2v.compute_metrics` result under the official keys (``ranks`` = ``cols``)."""
    return {**{k: m[k] for k in ("R1", "R5", "R10", "R50", "MR", "MedianR", "MeanR")}, "cols": m["ranks"]}


def _row_ranks(sim: np.ndarray) -> np.ndarray:
    """Each row's official ranks as ``(first, count)``: ``compute_metrics`` finds the positions ``first ..
    first + count - 1`` of the diagonal in the row sorted descending (``#greater``, ``#equal``; none for a
    non-finite diagonal)."""
    d = np.diagonal(sim)[:, None]
    first = np.sum(sim > d, axis=1)
    count = np.where(np.isfinite(d[:, 0]), np.sum(sim == d, axis=1), 0)
    return np.stack([first, count], axis=1)


def _rank_changes(j_sim: np.ndarray, t_sim: np.ndarray, tie: float) -> tuple[int, int]:
    """``(queries whose official ranks differ, those of them without a near-tie)`` between two square matrices,
    t2v (rows) and v2t (columns): a differing query is explained when, in either matrix, another score of it lies
    within ``tie`` of its positive."""
    changed = unexplained = 0
    for a, b in ((j_sim, t_sim), (j_sim.T, t_sim.T)):
        differ = np.any(_row_ranks(a) != _row_ranks(b), axis=1)
        tied = _near_tie_rows(a, tie) | _near_tie_rows(b, tie)
        changed += int(differ.sum())
        unexplained += int((differ & ~tied).sum())
    return changed, unexplained


def _near_tie_rows(sim: np.ndarray, tie: float) -> np.ndarray:
    """Rows whose diagonal lies within ``tie`` of another entry (either order is then plausible)."""
    d = np.diagonal(sim)[:, None]
    close = np.abs(sim - d) <= tie
    np.fill_diagonal(close, False)
    return close.any(axis=1)


class ClipWTICheck(FamilyCheck):
    """The rows of ``parity.check --model clip_wti`` (docs/parity.md, "CLIP + seqTransf + WTI")."""

    train_label = "BertAdam steps"

    def __init__(self, spec, cfg, *, ckpt, data_root, seed, n_videos, steps, device, say, compiler_options, tol,
                 perturb):
        import jax

        from jaxprvr.models import build_model

        self._setup(spec, seed=seed, steps=steps, say=say, data_root=data_root, tol=tol, perturb=perturb,
                    compiler_options=compiler_options, n_videos=n_videos, device=device)
        if ckpt is not None:
            model_cfg, twin32 = twin_from_state_dict(cfg.model, read_backbone(ckpt), str(ckpt))
            self.source = f"checkpoint {ckpt}"
        else:
            model_cfg, twin32 = cfg.model, random_twin(cfg.model, seed)
            self.source = "official_init of a random CLIP"
        # the twin runs float32 (the official CPU path) or float64: the Flax model at the same precision
        model_cfg = dataclasses.replace(model_cfg, precision="fp64" if self.f64 else "fp32")
        spec._resolved = (cfg, model_cfg)
        self.cfg = dataclasses.replace(cfg, model=model_cfg)
        if perturb == "all":
            from parity.check import perturb_twin

            twin32 = perturb_twin(twin32, seed)
        self.set_twin(twin32)
        self.model = build_model(self.cfg.model)
        self.batch = self.cast(spec.make_batch(self.cfg.model, n_videos, seed))
        self.key = jax.random.key(seed)
        self._fwd = self._vg = None

    # -- helpers
    def params(self, twin) -> dict:
        return twin_params(self.cfg.model, twin)

    @staticmethod
    def is64(tw) -> bool:
        import torch

        return next(tw.parameters()).dtype == torch.float64

    def T(self, x, tw):
        """``x`` as a torch tensor for ``tw``: floats in its dtype, integers as int64."""
        import torch

        a = np.asarray(x)
        if np.issubdtype(a.dtype, np.floating):
            return torch.as_tensor(a, dtype=next(tw.parameters()).dtype, device=self.device)
        return torch.as_tensor(a.astype(np.int64), device=self.device)

    @contextlib.contextmanager
    def mode(self, tw):
        """A float64 twin runs with torch's default dtype float64 (constants its forward builds are double)."""
        import torch

        old = torch.get_default_dtype()
        if self.is64(tw):
            torch.set_default_dtype(torch.float64)
        try:
            with torch.no_grad():
                yield
        finally:
            torch.set_default_dtype(old)

    # -- convert
    def conversion_rows(self) -> list[Row]:
        """torch -> Flax -> torch through :func:`torch_to_params` / :func:`params_to_torch`: the float32 and float64
        twins, the twin as a CUDA run saves it (``convert_weights``: the CLIP's Conv/Linear/attention tensors and
        the two projections in fp16), and the CLIP alone through :mod:`parity.clip` (OpenAI keys, fp16)."""
        import torch

        from parity.clip import params_to_state_dict, state_dict_to_params
        from torch_ref.clip import convert_weights

        rows = []
        half = copy.deepcopy(self.twin32)
        convert_weights(half.clip)
        cases = [(self.twin32, np.float32, "float32"), (self.twin64, np.float64, "float64"),
                 (half, np.float32, "CLIP in fp16 as a CUDA run saves it")]
        for tw, dt, what in cases:
            sd = OrderedDict((k, v.detach().cpu()) for k, v in tw.state_dict().items())
            _, params, dtypes = torch_to_params(self.cfg.model, sd, "twin", dtype=dt)
            back = params_to_torch(self.cfg.model, params, dtypes)
            rows.append(self._round_trip_row(f"torch -> flax -> torch ({len(sd)} tensors, {what})", sd, back))
        clip_sd = OrderedDict((k, v.detach().cpu()) for k, v in half.clip.state_dict().items())
        dims, params, dtypes = state_dict_to_params(clip_sd, "CLIP", dims=clip_dims(self.cfg.model))
        back = params_to_state_dict(dims, params, dtypes)
        rows.append(self._round_trip_row(f"OpenAI CLIP state dict -> flax -> OpenAI keys ({len(clip_sd)} tensors, "
                                         f"{sum(v.dtype == torch.float16 for v in clip_sd.values())} fp16)",
                                         clip_sd, back))
        return rows

    @staticmethod
    def _round_trip_row(stage, sd, back) -> Row:
        exact, worst = list(back) == list(sd), 0.0
        for k, v in sd.items():
            b = np.asarray(back[k])
            a = v.numpy()
            exact = exact and b.dtype == a.dtype and b.shape == a.shape and a.tobytes() == b.tobytes()
            if a.size and b.shape == a.shape:
                worst = max(worst, float(np.abs(b.astype(np.float64) - a.astype(np.float64)).max()))
        n16 = sum(np.asarray(b).dtype == np.float16 for b in back.values())
        return Row("convert", stage, worst, worst, "bit-exact, dtypes and order kept", exact,
                   f"{n16} fp16 tensors back" if n16 else "")

    # -- blocks
    @staticmethod
    def japply(module, params, *args, method=None):
        """``module.apply({"params": params}, *args, method=method)``, jitted (one compilation per block instead of
        one per eager op)."""
        import jax

        return jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=method))(params, *args)

    def block_rows(self, suffix="") -> list[Row]:
        """Each block alone on the same input (float32: the bounded float64 arbiter on a miss)."""
        return (self.vision_rows(suffix) + self.text_rows(suffix) + self.seqtransf_rows(suffix)
                + self.head_rows(suffix))

    def _ctx(self, k: int):
        """``(model cfg, CLIP dims, compute dtype, numpy float dtype, params of the compared twin, rng)``."""
        from jaxprvr.models import clip as fc

        c = self.cfg.model
        return (c, clip_dims(c), fc.PRECISIONS[c.precision], np.float64 if self.f64 else np.float32,
                self.params(self.twin), np.random.default_rng(self.seed + 11 + k))

    def vision_rows(self, suffix="") -> list[Row]:
        """The CLIP image tower (``encode_image``): the class-token embedding and every token."""
        from jaxprvr.models import clip as fc

        c, dims, _, fdt, params, rng = self._ctx(0)
        R = c.image_resolution
        pixels = rng.standard_normal((3, 3, R, R)).astype(fdt)
        jv = self.japply(fc.CLIP(dims, c.precision), params["clip"], pixels, method="encode_image")
        return [self.arbiter_row(
            f"CLIP vision tower {k} ({'class token' if i == 0 else 'every token'} after ln_post @ proj, "
            f"{dims.grid ** 2 + 1} tokens){suffix}", np.asarray(jv[k]),
            lambda tw, i=i: tw.clip.encode_image(self.T(pixels, tw), return_hidden=True)[i], self.tol.block)
            for k, i in (("embeds", 0), ("tokens", 1))]

    def text_rows(self, suffix="") -> list[Row]:
        """The CLIP text tower (``encode_text``: the EOT embedding, ``ln_final``, every projected token) at
        ``max_words`` (the batch's captions) and at the context length, and one residual block with the causal
        mask."""
        from jaxprvr.models import clip as fc

        c, dims, dt, fdt, params, rng = self._ctx(1)
        b = self.batch
        n, L, W = len(b["text_ids"]), c.max_words, dims.text_width
        clip = fc.CLIP(dims, c.precision)
        ids77 = np.zeros((n, dims.context_length), np.int32)
        for r in range(n):
            k = min(dims.context_length, [dims.context_length, 5, 40, 17][r % 4])
            ids77[r, 0], ids77[r, k - 1] = dims.vocab_size - 2, dims.vocab_size - 1
            ids77[r, 1:k - 1] = rng.integers(1, dims.vocab_size - 2, k - 2)
        rows = []
        for ids, where in ((b["text_ids"], f"{L} = max_words"), (ids77, f"{dims.context_length} = context length")):
            lens = (np.asarray(ids) > 0).sum(1).tolist()
            jt = self.japply(clip, params["clip"], ids, method="encode_text")
            for k, i in (("embeds", 0), ("hidden", 1), ("tokens", 2)):
                what = {"embeds": "embeds (token at argmax(ids) = EOT)", "hidden": "hidden (ln_final)",
                        "tokens": "tokens (@ text_projection)"}[k]
                rows.append(self.arbiter_row(f"CLIP text tower {what}, L {where}, captions of {lens} tokens{suffix}",
                                             np.asarray(jt[k]), lambda tw, i=i, ids=ids: tw.clip.encode_text_hidden(
                                                 self.T(ids, tw))[i], self.tol.block))
        x = rng.standard_normal((n, L, W)).astype(fdt)
        jb = self.japply(fc.ResidualAttentionBlock(W, dims.t_heads, dtype=dt),
                         params["clip"]["text"]["transformer"]["resblocks_0"], x, fc.causal_mask(L))
        rows.append(self.arbiter_row(f"residual attention block (text block 0, causal mask, L {L}){suffix}",
                                     np.asarray(jb), lambda tw: tw.clip.transformer.resblocks[0](
                                         self.T(x, tw).permute(1, 0, 2)).permute(1, 0, 2), self.tol.block))
        return rows

    def seqtransf_rows(self, suffix="") -> list[Row]:
        """seqTransf on a padded batch: block 0 alone (TF LayerNorm, the additive ``-1e6`` key mask) and
        ``aggregate`` (frame positions, every block, the residual) vs ``agg_video_feat``."""
        from jaxprvr.models import clip as fc
        from jaxprvr.models import clip_wti as mw

        c, dims, dt, fdt, params, rng = self._ctx(2)
        if c.agg_module != "seqTransf":
            return []
        vm = np.asarray(self.batch["video_mask"])
        n, T, D, W = vm.shape[0], c.max_frames, dims.embed_dim, dims.text_width
        frames = rng.standard_normal((n, T, D)).astype(fdt)
        bias = ((1.0 - vm.astype(fdt)) * mw.VIDEO_MASK_FILL)[:, None, None, :]
        js = self.japply(fc.ResidualAttentionBlock(W, dims.t_heads, ln_eps=mw.TF_LN_EPS, dtype=dt),
                         params["transformerClip"]["resblocks_0"], frames, None, bias)

        def t_block(tw):
            m = self.T(vm, tw).to(next(tw.parameters()).dtype)
            ext = ((1.0 - m.unsqueeze(1)) * -1000000.0).expand(-1, m.size(1), -1)
            return tw.transformerClip.resblocks[0]((self.T(frames, tw).permute(1, 0, 2), ext))[0].permute(1, 0, 2)

        ja = self.japply(self.model, params, frames, vm, method="aggregate")
        return [self.arbiter_row(f"seqTransf block 0 (TF LayerNorm eps {mw.TF_LN_EPS:g}, additive -1e6 on padded "
                                 f"keys; frames per video {vm.sum(1).tolist()}){suffix}", np.asarray(js), t_block,
                                 self.tol.block),
                self.arbiter_row(f"seqTransf ({c.num_hidden_layers} blocks: frame positions, the key mask, + the "
                                 f"frames){suffix}", np.asarray(ja),
                                 lambda tw: tw.agg_video_feat(self.T(frames, tw), self.T(vm, tw).to(
                                     next(tw.parameters()).dtype)), self.tol.block)]

    def head_rows(self, suffix="") -> list[Row]:
        """The two weight MLPs, WTI alone (``wti_logits`` on the twin's weight logits) and the whole
        ``similarity`` vs ``get_similarity_logits``, on random features with padded tokens and frames."""
        import jax

        from jaxprvr.models import clip_wti as mw

        c, dims, _, fdt, params, rng = self._ctx(3)
        tm, vm = np.asarray(self.batch["text_mask"]), np.asarray(self.batch["video_mask"])
        n, L, T, D, W = tm.shape[0], c.max_words, c.max_frames, dims.embed_dim, dims.text_width
        tf = rng.standard_normal((n, L, D)).astype(fdt)
        vf = rng.standard_normal((n, T, D)).astype(fdt)
        rows = []
        for head, feats in (("text_weight_fc", tf), ("video_weight_fc", vf)):
            jw = self.japply(mw.WeightMLP(W), params[head], feats)
            rows.append(self.arbiter_row(f"{head} (Linear, ReLU, Linear -> one logit per token){suffix}",
                                         np.asarray(jw), lambda tw, head=head, feats=feats: getattr(tw, head)(
                                             self.T(feats, tw)).squeeze(2), self.tol.block))

        def t_sim(tw):
            dt = next(tw.parameters()).dtype
            return tw.get_similarity_logits(self.T(tf, tw), self.T(tm, tw).to(dt), self.T(vf, tw),
                                            self.T(vm, tw).to(dt))[0]

        with self.mode(self.twin):
            wt = as_numpy(self.twin.text_weight_fc(self.T(tf, self.twin)).squeeze(2))
            wv = as_numpy(self.twin.video_weight_fc(self.T(vf, self.twin)).squeeze(2))
        jw = jax.jit(lambda *a: mw.wti_logits(*a))(tf, tm, vf, vm, wt, wv)
        rows.append(self.arbiter_row(f"WTI (wti_logits on the twin's weight logits vs get_similarity_logits; "
                                     f"captions of {tm.sum(1).tolist()} tokens, {vm.sum(1).tolist()} frames){suffix}",
                                     np.asarray(jw), t_sim, self.tol.block))
        js = self.japply(self.model, params, tf, tm, vf, vm, method="similarity")
        rows.append(self.arbiter_row(f"similarity (weight MLPs + WTI) vs get_similarity_logits{suffix}",
                                     np.asarray(js), t_sim, self.tol.block))
        return rows

    # -- whole model
    def flax_forward(self, params, batch):
        import jax

        if self._fwd is None:
            model = self.model
            self._fwd = jax.jit(lambda p, ids, tm, v, vm: model.apply({"params": p}, ids, tm, v, vm,
                                                                      method="forward"))
        out, aux = self._fwd(params, batch["text_ids"], batch["text_mask"], batch["video"], batch["video_mask"])
        return jax.device_get(out), jax.device_get(aux)

    def twin_forward(self, tw, batch) -> dict:
        """``get_text_feat``, the CLIP frame embeddings, ``get_video_feat`` and ``get_similarity_logits``."""
        with self.mode(tw):
            dt = next(tw.parameters()).dtype
            ids, video = self.T(batch["text_ids"], tw), self.T(batch["video"], tw)
            tm, vm = self.T(batch["text_mask"], tw).to(dt), self.T(batch["video_mask"], tw).to(dt)
            tf, _ = tw.get_text_feat(ids, tm)
            b, t = vm.shape
            frames = tw.clip.encode_image(video.reshape((b * t,) + tuple(video.shape[2:])), return_hidden=True)[0]
            vf = tw.get_video_feat(video, vm)
            logits = tw.get_similarity_logits(tf, tm, vf, vm)[0]
        return {"text_feat": as_numpy(tf), "frame_feat": as_numpy(frames).reshape(b, t, -1),
                "video_feat": as_numpy(vf), "logits": as_numpy(logits), "logit_scale": as_numpy(tw.clip.logit_scale)}

    def model_rows(self, suffix="") -> list[Row]:
        b = self.batch
        out, aux = self.flax_forward(self.params(self.twin), b)
        t = self.twin_forward(self.twin, b)
        shape = (f"{len(b['text_ids'])} pairs; captions of {np.asarray(b['text_mask']).sum(1).tolist()} tokens, "
                 f"{np.asarray(b['video_mask']).sum(1).tolist()} of {b['video_mask'].shape[1]} frames")
        rtol, atol = self.tol.model
        return [close_row("model", f"text features [B, L, D] (every token){suffix}", aux["text_feat"],
                          t["text_feat"], rtol, atol),
                close_row("model", f"frame features [B, T, D] (CLIP class tokens){suffix}", aux["frame_feat"],
                          t["frame_feat"], rtol, atol),
                close_row("model", f"video features [B, T, D] (after {self.cfg.model.agg_module}){suffix}",
                          aux["video_feat"], t["video_feat"], rtol, atol),
                close_row("model", f"logits [B, B] text x video ({shape}){suffix}", out["logits"], t["logits"],
                          rtol, atol)]

    # -- loss
    def loss_rows(self) -> list[Row]:
        import torch

        from jaxprvr.models.clip_wti import symmetric_ce
        from torch_ref.clip_wti import cross_en

        t = self.twin_forward(self.twin, self.batch)
        with self.mode(self.twin):
            lg = self.T(t["logits"], self.twin)
            scale = self.twin.clip.logit_scale.exp()
            t2v, v2t = cross_en(lg * scale), cross_en(lg.T * scale)
            total = (t2v + v2t) / 2.0
        j = symmetric_ce(np.asarray(t["logits"]), np.asarray(t["logit_scale"]))
        del torch
        return [close_row("loss", f"symmetric CE of the twin's logits ((CrossEn(s L) + CrossEn(s L^T)) / 2, s = "
                                  f"exp(logit_scale) = {float(scale):.4g}; t2v {float(t2v):.4g}, v2t "
                                  f"{float(v2t):.4g})", np.asarray(j), as_numpy(total), *self.tol.loss)]

    # -- gradients
    def jax_loss(self, cfg=None, model=None):
        from jaxprvr.tasks.t2v import TASK

        return TASK.loss(model or self.model, cfg or self.cfg, 1)

    def value_and_grad(self):
        """``fn(params, batch) -> (loss, grads)`` of ``TASK.loss`` (train mode), jitted once and shared by the grad
        and train rows (the loss depends neither on the step nor on the schedule)."""
        import jax

        if self._vg is None:
            loss_fn = self.jax_loss()
            key = self.key
            self._vg = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, {"dropout": key}, 0, {})[0]),
                               compiler_options=self.compiler_options or None)
        return self._vg

    def jax_grads(self, params, batch) -> tuple[float, dict]:
        """JAX's ``TASK.loss`` and its gradients by torch name (torch layout)."""
        import jax

        from parity.convert import flatten

        jl, jg = self.value_and_grad()(params, batch)
        flat = flatten(jax.device_get(jg))
        return float(jl), {e.torch: to_torch(e.kind, np.asarray(flat[e.flax])) for e in make_table(self.cfg.model)}

    def torch_grads(self, tw, batch) -> tuple[float, dict]:
        """The twin's training loss (``forward``) and its gradients by name (None -> zeros)."""
        tw.train()
        tw.zero_grad(set_to_none=True)
        with self.mode(tw):
            import torch

            with torch.enable_grad():
                loss = tw(self.T(batch["text_ids"], tw), self.T(batch["text_mask"], tw), self.T(batch["video"], tw),
                          self.T(batch["video_mask"], tw))
                loss.backward()
        g = {n: (np.zeros(tuple(p.shape)) if p.grad is None else p.grad.detach().cpu().numpy())
             for n, p in tw.named_parameters()}
        tw.eval()
        return float(loss.detach()), g

    def grad_rows(self) -> list[Row]:
        from parity.check import _grad_rows, cast_batch

        t32, t64 = copy.deepcopy(self.twin32), copy.deepcopy(self.twin64)
        tl32, g32 = self.torch_grads(t32, cast_batch(self.batch, "float32"))
        tl64, g64 = self.torch_grads(t64, cast_batch(self.batch, "float64"))
        jl, jg = self.jax_grads(self.params(self.twin), self.batch)
        tl_, tg = (tl64, g64) if self.f64 else (tl32, g32)
        return _grad_rows(self.spec, self.cfg, jl, jg, tl_, tg, g32, g64, self.tol,
                          f"d loss / d param ({len(tg)} tensors; TASK.loss vs the twin's forward)",
                          loss_stage="training loss (TASK.loss vs BackBoneTVR.forward)")

    # -- training
    def train_rows(self) -> list[Row]:
        """``steps`` steps of ``TASK.optimizer`` + ``TASK.loss`` vs ``official_optimizer`` +
        ``BackBoneTVR.forward`` + ``official_after_backward`` over ``t_total = TRAIN_T_TOTAL`` (warmup 0.1: steps
        0 and 1 in the warmup, step 0 at lr 0), two alternating batches, ``logit_scale`` starting ``CLAMP_START``
        above ln 100 (the clamp acts at the first step)."""
        import jax
        import optax
        import torch

        from jaxprvr.tasks.t2v import TASK
        from parity.check import ZeroList, _compare_trained, cast_batch
        from torch_ref.clip_wti import official_after_backward, official_optimizer

        tc = self.cfg.train
        tcfg = dataclasses.replace(self.cfg, train=dataclasses.replace(tc, n_epoch=1))
        start = math.log(100.0) + CLAMP_START
        twins = [copy.deepcopy(self.twin64)] if self.f64 else [copy.deepcopy(self.twin32),
                                                              copy.deepcopy(self.twin64)]
        for tw in twins:
            with torch.no_grad():
                tw.clip.logit_scale.fill_(start)
        opts = [official_optimizer(tw, lr=tc.lr, coef_lr=tc.coef_lr, weight_decay=tc.wd,
                                   warmup=tc.lr_warmup_proportion, t_total=TRAIN_T_TOTAL) for tw in twins]
        params = self.params(twins[0])
        tx = TASK.optimizer(tcfg, params, TRAIN_T_TOTAL)
        grad_fn = self.value_and_grad()  # TASK.loss (no step or schedule dependence)

        @jax.jit
        def update(g, s, p):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        def step(p, s, b, i):
            return update(grad_fn(p, b)[1], s, p)
        batches = [self.batch, self.cast(self.spec.make_batch(self.cfg.model, self.n_videos, self.seed + 1))]
        state = tx.init(params)
        j_scale, t_scale, lrs = [], [], []
        for i in range(self.steps):
            b = batches[i % 2]
            for tw, opt in zip(twins, opts):
                bb = cast_batch(b, "float64" if self.is64(tw) else "float32")
                tw.train()
                opt.zero_grad(set_to_none=True)
                with self.mode(tw), torch.enable_grad():
                    loss = tw(self.T(bb["text_ids"], tw), self.T(bb["text_mask"], tw), self.T(bb["video"], tw),
                              self.T(bb["video_mask"], tw))
                    loss.backward()
                    official_after_backward(tw, opt)
            lrs.append(float(TASK.lr_at(tcfg, TRAIN_T_TOTAL)(i)))
            params, state = step(params, state, b, np.int32(i))
            j_scale.append(float(np.asarray(jax.device_get(params["clip"]["logit_scale"]))))
            t_scale.append(float(twins[0].clip.logit_scale.detach()))
        params = jax.device_get(params)
        named = dict(twins[0].named_parameters())
        named64 = None if self.f64 else dict(twins[1].named_parameters())
        tab = make_table(tcfg.model)
        lr_txt = ", ".join(f"{x:.3g}" for x in lrs)
        row = _compare_trained(f"params after {self.steps} steps of TASK.optimizer (global clip 1.0, BertAdam, "
                               f"warmup_cosine over {TRAIN_T_TOTAL} steps, lr {lr_txt} x coef_lr {tc.coef_lr:g} on "
                               f"'clip.', the logit_scale clamp) vs official_optimizer + official_after_backward",
                               tab, params, named, named64, self.tol, ZeroList(self.spec.zero_gradients(tcfg)),
                               self.spec.adam_step_bound(tcfg, lrs))
        rel = self.tol.train_rel
        return [row, close_row("train", f"logit_scale after each step (starts ln 100 + {CLAMP_START:g}: clamped at "
                                        f"ln 100 = {math.log(100):.6f})", np.asarray(j_scale), np.asarray(t_scale),
                               rel, 0.0)]

    # -- dropout
    def dropout_rows(self) -> list[Row]:
        """The official model has no dropout: the Flax model's train-mode program is its eval-mode program (the
        same jaxpr, no random draw) and the twin has no ``nn.Dropout`` and gives bit-identical logits in train and
        eval mode."""
        import jax

        params = self.params(self.twin)
        b = {k: np.asarray(v) for k, v in self.batch.items()}
        model = self.model

        def program(train):
            return str(jax.make_jaxpr(lambda p: model.apply({"params": p}, b, train=train,
                                                            rngs={"dropout": jax.random.key(1)}))(params))

        jt, je = program(True), program(False)
        random_ops = [w for w in ("random_bits", "threefry", "random_wrap", "bernoulli") if w in jt]
        tw = copy.deepcopy(self.twin)
        te = self.twin_forward(tw.eval(), b)["logits"]
        tt = self.twin_forward(tw.train(), b)["logits"]
        n_drop = sum(isinstance(m, __import__("torch").nn.Dropout) for m in tw.modules())
        ok = jt == je and not random_ops and np.array_equal(te, tt) and n_drop == 0
        return [Row("dropout", "no dropout in the official model: the Flax train-mode program == eval-mode program "
                               "(no random draw); the twin's train-mode logits == eval-mode, bit-exact",
                    0.0 if ok else float("inf"), 0.0, "identical", ok,
                    join_notes(f"{n_drop} nn.Dropout modules in the twin",
                               "" if jt == je else "the Flax train and eval programs differ",
                               f"random ops in the train program: {random_ops}" if random_ops else ""))]

    # -- metrics
    def metric_rows(self) -> list[Row]:
        rows, ev = self.evaluation_rows()
        rows = self.one_matrix_rows(ev) + self.tie_rows() + rows
        rows += self.video_input_rows()
        return rows

    def one_matrix_rows(self, ev) -> list[Row]:
        """The twin's similarity matrix (of the evaluation) through :mod:`jaxprvr.metrics.t2v` and through the
        official ``compute_metrics``, t2v (``sim``) and v2t (``sim.T``): every value and rank list identical."""
        from jaxprvr.metrics.t2v import compute_metrics

        sim, what = ev
        rows = []
        for name, x in (("t2v", sim), ("v2t", sim.T)):
            rows.append(_metric_row(f"{name} metrics of the twin's {what} similarity matrix {x.shape}: "
                                    "jaxprvr.metrics.t2v vs official compute_metrics",
                                    _jax_official_keys(compute_metrics(x)), official_compute_metrics(x)))
        return rows

    def tie_rows(self) -> list[Row]:
        """A crafted matrix with ties at the diagonal (every tied rank counted, the denominator grows)."""
        from jaxprvr.metrics.t2v import compute_metrics

        x = np.array([[3, 3, 1, 0, 3, 2], [1, 2, 2, 2, 0, 0], [0, 0, 5, 0, 0, 0], [4, 4, 4, 4, 4, 4],
                      [0, 1, 2, 3, 1, 5], [2, 2, 2, 2, 2, 1]], np.float32) / np.float32(4)
        rows = []
        for name, m in (("t2v", x), ("v2t", x.T)):
            t = official_compute_metrics(m)
            rows.append(_metric_row(f"{name} metrics of a crafted 6x6 matrix with diagonal ties ({len(t['cols'])} "
                                    "ranks for 6 rows): jaxprvr.metrics.t2v vs official compute_metrics",
                                    _jax_official_keys(compute_metrics(m)), t))
        return rows

    def _eval_split(self, tmp):
        """The split of the full evaluation: ``--data-root``'s test split, else a synthetic MSR-VTT written by
        :mod:`jaxprvr.data.synthetic_t2v` (decoded and preprocessed by :mod:`jaxprvr.data.video`), else (that
        module missing or failing) random frames preprocessed here."""
        cfg = dataclasses.replace(self.cfg, data=dataclasses.replace(
            self.cfg.data, frame_cache=str(Path(tmp) / "frames"), augment="none", workers=1))
        try:
            from jaxprvr.tasks.t2v import T2VSet

            root = self.data_root
            if root is None:
                from jaxprvr.data.synthetic_t2v import write_synthetic_t2v

                cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset="msrvtt", anno_path="",
                                                                        video_path="", train_split="9k"))
                root = write_synthetic_t2v(Path(tmp) / "data", "msrvtt", n_train=4, n_test=6, seed=self.seed)
                what = "synthetic MSR-VTT test split (jaxprvr.data.synthetic_t2v: decoded, sampled, preprocessed)"
            else:
                what = f"{cfg.data.dataset} test split of {root}"
            return cfg, T2VSet(cfg, root, "test"), what
        except (ImportError, JaxprvrError) as e:
            if self.data_root is not None:
                raise
            why = f"{type(e).__name__}: {str(e)[:80]}"
            return cfg, _memory_split(cfg.model, self.seed), f"in-memory split of random frames ({why})"

    def evaluation_rows(self) -> tuple[list[Row], tuple]:
        """``tasks.t2v.Evaluator`` (JAX) vs the twin on the same preprocessed inputs (the split's token ids and
        the videos as the Evaluator loads them): the similarity matrix within ``EVAL_SIM_TOL`` and the metrics
        (official ``compute_metrics`` on the twin's matrix) identical, or differing only where a score lies within
        ``EVAL_SIM_TOL`` of the positive in either matrix (counted)."""
        from jaxprvr.metrics.t2v import t2v_metrics
        from jaxprvr.tasks.t2v import Evaluator, resolve_protocol

        params = self.params(self.twin)
        with tempfile.TemporaryDirectory() as tmp:
            cfg, ds, what = self._eval_split(tmp)
            j_res = Evaluator(self.model, cfg).evaluate(params, ds, keep_outputs=True)
            n_v = ds.n_videos
            videos = [ds.video(i) for i in range(n_v)]
        video = np.stack([v for v, _ in videos]).astype(np.float64 if self.f64 else np.float32)
        vmask = np.stack([m for _, m in videos]).astype(np.int32)
        tw = self.twin
        with self.mode(tw):
            dt = next(tw.parameters()).dtype
            tm = self.T(ds.text_mask, tw).to(dt)
            tf, _ = tw.get_text_feat(self.T(ds.text_ids, tw), tm)
            vm = self.T(vmask, tw).to(dt)
            vf = tw.get_video_feat(self.T(video, tw), vm)
            sim_u = as_numpy(tw.get_similarity_logits(tf, tm, vf, vm)[0])
        protocol = resolve_protocol(cfg.data.protocol, ds)
        t_sim = (sim_u[:, ds.caption_video] if protocol == "pairs" else sim_u).astype(np.float32)
        j_sim = np.asarray(j_res["_sim"], np.float32)
        rows = [close_row("metrics", f"similarity matrix of a full evaluation ({what}: {len(ds)} captions x {n_v} "
                                     f"videos; jax Evaluator vs the twin on the same inputs)", j_sim, t_sim,
                          *EVAL_SIM_TOL)]
        stage = "R@1/5/10/50, MdR, MnR of the full evaluation (jax Evaluator vs official metrics on the twin's matrix)"
        keys = [("R1", "R1"), ("R5", "R5"), ("R10", "R10"), ("R50", "R50"), ("MdR", "MR"), ("MnR", "MeanR")]
        if protocol == "pairs":
            ref = {"t2v": official_compute_metrics(t_sim), "v2t": official_compute_metrics(t_sim.T)}
        else:  # the grouped protocol: jaxprvr.metrics.t2v (tested against its transcription) on the twin's matrix
            r = t2v_metrics(t_sim, "grouped", ds.caption_video)
            ref = {d: {o: r[f"{d}/{k}"] for k, o in keys} for d in ("t2v", "v2t")}
        j = {f"{d}/{k}": j_res[f"{d}/{k}"] for d in ("t2v", "v2t") for k, _ in keys}
        t = {f"{d}/{k}": float(ref[d][o]) for d in ("t2v", "v2t") for k, o in keys}
        d = max(abs(float(j[k]) - t[k]) for k in t)
        note = f"protocol {protocol}; " + ", ".join(f"{k} {t[k]:.4g}" for k in ("t2v/R1", "t2v/R5", "v2t/R1"))
        if d == 0.0:
            rows.append(Row("metrics", stage, 0.0, 0.0, "identical", True, note))
        else:
            tie = EVAL_SIM_TOL[1] + EVAL_SIM_TOL[0]
            changed, unexplained = _rank_changes(j_sim, t_sim, tie) if protocol == "pairs" else (0, 0)
            ok = protocol == "pairs" and unexplained == 0
            rows.append(Row("metrics", stage, d, d, f"identical, or differing only at near-ties within {tie:g}", ok,
                            join_notes(note, f"differ by up to {d:g}: {changed} query ranks differ, "
                                             f"{changed - unexplained} of them at a near-tie (counted)"
                                       if protocol == "pairs" else f"differ by up to {d:g}")))
        return rows, (t_sim, "evaluation")

    def video_input_rows(self) -> list[Row]:
        """``jaxprvr.data.video.preprocess`` vs :func:`official_transform` on frames of several sizes, bit-exact."""
        from jaxprvr.data.video import preprocess

        R = self.cfg.model.image_resolution
        rng = np.random.default_rng(self.seed + 21)
        sizes = [(R, R), (R + 1, 2 * R + 3), (2 * R - 3, R - 5 if R > 8 else R + 9), (3 * R, 4 * R), (61, 97),
                 (48, 64)]
        exact, worst = True, 0.0
        for h, w in sizes:
            frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
            j = preprocess(frames, R)
            for f in range(2):
                t = official_transform(frames[f], R)
                exact = exact and j[f].dtype == t.dtype and j[f].shape == t.shape and j[f].tobytes() == t.tobytes()
                if j[f].shape == t.shape:
                    worst = max(worst, float(np.abs(j[f].astype(np.float64) - t).max()))
        return [Row("metrics", f"video inputs: jaxprvr.data.video.preprocess vs the official transform (Pillow "
                               f"Resize short side BICUBIC, CenterCrop, ToTensor, Normalize) at {R} px, "
                               f"{2 * len(sizes)} frames of {len(sizes)} sizes", worst, worst, "bit-exact", exact,
                    ", ".join(f"{h}x{w}" for h, w in sizes))]


__all__ = ["key_rows", "make_table", "torch_to_params", "params_to_torch", "SPEC", "Spec", "ClipWTICheck",
           "twin_dims", "random_twin", "twin_from_state_dict", "twin_params", "read_backbone", "torch2jax",
           "jax2torch", "official_compute_metrics", "official_transform", "EPS32"]
