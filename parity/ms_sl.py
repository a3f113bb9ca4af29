"""Key table of MS-SL (official ``MS_SL_Net``, HuiGuanLab/ms-sl ``method/model.py``): 54 tensors.

Flax model: :class:`jaxprvr.models.ms_sl.MSSL`; torch twin: :class:`torch_ref.ms_sl.MSSL`.
"""

from parity.keys import bert_attention_v1, check_table, linear, linear_layer, pos_embed

TABLE = check_table(
    pos_embed("query") + pos_embed("clip") + pos_embed("frame")
    + linear_layer("query") + bert_attention_v1("query_encoder")
    + linear_layer("clip") + bert_attention_v1("clip_encoder")
    + linear_layer("frame") + bert_attention_v1("frame_encoder")
    + linear("modular_vector_mapping", "modular_vector_mapping", bias=False)
    + linear("mapping_linear.0", "mapping_linear_0", bias=False)
    + linear("mapping_linear.1", "mapping_linear_1", bias=False)
)
