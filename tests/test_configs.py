"""Configs: every file loads, official values (ms-sl ``method/config.py`` and ``do_*.sh``; GMMFormer,
GMMFormer_v2 and MTM ``src/Configs/{tvr,act,cha}.py``) and strict overrides."""

import pytest

from jaxprvr import registry
from jaxprvr.config import RENAMED, config_table, configs_of, load_config
from jaxprvr.errors import JaxprvrError

# (model, dataset) -> official values transcribed from those official files.
OFFICIAL = {
    ("ms_sl", "tvr"): dict(lr=2.5e-4, margin=0.1, drop=0.1, seed=2018, clip_w=0.7, q=768),
    ("ms_sl", "cha"): dict(lr=2.5e-4, margin=0.2, drop=0.1, seed=2018, clip_w=0.5, q=1024),
    ("gmmformer", "tvr"): dict(lr=3e-4, margin=0.1, drop=0.2, seed=9527, clip_w=0.7, q=768, hard=30),
    ("gmmformer", "cha"): dict(lr=2.5e-4, margin=0.2, drop=0.15, seed=9527, clip_w=0.7, q=1024, hard=100),
    ("gmmformer_v2", "tvr"): dict(lr=3e-4, margin=0.1, drop=0.2, seed=9527, clip_w=0.7, q=768, sft=0.09),
    ("gmmformer_v2", "act"): dict(lr=2.5e-4, margin=0.2, drop=0.31, seed=9527, clip_w=0.7, q=1024, sft=0.6),
    ("gmmformer_v2", "cha"): dict(lr=2e-4, margin=0.2, drop=0.25, seed=9527, clip_w=0.7, q=1024, sft=0.6),
    # MTM (``src/Configs/{tvr,act,cha}.py``): batch, epochs, branch weights, loss factors, EMA per dataset.
    ("mtm", "tvr"): dict(lr=2.5e-4, margin=0.1, drop=0.2, seed=9527, clip_w=0.7, q=768, sft=0.09, hard=50,
                         bsz=32, epochs=200, w=(0.35, 0.03), lf=(0.05, 0.04, 7e-5, 0.09, 0.015), rec=0.4, ema=False),
    ("mtm", "act"): dict(lr=2.5e-4, margin=0.2, drop=0.31, seed=9527, clip_w=0.7, q=1024, sft=0.6, hard=50,
                         bsz=64, epochs=150, w=(0.5, 0.15), lf=(0.02, 0.04, 0.003, 0.11, 0.07), rec=0.6, ema=True),
    ("mtm", "cha"): dict(lr=2.5e-4, margin=0.2, drop=0.25, seed=9527, clip_w=0.7, q=1024, sft=0.6, hard=50,
                         bsz=128, epochs=200, w=(0.25, 0.04), lf=(0.02, 0.04, 0.003, 0.11, 0.03), rec=0.6, ema=False),
}


@pytest.mark.parametrize("model", registry.names("prvr"))
@pytest.mark.parametrize("dataset", ["tvr", "act", "cha"])
def test_every_config_loads(model, dataset):
    cfg = load_config(dataset, model)
    assert cfg.model.name == model and cfg.data.dataset == dataset
    assert (cfg.model.hidden_size, cfg.model.n_heads, cfg.model.max_ctx_l, cfg.model.max_desc_l) == (384, 4, 128, 30)
    bsz, epochs = (OFFICIAL[(model, dataset)]["bsz"], OFFICIAL[(model, dataset)]["epochs"]) if model == "mtm" else (128, 100)
    assert (cfg.train.batch_size, cfg.train.n_epoch, cfg.train.max_es_cnt, cfg.train.wd) == (bsz, epochs, 10, 0.01)
    assert cfg.data.max_ctx_l == cfg.model.max_ctx_l


@pytest.mark.parametrize("key", sorted(OFFICIAL))
def test_official_values(key):
    model, dataset = key
    cfg, want = load_config(dataset, model), OFFICIAL[key]
    assert cfg.train.lr == want["lr"] and cfg.loss.margin == want["margin"]
    assert cfg.model.drop == want["drop"] == cfg.model.input_drop
    assert cfg.train.seed == want["seed"] and cfg.model.clip_scale_w == want["clip_w"]
    assert cfg.model.q_feat_size == want["q"]
    if "hard" in want:
        assert cfg.loss.hard_negative_start_epoch == want["hard"]
    if "sft" in want:
        assert cfg.model.sft_factor == want["sft"]
    if model == "mtm":
        assert (cfg.model.frame_scale_w, cfg.model.video_scale_w) == want["w"]
        lo = cfg.loss
        assert (lo.w_clip_nce, lo.w_frame_nce, lo.w_qdl, lo.w_ot, lo.w_video_nce) == want["lf"]
        assert lo.w_recon == want["rec"]
        assert cfg.train.use_ema is want["ema"] and cfg.train.ema_decay == 0.9995
        assert (lo.w_clip_trip, lo.w_frame_trip, lo.w_video_trip) == (1.0, 1.0, 1.0) and cfg.model.num_mamba_layers == 2


def test_alias_and_path_forms():
    assert load_config("tvr").model.name == registry.DEFAULT_MODEL["tvr"]
    assert load_config("gmmformer/act").model.name == "gmmformer"
    with pytest.raises(JaxprvrError, match="--model"):
        load_config("gmmformer/act", model="ms_sl")


def test_overrides_are_typed_and_strict():
    cfg = load_config("tvr", "gmmformer", overrides=["train.n_epoch=3", "train.lr=1e-3", "model.gmm_fixed_length=true",
                                        "loss.w_qdl=0.3", "model.max_ctx_l=64"])
    assert cfg.train.n_epoch == 3 and cfg.train.lr == 1e-3 and cfg.model.gmm_fixed_length is True
    assert cfg.loss.w_qdl == 0.3
    assert cfg.data.max_ctx_l == 64  # shared length fields follow the model section
    for bad, where in [("train.lrr=1", "train.lrr"), ("training.lr=1", "training.lr"), ("lr=1", "lr"),
                       ("train.n_epoch=two", "train.n_epoch"), ("model.gmm_fixed_length=maybe", "gmm_fixed_length"),
                       ("train.lr", "--set")]:
        with pytest.raises(JaxprvrError, match=where):
            load_config("tvr", overrides=[bad])
    with pytest.raises(JaxprvrError, match="--config"):
        load_config("webvid")


def test_family_fields_stay_in_their_family():
    """A field of another family is an error listing this family's fields; old positional names name the new ones."""
    with pytest.raises(JaxprvrError, match=r"model \(MSSLConfig\)"):
        load_config("tvr", "ms_sl", overrides=["model.sft_factor=0.5"])
    with pytest.raises(JaxprvrError, match="GMMFormerLossConfig"):
        load_config("tvr", "gmmformer", overrides=["loss.w_ot=0.5"])
    for old in RENAMED:
        with pytest.raises(JaxprvrError, match="new name"):
            load_config("tvr", "mtm", overrides=[f"{old}=1"])
    with pytest.raises(JaxprvrError, match="--model"):
        load_config("tvr", overrides=["model.name=ms_sl"])


def test_config_table_and_mismatched_model():
    rows = {r["config"]: r for r in config_table()}
    tasks = {"tvr": "prvr", "act": "prvr", "cha": "prvr", "activitynet": "vmr", "tacos": "vmr", "charades": "vmr",
             "msrvtt": "t2v", "msvd": "t2v", "lsmdc": "t2v", "charades_cg": "vmr", "charades_cd": "vmr",
             "qvhighlights": "vmr"}
    assert set(rows) == set(tasks)
    assert {"mrnet", "mesm"} <= set(rows["charades"]["models"]) and rows["charades"]["default"] == "mrnet"
    assert rows["qvhighlights"]["models"] == ["mesm"]
    for ds, r in rows.items():
        assert r["task"] == tasks[ds] and r["default"] in r["models"]
        assert sorted(r["models"]) == sorted(m for m in registry.names() if ds in configs_of(m))
    with pytest.raises(JaxprvrError, match="--model"):
        load_config("tvr", model="clip4clip")


def test_checkpoint_model_config_round_trip():
    from jaxprvr.config import model_config_from_dict

    for model in registry.names():
        cfg = load_config(configs_of(model)[0], model).model
        assert model_config_from_dict(dict(cfg.__dict__)) == cfg
    old = dict(load_config("tvr", "ms_sl").model.__dict__, sft_factor=0.09, video_scale_w=0.0)  # flat schema
    assert model_config_from_dict(old) == load_config("tvr", "ms_sl").model
    with pytest.raises(JaxprvrError, match="sft_factor"):
        model_config_from_dict(dict(old, sft_factor=0.5))


def test_vmr_configs_hold_the_released_settings():
    """configs/mrnet/*.py against the released checkpoints/best/*/config.yml values (vmr.md A2.2, A4)."""
    want = {  # dataset: (num_pre_clips, num_clips, pooling, predictor k x layers, trans layers, att_mode, softmax,
        #                   variant, lr, batch, epochs, milestones, nms, pow, thresholds)
        "activitynet": (256, 64, (15, 8, 8), (9, 4), 2, "all", True, "projected", 8e-4, 12, 15, (7, 15), 0.5, 0.5,
                        (0.3, 0.5, 0.7)),
        "charades": (128, 64, (15, 8, 8), (17, 2), 4, "v", False, "projected", 1e-4, 12, 25, (8, 13), 0.5, 0.5,
                     (0.3, 0.5, 0.7)),
        "tacos": (512, 128, (15, 8, 8, 8), (5, 3), 1, "all", True, "mha", 1.5e-3, 2, 250, (130, 190), 0.4, 0.3,
                  (0.1, 0.3, 0.5)),
    }
    for ds, w in want.items():
        c = load_config(ds)
        m, t, d = c.model, c.train, c.data
        got = (m.num_pre_clips, m.num_clips, m.pooling_counts, (m.predictor_kernel, m.predictor_layers),
               m.trans_layers, m.att_mode, m.att_softmax, m.ret_variant, t.lr, t.batch_size, t.n_epoch, t.milestones,
               d.nms_thresh, d.contrastive_score_pow, d.iou_thresholds)
        assert got == w, ds
        assert d.num_pre_clips == m.num_pre_clips and m.name == "mrnet"
    with pytest.raises(JaxprvrError, match="configs of mrnet"):
        load_config("tvr", "mrnet")
    with pytest.raises(JaxprvrError, match="sft_factor"):
        load_config("activitynet", overrides=["model.sft_factor=0.5"])
    assert load_config("charades").train.eval_split == "test"  # no val split (docs/quirks.md)
