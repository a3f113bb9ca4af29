"""Key table of MTM (official ``MTM_Net``, tianxinlin666/MTM ``src/Models/MTM/model.py``): 1,101 state_dict keys,
462 of them the ``attns.K`` aliases of the DyGMMBlocks' ``attnK`` (alias rows: converted once, written twice,
checked equal on the way in). Built for ``num_mamba_layers`` (2 officially) Mamba/LayerNorm pairs per branch.

Flax model: :class:`jaxprvr.models.mtm.MTM`; torch twin: :class:`torch_ref.mtm.MTM`.
"""

import numpy as np

from parity.keys import (Entry, bert_attention_v2, check_table, layernorm, linear, linear_layer, mamba_stack,
                         mtm_dygmm_block, pos_embed, tcn)
from parity.prvr import (BRANCH_BIAS, BRANCH_HIDDEN_BIAS, BRANCH_OUTPUT_BIAS, KEY_BIAS, POOL_BIAS, GMMSpecMixin,
                         Plain, PRVRSpec, ZeroGrad)
from parity.rows import as_numpy


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


def _mamba_simple():
    import sys

    from torch_ref.mamba import load

    load()
    return sys.modules["mamba_ssm.modules.mamba_simple"]


def selective_scan_f64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """mamba_ssm's ``selective_scan_ref`` (real ``A``, ``B``/``C`` of shape ``(b, N, L)``), transcribed without
    its casts to float32: the float64 arbiter's scan. (``selective_scan_ref`` runs in float32 whatever its
    input dtype, so a ``.double()`` twin would otherwise still scan in float32.)"""
    import torch
    import torch.nn.functional as F

    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = u.new_zeros((u.shape[0], A.shape[0], A.shape[1]))
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.double()[:, None]
    if z is not None:
        out = out * F.silu(z.double())
    return (out, x) if return_last_state else out


class MambaScan:
    """While active, the twin's Mamba layers (``mamba_simple.selective_scan_fn``) scan float64 inputs in float64
    (:func:`selective_scan_f64`) and, with ``record``, keep the inputs of every scan call in ``calls``; float32
    calls go to the official function unchanged. A float64 layer's ``A``, ``D`` and ``delta_bias`` are taken from
    its float64 parameters (``-exp(A_log)``, ``D``, ``dt_proj.bias``): ``Mamba.forward`` passes them through
    ``.float()``, which would round them to float32 in a double-precision twin. With the CUDA ``causal_conv1d``
    (float32/16 only) float64 inputs take mamba_ssm's own fallback, the depthwise ``F.conv1d`` + SiLU. A no-op for
    the models without Mamba."""

    def __init__(self, record: bool = False):
        self.active = True
        self.record = record
        self.calls: list = []

    def __enter__(self):
        if self.active:
            import torch

            self.simple = _mamba_simple()
            self.orig = orig = self.simple.selective_scan_fn

            def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     return_last_state=False):
                if u.dtype == torch.float64 and stack and stack[-1].A_log.dtype == torch.float64:
                    layer = stack[-1]  # undo Mamba.forward's .float() on its float64 parameters
                    A, D, delta_bias = -torch.exp(layer.A_log), layer.D, layer.dt_proj.bias
                if self.record:
                    self.calls.append(tuple(None if t is None else t.detach()
                                            for t in (u, delta, A, B, C, D, z, delta_bias)))
                fn = selective_scan_f64 if u.dtype == torch.float64 else orig
                return fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                          return_last_state=return_last_state)

            self.simple.selective_scan_fn = scan
            stack = self.layers = []
            self.orig_forward = orig_forward = self.simple.Mamba.forward

            def forward(layer, *args, **kw):
                stack.append(layer)
                try:
                    return orig_forward(layer, *args, **kw)
                finally:
                    stack.pop()

            self.simple.Mamba.forward = forward
            self.orig_conv = orig_conv = getattr(self.simple, "causal_conv1d_fn", None)
            if orig_conv is not None:
                import torch.nn.functional as F

                def conv(x, weight, bias=None, *args, activation=None, **kw):
                    if x.dtype != torch.float64:
                        return orig_conv(x, weight, bias, *args, activation=activation, **kw)
                    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1,
                                 groups=weight.shape[0])[..., :x.shape[-1]]
                    return F.silu(y) if activation in ("silu", "swish") else y

                self.simple.causal_conv1d_fn = conv
        return self

    def __exit__(self, *exc):
        if self.active:
            self.simple.selective_scan_fn = self.orig
            self.simple.Mamba.forward = self.orig_forward
            if self.orig_conv is not None:
                self.simple.causal_conv1d_fn = self.orig_conv
        return False


def mtm_block_specs(cfg, twin, taux, T):
    """MTM's blocks: the selective scan (inputs recorded from ``frame_mamba.0``) against mamba_ssm's
    ``selective_scan_ref``, one Mamba layer, the clip branch's residual Mamba stack, the TCN, a Gaussian branch
    and the three 11-branch DyGMMBlocks, the attention pooling, the video-guided text refiner and the
    reconstructors."""
    import torch

    from jaxprvr.models import build_model
    from jaxprvr.models import layers as fl
    from jaxprvr.models.mtm import mamba_residual as j_mamba_residual
    from jaxprvr.ops.selective_scan import selective_scan
    from torch_ref.mamba import load as load_mamba
    from torch_ref.mtm import mamba_residual as t_mamba_residual

    c = cfg.model
    d, h, dt = c.hidden_size, c.n_heads, fl.resolve_compute_dtype(c)
    fmask = T("frame_mask")
    method = build_model(c).scan
    with MambaScan(record=True) as rec:  # (the float64 arbiter's twin records its own float64 call)
        twin.frame_mamba[0](taux["frame_feats_1"].to(next(twin.parameters()).dtype))
    scan_in = rec.calls[0]
    t_scan = selective_scan_f64 if scan_in[0].dtype == torch.float64 else load_mamba().selective_scan_ref
    n_state = scan_in[2].shape[1]
    wk = len(fl.MTM_WIDTHS) - 1
    return [
        (f"selective scan ({method}) vs mamba_ssm selective_scan_ref (frame_mamba.0 inputs: d_inner "
         f"{scan_in[0].shape[1]}, L {scan_in[0].shape[2]}, N {n_state})",
         Plain(lambda *a: selective_scan(*a, delta_softplus=True, method=method)),
         lambda *a: t_scan(*a, delta_softplus=True), scan_in),
        ("Mamba layer (frame_mamba.0, official mamba_ssm.Mamba)", lambda m, x: m.frame_mamba[0](x),
         lambda x: twin.frame_mamba[0](x), (taux["frame_feats_1"],)),
        (f"clip_mamba (h + LN(Mamba(...)), {c.num_mamba_layers} layers)",
         lambda m, x: j_mamba_residual(m.clip_mamba, x), lambda x: t_mamba_residual(twin.clip_mamba, x),
         (taux["clip_feats_1"],)),
        ("frame_tcn (TCN, eval)", lambda m, x: m.frame_tcn(x), lambda x: twin.frame_tcn(x), (taux["frame_embed"],)),
        (f"Gaussian attention v2 (clip_encoder.attn{wk}, width {fl.MTM_WIDTHS[wk]})",
         (fl.BertAttentionV2(d, h, 0.0, fl.MTM_WIDTHS[wk], dtype=dt), ("clip_encoder", f"attn{wk}"),
          lambda x: (x, None)),
         lambda x: getattr(twin.clip_encoder, f"attn{wk}")(x, None), (taux["clip_embed"],)),
        (f"clip_encoder (DyGMMBlock, {len(fl.MTM_WIDTHS)} widths + weight_token, logits sliced)",
         lambda m, x: m.clip_encoder(x, None, m.weight_token),
         lambda x: twin.clip_encoder(x, None, twin.weight_token), (taux["clip_embed"],)),
        ("frame_encoder_1 (DyGMMBlock, masked)", lambda m, x, k: m.frame_encoder_1(x, k, m.weight_token),
         lambda x, k: twin.frame_encoder_1(x, k, twin.weight_token), (taux["frame_tcn"], fmask)),
        ("video input_proj + pos_embed", lambda m, x: m.video_pos_embed(m.video_input_proj(x)),
         lambda x: twin.video_pos_embed(twin.video_input_proj(x)), (T("frame_feats"),)),
        ("video_encoder (DyGMMBlock, masked)", lambda m, x, k: m.video_encoder(x, k, m.weight_token),
         lambda x, k: twin.video_encoder(x, k, twin.weight_token), (taux["video_embed"], fmask)),
        ("video_pooling (AttentionPooling, masked)", lambda m, x, k: m.video_pooling(x, k),
         lambda x, k: twin.video_pooling(x, k), (taux["video_seq"], fmask)),
        ("video-guided text refiner (cross-attention over every video)",
         lambda m, q, v: m.video_guided_text_refinement(q, v),
         lambda q, v: twin.video_guided_text_refinement(q, v), (taux["query"], taux["video_feats"])),
        ("text_reconstructor (MLP, from query2)", lambda m, x: m.text_reconstructor(x),
         lambda x: twin.text_reconstructor(x), (taux["query2"],)),
        ("video_reconstructor (MLP, from the pooled video)", lambda m, x: m.video_reconstructor(x),
         lambda x: twin.video_reconstructor(x), (taux["video_feats"],)),
    ]


class Spec(GMMSpecMixin, PRVRSpec):
    """MTM: its Mamba scans (float64 arbiter scans in float64), its torch triplet sampler, the TCN dropout the
    config does not reach, EMA weights in the official file, and a key table per ``num_mamba_layers``."""

    name = "mtm"
    table = TABLE
    has_ema = True
    # MTM's TCN dropout is hard-coded 0.1 in both frameworks (official), out of the config's reach: in the grad
    # and train stages the twin runs in train mode with that one dropout set to 0 (dropout_off) and the Flax
    # model in eval mode, which with every other rate at 0 is the same computation (MTM has no other train/eval
    # difference).
    jax_train = False

    def table_for(self, model_cfg):
        """The official 2 Mamba layers per branch: ``"mtm"``; another count: the table built for it."""
        n = int(model_cfg.num_mamba_layers)
        return self.name if n == 2 else make_table(n)

    def zero_gradients(self, cfg) -> tuple:
        """v2's list for the three 11-branch DyGMMBlocks (branch-weight bias ``fixed_layer2_projection``), plus the
        video pooling's logit bias and the refiner's cross-attention key bias."""
        enc = r"(clip_encoder|frame_encoder_1|video_encoder)"
        return (ZeroGrad(r"query_encoder\.self\.key\.bias", KEY_BIAS),
                ZeroGrad(enc + r"\.(attn0|ca)\.self\.key\.bias", KEY_BIAS),
                ZeroGrad(r"video_guided_text_refinement\.cross_attention\.self\.key\.bias", KEY_BIAS),
                ZeroGrad(r"video_pooling\.attn_proj\.bias", POOL_BIAS),
                ZeroGrad(enc + r"\.fixed_layer2_projection\.bias", BRANCH_BIAS),
                ZeroGrad(enc + r"\.layer1\.bias", BRANCH_HIDDEN_BIAS, partial=True),
                ZeroGrad(enc + r"\.ca\.norm2\.bias", BRANCH_OUTPUT_BIAS, partial=True))

    def dropout_off(self, twin):
        twin.frame_tcn.dropout.p = 0.0
        return twin

    def scans(self, record: bool = False):
        return MambaScan(record)

    def family_blocks(self, cfg, twin, taux, T) -> list:
        return mtm_block_specs(cfg, twin, taux, T)

    def loss_negatives_need_twin(self) -> bool:
        return True

    def negatives(self, cfg, scores, batch, key, twin_out=None) -> dict:
        """The torch sampler (:func:`torch_ref.losses.sample_negatives`, MTM's own triplet sampler, seeded from
        ``key``), whose ``-1`` ("no negative") entries JAX reads the same way; and the torch matching."""
        import jax
        import torch

        from torch_ref.losses import sample_negatives as torch_sample_negatives

        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        tnegs = torch_sample_negatives(self.name, {k: torch.from_numpy(as_numpy(v)) for k, v in scores.items()},
                                       [int(x) for x in np.asarray(batch["query_labels"])], hard=False,
                                       hard_pool_size=cfg.loss.hard_pool_size,
                                       generator=torch.Generator().manual_seed(seed))
        return self.assignment({k: as_numpy(v).astype(np.int32) for k, v in tnegs.items()}, batch, twin_out)

    def loss_factor(self, lo) -> list[float]:
        return [lo.w_clip_nce, lo.w_frame_nce, lo.w_qdl, lo.w_ot, lo.w_video_nce]

    def official_config(self, cfg) -> dict:
        """GMMFormer v2's, with MTM ``src/Configs/<ds>.py``'s additions."""
        m, lo, t = cfg.model, cfg.loss, cfg.train
        return dict(super().official_config(cfg), video_scale_w=m.video_scale_w, num_mamba_layers=m.num_mamba_layers,
                    triplet_loss_factor=[lo.w_clip_trip, lo.w_frame_trip, lo.w_video_trip], lambda_recon=lo.w_recon,
                    use_ema=t.use_ema, ema_decay=t.ema_decay)


SPEC = Spec()
