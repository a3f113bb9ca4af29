"""BackBone_tvr on LSMDC (LSMDC16 train, val, the 1000-clip public test), the README's hyper-parameters.

    python -m jaxprvr.train --config lsmdc --data-root $ROOT --set model.clip=ViT-B-32.pt
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "clip_wti", "lsmdc",
        model_kw=dict(agg_module="seqTransf", num_hidden_layers=4, max_words=32, max_frames=12),
        data_kw=dict(video_framerate=1, eval_batch_size=16, protocol="auto"),
        train_kw=dict(lr=1e-4, coef_lr=1e-3, wd=0.2, lr_warmup_proportion=0.1, batch_size=64, n_epoch=5, seed=42),
    )
