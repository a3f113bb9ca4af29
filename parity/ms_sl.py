"""Key table of MS-SL (official ``MS_SL_Net``, HuiGuanLab/ms-sl ``method/model.py``): 54 tensors.

Flax model: :class:`jaxprvr.models.ms_sl.MSSL`; torch twin: :class:`torch_ref.ms_sl.MSSL`.
"""

from pathlib import Path

from jaxprvr.errors import JaxprvrError
from parity.keys import bert_attention_v1, check_table, linear, linear_layer, pos_embed
from parity.prvr import KEY_BIAS, PRVRSpec, ZeroGrad, _atomic

TABLE = check_table(
    pos_embed("query") + pos_embed("clip") + pos_embed("frame")
    + linear_layer("query") + bert_attention_v1("query_encoder")
    + linear_layer("clip") + bert_attention_v1("clip_encoder")
    + linear_layer("frame") + bert_attention_v1("frame_encoder")
    + linear("modular_vector_mapping", "modular_vector_mapping", bias=False)
    + linear("mapping_linear.0", "mapping_linear_0", bias=False)
    + linear("mapping_linear.1", "mapping_linear_1", bias=False)
)


class Spec(PRVRSpec):
    name = "ms_sl"
    table = TABLE
    official_layout = "model.ckpt"

    def zero_gradients(self, cfg) -> tuple:
        """The key biases of the three plain self-attentions (query, clip, frame encoders)."""
        return (ZeroGrad(r"(query|clip|frame)_encoder\.self\.key\.bias", KEY_BIAS),)

    def family_blocks(self, cfg, twin, taux, T) -> list:
        from jaxprvr.models.ms_sl import encode_feat_map, key_clip_attention_inference

        c, fmask = cfg.model, T("frame_mask")
        return [
            ("clip_encoder (self-attention v1)", lambda m, x: m.clip_encoder(x, None),
             lambda x: twin.clip_encoder(x, None), (taux["clip_embed"],)),
            ("frame_encoder (self-attention v1, masked)", lambda m, x, k: m.frame_encoder(x, k),
             lambda x, k: twin.frame_encoder(x, k), (taux["frame_embed"], fmask)),
            (f"proposal generation ({c.map_size * (c.map_size + 1) // 2} windows)",
             lambda m, x: encode_feat_map(x), lambda x: twin.encode_feat_map(x), (taux["clip_feats"],)),
            ("key-clip guided attention (every video, every query)",
             lambda m, f, p, k, i: key_clip_attention_inference(m.mapping_linear[0](f), m.mapping_linear[1](f),
                                                                p, k, i),
             lambda f, p, k, i: twin.key_clip_attention_inference(f, p, k, i),
             (taux["frame_feats"], taux["proposals"], fmask, taux["key_clip_index"])),
        ]

    def choice_ties(self, cfg, twin, ds):
        """The frame score of (query, video) attends from the video's key clip, the argmax of the query's cosine
        scores over the video's proposals: when the top two lie within :data:`parity.prvr.TIE`, either framework may
        pick either clip (the twin's encodings decide here)."""
        import torch
        import torch.nn.functional as F

        from parity.prvr import TIE
        from torch_ref.evaluate import TorchEvaluator

        ev = TorchEvaluator(twin.eval(), cfg)
        props = F.normalize(ev.encode_gallery(ds)["proposals"], dim=-1)  # (V, P, D)
        query = F.normalize(ev.encode_queries(ds), dim=-1)  # (Q, D)
        with torch.no_grad():
            top2 = torch.einsum("vpd,qd->qvp", props, query).topk(2, dim=-1).values
        return (top2[..., 0] - top2[..., 1] <= TIE).cpu().numpy()

    def official_model_cfg(self, cfg) -> dict:
        """The ``model_cfg`` MS-SL saves (``method/train.py:233-247``), from a jaxprvr config."""
        m = cfg.model
        return dict(visual_input_size=m.visual_feat_dim, query_input_size=m.q_feat_size, hidden_size=m.hidden_size,
                    max_ctx_l=m.max_ctx_l, max_desc_l=m.max_desc_l, map_size=m.map_size, input_drop=m.input_drop,
                    device=[0], drop=m.drop, n_heads=m.n_heads, initializer_range=0.02, margin=cfg.loss.margin,
                    use_hard_negative=False, hard_pool_size=cfg.loss.hard_pool_size)

    def write_official(self, path, cfg, params, *, opt_state=None, epoch: int = 0, model_val=None,
                       steps_per_epoch=None, ema_shadow=None) -> Path:
        """``model.ckpt``: ``{"model", "model_cfg", "epoch"}`` (MS-SL saves no optimizer state)."""
        from parity.convert import flax_to_torch
        from torch_ref.checkpoints import save_official

        if ema_shadow is not None:
            raise JaxprvrError("ema_shadow", "an MTM checkpoint (the official EMA is MTM's)", "an ms_sl one")
        sd = flax_to_torch(self.table_for(cfg.model), params)
        return _atomic(path, lambda tmp: save_official(tmp, self.name, sd, epoch=epoch,
                                                       model_cfg=self.official_model_cfg(cfg)))


SPEC = Spec()
