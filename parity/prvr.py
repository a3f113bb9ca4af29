"""The PRVR task's parity pieces: what :mod:`parity.check` and :mod:`parity.convert` ask of a PRVR family.

:class:`PRVRSpec` holds everything the four PRVR families share (random batches, the query/clip/frame input
blocks, negatives drawn once and injected into both frameworks, the losses, the BertAdam recipe in both
frameworks, the gallery evaluation, the official files); each ``parity/<family>.py`` subclasses it with its key
table, its own blocks and what differs (MTM's torch sampler, Mamba scans and EMA; MS-SL's ``model.ckpt``).
The drivers reach a family's spec through its registry row (``Family.parity``: the module's ``SPEC``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np

from jaxprvr.errors import JaxprvrError
from parity.base import FamilySpec, Plain  # noqa: F401 - Plain: re-exported for the family specs
from parity.rows import Row, as_numpy, close_row, nonfinite

METRIC_KEYS = ("r1", "r5", "r10", "r100", "sumr")
TIE = 1e-6  # two scores of one query this close may rank either way in the two frameworks

KEY_BIAS = ("attention key bias: it adds q_i . b to every logit of query i, and the softmax over the keys is "
            "shift-invariant (plain attention only: a Gaussian branch multiplies logit j by g_ij, so its key bias "
            "has a real gradient)")
POOL_BIAS = "attention-pooling logit bias: one constant added to every position's logit, softmax shift-invariance"
BRANCH_BIAS = ("DyGMM branch-weight bias: added to the K branches' logits of a position alike, before the softmax "
               "over the branches")
BRANCH_OUTPUT_BIAS = ("DyGMM ca.norm2 bias: added to every branch's cross-attention output alike; zero where layer1's "
                      "ReLU pattern is the same on every branch (at the official init), real elsewhere (partially "
                      "zero)")
BRANCH_HIDDEN_BIAS = ("DyGMM layer1 bias: the units whose ReLU is on for every branch of a sample shift the K branch "
                      "logits alike (zero gradient); the other units' gradients are real (partially zero)")


@dataclasses.dataclass(frozen=True)
class ZeroGrad:
    """A parameter (torch name, ``re.fullmatch``) whose gradient is zero in exact arithmetic, and why. ``partial``:
    only some of its entries are (their float64 gradient is then not checked to be noise)."""

    pattern: str
    reason: str
    partial: bool = False


class PRVRSpec(FamilySpec):
    """Parity spec of a PRVR family. Subclasses set :attr:`name`, :attr:`table` and override the hooks."""

    name = ""
    table: tuple = ()
    official_layout = "best.ckpt"  # the official file: "best.ckpt" (GMMFormer family) or "model.ckpt" (MS-SL)
    has_ema = False  # whether the official file may carry MTM's 'ema_shadow'
    jax_train = True  # the Flax train flag of the grad/train stages (train mode, dropout off)
    matching = False  # v2 / MTM: the optimal matching loss's Hungarian assignment is injected from torch

    # -- key table
    def table_for(self, model_cfg):
        """The key-table argument of :mod:`parity.convert` for a model config (default: the family name)."""
        return self.name

    def describe(self, cfg) -> str:
        m = cfg.model
        return f"hidden {m.hidden_size}, heads {m.n_heads}, visual {m.visual_feat_dim}, query {m.q_feat_size}"

    # -- inputs
    def make_batch(self, model_cfg, n_videos: int = 4, seed: int = 0, counts=None) -> dict:
        """A fully valid random batch at the config's dims: 1-3 queries per video (one video with 1, so the
        single-query branches of the losses run), frame counts from 1 to ``max_ctx_l``. ``counts``: the queries
        per video instead (the training stage's second batch takes the first's, so both have the same shapes)."""
        rng = np.random.default_rng(seed)
        c = model_cfg
        drawn = [1] + [int(rng.integers(2, 4)) for _ in range(n_videos - 1)]
        counts = drawn if counts is None else [int(n) for n in counts]
        lens = [1, c.max_ctx_l] + [int(rng.integers(2, c.max_ctx_l)) for _ in range(n_videos - 2)]
        b, q = n_videos, sum(counts)
        frames = np.zeros((b, c.max_ctx_l, c.visual_feat_dim), np.float32)
        fmask = np.zeros((b, c.max_ctx_l), np.float32)
        for i, n in enumerate(lens):
            frames[i, :n] = rng.standard_normal((n, c.visual_feat_dim))
            fmask[i, :n] = 1
        qf = np.zeros((q, c.max_desc_l, c.q_feat_size), np.float32)
        qm = np.zeros((q, c.max_desc_l), np.float32)
        for i, n in enumerate(rng.integers(1, c.max_desc_l + 1, q)):
            qf[i, :n] = rng.standard_normal((n, c.q_feat_size))
            qm[i, :n] = 1
        labels = np.repeat(np.arange(b), counts).astype(np.int32)
        return dict(clip_feats=rng.standard_normal((b, c.map_size, c.visual_feat_dim)).astype(np.float32),
                    frame_feats=frames, frame_mask=fmask, frame_len=np.asarray(lens, np.int32),
                    video_valid=np.ones(b, np.float32), query_feats=qf, query_mask=qm,
                    query_valid=np.ones(q, np.float32), query_labels=labels)

    def second_batch(self, model_cfg, batch, n_videos: int, seed: int) -> dict:
        """The training stage's second batch: another draw with the first one's shapes."""
        counts = np.bincount(np.asarray(batch["query_labels"]), minlength=n_videos)
        return self.make_batch(model_cfg, n_videos, seed + 1, counts=counts)

    def no_dropout(self, cfg):
        """``cfg`` with every configurable dropout rate at 0."""
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, input_drop=0.0, drop=0.0))

    def dropout_off(self, twin):
        """Sets the dropouts the config does not control to 0 (none here; MTM's TCN)."""
        return twin

    def scans(self, record: bool = False):
        """A context in which the twin's sequence scans run in the input's precision (MTM's Mamba)."""
        return contextlib.nullcontext()

    # -- blocks
    def block_specs(self, cfg, twin, taux, batch) -> list:
        """``(stage, flax fn(module, *inputs) | (module, params path, args) | Plain, torch fn(*inputs), inputs)``:
        the shared input blocks, then :meth:`family_blocks`."""
        import torch

        from jaxprvr.models import layers as fl
        from torch_ref import layers as tl

        dev = next(twin.parameters()).device
        T = lambda k: torch.from_numpy(np.asarray(batch[k])).to(dev)  # noqa: E731
        qmask = T("query_mask")
        specs = [
            ("query input_proj + pos_embed (LinearLayer, positional encoding)",
             lambda m, x: m.query_pos_embed(m.query_input_proj(x)),
             lambda x: twin.query_pos_embed(twin.query_input_proj(x)), (T("query_feats"),)),
            (f"query_encoder (self-attention {self.attention_kind}, masked)", lambda m, x, k: m.query_encoder(x, k),
             lambda x, k: twin.query_encoder(x, k), (taux["query_embed"], qmask)),
            ("query pooling (masked attention pooling)",
             lambda m, x, k: fl.attention_pool(m.modular_vector_mapping(x), k, x),
             lambda x, k: tl.attention_pool(twin.modular_vector_mapping, x, k), (taux["query_tokens"], qmask)),
            ("clip input_proj + pos_embed", lambda m, x: m.clip_pos_embed(m.clip_input_proj(x)),
             lambda x: twin.clip_pos_embed(twin.clip_input_proj(x)), (T("clip_feats"),)),
            ("frame input_proj + pos_embed", lambda m, x: m.frame_pos_embed(m.frame_input_proj(x)),
             lambda x: twin.frame_pos_embed(twin.frame_input_proj(x)), (T("frame_feats"),)),
        ]
        return specs + self.family_blocks(cfg, twin, taux, T)

    attention_kind = "v1"

    def family_blocks(self, cfg, twin, taux, T) -> list:
        return []

    # -- losses
    def negatives(self, cfg, scores, batch, key, twin_out=None) -> dict:
        """Negatives drawn once (JAX sampler, from the torch scores) and injected into both frameworks; v2 and MTM
        also get the torch Hungarian assignment (:meth:`assignment`) so both optimise the same matching."""
        import jax

        from jaxprvr.losses.prvr import sample_negatives

        negs = jax.device_get(sample_negatives(self.name, {k: as_numpy(v) for k, v in scores.items()}, batch, key,
                                               hard=False, hard_pool_size=cfg.loss.hard_pool_size))
        return self.assignment({k: np.asarray(v) for k, v in negs.items()}, batch, twin_out)

    def assignment(self, negs: dict, batch, twin_out) -> dict:
        if self.matching and twin_out is not None:
            from torch_ref.losses import optimal_matching_assignment

            _, taux = twin_out
            negs["ot_assignment"] = as_numpy(optimal_matching_assignment(taux["clip_feats"], taux["query2"],
                                                                         batch["query_labels"])).astype(np.int32)
        return negs

    def loss_negatives_need_twin(self) -> bool:
        """Whether the loss stage's negatives need the twin's outputs (the injected matching)."""
        return False

    def jax_loss(self, cfg, scores, aux, batch, negatives):
        from jaxprvr.losses.prvr import total_loss

        return total_loss(self.name, scores, aux, batch, cfg.loss, None, hard=False, negatives=negatives)

    def torch_loss(self, cfg, scores, aux, batch, negatives):
        import torch

        from torch_ref.losses import total_loss

        return total_loss(self.name, scores, aux, batch, cfg.loss,
                          {k: torch.from_numpy(np.array(v)) for k, v in negatives.items()})

    # -- analytically zero gradients (parity.check: grad and train)
    def zero_gradients(self, cfg) -> tuple:
        """The :class:`ZeroGrad` s of the family: gradients that are float noise in both frameworks. Every PRVR model
        has the query encoder's plain self-attention."""
        return (ZeroGrad(r"query_encoder\.self\.key\.bias", KEY_BIAS),)

    def adam_step_bound(self, cfg, t_total: int, steps: int) -> float:
        """The most two BertAdam runs from the same weights can move one entry apart in ``steps`` steps, whatever
        their gradients: per step ``lr_t |m / (sqrt(v) + eps)| <= lr_t (1 - b1) / sqrt(1 - b2) sqrt(sum_{k<=i}
        (b1^2 / b2)^k)`` (Cauchy-Schwarz on the two moving averages; per-tensor clipping rescales a gradient and
        changes nothing here), summed over the steps, twice. For tensors without weight decay (the listed biases)."""
        from jaxprvr.optim import warmup_linear

        b1, b2, tc = 0.9, 0.999, cfg.train
        total = 0.0
        for i in range(steps):
            ratio = (1 - b1) / np.sqrt(1 - b2) * np.sqrt(sum((b1 * b1 / b2) ** k for k in range(i + 1)))
            total += tc.lr * warmup_linear(i, tc.lr_warmup_proportion, t_total) * ratio
        return 2.0 * float(total)

    # -- optimisation (the official recipe in both frameworks)
    def jax_optimizer(self, cfg, params, t_total: int):
        from jaxprvr.optim import bert_adam, official_weight_decay_mask, with_ema

        tc = cfg.train
        tx = bert_adam(lr=tc.lr, warmup=tc.lr_warmup_proportion, t_total=t_total, weight_decay=tc.wd,
                       weight_decay_mask=official_weight_decay_mask(params), max_grad_norm=tc.max_grad_norm)
        return with_ema(tx, tc.ema_decay) if tc.use_ema else tx

    def torch_optimizer(self, cfg, twin, t_total: int):
        from torch_ref.optim import BertAdam, official_param_groups

        tc = cfg.train
        return BertAdam(official_param_groups(twin, 0.01), lr=tc.lr, warmup=tc.lr_warmup_proportion,
                        t_total=t_total, max_grad_norm=tc.max_grad_norm)

    # -- evaluation
    def compare_metrics(self, cfg, params, twin, data_root=None, seed: int = 0, split="test", tol=None,
                        twin_context=None) -> list[Row]:
        """A full evaluation in each framework: the fused score matrices (at ``tol.model``), the metrics of one
        score matrix through both metric codes (identical), and the metrics of each framework's own evaluation:
        identical, except where two scores of one query lie within :data:`TIE` of each other (:func:`tie_row`).
        Without ``data_root``: a synthetic 100-video gallery at the config's dims. ``twin_context()``: the context
        the twin runs in (the float64 twin's default dtype and scans)."""
        from parity.rows import TOLERANCES

        tol = tol or TOLERANCES["float32"]
        if data_root is None:
            import tempfile

            from jaxprvr.data.synthetic import write_synthetic

            with tempfile.TemporaryDirectory() as tmp:
                write_synthetic(tmp, cfg.data.dataset, n_train=4, n_val=4, n_test=100, seed=seed,
                                visual_dim=cfg.model.visual_feat_dim, query_dim=cfg.model.q_feat_size, progress=False)
                return self.compare_metrics(cfg, params, twin, tmp, seed, split, tol, twin_context)
        import torch

        from jaxprvr.data import PRVRDataset
        from jaxprvr.metrics.prvr import eval_q2m
        from jaxprvr.models import build_model
        from jaxprvr.tasks.prvr import Evaluator
        from torch_ref.evaluate import TorchEvaluator, eval_q2m as torch_eval_q2m

        ds = PRVRDataset(data_root, cfg, split)
        with (twin_context() if twin_context is not None else contextlib.nullcontext()):
            t_res = TorchEvaluator(twin.eval(), cfg).evaluate(ds, keep_scores=True)
        j_res = Evaluator(build_model(cfg.model), cfg).evaluate(params, ds, keep_scores=True)
        gt = np.asarray(ds.query_video_index)
        with (twin_context() if twin_context is not None else contextlib.nullcontext()):
            choice = self.choice_ties(cfg, twin, ds)
        rows = [score_matrix_row(f"fused score matrix ({len(gt)} x {len(ds.video_ids)})", j_res["_scores"],
                                 t_res["_scores"], tol.model, choice)]
        if not rows[0].passed and rows[0].tolerance == "same shape":
            return rows
        t_scores = np.asarray(t_res["_scores"])
        if not np.all(np.isfinite(t_scores)):
            return rows + [Row("metrics", "R@1/5/10/100, SumR", float("inf"), float("inf"), "finite scores", False,
                               nonfinite("torch fused scores", torch=t_scores))]
        same_j, same_t = eval_q2m(t_scores, gt), torch_eval_q2m(torch.from_numpy(t_scores), gt)
        d_same = max(abs(same_j[k] - same_t[k]) for k in METRIC_KEYS)
        rows.append(Row("metrics", "R@1/5/10/100, SumR from one score matrix", d_same, d_same, "identical",
                        d_same == 0.0))
        rows.append(tie_row(f"R@1/5/10/100, SumR of a full evaluation ({split})", j_res, t_res, gt, choice))
        return rows

    def choice_ties(self, cfg, twin, ds):
        """``(Nq, Nv)`` bool: the gallery scores that hang on a discrete choice made at a near-tie (two candidate
        scores of the query within :data:`TIE`), which the two frameworks may make differently; None: no such choice
        (MS-SL: its key clip)."""
        return None

    # -- official files
    def read_official(self, path):
        """An official checkpoint file: :class:`torch_ref.checkpoints.OfficialCheckpoint`."""
        from torch_ref.checkpoints import load_official

        return load_official(path)

    def read_variables(self, path, cfg, overrides=()):
        """``jaxprvr.load``: ``model.ckpt`` / ``best.ckpt`` -> ``(cfg, params, {}, EMA weights or None)``, the
        parameters through the key table (:func:`parity.convert.read_official_params`, as ``parity.convert
        torch2jax``); the EMA weights are MTM's ``ema_shadow`` when the file has one and ``train.use_ema`` is on."""
        from parity.convert import read_official_params, shadow_to_jax

        ck, tab, params = read_official_params(self, path, cfg.model, hint="pass model={!r}")
        shadow = getattr(ck, "ema_shadow", None)
        if not cfg.train.use_ema or shadow is None:
            return cfg, params, {}, None
        return cfg, params, {}, shadow_to_jax(tab, shadow, params, where=f"{path} (ema_shadow)")

    def official_best(self, ck) -> tuple[str, float | None]:
        """The selection metric's name and the value the official file records for it (``model_val[4]``, SumR)."""
        try:
            vals = [float(x) for x in ck.model_val]
            return "sumr", (vals[4] if len(vals) >= 5 else None)
        except TypeError:
            return "sumr", None

    def official_config(self, cfg) -> dict:
        """The ``cfg`` dict GMMFormer/v2/MTM save in ``best.ckpt`` (``src/Configs/<ds>.py`` keys)."""
        m, d, lo, t = cfg.model, cfg.data, cfg.loss, cfg.train
        return dict(model_name=m.name, dataset_name=d.dataset, seed=t.seed, visual_feature=d.visual_feature,
                    collection=d.collection, map_size=m.map_size, clip_scale_w=m.clip_scale_w,
                    frame_scale_w=m.frame_scale_w, batchsize=t.batch_size, lr=t.lr,
                    lr_warmup_proportion=t.lr_warmup_proportion, wd=t.wd, margin=lo.margin, n_epoch=t.n_epoch,
                    max_es_cnt=t.max_es_cnt, hard_negative_start_epoch=lo.hard_negative_start_epoch,
                    hard_pool_size=lo.hard_pool_size, use_hard_negative=False,
                    loss_factor=self.loss_factor(lo), neg_factor=self.neg_factor(lo),
                    eval_query_bsz=d.eval_query_bsz, eval_context_bsz=d.eval_context_bsz,
                    max_desc_l=m.max_desc_l, max_ctx_l=m.max_ctx_l, sub_feat_size=768, q_feat_size=m.q_feat_size,
                    visual_feat_dim=m.visual_feat_dim, max_position_embeddings=300, hidden_size=m.hidden_size,
                    n_heads=m.n_heads, input_drop=m.input_drop, drop=m.drop, initializer_range=0.02)

    def loss_factor(self, lo) -> list[float]:
        """The official positional ``loss_factor`` of the named loss fields."""
        return [lo.w_clip_nce, lo.w_frame_nce, lo.w_qdl]

    def neg_factor(self, lo) -> list[float]:
        return [lo.qdl_margin, lo.qdl_alpha]

    def write_official(self, path, cfg, params, *, opt_state=None, epoch: int = 0, model_val=None,
                       steps_per_epoch: int | None = None, ema_shadow=None) -> Path:
        """Writes ``params`` (and the BertAdam moments) as the official ``best.ckpt`` of the family.
        ``opt_state``: a :class:`jaxprvr.optim.BertAdamState`, or an :class:`jaxprvr.optim.EmaState` whose
        ``shadow`` becomes MTM's ``ema_shadow`` (unless ``ema_shadow``, a Flax params tree, is given)."""
        from jaxprvr.optim import EmaState
        from parity.convert import flax_to_torch, optimizer_to_torch, shadow_to_torch, table
        from torch_ref.checkpoints import bert_adam_state, save_official

        tab = self.table_for(cfg.model)
        if isinstance(opt_state, EmaState):
            ema_shadow = opt_state.shadow if ema_shadow is None else ema_shadow
            opt_state = opt_state.inner
        if ema_shadow is not None and not self.has_ema:
            raise JaxprvrError("ema_shadow", "an MTM checkpoint (the official EMA is MTM's)", f"a {self.name} one")
        sd = flax_to_torch(tab, params)
        t_total = -1 if steps_per_epoch is None else steps_per_epoch * cfg.train.n_epoch
        kw = dict(lr=cfg.train.lr, warmup=cfg.train.lr_warmup_proportion, t_total=t_total)
        if opt_state is not None:
            optimizer = optimizer_to_torch(tab, opt_state, **kw)
        else:
            optimizer = bert_adam_state([e.torch for e in table(tab) if not e.alias], **kw)
        extra = {} if ema_shadow is None else {"ema_shadow": shadow_to_torch(tab, ema_shadow)}
        return _atomic(path, lambda tmp: save_official(
            tmp, self.name, sd, epoch=epoch, config=self.official_config(cfg),
            model_val=list(model_val) if model_val is not None else [0.0] * 5, optimizer=optimizer, **extra))


def score_matrix_row(stage, j_scores, t_scores, rtol_atol, choice=None) -> Row:
    """The fused score matrices elementwise; the entries of ``choice`` (:meth:`PRVRSpec.choice_ties`) are left out
    and counted in the note."""
    if choice is None or not np.any(choice) or np.shape(j_scores) != np.shape(t_scores):
        return close_row("metrics", stage, j_scores, t_scores, *rtol_atol)
    a, t = np.array(j_scores, np.float64), np.array(t_scores, np.float64)
    d_tied = float(np.abs(a - t)[choice].max())
    a[choice] = t[choice]
    return close_row("metrics", stage, a, t, *rtol_atol,
                     note=f"{int(choice.sum())} entries follow a choice at a near-tie (left out; max |d| there "
                          f"{d_tied:.1e})")


def tie_row(stage: str, j_res: dict, t_res: dict, gt, choice=None) -> Row:
    """Each framework's metrics from its own scores (``j_res`` / ``t_res``: metrics and ``"_scores"``) must be
    identical, except for queries whose ground-truth rank the two score matrices order differently because of a
    near-tie: a video whose score lies within :data:`TIE` of the ground truth's (in either matrix) may rank on
    either side of it. Every query whose rank differs must be explained so, and each metric may change only by
    what those queries' rank changes make (counted and printed in the note)."""
    from jaxprvr.metrics.prvr import KS, gt_ranks

    sj, st = np.asarray(j_res["_scores"], np.float64), np.asarray(t_res["_scores"], np.float64)
    bad = nonfinite("fused scores", jax=sj, torch=st)
    if bad or sj.shape != st.shape:
        return Row("metrics", stage, float("inf"), float("inf"), "finite, same shape", False,
                   bad or f"shapes {sj.shape} vs {st.shape}")
    gt = np.asarray(gt).astype(np.int64)
    q = np.arange(len(gt))
    near = (np.abs(sj - sj[q, gt][:, None]) <= TIE) | (np.abs(st - st[q, gt][:, None]) <= TIE)
    near[q, gt] = False
    if choice is not None:  # a score that hangs on a near-tied choice may land anywhere, its ground truth's too
        near |= choice | choice[q, gt][:, None]
    n_near = near.sum(axis=1)
    rj, rt = gt_ranks(sj, gt), gt_ranks(st, gt)
    moved = rj != rt
    flips = (sj > sj[q, gt][:, None]) != (st > st[q, gt][:, None])
    unexplained = moved & ((flips & ~near).any(axis=1) | (np.abs(rj - rt) > n_near))
    d = {k: abs(float(j_res[k]) - float(t_res[k])) for k in METRIC_KEYS}
    # the most each recall can change: the explained queries whose rank crosses K
    allow = {f"r{k}": 100.0 * float(np.sum(moved & ~unexplained & (np.minimum(rj, rt) <= k)
                                         & (np.maximum(rj, rt) > k))) / len(gt) for k in KS}
    allow["sumr"] = sum(allow[f"r{k}"] for k in KS)
    over = [k for k in METRIC_KEYS if d[k] > allow[k] + 1e-9]
    worst = max(d.values())
    note = (f"jax SumR {j_res['sumr']:.2f}, torch SumR {t_res['sumr']:.2f}; score ties within {TIE:g} of the "
            f"ground truth: {int(n_near.sum())} in {int((n_near > 0).sum())} queries; ground-truth rank differs "
            f"for {int(moved.sum())} queries ({int(unexplained.sum())} not explained by ties)")
    if over:
        note += "; metric changes the ties do not explain: " + ", ".join(f"{k} {d[k]:.2f} > {allow[k]:.2f}"
                                                                           for k in over)
    return Row("metrics", stage, worst, worst / 100.0, f"identical up to ties within {TIE:g}",
               not over and not unexplained.any(), note)


def _atomic(path, write) -> Path:
    """``write(tmp)`` then renames ``tmp`` to ``path``: never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
    return path


class GMMSpecMixin:
    """v2 and MTM: the Hungarian matching is injected, the official config records the v2 factors."""

    matching = True
    attention_kind = "v2 (FFN, norm1/norm2)"

    def loss_factor(self, lo) -> list[float]:
        return [lo.w_clip_nce, lo.w_frame_nce, lo.w_qdl, lo.w_ot]

    def neg_factor(self, lo) -> list[float]:
        return [lo.qdl_margin, lo.qdl_alpha, lo.qdl_lambda]

    def official_config(self, cfg) -> dict:
        return dict(super().official_config(cfg), sft_factor=cfg.model.sft_factor)
