"""Synthetic MESM datasets in the exact official on-disk layout (lntzm/MESM ``data/``, ``pretrained_models/``),
with a planted, learnable localisation signal.

:func:`write` creates, under ``out_dir`` (a ``--data-root``: the official working directory), the files that
:func:`jaxprvr.data.mesm.open_mesm` -- and the official ``dataset/*.py`` -- read for one (dataset, variant):

* ``charades`` -- ``data/charades/annotations/charades_sta_{train,test}.txt`` (``vid start end##sentence``, one
  decimal), ``Charades_v1_{train,test}.csv`` (the 11 official columns, ``length`` last),
  ``{CLIP,GloVe}_tokenized_count.txt``; C+SF_C: ``data/charades/clip_image.hdf5`` (T, 512) and ``slowfast.hdf5``
  (T or T + 1, 2304; one clip per second); VGG_GloVe: ``data/charades/vgg.hdf5`` (T, 4096; one per 0.17 s, some
  videos past 600 rows, so pooled) and CPL's ``data/charades/annotations/glove.pkl``
  (``{'w2id', 'id2vec', 'counter'}``, ``<PAD>`` = 0);
* ``charades_cg`` / ``charades_cd`` -- ``data/Charades-CG/{train,novel_composition,novel_word,test_trivial}.json``
  / ``data/Charades-CD/charades_{train,val,test_iid,test_ood}.json`` and the Charades C+SF features;
  ``CLIP_tokenized_count.txt`` is a symlink to ``../charades/annotations/CLIP_tokenized_count.txt``, as shipped;
* ``qvhighlights`` -- ``data/qvhighlights/annotations/highlight_{train,val,test}_release.jsonl`` (the test release
  without labels) and ``highlight_test_with_gt.jsonl``, ``CLIP_tokenized_count.txt``; 150-s windows
  ``<ytid>_<st>_<ed>`` with 75 clips of 2 s (``data/qvhighlights/{clip_image,slowfast}.hdf5``), windows in
  multiples of 2 s, 3 annotators' saliency scores (0-4) per relevant clip;
* ``tacos`` -- ``data/TACoS/annotations/{train,val,test}.json`` (``num_frames``, ``fps`` 29.4, timestamps in
  frames), ``{CLIP,GloVe}_tokenized_count.txt``, ``data/TACoS/c3d.hdf5`` (T, 4096; some videos past 600 rows) and
  ``pretrained_models/glove.6B.300d.txt`` (``word v1 .. v300``; a few vocabulary words left out, as in real data).

The count files are computed as ``data/tokenized_count.py`` does, over the train split and the test splits
(CLIP: the BPE ids of ``[SOT] + 14 tokens + [EOT]`` minus SOT/EOT; GloVe: lower-cased, punctuation to spaces,
``word <Vocabulary id> count``; both sorted by count, ties in first-appearance order; Charades lines with
``start > duration`` are left out as the script does).

The signal. There are 12 actions (a verb and an object). Each feature file has one random unit direction per
action; a frame is ``noise + 0.5 scene + 2 direction(a)`` for every action ``a`` whose moment contains the frame's
centre (``noise`` ~ N(0, I/D), ``scene`` one vector per video), so the frames of a GT moment point towards its
action. Each caption names its action's verb and object ("a person opens the door."), and the GloVe vectors of an
action's words are close to a per-action vector, so a model can localise a query. Moment lengths (15-40 % of a
video) and positions vary; every moment starts after 3 % of the video (never a whole-video moment). Odd cases as in
the real files: a line with ``start > duration`` (skipped), one with ``start > end`` (swapped), one ending past the
video (clipped); TACoS: a ``start > end`` timestamp (skipped) and a video with 13 queries (a chunk > 10); QVH: a
query with 6 windows (cut to 5), a window with 74 feature rows whose last clip id is 74 (the saliency array grows),
a YouTube id containing ``_``.

    python -m jaxprvr.data.synthetic --dataset charades --model mesm [--variant VGG_GloVe] --out D

:func:`demo_root` creates (once, atomically) and returns a cached demo dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import string
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from jaxprvr.cli import run_cli
from jaxprvr.data.mesm import DATASETS, DEFAULT_VARIANT, VARIANTS, variant_facts
from jaxprvr.data.mmn_format import resolve
from jaxprvr.errors import JaxprvrError

MARKER = "jaxprvr_synthetic.json"  # in <ann_path>/, written last
DEMO_VERSION = 1
SIGNAL = 2.0
SCENE = 0.5
GLOVE_DIM = 300
ACTIONS = (("opens", "door"), ("closes", "window"), ("eats", "sandwich"), ("drinks", "coffee"), ("reads", "book"),
           ("washes", "dishes"), ("sweeps", "floor"), ("folds", "towel"), ("cooks", "food"), ("throws", "pillow"),
           ("holds", "phone"), ("cuts", "vegetables"))
SUBJECTS = ("a person", "the person", "person", "someone")
# GloVe words deliberately absent from glove.6B.300d.txt / glove.pkl (the <UNK> / dropped-word paths)
MISSING_GLOVE = ("someone",)
DEMO_SIZES = {
    "charades": {"train": 60, "test": 20},
    "charades_cg": {"train": 60, "novel_composition": 12, "novel_word": 10, "test_trivial": 10},
    "charades_cd": {"train": 60, "val": 10, "test_iid": 10, "test_ood": 12},
    "qvhighlights": {"train": 30, "val": 10, "test": 10},
    "tacos": {"train": 10, "val": 4, "test": 4},
}
_ALNUM = string.ascii_uppercase + string.digits
_CSV_HEADER = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"


def _stem(path: str) -> str:
    return Path(path).name.split(".")[0]


class _Gen:
    """The fixed random parts of one synthetic dataset: action directions per feature file, word vectors."""

    def __init__(self, seed: int, dims: dict[str, int]):
        rng = np.random.default_rng([seed, 0])
        self.dirs = {}
        for name, d in dims.items():
            u = rng.standard_normal((len(ACTIONS), d))
            self.dirs[name] = u / np.linalg.norm(u, axis=1, keepdims=True)
        self.action_vec = rng.standard_normal((len(ACTIONS), GLOVE_DIM)) * 0.4
        self.rng_words = np.random.default_rng([seed, 1])
        self._word_vec: dict[str, np.ndarray] = {}

    def word_vector(self, word: str) -> np.ndarray:
        """A GloVe-like vector: near its action's vector for verbs and objects, random otherwise (cached)."""
        if word not in self._word_vec:
            v = self.rng_words.standard_normal(GLOVE_DIM) * 0.3
            for a, (verb, obj) in enumerate(ACTIONS):
                if word in (verb, obj):
                    v = v * 0.3 + self.action_vec[a]
            self._word_vec[word] = v.astype(np.float32)
        return self._word_vec[word]

    def frames(self, rng, name: str, n: int, clip_dur: float, moments, scene_seed) -> np.ndarray:
        """``n`` frames of ``clip_dur`` seconds of feature file ``name``: noise + scene + the active actions."""
        d = self.dirs[name].shape[1]
        x = rng.standard_normal((n, d)) / math.sqrt(d)
        x += SCENE * np.random.default_rng(scene_seed).standard_normal(d) / math.sqrt(d)
        centres = (np.arange(n) + 0.5) * clip_dur
        for a, s, e in moments:
            x[(centres >= s) & (centres <= e)] += SIGNAL * self.dirs[name][a]
        return x


def _caption(rng, a: int) -> str:
    verb, obj = ACTIONS[a]
    return f"{SUBJECTS[int(rng.integers(len(SUBJECTS)))]} {verb} the {obj}."


def _segments(rng, duration: float, n: int, lo=0.15, hi=0.4, min_start: float = 0.0) -> list[tuple[float, float]]:
    """``n`` non-overlapping segments (start, end) in seconds, each after 3 % of the video and ``min_start``."""
    head = max(0.03, min_start / duration)
    lengths = rng.uniform(lo, hi, n)
    if lengths.sum() > 0.9 - head:
        lengths *= (0.9 - head) / lengths.sum()
    gaps = rng.dirichlet(np.ones(n + 1)) * (1.0 - head - lengths.sum())
    starts = head + gaps[0] + np.concatenate([[0.0], np.cumsum(lengths[:-1] + gaps[1:-1])])
    return [(float(s * duration), float((s + w) * duration)) for s, w in zip(starts, lengths)]


def _charades_ids(rng, n: int, taken: set) -> list[str]:
    out = []
    while len(out) < n:
        v = "".join(_ALNUM[i] for i in rng.integers(len(_ALNUM), size=5))
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


# ---------------------------------------------------------------------------------------------- count files


def glove_words(text: str) -> list[str]:
    """``word_tokenize`` of ``data/tokenized_count.py`` L9-18: lower case, punctuation to spaces, split."""
    return str(text).lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation))).split()


def simple_word_tokenize(text: str) -> list[str]:
    """NLTK ``word_tokenize`` for the synthetic captions only (lower-case words, one final period)."""
    if not text.endswith(".") or any(c in text[:-1] for c in string.punctuation):
        raise JaxprvrError("synthetic caption", "words and one final period", repr(text))
    return text[:-1].split() + ["."]


def clip_count_lines(sentences, max_words_l: int) -> list[str]:
    """``count_CLIP_tokenizer`` (``data/tokenized_count.py`` L83-107): ``id count`` of the BPE ids kept by the
    tokenizer (the first ``max_words_l - 2``), sorted by count (stable: ties keep first appearance)."""
    from jaxprvr.text.clip_bpe import load_tokenizer

    tok, counts = load_tokenizer(), {}
    for s in sentences:
        for i in tok.encode(s)[:max_words_l - 2]:
            counts[i] = counts.get(i, 0) + 1
    return [f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: kv[1], reverse=True)]


def glove_count_lines(sentences) -> list[str]:
    """``count_GloVe_tokenizer`` (L110-128): ``word <Vocabulary id> count`` (``<PAD>`` 0, ``<UNK>`` 1, then the
    sorted words), sorted by count (stable)."""
    counts: dict[str, int] = {}
    for s in sentences:
        for w in glove_words(s):
            counts[w] = counts.get(w, 0) + 1
    wtoi = {w: i + 2 for i, w in enumerate(sorted(counts))}
    return [f"{w} {wtoi[w]} {c}" for w, c in sorted(counts.items(), key=lambda kv: kv[1], reverse=True)]


def _write_lines(path: Path, lines) -> None:
    path.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- writer


def _feature_files(facts, dims) -> dict[str, int]:
    return {_stem(p): int(d) for p, d in zip(facts.feat_files, dims)}


def write(dataset: str, variant: str | None, out_dir, *, sizes: dict | None = None, seed: int = 0,
          feat_dims: dict | None = None, dtype: str = "float32") -> Path:
    """Writes a synthetic ``(dataset, variant)`` under ``out_dir``; returns ``out_dir``.

    ``sizes``: videos per split (QVHighlights: YouTube ids; default :data:`DEMO_SIZES`); ``feat_dims``: widths by
    feature file stem (``{"clip_image": 32, "slowfast": 64}``; default the official widths); ``dtype``: the stored
    feature dtype (the readers cast to float32, as the official code does)."""
    facts = variant_facts(dataset, variant)
    variant = facts.variant
    dims = _feature_files(facts, facts.feat_dims)
    for k, v in (feat_dims or {}).items():
        if k not in dims:
            raise JaxprvrError("feat_dims", f"keys among {sorted(dims)}", repr(k))
        dims[k] = int(v)
    sizes = {**DEMO_SIZES[dataset], **(sizes or {})}
    file_splits = [s for s in facts.splits if not (s == "val" and facts.val_from_train > 0)]
    unknown = sorted(set(sizes) - set(file_splits))
    if unknown:
        raise JaxprvrError("sizes", f"splits among {file_splits}", str(unknown))
    if np.dtype(dtype).kind != "f":
        raise JaxprvrError("dtype", "a floating-point dtype", repr(dtype))
    out = Path(out_dir).expanduser()
    ann = resolve(out, facts.ann_path)
    targets = [ann] + [resolve(out, p) for p in facts.feat_files]
    for t in targets:
        if t.exists():
            raise JaxprvrError(t, "a path that does not exist yet", "an existing path",
                               hint="choose another --out or delete it")
    ann.mkdir(parents=True)
    for p in facts.feat_files:
        resolve(out, p).parent.mkdir(parents=True, exist_ok=True)
    gen = _Gen(seed, dims)
    writer = {"charades": _write_charades, "charades_cg": _write_charades_json, "charades_cd": _write_charades_json,
              "qvhighlights": _write_qvh, "tacos": _write_tacos}[dataset]
    stores = {name: h5py.File(resolve(out, p), "w") for name, p in zip(dims, facts.feat_files)}
    try:
        info = writer(facts, out, ann, gen, sizes, seed, stores, np.dtype(dtype))
    finally:
        for f in stores.values():
            f.close()
    summary = dict(dataset=dataset, variant=variant, seed=seed, sizes=sizes, feat_dims=dims, dtype=str(dtype), **info)
    (ann / MARKER).write_text(json.dumps(summary) + "\n", encoding="utf-8")  # written last
    return out


def _put(stores, name, vid, x, dtype):
    stores[name].create_dataset(vid, data=x.astype(dtype))


def _charades_features(facts, gen, rng, stores, vid, duration, moments, dtype, scene_seed):
    """C+SF: one clip per second (SlowFast sometimes one row longer); VGG: one row per 0.17 s."""
    for name in stores:
        if name == "vgg":
            n = max(2, int(duration / facts.clip_len) + 1)
            x = gen.frames(rng, name, n, facts.clip_len, moments, scene_seed)
        else:
            n = max(2, int(math.ceil(duration)))
            if name == "slowfast":
                n += int(scene_seed % 2)
            x = gen.frames(rng, name, n, 1.0, moments, scene_seed)
        _put(stores, name, vid, x, dtype)


def _charades_videos(rng, n: int, taken: set, max_len_long: float):
    """Per video: (vid, duration, [(action, s, e)], [(caption, s, e)]); one long video (pooled) per split."""
    vids = _charades_ids(rng, n, taken)
    long_at = int(rng.integers(n))
    out = []
    for i, vid in enumerate(vids):
        duration = round(float(rng.uniform(110.0, max_len_long) if i == long_at else rng.uniform(12.0, 45.0)), 2)
        n_seg = int(rng.integers(1, 4))
        acts = rng.choice(len(ACTIONS), n_seg, replace=False)
        segs = _segments(rng, duration, n_seg, min_start=1.2)  # int(start / clip_len) >= 1: never the whole video
        moments = [(int(a), round(s, 1), round(e, 1)) for a, (s, e) in zip(acts, segs)]
        queries = []
        for a, s, e in moments:
            for _ in range(int(rng.integers(1, 3))):  # 1-2 descriptions per moment
                queries.append((_caption(rng, a), s, e))
        out.append((vid, duration, moments, queries))
    return out


def _write_charades(facts, out, ann, gen, sizes, seed, stores, dtype) -> dict:
    taken: set = set()
    counted = []  # (sentence, kept by the reader) in file order, train then test (tokenized_count.py)
    n_q = {}
    for code, split in enumerate(("train", "test")):
        rng = np.random.default_rng([seed, 10 + code])
        videos = _charades_videos(rng, sizes[split], taken, 210.0)
        lines, csv_rows = [], [_CSV_HEADER]
        for k, (vid, duration, moments, queries) in enumerate(videos):
            csv_rows.append(f'{vid},SUB{k:02d},Kitchen,6,7,Yes,"A person in a room, doing things.",'
                            f'door;floor,"Someone, somewhere.",c001 0.00 1.00,{duration}')
            lines += [(vid, s, e, cap) for cap, s, e in queries]
            _charades_features(facts, gen, np.random.default_rng([seed, 20 + code, k]), stores, vid, duration,
                               moments, dtype, scene_seed=seed * 1000003 + code * 10007 + k)
        # odd cases: a swapped line, a line ending past the video, a line starting past it (skipped)
        vid, duration, moments, queries = videos[0]
        a, s, e = moments[0]
        lines.append((vid, e, s, _caption(rng, a)))
        lines.append((vid, s, round(duration + 2.5, 1), _caption(rng, a)))
        lines.append((vid, round(duration + 5.0, 1), round(duration + 9.0, 1), _caption(rng, a)))
        lines = [lines[j] for j in rng.permutation(len(lines))]
        durations = {v[0]: v[1] for v in videos}
        counted += [(c, s <= durations[v]) for v, s, _, c in lines]
        _write_lines(ann / facts.split_file(split), [f"{v} {s:.1f} {e:.1f}##{c}" for v, s, e, c in lines])
        _write_lines(ann / ("Charades_v1_train.csv" if split == "train" else "Charades_v1_test.csv"), csv_rows)
        n_q[split] = len(lines)
    sentences = [c for c, keep in counted if keep]
    _write_lines(ann / "CLIP_tokenized_count.txt", clip_count_lines(sentences, 16))
    _write_lines(ann / "GloVe_tokenized_count.txt", glove_count_lines(sentences))
    if facts.load_vocab_pkl:
        _write_glove_pkl(ann / "glove.pkl", gen, [c for c, _ in counted])
    return dict(lines=n_q)


def _write_glove_pkl(path: Path, gen: _Gen, sentences) -> None:
    """CPL's ``vocab.py`` ``preprocess_charades``: w2id (``<PAD>`` = 0), id2vec (float32 rows), counter, over the
    NLTK-tokenized lower-cased words that GloVe knows."""
    vocab = {"w2id": {"<PAD>": 0}, "id2vec": [np.zeros(GLOVE_DIM, np.float32)], "counter": Counter()}
    for s in sentences:
        for w in simple_word_tokenize(s):
            w = w.lower()
            if w in MISSING_GLOVE:
                continue
            if w not in vocab["w2id"]:
                vocab["w2id"][w] = len(vocab["id2vec"])
                vocab["id2vec"].append(gen.word_vector(w))
            vocab["counter"][w] += 1
    with open(path, "wb") as f:
        pickle.dump(vocab, f)


def _write_charades_json(facts, out, ann, gen, sizes, seed, stores, dtype) -> dict:
    cd = facts.dataset == "charades_cd"
    taken: set = set()
    n_q, sentences = {}, []
    for code, split in enumerate(s for s in facts.splits if not (s == "val" and facts.val_from_train > 0)):
        rng = np.random.default_rng([seed, 10 + code])
        videos = _charades_videos(rng, sizes[split], taken, 180.0)
        data = {}
        for k, (vid, duration, moments, queries) in enumerate(videos):
            ts = [[s, e] for _, s, e in queries]
            caps = [c for c, _, _ in queries]
            if k == 0:  # odd cases: swapped, ending past the video, starting past it (skipped, uses a qid up)
                a, s, e = moments[0]
                ts += [[e, s], [s, round(duration + 2.5, 1)], [round(duration + 4.0, 1), round(duration + 8.0, 1)]]
                caps += [_caption(rng, a) for _ in range(3)]
            if split == "train" or split in facts.test_splits:
                sentences += [c for c, (s, _) in zip(caps, ts) if s <= duration]
            if cd:
                data[vid] = {"framestamps": [[int(round(s * 16)), int(round(e * 16))] for s, e in ts],
                             "decode_fps": 16.0, "encoded_sentences": [[1] * len(c.split()) for c in caps],
                             "sentences": caps, "video_fps": -1.0, "timestamps": ts, "video_duration": duration}
            else:
                data[vid] = {"timestamps": ts, "sentences": caps, "duration": duration}
            _charades_features(facts, gen, np.random.default_rng([seed, 20 + code, k]), stores, vid, duration,
                               moments, dtype, scene_seed=seed * 1000003 + code * 10007 + k)
        (ann / facts.split_file(split)).write_text(json.dumps(data), encoding="utf-8")
        n_q[split] = sum(len(v["timestamps"]) for v in data.values())
    # The Charades count file, shared through a relative symlink as in the official repository.
    target = resolve(out, "data/charades/annotations")
    target.mkdir(parents=True, exist_ok=True)
    _write_lines(target / "CLIP_tokenized_count.txt", clip_count_lines(sentences, 16))
    link = ann / "CLIP_tokenized_count.txt"
    try:
        os.symlink(os.path.join("..", "charades", "annotations", "CLIP_tokenized_count.txt"), link)
    except OSError:  # no symlinks on this file system: a copy
        link.write_bytes((target / "CLIP_tokenized_count.txt").read_bytes())
    return dict(queries=n_q)


def _qvh_ytid(rng, i: int) -> str:
    chars = string.ascii_letters + string.digits + "-"
    body = "".join(chars[j] for j in rng.integers(len(chars), size=11))
    return body[:5] + "_" + body[6:] if i == 1 else body  # one id with "_" (the reader's rsplit('_', 2))


def _write_qvh(facts, out, ann, gen, sizes, seed, stores, dtype) -> dict:
    qid = 1000
    n_q, sentences = {}, []
    rows_by_split = {}
    for code, split in enumerate(("train", "val", "test")):
        rng = np.random.default_rng([seed, 10 + code])
        rows = []
        for i in range(sizes[split]):
            ytid = _qvh_ytid(rng, i + code * 1000)
            for w in range(int(rng.integers(1, 4))):
                st = 150 * w + int(rng.integers(0, 3)) * 30  # window starts vary
                vid = f"{ytid}_{float(st)}_{float(st + 150)}"
                short = split == "train" and i == 0 and w == 0  # 74 feature rows, relevant clip id 74
                many = split == "train" and i == 1 and w == 0  # 6 windows (cut to max_windows=5)
                a = int(rng.integers(len(ACTIONS)))
                n_win = 6 if many else int(rng.integers(1, 4))
                if short:
                    windows = [[130.0, 150.0]]
                else:
                    segs = _segments(rng, 150.0, n_win, 0.03 if many else 0.05, 0.1 if many else 0.25)
                    windows = []
                    for s, e in segs:
                        s2, e2 = 2.0 * math.floor(s / 2.0), 2.0 * math.ceil(e / 2.0)
                        if windows and s2 < windows[-1][1]:
                            s2 = windows[-1][1]
                        windows.append([s2, max(e2, s2 + 2.0)])
                clip_ids = sorted({c for s, e in windows for c in range(int(s // 2), int(math.ceil(e / 2)))})
                scores = [[int(v) for v in rng.integers(1, 5, size=3)] for _ in clip_ids]
                moments = [(a, s, e) for s, e in windows]
                n_rows = 74 if short else 75
                for name in stores:
                    extra = 1 if (name == "slowfast" and w == 1) else 0  # truncated to max_video_l by the reader
                    x = gen.frames(np.random.default_rng([seed, 30 + code, i, w, len(name)]), name, n_rows + extra,
                                   2.0, moments, seed * 1000003 + code * 10007 + i * 31 + w)
                    _put(stores, name, vid, x, dtype)
                cap = _caption(rng, a)
                rows.append(dict(qid=qid, query=cap, duration=150, vid=vid, relevant_clip_ids=clip_ids,
                                 saliency_scores=scores, relevant_windows=windows))
                qid += 1
        rows_by_split[split] = rows
        sentences += [r["query"] for r in rows]
        n_q[split] = len(rows)
    for split, rows in rows_by_split.items():
        if split == "test":
            bare = [{k: r[k] for k in ("qid", "query", "duration", "vid")} for r in rows]
            _write_lines(ann / facts.split_file("test"), [json.dumps(r) for r in bare])
            _write_lines(ann / facts.split_file("test_with_gt"), [json.dumps(r) for r in rows])
        else:
            _write_lines(ann / facts.split_file(split), [json.dumps(r) for r in rows])
    _write_lines(ann / "CLIP_tokenized_count.txt", clip_count_lines(sentences, facts.max_words_l))
    return dict(queries=n_q)


def _tacos_caption(rng, a: int) -> str:
    verb, obj = ACTIONS[a]
    subject = ("He", "She", "The person")[int(rng.integers(3))]
    return f"{subject} {verb} the {obj}."


def _write_tacos(facts, out, ann, gen, sizes, seed, stores, dtype) -> dict:
    fps = 29.4
    n_q, counted = {}, []
    for code, split in enumerate(("train", "val", "test")):
        rng = np.random.default_rng([seed, 10 + code])
        data = {}
        for i in range(sizes[split]):
            vid = f"s{13 + code}-d{i + 21:02d}.avi"
            duration_s = float(rng.uniform(120.0, 360.0))
            num_frames = int(round(duration_s * fps))
            duration = num_frames / fps
            many = i == 0  # 13 queries: one chunk of 10 and one of 3 (max_gather_size 10)
            n_seg = 5 if many else int(rng.integers(2, 5))
            acts = rng.choice(len(ACTIONS), n_seg, replace=False)
            segs = _segments(rng, duration, n_seg, 0.08, 0.18)
            moments = [(int(a), s, e) for a, (s, e) in zip(acts, segs)]
            ts, caps = [], []
            n_queries = 13 if many else n_seg + int(rng.integers(0, 4))
            for k in range(n_queries):
                a, s, e = moments[k % n_seg]
                ts.append([int(round(s * fps)), int(round(e * fps))])
                caps.append(_tacos_caption(rng, a))
            if i == 1:  # a start > end timestamp (skipped before the qid count)
                ts.append([ts[0][1], ts[0][0]])
                caps.append(_tacos_caption(rng, moments[0][0]))
            n_rows = int(rng.integers(650, 900)) if i == 1 else int(rng.integers(100, 500))
            x = gen.frames(np.random.default_rng([seed, 20 + code, i]), "c3d", n_rows, duration / n_rows,
                           moments, seed * 1000003 + code * 10007 + i)
            _put(stores, "c3d", vid, x, dtype)
            data[vid] = {"timestamps": ts, "sentences": caps, "fps": fps, "num_frames": num_frames}
            if split in ("train", "test"):
                counted += caps
        (ann / facts.split_file(split)).write_text(json.dumps(data), encoding="utf-8")
        n_q[split] = sum(len(v["timestamps"]) for v in data.values())
    _write_lines(ann / "CLIP_tokenized_count.txt", clip_count_lines(counted, 16))
    glove_lines = glove_count_lines(counted)
    _write_lines(ann / "GloVe_tokenized_count.txt", glove_lines)
    words = [line.split(" ")[0] for line in glove_lines]
    extra = ["the", "of", "and", "kitchen", "knife"]
    glove = resolve(out, facts.text_model_path)
    glove.parent.mkdir(parents=True, exist_ok=True)
    with open(glove, "w", encoding="utf-8") as f:
        for w in dict.fromkeys(words + extra):
            if w in MISSING_GLOVE or w in ("he",):
                continue
            f.write(w + " " + " ".join(f"{v:.5f}" for v in gen.word_vector(w)) + "\n")
    return dict(queries=n_q)


# ---------------------------------------------------------------------------------------------- demo, CLI


def _cache_base(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("JAXPRVR_CACHE", "~/.cache/jaxprvr")).expanduser() / "demo"


def demo_root(dataset: str = "charades", variant: str | None = None, cache_dir=None, feat_dims=None) -> Path:
    """A demo dataset (:data:`DEMO_SIZES`, float16 features, seed 0; the official widths, or ``feat_dims`` = the
    widths of the variant's files in order), created on first use; returns its ``--data-root``:
    ``<cache>/mesm-<dataset>-<variant>[-<widths>]-v1`` (``$JAXPRVR_CACHE/demo`` or ``~/.cache/jaxprvr/demo``),
    written beside it and renamed into place (never half-written)."""
    facts = variant_facts(dataset, variant)
    from jaxprvr.data.synthetic import create_once

    dims = None
    tag = ""
    if feat_dims:
        dims = dict(zip((Path(f).stem for f in facts.feat_files), (int(d) for d in feat_dims)))
        if len(dims) != len(facts.feat_files):
            raise JaxprvrError("feat_dims", f"{len(facts.feat_files)} widths ({list(facts.feat_files)})",
                               str(tuple(feat_dims)))
        if tuple(dims.values()) != tuple(facts.feat_dims):
            tag = "-" + "x".join(str(d) for d in dims.values())
    final = _cache_base(cache_dir) / f"mesm-{dataset}-{facts.variant.replace('+', '')}{tag}-v{DEMO_VERSION}"
    marker = resolve(final, facts.ann_path) / MARKER
    return create_once(final, marker, lambda tmp: write(dataset, facts.variant, tmp, seed=0, dtype="float16",
                                                        feat_dims=dims))


def _pairs(text: str | None, what: str) -> dict:
    out = {}
    for part in filter(None, (text or "").split(",")):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = int(v)
        except ValueError:
            raise JaxprvrError(what, "NAME=INT[,NAME=INT...]", repr(text)) from None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxprvr.data.synthetic",
                                     description="Write a synthetic MESM dataset in the official layout "
                                                 "(data/..., pretrained_models/...).")
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--model", choices=("mesm",), default="mesm")
    parser.add_argument("--variant", default=None,
                        help="default per dataset: " + ", ".join(f"{d}={v}" for d, v in DEFAULT_VARIANT.items())
                        + f"; all: {sorted(f'{d}/{v}' for d, v in VARIANTS)}")
    parser.add_argument("--out", required=True, help="the data root to create (the official working directory)")
    parser.add_argument("--sizes", default=None, help="videos per split, e.g. train=40,test=12 (default DEMO_SIZES)")
    parser.add_argument("--feat-dims", default=None, help="reduced widths, e.g. clip_image=32,slowfast=64")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--seed", type=int, default=0)

    def run(args) -> dict:
        start = time.perf_counter()
        facts = variant_facts(args.dataset, args.variant)
        root = write(args.dataset, args.variant, args.out, sizes=_pairs(args.sizes, "--sizes"),
                     feat_dims=_pairs(args.feat_dims, "--feat-dims"), dtype=args.dtype, seed=args.seed)
        marker = resolve(root, facts.ann_path) / MARKER
        summary = dict(out=str(root), **json.loads(marker.read_text(encoding="utf-8")))
        summary["seconds"] = round(time.perf_counter() - start, 2)
        return summary

    return run_cli(parser, run, argv)


__all__ = ["write", "demo_root", "main", "DEMO_SIZES", "ACTIONS", "clip_count_lines", "glove_count_lines",
           "glove_words", "simple_word_tokenize"]
