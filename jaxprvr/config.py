"""The typed, frozen configuration schema: a base per section, one model and loss config type per family.

A config is ``Config(model, data, loss, train)``. The section types come from the family's registry row
(:mod:`jaxprvr.registry`: model and loss config types) and from its task (:data:`DATA_CONFIGS`: the data
config type), so a family's fields never sit beside another family's: ``--set model.sft_factor=0.5`` on
MS-SL is an error that lists MS-SL's model fields.

Each ``configs/<model>/<dataset>.py`` has a ``get_config()`` returning one, with the official
hyperparameters (:func:`make_config`). :func:`load_config` finds it (``"tvr"``: the default model of that
dataset; ``"gmmformer_v2/act"``: a file by name). Overrides go through :func:`apply_overrides`
(``--set train.lr=1e-4``), which checks that the key exists and converts the value to the field's type, so a
typo fails at load time; a field that was renamed gives an error naming its new name(s) (:data:`RENAMED`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import Any

from jaxprvr.errors import JaxprvrError

# ---------------------------------------------------------------------------------------------- datasets

# Dataset names per task -> on-disk facts. Each fact is written into every config section (model, data) that
# has a field of that name (make_config). PRVR: the MS-SL feature release, named as the official ``-d`` flags
# (docs/data.md): visual feature folder and dims.
DATASETS: dict[str, dict[str, dict[str, Any]]] = {
    "prvr": {
        "tvr": dict(collection="tvr", visual_feature="i3d_resnet", visual_feat_dim=3072, q_feat_size=768),
        "act": dict(collection="activitynet", visual_feature="i3d", visual_feat_dim=1024, q_feat_size=1024),
        "cha": dict(collection="charades", visual_feature="i3d_rgb_lgi", visual_feat_dim=1024, q_feat_size=1024),
    },
    # Video moment retrieval, MMN-format data (jaxprvr.data.mmn_format; docs/data.md): the paths of the official
    # ret/config/paths_catalog.py L8-55 re-rooted under --data-root ("/a/b" -> ROOT/a/b, "./dataset/x" ->
    # ROOT/dataset/x), the feature layout (video_mode) and its width, the fixed clip count after resampling.
    "vmr": {
        "activitynet": dict(ann_dir="dataset/ActivityNet", video_feat="hujingjing2/Spoken_Video_Grounding/data/activity-c3d",
                            query_feat_dir="hujingjing2/data/ActivityNet/text_distbert_feat", video_mode="c3d_h5",
                            splits=("train", "val", "test"), input_size=500, num_pre_clips=256),
        "tacos": dict(ann_dir="dataset/TACoS", video_feat="hujingjing2/data/TACoS/tall_c3d_features_pca.hdf5",
                      query_feat_dir="hujingjing2/data/TACoS/text_distbert_feat_new", video_mode="c3d_hdf5",
                      splits=("train", "val", "test"), input_size=500, num_pre_clips=512),
        # MESM's own datasets (jaxprvr.data.mesm.VARIANTS holds their facts; Charades and TACoS there are the official
        # MESM layout, not MMN's)
        "charades_cg": dict(),
        "charades_cd": dict(),
        "qvhighlights": dict(),
        "charades": dict(ann_dir="dataset/Charades_STA", video_feat="hujingjing2/data/data/features/i3d_finetuned",
                         query_feat_dir="hujingjing2/data/Charades_STA/text_distbert_feat", video_mode="i3d_npy",
                         splits=("train", "test"), input_size=1024, num_pre_clips=128),
    },
    # Text-video retrieval from raw videos (BackBone_tvr's loaders; jaxprvr.data.t2v, docs/data.md).
    "t2v": {
        "msrvtt": dict(splits=("train", "val", "test")),
        "msvd": dict(splits=("train", "val", "test")),
        "lsmdc": dict(splits=("train", "val", "test")),
    },
}


def task_of_dataset(dataset: str) -> str:
    for task, table in DATASETS.items():
        if dataset in table:
            return task
    raise JaxprvrError("--config", f"a dataset in {all_datasets()} or <model>/<dataset>", repr(dataset))


def all_datasets() -> list[str]:
    return [d for table in DATASETS.values() for d in table]


# ---------------------------------------------------------------------------------------------- base sections

@dataclass(frozen=True)
class ModelConfig:
    """Fields every model has."""

    name: str = ""
    # Compute dtype of activations and matmuls: "float32" (official, the parity suites) or "bfloat16"
    # (parameters, optimizer state, softmax/LayerNorm statistics, scan states, scores and losses stay float32;
    # jaxprvr.models.layers.resolve_compute_dtype validates it when the model is built).
    compute_dtype: str = "float32"


@dataclass(frozen=True)
class DataConfig:
    """Fields every task's data section has."""

    dataset: str = ""
    prefetch: int = 2  # batches prepared ahead on a background thread (0 = synchronous)
    # Threads building training batches in parallel (batches and their order do not change); 0 = auto:
    # cpu_count // 4, between 1 and 8 (on 2 cores a pool is slower than one thread: benchmarks.prvr "input").
    workers: int = 0


@dataclass(frozen=True)
class LossConfig:
    """Base of the per-family loss sections (no common field)."""


@dataclass(frozen=True)
class TrainConfig:
    """The generic loop's fields (jaxprvr.train) and the optimizer recipe's common ones."""

    lr: float = 3e-4
    lr_warmup_proportion: float = 0.01
    wd: float = 0.01
    batch_size: int = 128  # PRVR: videos per batch (all their queries come along)
    n_epoch: int = 100
    max_es_cnt: int = 10  # early stopping: stop once this many epochs in a row did not improve (-1: never)
    seed: int = 9527
    max_grad_norm: float = 1.0  # BertAdam's per-tensor clip
    log_every: int = 10
    # Exponential moving average of the weights (MTM Opts/optimization.py EMA), updated after every step;
    # validation, test and the "best" selection then use the averaged weights.
    use_ema: bool = False
    ema_decay: float = 0.9995
    ckpt_every_steps: int = 0  # 0: save "latest" at each epoch end only


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- PRVR

@dataclass(frozen=True)
class PRVRDataConfig(DataConfig):
    """The MS-SL feature release (jaxprvr.data.dataset): collection folder, feature name, lengths, eval blocks."""

    collection: str = "tvr"
    visual_feature: str = "i3d_resnet"
    max_desc_l: int = 30  # the three length fields follow the model section's (_sync)
    max_ctx_l: int = 128
    map_size: int = 32
    eval_query_bsz: int = 50
    eval_context_bsz: int = 100
    query_capacity_multiple: int = 8  # padded query count per batch is rounded up to this


@dataclass(frozen=True)
class PRVRModelConfig(ModelConfig):
    """Fields of every PRVR model (the shared query branch, inputs and the fused test-time score)."""

    hidden_size: int = 384
    n_heads: int = 4
    input_drop: float = 0.1  # dropout inside LinearLayer (before the Linear) and after the positional LN
    drop: float = 0.1  # attention-probability and hidden dropout
    q_feat_size: int = 768
    visual_feat_dim: int = 3072  # overwritten from shape.txt at run time
    max_desc_l: int = 30
    max_ctx_l: int = 128
    map_size: int = 32
    # Test-time branch weights of the fused score.
    clip_scale_w: float = 0.7
    frame_scale_w: float = 0.3


@dataclass(frozen=True)
class MSSLConfig(PRVRModelConfig):
    name: str = "ms_sl"


@dataclass(frozen=True)
class GMMConfig(PRVRModelConfig):
    """The Gaussian-mixture families (GMMFormer, GMMFormer v2, MTM)."""

    # How the K Gaussian attention branches of a GMMBlock/DyGMMBlock run (same math, same parameter layout):
    # "batched" (one vmapped computation: ~30% fewer XLA ops, 22-36% shorter compiles), "loop" (K separate
    # modules: on 2 CPU cores their independent ops keep both cores busy, a train step up to 9% faster), or "auto"
    # ("loop" on CPU, "batched" on GPU/TPU). docs/benchmarks.md has the measurements.
    branch_impl: str = "auto"


@dataclass(frozen=True)
class GMMFormerConfig(GMMConfig):
    name: str = "gmmformer"
    # GMMFormer v1 quirk: the Gaussian grid of the frame branch is built on the padded *batch* length.
    # False (official) keeps that; True builds it on the fixed max_ctx_l (docs/quirks.md).
    gmm_fixed_length: bool = False


@dataclass(frozen=True)
class GMMFormerV2Config(GMMConfig):
    name: str = "gmmformer_v2"
    sft_factor: float = 0.09  # temperature of the softmax over Gaussian branches (TCM)


@dataclass(frozen=True)
class MTMConfig(GMMFormerV2Config):
    name: str = "mtm"
    video_scale_w: float = 0.0  # test-time weight of the third (video-level) branch
    num_mamba_layers: int = 2  # (Mamba, LayerNorm) pairs in the clip and frame branches (config.num_mamba_layers)


@dataclass(frozen=True)
class PRVRLossConfig(LossConfig):
    """MS-SL's loss fields; its NCE weights are hard-coded officially (jaxprvr.losses.prvr.MS_SL_*_WEIGHT)."""

    margin: float = 0.1  # triplet margin
    hard_negative_start_epoch: int = 20
    hard_pool_size: int = 20


@dataclass(frozen=True)
class GMMFormerLossConfig(PRVRLossConfig):
    """GMMFormer ``loss_factor = [w_clip_nce, w_frame_nce, w_qdl]``, ``neg_factor = [qdl_margin, qdl_alpha]``."""

    w_clip_nce: float = 0.05
    w_frame_nce: float = 0.04
    w_qdl: float = 1e-3
    qdl_margin: float = 0.15  # m_q of the query diverse loss
    qdl_alpha: float = 32.0  # its scale


@dataclass(frozen=True)
class GMMFormerV2LossConfig(GMMFormerLossConfig):
    """v2 adds ``loss_factor[3] = w_ot`` (optimal matching) and ``neg_factor[2] = qdl_lambda`` (QDL v2 focal power)."""

    w_qdl: float = 8e-5
    w_ot: float = 0.09
    qdl_lambda: float = 1.0


@dataclass(frozen=True)
class MTMLossConfig(GMMFormerV2LossConfig):
    """MTM adds ``loss_factor[4] = w_video_nce``, ``triplet_loss_factor = [w_clip_trip, w_frame_trip,
    w_video_trip]`` and ``lambda_recon = w_recon`` (text + video reconstruction)."""

    w_video_nce: float = 0.0
    w_clip_trip: float = 1.0
    w_frame_trip: float = 1.0
    w_video_trip: float = 1.0
    w_recon: float = 0.0


# ---------------------------------------------------------------------------------------------- VMR


@dataclass(frozen=True)
class VMRDataConfig(DataConfig):
    """MMN-format moment retrieval data (jaxprvr.data.mmn_format) and the evaluation protocol
    (ret/data/datasets/evaluation.py). Paths are relative to --data-root unless absolute."""

    ann_dir: str = ""  # holds {split}_audio_new.json
    video_feat: str = ""  # a folder of <vid>.h5 / <vid>.npy, or one hdf5 file (video_mode)
    query_feat_dir: str = ""  # <audio stem>.pt per query, (1, 768): text features
    # data.query_modality=speech reads speech features (SLMR) from speech_feat_dir instead (the same model;
    # preprocess/audio_encode.py L168-174 writes audio_wav2vec2_feat / audio_data2vec_feat beside the text ones).
    query_modality: str = "text"
    speech_feat_dir: str = ""
    video_mode: str = "c3d_h5"  # "c3d_h5" (ANet: <vid>.h5['feature']), "c3d_hdf5" (TACoS: one file keyed <vid>),
    #                             "i3d_npy" (Charades: <vid>.npy, (T,1,1,D))
    splits: tuple[str, ...] = ("train", "val", "test")  # the annotation files the dataset has
    num_pre_clips: int = 256  # follows model.num_pre_clips (_sync)
    # Evaluation (ret/data/datasets/evaluation.py; TEST.* of the official config).
    iou_thresholds: tuple[float, ...] = (0.3, 0.5, 0.7)
    nms_thresh: float = 0.5
    contrastive_score_pow: float = 0.5
    eval_batch_size: int = 12  # TEST.BATCH_SIZE: videos per evaluation batch
    topk: int = 10  # moments kept per query after NMS (predictions.json; R@k needs k <= topk)
    query_capacity_multiple: int = 8  # per-video query slots are the split's max count rounded up to this
    # A query whose span is empty after clamping to [0, duration] (e <= s): "error" names it; "keep" trains and
    # evaluates it as the official code does (an all-zero IoU target; ActivityNet train has 4: docs/quirks.md).
    empty_spans: str = "error"


@dataclass(frozen=True)
class VMRTrainConfig(TrainConfig):
    """The moment-retrieval recipe (MRNet train_net.py / trainer.py): AdamW, MultiStepLR per 1-based epoch,
    global-norm clipping, evaluation every ``test_period`` epochs from ``skip_test`` on ``eval_split``."""

    lr: float = 8e-4
    wd: float = 1e-5
    adam_b1: float = 0.9
    adam_b2: float = 0.99
    batch_size: int = 12  # videos per batch, each with all its queries
    n_epoch: int = 15
    milestones: tuple[int, ...] = (7, 15)  # MultiStepLR: x lr_gamma after these (1-based) epochs
    lr_gamma: float = 0.1
    max_grad_norm: float = 5.0  # clip_grad_norm_: g * min(1, max / (||g|| + 1e-6))
    seed: int = 25285
    test_period: int = 1
    skip_test: int = 0  # no evaluation before this (1-based) epoch
    # The split evaluated during training and used to select "best" (official: the test split, no selection;
    # "val" is the honest protocol where the dataset has one: docs/quirks.md).
    eval_split: str = "val"
    max_es_cnt: int = -1


@dataclass(frozen=True)
class MRNetConfig(ModelConfig):
    """MRNet (xian-sh/MRNet ret/modeling/ret_model/; MODEL.RET.* and SOLVER.* of checkpoints/best/*/config.yml)."""

    name: str = "mrnet"
    input_size: int = 500  # FEATPOOL.INPUT_SIZE (the video feature width)
    num_pre_clips: int = 256  # INPUT.NUM_PRE_CLIPS: clips after resampling the raw features
    num_clips: int = 64  # NUM_CLIPS: N of the N x N proposal map (FeatAvgPool stride num_pre_clips // num_clips)
    featpool_hidden: int = 512  # FEATPOOL.HIDDEN_SIZE
    featpool_kernel: int = 4  # FEATPOOL.KERNEL_SIZE
    pooling_counts: tuple[int, ...] = (15, 8, 8)  # FEAT2D.POOLING_COUNTS
    joint_space: int = 256  # JOINT_SPACE_SIZE (d_model of TransRet)
    text_dim: int = 768  # INPUT_TEXT_DIM
    predictor_hidden: int = 512  # PREDICTOR.HIDDEN_SIZE
    predictor_kernel: int = 9  # PREDICTOR.KERNEL_SIZE
    predictor_layers: int = 4  # PREDICTOR.NUM_STACK_LAYERS
    trans_layers: int = 2  # SOLVER.TRANS_LAYER
    n_heads: int = 8  # SOLVER.N_HEAD
    ffn_dim: int = 1024
    gamma: float = 0.98  # SOLVER.GAMMA: the decay of the retention mask
    d_double: bool = True  # SOLVER.D_DOUBLE: D + D^T (two-sided decay, diagonal 2)
    mask_mode: str = "both"  # SOLVER.MASK_MODE: no | ret | sparse | both
    att_mode: str = "all"  # SOLVER.ATT_MODE: all (joint text+video sequence) | v (video-video only)
    # SOLVER.ATT_SOFTMAX. False is the official zero attention output (ret_model.py L145-157; the released
    # Charades config): docs/quirks.md.
    att_softmax: bool = True
    att_dropout: float = 0.0  # SOLVER.ATT_DROPOUT on the attention probabilities (None -> 0)
    # "projected": ret_model.py (six bias-free W as x @ W, one output Linear; ANet, Charades);
    # "mha": ret_model_tacos.py (four Linears with bias; TACoS).
    ret_variant: str = "projected"
    input_dropout: float = 0.5  # input_vid_proj LinearLayer dropout
    dropout: float = 0.1  # TransRet residual dropouts
    # How the attention runs (same math): "parallel" (the full (n_q+N)^2 logits) or "chunkwise" (key blocks of
    # attention_chunk with an online softmax; memory linear in the sequence length).
    attention_impl: str = "parallel"
    attention_chunk: int = 64


@dataclass(frozen=True)
class MRNetLossConfig(LossConfig):
    """MODEL.RET.LOSS.* and the SOLVER weights of the total (ret/engine/trainer.py L90-106)."""

    min_iou: float = 0.5
    max_iou: float = 1.0
    num_pos_proposals: int = 1  # NUM_POSTIVE_VIDEO_PROPOSAL
    margin: float = 0.3
    tau_video: float = 0.1
    tau_sent: float = 0.1
    neg_video_iou: float = 0.5  # NEGATIVE_VIDEO_IOU
    sent_removal_iou: float = 0.5  # SENT_REMOVAL_IOU
    w_contrastive: float = 0.1  # CONTRASTIVE_WEIGHT
    w_sparse: float = 10.0  # SPARSE_WEIGHT
    loss_ratio: float = 0.15  # LOSS_RATIO: sparsity doubled when w_sparse * L_sp >= loss_ratio * batch * w_sparse
    only_iou_epoch: int = 6  # ONLY_IOU: the last (1-based) epoch with the full loss; later ones scale it by 0.01


@dataclass(frozen=True)
class MESMConfig(ModelConfig):
    """MESM (lntzm/MESM @ 8501bdea; model/model.py, model/transformer.py, builders runner.py L160-298): the
    fields of the official ``config/<dataset>/<variant>.json`` that shape the model, under their official names.

    ``v_feat_dim`` is the width of the concatenated feature files *before* the TEF columns (the json's value);
    the model's video input is ``v_feat_dim + 2`` when ``use_tef`` (utils/config.py L242-243 adds the 2 at parse
    time)."""

    name: str = "mesm"
    v_feat_dim: int = 2816  # clip_image 512 + slowfast 2304 (C+SF); vgg 4096; c3d 4096
    t_feat_dim: int = 512  # CLIP last_hidden_state 512; GloVe 300
    use_tef: bool = True
    tokenizer_type: str = "CLIP"  # "CLIP" | "GloVeNLTK"
    # GloVeNLTK with CPL's glove.pkl (Charades VGG): the 300-d word vectors are the input (no text encoder); the
    # words are L2-normalised first, the mask is recomputed as sum != 0 and the sentence is the mean of the
    # normalised words (model.py L145-152). Follows data.load_vocab_pkl (_sync).
    load_vocab_pkl: bool = False
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.1
    input_dropout: float = 0.5
    n_input_proj: int = 2
    num_recfw_layers: int = 2  # the FW-MESM enhancer (enhance_encoder)
    t2v_layers: int = 2  # the aligner (t2v_encoder)
    enc_layers: int = 2
    dec_layers: int = 2
    num_recss_layers: int = 4  # SS-MESM's T2V layers
    num_queries: int = 10
    share_MLP: bool = True  # False: T2VEncoder_TwoMLP (TACoS), the MLM pass uses the second FFN and norms
    rec_fw: bool = True
    rec_ss: bool = True
    aux_loss: bool = True
    use_txt_pos: bool = False
    max_words_l: int = 16  # follows data.max_words_l (_sync)
    max_video_l: int = 194  # follows data.max_video_l (_sync)
    vocab_size: int = 1111  # MLM classes: vocab_size + 3 (CLIP: <unknown>, <start>, <end>) or + 1 (GloVe)
    # "head_major" (official): T2V's attn_mask built with repeat(nhead, 1, 1) but read batch-major, so row b, head
    # h gets the mask of row (b * nhead + h) mod B (B = the real rows of the batch); "per_row": each row its own
    # mask (docs/quirks.md).
    t2v_mask: str = "head_major"
    # SS-MESM's sentence slots per row (>= the most queries of one item in a batch); 0 = the batch's row count. The
    # task sets it from the training split (jaxprvr.tasks.vmr_detr); no parameter depends on it.
    ss_slots: int = 0
    # The frozen CLIP text tower: OpenAI-format weights (ViT-B-32.pt, MESM's clip_text_encoder.pth, a
    # parity.convert clip2jax directory); "" = a random tower at the sizes below (--demo, tests).
    clip: str = ""
    clip_dtype: str = "fp16"  # "fp16": convert_weights as officially (LayerNorm in fp32); "fp32"
    clip_width: int = 512
    clip_layers: int = 12
    clip_heads: int = 0  # 0: width // 64
    clip_vocab_size: int = 49408
    clip_context_length: int = 77


@dataclass(frozen=True)
class MESMLossConfig(LossConfig):
    """The criterion and matcher weights (runner.py L300-345; config/<dataset>/<variant>.json)."""

    set_cost_span: float = 10.0
    set_cost_giou: float = 1.0
    set_cost_class: float = 4.0
    loss_span_coef: float = 10.0
    loss_giou_coef: float = 1.0
    loss_label_coef: float = 4.0
    loss_saliency_coef: float = 4.0
    eos_coef: float = 0.1
    loss_recfw_coef: float = 0.1
    loss_recss_coef: float = 0.1
    iou_gamma: float = 0.9  # SS-MESM positives: GIoU >= iou_gamma within a video
    recss_tau: float = 0.5
    rank_coef: float = 12.0
    use_triplet: bool = False
    saliency_margin: float = 0.2
    label_smoothing: float = 0.1  # FW-MESM's MLM loss (criterion.py L276-306)
    # The saliency neg_pair term -log(1 - sigmoid(s)): official literal (inf in float32 for s >~ 17, NaN gradients);
    # True: softplus(s), the same value where both are finite (docs/quirks.md).
    stable_neg_pair: bool = False


@dataclass(frozen=True)
class MESMDataConfig(DataConfig):
    """MESM's data (jaxprvr.data.mesm; the official dataset/*.py): the feature variant and the official config's data
    fields. ``--data-root`` is the official working directory (``./data/...``, ``./pretrained_models/...``);
    ``data.variant`` names an official config file (``config/charades/VGG_GloVe.json`` is ``--config charades
    --model mesm --set data.variant=VGG_GloVe``) and brings its facts (files, widths, lengths, tokenizer)."""

    variant: str = ""  # "" = the dataset's default (C+SF_C; TACoS C3D_GloVe)
    feat_dims: tuple[int, ...] = ()  # () = the official widths of the variant's files; else reduced-width files
    clip_len: float = 1.0  # seconds per feature row (-1: TACoS, moments as fractions of the duration)
    max_words_l: int = 16  # follows model.max_words_l (_sync)
    max_video_l: int = 194  # follows model.max_video_l
    tokenizer_type: str = "CLIP"  # follows model.tokenizer_type
    load_vocab_pkl: bool = False  # follows model.load_vocab_pkl
    vocab_size: int = 1111  # follows model.vocab_size (the MLM classes)
    contra_samples: int = 2
    max_gather_size: int = -1  # TACoS 10: a video's queries in chunks of at most this many (one item each)
    max_windows: int = 5  # QVHighlights: moments kept per query
    eval_batch_size: int = 30  # items per evaluation batch
    # The POS tagger of the MLM weights: "nltk" (official; needs NLTK's tagger data), "rule" (a closed-class rule
    # tagger, a documented deviation for training without NLTK data) or "none" (all weights 1: exact for evaluation).
    pos_tagger: str = "nltk"
    sentence_split: str = "auto"  # GloVe's word_tokenize: "punkt" | "identity" (refused on internal sentence ends) | "auto"
    glove_seed: int = 0  # the <UNK> GloVe vector (official: torch.randn at every build, never saved: docs/quirks.md)
    val_seed: int = 0  # the derived val split (Charades, Charades-CG: 10% of the train videos)
    rescale_labels: bool = False  # True: clip labels rescaled after pooling (official: not; docs/quirks.md)
    whole_video: str = "error"  # a training moment covering the whole video: "error" (official: a crash) | "skip"
    chunk_seed: int = -1  # TACoS's random chunking (-1: train.seed)
    eval_batches: str = ""  # a JSON replay of the evaluation batches (qid lists in row order; jaxprvr.data.mesm)
    row_capacity: int = 0  # query rows per static batch (0: the split's largest batch)
    video_capacity: int = 0  # frames per static batch (0: the split's longest video); equal capacities on every
    #                          split let training and every evaluation share compiled programs
    # Shape buckets: each batch's query rows / frames rounded up to these multiples (at most the capacities above),
    # so short batches do not pay for the split's worst case (a few compiled programs instead of one); 0 = off.
    # A capacity given above fixes its axis.
    bucket_rows: int = 8
    bucket_frames: int = 32
    max_ts_val: float = 150.0  # PostProcessorDETR's clamp (TACoS 1000)


@dataclass(frozen=True)
class MESMTrainConfig(TrainConfig):
    """MESM's recipe (train.py, runner.py L348-352): AdamW over every trainable tensor (torch betas and eps, weight
    decay on all), StepLR(lr_drop, gamma) per epoch, clip_grad_norm_ 0.1, evaluation every epoch, the best by
    MR-full-{stop_score} (strictly greater)."""

    lr: float = 2e-4
    wd: float = 1e-4
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    lr_drop: int = 400
    lr_gamma: float = 0.5
    max_grad_norm: float = 0.1
    batch_size: int = 12  # items (videos; TACoS chunks; QVHighlights YouTube ids) per batch
    n_epoch: int = 200
    seed: int = 2019
    max_es_cnt: int = 200
    stop_score: str = "mAP"  # "mAP" | "miou": MR-full-mAP / MR-full-miou selects the best checkpoint
    # "official": the splits of runner.py L70-80 select checkpoints (test for Charades and TACoS, test_ood for
    # Charades-CD, novel_composition + novel_word for Charades-CG: a selection on test, docs/quirks.md); "val": the
    # honest protocol (TACoS val.json, Charades-CD charades_val.json, a seeded 10% of the train videos otherwise).
    selection: str = "official"


# ---------------------------------------------------------------------------------------------- text-video retrieval

@dataclass(frozen=True)
class ClipWTIConfig(ModelConfig):
    """BackBone_tvr (shallowdream66/BackBone_tvr backbone_tvr/tvr/models/modeling.py): CLIP + seqTransf + WTI.

    The CLIP sizes below are ViT-B/32's; with ``clip`` set they are read from the weights instead (``modeling.py``
    L48-60), and a value given here that disagrees is an error."""

    name: str = "clip_wti"
    # OpenAI-format CLIP weights (ViT-B-32.pt, a state dict, or a parity.convert clip2jax directory); "" = a random
    # CLIP at the sizes below (--demo, tests).
    clip: str = ""
    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 32
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    vision_heads: int = 0  # 0: width // 64 (OpenAI's rule)
    text_heads: int = 0
    agg_module: str = "seqTransf"  # --agg_module: seqTransf | None (meanP-free WTI on the raw frame features)
    num_hidden_layers: int = 4  # --num_hidden_layers: seqTransf blocks (initialised from CLIP text blocks 0..)
    max_words: int = 32  # --max_words
    max_frames: int = 12  # --max_frames
    # fp32 (the official CPU path), bf16 (speed), fp16 (float16 activations, what convert_weights computes on a GPU)
    precision: str = "fp32"
    remat: bool = False  # rematerialise every residual block (CLIP towers and seqTransf) in the backward


@dataclass(frozen=True)
class T2VDataConfig(DataConfig):
    """Raw-video text-video retrieval data (jaxprvr.data.t2v, jaxprvr.data.video) and the evaluation protocol.
    Paths are relative to --data-root unless absolute; "" = the dataset's default layout (docs/data.md)."""

    anno_path: str = ""  # --anno_path: the annotation folder
    video_path: str = ""  # --video_path: the video folder
    train_split: str = "9k"  # MSR-VTT: the train CSV (MSRVTT_train.9k.csv; the official hard-codes 9k) | "7k"
    video_framerate: int = 1  # --video_framerate: the sampling stride is round(fps / int(framerate))
    # Training augmentation (dataloader_retrieval.py L88-92): the clip-consistent RandAugment | "none"
    augment: str = "rand-m7-n4-mstd0.5-inc1"
    shuffle: bool = True  # data.shuffle=false keeps the file order (a seeded permutation per epoch otherwise)
    # Decoded frames are cached (jaxprvr.data.video.FrameStore: lossless, native size, the sampled indices only)
    # under this folder; "" = <data-root>/.jaxprvr_frames
    frame_cache: str = ""
    on_bad_video: str = "error"  # "error": one error naming the file; "zeros": a zero video, counted and reported
    eval_batch_size: int = 16  # --batch_size_val: pairs per feature batch
    sim_block: int = 128  # texts x videos per WTI block of the similarity matrix (blocking does not change it)
    # "pairs" (official: texts x texts, diagonal positives) | "grouped" (CLIP4Clip multi-sentence) | "auto":
    # pairs when every video has one caption (MSR-VTT 1k-A, LSMDC test), else grouped (docs/quirks.md: MSVD)
    protocol: str = "auto"
    # jaxprvr.evaluate --save-features / --save-inputs: features.npz (text [N,L,D], video after seqTransf
    # [N,T,D], the CLIP frame embeddings, masks) / inputs.npz (ids, masks, the float32 videos) + frames.json
    save_features: bool = False
    save_inputs: bool = False


@dataclass(frozen=True)
class T2VTrainConfig(TrainConfig):
    """BackBone_tvr's recipe (main_retrieval.py L167-268): BertAdam (no bias correction, b2 0.98, eps 1e-6,
    decoupled wd on names without "bias"), lr x coef_lr on the CLIP tensors, warmup_cosine over the whole run,
    torch's global clip_grad_norm_(1.0) first, logit_scale clamped at ln 100 after every step."""

    lr: float = 1e-4
    coef_lr: float = 1e-3
    wd: float = 0.2
    lr_warmup_proportion: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-6
    max_grad_norm: float = 1.0  # global clip_grad_norm_ (BertAdam's per-tensor clip after it is then a no-op)
    batch_size: int = 64  # the README's (argparse default 24)
    n_epoch: int = 5
    seed: int = 42
    max_es_cnt: int = -1
    # The split evaluated after every epoch to select "best" by t2v R@1 (MSR-VTT: val IS the 1k-A test file,
    # as officially: docs/quirks.md).
    eval_split: str = "val"


DATA_CONFIGS: dict[str, type] = {"prvr": PRVRDataConfig, "vmr": VMRDataConfig, "t2v": T2VDataConfig}
TRAIN_CONFIGS: dict[str, type] = {"vmr": VMRTrainConfig, "t2v": T2VTrainConfig}  # other tasks: TrainConfig

# Old names -> the fields that replaced them (an override or make_config with an old name is an error naming them).
RENAMED = {
    "loss.loss_factor": "loss.w_clip_nce, loss.w_frame_nce, loss.w_qdl, loss.w_ot, loss.w_video_nce (in that order)",
    "loss.neg_factor": "loss.qdl_margin, loss.qdl_alpha, loss.qdl_lambda (in that order)",
    "loss.triplet_loss_factor": "loss.w_clip_trip, loss.w_frame_trip, loss.w_video_trip (in that order)",
    "loss.lambda_recon": "loss.w_recon",
}

# Fields that the one flat PRVR ModelConfig of earlier versions held for every model, with their defaults: a
# checkpoint config.json of those versions lists them for every model. On reading, such a field that the
# model's own config type lacks is dropped only when it holds this default (it then meant nothing).
_LEGACY_MODEL_DEFAULTS = {"sft_factor": 0.09, "video_scale_w": 0.0, "gmm_fixed_length": False,
                          "num_mamba_layers": 2, "branch_impl": "auto"}


# ---------------------------------------------------------------------------------------------- building


def _row(model: str):
    from jaxprvr import registry

    return registry.get(model)


def _fill(cls, facts: dict, given: dict | None, section: str):
    """``cls(**given)`` with the dataset facts of the fields ``cls`` has; renamed or unknown keys are errors."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = dict(given or {})
    for k in given:
        if k not in names:
            _unknown(f"{section}.{k}", section, cls)
    return cls(**{**{k: v for k, v in facts.items() if k in names}, **given})


def make_config(model: str, dataset: str, *, model_kw=None, data_kw=None, loss_kw=None, train_kw=None) -> Config:
    """A Config of ``model``'s section types, with the dataset facts of :data:`DATASETS` filled in."""
    row = _row(model)
    task = task_of_dataset(dataset)
    if row.task != task:
        raise JaxprvrError("config", f"a {row.task} dataset for {model} ({sorted(DATASETS[row.task])})",
                           f"{dataset!r}, a {task} dataset")
    facts = DATASETS[task][dataset]
    m = _fill(row.model_config, facts, {"name": model, **(model_kw or {})}, "model")
    d = _fill(row.data_config or DATA_CONFIGS[task], facts, {"dataset": dataset, **(data_kw or {})}, "data")
    cfg = Config(model=m, data=d, loss=_fill(row.loss_config, facts, loss_kw, "loss"),
                 train=_fill(row.train_config or TRAIN_CONFIGS.get(task, TrainConfig), facts, train_kw, "train"))
    return _sync(cfg)


def model_config_from_dict(d: dict, where: str = "checkpoint config") -> ModelConfig:
    """Rebuilds a model config saved as JSON (tuples come back as lists) as its family's type; unknown keys are
    errors (a field of the flat schema of earlier versions holding its default is dropped: it meant nothing)."""
    if "name" not in d:
        raise JaxprvrError(where, "a model config with a 'name'", f"keys {sorted(d)}")
    cls = _row(d["name"]).model_config
    hints = typing.get_type_hints(cls)
    unknown = sorted(k for k in set(d) - set(hints)
                     if not (k in _LEGACY_MODEL_DEFAULTS and d[k] == _LEGACY_MODEL_DEFAULTS[k]))
    if unknown:
        raise JaxprvrError(where, f"model fields of {sorted(hints)}", f"unknown {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in hints})


def _convert(value: str, typ: Any, key: str):
    """Converts the text of ``--set key=value`` to the declared field type."""
    origin = typing.get_origin(typ)
    if typ is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise JaxprvrError(f"--set {key}", "a boolean (true/false)", repr(value))
    if typ in (int, float):
        try:
            return typ(value) if typ is float else int(value)
        except ValueError:
            raise JaxprvrError(f"--set {key}", f"a {typ.__name__}", repr(value)) from None
    if typ is str:
        return value
    if origin is tuple:
        (elem, _ellipsis) = typing.get_args(typ)
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(parsed, (list, tuple)):
            parsed = [parsed]
        return tuple(elem(v) if not isinstance(v, str) else _convert(v.strip(), elem, key) for v in parsed)
    raise JaxprvrError(f"--set {key}", "a field of a supported type", str(typ))


def _unknown(key: str, section: str, cls) -> None:
    if key in RENAMED:
        raise JaxprvrError(f"--set {key}", f"the new name(s) {RENAMED[key]}", f"the old name {key!r}")
    fields = sorted(typing.get_type_hints(cls))
    raise JaxprvrError(f"--set {key}", f"a field of {section} ({cls.__name__}): {fields}", repr(key.split('.')[-1]))


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """Applies ``section.field=value`` overrides; unknown sections or fields are errors."""
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    for key, value in items:
        parts = key.split(".")
        if len(parts) != 2:
            raise JaxprvrError(f"--set {key}", "a key of the form section.field (e.g. train.lr)", repr(key))
        section, name = parts
        sections = {f.name: f for f in dataclasses.fields(cfg)}
        if section not in sections:
            raise JaxprvrError(f"--set {key}", f"a section in {sorted(sections)}", repr(section))
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        if name not in hints:
            _unknown(key, section, type(sub))
        if name == "name" and section == "model":
            raise JaxprvrError(f"--set {key}", "--model to choose the model", "model.name")
        if isinstance(value, str):
            value = _convert(value, hints[name], key)
        sub = dataclasses.replace(sub, **{name: value})
        cfg = dataclasses.replace(cfg, **{section: sub})
    return _sync(cfg)


def _split(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise JaxprvrError("--set", "key=value", repr(text))
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _sync(cfg: Config) -> Config:
    """Keeps the fields that model and data share (PRVR's lengths) equal: the model's are authoritative."""
    model_fields = {f.name for f in dataclasses.fields(cfg.model)} - {"name"}
    shared = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.data) if f.name in model_fields}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **shared)) if shared else cfg


# ---------------------------------------------------------------------------------------------- loading


def configs_of(model: str) -> list[str]:
    """The datasets that have a ``configs/<model>/<dataset>.py`` file."""
    try:
        pkg = importlib.import_module(f"configs.{model}")
    except ModuleNotFoundError:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def load_config(name: str, model: str | None = None, overrides=()) -> Config:
    """``name``: a dataset (its default model, or ``model``) or ``<model>/<dataset>``; then the overrides."""
    from jaxprvr import registry

    if "/" in name:
        model_from_name, name = name.split("/", 1)
        if model is not None and model != model_from_name:
            raise JaxprvrError("--model", f"{model_from_name} (named by --config)", repr(model))
        model = model_from_name
    task_of_dataset(name)  # an unknown dataset is an error listing them all
    model = model or registry.DEFAULT_MODEL.get(name)
    if model is None:
        raise JaxprvrError("--config", f"--model with dataset {name!r} (it has no default model)", "no --model")
    registry.get(model)  # an unknown model is an error listing the registry
    have = configs_of(model)
    if name not in have:
        raise JaxprvrError("--config", f"one of the configs of {model}: {have}", repr(name))
    cfg = importlib.import_module(f"configs.{model}.{name}").get_config()
    cfg = apply_overrides(cfg, list(overrides))
    row = registry.get(model)
    if row.resolve:  # derived fields (e.g. a feature variant's), then the overrides again: an explicit --set wins
        cfg = apply_overrides(row.resolve_config(cfg), list(overrides))
    return cfg


def config_table() -> list[dict]:
    """One row per dataset: its task, the models with a config file for it, and the default model."""
    from jaxprvr import registry

    rows = []
    for task, table in DATASETS.items():
        for ds in table:
            models = [m for m in registry.names() if ds in configs_of(m)]
            rows.append({"config": ds, "task": task, "models": models, "default": registry.DEFAULT_MODEL.get(ds)})
    return rows


def format_config_table() -> str:
    lines = ["| config | task | models (default first) |", "|---|---|---|"]
    for r in config_table():
        ms = sorted(r["models"], key=lambda m: m != r["default"])
        lines.append(f"| {r['config']} | {r['task']} | " + ", ".join(f"**{m}**" if m == r["default"] else m
                                                                      for m in ms) + " |")
    return "\n".join(lines)


def model_config(name: str, **kw) -> ModelConfig:
    """``name``'s model config type with ``kw`` (the defaults are the TVR dims): ``model_config("mtm", hidden_size=32)``."""
    return _row(name).model_config(**kw)


def loss_config(name: str, **kw) -> LossConfig:
    """``name``'s loss config type with ``kw``."""
    return _row(name).loss_config(**kw)
