"""MTM: the twin has the official state_dict (1,101 keys with the 462 ``attns`` aliases, 708.7 M parameters at
TVR dims: docs/parity.md, "Parameter counts of the official models"); the key table converts it both ways bit-exactly (aliases checked equal); the Flax model
computes the twin's scores and every aux stage from the converted weights (the twin runs the official Mamba)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from jaxprvr.config import model_config
from jaxprvr.models.mtm import MTM
from parity import convert
from tests.test_torch_ref import make_batch
from torch_ref.mtm import MTM as TorchMTM


def test_official_key_layout_and_parameter_count():
    with torch.device("meta"):
        twin = TorchMTM(model_config("mtm", hidden_size=384, n_heads=4, q_feat_size=768, visual_feat_dim=3072))
    sd = twin.state_dict()
    assert [e.torch for e in convert.table("mtm")] == list(sd)
    assert len(sd) == 1101 and sum(".attns." in k for k in sd) == 462
    assert sum(p.numel() for p in twin.parameters()) == 708_665_762  # 708.7 M, measured on the official model


TINY = model_config("mtm", hidden_size=32, n_heads=2, q_feat_size=12, visual_feat_dim=16, num_mamba_layers=2)


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    twin = TorchMTM(TINY).eval()
    return twin, jax.tree.map(np.asarray, convert.torch_to_flax("mtm", twin.state_dict()))


def test_round_trip_and_alias_check(converted):
    twin, params = converted
    sd = twin.state_dict()
    back = convert.flax_to_torch("mtm", params)
    assert list(back) == list(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    bad = dict(sd)
    bad["clip_encoder.attns.3.norm1.bias"] = bad["clip_encoder.attns.3.norm1.bias"] + 1
    with pytest.raises(convert.ConversionError, match="attns.3.norm1.bias"):
        convert.torch_to_flax("mtm", bad)


def test_forward_matches_twin(converted):
    twin, params = converted
    batch = make_batch(TINY, lens=(50, 20, 7), labels=(0, 0, 1, 2, 2))
    scores, aux = MTM(TINY).apply({"params": params}, batch, train=False)
    with torch.no_grad():
        tscores, taux = twin(batch, train=False)
    assert set(scores) == set(tscores) and set(aux) == set(taux)
    for k in scores:
        np.testing.assert_allclose(np.asarray(scores[k]), tscores[k].numpy(), rtol=1e-4, atol=1e-4, err_msg=k)
    for k in aux:
        np.testing.assert_allclose(np.asarray(aux[k]), taux[k].numpy(), rtol=1e-4, atol=1e-4, err_msg=k)


def test_score_ignores_invalid_gallery_videos(converted):
    """The refiner of MTM's video branch attends over the whole gallery: padded videos marked invalid
    (``video_valid`` 0, as the sharded evaluator pads the gallery to a multiple of the devices) change no score
    of the real videos, whatever their features; brute force against the unpadded gallery."""
    from jaxprvr.models import build_model
    from parity.check import make_batch

    _, params = converted
    cfg = TINY
    model = build_model(cfg)
    batch = make_batch(cfg, n_videos=4, seed=3)
    video = model.apply({"params": params}, batch["clip_feats"], batch["frame_feats"], batch["frame_mask"],
                        batch["frame_len"], train=False, method=model.encode_video)
    query = model.apply({"params": params}, batch["query_feats"], batch["query_mask"], train=False,
                        method=model.encode_query)
    plain = model.apply({"params": params}, query, video, method=model.score)
    rng = np.random.default_rng(0)
    padded = {k: np.concatenate([np.asarray(v), 5 * rng.standard_normal((3,) + v.shape[1:]).astype(np.float32)])
              for k, v in video.items()}
    padded["video_valid"] = np.array([1, 1, 1, 1, 0, 0, 0], np.float32)
    out = model.apply({"params": params}, query, padded, method=model.score)
    for k in plain:
        np.testing.assert_allclose(np.asarray(out[k])[:, :4], np.asarray(plain[k]), rtol=1e-5, atol=1e-6)
    unmasked = dict(padded, video_valid=np.ones(7, np.float32))  # the mask matters: without it scores change
    assert np.abs(np.asarray(model.apply({"params": params}, query, unmasked, method=model.score)["video"])[:, :4]
                  - np.asarray(plain["video"])).max() > 1e-4
