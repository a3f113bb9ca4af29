"""The task-specific calls of :func:`jaxprvr.load` (docs/api.md): what a notebook asks of each task.

* :class:`PRVRModel` (MS-SL, GMMFormer, GMMFormer v2, MTM): ``encode_queries``, ``encode_videos``, ``scores``;
* :class:`MRNetModel` and :class:`MESMModel` (moment retrieval): ``predict`` (one video) and ``predict_many``;
* :class:`T2VModel` (CLIP + seqTransf + WTI): ``encode_text``, ``encode_video``, ``similarity``.

Inputs are what the files on disk hold (raw features, text, video files) and go through the same preparation as
the task's evaluation (the sampling and normalisation of :mod:`jaxprvr.data`); outputs are numpy arrays. The batch
axis of every call is padded up to :func:`jaxprvr.api.bucket` (with rows the model ignores, as the evaluators pad
theirs), so one program is compiled per bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxprvr.api import BUCKET_MIN, Loaded, bucket, pad_rows
from jaxprvr.errors import JaxprvrError

F32 = np.float32
MAX_ROWS = 256  # the most items one call of an encoder takes (more are done in chunks of this many)


def _as_list(x, what: str, ndim: int) -> list:
    """A sequence of arrays (or one array of ``ndim + 1`` dims: a batch) as a list of arrays of ``ndim`` dims."""
    if isinstance(x, np.ndarray) or hasattr(x, "__array__") and not isinstance(x, (list, tuple)):
        x = np.asarray(x)
        if x.ndim == ndim:
            return [x]
        if x.ndim == ndim + 1:
            return list(x)
        raise JaxprvrError(what, f"arrays of {ndim} dims or one array of {ndim + 1}", f"shape {x.shape}")
    items = [np.asarray(a) for a in x]
    if not items:
        raise JaxprvrError(what, "at least one item", "none")
    for i, a in enumerate(items):
        if a.ndim != ndim:
            raise JaxprvrError(f"{what}[{i}]", f"an array of {ndim} dims", f"shape {a.shape}")
    return items


def _check_width(items, width: int, what: str, field: str) -> None:
    for i, a in enumerate(items):
        if a.shape[-1] != width:
            raise JaxprvrError(f"{what}[{i}]", f"features of width {width} ({field})", f"shape {a.shape}")
        if a.shape[0] < 1:
            raise JaxprvrError(f"{what}[{i}]", "at least one row", f"shape {a.shape}")
        if not np.isfinite(a).all():
            raise JaxprvrError(f"{what}[{i}]", "finite features", "NaN/Inf")


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(n, s + size)


# ---------------------------------------------------------------------------------------------- PRVR


class PRVRModel(Loaded):
    """Partially relevant video retrieval: queries and videos encoded apart, then scored (the official
    ``eval_q2m`` protocol of :class:`jaxprvr.tasks.prvr.Evaluator`)."""

    def encode_queries(self, feats) -> np.ndarray:
        """``(N, D)`` float32 query embeddings of ``feats``: per query the raw token features ``(T_i, Dq)`` as the
        release's hdf5 stores them (each token L2-normalised, eps 1e-5, then cut to ``max_desc_l`` tokens, as
        :meth:`jaxprvr.data.PRVRDataset.query_item`)."""
        from jaxprvr.data.sampling import l2_normalize_rows

        m = self.config.model
        items = _as_list(feats, "encode_queries(feats)", 2)
        _check_width(items, m.q_feat_size, "encode_queries(feats)", "model.q_feat_size")
        tokens = [l2_normalize_rows(a)[: m.max_desc_l].astype(F32) for a in items]

        def batch(lo, hi, size):
            x = np.zeros((size, m.max_desc_l, m.q_feat_size), F32)
            mask = np.zeros((size, m.max_desc_l), F32)
            for r, t in enumerate(tokens[lo:hi]):
                x[r, :len(t)], mask[r, :len(t)] = t, 1.0
            return x, mask

        fn = self.jit("encode_query", lambda p, x, mk: self.model.apply(
            {"params": p}, x, mk, train=False, method=self.model.encode_query))
        return self._run(fn, batch, len(tokens))

    def encode_videos(self, feats) -> dict:
        """The gallery-side arrays of each video (a dict of ``(N, ...)`` float32 arrays, the model's
        ``encode_video`` output) from its raw frame features ``(T_i, Dv)`` as the release's ``feature.bin`` holds
        them: the clip level averaged into ``map_size`` rows, the frame level sampled to at most ``max_ctx_l`` rows,
        both row-L2-normalised (:meth:`jaxprvr.data.PRVRDataset.video_item`)."""
        from jaxprvr.data.sampling import average_to_fixed_length, l2_normalize_rows, uniform_feature_sampling

        m = self.config.model
        items = _as_list(feats, "encode_videos(feats)", 2)
        _check_width(items, m.visual_feat_dim, "encode_videos(feats)", "model.visual_feat_dim")
        clips = [l2_normalize_rows(average_to_fixed_length(a, m.map_size)).astype(F32) for a in items]
        frames = [l2_normalize_rows(uniform_feature_sampling(a, m.max_ctx_l)).astype(F32) for a in items]

        def batch(lo, hi, size):
            c = np.zeros((size, m.map_size, m.visual_feat_dim), F32)
            f = np.zeros((size, m.max_ctx_l, m.visual_feat_dim), F32)
            mask = np.zeros((size, m.max_ctx_l), F32)
            n = np.zeros((size,), np.int32)
            for r in range(hi - lo):
                k = len(frames[lo + r])
                c[r], f[r, :k], mask[r, :k], n[r] = clips[lo + r], frames[lo + r], 1.0, k
            return c, f, mask, n

        fn = self.jit("encode_video", lambda p, c, f, mk, n: self.model.apply(
            {"params": p}, c, f, mk, n, train=False, method=self.model.encode_video))
        return self._run(fn, batch, len(items))

    def _run(self, fn, batch, n):
        import jax

        outs = []
        size = bucket(min(n, MAX_ROWS))
        for lo, hi in _chunks(n, size):
            out = jax.device_get(fn(self.params, *batch(lo, hi, size)))
            outs.append(jax.tree.map(lambda a, k=hi - lo: np.asarray(a)[:k], out))
        return jax.tree.map(lambda *xs: np.concatenate(xs, 0), *outs)

    def scores(self, queries, videos, *, branches: bool = False):
        """``(Nq, Nv)`` float32: the fused test-time score ``sum_k w_k * score_k`` (the model's ``branch_weights``)
        of every query against every video; with ``branches`` a dict of the per-branch matrices and ``"fused"``.
        ``queries``: :meth:`encode_queries`; ``videos``: :meth:`encode_videos` of the whole gallery (MTM's video
        branch refines each query over all the videos given)."""
        import jax

        from jaxprvr.tasks.prvr import MAX_SCORE_ROWS, SCORE_ELEMENTS

        q = np.asarray(queries, F32)
        if q.ndim != 2:
            raise JaxprvrError("scores(queries)", "(Nq, D) embeddings (encode_queries)", f"shape {q.shape}")
        if not isinstance(videos, dict) or not videos:
            raise JaxprvrError("scores(videos)", "the dict of encode_videos", type(videos).__name__)
        nv = len(next(iter(videos.values())))
        if any(len(v) != nv for v in videos.values()):
            raise JaxprvrError("scores(videos)", "arrays of one length (encode_videos)",
                               str({k: np.shape(v) for k, v in videos.items()}))
        size_v = bucket(nv)
        gallery = {k: pad_rows(np.asarray(v), size_v) for k, v in videos.items()}
        gallery["video_valid"] = pad_rows(np.ones((nv,), F32), size_v)
        # query rows per call: a power of two keeping the (queries, videos, rows per video) similarity tensor near
        # the evaluator's SCORE_ELEMENTS (rows are independent: the block changes the speed, and a score by float
        # rounding only). Evaluator.score_matrix is not reused: it marks every given video valid and sizes its
        # blocks by data.eval_query_bsz, where the API pads the gallery to a bucket (invalid videos, which MTM's
        # refiner skips) and compiles once per bucket.
        per_video = sum(int(np.prod(v.shape[1:-1])) for v in gallery.values() if np.ndim(v) >= 3) or 1
        cap = max(int(min(SCORE_ELEMENTS // (size_v * per_video), MAX_SCORE_ROWS)), 1)
        size_q = min(bucket(len(q)), max(BUCKET_MIN, 1 << (cap.bit_length() - 1)))
        fn = self.jit("score", lambda p, qb, g: self.model.apply({"params": p}, qb, g, method=self.model.score))
        gallery = jax.device_put(gallery)  # once: every query block scores against the same device arrays
        outs = [(fn(self.params, pad_rows(q[lo:hi], size_q), gallery), hi - lo) for lo, hi in _chunks(len(q), size_q)]
        mats: dict = {}
        for out, n in outs:  # fetched after every block is dispatched
            for k, v in jax.device_get(out).items():
                mats.setdefault(k, []).append(np.asarray(v)[:n, :nv])
        mats = {k: np.concatenate(v, 0) for k, v in mats.items()}
        weights = self.model.branch_weights()
        mats["fused"] = sum(weights[k] * mats[k] for k in weights)
        return mats if branches else mats["fused"]


# ---------------------------------------------------------------------------------------------- moment retrieval


def _durations(durations, n: int, what: str) -> list:
    if durations is None:
        return [None] * n
    d = list(np.atleast_1d(np.asarray(durations, np.float64)))
    if len(d) != n:
        raise JaxprvrError(what, f"{n} durations (one per video)", f"{len(d)}")
    for x in d:
        if not np.isfinite(x) or x <= 0:
            raise JaxprvrError(what, "positive durations in seconds", repr(float(x)))
    return d


class MRNetModel(Loaded):
    """MRNet: every query of a video is scored over the ``num_clips x num_clips`` proposal map, then the official
    NMS (:func:`jaxprvr.metrics.vmr.predict_moments_padded`) ranks the windows."""

    def predict(self, video_feats, queries, *, duration: float, topk: int | None = None) -> list:
        """One video: per query a ``(k, 3)`` float32 array ``[start, end, score]`` (seconds), best first, ``k <=
        topk`` (default ``data.topk``). ``video_feats``: the stored ``(T, input_size)`` features (each row
        L2-normalised, then averaged to ``num_pre_clips`` rows, as :meth:`jaxprvr.data.mmn_format.MMNDataset.
        video_features`); ``queries``: ``(n, text_dim)`` query features, or one query ``(text_dim,)`` (``python -m
        jaxprvr.preprocess.vmr text`` computes them from sentences). The queries of a video are encoded together
        (MRNet's retention runs over ``[queries ; clips]``, the query's position its rank), so a query's windows
        depend on the others given and their order, as officially (the evaluation orders them by start time)."""
        return self.predict_many([video_feats], [queries], [duration], topk=topk)[0]

    def predict_many(self, videos: Sequence, queries: Sequence, durations: Sequence[float],
                     topk: int | None = None) -> list:
        """:meth:`predict` for several videos, batched (videos do not interact): at most ``data.eval_batch_size``
        videos a call (rounded down to a bucket: 1, 2, 4, ... 64, then multiples of 64). A list per video."""
        import jax

        from jaxprvr.data.mmn_format import avgfeats, l2_normalize_rows
        from jaxprvr.metrics.vmr import predict_moments_padded
        from jaxprvr.ops.proposals import mask2d

        m, d = self.config.model, self.config.data
        topk = int(d.topk if topk is None else topk)
        if len(videos) != len(queries):
            raise JaxprvrError("predict_many", "one query array per video", f"{len(videos)} videos, "
                               f"{len(queries)} query arrays")
        durs = _durations(durations, len(videos), "predict_many(durations)")
        if any(x is None for x in durs):
            raise JaxprvrError("predict(duration)", "each video's duration in seconds (MRNet's windows are fractions "
                               "of it)", "None")
        feats, qs = [], []
        for i, (v, q) in enumerate(zip(videos, queries)):
            if isinstance(q, str) or (isinstance(q, (list, tuple)) and q and isinstance(q[0], str)):
                raise JaxprvrError(f"queries[{i}]", "query features (n, text_dim): MRNet reads pre-extracted text "
                                   "features", "text", hint="python -m jaxprvr.preprocess.vmr text computes them")
            v = np.asarray(v)
            v = v.astype(F32) if v.dtype == np.float16 else v
            _check_width([v], m.input_size, f"video_feats[{i}]", "model.input_size")
            q = np.asarray(q, F32)
            if q.ndim == 1:  # one query
                q = q[None]
            if q.ndim != 2:
                raise JaxprvrError(f"queries[{i}]", f"query features (n, {m.text_dim}) or one query ({m.text_dim},)",
                                   f"shape {q.shape}")
            _check_width([q], m.text_dim, f"queries[{i}]", "model.text_dim")
            feats.append(avgfeats(l2_normalize_rows(v), m.num_pre_clips).astype(F32))
            qs.append(q)
        def forward(p, state, bt):
            out, _ = self.model.apply({"params": p, **state}, bt, train=False)
            return out["contrastive_scores"], out["iou_scores"]

        fn = self.jit("forward", forward)
        mask = np.asarray(mask2d(m.num_clips, m.pooling_counts), bool)
        out = []
        # at most data.eval_batch_size videos per call (what the evaluation holds at once), rounded down to a bucket
        most = max(int(d.eval_batch_size), 1)
        most = 1 << (most.bit_length() - 1) if most <= 64 else most // 64 * 64
        for lo, hi in _chunks(len(feats), most):
            b, slots = bucket(hi - lo, minimum=1), bucket(max(len(q) for q in qs[lo:hi]))
            batch = {"feats": np.zeros((b, m.num_pre_clips, m.input_size), F32), "video_valid": np.zeros((b,), F32),
                     "queries": np.zeros((b, slots, m.text_dim), F32), "query_mask": np.zeros((b, slots), F32),
                     "n_queries": np.zeros((b,), np.int32)}
            for r, (f, q) in enumerate(zip(feats[lo:hi], qs[lo:hi])):
                batch["feats"][r], batch["video_valid"][r], batch["n_queries"][r] = f, 1.0, len(q)
                batch["queries"][r, :len(q)], batch["query_mask"][r, :len(q)] = q, 1.0
            c, u = jax.device_get(fn(self.params, self.model_state, batch))
            for r, q in enumerate(qs[lo:hi]):
                p, _ = predict_moments_padded(c[r, :len(q)], u[r, :len(q)], mask, F32(durs[lo + r]),
                                              d.contrastive_score_pow, d.nms_thresh, topk)
                out.append([row[~np.isnan(row[:, 0])] for row in p])
        return out


class MESMModel(Loaded):
    """MESM: each query is a row of the DETR-style model (video + its text), decoded by the official
    post-processing (:func:`jaxprvr.metrics.moments.postprocess`: foreground score, windows in seconds rounded to
    ``clip_len``)."""

    @property
    def facts(self):
        """The feature variant's facts (:class:`jaxprvr.data.mesm.VariantFacts`: files, widths, lengths)."""
        from jaxprvr.tasks.vmr_detr import facts_of

        return facts_of(self.config)

    @property
    def feature_files(self) -> tuple[str, ...]:
        """The variant's video feature files, relative to the data root (one array per file per video)."""
        return tuple(self.facts.feat_files)

    @functools.cached_property
    def _text_tools(self):
        """``(tokenizer, TextFeatures)`` of the config, built on first use."""
        from jaxprvr.data.mesm import make_tokenizer
        from jaxprvr.tasks.vmr_detr import TextFeatures

        f, d = self.facts, self.config.data
        options = {} if f.tokenizer_type == "CLIP" else {"sentence_split": d.sentence_split}
        tok = make_tokenizer(f, self.data_root, recfw=False, pos_tagger="none", **options)
        return tok, TextFeatures(self.config, self.data_root, tok)

    def _video(self, v, i: int) -> np.ndarray:
        """One video's model input ``(L, v_feat_dim + 2)`` from its feature files (a list of ``(T, D_k)`` arrays in
        :attr:`feature_files` order, or one array of their concatenated widths): the official pipeline
        (:func:`jaxprvr.data.mesm.video_pipeline`: per file L2-normalised, concatenated, pooled or truncated to
        ``max_video_l``, TEF columns)."""
        from jaxprvr.data.mesm import video_pipeline

        f = self.facts
        raw = [np.asarray(a) for a in v] if isinstance(v, (list, tuple)) else [np.asarray(v)]
        if len(raw) == 1 and len(f.feat_dims) > 1 and raw[0].ndim == 2 and raw[0].shape[1] == sum(f.feat_dims):
            raw = np.split(raw[0], np.cumsum(f.feat_dims)[:-1], axis=1)  # the files' columns side by side
        if len(raw) != len(f.feat_dims):
            raise JaxprvrError(f"video_feats[{i}]", f"{len(f.feat_dims)} arrays ({list(f.feat_files)})",
                               f"{len(raw)}")
        for k, (a, w) in enumerate(zip(raw, f.feat_dims)):
            if a.ndim != 2:
                raise JaxprvrError(f"video_feats[{i}][{k}]", f"a (T, {w}) array ({f.feat_files[k]})",
                                   f"shape {a.shape}")
            _check_width([a], w, f"video_feats[{i}][{k}]", f"the width of {f.feat_files[k]}")
        return video_pipeline(raw, f.max_video_l, truncate=f.qvh, normalize=f.normalize_video, use_tef=f.use_tef)

    def _text_rows(self, q, i: int) -> tuple[list, list]:
        """``(TextRow list, sentences)`` of one video's queries (strings)."""
        from jaxprvr.data.mesm import text_row

        tok, _ = self._text_tools
        sentences = [q] if isinstance(q, str) else list(q)
        if not sentences or not all(isinstance(s, str) for s in sentences):
            raise JaxprvrError(f"queries[{i}]", "sentences (str) or words_feat arrays (n, max_words_l, t_feat_dim)",
                               repr(q)[:80])
        return [text_row(tok.encode(s), self.facts, f"queries[{i}][{k}]") for k, s in enumerate(sentences)], sentences

    def predict(self, video_feats, queries, *, duration: float | None = None, topk: int | None = None,
                words_mask=None) -> list:
        """One video: per query a ``(k, 3)`` float32 array ``[start, end, score]`` (seconds, the official submission
        windows: best first, rounded as the official post-processing), ``k <= topk`` (default all
        ``model.num_queries``). ``video_feats``: the video's arrays of :attr:`feature_files` (raw, as stored);
        ``queries``: sentences (the CLIP text tower / GloVe table of the config encodes them), or ``words_feat``
        ``(n, max_words_l, t_feat_dim)`` with ``words_mask`` ``(n, max_words_l)``; ``duration``: seconds (default
        ``T * clip_len``, T the feature rows). The queries of a video are one item of a one-item batch: with the
        official head-major T2V mask (``model.t2v_mask``) a row's output depends on the other rows of its batch,
        so the numbers equal an evaluation whose batch held this video alone, with these queries in this order."""
        return self.predict_many([video_feats], [queries], None if duration is None else [duration], topk=topk,
                                 words_mask=None if words_mask is None else [words_mask])[0]

    def predict_many(self, videos: Sequence, queries: Sequence, durations: Sequence[float] | None = None,
                     topk: int | None = None, words_mask: Sequence | None = None) -> list:
        """:meth:`predict` of several videos as ONE batch (items in this order): with the official head-major mask the
        rows of the batch see each other, as in the official evaluation (``jaxprvr.evaluate --save-predictions``
        writes its batches to ``eval_batches.json``). A list per video."""
        import jax

        from jaxprvr.data.mesm import Capacities, to_static
        from jaxprvr.metrics.moments import postprocess
        from jaxprvr.models import build_model
        from jaxprvr.tasks.vmr_detr import BATCH_KEYS

        f, d, mc = self.facts, self.config.data, self.config.model
        if len(videos) != len(queries):
            raise JaxprvrError("predict_many", "one query list per video", f"{len(videos)} videos, "
                               f"{len(queries)} query lists")
        durs = _durations(durations, len(videos), "predict_many(durations)")
        feats, rows, sentences, counts, row_dur, vecs, masks = [], [], [], [], [], [], []
        for i, (v, q) in enumerate(zip(videos, queries)):
            x = self._video(v, i)
            if durs[i] is None:
                if f.clip_len <= 0:
                    raise JaxprvrError(f"durations[{i}]", "the video's duration in seconds (clip_len is -1: the "
                                       "features have no fixed length in time)", "None")
                durs[i] = min(len(a) for a in ([v] if not isinstance(v, (list, tuple)) else v)) * f.clip_len
            if isinstance(q, str) or (isinstance(q, (list, tuple)) and all(isinstance(s, str) for s in q)):
                tr, sent = self._text_rows(q, i)
            else:
                w = np.asarray(q, F32)
                if w.ndim != 3 or w.shape[1:] != (mc.max_words_l, mc.t_feat_dim):
                    raise JaxprvrError(f"queries[{i}]", f"words_feat (n, {mc.max_words_l}, {mc.t_feat_dim})",
                                       f"shape {w.shape}")
                mk = None if words_mask is None else np.asarray(words_mask[i], bool)
                if mk is None and not mc.load_vocab_pkl:
                    raise JaxprvrError(f"words_mask[{i}]", "the words mask of words_feat queries", "None")
                tr, sent = None, [None] * len(w)
                vecs.append(w)
                masks.append(mk)
            n = len(sent)
            feats += [x] * n
            rows += tr or []
            sentences += sent
            counts.append(n)
            row_dur += [durs[i]] * n
        by_text = bool(rows)
        if by_text and len(rows) != len(sentences):
            raise JaxprvrError("predict_many(queries)", "sentences for every video or words_feat for every video",
                               "a mix")
        B, lmax = len(feats), max(len(x) for x in feats)
        vf = np.zeros((B, lmax, feats[0].shape[1]), F32)
        vm = np.zeros((B, lmax), bool)
        for r, x in enumerate(feats):
            vf[r, :len(x)], vm[r, :len(x)] = x, True
        official = {"qid": [None] * B, "num_clips": np.asarray(counts, np.int64), "video_feat": vf, "video_mask": vm,
                    "duration": np.asarray(row_dur, F32)}
        if by_text and rows[0].vec is None:
            official["words_id"] = np.stack([t.ids for t in rows])
            official["words_weight"] = np.stack([t.weight for t in rows])
        else:
            w = np.concatenate(vecs) if not by_text else np.stack([t.vec for t in rows])
            official["words_id"] = w
            official["words_weight"] = np.ones(w.shape[:2], F32)
        group_video = 0
        if f.qvh:  # SS-MESM's keys: the frames of all rows of an item (rounded up to 32)
            group_video = -(-max(int(vm[s:s + n].sum()) for s, n in zip(np.cumsum([0] + counts[:-1]), counts))
                            // 32) * 32
        caps = Capacities(rows=bucket(B), items=len(counts), video=min(mc.max_video_l, -(-lmax // 32) * 32),
                          words=mc.max_words_l, windows=f.max_windows if f.qvh else 1, group_video=group_video,
                          contra=0)
        s = to_static(official, caps)
        if "words_id" in s:
            _, text = self._text_tools
            feat = text(s.pop("words_id"))
            feat[np.asarray(s["row_group"]) < 0] = 0.0
            s["words_feat"] = feat.astype(F32)
        elif not by_text and masks[0] is not None:
            s["words_mask"] = pad_rows(np.concatenate(masks), caps.rows, False)
        most = max(counts)
        have = mc.ss_slots
        key = 0 if not have or most <= have else bucket(most)
        model = self.model if key == 0 else build_model(dataclasses.replace(mc, ss_slots=key))

        def fwd(p, batch, model=model):
            out, _ = model.apply({"params": p}, batch, train=False)
            return out["pred_logits"], out["pred_spans"], out["saliency_scores"]

        logits, spans, sal = jax.device_get(self.jit(f"forward_{key}", fwd)(
            self.params, {k: s[k] for k in BATCH_KEYS if k in s}))
        sub = postprocess(logits[:B], spans[:B], sal[:B], np.asarray(row_dur), clip_len=d.clip_len,
                          max_ts_val=d.max_ts_val, query=sentences, video_mask=np.asarray(s["video_mask"])[:B])
        k = None if topk is None else int(topk)
        windows = [np.asarray(r["pred_relevant_windows"], F32)[:k] for r in sub]
        out, start = [], 0
        for n in counts:
            out.append(windows[start:start + n])
            start += n
        return out


# ---------------------------------------------------------------------------------------------- text-video


class T2VModel(Loaded):
    """Text-video retrieval (BackBone_tvr): token features of captions, frame features of videos after seqTransf,
    and the WTI similarity of the two (:class:`jaxprvr.tasks.t2v.Evaluator`)."""

    def encode_text(self, texts) -> dict:
        """``{"features": (N, max_words, D), "mask": (N, max_words)}`` of captions (CLIP BPE with SOT/EOT, cut to
        ``max_words``: :func:`jaxprvr.text.clip_bpe.clip_sequences`)."""
        from jaxprvr.text.clip_bpe import clip_sequences

        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise JaxprvrError("encode_text(texts)", "captions (str)", repr(texts)[:80])
        ids, mask, _ = clip_sequences(texts, self.config.model.max_words)
        ids, mask = ids.astype(np.int32), mask.astype(np.int32)
        fn = self.jit("text", lambda p, x: self.model.apply({"params": p}, x, method="text_features"))
        return {"features": self._blocks(fn, [ids], len(ids)), "mask": mask}

    def _clip(self, v, i: int):
        """One video as ``(float32 [max_frames, 3, R, R], int32 mask)``: a file (decoded, sampled and preprocessed as
        the official loader: :func:`jaxprvr.data.video.load_clip`), uint8 RGB frames ``[T, H, W, 3]`` (more than
        ``max_frames`` are sampled at ``linspace(0, T - 1, max_frames)``, as the official loader thins its
        candidates), or preprocessed float frames ``[T, 3, R, R]``."""
        from jaxprvr.data.video import clip_from_frames, load_clip

        m, d = self.config.model, self.config.data
        if isinstance(v, (str, Path)):
            video, mask = load_clip(Path(v).expanduser(), m.max_frames, d.video_framerate, size=m.image_resolution)
            return video, mask
        a = np.asarray(v)
        if a.ndim == 4 and a.dtype == np.uint8 and a.shape[-1] == 3:
            if len(a) > m.max_frames:
                a = a[np.linspace(0, len(a) - 1, m.max_frames, dtype=int)]
            return clip_from_frames(a, m.max_frames, None, m.image_resolution)
        r = m.image_resolution
        if a.ndim == 4 and a.shape[1:] == (3, r, r) and len(a) <= m.max_frames:
            video = np.zeros((m.max_frames, 3, r, r), F32)
            mask = np.zeros((m.max_frames,), np.int32)
            video[:len(a)], mask[:len(a)] = a, 1
            return video, mask
        raise JaxprvrError(f"encode_video(videos)[{i}]", f"a video file, uint8 frames [T, H, W, 3] or preprocessed "
                           f"frames [T<={m.max_frames}, 3, {r}, {r}]", f"{a.dtype} {a.shape}")

    def encode_video(self, videos) -> dict:
        """``{"features": (N, max_frames, D), "mask": (N, max_frames)}`` of videos (paths or frame arrays, or a
        list of them; see :meth:`_clip`)."""
        single = isinstance(videos, (str, Path)) or (isinstance(videos, np.ndarray) and videos.ndim == 4)
        items = [videos] if single else list(videos)
        if not items:
            raise JaxprvrError("encode_video(videos)", "at least one video", "none")
        clips = [self._clip(v, i) for i, v in enumerate(items)]
        video = np.stack([c[0] for c in clips])
        mask = np.stack([c[1] for c in clips]).astype(np.int32)
        fn = self.jit("video", lambda p, x, mk: self.model.apply({"params": p}, x, mk, method="video_features"))
        return {"features": self._blocks(fn, [video, mask], len(items)), "mask": mask}

    def _blocks(self, fn, arrays, n):
        """``fn(params, *arrays)`` in bucket-padded blocks, padded as the evaluator pads its blocks
        (:func:`jaxprvr.tasks.t2v._pad`: float rows with copies of the last row, for finite norms; others with
        zeros)."""
        from jaxprvr.tasks.t2v import _pad

        outs = []
        size = bucket(min(n, MAX_ROWS))
        for lo, hi in _chunks(n, size):
            outs.append(np.asarray(fn(self.params, *[_pad(a[lo:hi], size) for a in arrays]))[: hi - lo])
        return np.concatenate(outs, 0)

    def similarity(self, text, video) -> np.ndarray:
        """``(Nt, Nv)`` float32 WTI logits of :meth:`encode_text` against :meth:`encode_video` outputs, in blocks of
        at most ``data.sim_block`` rows a side (bucket-padded as :func:`jaxprvr.tasks.t2v._pad` pads the
        evaluator's: copies of the last row, masks with 1; each entry depends on its pair only)."""
        import jax

        from jaxprvr.tasks.t2v import _pad

        for name, x in (("text", text), ("video", video)):
            if not isinstance(x, dict) or set(x) != {"features", "mask"}:
                raise JaxprvrError(f"similarity({name})", f"the dict of encode_{name}", type(x).__name__)
        tf, tm = np.asarray(text["features"], F32), np.asarray(text["mask"], np.int32)
        vf, vm = np.asarray(video["features"], F32), np.asarray(video["mask"], np.int32)
        nt, nv = len(tf), len(vf)
        blk = max(int(self.config.data.sim_block), 1)
        bt, bv = (min(bucket(min(n, blk)), blk) for n in (nt, nv))
        fn = self.jit("similarity", lambda p, a, am, b, bm: self.model.apply({"params": p}, a, am, b, bm,
                                                                             method="similarity"))
        videos = [(b0, b1, jax.device_put((_pad(vf[b0:b1], bv), _pad(vm[b0:b1], bv, fill=1))))
                  for b0, b1 in _chunks(nv, bv)]  # padded and sent once, not once per text block
        out = np.zeros((nt, nv), F32)
        for a0, a1 in _chunks(nt, bt):
            ta, ma = jax.device_put((_pad(tf[a0:a1], bt), _pad(tm[a0:a1], bt, fill=1)))
            for b0, b1, (vb, mb) in videos:
                out[a0:a1, b0:b1] = np.asarray(fn(self.params, ta, ma, vb, mb))[: a1 - a0, : b1 - b0]
        return out


__all__ = ["PRVRModel", "MRNetModel", "MESMModel", "T2VModel"]
