"""MRNet's parity pieces (official ``RET``, xian-sh/MRNet @ 53432f5): key table with BatchNorm statistics and
buffers, conversion of the official ``{model, optimizer, scheduler, epoch}`` file both ways, and every row of
``python -m parity.check --model mrnet``.

Flax model: :class:`jaxprvr.models.mrnet.MRNet`; torch twin: :class:`torch_ref.mrnet.MRNet`.

Keys (:func:`jaxprvr.models.mrnet.official_key_table`): ``params`` rows (kinds ``linear``, ``conv1d``,
``conv2d``, ``bias``, ``layernorm``, ``param`` (``W_*``, used as ``x @ W``: no transpose), ``embedding``,
``bn_param``), ``batch_stats`` rows (``bn_mean``, ``bn_var``, ``bn_count``: int64 in torch, int32 in Flax) and
the ``xpos.scale`` buffers (``buffer``: not stored in Flax; recomputed, :func:`jaxprvr.ops.retention.xpos_scale`,
in float32 and cast to the weights' dtype, as ``model.double()`` does). Both directions are bit-exact.

Conversion (``python -m parity.convert torch2jax|jax2torch --model mrnet --config C``):

* ``torch2jax FILE.pth OUT``: ``OUT/ckpt/best`` (params + ``model_state = {"batch_stats": ...}``) and, when the
  file holds an AdamW state with steps, ``OUT/ckpt/latest`` whose optimizer state is the optax state of
  ``jaxprvr.tasks.vmr.TASK.optimizer`` with the AdamW moments (``exp_avg`` / ``exp_avg_sq`` -> ``mu`` / ``nu``
  through the key table) and the step count; parameters without an official gradient (no AdamW state entry)
  keep zero moments (they are masked out of the optax update). ``meta``: the official epoch (1-based epochs
  done), ``next_epoch = epoch``, ``global_step`` = the AdamW step.
* ``jax2torch RUN OUT.pth``: the official dict ``{"model", "optimizer", "scheduler", "epoch"}``: the state_dict
  in the official key order (int64 ``num_batches_tracked``, recomputed ``xpos.scale``), the AdamW state of
  ``torch_ref.mrnet.official_optimizer`` (two groups, the ``bert`` one empty; ``state`` only for the
  parameters that stepped, i.e. not the never-updated ones) and the MultiStepLR state stepped ``epoch`` times.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np

from jaxprvr.errors import JaxprvrError
from parity.base import FamilyCheck, FamilySpec, OwnStages, checkpoint_config, prepare_out_dir
from parity.keys import Entry, check_table, to_flax, to_torch
from parity.prvr import ZeroGrad
from parity.rows import EPS32, Row, as_numpy, close_row, join_notes, nonfinite

TIE = 1e-6  # two candidate scores of one query this close may order either way in the two frameworks
BN_CONV_BIAS = ("ProposalConv conv bias: a per-channel constant added right before a train-mode BatchNorm, which "
                "subtracts the batch mean of that channel (zero in exact arithmetic)")
NO_GRAD_REASONS = {
    "text_encoder.fc_out1": "its output (sent_feat_iou) is only returned at inference (ret_model.py L528, L595)",
    "text_out.fc_out2": "txt_feat is unused: the contrastive branch reads txt_mem (ret_model.py L583)",
    "text_out.layernorm": "commented out in TextOut.forward (text_out.py L46)",
    "W_txt_": "att_mode v: computed, unused (ret_model.py L314-315)",
    "W_vid_": "att_softmax false: the logits feed only the discarded Hardswish (ret_model.py L141-157)",
    "learn_vid_ret": "mask_mode no/ret: neither the mask nor the sparsity loss reads it (ret_model.py L283-293)",
}


# ---------------------------------------------------------------------------------------------- key tables


def key_rows(model_cfg) -> list[tuple[str, str, str, str]]:
    """``(torch key, collection, Flax path, kind)`` of every official ``state_dict`` key, official order."""
    from jaxprvr.models.mrnet import official_key_table

    return official_key_table(model_cfg)


def make_table(model_cfg) -> tuple:
    """The ``params`` rows as :class:`parity.keys.Entry` (``named_parameters`` order): the table the generic
    helpers (gradient and trained-parameter rows) walk."""
    return check_table([Entry(t, f, k) for t, c, f, k in key_rows(model_cfg) if c == "params"])


def _default_table():
    from jaxprvr.config import load_config

    return make_table(load_config("activitynet", "mrnet").model)


def _flatten(tree) -> dict:
    from parity.convert import flatten

    return flatten(tree)


def torch_to_variables(model_cfg, state_dict, where="state_dict") -> tuple[dict, dict]:
    """Official ``state_dict`` (tensors or arrays; ``module.`` prefix allowed) -> ``({"params": ...,
    "batch_stats": ...}, notes)`` (numpy, bit-exact). Keys must match exactly (a :class:`ConversionError` lists
    the differences); ``notes["xpos_scale"]``: whether every ``xpos.scale`` buffer equals the recomputed one."""
    from jaxprvr.ops.retention import xpos_scale
    from parity.convert import ConversionError, _check_keys, _check_rank, _strip_module, to_numpy, unflatten

    rows = key_rows(model_cfg)
    sd = _strip_module(state_dict)
    _check_keys(where, [r[0] for r in rows], sd, "MRNet state_dict keys")
    out: dict = {"params": {}, "batch_stats": {}}
    scale_ok = True
    for t, coll, f, kind in rows:
        a = to_numpy(sd[t])
        _check_rank(where, Entry(t, f, kind), a)
        if kind == "buffer":
            ref = xpos_scale(model_cfg.joint_space)
            scale_ok &= a.shape == ref.shape and np.array_equal(a.astype(np.float64), ref.astype(np.float64))
            continue
        if kind == "bn_count" and not np.issubdtype(a.dtype, np.integer):
            raise ConversionError(where, f"{t} an integer count", f"dtype {a.dtype}")
        out[coll][f] = to_flax(kind, a)
    return {k: unflatten(v) for k, v in out.items()}, {"xpos_scale": bool(scale_ok)}


def variables_to_arrays(model_cfg, variables, where="variables") -> "collections.OrderedDict[str, np.ndarray]":
    """``{"params", "batch_stats"}`` -> the official ``state_dict`` as numpy arrays, official order; the
    ``xpos.scale`` buffers recomputed in float32 and cast to the dtype of the floating parameters."""
    from jaxprvr.ops.retention import xpos_scale
    from parity.convert import _check_keys, to_numpy

    rows = key_rows(model_cfg)
    flat = {c: _flatten(variables.get(c, {})) for c in ("params", "batch_stats")}
    for c in flat:
        _check_keys(f"{where}[{c}]", [f for _, cc, f, _ in rows if cc == c], flat[c], f"MRNet {c} leaves")
    dt = np.asarray(next(iter(flat["params"].values()))).dtype
    out = collections.OrderedDict()
    for t, coll, f, kind in rows:
        if kind == "buffer":
            out[t] = xpos_scale(model_cfg.joint_space).astype(dt)
        else:
            out[t] = to_torch(kind, to_numpy(flat[coll][f]))
    return out


def variables_to_torch(model_cfg, variables, where="variables") -> "collections.OrderedDict":
    from parity.convert import to_tensor

    return collections.OrderedDict((k, to_tensor(a)) for k, a in variables_to_arrays(model_cfg, variables,
                                                                                       where).items())


def twin_variables(model_cfg, twin) -> dict:
    return torch_to_variables(model_cfg, {k: v.detach().cpu() for k, v in twin.state_dict().items()})[0]


# ---------------------------------------------------------------------------------------------- optimizer


def _adam_states(opt_state):
    """The ``optax.ScaleByAdamState`` s inside an optax state (one for the trainable partition)."""
    import jax
    import optax

    found = []
    jax.tree_util.tree_map(lambda x: found.append(x) if isinstance(x, optax.ScaleByAdamState) else None, opt_state,
                           is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    return found


def _set_counts(opt_state, count):
    """Every step counter (``count`` fields of optax states) of ``opt_state`` set to ``count``."""
    import jax

    def fix(node):
        if hasattr(node, "_fields") and "count" in getattr(node, "_fields", ()):
            return node._replace(count=np.asarray(count, np.asarray(node.count).dtype))
        return node

    return jax.tree_util.tree_map(fix, opt_state, is_leaf=lambda x: hasattr(x, "_fields") and "count" in x._fields)


def adamw_to_optax(cfg, params, optimizer_state, where="optimizer"):
    """An official AdamW ``state_dict`` (two groups; per-parameter ``step``, ``exp_avg``, ``exp_avg_sq``) -> the
    optax state of ``jaxprvr.tasks.vmr.TASK.optimizer`` (numpy), or ``None`` when nothing ever stepped."""
    import jax

    from jaxprvr.tasks.vmr import TASK
    from parity.convert import ConversionError, to_numpy

    groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, dict) else None
    tab = make_table(cfg.model)
    names = [e.torch for e in tab]
    if not groups or len(groups) != 2 or len(groups[0]["params"]) != len(names) or groups[1]["params"]:
        raise ConversionError(where, f"the official AdamW state: two groups, {len(names)} parameters and an empty "
                                     "'bert' group", f"{len(groups or [])} groups of "
                                     f"{[len(g['params']) for g in groups or []]} parameters")
    id_to_name = dict(zip(groups[0]["params"], names))
    state = optimizer_state.get("state") or {}
    if not state:
        return None
    by_name = {id_to_name[i]: s for i, s in state.items()}
    steps = {float(to_numpy(s["step"])) for s in by_name.values()}
    if len(steps) != 1:
        raise ConversionError(where, "one step count shared by every updated parameter", f"steps {sorted(steps)}")
    step = int(steps.pop())
    tx = TASK.optimizer(cfg, params, 1)
    opt = jax.device_get(tx.init(params))
    flax_of = {e.torch: (e.flax, e.kind) for e in tab}
    path_of = {f: t for t, (f, _) in flax_of.items()}
    adam = _adam_states(opt)
    if len(adam) != 1:
        raise JaxprvrError("tasks.vmr optimizer", "one optax ScaleByAdamState", f"{len(adam)}")

    def moment(which):
        def fill(path, leaf):
            name = path_of["/".join(getattr(k, "key", str(k)) for k in path)]
            if name not in by_name:
                return np.zeros_like(np.asarray(leaf))
            a = to_flax(flax_of[name][1], to_numpy(by_name[name][which]))
            if a.shape != np.shape(leaf):
                raise ConversionError(where, f"{which} of {name} of shape {np.shape(leaf)}", str(a.shape))
            return a.astype(np.asarray(leaf).dtype)

        return fill

    old = adam[0]
    new = old._replace(mu=jax.tree_util.tree_map_with_path(moment("exp_avg"), old.mu),
                       nu=jax.tree_util.tree_map_with_path(moment("exp_avg_sq"), old.nu))
    opt = jax.tree_util.tree_map(lambda x: new if x is old else x, opt,
                                 is_leaf=lambda x: x is old)
    return _set_counts(opt, step), step, sorted(set(names) - set(by_name))


def optax_to_adamw(cfg, twin, opt_state, epoch: int):
    """The optax state of ``TASK.optimizer`` -> ``(optimizer, scheduler)`` of the official recipe
    (:func:`torch_ref.mrnet.official_optimizer` on ``twin``) holding the moments, the step and the epoch's
    learning rate. Parameters whose moments are all zero and that the model never updates get no state entry."""
    import jax
    import torch

    from jaxprvr.models import build_model
    from torch_ref.mrnet import official_optimizer

    opt, sched = official_optimizer(twin, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": only the epoch counter moves
        for _ in range(int(epoch)):
            sched.step()
    sd = opt.state_dict()
    if opt_state is None:
        return opt, sched
    adam = _adam_states(jax.device_get(opt_state))
    if len(adam) != 1:
        raise JaxprvrError("opt_state", "the optax state of tasks.vmr TASK.optimizer", f"{len(adam)} Adam states")
    mu, nu, count = _flatten(adam[0].mu), _flatten(adam[0].nu), int(np.asarray(adam[0].count))
    params = dict(twin.named_parameters())
    trainable = _flatten(build_model(cfg.model).trainable_mask(
        jax.tree_util.tree_map(lambda _: 0, twin_variables(cfg.model, twin)["params"])))
    state = {}
    if count > 0:
        for i, e in enumerate(make_table(cfg.model)):
            if not trainable.get(e.flax, True) or e.flax not in mu:
                continue
            p = params[e.torch]
            state[i] = {"step": torch.tensor(float(count), dtype=torch.float32),
                        "exp_avg": torch.from_numpy(to_torch(e.kind, np.asarray(mu[e.flax]))).to(p.dtype),
                        "exp_avg_sq": torch.from_numpy(to_torch(e.kind, np.asarray(nu[e.flax]))).to(p.dtype)}
    sd["state"] = state
    opt.load_state_dict(sd)
    return opt, sched


# ---------------------------------------------------------------------------------------------- the spec


class Spec(OwnStages, FamilySpec):
    name = "mrnet"
    check_class = "MRNetCheck"
    official_layout = "{model, optimizer, scheduler, epoch} (.pth)"

    @property
    def table(self):
        return _default_table()

    def table_for(self, model_cfg):
        return make_table(model_cfg)

    def read_variables(self, path, cfg, overrides=()):
        """``jaxprvr.load``: MRNet's ``{model, optimizer, scheduler, epoch}`` ``.pth`` -> parameters and BatchNorm
        statistics."""
        variables, _ = torch_to_variables(cfg.model, read_official(path)["model"], where=str(path))
        return cfg, variables["params"], {"batch_stats": variables["batch_stats"]}

    def describe(self, cfg) -> str:
        m = cfg.model
        return (f"joint {m.joint_space}, featpool {m.featpool_hidden}, predictor {m.predictor_hidden} "
                f"({m.predictor_kernel}x{m.predictor_kernel}x{m.predictor_layers}), TransRet {m.trans_layers} "
                f"({m.ret_variant}, att_mode {m.att_mode}, softmax {m.att_softmax}), N {m.num_clips}, "
                f"input {m.input_size}, text {m.text_dim}")

    def zero_gradients(self, cfg) -> tuple:
        return (ZeroGrad(r"proposal_conv\.convs\.\d+\.bias", BN_CONV_BIAS),)

    def no_grad_names(self, cfg) -> dict:
        """The parameters the official model never gives a gradient (``trainable_mask`` False): torch name ->
        reason."""
        from jaxprvr.models import build_model
        from parity.convert import unflatten

        tab = make_table(cfg.model)
        zeros = unflatten({e.flax: 0 for e in tab})  # the parameter tree's structure
        mask = _flatten(build_model(cfg.model).trainable_mask(zeros))
        out = {}
        for e in tab:
            if not mask[e.flax]:
                out[e.torch] = next((r for k, r in NO_GRAD_REASONS.items() if k in e.torch), "no official gradient")
        return out

    def adam_step_bound(self, cfg, steps: int, lrs) -> float:
        """The most two AdamW runs from the same weights can move one entry apart in ``steps`` steps whatever their
        gradients: per step ``lr_t |m_hat / (sqrt(v_hat) + eps)| <= lr_t (1 - b1) / sqrt(1 - b2) sqrt(sum_{k<t}
        (b1^2 / b2)^k) sqrt(1 - b2^t) / (1 - b1^t)`` (Cauchy-Schwarz on the two moving averages; the bias
        corrections as torch applies them), summed, twice; plus the decoupled decay of entries that differ."""
        b1, b2 = cfg.train.adam_b1, cfg.train.adam_b2
        total = 0.0
        for t in range(1, steps + 1):
            ratio = ((1 - b1) / math.sqrt(1 - b2) * math.sqrt(sum((b1 * b1 / b2) ** k for k in range(t)))
                     * math.sqrt(1 - b2 ** t) / (1 - b1 ** t))
            total += float(lrs[t - 1]) * ratio
        return 2.0 * total * (1.0 + 1e-3)

    # -- inputs
    def make_batch(self, model_cfg, n_videos: int = 4, seed: int = 0, counts=None) -> dict:
        """``n_videos`` valid videos (1-3 queries each, one with a single query; every video has at least one
        padded query slot) and one padding video (``video_valid`` 0), the VMR batch layout."""
        from jaxprvr.ops.proposals import moment_to_iou2d

        rng = np.random.default_rng(seed)
        c = model_cfg
        drawn = [1] + [int(rng.integers(2, 4)) for _ in range(n_videos - 1)]
        counts = drawn if counts is None else [int(n) for n in counts]
        b, q, n = n_videos + 1, max(counts) + 1, c.num_clips
        feats = rng.standard_normal((b, c.num_pre_clips, c.input_size)).astype(np.float32)
        queries = np.zeros((b, q, c.text_dim), np.float32)
        qmask = np.zeros((b, q), np.float32)
        moments = np.zeros((b, q, 2), np.float32)
        iou2d = np.zeros((b, q, n, n), np.float32)
        duration = rng.uniform(20.0, 120.0, b).astype(np.float32)
        nq = np.zeros(b, np.int32)
        for i, k in enumerate(counts):
            nq[i] = k
            queries[i, :k] = rng.standard_normal((k, c.text_dim))
            qmask[i, :k] = 1
            s = np.sort(rng.uniform(0, duration[i], (k, 2)), axis=1).astype(np.float32)
            s[:, 1] = np.maximum(s[:, 1], s[:, 0] + 0.05 * duration[i])
            s = np.minimum(s, duration[i])
            s = s[np.argsort(s[:, 0], kind="stable")]  # rank order (by start)
            moments[i, :k] = s
            iou2d[i, :k] = np.asarray(moment_to_iou2d(s, float(duration[i]), n))
        valid = np.ones(b, np.float32)
        valid[-1] = 0.0
        return dict(feats=feats, video_valid=valid, queries=queries, query_mask=qmask, n_queries=nq,
                    moments=moments, duration=duration, iou2d=iou2d, index=np.arange(b, dtype=np.int32) - (1 - valid
                    ).astype(np.int32) * (b + 1))

    def second_batch(self, model_cfg, batch, n_videos: int, seed: int) -> dict:
        counts = [int(k) for k in np.asarray(batch["n_queries"])[np.asarray(batch["video_valid"]) > 0]]
        return self.make_batch(model_cfg, n_videos, seed + 1, counts=counts)

    def no_dropout(self, cfg):
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, input_dropout=0.0, dropout=0.0,
                                                                  att_dropout=0.0))

    # -- the float64 twin
    @contextlib.contextmanager
    def twin_mode(self, twin):
        """A float64 twin computes in float64 throughout: torch's default dtype float64, and the decay mask and
        the sine PE (which the official code builds in float32, ``masks(dtype=torch.float32)``,
        position_encoding.py L61-68) in float64, as the Flax model does under ``compute_dtype=float64``; the
        ProposalConv renormalisation weights stay float32 constants (as :func:`jaxprvr.ops.proposals.
        conv_mask_weights` gives them in every dtype); the ``xpos.scale`` buffers and xPos tables in float64 (as
        :func:`jaxprvr.ops.retention.xpos` computes them for float64). A float32 twin runs as is (the official
        arithmetic)."""
        import torch

        import torch_ref.mrnet as tm

        if next(twin.parameters()).dtype != torch.float64:
            yield
            return
        old_dtype, old_pe, old_masks = torch.get_default_dtype(), tm.sine_pe, tm.RetLayer.masks

        def pe64(x, mask, num_pos_feats, temperature=10000, scale=2 * math.pi):
            x_embed = mask.to(torch.float64).cumsum(1)
            x_embed = x_embed / (x_embed[:, -1:] + 1e-6) * scale
            dim_t = torch.arange(num_pos_feats, dtype=torch.float64, device=x.device)
            dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="trunc") / num_pos_feats)
            pos_x = x_embed[:, :, None] / dim_t
            return torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)

        def masks64(self_, seq_len, txt_len, dtype=torch.float64):
            return old_masks(self_, seq_len, txt_len, dtype=torch.float64)

        old_weights = tm.get_padded_mask_and_weight

        def weights32(mask, conv):  # the renormalisation weights stay the official float32 constants (as in Flax)
            torch.set_default_dtype(torch.float32)
            try:
                return old_weights(mask, conv)
            finally:
                torch.set_default_dtype(torch.float64)

        old_fpe = tm.XPOS._fixed_pos_embedding

        def fpe64(x):  # xpos_relative_position.py L6-12 with float64 positions (officially torch.float)
            seq_len, dim = x.shape
            inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, dtype=torch.float64) / dim))
            sinusoid = torch.einsum("i , j -> i j", torch.arange(0, seq_len, dtype=torch.float64), inv_freq).to(x)
            return torch.sin(sinusoid), torch.cos(sinusoid)

        with torch.no_grad():  # the xpos.scale constants in float64 (the buffer holds float32 values cast up)
            for m in twin.modules():
                if isinstance(m, tm.XPOS):
                    d = m.head_dim
                    m.scale.copy_((torch.arange(0, d, 2, dtype=torch.float64) + 0.4 * d) / (1.4 * d))
        torch.set_default_dtype(torch.float64)
        tm.sine_pe, tm.RetLayer.masks, tm.get_padded_mask_and_weight = pe64, masks64, weights32
        tm.XPOS._fixed_pos_embedding = staticmethod(fpe64)
        try:
            yield
        finally:
            torch.set_default_dtype(old_dtype)
            tm.sine_pe, tm.RetLayer.masks, tm.get_padded_mask_and_weight = old_pe, old_masks, old_weights
            tm.XPOS._fixed_pos_embedding = staticmethod(old_fpe)


SPEC = Spec()


# ---------------------------------------------------------------------------------------------- conversion CLI


def read_official(path) -> dict:
    """The official file's dict (``model`` with ``module.`` stripped; a bare state_dict is wrapped), torch-loaded
    with ``weights_only=True``."""
    from torch_ref.mrnet import _read

    return _read(path)


def torch2jax(args, cfg) -> dict:
    from jaxprvr.checkpoint import Checkpoints
    from parity.convert import _abstract_params, check_shapes

    src = Path(args.input)
    if not src.is_file():
        raise JaxprvrError(src, "an official MRNet checkpoint file (.pth)", "no such file")
    try:
        obj = read_official(src)
    except JaxprvrError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise JaxprvrError(src, "an official MRNet checkpoint file (.pth)", f"{type(e).__name__}: {e}") from None
    variables, notes = torch_to_variables(cfg.model, obj["model"], where=src)
    check_shapes(variables["params"], _abstract_params(cfg), src, make_table(cfg.model))
    epoch = int(obj.get("epoch", 0) or 0)
    opt = None
    if isinstance(obj.get("optimizer"), dict):
        opt = adamw_to_optax(cfg, variables["params"], obj["optimizer"], where=f"{src} (optimizer)")
    out, ckpt_dir = prepare_out_dir(args.out_dir, args.force)
    meta = dict(config=cfg.to_dict(), source=str(src.absolute()), source_layout=SPEC.official_layout, epoch=epoch)
    slots = ("best", "latest") if opt is not None else ("best",)
    ckpts = Checkpoints(ckpt_dir, slots=slots)
    step = opt[1] if opt is not None else 0
    model_state = {"batch_stats": variables["batch_stats"]}
    ckpts.save("best", step, variables["params"], None, meta=meta, model_state=model_state)
    if opt is not None:
        resume = dict(meta, global_step=step, next_epoch=epoch, step_in_epoch=0, es_cnt=0, best_epoch=epoch - 1,
                      stopped=False)
        ckpts.save("latest", step, variables["params"], opt[0], resume, model_state=model_state)
    ckpts.close()
    return dict(model=cfg.model.name, input=str(src), out=str(out), tensors=len(key_rows(cfg.model)),
                parameters=int(sum(np.size(a) for a in _flatten(variables["params"]).values())), epoch=epoch,
                optimizer_state=opt is not None, optimizer_step=step if opt is not None else None,
                never_updated=opt[2] if opt is not None else None, slots=list(slots),
                xpos_scale_recomputed_equal=notes["xpos_scale"])


def jax2torch(args, cfg) -> dict:
    import jax
    import orbax.checkpoint as ocp
    import torch

    from jaxprvr.checkpoint import load_model_state, load_params, read_meta, resolve_params_dir
    from jaxprvr.models import build_model
    from jaxprvr.tasks.vmr import TASK
    from jaxprvr.train import init_variables
    from parity.prvr import _atomic
    from torch_ref.mrnet import MRNet as Twin, save_official_checkpoint

    step_dir = resolve_params_dir(args.input)
    meta = read_meta(step_dir)
    cfg = checkpoint_config(step_dir, cfg, args.overrides)
    model = build_model(cfg.model)
    a_params, a_state = jax.eval_shape(lambda: init_variables(model, cfg, jax.random.PRNGKey(0)))
    params, _ = load_params(step_dir, a_params)
    bs = load_model_state(step_dir, a_state)["batch_stats"]
    variables = jax.device_get({"params": params, "batch_stats": bs})
    opt_state = None
    if (step_dir / "opt_state").is_dir() and not args.no_optimizer:
        abstract = jax.eval_shape(lambda p: TASK.optimizer(cfg, p, 1).init(p), a_params)
        try:
            opt_state = ocp.StandardCheckpointer().restore(step_dir / "opt_state", abstract)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise JaxprvrError(step_dir / "opt_state", "the optax state of tasks.vmr TASK.optimizer",
                               f"{type(e).__name__}: {e}") from None
    epoch = int(meta["epoch"]) if "epoch" in meta else int(meta.get("next_epoch", 0))
    with torch.random.fork_rng():
        twin = Twin(cfg)
    twin.load_state_dict(variables_to_torch(cfg.model, variables), strict=True)
    opt, sched = optax_to_adamw(cfg, twin, opt_state, epoch)
    path = _atomic(args.output, lambda tmp: save_official_checkpoint(tmp, twin, opt, sched, epoch=epoch))
    return dict(model=cfg.model.name, input=str(step_dir), output=str(path), tensors=len(key_rows(cfg.model)),
                layout=SPEC.official_layout, optimizer_state=opt_state is not None,
                optimizer_entries=len(opt.state_dict()["state"]), epoch=epoch)


# ---------------------------------------------------------------------------------------------- parity.check


def _np(x):
    return as_numpy(x)


class MRNetCheck(FamilyCheck):
    """The rows of ``parity.check --model mrnet`` (docs/parity.md, MRNet). The twin runs on the CPU."""

    train_label = "AdamW steps"

    def __init__(self, spec, cfg, *, ckpt, data_root, seed, n_videos, steps, device, say, compiler_options, tol,
                 perturb):
        import jax
        import torch

        from jaxprvr.models import build_model
        from parity.check import with_compute_dtype
        from torch_ref.mrnet import MRNet as Twin
        from torch_ref.mrnet import load_official_checkpoint

        self._setup(spec, seed=seed, steps=steps, say=say, data_root=data_root, tol=tol, perturb=perturb,
                    compiler_options=compiler_options, n_videos=n_videos)
        torch.manual_seed(seed)
        twin32 = Twin(cfg)
        if ckpt is not None:
            load_official_checkpoint(ckpt, twin32)
        if perturb == "all":
            twin32 = perturb_twin(twin32, seed)
        self.set_twin(twin32)
        if self.f64:
            cfg = with_compute_dtype(cfg, "float64")
        self.cfg = cfg
        self.model = build_model(cfg.model)
        self.batch = self.cast(spec.make_batch(cfg.model, n_videos, seed))
        self.key = jax.random.key(seed)

    # -- helpers
    def variables(self, twin):
        return twin_variables(self.cfg.model, twin)

    @staticmethod
    def device_batch(batch):
        from jaxprvr.tasks.vmr import BATCH_KEYS

        return {k: np.asarray(batch[k]) for k in BATCH_KEYS}

    def official(self, batch, twin):
        import torch

        from torch_ref.mrnet import official_batch

        ob = official_batch(batch)
        dt = next(twin.parameters()).dtype
        ob["feats"] = torch.as_tensor(np.asarray(batch["feats"])[np.asarray(batch["video_valid"]) > 0], dtype=dt)
        ob["queries"] = [q.to(dt) for q in ob["queries"]] if dt == torch.float64 else ob["queries"]
        if dt == torch.float64:  # the exact float64 values of the batch (official_batch casts to float32)
            valid = np.flatnonzero(np.asarray(batch["video_valid"]) > 0)
            nq = np.asarray(batch["n_queries"])
            ob["queries"] = [torch.as_tensor(np.asarray(batch["queries"][b])[:nq[b]], dtype=dt) for b in valid]
        return ob

    def valid(self, batch=None):
        b = self.batch if batch is None else batch
        return np.flatnonzero(np.asarray(b["video_valid"]) > 0), np.asarray(b["n_queries"]).astype(int)

    # -- convert
    def conversion_rows(self) -> list[Row]:
        rows = []
        for tw in (self.twin32, self.twin64):
            sd = tw.state_dict()
            back = variables_to_torch(self.cfg.model, self.variables(tw))
            exact = list(back) == list(sd)
            worst = 0.0
            for k, v in sd.items():
                v = v.detach().cpu()
                exact = exact and back[k].dtype == v.dtype and tuple(back[k].shape) == tuple(v.shape) and bool(
                    (back[k] == v).all())
                if v.numel() and v.is_floating_point():
                    worst = max(worst, float((back[k].double() - v.double()).abs().max()))
            dt = str(next(tw.parameters()).dtype).replace("torch.", "")
            rows.append(Row("convert", f"torch -> flax (params + batch_stats) -> torch ({len(sd)} tensors, {dt}; "
                                       "xpos.scale recomputed, int64 num_batches_tracked)", worst, worst,
                            "bit-exact", exact))
        return rows

    # -- blocks
    def block_rows(self, suffix="") -> list[Row]:
        import jax.numpy as jnp
        import torch

        from jaxprvr.models import mrnet as fm
        from jaxprvr.models.layers import resolve_compute_dtype
        from jaxprvr.ops import proposals as P
        from jaxprvr.ops import retention as R
        import torch_ref.mrnet as tm

        c, tol = self.cfg.model, self.tol
        dt = resolve_compute_dtype(c)
        st = jnp.float64 if self.f64 else jnp.float32
        fdt = np.float64 if self.f64 else np.float32
        var = self.variables(self.twin)
        params, bstats = var["params"], var["batch_stats"]
        rng = np.random.default_rng(self.seed + 11)
        valid, nq = self.valid()
        b_all, q_slots = self.batch["queries"].shape[:2]
        n, d = c.num_clips, c.joint_space
        rows = []

        def T(x, tw):
            return torch.as_tensor(np.asarray(x), dtype=next(tw.parameters()).dtype)

        # pure functions
        n_txt = 3 if c.att_mode == "all" else 0
        table = np.asarray(params["trans_ret"]["rets_0"]["learn_vid_ret"]["embedding"])
        dec = R.decay_mask(n, c.gamma, c.d_double, dtype=st)
        sp, _ = R.sparse_mask(jnp.asarray(table, st))
        j_mask = R.multiplicative_mask(n_txt, dec, sp, c.att_mode, c.mask_mode)

        def t_mask(tw):
            with self.mode(tw):
                return _np(tw.trans_ret.rets[0].masks(n_txt + n, n_txt)[0])

        rows.append(self.arbiter_row(f"multiplicative mask (decay x sparse, att_mode {c.att_mode}, mask_mode "
                                     f"{c.mask_mode}){suffix}", np.asarray(j_mask), t_mask, tol.block))

        def t_decay(tw):
            with self.mode(tw):
                return _np(tm.decay_matrix(n, float(c.gamma), c.d_double).to(next(tw.parameters()).dtype))

        rows.append(self.arbiter_row(f"decay mask D (N={n}, gamma {c.gamma:g}, diagonal {2 if c.d_double else 1})"
                                     f"{suffix}", np.asarray(dec), t_decay, tol.block))
        rows.append(self.arbiter_row(f"sparsity loss of layer 0{suffix}", np.asarray(R.sparsity_loss(
            jnp.asarray(table, st))), lambda tw: _np(torch.mean(torch.abs(tw.trans_ret.rets[0].masks(
                n_txt + n, n_txt)[1]))), tol.block))
        pe_j = np.asarray(R.sine_query_pe(jnp.asarray(nq[valid]), q_slots, d, dtype=st))

        def t_pe(tw):
            with self.mode(tw):
                out = np.zeros_like(pe_j)
                for r, b in enumerate(valid):
                    out[r, :nq[b]] = _np(tm.sine_pe(None if False else T(np.zeros((1, nq[b], d)), tw),
                                                    torch.ones(1, int(nq[b])), d))[0]
                return out

        rows.append(self.arbiter_row(f"sine PE of the queries over the true n_q{suffix}", pe_j, t_pe, tol.block))
        xv = rng.standard_normal((1, n, d)).astype(fdt)
        for down in (False, True):
            rows.append(self.arbiter_row(f"xPos{' downscaled (keys)' if down else ''} over the whole token{suffix}",
                                         np.asarray(R.xpos(jnp.asarray(xv), downscale=down)),
                                         lambda tw, down=down: _with(self.mode(tw), lambda: _np(
                                             tw.trans_ret.rets[0].xpos(T(xv, tw), downscale=down))), tol.block))

        # the retention layer and TransRet on the padded batch vs the per-video twin
        rows_of = {b: list(range(nq[b])) + list(range(q_slots, q_slots + n)) for b in valid}
        h = rng.standard_normal((b_all, q_slots + n, d)).astype(fdt)
        qm = np.asarray(self.batch["query_mask"], fdt)
        n_q = np.asarray(self.batch["n_queries"], np.int32)
        ret = fm.RetLayer(c, dtype=dt)
        j_out, j_sp = ret.apply({"params": params["trans_ret"]["rets_0"]}, jnp.asarray(h), jnp.asarray(n_q),
                                jnp.asarray(qm))
        j_cat = np.concatenate([np.asarray(j_out)[b, rows_of[b]] for b in valid])

        def t_ret(tw):
            with self.mode(tw), torch.no_grad():
                return np.concatenate([_np(tw.trans_ret.rets[0](T(h[b:b + 1, rows_of[b]], tw), int(nq[b]))[0][0])
                                       for b in valid])

        rows.append(self.arbiter_row(f"retention layer rets.0 ({c.ret_variant}, att_mode {c.att_mode}; padded "
                                     f"batch vs per video){suffix}", j_cat, t_ret, tol.block))
        txt = rng.standard_normal((b_all, q_slots, d)).astype(fdt)
        vid = rng.standard_normal((b_all, n, d)).astype(fdt)
        tr = fm.TransRet(c, dtype=dt)
        (j_mem, j_sp) = tr.apply({"params": params["trans_ret"]}, jnp.asarray(txt), jnp.asarray(vid),
                                 jnp.asarray(n_q), jnp.asarray(qm))
        j_cat = np.concatenate([np.asarray(j_mem)[b, rows_of[b]] for b in valid])

        def t_tr(tw):
            with self.mode(tw), torch.no_grad():
                return np.concatenate([_np(tw.trans_ret(T(txt[b:b + 1, :nq[b]], tw), T(vid[b:b + 1], tw))[0][0])
                                       for b in valid])

        rows.append(self.arbiter_row(f"TransRet ({c.trans_layers} layers + final LayerNorm){suffix}", j_cat, t_tr,
                                     tol.block))
        # proposal map and ProposalConv (BatchNorm eval and train)
        mask = fm.proposal_mask(c)
        x = rng.standard_normal((b_all, n, d)).astype(fdt)
        j_map = np.asarray(P.proposal_map(jnp.asarray(x), mask))
        rows.append(self.arbiter_row(f"2-D proposal map (max over [i..j], {int(mask.sum())} cells){suffix}",
                                     j_map[valid], lambda tw: _np(tw.feat2d(T(x[valid], tw).transpose(1, 2))).transpose(
                                         0, 2, 3, 1), tol.block))
        vv = np.asarray(self.batch["video_valid"], fdt)
        pc = fm.ProposalConv(c, dtype=dt)
        pvars = {"params": params["proposal_conv"], "batch_stats": bstats["proposal_conv"]}
        je1, je2 = pc.apply(pvars, jnp.asarray(j_map), jnp.asarray(vv), train=False)

        def t_pc(tw, train, which):
            with self.mode(tw), torch.no_grad():
                mod = copy.deepcopy(tw.proposal_conv).train(train)
                o = mod(T(j_map[valid], tw).permute(0, 3, 1, 2))
                if which == "stats":
                    return np.concatenate([np.concatenate([_np(bn.running_mean), _np(bn.running_var)])
                                           for bn in mod.bn])
                return _np(o[which]).transpose(0, 2, 3, 1)

        for i, name in enumerate(("contrastive", "iou")):
            rows.append(self.arbiter_row(f"ProposalConv eval (running statistics) -> {name} map{suffix}",
                                         np.asarray((je1, je2)[i])[valid], lambda tw, i=i: t_pc(tw, False, i),
                                         tol.block))
        (jt1, jt2), new = pc.apply(pvars, jnp.asarray(j_map), jnp.asarray(vv), train=True, mutable=["batch_stats"])
        for i, name in enumerate(("contrastive", "iou")):
            rows.append(self.arbiter_row(f"ProposalConv train (batch statistics over the valid videos' cells) -> "
                                         f"{name} map{suffix}", np.asarray((jt1, jt2)[i])[valid],
                                         lambda tw, i=i: t_pc(tw, True, i), tol.block))
        nb = new["batch_stats"]
        j_stats = np.concatenate([np.concatenate([np.asarray(nb[f"bn_{j}"]["mean"]), np.asarray(nb[f"bn_{j}"]["var"])])
                                  for j in range(c.predictor_layers)])
        rows.append(self.arbiter_row(f"BatchNorm running mean/var after one train forward (momentum 0.1, unbiased "
                                     f"var){suffix}", j_stats, lambda tw: t_pc(tw, True, "stats"), tol.block))
        return rows

    # -- whole model
    def flax_forward(self, variables, batch, train: bool, dropout_key=None, capture=False, model=None):
        import jax

        model = model or self.model
        mutable = (["batch_stats"] if train else []) + (["dropout_keys"] if capture else [])
        rngs = {"dropout": dropout_key if dropout_key is not None else jax.random.key(0)}
        if mutable:
            (out, aux), new = model.apply(variables, self.device_batch(batch), train=train, rngs=rngs,
                                          mutable=mutable)
            return out, aux, new
        out, aux = model.apply(variables, self.device_batch(batch), train=train, rngs=rngs)
        return out, aux, {}

    def twin_outputs(self, twin, batch, train: bool, epoch: int = 1):
        """The twin's per-video outputs padded into the batch layout: ``(outputs, aux, losses or None)``."""
        import torch

        valid, nq = self.valid(batch)
        b_all, q = np.asarray(batch["queries"]).shape[:2]
        ob = self.official(batch, twin)
        twin.train(train)
        with self.mode(twin), torch.no_grad():
            res = twin(ob, cur_epoch=epoch)
        last = twin.last
        n = self.cfg.model.num_clips
        dt = np.float64 if next(twin.parameters()).dtype == torch.float64 else np.float32
        iou = np.zeros((b_all, q, n, n), dt)
        con = np.zeros((b_all, q, n, n), dt)
        txt = np.zeros((b_all, q, self.cfg.model.joint_space), dt)
        map2d = np.zeros((b_all, n, n, self.cfg.model.joint_space), dt)
        for r, b in enumerate(valid):
            iou[b, :nq[b]] = _np(last["iou_scores"][r])
            txt[b, :nq[b]] = _np(last["txt_feats"][r])
            map2d[b] = _np(last["map2d"][r]).transpose(1, 2, 0)
            if not train:
                con[b, :nq[b]] = _np(last["contrastive_scores"][r])
        out = {"iou_scores": iou, "map2d": map2d, "txt_mem": txt}
        if not train:
            out["contrastive_scores"] = con
        aux = {"loss_sparsity": np.asarray(_np(torch.as_tensor(last["loss_sparse"])), dt)}
        return out, aux, (res if train else None)

    def output_rows(self, group, j_out, j_aux, t_out, t_aux, batch, suffix, rtol_atol) -> list[Row]:
        valid, nq = self.valid(batch)
        rows = []
        for k in sorted(t_out):
            j, t = np.asarray(j_out[k]), np.asarray(t_out[k])
            if k == "map2d":
                rows.append(close_row(group, f"{k} (contrastive-head map){suffix}", j[valid], t[valid], *rtol_atol))
            else:
                jj = np.concatenate([j[b, :nq[b]] for b in valid])
                tt = np.concatenate([t[b, :nq[b]] for b in valid])
                rows.append(close_row(group, f"{k}{suffix}", jj, tt, *rtol_atol))
        rows.append(close_row(group, f"aux loss_sparsity (sum over layers and videos){suffix}",
                              np.asarray(j_aux["loss_sparsity"]), t_aux["loss_sparsity"], *rtol_atol))
        return rows

    def model_rows(self, suffix="") -> list[Row]:
        import torch

        var = self.variables(self.twin)
        rows = []
        j_out, j_aux, _ = self.flax_forward(var, self.batch, False)
        t_out, t_aux, _ = self.twin_outputs(self.twin, self.batch, False)
        rows += self.output_rows("model", j_out, j_aux, t_out, t_aux, self.batch, " [eval]" + suffix,
                                 self.tol.model)
        tw = copy.deepcopy(self.twin)  # train mode moves the running statistics: on a copy
        tw_nd = self.twin_no_dropout(tw)
        j_out, j_aux, new = self.flax_forward(self.variables(tw_nd), self.batch, True,
                                              model=self._model_of(self.spec.no_dropout(self.cfg)))
        t_out, t_aux, _ = self.twin_outputs(tw_nd, self.batch, True)
        rows += self.output_rows("model", j_out, j_aux, t_out, t_aux, self.batch,
                                 " [train, batch statistics, dropout off]" + suffix, self.tol.model)
        tw64 = None
        if not self.f64:  # the float64 arbiter's statistics: the same train forward in float64
            tw64 = self.twin_no_dropout(copy.deepcopy(self.twin64))
            self.twin_outputs(tw64, self.cast_for(tw64), True)
        rows += self.bn_rows("model", "after the train forward" + suffix, new["batch_stats"], tw_nd, tw64)
        del torch
        return rows

    def twin_no_dropout(self, twin):
        """A copy of ``twin`` with every dropout rate 0 (built from the no-dropout config, same weights)."""
        import torch

        from torch_ref.mrnet import MRNet as Twin

        tcfg = self.spec.no_dropout(self.cfg)
        with torch.random.fork_rng():  # (mask2d is a plain tensor attribute: no meta-device construction)
            t = Twin(tcfg)
        t = t.to(next(twin.parameters()).dtype)
        t.load_state_dict(twin.state_dict(), strict=True)
        return t

    # -- losses
    def loss_rows(self) -> list[Row]:
        from jaxprvr.losses.vmr import mrnet_loss
        from parity.check import _loss_rows
        from torch_ref.mrnet import official_total

        rows = []
        tw = self.twin_no_dropout(copy.deepcopy(self.twin))
        oi = self.cfg.loss.only_iou_epoch
        for epoch in (oi, oi + 1):
            t_out, t_aux, res = self.twin_outputs(tw, self.batch, True, epoch)
            tl_, tterms = official_total(*res, self.cfg, epoch)
            tterms = {k: float(_np(v)) for k, v in tterms.items()}
            from jaxprvr.models.mrnet import proposal_mask

            aux = dict(t_aux, mask2d=np.asarray(proposal_mask(self.cfg.model), t_out["iou_scores"].dtype))
            jl, jterms = mrnet_loss(t_out, aux, self.device_batch(self.batch), self.cfg.loss, epoch,
                                    self.cfg.train.batch_size)
            side = "<=" if epoch <= oi else ">"
            rows += _loss_rows("loss", jl, {k: np.asarray(v) for k, v in jterms.items()}, float(_np(tl_)), tterms,
                               self.tol.loss, f" [epoch {epoch} {side} ONLY_IOU {oi}]")
        return rows

    # -- gradients
    def jax_loss_fn(self, cfg=None, steps_per_epoch: int = 1):
        from jaxprvr.tasks.vmr import TASK

        return TASK.loss(self.model if cfg is None else self._model_of(cfg), cfg or self.spec.no_dropout(self.cfg),
                         steps_per_epoch)

    def _model_of(self, cfg):
        from jaxprvr.models import build_model

        return build_model(cfg.model)

    def grads(self, twin, batch, epoch=1):
        """The twin's loss, gradients by name (None -> zeros, and the set of None names)."""
        import torch

        from torch_ref.mrnet import official_total

        twin.train()
        twin.zero_grad(set_to_none=True)
        ob = self.official(batch, twin)
        with self.mode(twin):
            res = twin(ob, cur_epoch=epoch)
            loss, terms = official_total(*res, self.cfg, epoch)
            loss.backward()
        none = {n for n, p in twin.named_parameters() if p.grad is None}
        g = {n: (np.zeros(tuple(p.shape), np.float64) if p.grad is None else p.grad.detach().cpu().numpy())
             for n, p in twin.named_parameters()}
        del torch
        return float(_np(loss.detach())), g, none, {k: float(_np(torch_t(v))) for k, v in terms.items()}

    def jax_grads(self, variables, batch, epoch=1, dropout_key=None, cfg=None, model=None):
        import jax

        from jaxprvr.tasks.vmr import TASK

        tcfg = cfg or self.spec.no_dropout(self.cfg)
        model = model or self._model_of(tcfg)
        loss_fn = TASK.loss(model, tcfg, 1)
        key = dropout_key if dropout_key is not None else jax.random.key(0)
        fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=self.compiler_options or None)
        (jl, (terms, _)), jg = fn(variables["params"], self.device_batch(batch), {"dropout": key},
                                  np.int32(epoch - 1), {"batch_stats": variables["batch_stats"]})
        flat = _flatten(jax.device_get(jg))
        tab = make_table(self.cfg.model)
        return float(jl), {e.torch: to_torch(e.kind, np.asarray(flat[e.flax])) for e in tab}, terms

    def grad_rows(self, group="grad", dropout=None) -> list[Row]:
        from parity.check import _grad_rows

        t32 = self.twin_no_dropout(self.twin32)
        t64 = self.twin_no_dropout(self.twin64)
        tl32, g32, none32, _ = self.grads(t32, self.cast_for(t32))
        tl64, g64, none64, _ = self.grads(t64, self.cast_for(t64))
        var = self.variables(t64 if self.f64 else t32)
        jl, jg, _ = self.jax_grads(var, self.batch)
        tl_, tg = (tl64, g64) if self.f64 else (tl32, g32)
        rows = _grad_rows(self.spec, self.cfg, jl, jg, tl_, tg, g32, g64, self.tol,
                          f"d loss / d param ({len(tg)} tensors; train mode, batch statistics)", group=group,
                          loss_stage="training loss (train mode, dropout off, epoch 1)")
        rows.append(self.no_grad_row(jg, none64 if self.f64 else none32, group))
        return rows

    def cast_for(self, twin):
        import torch

        from parity.check import cast_batch

        return cast_batch(self.batch, "float64" if next(twin.parameters()).dtype == torch.float64 else "float32")

    def no_grad_row(self, jg, none, group) -> Row:
        """The parameters without an official gradient: torch's ``grad`` is None exactly for the listed ones, and
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
        note = "; ".join(f"{k}: {r}" for k, r in list(listed.items())[:6]) + (
            f" ... ({len(listed)})" if len(listed) > 6 else "")
        return Row(group, f"parameters without an official gradient ({len(listed)}: grad None in torch, exactly 0 "
                          "in JAX)", worst, worst, "identical (None / 0)", not bad, join_notes(note, *bad))

    # -- training
    def train_rows(self) -> list[Row]:
        """``steps`` AdamW steps (tasks.vmr's optimizer and loss) vs the official recipe, 2 steps per epoch with a
        milestone after epoch 2 (steps 5+ at lr x gamma) and ONLY_IOU after epoch 1 (steps 3+ at the x0.01 loss)."""
        import jax
        import optax
        import torch

        from jaxprvr.tasks.vmr import TASK
        from parity.check import AdamWReplay, ZeroList, _compare_trained
        from torch_ref.mrnet import official_optimizer, official_train_step

        spe = 2
        tcfg = self.spec.no_dropout(self.cfg)
        tcfg = dataclasses.replace(tcfg, train=dataclasses.replace(tcfg.train, milestones=(2,)),
                                   loss=dataclasses.replace(tcfg.loss, only_iou_epoch=1))
        model = self._model_of(tcfg)
        batches = [self.batch, self.cast(self.spec.second_batch(self.cfg.model, self.batch, self.n_videos,
                                                                self.seed))]
        twins = [self.twin_no_dropout(self.twin64)] if self.f64 else [self.twin_no_dropout(self.twin32),
                                                                      self.twin_no_dropout(self.twin64)]
        init = {n: p.detach().clone() for n, p in twins[0].named_parameters()}
        opts = [official_optimizer(tw, tcfg) for tw in twins]
        var = self.variables(twins[0])
        params, ms = var["params"], {"batch_stats": var["batch_stats"]}
        tx = TASK.optimizer(tcfg, params, spe)
        loss_fn = TASK.loss(model, tcfg, spe)
        state = tx.init(params)

        @jax.jit
        def step(p, s, m, b, i):
            (_, (_, m)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b, {"dropout": jax.random.key(0)}, i, m)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, m, g

        @jax.jit
        def grad_at(p, m, b, i):
            return jax.grad(lambda q: loss_fn(q, b, {"dropout": jax.random.key(0)}, i, m)[0])(p)

        tab = make_table(tcfg.model)
        entries = [e for e in tab if not e.alias]
        replay = None if self.f64 else AdamWReplay(
            {n: _np(p) for n, p in init.items()}, tcfg.train.adam_b1, tcfg.train.adam_b2, 1e-8, tcfg.train.wd,
            tcfg.train.max_grad_norm, self.tol.grad_rel)

        def torch_grads(tw):
            return {n: _np(p.grad) for n, p in tw.named_parameters() if p.grad is not None}

        lrs = []
        for i in range(self.steps):
            epoch = i // spe + 1
            b = batches[i % 2]
            if replay is not None:  # JAX's gradient at the float64 twin's parameters of this step
                p64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32),
                                             self.variables(twins[1])["params"])
                g_at64 = _flatten(jax.device_get(grad_at(p64, ms, self.device_batch(b), np.int32(i))))
            for tw, (opt, sched) in zip(twins, opts):
                dt = next(tw.parameters()).dtype
                from parity.check import cast_batch

                bb = cast_batch(b, "float64" if dt == torch.float64 else "float32")
                with self.mode(tw):
                    official_train_step(tw, opt, self.official(bb, tw), epoch, tcfg)
                if (i + 1) % spe == 0:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        sched.step()
            lrs.append(float(TASK.lr_at(tcfg, spe)(i)))
            params, state, ms, g = step(params, state, ms, self.device_batch(b), np.int32(i))
            if replay is not None:
                gt = [torch_grads(tw) for tw in twins]
                gflat = _flatten(jax.device_get(g))
                names = [e for e in entries if e.torch in gt[1]]
                replay.step({e.torch: to_torch(e.kind, np.asarray(gflat[e.flax])) for e in names}, lrs[-1], gt[1],
                            gt[0], {e.torch: to_torch(e.kind, np.asarray(g_at64[e.flax])) for e in names})
        zero = ZeroList(self.spec.zero_gradients(tcfg))
        bound = self.spec.adam_step_bound(tcfg, self.steps, lrs)
        named = dict(twins[0].named_parameters())
        named64 = None if self.f64 else dict(twins[1].named_parameters())
        params = jax.device_get(params)
        rows = [_compare_trained(f"params after {self.steps} AdamW steps (2 per epoch, milestone after epoch 2, "
                                 f"ONLY_IOU 1; lr {', '.join(f'{x:g}' for x in lrs)})", tab, params, named, named64,
                                 self.tol, zero, bound, replay)]
        # never-updated parameters (the twin's: grad None after its backward): bit-identical to the start in both
        # frameworks
        listed = [n for n, p in twins[0].named_parameters() if p.grad is None]
        flat = _flatten(params)
        fl = {e.torch: e for e in tab}
        bad = [k for k in listed if not (torch.equal(named[k].detach(), init[k]) and np.array_equal(
            to_torch(fl[k].kind, np.asarray(flat[fl[k].flax])), _np(init[k])))]
        rows.append(Row("train", f"never-updated parameters ({len(listed)}) bit-identical to their start", 0.0 if not
                        bad else float("inf"), 0.0, "bit-identical", not bad,
                        f"changed: {bad[:4]}" if bad else ", ".join(listed[:4])
                        + (" ..." if len(listed) > 4 else "")))
        rows += self.bn_rows("train", f"after {self.steps} steps", jax.device_get(ms["batch_stats"]), twins[0],
                             None if self.f64 else twins[1], bias_drift=bound)
        return rows

    def bn_rows(self, group, when, j_stats, twin, twin64=None, bias_drift=0.0) -> list[Row]:
        """BatchNorm running mean / var / count, elementwise at the ``model`` tolerance (float32: the bounded
        arbiter against ``twin64``'s). ``bias_drift``: the running means also carry the preceding conv biases,
        which are listed zero gradients that AdamW moves from rounding noise (at most the Adam bound apart), so
        the mean gets that much absolute slack (stated in the row)."""
        from parity.check import _arbitrable, _arbitrate

        t_bs = _flatten(twin_variables(self.cfg.model, twin)["batch_stats"])
        t64 = None if twin64 is None else _flatten(twin_variables(self.cfg.model, twin64)["batch_stats"])
        j_bs = _flatten(j_stats)
        rtol, atol = self.tol.model
        rows = []
        for kind in ("mean", "var", "num_batches_tracked"):
            ks = sorted(k for k in t_bs if k.endswith("/" + kind))
            j = np.concatenate([np.ravel(j_bs[k]) for k in ks])
            t = np.concatenate([np.ravel(t_bs[k]) for k in ks])
            a = atol + (bias_drift if kind == "mean" else 0.0)
            note = f"+ conv-bias drift {bias_drift:.1e} (listed zero gradients)" if kind == "mean" and bias_drift \
                else ""
            row = close_row(group, f"BatchNorm running {kind} {when} ({len(ks)} layers)", j, t, rtol, a, note)
            if t64 is not None and _arbitrable(row, j):
                row = _arbitrate(row, j, t, np.concatenate([np.ravel(t64[k]) for k in ks]), rtol, a)
            rows.append(row)
        return rows

    # -- dropout on
    def dropout_rows(self) -> list[Row]:
        import jax
        import torch

        from parity.check import _grad_rows, _loss_rows
        from torch_ref.dropout import Draw, SharedDropoutError, arm, collect_keys, key_seeds
        from torch_ref.mrnet import flax_counters

        c = self.cfg.model
        dkey = jax.random.fold_in(self.key, 7)
        valid, nq = self.valid()
        b_all, q_slots = self.batch["queries"].shape[:2]
        n = c.num_clips
        rows = []
        outs, grads, losses = {}, {}, {}
        t32, t64 = copy.deepcopy(self.twin32), copy.deepcopy(self.twin64)
        var = self.variables(t64 if self.f64 else t32)
        j_out, j_aux, new = self.flax_forward(var, self.batch, True, dropout_key=dkey, capture=True)
        keys = collect_keys(jax.device_get(new.get("dropout_keys", {})))

        def draws_for():
            draws = {}
            for path, ks in keys.items():
                if len(ks) != 1:
                    raise SharedDropoutError(f"{path}: {len(ks)} Flax calls (expected 1)")
                seeds = key_seeds(ks[0])
                parts = path.split("/")
                if parts[0].startswith("input_vid_proj_"):
                    width = c.featpool_hidden if parts[0].endswith("_0") else c.joint_space
                    name = f"input_vid_proj.{parts[0][-1]}.net.0"
                    draws[name] = [Draw(seeds, flax_counters((b_all, n, width), int(b)), path) for b in valid]
                elif parts[0] == "trans_ret" and parts[1].startswith("dropout_"):
                    _, which, i = parts[1].split("_")
                    name = f"trans_ret.dropout_{which}.{i}"
                    draws[name] = [Draw(seeds, flax_counters((b_all, q_slots + n, c.joint_space), int(b), [
                        *range(nq[b]), *range(q_slots, q_slots + n)]), path) for b in valid]
                elif parts[-1] == "dropout" and "self_attn" in parts:
                    i = parts[1].split("_")[1]
                    name = f"trans_ret.rets.{i}.self_attn.dropout"
                    if c.att_mode == "all":
                        draws[name] = [Draw(seeds, flax_counters((b_all, c.n_heads, q_slots + n, q_slots + n),
                                                                 int(b), range(c.n_heads),
                                                                 [*range(nq[b]), *range(q_slots, q_slots + n)],
                                                                 [*range(nq[b]), *range(q_slots, q_slots + n)]),
                                            path) for b in valid]
                    else:
                        draws[name] = [Draw(seeds, flax_counters((b_all, c.n_heads, n, n), int(b)), path)
                                       for b in valid]
                else:
                    raise SharedDropoutError(f"a Flax dropout at {path} with no torch counterpart in this mapping")
            return draws

        try:
            for tw in (t32, t64):
                f64 = next(tw.parameters()).dtype == torch.float64
                with arm(tw, draws_for()):
                    outs[f64] = self.twin_outputs(tw, self.cast_for(tw), True)
                with arm(tw, draws_for()):
                    losses[f64], grads[f64], _, tterms = self.grads(tw, self.cast_for(tw))
                    losses[f64] = (losses[f64], tterms)
        except SharedDropoutError as e:
            return [Row("dropout", "the same dropout calls in both frameworks", float("inf"), float("inf"),
                        "every Flax draw consumed by the twin, and only those", False, str(e))]
        t_out, t_aux, _ = outs[self.f64]
        rows += self.output_rows("dropout", j_out, j_aux, t_out, t_aux, self.batch, " [train, dropout on]",
                                 self.tol.model)
        jl, jg, jterms = self.jax_grads(var, self.batch, dropout_key=dkey, cfg=self.cfg, model=self.model)
        tl_, tterms = losses[self.f64]
        rows += _loss_rows("dropout", jl, {k: np.asarray(v) for k, v in jterms.items()}, tl_, tterms,
                           self.tol.loss, " [dropout on]")[:-1]
        rows += _grad_rows(self.spec, self.cfg, jl, jg, tl_, grads[self.f64], grads[False], grads[True], self.tol,
                           f"d loss / d param, dropout on ({len(jg)} tensors)", group="dropout",
                           loss_stage="training loss, dropout on")
        paths = ", ".join(sorted(keys))
        rows.append(Row("dropout", f"dropout calls mapped (padded Flax draw -> per-video torch calls): {len(keys)}",
                        0.0, 0.0, "all consumed", True, paths[:200]))
        return rows

    # -- metrics
    def metric_rows(self) -> list[Row]:
        rows = self.one_map_rows()
        rows += self.evaluation_rows()
        return rows

    def one_map_rows(self) -> list[Row]:
        """The twin's eval score maps of the batch through JAX's decoder + metrics and the official evaluate."""
        import torch

        from jaxprvr.metrics.vmr import predict_moments, vmr_metrics
        from jaxprvr.models.mrnet import proposal_mask
        from torch_ref.vmr_eval import official_evaluate

        d = self.cfg.data
        t_out, _, _ = self.twin_outputs(self.twin, self.batch, False)
        valid, nq = self.valid()
        mask = proposal_mask(self.cfg.model)
        preds, gts, records, maps = [], [], [], []
        for b in valid:
            dur = float(np.float32(self.batch["duration"][b]))
            c = np.asarray(t_out["contrastive_scores"][b, :nq[b]], np.float32)
            u = np.asarray(t_out["iou_scores"][b, :nq[b]], np.float32)
            gt = np.asarray(self.batch["moments"][b, :nq[b]], np.float32)
            for q in range(nq[b]):
                preds.append(predict_moments(c[q], u[q], mask, dur, d.contrastive_score_pow, d.nms_thresh, d.topk))
            gts.append(gt)
            records.append({"duration": dur, "moments": gt})
            maps.append({"contrastive": torch.from_numpy(c), "iou": torch.from_numpy(u)})
        j = vmr_metrics(_pad_preds(preds, d.topk), np.concatenate(gts), d.iou_thresholds)["official"]
        t = official_evaluate(records, maps, d.nms_thresh, d.iou_thresholds, d.contrastive_score_pow)
        stage = "NMS + R@k/mIoU from one set of score maps (jax metrics.vmr vs official evaluate)"
        if all(j.get(k) == v for k, v in t.items()):
            return [_dict_row(stage, j, t)]
        per_j = [(m["contrastive"].numpy(), m["iou"].numpy()) for m in maps]
        return [self.tie_row(stage, j, t, records, per_j, per_j, mask)]

    def tie_row(self, stage, j_off, t_off, records, j_maps, t_maps, mask) -> Row:
        """The two metric dicts differ: per query, the official evaluate of that query alone on the twin's
        maps and JAX's decoder + metrics on JAX's maps must agree, except for queries whose scores (in either
        map) hold two candidates within :data:`TIE` of each other (the official unstable sort and an unequal
        rounding may order them either way; counted). Passes when every differing query is so explained."""
        import torch

        from jaxprvr.metrics.vmr import predict_moments, vmr_metrics
        from torch_ref.vmr_eval import official_evaluate

        d = self.cfg.data
        changed = tied = unexplained = 0
        for rec, (jc, ju), (tc, tu) in zip(records, j_maps, t_maps):
            for q in range(len(rec["moments"])):
                gt = np.asarray(rec["moments"][q:q + 1], np.float32)
                p = predict_moments(np.asarray(jc[q], np.float32), np.asarray(ju[q], np.float32), mask,
                                    rec["duration"], d.contrastive_score_pow, d.nms_thresh, d.topk)
                a = vmr_metrics(_pad_preds([p], d.topk), gt, d.iou_thresholds)["official"]
                b = official_evaluate([{"duration": rec["duration"], "moments": gt}],
                                      [{"contrastive": torch.as_tensor(np.asarray(tc[q:q + 1], np.float32)),
                                        "iou": torch.as_tensor(np.asarray(tu[q:q + 1], np.float32))}],
                                      d.nms_thresh, d.iou_thresholds, d.contrastive_score_pow)
                if any(a.get(k) != v for k, v in b.items()):
                    changed += 1
                    pt = predict_moments(np.asarray(tc[q], np.float32), np.asarray(tu[q], np.float32), mask,
                                         rec["duration"], d.contrastive_score_pow, d.nms_thresh, d.topk)
                    floor = float(min(p[:, 2].min(), pt[:, 2].min()))  # the ties that can reorder the kept list
                    t_ = _near_tie(jc[q], ju[q], mask, d.contrastive_score_pow, floor) or _near_tie(
                        tc[q], tu[q], mask, d.contrastive_score_pow, floor)
                    tied += t_
                    unexplained += not t_
        worst = max(abs(float(j_off.get(k, np.nan)) - float(v)) for k, v in t_off.items())
        return Row("metrics", stage, worst, worst, f"identical up to ties within {TIE:g}", unexplained == 0,
                   f"{changed} queries score differently, {tied} of them hang on a near-tie (counted), "
                   f"{unexplained} not explained")

    def evaluation_rows(self) -> list[Row]:
        """A full synthetic evaluation: tasks.vmr Evaluator (JAX) vs official_inference + official_evaluate."""
        import tempfile

        import jax
        import torch

        from jaxprvr.data.mmn_format import MMNDataset, eval_batches
        from jaxprvr.data.synthetic_vmr import write_synthetic_vmr
        from jaxprvr.models.mrnet import proposal_mask
        from jaxprvr.tasks.vmr import Evaluator
        from torch_ref.mrnet import official_batch
        from torch_ref.vmr_eval import official_evaluate, official_inference

        cfg, c, d = self.cfg, self.cfg.model, self.cfg.data
        with tempfile.TemporaryDirectory() as tmp:
            root = self.data_root
            if root is None:
                root = write_synthetic_vmr(tmp, d.dataset, n_train=2, n_val=0 if "val" not in d.splits else 2,
                                           n_test=24, seed=self.seed, video_dim=c.input_size, query_dim=c.text_dim,
                                           num_pre_clips=c.num_pre_clips)
            ds = MMNDataset(root, cfg, "test")
            var = self.variables(self.twin)
            ev = Evaluator(self.model, cfg)
            j_res = ev.evaluate(jax.tree_util.tree_map(np.asarray, var["params"]), ds, keep_outputs=True,
                                model_state={"batch_stats": var["batch_stats"]})
            batches, records = [], {}
            dt = next(self.twin.parameters()).dtype
            for b in eval_batches(ds, cfg):
                ob = official_batch(b)
                if dt == torch.float64:
                    ob["feats"] = ob["feats"].double()
                    ob["queries"] = [q.double() for q in ob["queries"]]
                batches.append(ob)
                for r, i in enumerate(ob["idxs"]):
                    records[i] = {"duration": float(np.float32(b["duration"][np.flatnonzero(
                        np.asarray(b["video_valid"]) > 0)[r]])), "moments": _np(ob["moments"][r]),
                        "vid": ob["vid"][r]}
            with self.mode(self.twin):
                t_maps = official_inference(self.twin, batches)
            order = sorted(records)
            t_maps32 = [{k: v.float() for k, v in m.items()} for m in t_maps]
            t_res = official_evaluate([records[i] for i in order], t_maps32, d.nms_thresh, d.iou_thresholds,
                                      d.contrastive_score_pow)
        # score maps (JAX Evaluator's) vs the twin's
        jm = j_res["_score_maps"]
        jc = np.concatenate([np.ravel(jm[f"{records[i]['vid']}/{w}"]) for i in order for w in ("contrastive", "iou")])
        tc = np.concatenate([np.ravel(_np(m[w])) for m in t_maps for w in ("contrastive", "iou")])
        # the Evaluator keeps float32 maps (predictions.json / score_maps.npz): in float64 mode both sides are
        # compared after one rounding to float32 (1 ulp)
        tol = (EPS32, 1e-12) if self.f64 else self.tol.model
        rows = [close_row("metrics", f"score maps of a full synthetic evaluation ({len(order)} videos, "
                                     f"{int(j_res['n_queries'])} queries)", jc, tc.astype(np.float32), *tol)]
        j_off = j_res["official"]
        same = all(j_off[k] == t_res[k] for k in t_res) and set(j_off) >= set(t_res)
        if same:
            rows.append(_dict_row("R@k,IoU / mIoU of a full synthetic evaluation (jax Evaluator vs official "
                                  "inference + evaluate)", j_off, t_res))
            return rows
        j_maps = [(jm[f"{records[i]['vid']}/contrastive"], jm[f"{records[i]['vid']}/iou"]) for i in order]
        t_list = [(_np(m["contrastive"]), _np(m["iou"])) for m in t_maps32]
        rows.append(self.tie_row("R@k,IoU / mIoU of a full synthetic evaluation (jax Evaluator vs official "
                                 "inference + evaluate)", j_off, t_res, [records[i] for i in order], j_maps, t_list,
                                 proposal_mask(c)))
        return rows


def _with(ctx, fn):
    with ctx:
        return fn()


def torch_t(v):
    import torch

    return v if torch.is_tensor(v) else torch.as_tensor(v)


def _pad_preds(preds, topk):
    out = np.full((len(preds), topk, 3), np.nan, np.float32)
    for i, p in enumerate(preds):
        out[i, :len(p)] = p
    return out


def _near_tie(c, u, mask, pw, floor=-np.inf) -> bool:
    """Whether two candidate scores at or above ``floor`` (the lowest score either framework kept) lie within
    :data:`TIE` of each other."""
    s = np.power(np.float32(0.5) * np.asarray(c, np.float32) + np.float32(0.5), np.float32(pw)) * np.asarray(u,
                                                                                                       np.float32)
    v = np.sort(s[mask])[::-1]
    v = v[v >= floor - TIE]
    return bool(np.any(np.diff(v) >= -TIE))


def _dict_row(stage, j: dict, t: dict) -> Row:
    missing = [k for k in t if k not in j]
    if missing:
        return Row("metrics", stage, float("inf"), float("inf"), "identical", False, f"keys missing in jax: {missing}")
    bad = nonfinite("metrics", jax=np.asarray([j[k] for k in t], np.float64), torch=np.asarray(list(t.values()),
                                                                                                np.float64))
    d = max(abs(float(j[k]) - float(t[k])) for k in t)
    note = ", ".join(f"{k} {float(t[k]):.4f}" for k in list(t)[:4])
    return Row("metrics", stage, d, d, "identical", d == 0.0 and not bad, join_notes(bad, note))


def perturb_twin(twin, seed: int = 0, std: float = 0.1):
    """:func:`parity.check.perturb_twin` plus the BatchNorm buffers: running means ``+ N(0, std^2)``, running
    variances ``x exp(N(0, std^2))``, ``num_batches_tracked`` 7, so eval-mode BatchNorm is exercised."""
    import torch

    from parity.check import perturb_twin as perturb_params

    out = perturb_params(twin, seed, std)
    g = torch.Generator().manual_seed(2000 + seed)
    with torch.no_grad():
        for name, b in out.named_buffers():
            if name.endswith("running_mean"):
                b.add_(std * torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
            elif name.endswith("running_var"):
                b.mul_(torch.exp(std * torch.randn(b.shape, generator=g, dtype=torch.float64)).to(b.dtype))
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)
    return out


__all__ = ["SPEC", "Spec", "key_rows", "make_table", "torch_to_variables", "variables_to_torch", "adamw_to_optax",
           "optax_to_adamw", "perturb_twin", "EPS32"]
