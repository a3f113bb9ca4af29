"""DETR-style video moment retrieval (MESM): the official recipe as a task of the ``vmr`` family of tasks.

* data: MESM's on-disk layout (:mod:`jaxprvr.data.mesm`: Charades-STA, Charades-CG, Charades-CD, QVHighlights,
  TACoS), one item per video (TACoS: chunks of <= 10 queries; QVHighlights: a YouTube id), batches of
  ``train.batch_size`` items whose queries are the model's rows, padded to static shapes;
* text: the frozen text encoder runs outside the trained model. CLIP (``model.clip``: OpenAI-format weights; the
  ``last_hidden_state`` after ``ln_final``, fp16 as ``convert_weights`` by default) is computed once per distinct
  token row and cached (the tower is frozen and has no dropout: exact); GloVe is a frozen table lookup (the
  ``<UNK>`` row seeded by ``data.glove_seed``); CPL's ``glove.pkl`` vectors are the input as they are;
* loss: the official criterion (:func:`jaxprvr.losses.mesm.mesm_loss`) with the negatives and the masked words
  drawn from the step's ``sample`` key (:func:`jaxprvr.models.mesm.sample_outclass_neg`, ``sample_mlm_mask``);
* optimizer: ``clip_grad_norm_(0.1)`` + torch AdamW (weight decay on every trainable tensor) under StepLR(lr_drop)
  stepped per epoch; tensors the official model never gives a gradient are neither updated nor decayed;
* evaluation: the outputs of each batch become the official submission rows
  (:func:`jaxprvr.metrics.moments.postprocess`) and :func:`jaxprvr.metrics.moments.eval_submission` scores them
  (MR R1@t, mIoU, mAP, length buckets; QVHighlights also HL-min-*). ``MR-full-{train.stop_score}`` selects the
  best checkpoint of each selection split (``train.selection``: the official splits of runner.py L70-80, test
  splits included, or the honest ``val``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprvr import sharding as shd
from jaxprvr.errors import JaxprvrError
from jaxprvr.tasks.base import Task, TrainPlan

# The arrays of the static batch the model and the loss read (a key absent from a dataset's batches is skipped:
# words_id is replaced by words_feat, QVHighlights adds ss_video_* and saliency_label).
BATCH_KEYS = ("video_feat", "video_mask", "words_feat", "words_mask", "words_weight", "words_label", "unknown_mask",
              "clip_mask", "pos_idx", "neg_idx", "saliency_label", "norm_moment", "norm_span", "span_mask",
              "row_group", "num_rows", "ss_video_feat", "ss_video_mask")

# Loss, recipe and evaluation facts of the official config files that are not data facts (jaxprvr.data.mesm.VARIANTS
# holds those): (dataset, variant) -> {section: {field: value}} (config/*/*.json; Charades-CD has no file: CG's).
_CHARADES = dict(loss=dict(set_cost_class=4.0, loss_label_coef=4.0, loss_saliency_coef=4.0, rank_coef=12.0,
                           use_triplet=False, loss_recfw_coef=0.1),
                 train=dict(stop_score="mAP", lr_gamma=0.5), data=dict(max_ts_val=150.0),
                 model=dict(share_MLP=True))
RECIPES = {
    ("charades", "C+SF_C"): _CHARADES,
    ("charades", "VGG_GloVe"): {**_CHARADES, "train": dict(stop_score="mAP", lr_gamma=0.1)},
    ("charades_cg", "C+SF_C"): {**_CHARADES, "train": dict(stop_score="miou", lr_gamma=0.1)},
    ("charades_cd", "C+SF_C"): {**_CHARADES, "train": dict(stop_score="miou", lr_gamma=0.1)},
    ("qvhighlights", "C+SF_C"): dict(loss=dict(set_cost_class=4.0, loss_label_coef=4.0, loss_saliency_coef=1.0,
                                              rank_coef=12.0, use_triplet=True, loss_recfw_coef=0.5),
                                     train=dict(stop_score="mAP", lr_gamma=0.5), data=dict(max_ts_val=150.0),
                                     model=dict(share_MLP=True)),
    ("tacos", "C3D_GloVe"): dict(loss=dict(set_cost_class=6.0, loss_label_coef=6.0, loss_saliency_coef=1.0,
                                           rank_coef=1.0, use_triplet=True, loss_recfw_coef=0.1),
                                 train=dict(stop_score="miou", lr_gamma=0.1), data=dict(max_ts_val=1000.0),
                                 model=dict(share_MLP=False)),
}

# Every split name any MESM dataset has (jaxprvr.evaluate --split checks against it; the dataset checks its own).
SPLITS = ("train", "val", "test", "novel_composition", "novel_word", "test_trivial", "test_iid", "test_ood",
          "test_with_gt")


def _fact_overrides(cfg) -> dict:
    """The config's values of the :class:`jaxprvr.data.mesm.VariantFacts` fields (a ``--set`` wins over the
    variant's facts)."""
    d = cfg.data
    kw = dict(clip_len=d.clip_len, max_words_l=d.max_words_l, max_video_l=d.max_video_l,
              tokenizer_type=d.tokenizer_type, load_vocab_pkl=d.load_vocab_pkl, vocab_size=d.vocab_size,
              contra_samples=d.contra_samples, max_gather_size=d.max_gather_size, max_windows=d.max_windows,
              batch_size=cfg.train.batch_size, eval_batch_size=d.eval_batch_size, seed=cfg.train.seed)
    if d.feat_dims:
        kw["feat_dims"] = tuple(d.feat_dims)
    return kw


def facts_of(cfg):
    """The :class:`jaxprvr.data.mesm.VariantFacts` of a config: its variant with the config's data fields."""
    from jaxprvr.data.mesm import variant_facts

    return variant_facts(cfg.data.dataset, cfg.data.variant or None, **_fact_overrides(cfg))


def resolve_config(cfg):
    """The facts of ``data.variant`` (its files' widths, lengths, tokenizer, batch sizes; jaxprvr.data.mesm) and of
    its official config file (loss weights, recipe, evaluation clamp: :data:`RECIPES`) written into every section;
    :func:`jaxprvr.config.load_config` then applies the ``--set`` overrides again, so an explicit one wins."""
    from jaxprvr.config import _sync
    from jaxprvr.data.mesm import variant_facts

    d = cfg.data
    f = variant_facts(d.dataset, d.variant or None, **({"feat_dims": tuple(d.feat_dims)} if d.feat_dims else {}))
    recipe = RECIPES[(f.dataset, f.variant)]
    model = dict(v_feat_dim=f.v_feat_dim, t_feat_dim=f.t_feat_dim, use_tef=f.use_tef, tokenizer_type=f.tokenizer_type,
                 load_vocab_pkl=f.load_vocab_pkl, max_words_l=f.max_words_l, max_video_l=f.max_video_l,
                 vocab_size=f.vocab_size, **recipe["model"])
    data = dict(variant=f.variant, clip_len=f.clip_len, max_words_l=f.max_words_l, max_video_l=f.max_video_l,
                tokenizer_type=f.tokenizer_type, load_vocab_pkl=f.load_vocab_pkl, vocab_size=f.vocab_size,
                contra_samples=f.contra_samples, max_gather_size=f.max_gather_size, max_windows=f.max_windows,
                eval_batch_size=f.eval_batch_size, **recipe["data"])
    train = dict(batch_size=f.batch_size, seed=f.seed, **recipe["train"])
    return _sync(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                                     data=dataclasses.replace(cfg.data, **data),
                                     loss=dataclasses.replace(cfg.loss, **recipe["loss"]),
                                     train=dataclasses.replace(cfg.train, **train)))


# ---------------------------------------------------------------------------------------------- text encoders


def _resolve(root, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or root is None else Path(root) / p


class TextFeatures:
    """The frozen text encoder of a config: ``words_feat (N, Lw, Dt)`` of token rows ``(N, Lw)``.

    CLIP: the ``last_hidden_state`` of the text tower (``CLIP_encode_text``, model.py L101-134; the first ``Lw``
    positions are exact under the causal mask), cached per distinct row; ``model.clip`` = OpenAI-format weights
    (``ViT-B-32.pt``, MESM's ``clip_text_encoder.pth``, a ``parity.convert clip2jax`` directory; relative paths
    under ``--data-root``), ``""`` = a random tower (seed 0) at ``model.clip_*`` sizes. GloVe: the frozen table
    (row 0 ``<PAD>`` zeros, row 1 ``<UNK>``); glove.pkl: none (the batch holds the vectors)."""

    def __init__(self, cfg, root, tokenizer=None):
        m, self.kind = cfg.model, ("pkl" if cfg.model.load_vocab_pkl else cfg.model.tokenizer_type)
        self.cache: dict[bytes, np.ndarray] = {}
        if self.kind == "CLIP":
            self._init_clip(cfg, root)
        elif self.kind in ("GloVeNLTK", "GloVeSimple"):
            if tokenizer is None:
                raise JaxprvrError("TextFeatures", "the GloVe tokenizer (its vocabulary)", "none")
            f = facts_of(cfg)
            emb = tokenizer.build_embedding(str(_resolve(root, f.text_model_path)), seed=cfg.data.glove_seed)
            self.table = np.asarray(emb.matrix, np.float32)
            self.missing = emb.missing
        elif self.kind != "pkl":
            raise JaxprvrError("model.tokenizer_type", "CLIP | GloVeNLTK", repr(m.tokenizer_type))

    def _init_clip(self, cfg, root):
        from jaxprvr.models.clip import PRECISIONS, CLIPDims, TextTower

        m = cfg.model
        if m.clip:
            from parity.clip import load_clip_weights

            dims, params, _ = load_clip_weights(_resolve(root, m.clip))
            params = params["text"]
        else:
            dims = CLIPDims(embed_dim=m.clip_width, text_width=m.clip_width, text_layers=m.clip_layers,
                            text_heads=m.clip_heads, vocab_size=m.clip_vocab_size,
                            context_length=m.clip_context_length).validate("model.clip_*")
            params = None
        if dims.text_width != m.t_feat_dim:
            raise JaxprvrError(m.clip or "model.clip_width", f"a CLIP text width equal to model.t_feat_dim = "
                               f"{m.t_feat_dim}", f"{dims.text_width}")
        dtype = {"fp16": PRECISIONS["fp16"], "fp32": PRECISIONS["fp32"]}.get(m.clip_dtype)
        if dtype is None:
            raise JaxprvrError("model.clip_dtype", "fp16 | fp32", repr(m.clip_dtype))
        tower = TextTower(dims, dtype)
        if params is None:
            params = tower.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
        self.params = jax.device_put(params)
        self._run = jax.jit(lambda p, ids: tower.apply({"params": p}, ids)["hidden"].astype(jnp.float32))

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if self.kind in ("GloVeNLTK", "GloVeSimple"):
            return self.table[ids]
        rows = [r.tobytes() for r in ids]
        todo = list(dict.fromkeys(r for r, x in zip(rows, ids) if r not in self.cache))
        if todo:
            block = np.stack([np.frombuffer(r, ids.dtype) for r in todo])
            n = len(block)
            pad = -(-n // ids.shape[0]) * ids.shape[0]  # whole multiples of the batch's rows: one compiled shape
            block = np.concatenate([block, np.zeros((pad - n, block.shape[1]), block.dtype)])
            out = np.concatenate([np.asarray(self._run(self.params, block[i:i + ids.shape[0]]))
                                  for i in range(0, pad, ids.shape[0])])
            for r, v in zip(todo, out[:n]):
                self.cache[r] = v
        return np.stack([self.cache[r] for r in rows])


# ---------------------------------------------------------------------------------------------- the split


class MESMSet:
    """One split for the task: :class:`jaxprvr.data.mesm.MESMSplit` + its text features; batches are the static
    dicts with ``words_feat`` filled and the official dicts beside them."""

    def __init__(self, cfg, root, split: str):
        from jaxprvr.data.mesm import make_tokenizer, open_mesm

        d, t = cfg.data, cfg.train
        self.cfg, self.split = cfg, split
        self.facts = facts_of(cfg)
        if split not in self.facts.splits:
            raise JaxprvrError(f"split {split!r}", f"one of the splits of {d.dataset}: {list(self.facts.splits)}",
                               repr(split))
        train = split == "train"
        text_options = {} if self.facts.tokenizer_type == "CLIP" else {"sentence_split": d.sentence_split}
        # POS weights only drive training's MLM masking: evaluation needs no tagger (and no NLTK data)
        tok = make_tokenizer(self.facts, root, recfw=self.facts.rec_fw and train,
                             pos_tagger=d.pos_tagger if train else "none", **text_options)
        caps = {k: v for k, v in (("rows", d.row_capacity), ("video", d.video_capacity)) if v} or None
        self.ds = open_mesm(d.dataset, self.facts.variant, root, split, tokenizer=tok,
                            val_holdout=train and t.selection == "val", val_seed=d.val_seed,
                            rescale_labels=d.rescale_labels, whole_video=d.whole_video,
                            chunk_seed=None if d.chunk_seed < 0 else d.chunk_seed, capacities=caps,
                            eval_batches=(_resolve(root, d.eval_batches) if d.eval_batches and not train else None),
                            buckets=(d.bucket_rows, d.bucket_frames),
                            **_fact_overrides(cfg))
        self.text = TextFeatures(cfg, root, tok)
        self.n_queries = self.ds.n_queries

    def __len__(self):
        return len(self.ds.items)

    @property
    def max_item_rows(self) -> int:
        """The most queries one item holds (SS-MESM needs that many sentence slots)."""
        return max(len(it.rows) for it in self.ds.items)

    def static(self, b) -> dict:
        s = dict(b.static)
        if "words_feat" not in s:
            ids = s.pop("words_id")
            feat = self.text(ids)
            feat[np.asarray(s["row_group"]) < 0] = 0.0
            s["words_feat"] = feat.astype(np.float32)
        else:
            s.pop("words_id", None)
        return s

    def batches(self, rng, train: bool):
        for b in self.ds.batches(rng, train):
            yield b, self.static(b)


# ---------------------------------------------------------------------------------------------- the task


def trainable_mask(params, m) -> dict:
    """The tensors the official loss gives a gradient (torch's AdamW skips a ``grad is None`` tensor: neither
    updated nor decayed): all but ``txt_position_embed`` (built, unused without ``use_txt_pos``, model.py L169-172)
    and SS-MESM's ``output_sent_proj`` (its ``projed_recon_feat`` enters no loss term, criterion.py)."""
    def keep(path) -> bool:
        names = [getattr(p, "key", str(p)) for p in path]
        if names[0] == "txt_position_embed" and not m.use_txt_pos:
            return False
        return not (names[0] == "ss_reconstructor" and len(names) > 1 and names[1].startswith("output_sent_proj"))

    return jax.tree_util.tree_map_with_path(lambda path, _: keep(path), params)


def chance_fields(gt_rows) -> dict:
    """The chance levels a test prints beside its metrics, ``{"chance_R1@0.3", ..., "chance_miou"}`` (percentages):
    :func:`jaxprvr.metrics.moments.chance_mr` of the split's ground-truth rows (``qid, duration,
    relevant_windows``), 200 draws per row, seed 0. The report computes them with this call where a run's outputs
    lack them."""
    from jaxprvr.metrics.moments import chance_mr

    ch = chance_mr(gt_rows, n_draws=200, seed=0, thresholds=(0.3, 0.5, 0.7))
    return {f"chance_{k}": v for k, v in ch.items()}


class MESMTask(Task):
    name = "vmr"
    api_class = "jaxprvr.api_tasks:MESMModel"
    splits = SPLITS
    batch_keys = BATCH_KEYS
    selection_metric = "MR-full-mAP"
    selection_mode = "max"
    best_per_split = True
    checkpoint_data_fields = ("variant", "feat_dims", "tokenizer_type", "load_vocab_pkl", "max_words_l",
                              "max_video_l", "vocab_size")
    # --demo: a short run on the built-in synthetic data with a small model (the family's row narrows it)
    demo_overrides = {"train.n_epoch": "8", "train.log_every": "5", "data.pos_tagger": "rule",
                      "train.selection": "val"}

    # -- data
    def demo_root(self, cfg) -> Path:
        from jaxprvr.data.synthetic_mesm import demo_root

        return Path(demo_root(cfg.data.dataset, cfg.data.variant or None, feat_dims=cfg.data.feat_dims or None))

    def selection_splits(self, cfg) -> tuple[str, ...]:
        f = facts_of(cfg)
        if cfg.train.selection not in ("official", "val"):
            raise JaxprvrError("train.selection", "official | val", repr(cfg.train.selection))
        return f.official_selection if cfg.train.selection == "official" else f.honest_selection

    def validation_split(self, cfg) -> str:
        return self.selection_splits(cfg)[0]

    def selection_key(self, cfg) -> str:
        if cfg.train.stop_score not in ("mAP", "miou"):
            raise JaxprvrError("train.stop_score", "mAP | miou", repr(cfg.train.stop_score))
        return f"MR-full-{cfg.train.stop_score}"

    def test_plan(self, cfg) -> list[tuple[str, str]]:
        """Each reported split on its own best checkpoint where it selected one (the official protocol), else on
        the first selection split's."""
        sel = self.selection_splits(cfg)
        return [(s, self.best_slot(cfg, s if s in sel else sel[0])) for s in facts_of(cfg).test_splits]

    def open_split(self, cfg, root, split):
        return MESMSet(cfg, root, split)

    def with_data_dims(self, cfg, ds):
        """``model.ss_slots`` from the training split's largest item (0 = R slots: the same numbers, R / S times
        the work); an evaluation split with larger items widens it for its own forward (:class:`Evaluator`)."""
        if cfg.model.ss_slots:
            return cfg
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ss_slots=ds.max_item_rows))

    def dummy_batch(self, cfg, rows: int = 4) -> dict:
        m = cfg.model
        f32 = np.float32
        lv, lw = 8, m.max_words_l
        dv = m.v_feat_dim + (2 if m.use_tef else 0)
        return {
            "video_feat": np.zeros((rows, lv, dv), f32), "video_mask": np.ones((rows, lv), bool),
            "words_feat": np.zeros((rows, lw, m.t_feat_dim), f32), "words_mask": np.ones((rows, lw), bool),
            "words_weight": np.ones((rows, lw), f32), "words_label": np.zeros((rows, lw), np.int32),
            "unknown_mask": np.zeros((rows, lw), bool), "clip_mask": np.ones((rows, lv), bool),
            "row_group": np.arange(rows, dtype=np.int32), "num_rows": np.asarray(rows, np.int32),
            "neg_index": np.roll(np.arange(rows, dtype=np.int32), 1),
            "mlm_mask": np.zeros((rows, lw), bool),
        }

    def train_plan(self, cfg, ds, *, mesh, n_slices: int) -> TrainPlan:
        """``train.batch_size`` items per batch, the official sampler per epoch from (seed, epoch); one process
        (the rows of a batch are not sliced across processes: the T2V mask and the negatives see the whole
        batch)."""
        from jaxprvr.data import prefetch

        if n_slices > 1:
            raise JaxprvrError("MESM training", "one process (its batches are not sliced across processes)",
                               f"{n_slices} slices")
        if cfg.model.ss_slots and ds.max_item_rows > cfg.model.ss_slots:
            raise JaxprvrError("model.ss_slots", f"at least the most queries of one training item ({ds.max_item_rows})",
                               str(cfg.model.ss_slots))
        n_steps = len(ds.ds.batch_plan(np.random.default_rng([cfg.train.seed, 0]), True)[0])

        def batches(epoch, skip):
            rng = np.random.default_rng([cfg.train.seed, epoch])

            def gen():
                for i, (b, s) in enumerate(ds.batches(rng, True)):
                    if i >= skip:
                        s["global_counts"] = {"items": len(b.items), "queries": int(s["num_rows"])}
                        yield s
            return prefetch(gen(), cfg.data.prefetch)

        def counts(batch):
            return batch["global_counts"]

        return TrainPlan(n_steps, batches, counts)

    # -- optimisation
    def loss(self, model, cfg, steps_per_epoch: int):
        from jaxprvr.losses.mesm import mesm_loss
        from jaxprvr.models.mesm import sample_mlm_mask, sample_outclass_neg

        multi = cfg.data.dataset == "qvhighlights"

        def loss_fn(params, batch, rngs, step, model_state):
            k_neg, k_mlm = jax.random.split(rngs["sample"])
            neg = sample_outclass_neg(k_neg, batch["row_group"], batch["num_rows"])
            mlm = sample_mlm_mask(k_mlm, batch["words_mask"], batch["words_weight"])
            outputs, _ = model.apply({"params": params}, batch, train=True, neg_index=neg, mlm_mask=mlm,
                                     rngs={"dropout": rngs["dropout"]})
            total, terms = mesm_loss(outputs, batch, cfg.loss, multi_clip=multi,
                                     stable_neg_pair=cfg.loss.stable_neg_pair)
            return total, (terms, {})

        return loss_fn

    def _schedule(self, cfg, steps_per_epoch):
        from jaxprvr.optim import multistep_lr

        t = cfg.train
        drops = tuple(range(t.lr_drop, t.n_epoch + 1, t.lr_drop)) if t.lr_drop > 0 else ()
        return multistep_lr(t.lr, drops, t.lr_gamma, steps_per_epoch)

    def optimizer(self, cfg, params, steps_per_epoch: int):
        from jaxprvr.optim import torch_adamw

        t = cfg.train
        return torch_adamw(self._schedule(cfg, steps_per_epoch), t.adam_b1, t.adam_b2, t.wd, t.max_grad_norm,
                           trainable_mask(params, cfg.model), eps=t.adam_eps)

    def lr_at(self, cfg, steps_per_epoch: int):
        sched = self._schedule(cfg, steps_per_epoch)
        return lambda step: float(sched(step))

    # -- evaluation
    def evaluator(self, model, cfg, mesh=None):
        return Evaluator(model, cfg, mesh)

    def format_metrics(self, m: dict) -> str:
        keys = ("MR-full-R1@0.3", "MR-full-R1@0.5", "MR-full-R1@0.7", "MR-full-miou", "MR-full-mAP",
                "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1")
        return " ".join(f"{k[3:] if k.startswith('MR-') else k}={m[k]:.2f}" for k in keys
                        if isinstance(m.get(k), (int, float)))

    def test_fields(self, ds) -> dict:
        try:
            gt = ds.ds.gt_rows()
        except JaxprvrError:
            return {}
        return chance_fields(gt)

    def test_line(self, t: dict) -> str:
        chance = t.get("chance_R1@0.5")
        extra = f" (chance {chance:.2f})" if chance is not None else ""
        split = t.get("split", "test")
        where = "test" if split == "test" else f"test ({split})"
        return (f"{where} MR-full-R1@0.5 {t.get('MR-full-R1@0.5', float('nan')):.2f}{extra} "
                + self.format_metrics(t))

    def save_outputs(self, directory, metrics: dict, ds) -> None:
        from jaxprvr.metrics.moments import save_jsonl

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_jsonl(metrics["_submission"], out / f"{ds.cfg.data.dataset}_{ds.split}_submission.jsonl")
        (out / "metrics.json").write_text(json.dumps(metrics["_metrics"], indent=2))
        batches = [[int(ds.ds.queries[r].qid) for it in items for r in it] for items in metrics["_batches"]]
        (out / "eval_batches.json").write_text(json.dumps(batches))


TASK = MESMTask()


class Evaluator:
    """The official evaluation (``eval.py`` ``compute_mr_results`` + ``eval_submission``): per batch, the model in
    eval mode (no negative branch, no MLM pass) -> submission rows -> the metrics of the whole split."""

    def __init__(self, model, cfg, mesh=None):
        self.model, self.cfg = model, cfg
        self.mesh = mesh if mesh is not None else shd.make_mesh()
        self._fwds = {}

    def _fwd(self, slots: int):
        """The jitted eval forward with at least ``slots`` SS-MESM slots (the training model's when they suffice)."""
        from jaxprvr.models import build_model

        have = self.cfg.model.ss_slots
        key = 0 if not have or slots <= have else slots
        if key not in self._fwds:
            model = self.model if key == 0 else build_model(dataclasses.replace(self.cfg.model, ss_slots=key))

            def fwd(params, batch):
                out, _ = model.apply({"params": params}, batch, train=False)
                return out["pred_logits"], out["pred_spans"], out["saliency_scores"]

            self._fwds[key] = jax.jit(fwd)
        return self._fwds[key]

    def evaluate(self, params, ds, progress: bool = False, keep_outputs: bool = False) -> dict:
        from jaxprvr.metrics.moments import eval_submission, official_dataset_name, postprocess

        d = self.cfg.data
        submission, comps = [], []
        plan = ds.ds.batch_plan(None, False)[0]
        it = ds.batches(None, False)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(plan), desc=f"eval {ds.split}", unit="batch", leave=False)
        fwd = self._fwd(ds.max_item_rows)
        for b, s in it:
            logits, spans, sal = jax.device_get(fwd(params, {k: s[k] for k in BATCH_KEYS if k in s}))
            rows = [r for item in b.items for r in item]
            n = len(rows)
            qs = [ds.ds.queries[r] for r in rows]
            submission += postprocess(logits[:n], spans[:n], sal[:n], np.asarray([q.duration for q in qs]),
                                      clip_len=d.clip_len, max_ts_val=d.max_ts_val, qid=[q.qid for q in qs],
                                      query=[q.sentence for q in qs], vid=[q.video_id for q in qs],
                                      video_mask=np.asarray(s["video_mask"])[:n])
            comps.append(b.items)
        res = eval_submission(submission, ds.ds.gt_rows(), official_dataset_name(d.dataset))
        flat = {k: v for k, v in res["brief"].items()}
        flat["n_queries"] = len(submission)
        if keep_outputs:
            flat.update(_submission=submission, _metrics=res, _batches=comps)
        return flat


__all__ = ["MESMTask", "TASK", "trainable_mask", "Evaluator", "MESMSet", "TextFeatures", "RECIPES", "resolve_config", "facts_of"]
