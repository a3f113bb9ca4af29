"""Key table of GMMFormer v2 (official ``GMMFormerV2_Net``, huangmozhi9527/GMMFormer_v2
``src/Models/gmmformerV2/model.py``): 297 tensors; two DyGMMBlocks of eight v2 attention branches, a
cross-attention ``ca`` and the width predictor ``layer1``/``layer2``; one shared ``weight_token``.

Flax model: :class:`jaxprvr.models.gmmformer_v2.GMMFormerV2`; torch twin: :class:`torch_ref.gmmformer_v2.GMMFormerV2`.
"""

from parity.keys import Entry, bert_attention_v2, check_table, dygmm_block, linear, linear_layer, pos_embed
from parity.prvr import (BRANCH_BIAS, BRANCH_HIDDEN_BIAS, BRANCH_OUTPUT_BIAS, KEY_BIAS, GMMSpecMixin, PRVRSpec,
                         ZeroGrad)

N_BRANCHES = 8  # attn0..attn7, widths jaxprvr.models.layers.DYGMM_WIDTHS

TABLE = check_table(
    [Entry("weight_token", "weight_token", "param")]
    + pos_embed("query") + pos_embed("clip") + pos_embed("frame")
    + linear_layer("query") + bert_attention_v2("query_encoder")
    + linear_layer("clip") + dygmm_block("clip_encoder", N_BRANCHES)
    + linear_layer("frame") + dygmm_block("frame_encoder_1", N_BRANCHES)
    + linear("modular_vector_mapping", "modular_vector_mapping", bias=False)
)


class Spec(GMMSpecMixin, PRVRSpec):
    name = "gmmformer_v2"
    table = TABLE

    def zero_gradients(self, cfg) -> tuple:
        """Key biases of the plain attentions (query encoder, each DyGMMBlock's ``attn0`` and cross-attention ``ca``),
        the DyGMM branch-weight bias ``layer2.bias``, and (partially) ``layer1.bias``."""
        enc = r"(clip_encoder|frame_encoder_1)"
        return (ZeroGrad(r"query_encoder\.self\.key\.bias", KEY_BIAS),
                ZeroGrad(enc + r"\.(attn0|ca)\.self\.key\.bias", KEY_BIAS),
                ZeroGrad(enc + r"\.layer2\.bias", BRANCH_BIAS),
                ZeroGrad(enc + r"\.layer1\.bias", BRANCH_HIDDEN_BIAS, partial=True),
                ZeroGrad(enc + r"\.ca\.norm2\.bias", BRANCH_OUTPUT_BIAS, partial=True))

    def family_blocks(self, cfg, twin, taux, T) -> list:
        from jaxprvr.models import layers as fl

        c, fmask = cfg.model, T("frame_mask")
        d, h, dt = c.hidden_size, c.n_heads, fl.resolve_compute_dtype(c)
        return [
            (f"Gaussian attention v2 (clip_encoder.attn1, width {fl.DYGMM_WIDTHS[1]})",
             (fl.BertAttentionV2(d, h, 0.0, fl.DYGMM_WIDTHS[1], dtype=dt), ("clip_encoder", "attn1"),
              lambda x: (x, None)),
             lambda x: twin.clip_encoder.attn1(x, None), (taux["clip_embed"],)),
            ("clip_encoder (DyGMMBlock, 8 widths + weight_token)",
             lambda m, x: m.clip_encoder(x, None, m.weight_token),
             lambda x: twin.clip_encoder(x, None, twin.weight_token), (taux["clip_embed"],)),
            ("frame_encoder_1 (DyGMMBlock, masked)",
             lambda m, x, k: m.frame_encoder_1(x, k, m.weight_token),
             lambda x, k: twin.frame_encoder_1(x, k, twin.weight_token), (taux["frame_embed"], fmask)),
        ]


SPEC = Spec()
