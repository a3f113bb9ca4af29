"""gmmformer_v2 on TVR: the official hyperparameters (huangmozhi9527/GMMFormer_v2 src/Configs/tvr.py).

    python -m jaxprvr.train --config tvr --model gmmformer_v2 --data-root $ROOT

Official test numbers (README, text-to-video, R@1 / R@5 / R@10 / R@100 / SumR): 16.2 / 37.6 / 48.8 / 86.4 / 189.1.
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "gmmformer_v2", "tvr",
        model_kw=dict(input_drop=0.2, drop=0.2, sft_factor=0.09),
        loss_kw=dict(margin=0.1, w_clip_nce=0.05, w_frame_nce=0.04, w_qdl=8e-05, w_ot=0.09, qdl_margin=0.15,
                     qdl_alpha=32.0, qdl_lambda=1.0, hard_negative_start_epoch=20, hard_pool_size=20),
        train_kw=dict(lr=3e-4),
        data_kw=dict(),
    )
