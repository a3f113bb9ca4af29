"""The base of every family's parity spec: what :mod:`parity.check` and :mod:`parity.convert` may ask of it.

A family's ``parity/<family>.py`` exposes ``SPEC``, an instance of a subclass of :class:`FamilySpec`. The drivers
never name a family; they call the spec. The defaults here describe the PRVR behaviour the drivers were built
around (:class:`parity.prvr.PRVRSpec` fills in the rest); a family whose checkpoints, batches, losses or
optimizer differ in kind (moment retrieval: BatchNorm statistics in ``batch_stats``, AdamW + MultiStepLR, the
``{model, optimizer, scheduler, epoch}`` file) overrides the hooks below:

* :meth:`describe`: the model part of ``parity.check``'s header line;
* :meth:`check_rows`: all of ``parity.check``'s rows for the family (``None``: the generic PRVR-style stages of
  :mod:`parity.check`, which call the spec's block/loss/optimizer hooks);
* :meth:`convert_torch2jax` / :meth:`convert_jax2torch`: the two ``parity.convert`` directions (``None``: the
  generic BertAdam-state conversion of :mod:`parity.convert`).
"""

from __future__ import annotations


class Plain:
    """A block spec's JAX side that is a plain function of the inputs (no Flax parameters)."""

    def __init__(self, fn):
        self.fn = fn


class FamilySpec:
    name = ""
    table: tuple = ()

    # parity.check: a family with its own stages sets this to a method
    # ``check_rows(cfg, *, ckpt, data_root, seed, n_videos, steps, groups, device, say, compiler_options, tol,
    # perturb) -> list[Row]``.
    check_rows = None
    # parity.convert: ``convert_torch2jax(args, cfg) -> dict`` and ``convert_jax2torch(args, cfg) -> dict``.
    convert_torch2jax = None
    convert_jax2torch = None

    def table_for(self, model_cfg):
        """The key-table argument of :mod:`parity.convert` for a model config (default: the family name)."""
        return self.name

    def describe(self, cfg) -> str:
        """The model's widths for the report header."""
        m = cfg.model
        fields = [f for f in ("hidden_size", "n_heads") if hasattr(m, f)]
        return ", ".join(f"{f} {getattr(m, f)}" for f in fields)
