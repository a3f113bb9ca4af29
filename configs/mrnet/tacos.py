"""MRNet on TACoS: checkpoints/best/tacos/config.yml (xian-sh/MRNet @ 53432f5), with the model file the README
says to copy over ret_model.py for TACoS (ret_model_tacos.py: model.ret_variant="mha").

    python -m jaxprvr.train --config tacos --data-root $ROOT

The released config was saved from a resumed run (RESUME_EPOCH 61); training from scratch is configs/tacos.yaml,
with the same hyperparameters. Features: the authors' PCA(500) of the TALL C3D features (preprocess/feat_pca.py).
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "mrnet", "tacos",
        model_kw=dict(num_clips=128, featpool_hidden=512, featpool_kernel=4, pooling_counts=(15, 8, 8, 8),
                      joint_space=256, text_dim=768, predictor_hidden=512, predictor_kernel=5, predictor_layers=3,
                      trans_layers=1, n_heads=8, gamma=0.999, d_double=True, mask_mode="both", att_mode="all",
                      att_softmax=True, att_dropout=0.1, ret_variant="mha"),
        loss_kw=dict(min_iou=0.3, max_iou=0.7, num_pos_proposals=3, margin=0.1, tau_video=0.1, tau_sent=0.1,
                     neg_video_iou=0.5, sent_removal_iou=0.5, w_contrastive=0.1, w_sparse=20.0, loss_ratio=0.0,
                     only_iou_epoch=100),
        train_kw=dict(lr=1.5e-3, batch_size=2, n_epoch=250, milestones=(130, 190), test_period=10, skip_test=0,
                      eval_split="val"),
        data_kw=dict(iou_thresholds=(0.1, 0.3, 0.5), nms_thresh=0.4, contrastive_score_pow=0.3, eval_batch_size=4),
    )
