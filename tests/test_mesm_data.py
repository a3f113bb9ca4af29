"""MESM's data layer (jaxprvr.data.mesm, jaxprvr.data.synthetic_mesm) against expectations derived here from the
official rules (lntzm/MESM @ 8501bdea dataset/*.py, utils/data_utils.py), torch transcriptions of the official
feature code, and hand-made files; each check has a mutant that must fail."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from jaxprvr.data import mesm
from jaxprvr.data import synthetic_mesm as syn
from jaxprvr.errors import JaxprvrError

SMALL = {"clip_image": 12, "slowfast": 20, "vgg": 24, "c3d": 24}


class StandIn:
    """A tiny tokenizer with MESMTokenizer.encode's output (whitespace words, hashed ids)."""

    def __init__(self, facts):
        self.f = facts

    def encode(self, s):
        f, lw = self.f, self.f.max_words_l
        words = s.lower().replace(".", " .").split()
        if f.tokenizer_type == "CLIP":
            words = words[:lw - 2]
            ids = [49406] + [1 + sum(map(ord, w)) for w in words] + [49407]
            n = len(ids)
            return dict(words_id=np.array(ids), words_weight=np.array([0] + [2] * (n - 2) + [0], np.float32),
                        words_label=np.arange(n), unknown_mask=np.zeros(n, bool), n_words=n)
        words = words[:lw]
        n = len(words)
        if f.load_vocab_pkl:
            vec = np.stack([np.full(300, 1.0 + k, np.float32) for k in range(n)])
            return dict(words_vec=vec, words_weight=np.ones(n), words_label=np.zeros(n), unknown_mask=np.zeros(n, bool),
                        n_words=n)
        return dict(words_id=np.arange(2, 2 + n), words_weight=np.ones(n), words_label=np.zeros(n),
                    unknown_mask=np.zeros(n, bool), n_words=n)


def _h5(path: Path, videos: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in videos.items():
            f.create_dataset(k, data=v)


def _open(dataset, variant, root, split, **kw):
    facts = mesm.variant_facts(dataset, variant, **{k: v for k, v in kw.items() if k in ("feat_dims", "max_video_l")})
    kw.setdefault("tokenizer", StandIn(facts))
    return mesm.open_mesm(dataset, variant, root, split, **kw)


# ---------------------------------------------------------------------------------------------- variants

OFFICIAL = {  # transcribed from config/<dir>/<variant>.json
    ("charades", "C+SF_C"): dict(clip_len=1, max_words_l=16, max_video_l=194, tokenizer_type="CLIP",
                                 load_vocab_pkl=False, vocab_size=1111, contra_samples=2, batch_size=12,
                                 eval_batch_size=30, max_gather_size=-1, max_windows=5, v_feat_dim=2816,
                                 t_feat_dim=512),
    ("charades", "VGG_GloVe"): dict(clip_len=0.17, max_video_l=600, tokenizer_type="GloVeNLTK", load_vocab_pkl=True,
                                    v_feat_dim=4096, t_feat_dim=300, batch_size=12, eval_batch_size=30),
    ("charades_cg", "C+SF_C"): dict(clip_len=1, max_video_l=194, v_feat_dim=2816, batch_size=12),
    ("qvhighlights", "C+SF_C"): dict(clip_len=2, max_words_l=32, max_video_l=75, vocab_size=5000, v_feat_dim=2816),
    ("tacos", "C3D_GloVe"): dict(clip_len=-1, max_video_l=600, tokenizer_type="GloVeNLTK", load_vocab_pkl=False,
                                 batch_size=3, eval_batch_size=5, max_gather_size=10, v_feat_dim=4096, t_feat_dim=300),
}


def test_variants_hand_written_and_official_json():
    for key, want in OFFICIAL.items():
        f = mesm.VARIANTS[key]
        for k, v in want.items():
            assert getattr(f, k) == v, (key, k)
    cg, cd = mesm.VARIANTS[("charades_cg", "C+SF_C")], mesm.VARIANTS[("charades_cd", "C+SF_C")]
    skip = {"dataset", "official_name", "config_json", "ann_path", "split_files", "official_selection",
            "test_splits", "val_from_train"}
    for fld in mesm.dataclasses.fields(mesm.VariantFacts):
        if fld.name not in skip:
            assert getattr(cg, fld.name) == getattr(cd, fld.name), fld.name  # no CD config: ours = CG's
    # runner.py L70-80: the selection splits; ours never selects on a test split
    assert mesm.VARIANTS[("charades", "C+SF_C")].official_selection == ("test",)
    assert cg.official_selection == ("novel_composition", "novel_word") and cd.official_selection == ("test_ood",)
    assert mesm.VARIANTS[("qvhighlights", "C+SF_C")].official_selection == ("val",)
    for f in mesm.VARIANTS.values():
        assert not set(f.honest_selection) & set(f.test_splits)
    official = Path("/tmp/mesm_official/config")
    if not official.is_dir():
        return  # the official checkout is only on the porting machine
    for f in mesm.VARIANTS.values():
        if f.config_json is None:
            continue
        j = json.loads((official.parent / f.config_json).read_text())
        assert j["ann_path"] == "./" + f.ann_path and j["feat_files"] == ["./" + p for p in f.feat_files]
        assert j["text_model_path"] == "./" + f.text_model_path and j["dataset_name"] == f.official_name
        for k in ("clip_len", "max_words_l", "max_video_l", "tokenizer_type", "load_vocab_pkl", "vocab_size",
                  "contra_samples", "batch_size", "eval_batch_size", "max_gather_size", "max_windows", "seed",
                  "v_feat_dim", "t_feat_dim", "use_tef", "normalize_video", "rec_fw"):
            assert getattr(f, k) == j[k], (f.config_json, k)


def test_variant_errors():
    with pytest.raises(JaxprvrError, match="variant"):
        mesm.variant_facts("tacos", "C+SF_C")
    with pytest.raises(JaxprvrError, match="VariantFacts"):
        mesm.variant_facts("tacos", None, max_video=3)


# ---------------------------------------------------------------------------------------------- readers

CSV = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"


def _charades_files(ann: Path):
    ann.mkdir(parents=True, exist_ok=True)
    (ann / "Charades_v1_train.csv").write_text(
        CSV + 'AAAAA,S,Kitchen,6,7,Yes,"one, two",x,"y, z",c1 0 1,30.0\nBBBBB,S,Hall,6,7,Yes,s,x,y,c,20.5\n')
    lines = ["AAAAA 1.2 6.9##a person opens the door.", "AAAAA 31.0 35.0##skipped: starts after the end.",
             "BBBBB 9.0 4.5##swapped ends.", "BBBBB 18.0 25.0##the end is clipped.  ",
             "AAAAA 30.0 32.0##starts at the very end."]
    (ann / "charades_sta_train.txt").write_text("".join(x + "\n" for x in lines))


def _check_charades(read):
    """Official rules (charades.py L39-87) applied by hand to the file above."""
    qs, skipped = read()
    assert [q.qid for q in qs] == [0, 2, 3, 4]  # the line index; the skipped line 1 uses its qid up
    assert [q.moment for q in qs] == [(1.2, 6.9), (4.5, 9.0), (18.0, 20.5), (30.0, 30.0)]
    assert [(q.start_idx, q.end_idx) for q in qs] == [(1, 6), (4, 9), (18, 20), (30, 30)]
    assert [q.official_qid for q in qs] == [None] * 4  # train
    assert qs[2].sentence == "the end is clipped." and dict(skipped) == {"start_after_end_of_video": 1}


def test_charades_reader(tmp_path):
    ann = tmp_path / "a"
    _charades_files(ann)
    dur = mesm.read_charades_durations(ann / "Charades_v1_train.csv")
    assert dur == {"AAAAA": 30.0, "BBBBB": 20.5}  # quoted commas, last column
    read = lambda: mesm.read_charades_sta(ann / "charades_sta_train.txt", dur, 1.0, True)
    _check_charades(read)
    qs, _ = mesm.read_charades_sta(ann / "charades_sta_train.txt", dur, 0.17, False)
    assert [(q.start_idx, q.end_idx) for q in qs][0] == (int(1.2 / 0.17), int(6.9 / 0.17)) == (7, 40)
    assert [q.official_qid for q in qs] == [0, 2, 3, 4]

    def mutant():  # qid = index among the kept lines
        qs, sk = read()
        for k, q in enumerate(qs):
            q.qid = k
        return qs, sk

    with pytest.raises(AssertionError):
        _check_charades(mutant)


def _cg_file(path: Path, duration_key: str):
    data = {"V1": {"timestamps": [[1.5, 4.0], [40.0, 45.0], [9.0, 3.0]], "sentences": ["a", "b", "c"],
                   duration_key: 30.0},
            "V2": {"timestamps": [[2.0, 50.0]], "sentences": ["d"], duration_key: 20.0}}
    if duration_key != "duration":
        data["V1"]["duration"] = 99.0  # a decoy: Charades-CD reads video_duration
    path.write_text(json.dumps(data))


def _check_cg(read):
    qs, skipped = read()
    assert [q.qid for q in qs] == [1, 3, 4]  # counted from 1 *before* the start > duration skip
    assert [q.moment for q in qs] == [(1.5, 4.0), (3.0, 9.0), (2.0, 20.0)]
    assert [(q.start_idx, q.end_idx) for q in qs] == [(1, 4), (3, 9), (2, 20)]
    assert [q.video_id for q in qs] == ["V1", "V1", "V2"] and skipped["start_after_end_of_video"] == 1


@pytest.mark.parametrize("key", ["duration", "video_duration"])
def test_charades_cg_cd_reader(tmp_path, key):
    _cg_file(tmp_path / "x.json", key)
    read = lambda: mesm.read_charades_json(tmp_path / "x.json", key, 1.0, False)
    _check_cg(read)

    def mutant():  # the count incremented after the skip
        qs, sk = read()
        for k, q in enumerate(qs):
            q.qid = k + 1
        return qs, sk

    with pytest.raises(AssertionError):
        _check_cg(mutant)
    with pytest.raises(JaxprvrError, match="clip_len"):
        mesm.read_charades_json(tmp_path / "x.json", key, -1, False)


def test_tacos_reader(tmp_path):
    data = {"s1-d1.avi": {"timestamps": [[-5, 100], [300, 200], [150, 1200]], "sentences": ["a", "b", "c"],
                          "fps": 25.0, "num_frames": 1000},
            "s1-d2.avi": {"timestamps": [[10, 20]], "sentences": ["d"], "fps": 10.0, "num_frames": 500}}
    (tmp_path / "t.json").write_text(json.dumps(data))
    qs, skipped = mesm.read_tacos(tmp_path / "t.json", -1, False)
    assert [q.qid for q in qs] == [1, 2, 3]  # the start > end skip does not use a qid up
    assert [q.moment for q in qs] == [(0, 4.0), (6.0, 40.0), (1.0, 2.0)]  # [max(s/fps, 0), min(e/fps, duration)]
    assert [q.duration for q in qs] == [40.0, 40.0, 50.0]
    assert [(q.start_idx, q.end_idx) for q in qs] == [(0.0, 0.1), (0.15, 1.0), (0.02, 0.04)]  # fractions
    assert skipped == {"start_after_end": 1}


def test_qvh_reader_groups_and_sorts(tmp_path):
    rows = [dict(qid=6, query="q6", duration=150, vid="ab_cd_150.0_300.0", relevant_windows=[[144, 150]],
                 relevant_clip_ids=[72, 73, 74], saliency_scores=[[1, 1, 1], [2, 2, 2], [0, 0, 4]]),
            dict(qid=9, query="q9", duration=150, vid="zz_30.0_180.0", relevant_windows=[[2, 4]],
                 relevant_clip_ids=[1], saliency_scores=[[1, 2, 3]]),
            dict(qid=5, query="q5", duration=150, vid="ab_cd_0.0_150.0", relevant_windows=[[2, 6], [10, 14]],
                 relevant_clip_ids=[1, 2, 5, 6], saliency_scores=[[1, 2, 3], [4, 4, 4], [0, 1, 0], [2, 2, 2]])]
    p = tmp_path / "q.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qs, _ = mesm.read_qvhighlights(p, labels=True)
    assert [q.group for q in qs] == ["ab_cd", "zz", "ab_cd"]  # rsplit('_', 2): an id with '_'
    assert [q.video_start for q in qs] == [150.0, 30.0, 0.0]
    items = mesm.gather_items(qs, -1, None, qvh=True)
    assert items == [(2, 0), (1,)]  # per YouTube id (first appearance), sorted by the window start
    qs2, _ = mesm.read_qvhighlights(p, labels=False)
    assert qs2[0].relevant_windows is None


# ---------------------------------------------------------------------------------------------- features


def _torch_official_video(files_rows, max_video_l, truncate):
    """dataset/charades.py get_video_feat + base.py sample_video_feat + add_tef, transcribed with torch."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    feats = []
    for x in files_rows:
        x = x[:max_video_l] if truncate else x
        feats.append(F.normalize(torch.from_numpy(x.astype(np.float32)), dim=1))
    n = min(len(e) for e in feats)
    v = torch.cat([e[:n] for e in feats], dim=1)
    if not truncate and v.shape[0] > max_video_l:
        T = v.shape[0]
        idxs = (torch.arange(0, max_video_l + 1, 1.0) / max_video_l * T).round().long().clamp(max=T - 1)
        v = torch.stack([v[idxs[i]:idxs[i + 1]].mean(dim=0) if idxs[i] < idxs[i + 1] else v[idxs[i]]
                         for i in range(max_video_l)])
    L = v.shape[0]
    tef_st = torch.arange(0, L, 1.0) / L
    tef = torch.stack([tef_st, tef_st + 1.0 / L], dim=1)
    return torch.cat([v, tef], dim=1).numpy()


def test_pool_edges_are_mrnets_and_torchs():
    torch = pytest.importorskip("torch")
    from jaxprvr.data.sampling import bin_edges

    for M in (75, 194, 600):
        for T in list(range(M + 1, M + 60)) + [3 * M + 7, 1402]:
            want = (torch.arange(0, M + 1, 1.0) / M * T).round().long().clamp(max=T - 1).numpy()
            np.testing.assert_array_equal(bin_edges(T, M, np.float32), want)
    # the float64 edges (MS-SL's uniform_feature_sampling) differ: a real difference the check above would see
    assert (bin_edges(700, 600, np.float64) != bin_edges(700, 600, np.float32)).any()


@pytest.mark.parametrize("T,truncate", [(700, False), (150, False), (80, True)])
def test_video_pipeline_against_torch(T, truncate):
    rng = np.random.default_rng(T)
    M = 75 if truncate else 600 if T == 700 else 194
    a = rng.standard_normal((T, 6)).astype(np.float32) * 3
    b = rng.standard_normal((T + 1, 4)).astype(np.float64)  # one row longer: cut to the shortest
    a[3] = 0  # an all-zero row stays zero (eps 1e-12)
    got = mesm.video_pipeline([a, b], M, truncate=truncate)
    want = _torch_official_video([a, b], M, truncate)
    assert got.dtype == np.float32 and got.shape == want.shape == (min(T, M), 12)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(got[:, -2:], want[:, -2:])  # TEF bit for bit
    if T == 700:  # mutant: float64 bin edges
        from jaxprvr.data.sampling import uniform_feature_sampling

        bad = uniform_feature_sampling(np.concatenate([mesm.l2_normalize_rows(a[:T]),
                                                       mesm.l2_normalize_rows(b[:T].astype(np.float32))], 1), M)
        assert not np.allclose(bad, want[:, :-2], rtol=2e-6, atol=1e-7)
        nan = want.copy()
        nan[5, 0] = np.nan
        assert not np.allclose(got, nan, rtol=2e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- labels


def _vgg_root(tmp_path, T, moments, duration=200.0):
    root = tmp_path / "r"
    ann = root / "data/charades/annotations"
    ann.mkdir(parents=True)
    (ann / "Charades_v1_train.csv").write_text(CSV + f"AAAAA,s,s,1,1,Y,s,o,d,a,{duration}\n"
                                                     f"BBBBB,s,s,1,1,Y,s,o,d,a,30.0\n")
    lines = [f"AAAAA {s} {e}##q{k}." for k, (s, e) in enumerate(moments)] + ["BBBBB 2.0 5.0##other."]
    (ann / "charades_sta_train.txt").write_text("".join(x + "\n" for x in lines))
    rng = np.random.default_rng(0)
    _h5(root / "data/charades/vgg.hdf5", {"AAAAA": rng.standard_normal((T, 24)).astype(np.float32),
                                          "BBBBB": rng.standard_normal((170, 24)).astype(np.float32)})
    return root


def _official_span(start, end, clip_len, L):
    """base.py L172-186 with the reader's int(t / clip_len), by hand."""
    s, e = int(start / clip_len), int(end / clip_len)
    e = min(e, L - 1)
    return min(s, e), e


def _check_vgg_labels(sp):
    b = next(iter(sp.batches(None, train=True)))
    o = b.official
    rows = [i for i, v in enumerate(o["video_id"]) if v == "AAAAA"]
    assert [(int(o["start_idx"][r]), int(o["end_idx"][r])) for r in rows] == \
        [_official_span(60.0, 100.0, 0.17, 600), _official_span(110.0, 118.0, 0.17, 600)] == [(352, 588), (599, 599)]
    for r in rows:
        s, e = int(o["start_idx"][r]), int(o["end_idx"][r])
        want = np.zeros(o["clip_mask"].shape[1], bool)
        want[s:e + 1] = True
        np.testing.assert_array_equal(o["clip_mask"][r], want)
        assert all(s <= p <= e for p in o["pos_idx"][r]) and all(not s <= n <= e for n in o["neg_idx"][r])
        assert o["neg_idx"][r][0] != o["neg_idx"][r][1]  # without replacement when the pool allows


def test_labels_not_rescaled_after_pooling(tmp_path):
    root = _vgg_root(tmp_path, 700, [(60.0, 100.0), (110.0, 118.0)])
    sp = _open("charades", "VGG_GloVe", root, "train", feat_dims=(24,))
    assert sp.length["AAAAA"] == 600 and sp.raw_length["AAAAA"] == 700
    _check_vgg_labels(sp)
    with pytest.raises(AssertionError):  # mutant: labels rescaled after pooling (the corrected flag)
        _check_vgg_labels(_open("charades", "VGG_GloVe", root, "train", feat_dims=(24,), rescale_labels=True))


def test_whole_video_moment(tmp_path):
    root = _vgg_root(tmp_path, 50, [(0.1, 30.0)], duration=10.0)  # s = 0, e = int(10 / 0.17) = 58 -> L - 1 = 49
    with pytest.raises(JaxprvrError, match="covers the whole video.*crashes"):
        _open("charades", "VGG_GloVe", root, "train", feat_dims=(24,))
    sp = _open("charades", "VGG_GloVe", root, "train", feat_dims=(24,), whole_video="skip")
    assert sp.skipped["moment_covers_whole_video"] == 1 and sp.n_queries == 1


def test_contra_samples_rules():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p, n = mesm.contra_samples(rng, 4, 4, 10, 2)  # a 1-clip moment: positives with replacement
        assert list(p) == [4, 4] and len(set(n)) == 2 and 4 not in n
        p, n = mesm.contra_samples(rng, 1, 8, 10, 2)  # negatives {0, 9}: without replacement
        assert sorted(n) == [0, 9] and len(set(p)) == 2
        p, n = mesm.contra_samples(rng, 0, 8, 10, 2)  # a single negative: with replacement
        assert list(n) == [9, 9]
    with pytest.raises(JaxprvrError):
        mesm.contra_samples(rng, 0, 9, 10, 2)


def test_qvh_saliency_and_windows():
    rng = np.random.default_rng(1)
    ids, scores = [1, 2, 5, 6], [[1, 2, 3], [4, 4, 4], [0, 1, 0], [2, 2, 2]]
    for _ in range(20):
        pos, neg, sal = mesm.qvh_saliency(rng, ids, scores, 75)
        want = np.zeros(75)
        want[[1, 2, 5, 6]] = [6, 12, 1, 6]  # the sum of the 3 annotators
        np.testing.assert_array_equal(sal, want)
        assert pos[0] == 2 and neg[0] == 5  # hard: the highest / lowest sum
        assert pos[1] in ids and neg[1] not in ids and 0 <= neg[1] < 75
    pos, neg, sal = mesm.qvh_saliency(rng, [72, 73, 74], [[1, 1, 1], [2, 2, 2], [4, 4, 4]], 74)
    assert sal.shape == (75,) and list(sal[72:]) == [3, 6, 12]  # grows to ctx_l + 1 (qvhighlights.py L276-283)
    assert pos[0] == 73 and neg[0] == 72  # the hard positive (id 74) clipped to L - 1
    pos, neg, _ = mesm.qvh_saliency(rng, [0, 1], [[1, 1, 1], [2, 2, 2]], 2)  # no easy pool: hard ones copied
    assert pos == [1, 1] and neg == [0, 0]
    w = [[2 * k, 2 * k + 2] for k in range(0, 14, 2)]  # 7 windows
    xx, cxw = mesm.qvh_windows(rng, w, 74, 2.0, 5)
    assert xx.shape == (5, 2) and xx.dtype == np.float32
    assert {tuple(r) for r in np.round(xx * 148).astype(int).tolist()} <= {tuple(r) for r in w}
    np.testing.assert_array_equal(cxw[:, 0], (xx[:, 0] + xx[:, 1]) * np.float32(0.5))
    xx, _ = mesm.qvh_windows(rng, [[144, 150]], 74, 2.0, 5)
    np.testing.assert_array_equal(xx, np.float32([[144, 150]]) / np.float32(148))  # L * clip_len, can exceed 1


# ---------------------------------------------------------------------------------------------- batching


def test_split_gather_sampler_by_hand():
    items = [mesm.Item(0, "a", (0,)), mesm.Item(1, "a", (1,)), mesm.Item(2, "a", (2,)), mesm.Item(3, "b", (3,)),
             mesm.Item(4, "c", (4,))]
    batches, dropped = mesm.split_gather_batches(items, 2, None)
    # pass 1: a0 b0 (full, restart); pass 2: a1, b exhausted, c0 (full); pass 3: a2 alone -> epoch ends, dropped
    assert batches == [[0, 3], [1, 4]] and dropped == [2]


def test_split_gather_sampler_invariants():
    rng = np.random.default_rng(3)
    items, k = [], 0
    for v in range(9):
        for _ in range(int(rng.integers(1, 5))):
            items.append(mesm.Item(k, f"v{v}", (k,)))
            k += 1
    seen = []
    for seed in range(20):
        batches, dropped = mesm.split_gather_batches(items, 3, np.random.default_rng(seed))
        flat = [i for b in batches for i in b]
        assert sorted(flat + dropped) == list(range(len(items)))
        for b in batches:
            assert 2 <= len(b) <= 3 and len({items[i].group for i in b}) == len(b)  # never two chunks of a video
        seen.append(tuple(map(tuple, batches)))
    assert len(set(seen)) > 1
    assert mesm.split_gather_batches(items, 3, np.random.default_rng(5)) == \
        mesm.split_gather_batches(items, 3, np.random.default_rng(5))


def test_plain_batches_merge_rule():
    assert mesm.plain_batches(list(range(13)), 12) == ([list(range(13))], 1)  # the 1-item batch joins the last
    assert mesm.plain_batches(list(range(25)), 12) == ([list(range(12)), list(range(12, 25))], 1)
    assert mesm.plain_batches(list(range(24)), 12) == ([list(range(12)), list(range(12, 24))], 0)
    assert mesm.plain_batches(list(range(14)), 12) == ([list(range(12)), [12, 13]], 0)
    # the merge rule (also the capacities': a batch of one item more where the last merges) against plain
    # chunking, batch size 1 included (every batch one item: the last always merges)
    for bs in range(1, 6):
        for n in range(1, 30):
            chunks = [list(range(n))[a:a + bs] for a in range(0, n, bs)]
            single_last = len(chunks) > 1 and len(chunks[-1]) == 1
            batches, merged = mesm.plain_batches(list(range(n)), bs)
            assert mesm.merges_last(n, bs) == bool(merged) == single_last, (n, bs)
            assert sorted(i for b in batches for i in b) == list(range(n)) and len(batches) == len(chunks) - merged
            assert max(map(len, batches)) == (bs + merged if n >= bs else n), (n, bs)


def test_tacos_chunks():
    qs = [mesm.Query(qid=i, official_qid=i, video_id="v", group="v", duration=1.0, sentence="s", where="w",
                     start_idx=float((7 * i) % 13) / 13, end_idx=1.0) for i in range(13)]
    qs.append(mesm.Query(qid=99, official_qid=99, video_id="w", group="w", duration=1.0, sentence="s", where="w",
                         start_idx=0.1, end_idx=0.2))
    items = mesm.gather_items(qs, 10, np.random.default_rng(0), qvh=False)
    assert [len(i) for i in items] == [10, 3, 1]
    assert sorted(items[0] + items[1]) == list(range(13))
    for it in items:
        keys = [qs[r].start_idx for r in it]
        assert keys == sorted(keys)  # each chunk sorted by start_idx


# ---------------------------------------------------------------------------------------------- synthetic + batches


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    out = {}
    for (d, v), f in mesm.VARIANTS.items():
        root = tmp_path_factory.mktemp(f"{d}-{v.replace('+', '')}")
        dims = {syn._stem(p): SMALL[syn._stem(p)] for p in f.feat_files}
        sizes = {s: (14 if s == "train" else 4) for s in syn.DEMO_SIZES[d]}
        syn.write(d, v, root, sizes=sizes, feat_dims=dims, seed=3)
        out[(d, v)] = (root, tuple(dims.values()))
    return out


def _check_static(official, static, caps, qvh):
    """static == the official arrays zero-padded (independent of to_static's code)."""
    B = len(official["qid"])
    assert int(static["num_rows"]) == B
    for k in ("video_feat", "video_mask", "words_weight", "clip_mask", "pos_idx", "neg_idx", "words_label",
              "unknown_mask", "saliency_label"):
        if k not in official:
            continue
        o, s = np.asarray(official[k]), static[k]
        assert s.shape[0] == caps.rows
        sl = (slice(0, B),) + tuple(slice(0, n) for n in o.shape[1:])
        np.testing.assert_array_equal(s[sl], o.astype(s.dtype))
        rest = s.copy()
        rest[sl] = 0
        assert not rest.any(), k
    w = np.asarray(official["words_id"])
    if w.ndim == 2:
        np.testing.assert_array_equal(static["words_id"][:B], w[:, :caps.words])
        assert not w[:, caps.words:].any()
        np.testing.assert_array_equal(static["words_mask"][:B], w[:, :caps.words] != 0)
    else:
        np.testing.assert_array_equal(static["words_feat"][:B], w)
    nc = np.asarray(official["num_clips"])
    np.testing.assert_array_equal(static["num_clips"][:len(nc)], nc)
    np.testing.assert_array_equal(static["row_group"][:B], np.repeat(np.arange(len(nc)), nc))
    assert (static["row_group"][B:] == -1).all() and (static["qid"][B:] == -1).all()
    if qvh:
        if "norm_moment" in official:
            for r in range(B):
                m = official["norm_moment"][r]["moments"]
                np.testing.assert_array_equal(static["norm_moment"][r, :len(m)], m)
                assert static["span_mask"][r].sum() == len(m)
        start = 0
        for n in nc:
            frames = np.concatenate([official["video_feat"][r][official["video_mask"][r]]
                                     for r in range(start, start + n)])
            for r in range(start, start + n):
                np.testing.assert_array_equal(static["ss_video_feat"][r, :len(frames)], frames)
                assert static["ss_video_mask"][r].sum() == len(frames)
            start += n
    else:
        np.testing.assert_array_equal(static["norm_moment"][:B, 0], official["norm_moment"])
        assert static["span_mask"][:B, 0].all() and not static["span_mask"][B:].any()


def _expected_queries(root, f, split):
    """The kept query count of a synthetic split, read back from its files by the official skip rules."""
    ann = root / f.ann_path
    path = ann / f.split_file(split)
    if f.dataset == "charades":
        csv = (ann / ("Charades_v1_test.csv" if split == "test" else "Charades_v1_train.csv")).read_text()
        dur = {r.split(",")[0]: float(r.split(",")[-1]) for r in csv.splitlines()[1:]}
        return sum(float(x.split()[1]) <= dur[x.split()[0]] for x in path.read_text().splitlines()), 1
    if f.qvh:
        return len(path.read_text().splitlines()), 0
    data = json.loads(path.read_text())
    if f.dataset == "tacos":
        return sum(s <= e for v in data.values() for s, e in v["timestamps"]), 1
    key = "duration" if f.dataset == "charades_cg" else "video_duration"
    return sum(s <= v[key] for v in data.values() for s, _ in v["timestamps"]), 1


@pytest.mark.parametrize("key", sorted(mesm.VARIANTS))
def test_synthetic_read_back(roots, key):
    d, v = key
    root, dims = roots[key]
    f = mesm.VARIANTS[key]
    for split in f.splits:
        if split == "val" and f.val_from_train > 0:
            continue
        sp = mesm.open_mesm(d, v, root, split, feat_dims=dims, pos_tagger="rule",
                            text_options=dict(sentence_split="identity"))
        n, skips = _expected_queries(root, f, split)
        assert sp.n_queries == n and sum(sp.skipped.values()) == skips, split
        train = split == "train"
        caps = sp.capacities(train)
        for b in sp.batches(7, train=train):
            _check_static(b.official, b.static, caps, f.qvh)
            for k, a in b.static.items():
                assert a.shape[:1] == () or a.shape[0] in (caps.rows, caps.items), k
                if a.dtype.kind == "f":
                    assert np.isfinite(a).all(), k
        if train:
            assert ("words_label" in b.official) == f.rec_fw
        else:
            assert "words_label" not in b.official
        if f.dataset in ("tacos",) or f.variant == "VGG_GloVe":
            assert any(sp.raw_length[k] > f.max_video_l for k in sp.raw_length) or split != "train"  # pooled
        if f.dataset == "tacos" and split == "train":
            assert max(len(it.rows) for it in sp.items) == 10 and len(sp.items) > len({it.group for it in sp.items})
        if f.qvh and split == "train":  # the 74-row window whose clip id 74 grows the saliency array
            assert 74 in sp.length.values()
        sp.close()


def test_static_check_mutant(roots):
    root, dims = roots[("qvhighlights", "C+SF_C")]
    sp = mesm.open_mesm("qvhighlights", None, root, "train", feat_dims=dims, tokenizer=StandIn(
        mesm.variant_facts("qvhighlights")))
    b = next(iter(sp.batches(1, train=True)))
    caps = sp.capacities(True)
    _check_static(b.official, b.static, caps, True)
    for key, bug in [("video_feat", lambda s: s.__setitem__((0, 0, 0), s[0, 0, 0] + 1e-3)),
                     ("pos_idx", lambda s: s.__setitem__((1, 0), s[1, 0] + 1)),
                     ("ss_video_feat", lambda s: s.__setitem__((0, 0, 0), np.nan)),
                     ("row_group", lambda s: s.__setitem__(0, 1))]:
        bad = {k: v.copy() for k, v in b.static.items()}
        bug(bad[key])
        with pytest.raises(AssertionError):
            _check_static(b.official, bad, caps, True)


def test_qvh_growth_in_static(roots):
    root, dims = roots[("qvhighlights", "C+SF_C")]
    sp = mesm.open_mesm("qvhighlights", None, root, "train", feat_dims=dims, tokenizer=StandIn(
        mesm.variant_facts("qvhighlights")))
    r = next(i for i, q in enumerate(sp.queries) if sp.length[q.video_id] == 74)
    it = next(it for it in sp.items if r in it.rows)
    other = next(it2 for it2 in sp.items if it2 is not it)
    o = sp.collate([it.rows, other.rows], np.random.default_rng(0))
    row = list(it.rows).index(r)
    assert o["saliency_label"].dtype == np.float64 and o["saliency_label"][row, 74] > 0  # grown past the video
    assert not o["video_mask"][row, 74] and o["clip_mask"][row, 74]
    st = mesm.to_static(o, sp.capacities(True))
    assert st["saliency_label"][row, 74] == o["saliency_label"][row, 74] and st["clip_mask"][row, 74]


def test_learnable_signal(roots):
    """Frames inside GT moments of the same action (different videos) align; inside vs outside do not."""
    root, dims = roots[("charades", "C+SF_C")]
    sp = mesm.open_mesm("charades", None, root, "train", feat_dims=dims, tokenizer=StandIn(
        mesm.variant_facts("charades")))
    b = next(iter(sp.batches(None, train=False)))
    o = b.official
    by_action, inside_out = {}, []
    for r, s in enumerate(o["sentence"]):
        a = next(k for k, (verb, _) in enumerate(syn.ACTIONS) if f" {verb} " in s)
        x = o["video_feat"][r][:, :-2]
        m, vm = o["clip_mask"][r], o["video_mask"][r]
        inside = x[m].mean(0)
        by_action.setdefault(a, []).append((o["video_id"][r], inside / np.linalg.norm(inside)))
        out = x[vm & ~m]
        if len(out):
            o_mean = out.mean(0)
            inside_out.append(inside @ o_mean / np.linalg.norm(inside) / np.linalg.norm(o_mean))
    same = [u @ w for vs in by_action.values() for i, (va, u) in enumerate(vs) for vb, w in vs[i + 1:] if va != vb]
    assert len(same) > 3 and np.mean(same) > 0.6 and np.mean(inside_out) < np.mean(same) - 0.3


def test_seeded_batches_and_replay_round_trip(roots, tmp_path):
    root, dims = roots[("tacos", "C3D_GloVe")]
    st = StandIn(mesm.variant_facts("tacos"))
    sp = mesm.open_mesm("tacos", None, root, "test", feat_dims=dims, tokenizer=st)
    p1, _ = sp.batch_plan(11, train=False)
    p2, _ = sp.batch_plan(11, train=False)
    p3, _ = sp.batch_plan(12, train=False)
    assert p1 == p2 and p1 != p3
    # a replay with two chunks of one video in one batch (explicit items), as the official TACoS eval can do
    plan = [[list(sp.items[i].rows) for i in range(len(sp.items))]]
    qids = [[[sp.queries[r].qid for r in it] for it in b] for b in plan]
    mesm.save_eval_batches(tmp_path / "b.json", qids)
    assert mesm.load_eval_batches(tmp_path / "b.json") == qids
    sp2 = mesm.open_mesm("tacos", None, root, "test", feat_dims=dims, tokenizer=st,
                         eval_batches=tmp_path / "b.json")
    got = [b.official for b in sp2.batches(5, train=False)]
    assert [[q for q in o["qid"]] for o in got] == [[q for it in b for q in it] for b in qids]
    assert [list(o["num_clips"]) for o in got] == [[len(it) for it in b] for b in qids]
    # the official batches saved from their dicts (explicit items) give the same batches back
    official = [b.official for b in sp.batches(4, train=False)]
    mesm.save_eval_batches(tmp_path / "c.json", official)
    sp3 = mesm.open_mesm("tacos", None, root, "test", feat_dims=dims, tokenizer=st,
                         eval_batches=tmp_path / "c.json")
    again = [b.official for b in sp3.batches(0, train=False)]
    assert [o["qid"] for o in again] == [o["qid"] for o in official]
    assert [list(o["num_clips"]) for o in again] == [list(o["num_clips"]) for o in official]
    caps = sp3.capacities(False)
    assert caps.rows == max(len(o["qid"]) for o in official)
    bad = json.loads((tmp_path / "c.json").read_text())
    bad[0][0] = bad[0][0] + [123456]
    (tmp_path / "d.json").write_text(json.dumps(bad))
    with pytest.raises(JaxprvrError, match="qid 123456"):
        mesm.open_mesm("tacos", None, root, "test", feat_dims=dims, tokenizer=st, eval_batches=tmp_path / "d.json")


def test_flat_replay_items_are_runs_of_a_video(roots, tmp_path):
    root, dims = roots[("charades", "C+SF_C")]
    st = StandIn(mesm.variant_facts("charades"))
    sp = mesm.open_mesm("charades", None, root, "test", feat_dims=dims, tokenizer=st)
    official = [b.official for b in sp.batches(2, train=False)]
    flat = [list(o["qid"]) for o in official]
    mesm.save_eval_batches(tmp_path / "f.json", flat)
    assert json.loads((tmp_path / "f.json").read_text()) == flat
    sp2 = mesm.open_mesm("charades", None, root, "test", feat_dims=dims, tokenizer=st, eval_batches=tmp_path / "f.json")
    again = [b.official for b in sp2.batches(9, train=False)]
    assert [o["qid"] for o in again] == flat
    assert [list(o["num_clips"]) for o in again] == [list(o["num_clips"]) for o in official]
    mesm.save_eval_batches(tmp_path / "g.json", [flat[0][:1]] + [flat[0][1:]] + flat[1:])
    with pytest.raises(JaxprvrError, match="at least 2 items"):
        mesm.open_mesm("charades", None, root, "test", feat_dims=dims, tokenizer=st, eval_batches=tmp_path / "g.json")


def test_train_batches_never_share_a_video_and_stats(roots):
    root, dims = roots[("tacos", "C3D_GloVe")]
    sp = mesm.open_mesm("tacos", None, root, "train", feat_dims=dims, tokenizer=StandIn(mesm.variant_facts("tacos")))
    for seed in range(5):
        plan, _ = sp.batch_plan(seed, train=True)
        for b in plan:
            groups = [sp.queries[it[0]].group for it in b]
            assert len(set(groups)) == len(groups) >= 2
        used = sum(len(it) for b in plan for it in b)
        assert used + sp.last_stats["dropped_rows"] == sp.n_queries


def test_gt_rows(roots):
    root, dims = roots[("qvhighlights", "C+SF_C")]
    st = StandIn(mesm.variant_facts("qvhighlights"))
    sp = mesm.open_mesm("qvhighlights", None, root, "test_with_gt", feat_dims=dims, tokenizer=st)
    file_rows = [json.loads(x) for x in (root / "data/qvhighlights/annotations/highlight_test_with_gt.jsonl")
                 .read_text().splitlines()]
    got = sp.gt_rows()
    assert [g["qid"] for g in got] == [r["qid"] for r in file_rows]
    assert all(g["relevant_windows"] == r["relevant_windows"] and g["saliency_scores"] == r["saliency_scores"]
               for g, r in zip(got, file_rows))
    with pytest.raises(JaxprvrError, match="test_with_gt"):
        mesm.open_mesm("qvhighlights", None, root, "test", feat_dims=dims, tokenizer=st).gt_rows()
    root, dims = roots[("charades_cg", "C+SF_C")]
    sp = mesm.open_mesm("charades_cg", None, root, "novel_word", feat_dims=dims,
                        tokenizer=StandIn(mesm.variant_facts("charades_cg")))
    assert [g["relevant_windows"] for g in sp.gt_rows()] == [[list(q.moment)] for q in sp.queries]


def test_val_holdout(roots):
    root, dims = roots[("charades", "C+SF_C")]
    st = StandIn(mesm.variant_facts("charades"))
    tr = mesm.open_mesm("charades", None, root, "train", feat_dims=dims, tokenizer=st, val_holdout=True)
    va = mesm.open_mesm("charades", None, root, "val", feat_dims=dims, tokenizer=st)
    full = mesm.open_mesm("charades", None, root, "train", feat_dims=dims, tokenizer=st)
    assert {q.group for q in tr.queries}.isdisjoint({q.group for q in va.queries})
    assert tr.n_queries + va.n_queries == full.n_queries == tr.n_queries + tr.held_out
    assert len({q.group for q in va.queries}) == round(0.1 * len({q.group for q in full.queries}))
    assert all(q.official_qid == q.qid for q in va.queries)  # an eval split: qids in the batches


# ---------------------------------------------------------------------------------------------- errors


def test_bad_features_name_the_file(roots, tmp_path):
    import shutil

    root0, dims = roots[("charades", "C+SF_C")]
    st = StandIn(mesm.variant_facts("charades"))
    for case in ("missing", "width", "nan"):
        root = tmp_path / case
        shutil.copytree(root0, root, symlinks=True)
        path = root / "data/charades/slowfast.hdf5"
        key = (root / "data/charades/annotations/charades_sta_test.txt").read_text().split()[0]
        with h5py.File(path, "a") as f:
            x = f[key][()]
            del f[key]
            if case == "width":
                f.create_dataset(key, data=x[:, :-1])
            elif case == "nan":
                x[2, 3] = np.nan
                f.create_dataset(key, data=x)
        if case != "nan":
            with pytest.raises(JaxprvrError, match=str(path)):
                mesm.open_mesm("charades", None, root, "test", feat_dims=dims, tokenizer=st)
            continue
        sp = mesm.open_mesm("charades", None, root, "test", feat_dims=dims, tokenizer=st)
        with pytest.raises(JaxprvrError, match=f"slowfast.hdf5.*{key}.*NaN"):
            list(sp.batches(None))


def test_bad_annotations(tmp_path):
    ann = tmp_path / "data/charades/annotations"
    _charades_files(ann)
    with open(ann / "charades_sta_train.txt", "a") as f:
        f.write("CCCCC 1.0 2.0##not in the csv.\n")
    with pytest.raises(JaxprvrError, match=r"charades_sta_train.txt:6.*csv"):
        _open("charades", None, tmp_path, "train", check_features=False)
    (ann / "charades_sta_train.txt").write_text("AAAAA 1.0##no end\n")
    with pytest.raises(JaxprvrError, match=r"charades_sta_train.txt:1"):
        _open("charades", None, tmp_path, "train", check_features=False)
    with pytest.raises(JaxprvrError, match="Charades_v1_test.csv.*no such file"):
        _open("charades", None, tmp_path, "test", check_features=False)


def test_qvh_clip_ids_past_the_video(tmp_path):
    ann = tmp_path / "data/qvhighlights/annotations"
    ann.mkdir(parents=True)
    rows = [dict(qid=1, query="a b.", duration=150, vid="x_0.0_150.0", relevant_windows=[[0, 4]],
                 relevant_clip_ids=[0, 1], saliency_scores=[[1, 1, 1], [1, 1, 1]]),
            dict(qid=2, query="c d.", duration=150, vid="y_0.0_150.0", relevant_windows=[[146, 150]],
                 relevant_clip_ids=[73, 75], saliency_scores=[[1, 1, 1], [1, 1, 1]])]
    (ann / "highlight_val_release.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, w in (("clip_image", 4), ("slowfast", 6)):
        _h5(tmp_path / f"data/qvhighlights/{name}.hdf5", {"x_0.0_150.0": np.ones((75, w), np.float32),
                                                          "y_0.0_150.0": np.ones((74, w), np.float32)})
    with pytest.raises(JaxprvrError, match="highlight_val_release.jsonl:2.*75"):
        _open("qvhighlights", None, tmp_path, "val", feat_dims=(4, 6))


def test_capacity_overflow():
    o = dict(qid=[1, 2, 3], num_clips=np.array([2, 1]), video_feat=np.zeros((3, 5, 4), np.float32),
             video_mask=np.ones((3, 5), bool), words_id=np.ones((3, 4), np.int64), words_weight=np.ones((3, 4)),
             duration=np.ones(3, np.float32), norm_moment=np.zeros((3, 2), np.float32),
             norm_span=np.zeros((3, 2), np.float32))
    caps = mesm.Capacities(rows=3, items=2, video=5, words=4, windows=1, contra=0)
    st = mesm.to_static(o, caps)
    assert st["video_feat"].shape == (3, 5, 4) and list(st["row_group"]) == [0, 0, 1]
    with pytest.raises(JaxprvrError, match="capacities"):
        mesm.to_static(o, mesm.Capacities(rows=2, items=2, video=5, words=4, windows=1, contra=0))


# ---------------------------------------------------------------------------------------------- count files, CLI


def test_count_files_follow_tokenized_count(roots):
    root, _ = roots[("tacos", "C3D_GloVe")]
    ann = root / "data/TACoS/annotations"
    sentences = [s for split in ("train.json", "test.json")
                 for v in json.loads((ann / split).read_text()).values() for s in v["sentences"]]
    counts = {}
    for s in sentences:  # tokenized_count.py L9-18 by hand: lower, punctuation -> space
        for w in "".join(" " if c in ".,!?'\"-" else c for c in s.lower()).split():
            counts[w] = counts.get(w, 0) + 1
    lines = (ann / "GloVe_tokenized_count.txt").read_text().splitlines()
    assert {ln.split()[0]: int(ln.split()[2]) for ln in lines} == counts
    ordered = sorted(counts)
    assert all(int(ln.split()[1]) == ordered.index(ln.split()[0]) + 2 for ln in lines)  # <PAD>, <UNK>, sorted
    assert [int(ln.split()[2]) for ln in lines] == sorted((int(ln.split()[2]) for ln in lines), reverse=True)
    glove = (root / "pretrained_models/glove.6B.300d.txt").read_text().splitlines()
    assert all(len(g.split(" ")) == 301 for g in glove) and "he" not in {g.split()[0] for g in glove}
    cg_root, _ = roots[("charades_cg", "C+SF_C")]
    cg = cg_root / "data/Charades-CG/CLIP_tokenized_count.txt"
    assert cg.read_text() == (cg_root / "data/charades/annotations/CLIP_tokenized_count.txt").read_text()


def test_clip_count_file(roots):
    """count_CLIP_tokenizer (data/tokenized_count.py L21-107) by hand: ids 1..n-1 of [SOT] + 14 tokens + [EOT] of
    the train and test lines that the reader keeps (start <= duration), sorted by count (ties: first seen)."""
    from jaxprvr.text.clip_bpe import load_tokenizer

    root, _ = roots[("charades", "C+SF_C")]
    ann = root / "data/charades/annotations"
    tok, counts = load_tokenizer(), {}
    for split in ("train", "test"):
        csv = (ann / f"Charades_v1_{split}.csv").read_text().splitlines()[1:]
        dur = {r.split(",")[0]: float(r.split(",")[-1]) for r in csv}
        for line in (ann / f"charades_sta_{split}.txt").read_text().splitlines():
            head, sentence = line.split("##")
            vid, start, _ = head.split()
            if float(start) > dur[vid]:
                continue
            ids = [49406] + tok.encode(sentence.rstrip())[:14] + [49407]
            for j in range(1, len(ids) - 1):
                counts[ids[j]] = counts.get(ids[j], 0) + 1
    want = [f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    assert (ann / "CLIP_tokenized_count.txt").read_text().splitlines() == want


def test_demo_root(tmp_path, monkeypatch):
    monkeypatch.setitem(syn.DEMO_SIZES, "charades_cd", {"train": 3, "val": 2, "test_iid": 2, "test_ood": 2})
    root = syn.demo_root("charades_cd", cache_dir=tmp_path)
    assert root == tmp_path / "mesm-charades_cd-CSF_C-v1" and syn.demo_root("charades_cd", cache_dir=tmp_path) == root
    with h5py.File(root / "data/charades/slowfast.hdf5") as f:
        assert {f[k].shape[1] for k in f} == {2304} and {f[k].dtype for k in f} == {np.dtype("float16")}
    sp = mesm.open_mesm("charades_cd", None, root, "test_ood", tokenizer=StandIn(mesm.variant_facts("charades_cd")))
    b = next(iter(sp.batches(0)))
    assert b.static["video_feat"].shape[2] == 2816 + 2 and b.static["video_feat"].dtype == np.float32


def test_cli_main(tmp_path, capsys):
    rc = syn.main(["--dataset", "charades_cd", "--model", "mesm", "--out", str(tmp_path / "o"), "--sizes",
                   "train=3,val=2,test_iid=2,test_ood=2", "--feat-dims", "clip_image=4,slowfast=4"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["variant"] == "C+SF_C" and out["feat_dims"] == {"clip_image": 4, "slowfast": 4}
    assert (tmp_path / "o/data/Charades-CD/charades_test_ood.json").is_file()
    rc = syn.main(["--dataset", "charades_cd", "--out", str(tmp_path / "o")])  # exists: one-line error
    assert rc == 2 and "exist" in capsys.readouterr().err
