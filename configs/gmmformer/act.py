"""gmmformer on ActivityNet Captions: the official hyperparameters (huangmozhi9527/GMMFormer src/Configs/act.py).

    python -m jaxprvr.train --config act --model gmmformer --data-root $ROOT

Official test numbers (README, text-to-video, R@1 / R@5 / R@10 / R@100 / SumR): 8.3 / 24.9 / 36.7 / 76.1 / 146.0.
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "gmmformer", "act",
        model_kw=dict(input_drop=0.2, drop=0.2),
        loss_kw=dict(margin=0.2, w_clip_nce=0.02, w_frame_nce=0.04, w_qdl=0.015, qdl_margin=0.2, qdl_alpha=32.0,
                     hard_negative_start_epoch=20, hard_pool_size=20),
        train_kw=dict(lr=2.5e-4),
        data_kw=dict(),
    )
