"""MRNet on Charades-STA (I3D): checkpoints/best/charades/config.yml (xian-sh/MRNet @ 53432f5).

    python -m jaxprvr.train --config charades --data-root $ROOT

Two facts of the released config: ATT_SOFTMAX false with ATT_MODE v gives a zero attention output
(model.att_softmax=False keeps it; docs/quirks.md), and the README says these weights were lost. Charades-STA
has no val split: evaluation during training runs on test, as officially (a selection on test: docs/quirks.md).
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "mrnet", "charades",
        model_kw=dict(num_clips=64, featpool_hidden=512, featpool_kernel=2, pooling_counts=(15, 8, 8),
                      joint_space=256, text_dim=768, predictor_hidden=512, predictor_kernel=17, predictor_layers=2,
                      trans_layers=4, n_heads=8, gamma=0.98, d_double=True, mask_mode="both", att_mode="v",
                      att_softmax=False, att_dropout=0.0, ret_variant="projected"),
        loss_kw=dict(min_iou=0.5, max_iou=1.0, num_pos_proposals=1, margin=0.4, tau_video=0.1, tau_sent=0.1,
                     neg_video_iou=0.5, sent_removal_iou=0.5, w_contrastive=0.05, w_sparse=10.0, loss_ratio=0.0,
                     only_iou_epoch=7),
        train_kw=dict(lr=1e-4, batch_size=12, n_epoch=25, milestones=(8, 13), test_period=1, skip_test=1,
                      eval_split="test"),
        data_kw=dict(iou_thresholds=(0.3, 0.5, 0.7), nms_thresh=0.5, contrastive_score_pow=0.5, eval_batch_size=12),
    )
