"""The official text-video retrieval evaluation, transcribed: BackBone_tvr ``backbone_tvr/tvr/utils/metrics.py``
(``compute_metrics`` L10-26; CLIP4Clip's ``tensor_text_to_video_metrics`` and ``tensor_video_to_text_sim``
L41-78) and ``main_retrieval.py``'s multi-sentence branch of ``eval_epoch`` (which the official run never reaches;
CLIP4Clip's ``main_task_retrieval.py`` L321-445 is the working original). The references of
``jaxprvr.metrics.t2v``'s tests, ``parity.check --model clip_wti`` and ``benchmarks.t2v``."""

from __future__ import annotations

import numpy as np
import torch


def official_compute_metrics(x):
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)
    d = d[:, np.newaxis]
    ind = sx - d
    ind = np.where(ind == 0)
    ind = ind[1]
    metrics = {}
    metrics['R1'] = float(np.sum(ind == 0)) * 100 / len(ind)
    metrics['R5'] = float(np.sum(ind < 5)) * 100 / len(ind)
    metrics['R10'] = float(np.sum(ind < 10)) * 100 / len(ind)
    metrics['R50'] = float(np.sum(ind < 50)) * 100 / len(ind)
    metrics['MR'] = np.median(ind) + 1
    metrics["MedianR"] = metrics['MR']
    metrics["MeanR"] = np.mean(ind) + 1
    metrics["cols"] = [int(i) for i in list(ind)]
    return metrics


def official_tensor_text_to_video_metrics(sim_tensor, top_k=[1, 5, 10, 50], stable=False):
    """``stable=True``: the same with ``torch.argsort(..., stable=True)`` (the tie rule ported)."""
    if not torch.is_tensor(sim_tensor):
        sim_tensor = torch.tensor(sim_tensor)
    stacked_sim_matrices = sim_tensor.permute(1, 0, 2)
    first_argsort = torch.argsort(stacked_sim_matrices, dim=-1, descending=True, stable=stable)
    second_argsort = torch.argsort(first_argsort, dim=-1, descending=False)
    ranks = torch.flatten(torch.diagonal(second_argsort, dim1=1, dim2=2))
    permuted_original_data = torch.flatten(torch.diagonal(sim_tensor, dim1=0, dim2=2))
    mask = ~ torch.logical_or(torch.isinf(permuted_original_data), torch.isnan(permuted_original_data))
    valid_ranks = ranks[mask]
    if not torch.is_tensor(valid_ranks):
        valid_ranks = torch.tensor(valid_ranks)
    results = {f"R{k}": float(torch.sum(valid_ranks < k) * 100 / len(valid_ranks)) for k in top_k}
    results["MedianR"] = float(torch.median(valid_ranks + 1))
    results["MeanR"] = float(np.mean(valid_ranks.numpy() + 1))
    results["Std_Rank"] = float(np.std(valid_ranks.numpy() + 1))
    results['MR'] = results["MedianR"]
    results["valid_ranks"] = valid_ranks.numpy()
    return results


def official_tensor_video_to_text_sim(sim_tensor):
    if not torch.is_tensor(sim_tensor):
        sim_tensor = torch.tensor(sim_tensor)
    sim_tensor[sim_tensor != sim_tensor] = float('-inf')
    values, _ = torch.max(sim_tensor, dim=1, keepdim=True)
    return torch.squeeze(values).T


def official_multi_sentence(sim_matrix, cut_off_points_):
    """``eval_epoch``'s multi-sentence branch; ``cut_off_points_`` = the dataset's cut_off_points minus 1."""
    cut_off_points2len_ = [itm + 1 for itm in cut_off_points_]
    max_length = max([e_ - s_ for s_, e_ in zip([0] + cut_off_points2len_[:-1], cut_off_points2len_)])
    sim_matrix_new = []
    for s_, e_ in zip([0] + cut_off_points2len_[:-1], cut_off_points2len_):
        sim_matrix_new.append(np.concatenate((sim_matrix[s_:e_],
                                              np.full((max_length - e_ + s_, sim_matrix.shape[1]), -np.inf)),
                                             axis=0))
    sim_matrix = np.stack(tuple(sim_matrix_new), axis=0)
    tv_metrics = official_tensor_text_to_video_metrics(sim_matrix)
    vt_metrics = official_compute_metrics(official_tensor_video_to_text_sim(sim_matrix))
    return tv_metrics, vt_metrics, sim_matrix
