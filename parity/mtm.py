"""Key table of MTM (official ``MTM_Net``, tianxinlin666/MTM ``src/Models/MTM/model.py``): 1,101 state_dict keys,
462 of them the ``attns.K`` aliases of the DyGMMBlocks' ``attnK`` (alias rows: converted once, written twice,
checked equal on the way in). Built for ``num_mamba_layers`` (2 officially) Mamba/LayerNorm pairs per branch.

Flax model: :class:`jaxprvr.models.mtm.MTM`; torch twin: :class:`torch_ref.mtm.MTM`.
"""

from parity.keys import (Entry, bert_attention_v2, check_table, layernorm, linear, linear_layer, mamba_stack,
                         mtm_dygmm_block, pos_embed, tcn)


def make_table(num_mamba_layers: int = 2) -> tuple:
    def mlp(t):
        return linear(f"{t}.mlp.0", f"{t}/mlp_0") + linear(f"{t}.mlp.3", f"{t}/mlp_3")

    return check_table(
        [Entry("weight_token", "weight_token", "param")]
        + pos_embed("query") + pos_embed("clip") + pos_embed("frame") + pos_embed("video")
        + linear_layer("query") + bert_attention_v2("query_encoder")
        + linear_layer("clip") + mtm_dygmm_block("clip_encoder") + mamba_stack("clip_mamba", num_mamba_layers)
        + linear_layer("frame") + tcn("frame_tcn") + mtm_dygmm_block("frame_encoder_1")
        + mamba_stack("frame_mamba", num_mamba_layers)
        + linear_layer("video") + mtm_dygmm_block("video_encoder") + linear("video_pooling.attn_proj",
                                                                          "video_pooling/attn_proj")
        + bert_attention_v2("video_guided_text_refinement.cross_attention")
        + layernorm("video_guided_text_refinement.linear_out.LayerNorm",
                    "video_guided_text_refinement/linear_out/LayerNorm")
        + linear("video_guided_text_refinement.linear_out.net.1", "video_guided_text_refinement/linear_out/net_1")
        + linear("modular_vector_mapping", "modular_vector_mapping", bias=False)
        + mlp("text_reconstructor") + mlp("video_reconstructor")
    )


TABLE = make_table(2)
