"""MTM on Charades-STA: the official hyperparameters (tianxinlin666/MTM src/Configs/cha.py).

    python -m jaxprvr.train --config cha --data-root $ROOT          # MTM is the default model on cha

Official test numbers (README, text-to-video, R@1 / R@5 / R@10 / R@100 / SumR): 2.6 / 9.5 / 14.8 / 54.2 / 81.1.
The official repository has no training script; the loop is GMMFormer v2's (docs/quirks.md, MTM).
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "mtm", "cha",
        model_kw=dict(input_drop=0.25, drop=0.25, sft_factor=0.6, clip_scale_w=0.7,
                      frame_scale_w=0.25, video_scale_w=0.04, num_mamba_layers=2),
        loss_kw=dict(margin=0.2, w_clip_nce=0.02, w_frame_nce=0.04, w_qdl=0.003, w_ot=0.11, w_video_nce=0.03,
                     qdl_margin=0.19, qdl_alpha=32.0, qdl_lambda=1.0, w_clip_trip=1.0, w_frame_trip=1.0,
                     w_video_trip=1.0, w_recon=0.6, hard_negative_start_epoch=50, hard_pool_size=25),
        train_kw=dict(lr=2.5e-4, lr_warmup_proportion=0.02, batch_size=128, n_epoch=200,
                      use_ema=False, ema_decay=0.9995),
        data_kw=dict(eval_query_bsz=50, eval_context_bsz=100),
    )
