"""MESM's data (lntzm/MESM @ 8501bdea): the five readers, video features, labels, items and batches, in numpy.

A port of ``dataset/base.py``, ``dataset/charades.py``, ``dataset/charades_cg.py``, ``dataset/charades_cd.py``,
``dataset/tacos.py``, ``dataset/qvhighlights.py``, ``utils/data_utils.py`` (``pad_sequences_1d``,
``sample_outclass_neg``'s batch rule) and ``runner.py`` L44-157 (which splits, which loaders), without torch.

On disk (the official ``./data/...`` and ``./pretrained_models/...`` paths, re-rooted under ``--data-root``:
``./data/charades/x`` is ``ROOT/data/charades/x``; :data:`VARIANTS` lists them per (dataset, variant))::

    charades      data/charades/annotations/charades_sta_{train,test}.txt     "vid start end##sentence"
                  data/charades/annotations/Charades_v1_{train,test}.csv      durations: the last column, length
    charades_cg   data/Charades-CG/{train,novel_composition,novel_word,test_trivial}.json
    charades_cd   data/Charades-CD/charades_{train,val,test_iid,test_ood}.json  (duration: video_duration)
    tacos         data/TACoS/annotations/{train,val,test}.json                (num_frames, fps, frame timestamps)
    qvhighlights  data/qvhighlights/annotations/highlight_{train,val,test}_release.jsonl (+ highlight_test_with_gt)
    features      one hdf5 per feature type, one (T, D) dataset per video id (data/npy2hdf5.py)

What one query row becomes (``base.py`` L164-223, L225-230; ``qvhighlights.py`` L171-303):

* video: every feature file read in float32 and L2-normalised per row (``F.normalize``: ``x / max(||x||, 1e-12)``),
  the files cut to the shortest and concatenated; average-pooled to ``max_video_l`` bins when ``T > max_video_l``
  (``sample_video_feat``, the float32 bin edges of :func:`jaxprvr.data.sampling.average_to_fixed_length`, the
  same rounding as MRNet) -- QVHighlights instead *truncates* each file to ``max_video_l`` rows; then the TEF
  ``[t/L, (t+1)/L]`` columns;
* labels: ``int(t / clip_len)`` clip indices on the **original** time axis (not rescaled when the video was
  pooled; ``rescale_labels=True`` is the corrected behaviour), or ``int(t / duration * L)`` for
  ``clip_len == -1`` (TACoS); the end clipped to ``L - 1``, the start to the end; ``clip_mask``; ``contra_samples``
  positive frames inside and negative frames outside the moment. The official draws them with the global
  ``np.random``/``random``; here every draw comes from an explicit :class:`numpy.random.Generator` (same
  distributions, other streams);
* QVHighlights: per-clip saliency = the sum of the 3 annotators, 1 hard + 1 easy positive/negative clip, at most
  ``max_windows`` windows normalised by ``L * clip_len``.

Items and batches: the queries of a video form one item (``_gather_data_by_video_id``, ``base.py`` L116-162;
QVHighlights: of a YouTube id, each row keeping its own 150-s window), or chunks of ``max_gather_size`` (TACoS 10)
fixed once per run; training batches hold ``batch_size`` items (``SplitGatherBatchSampler`` L233-285 for chunked
datasets), evaluation batches ``eval_batch_size``. Each batch comes twice: the **official** collate dict (numpy,
the official keys and dynamic shapes of ``collate`` + ``prepare_batch_input``; what the PyTorch twin consumes)
and the **static** padded dict (:func:`to_static`, fixed capacities per split, for the jitted Flax model).

Official crashes, decided here (each a :class:`~jaxprvr.errors.JaxprvrError` naming the file and the query, or a
documented repair):

* a moment covering the whole video (``s == 0`` and ``e == L - 1``) leaves no negative frame:
  ``np.random.choice`` on an empty pool raises (``base.py`` L199-204) on any split -> an error when the split is
  opened (``whole_video="skip"`` skips and counts such queries instead);
* a batch left with a single item (a plain loader's last batch) crashes ``sample_outclass_neg`` -> merged into the
  previous batch (:func:`plain_batches`); ``SplitGatherBatchSampler`` itself drops such a leftover (kept, and
  counted in :attr:`MESMSplit.last_stats`);
* QVHighlights' saliency array grows to ``L + 1`` when a relevant clip id equals ``L`` (a window with fewer
  feature rows than its clip ids; ``qvhighlights.py`` L276-283). Officially the batch then crashes in the
  saliency loss when that row is the longest of its batch, and otherwise carries the extra label (and a ``True``
  ``clip_mask`` entry) inside the padding. The static batch keeps it inside the padding whenever ``L + 1 <=
  max_video_l`` (the official padded tensors, bit for bit); ``L == max_video_l`` (always a crash officially), an id
  above ``L`` or two ids ``>= L`` (official ``IndexError`` / shape error) are refused when the split is opened.

Every bad input raises one :class:`~jaxprvr.errors.JaxprvrError` naming the file; skipped queries are counted by
reason in :attr:`MESMSplit.skipped` (for the val split derived from train: the skips of the whole train file).
docs/quirks.md lists the official quirks kept here and their flags.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxprvr.data.mmn_format import _OpenFiles, l2_normalize_rows, resolve
from jaxprvr.data.sampling import average_to_fixed_length
from jaxprvr.errors import JaxprvrError

DATASETS = ("charades", "charades_cg", "charades_cd", "qvhighlights", "tacos")
DEFAULT_VARIANT = {"charades": "C+SF_C", "charades_cg": "C+SF_C", "charades_cd": "C+SF_C",
                   "qvhighlights": "C+SF_C", "tacos": "C3D_GloVe"}
CONTEXT_LENGTH = 77  # the CLIP tokenizer's words_id width (tokenizer.py L168, L200)

# ---------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class VariantFacts:
    """The data facts of one official config json (``config/<dir>/<variant>.json``), re-rooted paths included.

    Paths are relative to ``--data-root`` (the official working directory). ``feat_dims`` are the widths of the
    feature files (README "Data Preparation"); ``v_feat_dim`` is their sum, the TEF's 2 columns not included."""

    dataset: str
    variant: str
    official_name: str  # the json's dataset_name (runner.py L46-52)
    config_json: str | None  # the official file these facts come from; None: Charades-CD (no config shipped)
    ann_path: str
    feat_files: tuple[str, ...]
    feat_dims: tuple[int, ...]
    clip_len: float
    max_words_l: int
    max_video_l: int
    tokenizer_type: str  # "CLIP" | "GloVeNLTK"
    load_vocab_pkl: bool  # GloVeNLTK with CPL's <ann_path>/glove.pkl (runner.py L37-41)
    text_model_path: str  # unused with load_vocab_pkl (runner.py L261-263)
    vocab_size: int
    contra_samples: int
    batch_size: int
    eval_batch_size: int
    max_gather_size: int
    max_windows: int
    seed: int
    t_feat_dim: int
    split_files: tuple[tuple[str, str], ...]  # (split, file under ann_path)
    official_selection: tuple[str, ...]  # the "val" splits of runner.py L70-80 (checkpoint selection)
    honest_selection: tuple[str, ...]  # our alternative: no test split selects checkpoints
    test_splits: tuple[str, ...]  # where numbers are reported
    val_from_train: float = 0.0  # > 0: "val" is this seeded fraction of the train videos (no val file exists)
    use_tef: bool = True
    normalize_video: bool = True
    rec_fw: bool = True  # the train split computes the MLM labels (runner.py L86: recfw=opt.rec_fw)
    bpe_path: str = "pretrained_models/bpe_simple_vocab_16e6.txt.gz"

    @property
    def v_feat_dim(self) -> int:
        return int(sum(self.feat_dims))

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.split_files)

    @property
    def qvh(self) -> bool:
        return self.dataset == "qvhighlights"

    def split_file(self, split: str) -> str:
        for s, name in self.split_files:
            if s == split:
                return name
        raise JaxprvrError("split", f"one of {list(self.splits)} ({self.dataset})", repr(split))


_CHARADES_FEATS = ("data/charades/clip_image.hdf5", "data/charades/slowfast.hdf5")


def _variants() -> dict[tuple[str, str], VariantFacts]:
    clip = dict(tokenizer_type="CLIP", load_vocab_pkl=False, max_words_l=16, vocab_size=1111, contra_samples=2,
                batch_size=12, eval_batch_size=30, max_gather_size=-1, max_windows=5, t_feat_dim=512,
                text_model_path="pretrained_models/clip_text_encoder.pth")
    charades_splits = (("train", "charades_sta_train.txt"), ("val", "charades_sta_train.txt"),
                       ("test", "charades_sta_test.txt"))
    cg_splits = (("train", "train.json"), ("val", "train.json"), ("novel_composition", "novel_composition.json"),
                 ("novel_word", "novel_word.json"), ("test_trivial", "test_trivial.json"))
    out = [
        VariantFacts("charades", "C+SF_C", "charades", "config/charades/C+SF_C.json", "data/charades/annotations",
                     _CHARADES_FEATS, (512, 2304), clip_len=1.0, max_video_l=194, seed=2019,
                     split_files=charades_splits, official_selection=("test",), honest_selection=("val",),
                     test_splits=("test",), val_from_train=0.1, **clip),
        VariantFacts("charades", "VGG_GloVe", "charades", "config/charades/VGG_GloVe.json",
                     "data/charades/annotations", ("data/charades/vgg.hdf5",), (4096,), clip_len=0.17,
                     max_words_l=16, max_video_l=600, tokenizer_type="GloVeNLTK", load_vocab_pkl=True,
                     text_model_path="pretrained_models/glove.6B.300d.txt", vocab_size=1111, contra_samples=2,
                     batch_size=12, eval_batch_size=30, max_gather_size=-1, max_windows=5, seed=2019,
                     t_feat_dim=300, split_files=charades_splits, official_selection=("test",),
                     honest_selection=("val",), test_splits=("test",), val_from_train=0.1),
        VariantFacts("charades_cg", "C+SF_C", "charades-cg", "config/Charades-CG/C+SF_C.json", "data/Charades-CG",
                     _CHARADES_FEATS, (512, 2304), clip_len=1.0, max_video_l=194, seed=2019, split_files=cg_splits,
                     official_selection=("novel_composition", "novel_word"), honest_selection=("val",),
                     test_splits=("novel_composition", "novel_word", "test_trivial"), val_from_train=0.1, **clip),
        # No official config: Charades-CG's facts with the Charades-CD annotations (duration: video_duration).
        VariantFacts("charades_cd", "C+SF_C", "charades-cd", None, "data/Charades-CD", _CHARADES_FEATS,
                     (512, 2304), clip_len=1.0, max_video_l=194, seed=2019,
                     split_files=(("train", "charades_train.json"), ("val", "charades_val.json"),
                                  ("test_iid", "charades_test_iid.json"), ("test_ood", "charades_test_ood.json")),
                     official_selection=("test_ood",), honest_selection=("val",), test_splits=("test_ood", "test_iid"),
                     **clip),
        VariantFacts("qvhighlights", "C+SF_C", "qvhighlights", "config/QVHighlights/C+SF_C.json",
                     "data/qvhighlights/annotations",
                     ("data/qvhighlights/clip_image.hdf5", "data/qvhighlights/slowfast.hdf5"), (512, 2304),
                     clip_len=2.0, max_video_l=75, seed=2018,
                     split_files=(("train", "highlight_train_release.jsonl"), ("val", "highlight_val_release.jsonl"),
                                  ("test", "highlight_test_release.jsonl"),
                                  ("test_with_gt", "highlight_test_with_gt.jsonl")),
                     official_selection=("val",), honest_selection=("val",), test_splits=("test_with_gt",),
                     **{**clip, "max_words_l": 32, "vocab_size": 5000}),
        VariantFacts("tacos", "C3D_GloVe", "tacos", "config/TACoS/C3D_GloVe.json", "data/TACoS/annotations",
                     ("data/TACoS/c3d.hdf5",), (4096,), clip_len=-1.0, max_words_l=16, max_video_l=600,
                     tokenizer_type="GloVeNLTK", load_vocab_pkl=False,
                     text_model_path="pretrained_models/glove.6B.300d.txt", vocab_size=1111, contra_samples=2,
                     batch_size=3, eval_batch_size=5, max_gather_size=10, max_windows=5, seed=2019, t_feat_dim=300,
                     split_files=(("train", "train.json"), ("val", "val.json"), ("test", "test.json")),
                     official_selection=("test",), honest_selection=("val",), test_splits=("test",)),
    ]
    return {(v.dataset, v.variant): v for v in out}


VARIANTS: dict[tuple[str, str], VariantFacts] = _variants()


def variant_facts(dataset: str, variant: str | None = None, **overrides) -> VariantFacts:
    """``VARIANTS[(dataset, variant or the default)]`` with ``overrides`` (field names of :class:`VariantFacts`)."""
    if dataset not in DATASETS:
        raise JaxprvrError("dataset", f"one of {list(DATASETS)}", repr(dataset))
    variant = variant or DEFAULT_VARIANT[dataset]
    key = (dataset, variant)
    if key not in VARIANTS:
        known = sorted(v for d, v in VARIANTS if d == dataset)
        raise JaxprvrError("variant", f"one of {known} for {dataset}", repr(variant))
    facts = VARIANTS[key]
    names = {f.name for f in dataclasses.fields(VariantFacts)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise JaxprvrError("open_mesm overrides", f"fields of VariantFacts ({sorted(names)})", str(unknown))
    if "feat_dims" in overrides:
        overrides["feat_dims"] = tuple(int(d) for d in overrides["feat_dims"])
        if len(overrides["feat_dims"]) != len(facts.feat_files):
            raise JaxprvrError("feat_dims", f"{len(facts.feat_files)} widths ({list(facts.feat_files)})",
                               str(overrides["feat_dims"]))
    return dataclasses.replace(facts, **overrides)


# ---------------------------------------------------------------------------------------------- annotations


@dataclass
class Query:
    """One annotation line that survived the reader's skips."""

    qid: int  # the official qid rule, applied to train splits too (where the official stores None)
    official_qid: int | None  # what the official puts in batch["qid"] (None on the train split)
    video_id: str  # the feature key (QVHighlights: the 150-s window "<ytid>_<st>_<ed>")
    group: str  # the gather key: the video id (QVHighlights: the YouTube id)
    duration: float
    sentence: str
    where: str  # "file:line" for messages
    moment: tuple[float, float] | None = None  # seconds after swap/clip (None: QVHighlights)
    start_idx: float | None = None  # the official meta values: int(t / clip_len), or t / duration (clip_len -1)
    end_idx: float | None = None
    video_start: float | None = None  # QVHighlights: the sort key
    relevant_windows: list | None = None  # QVHighlights (None on the test release)
    relevant_clip_ids: list | None = None
    saliency_scores: list | None = None


def _open_text(path: Path, what: str):
    if not path.is_file():
        raise JaxprvrError(path, what, "no such file")
    return open(path, encoding="utf-8")


def _load_json(path: Path, what: str):
    with _open_text(path, what) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise JaxprvrError(path, f"{what} (JSON)", f"invalid JSON: {e}") from None


def read_charades_durations(path: Path) -> dict[str, float]:
    """``_load_durations`` (``charades.py`` L89-106): ``{id: float(last column)}``, the header row skipped."""
    out = {}
    with _open_text(Path(path), "the Charades csv (id,...,length)") as f:
        for k, row in enumerate(csv.reader(f, delimiter=",")):
            if k == 0:
                continue
            try:
                out[row[0]] = float(row[-1])
            except (IndexError, ValueError):
                raise JaxprvrError(f"{path}:{k + 1}", "a row whose last column (length) is a number",
                                   repr(row[-1:] if row else row)) from None
    return out


def read_charades_sta(path: Path, durations: Mapping[str, float], clip_len: float, train: bool,
                      durations_file: str = "the csv") -> tuple[list[Query], Counter]:
    """``CharadesDataset.load_annotations`` (``charades.py`` L39-87): ``vid start end##sentence`` lines.

    qid = the 0-based line index (skipped lines use theirs up); ``start > duration``: skipped (counted as
    ``start_after_end_of_video``); ``start > end``: swapped; ``end > duration``: clipped."""
    queries, skipped = [], Counter()
    with _open_text(Path(path), "the Charades-STA annotation file (vid start end##sentence)") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        where = f"{path}:{i + 1}"
        meta = line.split("##")
        head = meta[0].split()
        if len(meta) < 2 or len(head) != 3:
            raise JaxprvrError(where, "'vid start end##sentence'", repr(line.rstrip("\n")))
        vid = head[0]
        try:
            start, end = float(head[1]), float(head[2])
        except ValueError:
            raise JaxprvrError(where, "numeric start and end", repr(meta[0])) from None
        if vid not in durations:
            raise JaxprvrError(where, f"a video listed in {durations_file}", repr(vid))
        duration = durations[vid]
        if start > duration:
            skipped["start_after_end_of_video"] += 1
            continue
        if start > end:
            start, end = end, start
        if end > duration:
            end = duration
        s_idx, e_idx = _clip_index(start, duration, clip_len), _clip_index(end, duration, clip_len)
        queries.append(Query(qid=i, official_qid=None if train else i, video_id=vid, group=vid, duration=duration,
                             sentence=meta[1].rstrip(), where=where, moment=(start, end), start_idx=s_idx,
                             end_idx=e_idx))
    return queries, skipped


def _clip_index(t: float, duration: float, clip_len: float):
    """``int(t / clip_len)``, or the fraction ``t / duration`` when ``clip_len == -1`` (``charades.py`` L61-66)."""
    if clip_len == -1:
        return t / duration
    return int(t / clip_len)


def read_charades_json(path: Path, duration_key: str, clip_len: float, train: bool) -> tuple[list[Query], Counter]:
    """``CharadesCGDataset`` / ``CharadesCDDataset.load_annotations`` (``charades_cg.py`` L46-98,
    ``charades_cd.py`` L46-98): ``{vid: {timestamps, sentences, <duration_key>}}``.

    qid = a running count from 1 incremented **before** the ``start > duration`` skip, so skipped queries use a
    qid up; swap and clip as Charades-STA; always ``int(t / clip_len)`` (the readers ignore ``clip_len == -1``)."""
    if clip_len <= 0:
        raise JaxprvrError("clip_len", "> 0 (the Charades-CG/CD readers always use int(t / clip_len), "
                                       "charades_cg.py L90-91)", repr(clip_len))
    data = _load_json(Path(path), "the Charades-CG/CD annotation file")
    if not isinstance(data, dict):
        raise JaxprvrError(path, "a JSON object {video id: {...}}", type(data).__name__)
    queries, skipped, count = [], Counter(), 0
    for vid, meta in data.items():
        where = f"{path}[{vid!r}]"
        try:
            duration = float(meta[duration_key])
            timestamps, sentences = meta["timestamps"], meta["sentences"]
        except (KeyError, TypeError, ValueError):
            raise JaxprvrError(where, f"'timestamps', 'sentences' and a numeric '{duration_key}'",
                               f"keys {sorted(meta) if isinstance(meta, dict) else type(meta).__name__}") from None
        for i in range(len(timestamps)):
            count += 1
            start, end = float(timestamps[i][0]), float(timestamps[i][1])
            if start > duration:
                skipped["start_after_end_of_video"] += 1
                continue
            if start > end:
                start, end = end, start
            if end > duration:
                end = duration
            if i >= len(sentences):
                raise JaxprvrError(where, f"a sentence for each of the {len(timestamps)} timestamps",
                                   f"{len(sentences)} sentences")
            queries.append(Query(qid=count, official_qid=None if train else count, video_id=vid, group=vid,
                                 duration=duration, sentence=sentences[i], where=f"{where}[{i}]", moment=(start, end),
                                 start_idx=int(start / clip_len), end_idx=int(end / clip_len)))
    return queries, skipped


def read_tacos(path: Path, clip_len: float, train: bool) -> tuple[list[Query], Counter]:
    """``TACoSDataset.load_annotations`` (``tacos.py`` L43-88): ``{vid: {num_frames, fps, timestamps (frames),
    sentences}}``; duration = num_frames / fps.

    A query with ``start > end`` (in frames) is skipped (``start_after_end``) *before* the qid count (from 1) is
    incremented; times are ``[max(s / fps, 0), min(e / fps, duration)]``."""
    data = _load_json(Path(path), "the TACoS annotation file")
    if not isinstance(data, dict):
        raise JaxprvrError(path, "a JSON object {video id: {...}}", type(data).__name__)
    queries, skipped, count = [], Counter(), 0
    for vid, meta in data.items():
        where = f"{path}[{vid!r}]"
        try:
            fps = float(meta["fps"])
            duration = meta["num_frames"] / fps
            pairs = list(zip(meta["timestamps"], meta["sentences"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise JaxprvrError(where, "'num_frames', a non-zero 'fps', 'timestamps' and 'sentences'",
                               f"{meta!r}"[:200]) from None
        for k, (ts, sentence) in enumerate(pairs):
            if ts[0] > ts[1]:
                skipped["start_after_end"] += 1
                continue
            count += 1
            start, end = max(ts[0] / fps, 0), min(ts[1] / fps, duration)
            queries.append(Query(qid=count, official_qid=None if train else count, video_id=vid, group=vid,
                                 duration=duration, sentence=sentence, where=f"{where}[{k}]", moment=(start, end),
                                 start_idx=_clip_index(start, duration, clip_len),
                                 end_idx=_clip_index(end, duration, clip_len)))
    return queries, skipped


def read_qvhighlights(path: Path, labels: bool) -> tuple[list[Query], Counter]:
    """``QVHighlightsDataset.load_annotations`` (``qvhighlights.py`` L131-169): one JSON object per line; the
    YouTube id is ``vid.rsplit('_', 2)[0]`` and the window start its second field. ``labels``: the file has
    ``relevant_windows``, ``relevant_clip_ids`` and ``saliency_scores`` (all but the test release)."""
    queries = []
    with _open_text(Path(path), "the QVHighlights annotation file (jsonl)") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        where = f"{path}:{i + 1}"
        try:
            meta = json.loads(line.strip("\n"))
        except json.JSONDecodeError as e:
            raise JaxprvrError(where, "one JSON object per line", f"invalid JSON: {e}") from None
        try:
            parts = str(meta["vid"]).rsplit("_", 2)
            if len(parts) != 3:
                raise ValueError
            ytid, st = parts[0], float(parts[1])
            row = dict(qid=int(meta["qid"]), duration=float(meta["duration"]), sentence=meta["query"])
        except (KeyError, TypeError, ValueError):
            raise JaxprvrError(where, "'qid', 'query', 'duration' and 'vid' = '<youtube id>_<start>_<end>'",
                               line.strip()[:200]) from None
        q = Query(qid=row["qid"], official_qid=row["qid"], video_id=str(meta["vid"]), group=ytid,
                  duration=row["duration"], sentence=row["sentence"], where=where, video_start=st)
        if labels:
            try:
                q.relevant_windows = [list(map(float, w)) for w in meta["relevant_windows"]]
                q.relevant_clip_ids = [int(c) for c in meta["relevant_clip_ids"]]
                q.saliency_scores = [list(map(int, s)) for s in meta["saliency_scores"]]
            except (KeyError, TypeError, ValueError):
                raise JaxprvrError(where, "relevant_windows, relevant_clip_ids and saliency_scores",
                                   line.strip()[:200]) from None
            if len(q.relevant_clip_ids) != len(q.saliency_scores) or not q.relevant_clip_ids:
                raise JaxprvrError(where, "one saliency score triple per relevant clip id (at least one)",
                                   f"{len(q.relevant_clip_ids)} ids, {len(q.saliency_scores)} scores")
            if not q.relevant_windows:
                raise JaxprvrError(where, "at least one relevant window", "none")
        queries.append(q)
    return queries, Counter()


# ---------------------------------------------------------------------------------------------- features


class _H5Files(_OpenFiles):
    """:class:`jaxprvr.data.mmn_format`'s LRU of open hdf5 files, with the shapes of a split's videos and row reads."""

    WHAT = "a video feature hdf5 file (one (T, D) dataset per video id)"

    def shapes(self, path: Path, keys: Sequence[str]) -> dict[str, tuple]:
        with self._lock:
            f = self._get(path, self.WHAT)
            missing = [k for k in keys if k not in f]
            if missing:
                raise JaxprvrError(path, f"a dataset for every video of the split ({len(keys)})",
                                   f"{len(missing)} missing, e.g. {missing[:3]}")
            return {k: (tuple(f[k].shape), f[k].dtype) for k in keys}

    def read_rows(self, path: Path, key: str, rows: int | None = None) -> np.ndarray:
        with self._lock:
            f = self._get(path, self.WHAT)
            if key not in f:
                raise JaxprvrError(path, f"a dataset {key!r}", "no such key")
            return np.asarray(f[key][()] if rows is None else f[key][:rows])


def add_tef(feats: np.ndarray) -> np.ndarray:
    """``add_tef`` (``base.py`` L225-230): columns ``t / L`` and ``t / L + 1 / L`` in float32 (torch's
    ``arange(0, L, 1.0) / L`` and ``+ 1.0 / L`` with the scalar cast to float32)."""
    n = feats.shape[0]
    st = np.arange(n, dtype=np.float32) / np.float32(n)
    ed = st + np.float32(1.0 / n)
    return np.concatenate([feats, np.stack([st, ed], axis=1).astype(feats.dtype)], axis=1)


def sample_video_feat(feats: np.ndarray, max_video_l: int) -> np.ndarray:
    """``sample_video_feat`` (``base.py`` L100-114): unchanged when ``T <= max_video_l``, else averaged into
    ``max_video_l`` bins with edges ``round(arange(0, M + 1, 1.0) / M * T)`` in float32, clamped to ``T - 1``
    (a bin with ``s >= e`` is row ``s``) -- :func:`jaxprvr.data.sampling.average_to_fixed_length` exactly."""
    if feats.shape[0] > max_video_l:
        return average_to_fixed_length(feats, max_video_l)
    return feats


def video_pipeline(raw: Sequence[np.ndarray], max_video_l: int, *, truncate: bool, normalize: bool = True,
                   use_tef: bool = True) -> np.ndarray:
    """The files of one video -> the model's ``(L, sum(D) + 2)`` float32 input (``charades.py`` L108-119,
    ``base.py`` L164-171; ``qvhighlights.py`` L186-189, L305-315 with ``truncate``)."""
    feats = []
    for x in raw:
        if truncate:
            x = x[:max_video_l]
        x = np.asarray(x).astype(np.float32)
        feats.append(l2_normalize_rows(x) if normalize else x)
    n = min(len(x) for x in feats)
    out = np.concatenate([x[:n] for x in feats], axis=1)
    if not truncate:
        out = sample_video_feat(out, max_video_l)
    return add_tef(out) if use_tef else out


# ---------------------------------------------------------------------------------------------- labels


def clip_span(q: Query, length: int, raw_length: int, clip_len: float, rescale: bool = False) -> tuple[int, int]:
    """The GT clip span ``(s, e)`` (inclusive) of a query on a video of ``length`` (after pooling) clips
    (``base.py`` L172-186): ``clip_len == -1``: ``int(fraction * L)``; else the reader's ``int(t / clip_len)``,
    on the **raw** time axis even when the video was pooled (``rescale=True``: ``int(t / clip_len * L / T)``, the
    corrected behaviour); then ``e = min(e, L - 1)`` and ``s = min(s, e)``."""
    if clip_len == -1:
        s, e = int(q.start_idx * length), int(q.end_idx * length)
    elif rescale and raw_length > length:
        s = int(q.moment[0] / clip_len * length / raw_length)
        e = int(q.moment[1] / clip_len * length / raw_length)
    else:
        s, e = int(q.start_idx), int(q.end_idx)
    e = min(e, length - 1)
    s = min(s, e)
    return s, e


def contra_samples(rng: np.random.Generator, s: int, e: int, length: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` positive frames in ``[s, e]`` and ``k`` negative frames outside it (``base.py`` L191-204): without
    replacement when the pool is large enough, else with (official ``np.random.choice``; here ``rng.choice``).
    An empty negative pool (the moment covers the whole video) is the official crash (``ValueError``); the reader
    refuses such a query beforehand."""
    pos_pool = np.arange(s, e + 1)
    pos = rng.choice(pos_pool, k, replace=len(pos_pool) < k)
    neg_pool = np.hstack([np.arange(0, s), np.arange(e + 1, length)]).astype(np.int64)
    if len(neg_pool) == 0:
        raise JaxprvrError("contra_samples", "a moment that leaves at least one negative frame",
                           f"clips [{s}, {e}] of a {length}-clip video")
    neg = rng.choice(neg_pool, k, replace=len(neg_pool) < k)
    return pos.astype(np.int64), neg.astype(np.int64)


def qvh_saliency(rng: np.random.Generator, clip_ids: Sequence[int], scores: Sequence[Sequence[int]],
                 length: int) -> tuple[list[int], list[int], np.ndarray]:
    """``get_saliency_labels_all`` with max_n=1 and easy negatives (``qvhighlights.py`` L259-303).

    Saliency = the sum of the annotators' scores per relevant clip, float64, ``length`` long -- one longer when
    a clip id equals ``length`` (the array grows to ``ctx_l + 1``; a larger id or two such ids crash officially
    and are refused by the reader). Positives: the hard one (the highest sum, last of the ``np.argsort``) clipped
    to ``L - 1``, and an easy one drawn among the relevant ids (not clipped); negatives: the hard one (the lowest
    sum) and an easy one drawn among the other clips -- both hard ones again when no other clip exists. The
    official draws with ``random.sample`` from ``list(set(range(L)) - set(ids))``; here ``rng`` picks from the
    sorted pool."""
    agg = np.sum(np.array(scores), 1)
    order = np.argsort(agg)
    sal = np.zeros(length)
    for cid, value in zip(clip_ids, agg):
        if cid >= length:
            grown = np.zeros(length + 1)
            grown[:length] = sal[:length]
            sal = grown
        sal[cid] = value
    hard_pos = [min(clip_ids[order[-1]], length - 1)]
    hard_neg = [min(clip_ids[order[0]], length - 1)]
    pool = sorted(set(range(length)) - set(clip_ids))
    if len(pool) >= 1:
        easy_pos = [int(clip_ids[int(rng.integers(len(clip_ids)))])]
        easy_neg = [int(pool[int(rng.integers(len(pool)))])]
    else:
        easy_pos, easy_neg = hard_pos, hard_neg
    return hard_pos + easy_pos, hard_neg + easy_neg, sal


def qvh_windows(rng: np.random.Generator, windows: Sequence[Sequence[float]], length: int, clip_len: float,
                max_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """``get_span_labels`` (``qvhighlights.py`` L246-257): more than ``max_windows`` windows are shuffled and cut
    (the official shuffles the stored list in place; here a fresh ``rng`` permutation each time), then divided by
    ``L * clip_len`` in float32 (``L`` after truncation, so a short video's windows can exceed 1); returns the
    ``(n, 2)`` (st, ed) and (center, width) arrays."""
    windows = [list(w) for w in windows]
    if len(windows) > max_windows:
        windows = [windows[j] for j in rng.permutation(len(windows))][:max_windows]
    xx = np.asarray(windows, np.float32) / np.float32(length * clip_len)
    return xx, span_xx_to_cxw(xx)


def span_xx_to_cxw(xx: np.ndarray) -> np.ndarray:
    """``span_xx_to_cxw`` (``utils/span_utils.py`` L5-23): ``(sum * 0.5, ed - st)`` in the input dtype."""
    xx = np.asarray(xx)
    return np.stack([xx.sum(-1) * xx.dtype.type(0.5), xx[..., 1] - xx[..., 0]], axis=-1)


def pad_sequences_1d(sequences: Sequence[np.ndarray], dtype=None, fixed_length: int | None = None):
    """``pad_sequences_1d`` (``utils/data_utils.py`` L34-82) for numpy arrays: zero-padded ``(N, max_len, ...)``
    and the boolean mask of valid rows."""
    seqs = [np.asarray(s) for s in sequences]
    dtype = seqs[0].dtype if dtype is None else dtype
    lengths = [len(s) for s in seqs]
    n = fixed_length if fixed_length is not None else max(lengths)
    out = np.zeros((len(seqs), n) + seqs[0].shape[1:], dtype)
    mask = np.zeros((len(seqs), n), bool)
    for i, s in enumerate(seqs):
        out[i, :lengths[i]] = s
        mask[i, :lengths[i]] = True
    return out, mask


# ---------------------------------------------------------------------------------------------- text


@dataclass
class TextRow:
    """One query's tokens at the official widths (CLIP ids: 77, GloVe ids: max_words_l; glove.pkl: vectors)."""

    ids: np.ndarray | None  # int64
    vec: np.ndarray | None  # (max_words_l, 300) float32, the glove.pkl path
    weight: np.ndarray  # (max_words_l,) int64
    label: np.ndarray | None  # (max_words_l,) int64
    unknown: np.ndarray | None  # (max_words_l,) bool
    n_words: int


def _fit(x, n: int, dtype, where: str, what: str) -> np.ndarray:
    a = np.asarray(x, dtype)
    if a.ndim >= 2 and a.shape[0] == 1 and a.ndim == (3 if what == "words_vec" else 2):
        a = a[0]  # the official (1, L) tensors
    if a.shape[0] > n:
        if np.any(a[n:]):
            raise JaxprvrError(where, f"{what} of at most {n} entries (max_words_l)", f"{a.shape[0]} non-zero")
        a = a[:n]
    out = np.zeros((n,) + a.shape[1:], dtype)
    out[:a.shape[0]] = a
    return out


def text_row(enc: Mapping[str, Any], facts: VariantFacts, where: str) -> TextRow:
    """A tokenizer's ``encode`` dict -> :class:`TextRow`."""
    lw = facts.max_words_l
    label = enc.get("words_label")
    unknown = enc.get("unknown_mask")
    if facts.tokenizer_type == "GloVeNLTK" and facts.load_vocab_pkl:
        vec = enc.get("words_vec")
        if vec is None:
            raise JaxprvrError(where, "a words_vec entry from the glove.pkl tokenizer", sorted(enc))
        ids, vec = None, _fit(vec, lw, np.float32, where, "words_vec")
    else:
        width = CONTEXT_LENGTH if facts.tokenizer_type == "CLIP" else lw
        ids, vec = _fit(enc["words_id"], width, np.int64, where, "words_id"), None
    return TextRow(ids=ids, vec=vec, weight=_fit(enc["words_weight"], lw, np.int64, where, "words_weight"),
                   label=None if label is None else _fit(label, lw, np.int64, where, "words_label"),
                   unknown=None if unknown is None else _fit(unknown, lw, bool, where, "unknown_mask"),
                   n_words=int(enc.get("n_words", 0)))


def make_tokenizer(facts: VariantFacts, root, *, recfw: bool = True, pos_tagger: str = "nltk", **options):
    """The official tokenizer of ``facts``: :meth:`jaxprvr.text.mesm_tokenizer.MESMTokenizer.from_ann_path` on
    ``<root>/<ann_path>`` (``{CLIP,GloVe}_tokenized_count.txt``, Charades VGG's ``glove.pkl``), with
    ``glove_txt`` = ``<root>/<text_model_path>`` for TACoS's GloVe table. ``options``: the tokenizer's
    ``sentence_split``, ``nltk_tagger``, ``sent_tokenizer``, ``bpe_path``."""
    from jaxprvr.text.mesm_tokenizer import MESMTokenizer

    if facts.tokenizer_type == "GloVeNLTK" and not facts.load_vocab_pkl:
        options.setdefault("glove_txt", resolve(root, facts.text_model_path))
    return MESMTokenizer.from_ann_path(facts.tokenizer_type, resolve(root, facts.ann_path),
                                       max_words_l=facts.max_words_l, vocab_size=facts.vocab_size,
                                       load_vocab_pkl=facts.load_vocab_pkl, recfw=recfw, pos_tagger=pos_tagger,
                                       **options)


# ---------------------------------------------------------------------------------------------- items, batches


@dataclass(frozen=True)
class Item:
    """One dataset item: the rows (query indices, official order) of a video, a TACoS chunk or a QVH YouTube id."""

    index: int
    group: str
    rows: tuple[int, ...]


def gather_items(queries: Sequence[Query], max_gather_size: int, rng: np.random.Generator | None,
                 qvh: bool) -> list[tuple[int, ...]]:
    """``_gather_data_by_video_id`` (``base.py`` L116-162): queries grouped by ``group`` in order of first
    appearance; each group sorted by ``start_idx`` (QVH: ``video_start``; ``sorted`` is stable); with
    ``max_gather_size > 0`` the group is shuffled first (``rng``) and cut into chunks of that size, each sorted."""
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault(q.group, []).append(i)

    def key(i):
        return queries[i].video_start if qvh else queries[i].start_idx

    out = []
    for rows in groups.values():
        if max_gather_size > 0:
            rows = [rows[j] for j in rng.permutation(len(rows))]
            for a in range(0, len(rows), max_gather_size):
                out.append(tuple(sorted(rows[a:a + max_gather_size], key=key)))
        else:
            out.append(tuple(sorted(rows, key=key)))
    return out


def merges_last(n: int, batch_size: int) -> bool:
    """Whether :func:`plain_batches` of ``n`` items merges a single-item last batch into the previous one."""
    return n > batch_size and (n - 1) % batch_size == 0


def plain_batches(order: Sequence[int], batch_size: int) -> tuple[list[list[int]], int]:
    """A shuffled ``DataLoader(batch_size, drop_last=False)`` (``runner.py`` L95-98, L104-107): consecutive
    chunks of ``order``. A last batch of a single item is **merged into the previous batch** (officially it
    crashes in ``sample_outclass_neg``, ``utils/data_utils.py`` L113-124: a row needs a row of another item).
    Returns the batches and the number of merges (0 or 1)."""
    batches = [list(order[a:a + batch_size]) for a in range(0, len(order), batch_size)]
    if merges_last(len(order), batch_size):
        batches[-2].extend(batches.pop())
        return batches, 1
    return batches, 0


def split_gather_batches(items: Sequence[Item], batch_size: int, rng: np.random.Generator | None
                         ) -> tuple[list[list[int]], list[int]]:
    """``SplitGatherBatchSampler.__iter__`` (``base.py`` L233-279): one chunk per video per pass over the videos
    (shuffled per pass), a batch yielded when full (the pass restarts) or at the end of a pass with >= 2 chunks;
    a pass that ends with <= 1 chunk stops the epoch, **dropping** that chunk and every chunk left (officially
    silent; returned here as the second value). Two chunks of one video never share a batch."""
    groups: dict[str, list[int]] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it.index)
    lists = list(groups.values())
    if rng is not None:
        lists = [[g[j] for j in rng.permutation(len(g))] for g in lists]
    iters = [iter(g) for g in lists]
    group_idx = list(range(len(iters)))
    batches, batch = [], []
    while True:
        if rng is not None:
            group_idx = [group_idx[j] for j in rng.permutation(len(group_idx))]
        full = False
        for g in group_idx:
            nxt = next(iters[g], None)
            if nxt is None:
                continue
            batch.append(nxt)
            if len(batch) == batch_size:
                batches.append(batch)
                batch, full = [], True
                break
        if not full:
            if len(batch) <= 1:
                break
            batches.append(batch)
            batch = []
    dropped = batch + [i for it in iters for i in it]
    return batches, dropped


@dataclass(frozen=True)
class Capacities:
    """Static shapes of one split's batches (the contract of the MESM batch dict)."""

    rows: int  # R
    items: int  # G
    video: int  # Lv = max_video_l
    words: int  # Lw = max_words_l
    windows: int  # W: 1, or max_windows (QVHighlights)
    group_video: int = 0  # Lg: QVHighlights' per-group concatenated frames (0: not QVHighlights)
    contra: int = 2  # pos_idx / neg_idx columns


@dataclass
class MESMBatch:
    official: dict
    static: dict
    items: tuple[tuple[int, ...], ...]  # the rows (query indices) of each item, batch order


def to_static(official: Mapping[str, Any], caps: Capacities) -> dict:
    """The official collate dict -> the static padded dict (shapes from ``caps`` only).

    Every array is the official one zero-padded to the capacities (rows R, frames Lv, words Lw, windows W, items
    G); CLIP ids are cut from 77 to Lw (what lies past Lw must be 0). Added: ``span_mask``, ``row_group``,
    ``num_rows``, ``words_feat`` (the glove.pkl vectors, which the official passes as a 3-D ``words_id``) and,
    for QVHighlights (``caps.group_video > 0``), ``ss_video_feat``/``ss_video_mask``: per row, the valid frames
    of all rows of its item concatenated (``model.py`` L190-193, ``split_expand_and_pad``). Keys the official
    lacks (eval: the MLM labels; QVH test: the labels) are zeros. ``qid`` None (train) becomes -1."""
    R, G, Lv, Lw, W = caps.rows, caps.items, caps.video, caps.words, caps.windows
    qid = list(official["qid"])
    B = len(qid)
    num_clips = np.asarray(official["num_clips"], np.int64)
    vf, vm = np.asarray(official["video_feat"]), np.asarray(official["video_mask"])
    if B > R or len(num_clips) > G or vf.shape[1] > Lv:
        raise JaxprvrError("batch capacities", f"at most {R} rows, {G} items, {Lv} frames",
                           f"{B} rows, {len(num_clips)} items, {vf.shape[1]} frames",
                           hint="raise the capacities (open_mesm(capacities=...))")
    out: dict[str, np.ndarray] = {}

    def pad(name, x, shape, dtype):
        a = np.zeros(shape, dtype)
        x = np.asarray(x)
        if any(n > m for n, m in zip(x.shape, shape)):
            raise JaxprvrError(f"batch[{name!r}]", f"at most {shape}", f"{x.shape}")
        a[tuple(slice(0, n) for n in x.shape)] = x
        out[name] = a

    pad("video_feat", vf, (R, Lv) + vf.shape[2:], np.float32)
    pad("video_mask", vm, (R, Lv), bool)
    wid = np.asarray(official["words_id"])
    if wid.ndim == 3:
        pad("words_feat", wid[:, :Lw], (R, Lw, wid.shape[2]), np.float32)
        out["words_mask"] = np.abs(out["words_feat"]).sum(-1) != 0
    else:
        if wid.shape[1] > Lw and np.any(wid[:, Lw:]):
            raise JaxprvrError("batch['words_id']", f"no token past max_words_l={Lw}", "non-zero ids past it")
        pad("words_id", wid[:, :Lw], (R, Lw), np.int32)
        out["words_mask"] = out["words_id"] != 0
    pad("words_weight", official["words_weight"], (R, Lw), np.float32)
    pad("words_label", official.get("words_label", np.zeros((0, Lw))), (R, Lw), np.int32)
    pad("unknown_mask", official.get("unknown_mask", np.zeros((0, Lw))), (R, Lw), bool)
    pad("clip_mask", official.get("clip_mask", np.zeros((0, Lv))), (R, Lv), bool)
    k = caps.contra
    if k:
        pad("pos_idx", official.get("pos_idx", np.zeros((0, k))), (R, k), np.int32)
        pad("neg_idx", official.get("neg_idx", np.zeros((0, k))), (R, k), np.int32)
    nm = np.zeros((R, W, 2), np.float32)
    ns = np.zeros((R, W, 2), np.float32)
    sm = np.zeros((R, W), bool)
    if "norm_moment" in official:
        if isinstance(official["norm_moment"], (list, tuple)):  # QVHighlights: [dict(moments=(n, 2))] per row
            for r, (m, s) in enumerate(zip(official["norm_moment"], official["norm_span"])):
                m, s = np.asarray(m["moments"]), np.asarray(s["spans"])
                if len(m) > W:
                    raise JaxprvrError("batch['norm_moment']", f"at most {W} windows", f"{len(m)}")
                nm[r, :len(m)], ns[r, :len(s)], sm[r, :len(m)] = m, s, True
        else:
            nm[:B, 0], ns[:B, 0], sm[:B, 0] = official["norm_moment"], official["norm_span"], True
    out.update(norm_moment=nm, norm_span=ns, span_mask=sm)
    if caps.group_video:
        pad("saliency_label", official.get("saliency_label", np.zeros((0, Lv))), (R, Lv), np.float32)
    pad("num_clips", num_clips, (G,), np.int32)
    row_group = np.full((R,), -1, np.int32)
    row_group[:B] = np.repeat(np.arange(len(num_clips)), num_clips)
    out["row_group"] = row_group
    out["num_rows"] = np.asarray(B, np.int32)
    if caps.group_video:
        Lg = caps.group_video
        ss = np.zeros((R, Lg, vf.shape[2]), np.float32)
        ssm = np.zeros((R, Lg), bool)
        start = 0
        for n in num_clips:
            rows = range(start, start + int(n))
            frames = np.concatenate([vf[r][vm[r]] for r in rows], axis=0)
            if len(frames) > Lg:
                raise JaxprvrError("batch capacities", f"at most {Lg} frames per QVHighlights group",
                                   f"{len(frames)}")
            for r in rows:
                ss[r, :len(frames)] = frames
                ssm[r, :len(frames)] = True
            start += int(n)
        out.update(ss_video_feat=ss, ss_video_mask=ssm)
    pad("duration", official["duration"], (R,), np.float32)
    out["qid"] = np.full((R,), -1, np.int64)
    out["qid"][:B] = [-1 if q is None else int(q) for q in qid]
    return out


# ---------------------------------------------------------------------------------------------- replay files


def load_eval_batches(path) -> list[list]:
    """An ``--eval-batches`` file: a JSON list, one entry per batch, each a list of qids in row order (items are
    then the runs of consecutive rows of one video / YouTube id) or a list of lists of qids (explicit items)."""
    data = _load_json(Path(path), "an --eval-batches file (a JSON list of qid lists)")
    ok = isinstance(data, list) and all(isinstance(b, list) and b and (
        all(isinstance(q, int) for q in b) or all(isinstance(it, list) and it and all(isinstance(q, int) for q in it)
                                                  for it in b)) for b in data)
    if not ok:
        raise JaxprvrError(path, "a JSON list of non-empty qid lists (or of lists of qid lists)",
                           json.dumps(data)[:120])
    return data


def save_eval_batches(path, batches: Sequence) -> None:
    """Writes ``batches`` (each a list of qids, a list of item qid lists, or an official batch dict) as an
    ``--eval-batches`` file."""
    out = []
    for b in batches:
        if isinstance(b, Mapping):
            qids = [int(q) for q in b["qid"]]
            nc = [int(n) for n in np.asarray(b["num_clips"])]
            b = [qids[sum(nc[:i]):sum(nc[:i + 1])] for i in range(len(nc))]
        out.append([[int(q) for q in it] for it in b] if b and isinstance(b[0], (list, tuple)) else
                   [int(q) for q in b])
    Path(path).write_text(json.dumps(out) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- the split


class MESMSplit:
    """One split of one (dataset, variant), read and checked: queries, items, labels' fixed parts, capacities.

    Use :func:`open_mesm`. ``items`` are the official dataset items; :meth:`batches` yields :class:`MESMBatch`es
    (official + static dicts); :meth:`gt_rows` gives the ground-truth rows the metrics take."""

    def __init__(self, facts: VariantFacts, root, split: str, queries: list[Query], skipped: Counter,
                 held_out: int, *, rescale_labels: bool, tokenizer, check_features: bool, chunk_seed: int,
                 capacities: Capacities | Mapping | None, eval_batches, whole_video: str,
                 buckets: tuple[int, int] = (0, 0)):
        self.facts, self.root, self.split = facts, root, split
        given = dataclasses.asdict(capacities) if isinstance(capacities, Capacities) else dict(capacities or {})
        # rows / frames of each batch rounded up to these multiples (0: the split's static capacity); an axis whose
        # capacity was given stays fixed (one compiled program for every batch)
        self.buckets = (0 if "rows" in given else max(int(buckets[0]), 0),
                        0 if "video" in given else max(int(buckets[1]), 0))
        self.queries, self.skipped, self.held_out = queries, skipped, held_out
        self.rescale_labels = rescale_labels
        self.recfw = facts.rec_fw and split == "train"
        self.labels = not (facts.qvh and split == "test")
        self._h5 = _H5Files()
        self.files = [resolve(root, p) for p in facts.feat_files]
        self.last_stats: dict = {}
        if not queries:
            raise JaxprvrError(self._ann_file(), f"at least one query in the {split} split", "none")
        # Video lengths (T raw rows, L model rows) from the hdf5 shapes; missing keys / widths are errors now.
        self.raw_length: dict[str, int] = {}
        self.length: dict[str, int] = {}
        if check_features:
            self._read_lengths()
            self._check_labels(whole_video)
        rng = np.random.default_rng([chunk_seed, zlib.crc32(split.encode())])
        rows = gather_items(self.queries, facts.max_gather_size, rng, facts.qvh)
        self.items = [Item(i, self.queries[r[0]].group, r) for i, r in enumerate(rows)]
        if not self.items:
            raise JaxprvrError(self._ann_file(), f"at least one query left in the {split} split",
                               f"none (skipped: {dict(self.skipped)})")
        # Text: each distinct sentence tokenized once (tokenize_all when the tokenizer has it: corpus counts).
        self.text: list[TextRow] = []
        self.text_summary = ""
        if tokenizer is not None:
            first = {}
            for q in self.queries:
                first.setdefault(q.sentence, q.where)
            uniq = list(first)
            if hasattr(tokenizer, "tokenize_all"):
                tq = tokenizer.tokenize_all(uniq)
                self.text_summary = tq.summary()
                encs = [{k: v[i] for k, v in tq.arrays.items()} for i in range(len(uniq))]
            else:
                encs = [tokenizer.encode(s) for s in uniq]
            rows = {s: text_row(e, facts, first[s]) for s, e in zip(uniq, encs)}
            self.text = [rows[q.sentence] for q in self.queries]
        self.replay = None
        if eval_batches is not None:
            raw = load_eval_batches(eval_batches) if isinstance(eval_batches, (str, Path)) else eval_batches
            self.replay = self._replay_items(raw, eval_batches if isinstance(eval_batches, (str, Path)) else
                                             "eval_batches")
        self._caps = {mode: self._capacities(mode, capacities) for mode in (True, False)}

    # -- reading ---------------------------------------------------------------------------------
    def _ann_file(self) -> Path:
        return resolve(self.root, self.facts.ann_path) / self.facts.split_file(self.split)

    def _read_lengths(self) -> None:
        keys = sorted({q.video_id for q in self.queries})
        per_file = []
        for path, dim in zip(self.files, self.facts.feat_dims):
            shapes = self._h5.shapes(path, keys)
            for k, (shape, dtype) in shapes.items():
                if len(shape) != 2 or shape[1] != dim or shape[0] < 1:
                    raise JaxprvrError(f"{path}[{k!r}]", f"a (T >= 1, {dim}) feature array", f"shape {shape}")
                if not np.issubdtype(dtype, np.floating):
                    raise JaxprvrError(f"{path}[{k!r}]", "floating-point features", str(dtype))
            per_file.append(shapes)
        m = self.facts.max_video_l
        for k in keys:
            rows = [s[k][0][0] for s in per_file]
            if self.facts.qvh:
                rows = [min(r, m) for r in rows]
            t = min(rows)
            self.raw_length[k] = t
            self.length[k] = t if self.facts.qvh else min(t, m)

    def _check_labels(self, whole_video: str) -> None:
        """Refuses (or, with ``whole_video='skip'``, skips and counts) what crashes officially at batch time."""
        f = self.facts
        keep = []
        for q in self.queries:
            L = self.length[q.video_id]
            if f.qvh:
                if q.relevant_clip_ids is not None:
                    beyond = [c for c in q.relevant_clip_ids if c >= L]
                    if beyond and (max(beyond) > L or len(beyond) > 1 or L + 1 > f.max_video_l):
                        raise JaxprvrError(q.where, f"relevant_clip_ids below the video's {L} feature rows (one id "
                                                    f"equal to {L} is tolerated, qvhighlights.py L276-283)",
                                           f"{beyond}", hint="the official code crashes on this query")
                keep.append(q)
                continue
            s, e = clip_span(q, L, self.raw_length[q.video_id], f.clip_len, self.rescale_labels)
            if f.contra_samples > 0 and s == 0 and e == L - 1:
                if whole_video == "skip":
                    self.skipped["moment_covers_whole_video"] += 1
                    continue
                raise JaxprvrError(q.where, "a moment that leaves a negative frame outside it",
                                   f"clips [{s}, {e}] of a {L}-clip video ({q.video_id}): the moment covers the whole "
                                   f"video", hint="the official code crashes here (np.random.choice on an empty "
                                   "negative pool, base.py L199-204); whole_video='skip' skips and counts such queries")
            keep.append(q)
        self.queries = keep

    def video_features(self, vid: str) -> np.ndarray:
        """The ``(L, v_feat_dim + 2)`` float32 model input of one video (a QVH window)."""
        f = self.facts
        raw = []
        for path, dim in zip(self.files, f.feat_dims):
            x = self._h5.read_rows(path, vid, f.max_video_l if f.qvh else None)
            if x.ndim != 2 or x.shape[1] != dim or x.shape[0] < 1:
                raise JaxprvrError(f"{path}[{vid!r}]", f"a (T >= 1, {dim}) feature array", f"shape {x.shape}")
            if not np.isfinite(x).all():
                bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
                raise JaxprvrError(f"{path}[{vid!r}]", "finite features", f"NaN/Inf in row {bad}")
            raw.append(x)
        out = video_pipeline(raw, f.max_video_l, truncate=f.qvh, normalize=f.normalize_video, use_tef=f.use_tef)
        if vid not in self.raw_length:
            self.raw_length[vid] = min(len(x) for x in raw)
            self.length[vid] = out.shape[0]
        return out

    # -- public ----------------------------------------------------------------------------------
    @property
    def n_queries(self) -> int:
        return len(self.queries)

    def gt_rows(self) -> list[dict]:
        """The ground truth the metrics take, in file order: ``qid, query, vid, duration, relevant_windows``
        (QVHighlights: the jsonl fields incl. ``relevant_clip_ids``, ``saliency_scores``; ``vid`` the window)."""
        if not self.labels:
            raise JaxprvrError(self._ann_file(), "ground truth (relevant_windows)", "the test release has none",
                               hint="use the split test_with_gt (highlight_test_with_gt.jsonl)")
        rows = []
        for q in self.queries:
            row = dict(qid=q.qid, query=q.sentence, vid=q.video_id, duration=q.duration)
            if self.facts.qvh:
                row.update(relevant_windows=[list(w) for w in q.relevant_windows],
                           relevant_clip_ids=list(q.relevant_clip_ids),
                           saliency_scores=[list(s) for s in q.saliency_scores])
            else:
                row["relevant_windows"] = [list(q.moment)]
            rows.append(row)
        return rows

    def capacities(self, train: bool) -> Capacities:
        return self._caps[bool(train)]

    def _capacities(self, train: bool, given) -> Capacities:
        """Rows: the ``G`` largest items together (``G`` = the batch size, + 1 where a single-item last batch
        merges); Lv: the split's longest video; Lg: the largest item's frames (QVH); with a replay, what its batches
        need."""
        f = self.facts
        replay = not train and self.replay is not None
        if replay:
            batches = self.replay
        else:
            bs, n = (f.batch_size if train else f.eval_batch_size), len(self.items)
            merge = (not train or f.max_gather_size <= 0) and merges_last(n, bs)
            biggest = sorted(self.items, key=lambda it: -len(it.rows))[:min(n, bs + int(merge))]
            batches = [[it.rows for it in biggest]]
        lg = 0
        if f.qvh:
            pool = batches if replay else [[it.rows] for it in self.items]
            lg = max(sum(self.length.get(self.queries[r].video_id, f.max_video_l) for r in rows)
                     for b in pool for rows in b)
        # Lv: the split's longest video (after pooling), rounded up to 8, at most max_video_l (padding frames are
        # masked everywhere, so the length only costs compute; the official loader pads to the batch's longest)
        longest = max(self.length.values()) if self.length else f.max_video_l
        caps = Capacities(rows=max(sum(len(r) for r in b) for b in batches), items=max(len(b) for b in batches),
                          video=min(f.max_video_l, -(-longest // 8) * 8), words=f.max_words_l, windows=f.max_windows if f.qvh else 1,
                          group_video=lg, contra=2 if f.qvh else max(f.contra_samples, 0))
        if given:
            given = dataclasses.asdict(given) if isinstance(given, Capacities) else dict(given)
            caps = dataclasses.replace(caps, **given)
        return caps

    def _replay_items(self, raw: list, where) -> list[list[tuple[int, ...]]]:
        by_qid: dict[int, int] = {}
        for i, q in enumerate(self.queries):
            by_qid.setdefault(q.qid, i)
        if len(by_qid) != len(self.queries):
            raise JaxprvrError(self._ann_file(), "unique qids (for --eval-batches)", "repeated qids")
        seen, out = set(), []
        for b, batch in enumerate(raw):
            explicit = isinstance(batch[0], list)
            rows = [by_qid.get(q) for it in (batch if explicit else [batch]) for q in it]
            qids = [q for it in (batch if explicit else [batch]) for q in it]
            for q, r in zip(qids, rows):
                if r is None:
                    raise JaxprvrError(where, f"qids of the {self.split} split", f"qid {q} (batch {b})")
                if r in seen:
                    raise JaxprvrError(where, "each qid once", f"qid {q} again (batch {b})")
                seen.add(r)
            if explicit:
                items, k = [], 0
                for it in batch:
                    items.append(tuple(rows[k:k + len(it)]))
                    k += len(it)
            else:
                items = []
                for r in rows:
                    if items and self.queries[items[-1][-1]].group == self.queries[r].group:
                        items[-1] = items[-1] + (r,)
                    else:
                        items.append((r,))
            for it in items:
                if len({self.queries[r].group for r in it}) != 1:
                    raise JaxprvrError(where, "items of one video each", f"batch {b} mixes videos in an item")
            if len(items) < 2:
                raise JaxprvrError(where, "at least 2 items (videos) per batch (sample_outclass_neg)",
                                   f"batch {b} has {len(items)}")
            out.append(items)
        if len(seen) != len(self.queries):
            missing = next(q.qid for i, q in enumerate(self.queries) if i not in seen)
            raise JaxprvrError(where, f"all {len(self.queries)} queries of the {self.split} split",
                               f"{len(seen)} (missing e.g. qid {missing})")
        return out

    def batch_plan(self, rng=None, train: bool = False) -> tuple[list[list[tuple[int, ...]]], np.random.Generator]:
        """The batches of one epoch (each a list of items' rows) and the generator that draws their labels.

        ``rng``: None keeps the file order (labels from ``facts.seed``); an int seeds a fresh generator; a
        Generator is used as it is. Training: ``SplitGatherBatchSampler`` when ``max_gather_size > 0`` (dropped
        chunks counted in :attr:`last_stats`), else a shuffled plain loader; evaluation: a shuffled plain loader
        of ``eval_batch_size`` items (the official eval loaders shuffle too), or the ``eval_batches`` replay."""
        shuffle = rng is not None
        if rng is None:
            rng = np.random.default_rng(self.facts.seed)
        elif not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        f = self.facts
        stats = dict(merged_single_item_batches=0, dropped_items=0, dropped_rows=0)
        if not train and self.replay is not None:
            plan = [list(b) for b in self.replay]
        else:
            if len(self.items) < 2:
                raise JaxprvrError(self._ann_file(), "at least 2 items (videos) to form a batch (sample_outclass_neg)",
                                   f"{len(self.items)}")
            if train and f.max_gather_size > 0:
                idx, dropped = split_gather_batches(self.items, f.batch_size, rng if shuffle else None)
                stats.update(dropped_items=len(dropped), dropped_rows=sum(len(self.items[i].rows) for i in dropped))
            else:
                order = rng.permutation(len(self.items)) if shuffle else np.arange(len(self.items))
                idx, merged = plain_batches([int(i) for i in order], f.batch_size if train else f.eval_batch_size)
                stats["merged_single_item_batches"] = merged
            plan = [[self.items[i].rows for i in b] for b in idx]
        stats["batches"] = len(plan)
        self.last_stats = stats
        return plan, rng

    def batches(self, rng=None, train: bool = False) -> Iterator[MESMBatch]:
        """The batches of one epoch as :class:`MESMBatch` (official + static dicts); see :meth:`batch_plan`."""
        if not self.text:
            raise JaxprvrError("open_mesm", "a tokenizer (batches need the text)", "tokenizer=None")
        plan, rng = self.batch_plan(rng, train)
        seeds = rng.integers(0, 2 ** 63 - 1, size=len(plan))
        caps = self.capacities(train)

        def gen():
            for items, seed in zip(plan, seeds):
                official = self.collate(items, np.random.default_rng(int(seed)))
                yield MESMBatch(official=official, static=to_static(official, self.batch_capacities(official, caps)),
                                items=tuple(items))

        return gen()

    def batch_capacities(self, official: Mapping, caps: Capacities) -> Capacities:
        """``caps`` with the rows and frames of this batch rounded up to the :attr:`buckets` multiples (never past
        the split's capacity): a few static shapes instead of one worst case -- the official loader pads to each
        batch's longest video, and padding rows and frames are masked everywhere, so only the compute changes."""
        br, bv = self.buckets
        if not (br or bv):
            return caps
        rows, video = len(official["qid"]), int(np.shape(official["video_feat"])[1])
        return dataclasses.replace(caps, rows=min(caps.rows, -(-rows // br) * br) if br else caps.rows,
                                   video=min(caps.video, -(-video // bv) * bv) if bv else caps.video)

    def collate(self, items: Sequence[Sequence[int]], rng: np.random.Generator) -> dict:
        """The official collate dict of one batch (``base.py`` L288-355 + ``prepare_batch_input`` L379-384;
        QVHighlights ``qvhighlights.py`` L171-244, L318-388), numpy, the official dtypes and dynamic shapes."""
        f = self.facts
        if f.qvh:
            return self._collate_qvh(items, rng)
        feats, rows, spans, pos, neg = [], [], [], [], []
        for it in items:
            vid = self.queries[it[0]].video_id
            x = self.video_features(vid)
            L, T = x.shape[0], self.raw_length[vid]
            for r in it:
                q = self.queries[r]
                s, e = clip_span(q, L, T, f.clip_len, self.rescale_labels)
                if f.contra_samples > 0:
                    try:
                        p, n = contra_samples(rng, s, e, L, f.contra_samples)
                    except JaxprvrError:
                        raise JaxprvrError(q.where, "a moment that leaves a negative frame outside it",
                                           f"clips [{s}, {e}] of a {L}-clip video") from None
                    pos.append(p)
                    neg.append(n)
                feats.append(x)
                rows.append(r)
                spans.append((s, e, L))
        out = self._text_and_common(items, rows, feats)
        out["moment"] = np.asarray([self.queries[r].moment for r in rows], np.float32)
        out["start_idx"] = np.asarray([s for s, _, _ in spans], np.int64)
        out["end_idx"] = np.asarray([e for _, e, _ in spans], np.int64)
        masks = []
        for s, e, L in spans:
            m = np.zeros(L, bool)
            m[s:e + 1] = True
            masks.append(m)
        out["clip_mask"], _ = pad_sequences_1d(masks, bool)
        if f.contra_samples > 0:
            out["pos_idx"], out["neg_idx"] = np.stack(pos), np.stack(neg)
        out["qid"] = [self.queries[r].official_qid for r in rows]
        out["video_id"] = [self.queries[r].video_id for r in rows]
        out["sentence"] = [self.queries[r].sentence for r in rows]
        out["norm_moment"] = out["moment"] / out["duration"][:, None]
        out["norm_span"] = span_xx_to_cxw(out["norm_moment"])
        return out

    def _text_and_common(self, items, rows, feats) -> dict:
        out = {"num_clips": np.asarray([len(it) for it in items], np.int64)}
        out["video_feat"], out["video_mask"] = pad_sequences_1d(feats, np.float32)
        out["duration"] = np.asarray([self.queries[r].duration for r in rows], np.float32)
        text = [self.text[r] for r in rows]
        if text[0].vec is not None:
            out["words_id"] = np.stack([t.vec for t in text])
            out["words_mask"] = None
        else:
            out["words_id"] = np.stack([t.ids for t in text])
            out["words_mask"] = out["words_id"] != 0
        out["words_weight"] = np.stack([t.weight for t in text])
        if self.recfw:
            if any(t.label is None for t in text):
                raise JaxprvrError("tokenizer", "words_label and unknown_mask for the train split (rec_fw)", "None")
            out["unknown_mask"] = np.stack([t.unknown for t in text])
            out["words_label"] = np.stack([t.label for t in text])
        return out

    def _collate_qvh(self, items, rng) -> dict:
        f = self.facts
        feats, rows, nms, nss, pos, neg, sal, cm = [], [], [], [], [], [], [], []
        for it in items:
            for r in it:
                q = self.queries[r]
                x = self.video_features(q.video_id)
                L = x.shape[0]
                feats.append(x)
                rows.append(r)
                if self.labels:
                    m, s = qvh_windows(rng, q.relevant_windows, L, f.clip_len, f.max_windows)
                    p, n, a = qvh_saliency(rng, q.relevant_clip_ids, q.saliency_scores, L)
                    nms.append(dict(moments=m))
                    nss.append(dict(spans=s))
                    pos.append(np.asarray(p, np.int64))
                    neg.append(np.asarray(n, np.int64))
                    sal.append(a)
                    cm.append(a != 0)
        out = self._text_and_common(items, rows, feats)
        if self.labels:
            out["norm_moment"], out["norm_span"] = nms, nss
            out["saliency_label"], _ = pad_sequences_1d(sal, np.float64)
            out["clip_mask"], _ = pad_sequences_1d(cm, bool)
            if f.contra_samples > 0:
                out["pos_idx"], out["neg_idx"] = np.stack(pos), np.stack(neg)
        out["qid"] = [self.queries[r].official_qid for r in rows]
        out["video_id"] = [self.queries[r].video_id for r in rows]
        out["sentence"] = [self.queries[r].sentence for r in rows]
        return out

    def close(self) -> None:
        self._h5.close()


def read_split(facts: VariantFacts, root, split: str, *, val_seed: int = 0) -> tuple[list[Query], Counter, int]:
    """The queries of ``split`` (readers above), the skip counts, and (``val`` derived from train) nothing held
    out. The derived ``val`` of Charades/Charades-CG is a seeded ``val_from_train`` fraction of the train videos
    (:func:`val_videos`); the train split keeps every video unless :func:`open_mesm` is told ``val_holdout``."""
    ann = resolve(root, facts.ann_path)
    path = ann / facts.split_file(split)
    train_like = split == "train"
    derived_val = split == "val" and facts.val_from_train > 0
    if facts.dataset == "charades":
        csv_name = "Charades_v1_test.csv" if split == "test" else "Charades_v1_train.csv"
        durations = read_charades_durations(ann / csv_name)
        queries, skipped = read_charades_sta(path, durations, facts.clip_len, train_like, str(ann / csv_name))
    elif facts.dataset in ("charades_cg", "charades_cd"):
        key = "duration" if facts.dataset == "charades_cg" else "video_duration"
        queries, skipped = read_charades_json(path, key, facts.clip_len, train_like)
    elif facts.dataset == "tacos":
        queries, skipped = read_tacos(path, facts.clip_len, train_like)
    else:
        queries, skipped = read_qvhighlights(path, labels=split != "test")
    if derived_val:
        chosen = val_videos(queries, facts.val_from_train, val_seed)
        queries = [q for q in queries if q.group in chosen]
        for q in queries:
            q.official_qid = q.qid
    return queries, skipped, 0


def val_videos(train_queries: Sequence[Query], fraction: float, seed: int) -> set[str]:
    """The held-out videos: ``max(1, round(fraction * n))`` of the ``n`` train videos (first-appearance order)
    picked by ``np.random.default_rng(seed).permutation``."""
    vids = list(dict.fromkeys(q.group for q in train_queries))
    k = max(1, int(round(fraction * len(vids))))
    perm = np.random.default_rng(seed).permutation(len(vids))
    return {vids[i] for i in perm[:k]}


def open_mesm(dataset: str, variant: str | None = None, root=None, split: str = "train", *, tokenizer=None,
              pos_tagger: str = "nltk", text_options: Mapping | None = None, val_holdout: bool = False,
              val_seed: int = 0, rescale_labels: bool = False, whole_video: str = "error", chunk_seed: int | None = None, capacities=None, eval_batches=None,
              check_features: bool = True, text: bool = True, buckets: tuple[int, int] = (0, 0),
              **overrides) -> MESMSplit:
    """Opens ``split`` of ``(dataset, variant)`` under ``root`` (the official working directory).

    * ``overrides``: any :class:`VariantFacts` field (``feat_dims`` for reduced-width files, ``max_video_l``,
      ``batch_size``, ...);
    * ``tokenizer``: an object with ``encode(sentence) -> dict`` (and optionally ``tokenize_all``); default
      :func:`make_tokenizer` with ``pos_tagger`` ("nltk" | "rule" | "none") and ``text_options``
      (``sentence_split``, ...), MLM labels on the train split only (official ``recfw``); ``text=False`` skips the
      text (``batches`` then refuses);
    * ``val_holdout``: the train split without the derived val videos (Charades, Charades-CG; honest selection);
    * ``rescale_labels``: the corrected label mapping after pooling (official: not rescaled);
    * ``whole_video``: ``"error"`` (official: a crash) or ``"skip"`` (counted) for moments covering the video;
    * ``chunk_seed``: the TACoS chunking (default ``facts.seed``); ``capacities``: overrides of the static shapes;
    * ``eval_batches``: a replay file (or list) of the evaluation batches, qids in row order;
    * ``buckets``: ``(rows, frames)`` multiples each batch's static shape is rounded up to (0: the split's
      capacity; :meth:`MESMSplit.batch_capacities`)."""
    facts = variant_facts(dataset, variant, **overrides)
    if whole_video not in ("error", "skip"):
        raise JaxprvrError("whole_video", "'error' or 'skip'", repr(whole_video))
    facts.split_file(split)
    if split == "val" and facts.val_from_train <= 0 and dataset in ("charades", "charades_cg"):
        raise JaxprvrError("val_from_train", "> 0 for the derived val split", repr(facts.val_from_train))
    queries, skipped, held = read_split(facts, root, split, val_seed=val_seed)
    if val_holdout and split == "train" and facts.val_from_train > 0:
        chosen = val_videos(queries, facts.val_from_train, val_seed)
        before = len(queries)
        queries = [q for q in queries if q.group not in chosen]
        held = before - len(queries)
    if text and tokenizer is None:
        tokenizer = make_tokenizer(facts, root, recfw=facts.rec_fw and split == "train", pos_tagger=pos_tagger,
                                   **dict(text_options or {}))
    return MESMSplit(facts, root, split, queries, skipped, held, rescale_labels=rescale_labels,
                     tokenizer=tokenizer if text else None, check_features=check_features,
                     chunk_seed=facts.seed if chunk_seed is None else chunk_seed, capacities=capacities,
                     eval_batches=eval_batches, whole_video=whole_video, buckets=buckets)


__all__ = ["DATASETS", "DEFAULT_VARIANT", "VARIANTS", "VariantFacts", "variant_facts", "Query", "Item",
           "Capacities", "MESMBatch", "MESMSplit", "open_mesm", "to_static", "load_eval_batches",
           "save_eval_batches", "read_charades_sta", "read_charades_durations", "read_charades_json", "read_tacos",
           "read_qvhighlights", "read_split", "val_videos", "gather_items", "plain_batches", "split_gather_batches",
           "clip_span", "contra_samples", "qvh_saliency", "qvh_windows", "span_xx_to_cxw", "pad_sequences_1d",
           "sample_video_feat", "add_tef", "video_pipeline", "text_row", "TextRow", "make_tokenizer"]
