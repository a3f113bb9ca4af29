"""MTM on ActivityNet Captions: the official hyperparameters (tianxinlin666/MTM src/Configs/act.py).

    python -m jaxprvr.train --config act --data-root $ROOT          # MTM is the default model on act

Official test numbers (README, text-to-video, R@1 / R@5 / R@10 / R@100 / SumR): 9.1 / 27.3 / 40.4 / 79.3 / 156.1.
The official repository has no training script; the loop is GMMFormer v2's (docs/quirks.md, MTM).
"""

from configs.base import Config, make_config


def get_config() -> Config:
    return make_config(
        "mtm", "act",
        model_kw=dict(input_drop=0.31, drop=0.31, sft_factor=0.6, clip_scale_w=0.7,
                      frame_scale_w=0.5, video_scale_w=0.15, num_mamba_layers=2),
        loss_kw=dict(margin=0.2, loss_factor=(0.02, 0.04, 0.003, 0.11, 0.07), neg_factor=(0.2, 32.0, 1.0),
                     triplet_loss_factor=(1.0, 1.0, 1.0), lambda_recon=0.6, hard_negative_start_epoch=50,
                     hard_pool_size=25),
        train_kw=dict(lr=2.5e-4, lr_warmup_proportion=0.02, batch_size=64, n_epoch=150,
                      use_ema=True, ema_decay=0.9995),
        data_kw=dict(eval_query_bsz=50, eval_context_bsz=100),
    )
