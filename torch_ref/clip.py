"""The PyTorch twin of CLIP as BackBone_tvr runs it (``backbone_tvr/tvr/models/module_clip.py``, the ViT parts).

Official structure and key names (OpenAI's 302 parameters of ViT-B/32): ``visual.{conv1, class_embedding,
positional_embedding, ln_pre, transformer.resblocks.i, ln_post, proj}``, ``token_embedding``, ``positional_embedding``,
``transformer.resblocks.i``, ``ln_final``, ``text_projection``, ``logit_scale``. Behaviour transcribed:

- ``LayerNorm`` computes in float32 and casts back (L218-224); ``QuickGELU`` ``x * sigmoid(1.702 x)``;
- ``ResidualAttentionBlock`` (L231-262): ``nn.MultiheadAttention`` (sequence-first, ``need_weights=False``), an
  ``attn_mask`` that may be a callable of the length (the text tower's lazily built causal mask);
- ``VisualTransformer.forward`` returns every token before ``ln_post`` (L290-311); ``encode_image`` applies
  ``ln_post`` and ``@ proj`` to all of them and returns token 0 (and the tokens with ``return_hidden``);
- ``encode_text`` projects every token after ``ln_final`` and gathers at ``argmax(ids)`` (L447-465);
- ``build_model`` sizes from a state dict (openai ``clip/model.py`` ``build_model``; ``modeling.py`` L48-60);
  ``convert_weights`` (fp16 Conv/Linear/MHA/projections, L484-505) for the GPU behaviour.

``CLIP.encode_text_hidden`` additionally returns the pre-projection ``ln_final`` output (what MESM's frozen text
encoder feeds on). Only ViT CLIPs (the ResNet tower is not used by any model here).
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm in float32, cast back to the input dtype (fp16 weights run their LN in fp32)."""

    def forward(self, x: torch.Tensor):
        orig = x.dtype
        if orig == torch.float64:
            return super().forward(x)
        return super().forward(x.type(torch.float32)).type(orig)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def attention(self, x: torch.Tensor):
        mask = self.attn_mask
        if mask is not None and callable(mask):
            mask = mask(x.size(0))  # LND: the current length
        mask = mask.to(dtype=x.dtype, device=x.device) if mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def initialize_text_parameters(m) -> None:
    """OpenAI's ``initialize_parameters`` for the text side of ``m`` (``token_embedding``, ``positional_embedding``,
    ``transformer``, ``text_projection``): the text tower of :class:`CLIP` and MESM's frozen text encoder."""
    nn.init.normal_(m.token_embedding.weight, std=0.02)
    nn.init.normal_(m.positional_embedding, std=0.01)
    w, n = m.transformer.width, m.transformer.layers
    proj_std, attn_std, fc_std = (w ** -0.5) * ((2 * n) ** -0.5), w ** -0.5, (2 * w) ** -0.5
    for block in m.transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(m.text_projection, std=w ** -0.5)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask=None):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisualTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1,
                                                                     width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                              device=x.device)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return x


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int, vision_width: int,
                 vision_patch_size: int, context_length: int, vocab_size: int, transformer_width: int,
                 transformer_heads: int, transformer_layers: int, vision_heads: int | None = None):
        super().__init__()
        self.context_length = context_length
        self.visual = VisualTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        vision_heads or vision_width // 64, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       attn_mask=self.build_attention_mask)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.initialize_parameters()

    def initialize_parameters(self):
        initialize_text_parameters(self)

    def build_attention_mask(self, context_length):
        mask = torch.zeros(context_length, context_length)
        mask.fill_(float("-inf"))
        mask.triu_(1)
        return mask

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, image, return_hidden=False):
        hidden = self.visual(image.type(self.dtype))
        hidden = self.visual.ln_post(hidden) @ self.visual.proj
        x = hidden[:, 0, :]
        return (x, hidden) if return_hidden else x

    def _text_trunk(self, text):
        x = self.token_embedding(text).type(self.dtype)
        x = x + self.positional_embedding[:x.size(1), :].type(self.dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_final(x).type(self.dtype)

    def encode_text(self, text, return_hidden=False):
        hidden = self._text_trunk(text) @ self.text_projection
        x = hidden[torch.arange(hidden.shape[0]), text.argmax(dim=-1)]
        return (x, hidden) if return_hidden else x

    def encode_text_hidden(self, text):
        """``(eot embedding, ln_final output before the projection, projected tokens)``."""
        pre = self._text_trunk(text)
        tokens = pre @ self.text_projection
        return tokens[torch.arange(tokens.shape[0]), text.argmax(dim=-1)], pre, tokens

    def forward(self, image, text):
        i = self.encode_image(image)
        t = self.encode_text(text)
        i = i / i.norm(dim=-1, keepdim=True)
        t = t / t.norm(dim=-1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * i @ t.t()
        return logits_per_image, logits_per_image.t()


def dims_of(state_dict, prefix: str = "") -> dict:
    """``build_model``'s sizes of an OpenAI-format state dict (``prefix`` ``"clip."`` for BackBone_tvr)."""
    sd = state_dict
    vision_width = sd[prefix + "visual.conv1.weight"].shape[0]
    vision_layers = len({k.split(".")[3] for k in sd if k.startswith(prefix + "visual.transformer.resblocks.")
                         and k.endswith(".attn.in_proj_weight")})
    patch = sd[prefix + "visual.conv1.weight"].shape[-1]
    grid = round((sd[prefix + "visual.positional_embedding"].shape[0] - 1) ** 0.5)
    width = sd[prefix + "ln_final.weight"].shape[0]
    rx = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    return dict(embed_dim=sd[prefix + "text_projection"].shape[1], image_resolution=patch * grid,
                vision_layers=vision_layers, vision_width=vision_width, vision_patch_size=patch,
                context_length=sd[prefix + "positional_embedding"].shape[0],
                vocab_size=sd[prefix + "token_embedding.weight"].shape[0], transformer_width=width,
                transformer_heads=width // 64, transformer_layers=len({m.group(1) for k in sd if (m := rx.match(k))}))


def build_model(state_dict, **overrides) -> CLIP:
    """openai ``build_model`` without ``convert_weights`` (the CPU path): sizes from the weights, the three
    non-parameter scalars dropped, a strict load; float32."""
    sd = {k: v for k, v in state_dict.items() if k not in NON_PARAMETER_KEYS}
    model = CLIP(**{**dims_of(sd), **overrides})
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


def convert_weights(model: nn.Module):
    """``convert_weights`` (module_clip.py L484-505): Conv/Linear weights and biases, the MHA projection tensors,
    ``text_projection`` and ``proj`` to fp16; LayerNorms, embeddings, ``logit_scale`` stay float32."""

    def half(layer):
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            layer.weight.data = layer.weight.data.half()
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.half()
        if isinstance(layer, nn.MultiheadAttention):
            for attr in [*[f"{s}_proj_weight" for s in ["in", "q", "k", "v"]], "in_proj_bias", "bias_k", "bias_v"]:
                t = getattr(layer, attr)
                if t is not None:
                    t.data = t.data.half()
        for name in ["text_projection", "proj"]:
            if hasattr(layer, name):
                t = getattr(layer, name)
                if t is not None:
                    t.data = t.data.half()

    model.apply(half)


def tiny_clip(seed: int = 0, **kw) -> CLIP:
    """A small random CLIP for tests (widths 64/128: one / two heads by OpenAI's width // 64 rule)."""
    torch.manual_seed(seed)
    args = dict(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=128, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
    args.update(kw)
    return CLIP(**args).eval()
