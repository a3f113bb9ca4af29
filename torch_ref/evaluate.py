"""PyTorch gallery evaluation of the twins, mirroring the official protocol (code below; what we
keep or change of it: docs/quirks.md, "Evaluation").

Official code: ms-sl ``method/eval.py`` (``compute_context_info``, ``compute_query2ctx_info``, ``eval_q2m``,
``t2v_map``) and GMMFormer / GMMFormer v2 ``src/Validations/validations.py``. Features are read with the
framework-neutral numpy readers of :class:`jaxprvr.data.PRVRDataset` (``video_item`` / ``query_item``, the
official ``__getitem__``); batching, encoding, scoring and ranking are torch, as in the official loop:

1. Gallery: the split's videos in caption-file order, in blocks of ``eval_context_bsz``. Each block is collated
   as ``collate_frame_val``: frames zero-padded to the *block's* longest video (not to ``max_ctx_l``), with the
   frame mask. The per-block outputs are concatenated with a transcription of the official ``cat_tensor``
   (dim 1 zero-padded to the longest block). The last block is simply shorter (no padding rows).
2. Queries in blocks of ``eval_query_bsz``, collated as ``collate_text_val``: sorted by token count
   (descending, stable) and zero-padded to the block's longest query. The official score rows stay in that
   loader order (with ``query_metas`` aligned); here each block is put back in caption-file order, a row
   permutation with the ground truth permuted alike, so the metrics are unchanged.
3. Per query block the ``(B, Nv)`` clip and frame scores against the whole gallery (``model.score``, the
   normalised / cosine scores) and ``score_sum = clip_scale_w * clip + frame_scale_w * frame``. MTM adds its
   video branch, ``+ video_scale_w * video`` (the refiner of each query attends over the whole gallery), and
   pads frames to ``max_ctx_l`` and queries to ``max_desc_l`` as its loader does.
4. :func:`eval_q2m` on ``errors = -scores`` for the fused matrix and each branch (MS-SL prints all three).

Everything runs under ``torch.no_grad()`` with the model in eval mode, on the device of its parameters (or
the ``device`` given to :class:`TorchEvaluator`, to which the model is moved). ``evaluate`` returns the same
structure as :meth:`jaxprvr.evaluate.Evaluator.evaluate`.

Official-eval quirks worth knowing (all reproduced or made explicit here):

* Ranking uses an *unstable* argsort (MS-SL: ``np.argsort``, numpy's default quicksort, which on x86 is a
  SIMD sort; GMMFormer/v2: ``torch.argsort`` on the GPU), so tied scores are ordered arbitrarily and the
  two implementations can disagree on ties. See :func:`gt_ranks` for how this relates to jaxprvr's rule.
* GMMFormer/v2's ``eval_q2m`` allocates ``gt_ranks`` with ``.cuda()``: the official code cannot evaluate on
  CPU. Not inherited.
* GMMFormer v2's validation does not pass the frame mask to ``get_pred_from_raw_query``: the frame-branch max
  runs over all 128 rows, whose padded rows were zeroed by ``encode_context``; ``F.normalize`` of a zero row
  is zero, so each video's frame score is floored at 0 (``max(0, best valid frame)``). The twin reproduces it.
* MS-SL's mAP (``t2v_map``) sorts each row again with ``np.argsort``; with one relevant video per query it is
  ``mean(1 / rank)``, computed here from the same ranks.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["KS", "SORTS", "TorchEvaluator", "cat_tensor", "collate_frame_val", "collate_text_val",
           "eval_q2m", "gt_ranks"]

KS = (1, 5, 10, 100)
# "torch": torch.argsort(stable=False), GMMFormer / GMMFormer v2 validations.py (official on GPU).
# "numpy": np.argsort (default kind, quicksort), ms-sl method/eval.py.
# "stable": torch.argsort(stable=True); equals jaxprvr.metrics.prvr.gt_ranks(ties="stable") exactly.
SORTS = ("torch", "numpy", "stable")


# ---------------------------------------------------------------------------------------------- metrics
def _gt_lists(gt, n_q: int) -> list[list[int]]:
    """``gt`` as the official ``q2m_gts`` (per query, a list of relevant video columns)."""
    if isinstance(gt, Mapping):  # official t2v_gt: {query row: [video columns]}
        return [[int(v) for v in gt[i]] for i in range(n_q)]
    if torch.is_tensor(gt):
        gt = gt.detach().cpu().numpy()
    if isinstance(gt, np.ndarray) or (isinstance(gt, Sequence) and all(np.isscalar(g) for g in gt)):
        arr = np.asarray(gt).reshape(-1)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"eval_q2m gt: expected integer video indices, got dtype {arr.dtype}")
        return [[int(g)] for g in arr]
    return [[int(v) for v in g] for g in gt]


def gt_ranks(scores, gt, *, sort: str = "torch") -> np.ndarray:
    """1-based rank of each query's ground-truth video, as official ``eval_q2m``: ``scores (Nq, Nv)``, higher =
    better; ``gt`` a ``(Nq,)`` int array (one relevant video per query, the PRVR case) or the official
    per-query lists of relevant columns (the best-ranked one counts).

    Transcription of the official loop: ``errors = -scores``; per query ``sorted_idxs = argsort(errors[i])``
    (ascending); ``rank = 1 + position of the gt column`` (minimum over gt columns; ``Nv + 1`` if none).

    Tie behaviour. ``sort="torch"`` (GMMFormer/v2) and ``sort="numpy"`` (MS-SL) are the official unstable
    sorts: tied scores come out in an implementation-defined order, so a tied ground truth gets *some* rank
    between jaxprvr's ``ties="optimistic"`` (``1 + #(score > gt)``) and ``ties="pessimistic"``
    (``#(score >= gt)``), and torch and numpy need not agree. ``sort="stable"`` orders ties by column index,
    which is exactly jaxprvr's default ``ties="stable"`` (``1 + #(score > gt) + #(score == gt, col < gt)``).
    Without ties all three agree with jaxprvr. (``-0.0 == 0.0`` in every sort, as in jaxprvr's comparisons.)
    """
    if sort not in SORTS:
        raise ValueError(f"eval_q2m sort: expected one of {list(SORTS)}, got {sort!r}")
    if not torch.is_tensor(scores):
        scores = torch.from_numpy(np.asarray(scores))
    if scores.ndim != 2:
        raise ValueError(f"eval_q2m scores: expected a 2-D (n_queries, n_videos) matrix, got {tuple(scores.shape)}")
    n_q, n_m = scores.shape
    if n_q == 0:
        raise ValueError("eval_q2m scores: expected at least one query, got 0")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("eval_q2m scores: expected finite scores")
    q2m_gts = _gt_lists(gt, n_q)
    if len(q2m_gts) != n_q:
        raise ValueError(f"eval_q2m gt: expected {n_q} ground truths (one per query), got {len(q2m_gts)}")
    for g in q2m_gts:
        if any(k < 0 or k >= n_m for k in g):
            raise ValueError(f"eval_q2m gt: video indices must lie in [0, {n_m}), got {g}")

    errors = -1 * scores
    errors_np = errors.cpu().numpy() if sort == "numpy" else None
    ranks = np.zeros((n_q,), np.int32)
    for i in range(n_q):
        if sort == "numpy":
            sorted_idxs = np.argsort(errors_np[i])
            position = {int(k): int(np.where(sorted_idxs == k)[0][0]) for k in q2m_gts[i]}
        else:
            sorted_idxs = torch.argsort(errors[i], stable=(sort == "stable"))
            position = {int(k): int(torch.where(sorted_idxs == k)[0][0]) for k in q2m_gts[i]}
        rank = n_m + 1
        for k in q2m_gts[i]:
            tmp = position[k] + 1
            if tmp < rank:
                rank = tmp
        ranks[i] = rank
    return ranks


def eval_q2m(scores, gt, *, sort: str = "torch") -> dict[str, float]:
    """Official ``eval_q2m`` (+ MS-SL's ``t2v_map``) -> ``{"r1","r5","r10","r100","sumr","medr","meanr","map"}``,
    the keys of :func:`jaxprvr.metrics.prvr.eval_q2m`.

    ``R@K = 100 * #{rank <= K} / Nq`` in percent; ``sumr = r1 + r5 + r10 + r100`` unrounded (the official
    ``currscore``); ``medr = np.median(ranks)``, ``meanr = ranks.mean()`` (int32 ranks, as official);
    ``map = mean(1 / rank)``, MS-SL's ``t2v_map`` (``ap_score`` of a ranking with one relevant item).
    ``scores`` may be a tensor (ranked on its device) or a numpy array. ``sort``: see :func:`gt_ranks`.
    """
    ranks = gt_ranks(scores, gt, sort=sort)
    n_q = ranks.shape[0]
    out = {f"r{k}": 100.0 * len(np.where(ranks <= k)[0]) / n_q for k in KS}
    out["sumr"] = out["r1"] + out["r5"] + out["r10"] + out["r100"]
    out["medr"] = float(np.median(ranks))
    out["meanr"] = float(ranks.mean())
    out["map"] = float(np.mean(1.0 / ranks.astype(np.float64)))
    return out


# ---------------------------------------------------------------------------------------------- collation
def collate_frame_val(items: Sequence[tuple[np.ndarray, np.ndarray]], pad_to: int | None = None
                      ) -> dict[str, torch.Tensor]:
    """Official ``collate_frame_val`` on ``[(clip (M, Dv), frames (n_i, Dv)), ...]``: clips stacked; frames
    zero-padded to ``max(n_i)`` of the batch with a float mask; plus ``frame_len`` (the twins' GMMFormer v1
    builds its Gaussian grid on it, as the official padded length). ``pad_to``: pad to exactly that many
    frames instead (MTM ``data_provider.py``: always ``max_ctx_l``)."""
    clips = torch.stack([torch.from_numpy(np.asarray(c, np.float32)) for c, _ in items]).float()
    lengths = [len(f) for _, f in items]
    dim = items[0][1].shape[-1]
    width = max(lengths) if pad_to is None else int(pad_to)
    if width < max(lengths):
        raise ValueError(f"collate_frame_val: a video of {max(lengths)} frames does not fit pad_to={width}")
    frames = torch.zeros(len(items), width, dim)
    mask = torch.zeros(len(items), width)
    for i, (_, f) in enumerate(items):
        frames[i, :lengths[i]] = torch.from_numpy(np.asarray(f, np.float32))
        mask[i, :lengths[i]] = 1.0
    return {"clip_feats": clips, "frame_feats": frames, "frame_mask": mask,
            "frame_len": torch.tensor(lengths, dtype=torch.long)}


def collate_text_val(items: Sequence[np.ndarray], pad_to: int | None = None
                     ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Official ``collate_text_val``: the batch sorted by token count, descending (Python's ``list.sort`` is
    stable), zero-padded to the longest query, with a float mask. Returns the batch and the sort order
    (``order[r]`` = position in ``items`` of batch row ``r``). ``pad_to``: pad to exactly that many tokens
    instead (MTM: always ``max_desc_l``)."""
    lengths = np.array([len(t) for t in items])
    order = np.array(sorted(range(len(items)), key=lambda j: lengths[j], reverse=True), dtype=np.int64)
    dim = items[0].shape[-1]
    width = int(lengths.max()) if pad_to is None else int(pad_to)
    if width < int(lengths.max()):
        raise ValueError(f"collate_text_val: a query of {int(lengths.max())} tokens does not fit pad_to={width}")
    feats = torch.zeros(len(items), width, dim)
    mask = torch.zeros(len(items), width)
    for r, j in enumerate(order):
        feats[r, :lengths[j]] = torch.from_numpy(np.asarray(items[j], np.float32))
        mask[r, :lengths[j]] = 1.0
    return {"query_feats": feats, "query_mask": mask}, order


def cat_tensor(tensor_list: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Official ``cat_tensor``: concatenates along dim 0, zero-padding dim 1 of 2-D/3-D tensors to the longest;
    1-D tensors are concatenated as they are."""
    if len(tensor_list) == 0:
        return None
    if tensor_list[0].ndim == 1:
        return torch.cat(list(tensor_list), dim=0)
    if tensor_list[0].ndim not in (2, 3):
        raise ValueError("cat_tensor supports 1/2/3-dimensional tensors only")
    seq = max(t.shape[1] for t in tensor_list)
    sizes = np.cumsum([0] + [t.shape[0] for t in tensor_list])
    out = tensor_list[0].new_zeros((int(sizes[-1]), seq) + tuple(tensor_list[0].shape[2:]))
    for i, t in enumerate(tensor_list):
        out[sizes[i]:sizes[i + 1], :t.shape[1]] = t
    return out


# ---------------------------------------------------------------------------------------------- evaluator
class TorchEvaluator:
    """Official-protocol evaluation of a torch twin (``torch_ref.build_model``) on a :class:`PRVRDataset`.

    ``cfg`` is the full :class:`jaxprvr.config.Config` (``cfg.data.eval_context_bsz``, ``eval_query_bsz``);
    the fused score uses the twin's ``branch_weights()``. ``device``: ``None`` keeps the model where it is;
    otherwise the model is moved there. ``sort``: the ranking of :func:`eval_q2m` (official ``"torch"``).

    MTM (its twin's ``pads_to_max_length``): frames are padded to exactly ``max_ctx_l`` and queries to exactly
    ``max_desc_l`` (MTM ``data_provider.py:64-158``, train and eval); the fused score adds the video branch,
    ``video_scale_w * video``, whose refiner attends over the whole gallery (``model.score`` gets every gallery
    video for each query block).
    """

    def __init__(self, model: torch.nn.Module, cfg, device=None, sort: str = "torch"):
        if sort not in SORTS:
            raise ValueError(f"sort: expected one of {list(SORTS)}, got {sort!r}")
        if device is not None:
            model = model.to(device)
        self.model = model
        self.cfg = cfg
        self.sort = sort
        self.weights = model.branch_weights()
        full = model.pads_to_max_length
        self.frame_pad = int(cfg.model.max_ctx_l) if full else None
        self.text_pad = int(cfg.model.max_desc_l) if full else None

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _to(self, batch: dict) -> dict:
        """On the model's device; float tensors in the model's dtype (a float64 twin gets the float32 features
        exactly, in double precision)."""
        p = next(self.model.parameters(), None)
        dt = p.dtype if p is not None else torch.float32
        return {k: v.to(self.device, dtype=dt) if v.is_floating_point() else v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def encode_gallery(self, ds, progress: bool = False) -> dict[str, torch.Tensor]:
        """Every gallery video (``ds.video_ids`` order), blocks of ``eval_context_bsz``, official collation;
        the per-block ``encode_video`` outputs joined with :func:`cat_tensor`. Tensors on the model's device."""
        self.model.eval()
        bsz = int(self.cfg.data.eval_context_bsz)
        n = ds.num_videos
        outs = []
        for start in _bar(range(0, n, bsz), progress, "gallery", -(-n // bsz)):
            b = self._to(collate_frame_val([ds.video_item(i) for i in range(start, min(start + bsz, n))],
                                           self.frame_pad))
            outs.append(self.model.encode_video(b["clip_feats"], b["frame_feats"], b["frame_mask"], b["frame_len"]))
        return {k: cat_tensor([o[k] for o in outs]) for k in outs[0]}

    @torch.no_grad()
    def encode_queries(self, ds, progress: bool = False) -> torch.Tensor:
        """``(Nq, D)`` query vectors in caption-file order; each block of ``eval_query_bsz`` is encoded in the
        official loader order (sorted by length, padded to its longest query) and put back in caption order."""
        self.model.eval()
        bsz = int(self.cfg.data.eval_query_bsz)
        n = ds.num_queries
        outs = []
        for start in _bar(range(0, n, bsz), progress, "queries", -(-n // bsz)):
            batch, order = collate_text_val([ds.query_item(j) for j in range(start, min(start + bsz, n))],
                                            self.text_pad)
            b = self._to(batch)
            q = self.model.encode_query(b["query_feats"], b["query_mask"])
            back = torch.empty_like(q)
            back[torch.from_numpy(order).to(q.device)] = q
            outs.append(back)
        return torch.cat(outs, 0)

    @torch.no_grad()
    def score_matrix(self, query: torch.Tensor, gallery: dict, progress: bool = False) -> dict[str, torch.Tensor]:
        """``{"clip", "frame", "fused"}`` (MTM also ``"video"``) (Nq, Nv) cosine score matrices; each query block
        of ``eval_query_bsz`` is scored against the whole gallery and fused per block,
        ``clip_scale_w*clip + frame_scale_w*frame`` (MTM ``+ video_scale_w*video``)."""
        self.model.eval()
        if not torch.is_tensor(query):
            query = torch.from_numpy(np.asarray(query))
        query = query.to(self.device)
        gallery = {k: (v if torch.is_tensor(v) else torch.from_numpy(np.asarray(v))).to(self.device)
                   for k, v in gallery.items()}
        bsz = int(self.cfg.data.eval_query_bsz)
        rows: dict[str, list] = {}
        n = query.shape[0]
        for start in _bar(range(0, n, bsz), progress, "scoring", -(-n // bsz)):
            out = self.model.score(query[start:start + bsz], gallery)
            out = dict(out)
            missing = sorted(set(self.weights) - set(out))
            if missing:
                raise ValueError(f"model.score gave no {missing} scores for the fused score {sorted(self.weights)}")
            fused = self.weights["clip"] * out["clip"] + self.weights["frame"] * out["frame"]
            if "video" in self.weights:
                fused = fused + self.weights["video"] * out["video"]
            out["fused"] = fused
            for k, v in out.items():
                rows.setdefault(k, []).append(v)
        return {k: torch.cat(v, 0) for k, v in rows.items()}

    def evaluate(self, ds, progress: bool = False, keep_scores: bool = False) -> dict:
        """Fused-score metrics at the top level, ``"branches": {"clip": ..., "frame": ...}``, ``n_queries``,
        ``n_videos``, ``seconds`` (and ``"_scores"``, the fused numpy matrix, with ``keep_scores``): the
        structure of :meth:`jaxprvr.evaluate.Evaluator.evaluate`."""
        t0 = time.perf_counter()
        gallery = self.encode_gallery(ds, progress)
        query = self.encode_queries(ds, progress)
        mats = self.score_matrix(query, gallery, progress)
        gt = np.asarray(ds.query_video_index)
        result = {k: eval_q2m(v, gt, sort=self.sort) for k, v in mats.items()}
        out = dict(result["fused"])
        out["branches"] = {k: v for k, v in result.items() if k != "fused"}
        out["n_queries"], out["n_videos"] = int(len(ds.cap_ids)), int(len(ds.video_ids))
        out["seconds"] = round(time.perf_counter() - t0, 3)
        if keep_scores:
            out["_scores"] = mats["fused"].detach().cpu().numpy()
        return out


def _bar(it: Iterable, progress: bool, desc: str, total=None):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)
