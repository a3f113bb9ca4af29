"""gmmformer on Charades-STA: the official hyperparameters (huangmozhi9527/GMMFormer src/Configs/cha.py).

    python -m jaxprvr.train --config cha --model gmmformer --data-root $ROOT

Official test numbers (README, text-to-video, R@1 / R@5 / R@10 / R@100 / SumR): 2.1 / 7.8 / 12.5 / 50.6 / 72.9.
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "gmmformer", "cha",
        model_kw=dict(input_drop=0.15, drop=0.15),
        loss_kw=dict(margin=0.2, w_clip_nce=0.02, w_frame_nce=0.02, w_qdl=0.005, qdl_margin=0.15, qdl_alpha=32.0,
                     hard_negative_start_epoch=100, hard_pool_size=20),
        train_kw=dict(lr=2.5e-4),
        data_kw=dict(),
    )
