"""The family registry: one row per model, the only place that lists them.

A row names the model's Flax class, its config types (:mod:`jaxprvr.config`), its task (:mod:`jaxprvr.tasks`),
its PyTorch twin and its parity module (key table, block specs, official-file writer). Classes are given as
``"module:attr"`` strings and imported on first use, so reading the table imports neither Flax models nor
torch. Everything that lists models (``--model`` choices and errors, the config table, the parity drivers,
the benchmarks) reads :func:`names` / :func:`get`; adding a family adds one row here (docs/adding-a-model.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from jaxprvr import config as C
from jaxprvr.errors import JaxprvrError


@dataclass(frozen=True)
class Family:
    name: str  # the --model name, the configs/<name>/ folder, the parity/<name>.py module
    label: str  # as the papers write it
    task: str  # a module of jaxprvr.tasks
    model: str  # "module:Class" of the Flax model
    model_config: type
    loss_config: type
    twin: str  # "module:Class" of the PyTorch twin (official module names and state_dict keys)
    parity: str  # module with the key table, block specs and official-file writer
    official: str  # the official repository (owner/name)
    demo: tuple[tuple[str, str], ...] = ()  # --set pairs --demo adds for this model on top of its task's
    # Section types of a family whose data / train fields differ from its task's defaults (config.DATA_CONFIGS,
    # config.TRAIN_CONFIGS): e.g. a moment-retrieval family with its own on-disk format and recipe.
    data_config: type | None = None
    train_config: type | None = None
    # The Task instance: an attribute of the task module, or "module:attr" (a task's family-specific pieces in a
    # module of their own, e.g. DETR-style moment retrieval beside the proposal-map one).
    task_object: str = "TASK"
    # "module:function" applied to a loaded config after its overrides (then the overrides again, so that an
    # explicit --set wins): fields derived from another field, e.g. a feature variant's widths and lengths.
    resolve: str = ""
    # What the models page says of the family (python -m jaxprvr.train --list --markdown, docs/models.md): the official
    # checkpoint file that parity.convert reads and writes (the family's parity module), and its parity state (README's
    # Status table, shortened).
    checkpoint_format: str = ""
    parity_status: str = ""

    def demo_overrides(self) -> list[str]:
        """The ``--set`` list ``--demo`` applies: the task's, then the family's."""
        merged = {**self.task_instance().demo_overrides, **dict(self.demo)}
        return [f"{k}={v}" for k, v in merged.items()]

    def model_class(self):
        return _load(self.model)

    def twin_class(self):
        return _load(self.twin)

    def parity_module(self):
        return importlib.import_module(self.parity)

    def task_module(self):
        return importlib.import_module(f"jaxprvr.tasks.{self.task}")

    def task_instance(self):
        """The :class:`~jaxprvr.tasks.base.Task` object that trains and evaluates this family."""
        if ":" in self.task_object:
            return _load(self.task_object)
        return getattr(self.task_module(), self.task_object)

    def resolve_config(self, cfg):
        return _load(self.resolve)(cfg) if self.resolve else cfg


def _load(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


# The parity state the four PRVR families share (README's Status table).
PRVR_PARITY = "CPU float32 PASS: blocks, model, losses, gradients, 5 BertAdam steps, metrics; GPU run pending"

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("ms_sl", "MS-SL", "prvr", "jaxprvr.models.ms_sl:MSSL", C.MSSLConfig, C.PRVRLossConfig,
           "torch_ref.ms_sl:MSSL", "parity.ms_sl", "HuiGuanLab/ms-sl",
           checkpoint_format="`model.ckpt`: {model, model_cfg, epoch}",
           parity_status=PRVR_PARITY),
    Family("gmmformer", "GMMFormer", "prvr", "jaxprvr.models.gmmformer:GMMFormer", C.GMMFormerConfig,
           C.GMMFormerLossConfig, "torch_ref.gmmformer:GMMFormer", "parity.gmmformer", "huangmozhi9527/GMMFormer",
           checkpoint_format="`best.ckpt`: {config, epoch, model_val, state_dict, optimizer (BertAdam moments)}",
           parity_status=PRVR_PARITY),
    Family("gmmformer_v2", "GMMFormer v2", "prvr", "jaxprvr.models.gmmformer_v2:GMMFormerV2", C.GMMFormerV2Config,
           C.GMMFormerV2LossConfig, "torch_ref.gmmformer_v2:GMMFormerV2", "parity.gmmformer_v2",
           "huangmozhi9527/GMMFormer_v2",
           checkpoint_format="`best.ckpt`: {config, epoch, model_val, state_dict, optimizer (BertAdam moments)}",
           parity_status=PRVR_PARITY),
    # MTM is about 4x the work of GMMFormer v2 per step at equal width (three 11-branch DyGMM blocks, the Mamba
    # stacks, and a video reconstructor of 4*hidden x 128*3072 weights): its demo runs 64 wide.
    Family("mtm", "MTM", "prvr", "jaxprvr.models.mtm:MTM", C.MTMConfig, C.MTMLossConfig, "torch_ref.mtm:MTM",
           "parity.mtm", "tianxinlin666/MTM", demo=(("model.hidden_size", "64"),),
           checkpoint_format="`best.ckpt`: GMMFormer's layout + `ema_shadow` (the EMA weights); `attns.K` aliases",
           parity_status="CPU float32 PASS against the official `mamba_ssm.Mamba` (reference scan): blocks, model, "
                         "losses, gradients, 5 steps with EMA, metrics; GPU run pending"),
    # MRNet's compute is the 2-D conv stack over the N x N map (ActivityNet: 9x9 kernels, 512 channels, 64 x 64
    # cells, ~96% of a step): the demo runs a 32 x 32 map with a 5x5 x 2 stack, 64 wide.
    Family("mrnet", "MRNet", "vmr", "jaxprvr.models.mrnet:MRNet", C.MRNetConfig, C.MRNetLossConfig,
           "torch_ref.mrnet:MRNet", "parity.mrnet", "xian-sh/MRNet",
           demo=(("model.num_clips", "32"), ("model.featpool_kernel", "4"), ("model.pooling_counts", "(15,8)"),
                 ("model.joint_space", "64"), ("model.featpool_hidden", "64"), ("model.predictor_hidden", "64"),
                 ("model.predictor_kernel", "5"), ("model.predictor_layers", "2"), ("model.ffn_dim", "128"),
                 ("loss.only_iou_epoch", "4")),
           checkpoint_format="`.pth`: {model (with BatchNorm statistics), optimizer (AdamW), scheduler (MultiStepLR), "
                             "epoch}",
           parity_status="small widths, all three configs: float32 and float64 86/86 rows PASS; official file -> "
                         "convert -> evaluate = the twin's metrics (CI); official size: docs/parity.md"),
    # MESM (DETR-style moment retrieval, the frozen CLIP text tower outside the trained model): the demo runs 64
    # wide with a 2-layer random text tower on 64+64-wide synthetic features, videos pooled past 64 clips (the demo
    # videos last 12-45 s, one per split 110-210 s; officially 194), and a recipe that moves in minutes (lr 1e-3,
    # clip 1.0, input dropout 0.1, 4 videos per batch, 40 epochs; officially 2e-4, 0.1, 0.5, 12 over 200 epochs).
    Family("mesm", "MESM", "vmr", "jaxprvr.models.mesm:MESM", C.MESMConfig, C.MESMLossConfig, "torch_ref.mesm:MESM",
           "parity.mesm", "lntzm/MESM", data_config=C.MESMDataConfig, train_config=C.MESMTrainConfig,
           task_object="jaxprvr.tasks.vmr_detr:TASK", resolve="jaxprvr.tasks.vmr_detr:resolve_config",
           demo=(("model.hidden_dim", "64"), ("model.nheads", "4"), ("model.dim_feedforward", "128"),
                 ("model.clip_width", "64"), ("model.clip_layers", "2"), ("model.clip_heads", "2"),
                 ("model.t_feat_dim", "64"), ("data.feat_dims", "(64,64)"), ("train.batch_size", "4"),
                 ("train.lr", "1e-3"), ("train.max_grad_norm", "1.0"), ("model.input_dropout", "0.1"),
                 ("model.max_video_l", "64"), ("train.n_epoch", "40"),
                 # one static shape: at these sizes a compile costs more than the padding it would save
                 ("data.bucket_rows", "0"), ("data.bucket_frames", "0")),
           checkpoint_format="`model_<split>_best.ckpt`: {model, optimizer, lr_scheduler, epoch, opt} + `opt.json` "
                             "(the frozen text tower from `clip_text_encoder.pth`; AdamW moments not converted)",
           parity_status="small widths: QVHighlights 179/179, TACoS 182/182 (float32, float64); official size: "
                         "QVHighlights 179/179, TACoS 182/182 (float32 with PReLU kink crossings re-judged, float64)"),
    # BackBone_tvr's CLIP ViT-B/32 + seqTransf + WTI: the demo trains a small CLIP from scratch (no weights can be
    # downloaded) on 32 x 32 frames, 2 + 2 layers, 64 wide.
    Family("clip_wti", "CLIP + seqTransf + WTI (BackBone_tvr)", "t2v", "jaxprvr.models.clip_wti:ClipWTI",
           C.ClipWTIConfig, C.LossConfig, "torch_ref.clip_wti:ClipWTI", "parity.clip_wti",
           "shallowdream66/BackBone_tvr",
           demo=(("model.image_resolution", "32"), ("model.vision_patch_size", "8"), ("model.vision_width", "64"),
                 ("model.vision_layers", "2"), ("model.text_width", "64"), ("model.text_layers", "2"),
                 ("model.embed_dim", "64"), ("model.num_hidden_layers", "2"), ("model.vision_heads", "2"),
                 ("model.text_heads", "2")),
           checkpoint_format="BackBone_tvr's `torch.save(model.state_dict())` (`pytorch_model.bin.N`, `best.pth`: 359 "
                             "keys); OpenAI's `ViT-B-32.pt` read without torch",
           parity_status="equal to openai/CLIP's code and the twin (1e-4 float32, 1e-9 float64, CI); `parity.check` at "
                         "ViT-B/32 size 55/55 (float32, float64)"),
)}

# The model `--config <dataset>` trains when no --model is given: the strongest implemented on that dataset.
DEFAULT_MODEL = {"tvr": "mtm", "act": "mtm", "cha": "mtm", "activitynet": "mrnet", "tacos": "mrnet", "charades": "mrnet",
                 "msrvtt": "clip_wti", "msvd": "clip_wti", "lsmdc": "clip_wti",
                 "charades_cg": "mesm", "charades_cd": "mesm", "qvhighlights": "mesm"}


def names(task: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, f in FAMILIES.items() if task is None or f.task == task)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise JaxprvrError("--model", f"one of {list(FAMILIES)}", repr(name))
    return FAMILIES[name]


def family_of(cfg) -> Family:
    """The row of a Config or of a model config."""
    return get(getattr(cfg, "model", cfg).name)
