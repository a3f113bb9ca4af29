"""gmmformer_v2 on ActivityNet Captions: the official hyperparameters (huangmozhi9527/GMMFormer_v2 src/Configs/act.py).

    python -m jaxprvr.train --config act --model gmmformer_v2 --data-root $ROOT

Official test numbers (README, text-to-video, R@1 / R@5 / R@10 / R@100 / SumR): 8.9 / 27.1 / 40.2 / 78.7 / 154.9.
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "gmmformer_v2", "act",
        model_kw=dict(input_drop=0.31, drop=0.31, sft_factor=0.6),
        loss_kw=dict(margin=0.2, w_clip_nce=0.02, w_frame_nce=0.04, w_qdl=0.003, w_ot=0.11, qdl_margin=0.2,
                     qdl_alpha=32.0, qdl_lambda=1.0, hard_negative_start_epoch=20, hard_pool_size=20),
        train_kw=dict(lr=2.5e-4),
        data_kw=dict(),
    )
