"""Key table of GMMFormer v1 (official ``GMMFormer_Net``, huangmozhi9527/GMMFormer
``src/Models/gmmformer/model.py``): 193 tensors; four GMMBlocks of four v1 attention branches.

Flax model: :class:`jaxprvr.models.gmmformer.GMMFormer`; torch twin: :class:`torch_ref.gmmformer.GMMFormer`.
"""

from parity.keys import bert_attention_v1, check_table, gmm_block, linear, linear_layer, pos_embed
from parity.prvr import KEY_BIAS, PRVRSpec, ZeroGrad

N_BRANCHES = 4  # Gaussian widths None / 0.5 / 1.0 / 5.0

TABLE = check_table(
    pos_embed("query") + pos_embed("clip") + pos_embed("frame")
    + linear_layer("query") + bert_attention_v1("query_encoder")
    + linear_layer("clip") + gmm_block("clip_encoder", N_BRANCHES) + gmm_block("clip_encoder_2", N_BRANCHES)
    + linear_layer("frame") + gmm_block("frame_encoder_1", N_BRANCHES) + gmm_block("frame_encoder_2", N_BRANCHES)
    + linear("modular_vector_mapping", "modular_vector_mapping", bias=False)
    + linear("modular_vector_mapping_2", "modular_vector_mapping_2", bias=False)
)


class Spec(PRVRSpec):
    name = "gmmformer"
    table = TABLE

    def zero_gradients(self, cfg) -> tuple:
        """The key biases of the query encoder and of each GMMBlock's plain branch ``attn0`` (width None)."""
        return (ZeroGrad(r"query_encoder\.self\.key\.bias", KEY_BIAS),
                ZeroGrad(r"(clip_encoder|clip_encoder_2|frame_encoder_1|frame_encoder_2)\.attn0\.self\.key\.bias",
                         KEY_BIAS))

    def family_blocks(self, cfg, twin, taux, T) -> list:
        import jax.numpy as jnp

        from jaxprvr.models import layers as fl
        from torch_ref import layers as tl

        c, fmask, gl = cfg.model, T("frame_mask"), taux["gmm_length"]
        dt = fl.resolve_compute_dtype(c)
        d, h = c.hidden_size, c.n_heads
        return [
            (f"Gaussian attention (clip_encoder.attn1, width {fl.GMM_WIDTHS[1]})",
             (fl.BertAttention(d, h, 0.0, fl.GMM_WIDTHS[1], dtype=dt), ("clip_encoder", "attn1"), lambda x: (x, None)),
             lambda x: twin.clip_encoder.attn1(x, None), (taux["clip_embed"],)),
            ("clip_encoder (GMMBlock, 4 widths)", lambda m, x: m.clip_encoder(x, None),
             lambda x: twin.clip_encoder(x, None), (taux["clip_embed"],)),
            ("clip_encoder_2 (GMMBlock)", lambda m, x: m.clip_encoder_2(x, None),
             lambda x: twin.clip_encoder_2(x, None), (taux["clip_feats_1"],)),
            (f"frame_encoder_1 (GMMBlock, masked, Gaussian grid {int(gl)})",
             lambda m, x, k: m.frame_encoder_1(x, k, gmm_length=jnp.asarray(int(gl))),
             lambda x, k: twin.frame_encoder_1(x, k, int(gl)), (taux["frame_embed"], fmask)),
            ("frame_encoder_2 (GMMBlock, masked)",
             lambda m, x, k: m.frame_encoder_2(x, k, gmm_length=jnp.asarray(int(gl))),
             lambda x, k: twin.frame_encoder_2(x, k, int(gl)), (taux["frame_feats_1"], fmask)),
            ("frame pooling (masked attention pooling)",
             lambda m, x, k: fl.attention_pool(m.modular_vector_mapping_2(x), k, x),
             lambda x, k: tl.attention_pool(twin.modular_vector_mapping_2, x, k), (taux["frame_feats"], fmask)),
        ]


SPEC = Spec()
