"""ms_sl on ActivityNet Captions: the official hyperparameters (HuiGuanLab/ms-sl method/config.py + do_act.sh).

    python -m jaxprvr.train --config act --model ms_sl --data-root $ROOT

Official test numbers (README, text-to-video, R@1 / R@5 / R@10 / R@100 / SumR): 7.1 / 22.5 / 34.7 / 75.8 / 140.1.
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "ms_sl", "act",
        model_kw=dict(input_drop=0.1, drop=0.1, clip_scale_w=0.7, frame_scale_w=0.3),
        loss_kw=dict(margin=0.2, hard_negative_start_epoch=20, hard_pool_size=20),
        train_kw=dict(lr=2.5e-4, seed=2018),
        data_kw=dict(eval_context_bsz=200),
    )
