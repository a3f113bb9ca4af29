"""gmmformer on TVR: the official hyperparameters (huangmozhi9527/GMMFormer src/Configs/tvr.py).

    python -m jaxprvr.train --config tvr --model gmmformer --data-root $ROOT

Official test numbers (README, text-to-video, R@1 / R@5 / R@10 / R@100 / SumR): 13.9 / 33.3 / 44.5 / 84.9 / 176.6.
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "gmmformer", "tvr",
        model_kw=dict(input_drop=0.2, drop=0.2),
        loss_kw=dict(margin=0.1, w_clip_nce=0.05, w_frame_nce=0.04, w_qdl=0.001, qdl_margin=0.15, qdl_alpha=32.0,
                     hard_negative_start_epoch=30, hard_pool_size=20),
        train_kw=dict(lr=3e-4),
        data_kw=dict(),
    )
