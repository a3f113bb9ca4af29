"""MRNet configs: the released checkpoints/best/*/config.yml of xian-sh/MRNet @ 53432f5."""
