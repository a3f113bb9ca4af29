"""The PyTorch parity bridge: checkpoint conversion (:mod:`parity.convert`, one key table per model in
``parity/<model>.py``) and the stage-by-stage parity report (:mod:`parity.check`). See docs/parity.md."""
