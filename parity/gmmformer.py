"""Key table of GMMFormer v1 (official ``GMMFormer_Net``, huangmozhi9527/GMMFormer
``src/Models/gmmformer/model.py``): 193 tensors; four GMMBlocks of four v1 attention branches.

Flax model: :class:`jaxprvr.models.gmmformer.GMMFormer`; torch twin: :class:`torch_ref.gmmformer.GMMFormer`.
"""

from parity.keys import bert_attention_v1, check_table, gmm_block, linear, linear_layer, pos_embed

N_BRANCHES = 4  # Gaussian widths None / 0.5 / 1.0 / 5.0

TABLE = check_table(
    pos_embed("query") + pos_embed("clip") + pos_embed("frame")
    + linear_layer("query") + bert_attention_v1("query_encoder")
    + linear_layer("clip") + gmm_block("clip_encoder", N_BRANCHES) + gmm_block("clip_encoder_2", N_BRANCHES)
    + linear_layer("frame") + gmm_block("frame_encoder_1", N_BRANCHES) + gmm_block("frame_encoder_2", N_BRANCHES)
    + linear("modular_vector_mapping", "modular_vector_mapping", bias=False)
    + linear("modular_vector_mapping_2", "modular_vector_mapping_2", bias=False)
)
