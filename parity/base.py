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
  generic BertAdam-state conversion of :mod:`parity.convert`);
* :meth:`read_variables`: an official checkpoint file read into Flax variables in memory (``jaxprvr.load``;
  the PRVR families share :meth:`parity.prvr.PRVRSpec.read_variables`).
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
    # jaxprvr.load: ``read_variables(path, cfg, overrides) -> (cfg, params, model_state[, ema])`` (the config as the
    # file fixes it; the caller checks the shapes against the configured model). An optional fourth item holds the
    # file's EMA weights (a params tree, MTM's ``ema_shadow`` with ``train.use_ema``) or None: ``jaxprvr.load``
    # returns them with ``ema=True``.
    read_variables = None

    def table_for(self, model_cfg):
        """The key-table argument of :mod:`parity.convert` for a model config (default: the family name)."""
        return self.name

    def describe(self, cfg) -> str:
        """The model's widths for the report header."""
        m = cfg.model
        fields = [f for f in ("hidden_size", "n_heads") if hasattr(m, f)]
        return ", ".join(f"{f} {getattr(m, f)}" for f in fields)


class FamilyCheck:
    """The shared frame of a family's own ``parity.check`` rows (``FamilySpec.check_rows``): the float32 and float64
    twins, the bounded float64 arbiter for a failing float32 row, and the groups in their order. A subclass builds
    its twin in ``__init__`` (then calls :meth:`set_twin`) and writes the group methods it has:
    ``conversion_rows()``, ``block_rows(suffix)``, ``model_rows(suffix)``, ``loss_rows()``, ``grad_rows()``,
    ``train_rows()``, ``dropout_rows()``, ``metric_rows()``; ``train_label`` names the training stage."""

    train_label = "training steps"

    def _setup(self, spec, *, seed, steps, say, data_root, tol, perturb, compiler_options, n_videos, device=None):
        from parity.rows import TOLERANCES

        self.spec, self.seed, self.steps, self.say, self.data_root = spec, seed, steps, say, data_root
        self.tol = tol or TOLERANCES["float32"]
        self.f64 = self.tol.dtype == "float64"
        self.perturb, self.compiler_options, self.n_videos = perturb, compiler_options, n_videos
        self.device = device or "cpu"

    def set_twin(self, twin32) -> None:
        """``twin32`` (eval mode, on the check's device) and its float64 copy; ``self.twin`` is the compared one."""
        import copy

        self.twin32 = twin32.eval().to(self.device)
        self.twin64 = copy.deepcopy(self.twin32).double().eval()
        self.twin = self.twin64 if self.f64 else self.twin32

    def mode(self, twin):
        return self.spec.twin_mode(twin)

    def cast(self, batch):
        from parity.check import cast_batch

        return cast_batch(batch, self.tol.dtype)

    def arbiter_row(self, stage, j_out, torch_fn, rtol_atol, group="block"):
        """``close_row``; in float32 mode a failing row is judged by the bounded float64 arbiter with
        ``torch_fn(twin64)`` (:func:`parity.check._arbitrate`)."""
        from parity.check import _arbitrable, _arbitrate
        from parity.rows import as_numpy, close_row

        with self.mode(self.twin):
            t_out = as_numpy(torch_fn(self.twin))
        row = close_row(group, stage, j_out, t_out, *rtol_atol)
        if not self.f64 and _arbitrable(row, j_out):
            with self.mode(self.twin64):
                t64 = as_numpy(torch_fn(self.twin64))
            row = _arbitrate(row, j_out, t_out, t64, *rtol_atol)
        return row

    def run(self, groups) -> list:
        """The groups asked for, in order; block and model rows again on a perturbed twin with ``perturb=forward``
        (random biases and LayerNorm parameters, which the official init leaves at 0 / 1)."""
        rows: list = []
        if "convert" in groups:
            self.say("conversion")
            rows += self.conversion_rows()
        base = self.twin32
        forward = [(base, "")]
        if self.perturb == "forward" and ("block" in groups or "model" in groups):
            from parity.check import perturb_twin

            forward.append((perturb_twin(base, self.seed), " [perturbed]"))
        for tw32, suffix in forward:
            if "block" in groups or "model" in groups:
                self.set_twin(tw32)
            if "block" in groups:
                self.say("blocks" + suffix)
                rows += self.block_rows(suffix)
            if "model" in groups:
                self.say("whole model" + suffix)
                rows += self.model_rows(suffix)
        if len(forward) > 1:
            self.set_twin(base)  # back to the given weights
        for group, label, method in (("loss", "losses", "loss_rows"), ("grad", "gradients", "grad_rows"),
                                     ("train", f"{self.steps} {self.train_label}", "train_rows"),
                                     ("dropout", "dropout on", "dropout_rows"), ("metrics", "evaluation",
                                                                                 "metric_rows")):
            if group in groups and hasattr(self, method):
                self.say(label)
                rows += getattr(self, method)()
        return rows


def prepare_out_dir(out, force: bool):
    """``OUT`` of ``parity.convert torch2jax`` and its ``OUT/ckpt`` (refused when it holds checkpoints, unless
    ``--force``)."""
    from pathlib import Path

    from jaxprvr.errors import JaxprvrError

    out = Path(out)
    ckpt_dir = out / "ckpt"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not force:
        raise JaxprvrError(out, "an output folder without checkpoints", "an existing ckpt/ folder",
                           hint="pass --force to replace it")
    return out, ckpt_dir


def checkpoint_config(step_dir, cfg, overrides):
    """``cfg`` with the model config saved in the checkpoint at ``step_dir`` (the architecture it was trained
    with), then ``overrides``; a checkpoint of another model is an error."""
    import dataclasses

    from jaxprvr.checkpoint import check_saved_model
    from jaxprvr.config import apply_overrides, model_config_from_dict

    meta = check_saved_model(step_dir, cfg.model.name, f"a checkpoint of --model {cfg.model.name}")
    saved = meta.get("config", {}).get("model")
    if saved is None:
        return cfg
    return apply_overrides(dataclasses.replace(cfg, model=model_config_from_dict(saved, where=str(step_dir))),
                           list(overrides))


class OwnStages:
    """A :class:`FamilySpec` mixin for a family with its own ``parity.check`` stages and converters: set
    ``check_class`` to the name of its :class:`FamilyCheck` subclass and write module-level ``torch2jax(args, cfg)``
    / ``jax2torch(args, cfg)`` in the spec's module (looked up there when called, so they may follow the spec)."""

    check_class = ""

    def _module_attr(self, name):
        import sys

        return getattr(sys.modules[type(self).__module__], name)

    def check_rows(self, cfg, *, ckpt=None, data_root=None, seed=0, n_videos=4, steps=5, groups=(), device=None,
                   say=None, compiler_options=None, tol=None, perturb="forward"):
        check = self._module_attr(self.check_class)
        return check(self, cfg, ckpt=ckpt, data_root=data_root, seed=seed, n_videos=n_videos, steps=steps,
                     device=device, say=say or (lambda s: None), compiler_options=compiler_options, tol=tol,
                     perturb=perturb).run(groups)

    def convert_torch2jax(self, args, cfg) -> dict:
        return self._module_attr("torch2jax")(args, cfg)

    def convert_jax2torch(self, args, cfg) -> dict:
        return self._module_attr("jax2torch")(args, cfg)
