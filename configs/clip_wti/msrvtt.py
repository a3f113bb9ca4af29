"""BackBone_tvr on MSR-VTT (9k train, 1k-A test): the README's command (shallowdream66/BackBone_tvr @ 5bb74ad).

    python -m jaxprvr.train --config msrvtt --data-root $ROOT --set model.clip=ViT-B-32.pt

README: 1 GPU x batch 64, lr 1e-4, coef_lr 1e-3, 5 epochs, max_words 32, max_frames 12, seqTransf (4 blocks).
DRL's README reports WTI + seqTransf t2v R@1 46.6 (R@5 73.4, R@10 83.5, MdR 2, MnR 13.0) at batch 128 on 4 GPUs.
Validation IS the 1k-A test file officially (data_dataloaders.py L265): "best" is the best test epoch
(docs/quirks.md; train.eval_split keeps the official protocol, the honest one needs a held-out split).
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    return make_config(
        "clip_wti", "msrvtt",
        model_kw=dict(agg_module="seqTransf", num_hidden_layers=4, max_words=32, max_frames=12),
        data_kw=dict(train_split="9k", video_framerate=1, eval_batch_size=16, protocol="auto"),
        train_kw=dict(lr=1e-4, coef_lr=1e-3, wd=0.2, lr_warmup_proportion=0.1, batch_size=64, n_epoch=5, seed=42),
    )
