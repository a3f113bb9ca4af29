"""ms_sl on Charades-STA: the official hyperparameters (HuiGuanLab/ms-sl method/config.py + do_cha.sh).

    python -m jaxprvr.train --config cha --model ms_sl --data-root $ROOT

Official test numbers (README, text-to-video, R@1 / R@5 / R@10 / R@100 / SumR): 1.8 / 7.1 / 11.8 / 47.7 / 68.4.
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "ms_sl", "cha",
        model_kw=dict(input_drop=0.1, drop=0.1, clip_scale_w=0.5, frame_scale_w=0.5),
        loss_kw=dict(margin=0.2, hard_negative_start_epoch=20, hard_pool_size=20),
        train_kw=dict(lr=2.5e-4, seed=2018),
        data_kw=dict(eval_context_bsz=200),
    )
