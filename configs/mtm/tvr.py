"""MTM on TVR: the official hyperparameters (tianxinlin666/MTM src/Configs/tvr.py).

    python -m jaxprvr.train --config tvr --data-root $ROOT          # MTM is the default model on tvr

Official test numbers (README, text-to-video, R@1 / R@5 / R@10 / R@100 / SumR): 16.0 / 38.4 / 49.2 / 86.8 / 190.4.
The official repository has no training script; the loop is GMMFormer v2's (docs/quirks.md, MTM).
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "mtm", "tvr",
        model_kw=dict(input_drop=0.2, drop=0.2, sft_factor=0.09, clip_scale_w=0.7,
                      frame_scale_w=0.35, video_scale_w=0.03, num_mamba_layers=2),
        loss_kw=dict(margin=0.1, w_clip_nce=0.05, w_frame_nce=0.04, w_qdl=7e-05, w_ot=0.09, w_video_nce=0.015,
                     qdl_margin=0.15, qdl_alpha=32.0, qdl_lambda=1.0, w_clip_trip=1.0, w_frame_trip=1.0,
                     w_video_trip=1.0, w_recon=0.4, hard_negative_start_epoch=50, hard_pool_size=20),
        train_kw=dict(lr=2.5e-4, lr_warmup_proportion=0.01, batch_size=32, n_epoch=200,
                      use_ema=False, ema_decay=0.9995),
        data_kw=dict(eval_query_bsz=50, eval_context_bsz=100),
    )
