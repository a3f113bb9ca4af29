"""Key table of GMMFormer v2 (official ``GMMFormerV2_Net``, huangmozhi9527/GMMFormer_v2
``src/Models/gmmformerV2/model.py``): 297 tensors; two DyGMMBlocks of eight v2 attention branches, a
cross-attention ``ca`` and the width predictor ``layer1``/``layer2``; one shared ``weight_token``.

Flax model: :class:`jaxprvr.models.gmmformer_v2.GMMFormerV2`; torch twin: :class:`torch_ref.gmmformer_v2.GMMFormerV2`.
"""

from parity.keys import Entry, bert_attention_v2, check_table, dygmm_block, linear, linear_layer, pos_embed

N_BRANCHES = 8  # attn0..attn7, widths jaxprvr.models.layers.DYGMM_WIDTHS

TABLE = check_table(
    [Entry("weight_token", "weight_token", "param")]
    + pos_embed("query") + pos_embed("clip") + pos_embed("frame")
    + linear_layer("query") + bert_attention_v2("query_encoder")
    + linear_layer("clip") + dygmm_block("clip_encoder", N_BRANCHES)
    + linear_layer("frame") + dygmm_block("frame_encoder_1", N_BRANCHES)
    + linear("modular_vector_mapping", "modular_vector_mapping", bias=False)
)
