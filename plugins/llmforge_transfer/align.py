"""Coordinate maps between two base models and the transport of a task vector through them.

For a linear layer y = W x with source coordinates (x_A, g_A) and target coordinates x_B = Q_in x_A,
g_B = Q_out g_A, a source update tau_A becomes tau_B = Q_out tau_A Q_in^T. Each map is the
orthogonal Procrustes solution Q = U V^T of the SVD C = U S V^T of a cross-covariance
C = sum b a^T (semi-orthogonal when the widths differ). Methods:

- bico: Q_in from input activations, Q_out from output gradients;
- activations: Q_in from input activations, Q_out from outputs y = W x;
- naive: identity maps, so the vector is added unchanged (same shapes only).

Structure rules:
- q_proj and k_proj outputs carry rotary embeddings, so their maps keep rotary pairs intact.
  Whole heads are matched one to one by an assignment that maximises the nuclear norm of the head
  blocks of C. Inside a matched head, each rotary pair (i, i + head_dim / 2) gets a 2x2 rotation
  with determinant +1, which commutes with the rotary rotation. k_proj and v_proj have their own
  maps, so grouped-query key/value heads are aligned apart from the query heads.
- Inputs of q/k/v, gate/up and lm_head are gain-free normalized streams (calibration.py divides
  by the RMSNorm gain). A source update is therefore first folded into gain-free form,
  tau~_A = tau_A diag(g_A) + (W_A + tau_A) diag(dg_A) when the vector also changes the gain g_A by
  dg_A, transported, and unfolded with the target gain: tau_B = tau~_B diag(1 / g_B). The target's
  norm gains get no update.
- The embedding rows live in the residual stream: tau_E,B = tau_E,A Q^T, with Q the input map of
  the first decoder layer's attention. lm_head has the identity as output map (the tokenizers
  match); a tied source's head update is its embedding update.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from llmforge.errors import ForgeError

from llmforge_transfer.calibration import LAYER_PATTERN, LM_HEAD, input_key, norm_of

if TYPE_CHECKING:
    import torch

ALIGN_METHODS = ("bico", "activations", "naive")
EMBEDDING = "model.embed_tokens.weight"
ROTARY_OUTPUTS = ("self_attn.q_proj", "self_attn.k_proj")
# Singular values below this fraction of the largest count as zero when the rank is reported.
RANK_TOLERANCE = 1e-9
# --whiten: each auto-covariance gets this fraction of its mean eigenvalue added before it is
# inverted, so that directions with almost no variance are damped rather than amplified.
WHITEN_SHRINKAGE = 1e-3
# --whiten: a whitened singular value below this fraction of the largest leaves its direction
# undetermined. Such directions are mapped as close to the identity as the rest allows.
UNDETERMINED = 1e-6


def procrustes(cross: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Return (Q, singular values) with Q = U V^T from the thin SVD of `cross` [d_B, d_A]."""
    import torch

    u, s, vh = torch.linalg.svd(cross, full_matrices=False)
    return u @ vh, s


def _pair_rotation(block):
    """Return the 2x2 rotation (det +1) closest to a 2x2 cross-covariance block."""
    import torch

    u, _, vh = torch.linalg.svd(block)
    fix = torch.diag(torch.tensor([1.0, float(torch.sign(torch.det(u @ vh)) or 1.0)], dtype=block.dtype))
    return u @ fix @ vh


def rotary_map(cross, head_dim: int):
    """Return a head-matching map with per-rotary-pair rotations inside each matched head, [d_B, d_A]."""
    import torch
    from scipy.optimize import linear_sum_assignment

    heads_b, heads_a = cross.shape[0] // head_dim, cross.shape[1] // head_dim
    blocks = cross.reshape(heads_b, head_dim, heads_a, head_dim).permute(0, 2, 1, 3)
    scores = torch.linalg.matrix_norm(blocks, ord="nuc")
    rows, columns = linear_sum_assignment(scores.numpy(), maximize=True)

    result = torch.zeros_like(cross)
    half = head_dim // 2
    for head_b, head_a in zip(rows.tolist(), columns.tolist()):
        block = blocks[head_b, head_a]
        for i in range(half):
            pair = [i, i + half]
            rotation = _pair_rotation(block[pair][:, pair])
            for r, row in enumerate(pair):
                for c, column in enumerate(pair):
                    result[head_b * head_dim + row, head_a * head_dim + column] = rotation[r, c]
    return result


def _residual(q, cross, norm_source, norm_target) -> float:
    """Relative residual ||X_B - Q X_A||^2 / ||X_B||^2 from the sums, taking ||Q X_A|| = ||X_A||.

    NOTE: ||Q X_A|| = ||X_A|| holds when d_B >= d_A; for a narrower target the value is an upper bound.
    """
    captured = float((q * cross).sum())
    return max(0.0, (float(norm_target) + float(norm_source) - 2.0 * captured) / max(float(norm_target), 1e-300))


def _rank(singular_values) -> int:
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return 0
    return int((singular_values > singular_values[0] * RANK_TOLERANCE).sum())


def _inverse_sqrt(auto):
    """Return (auto + shrinkage)^(-1/2) for a symmetric positive semi-definite sum of outer products."""
    import torch

    eigenvalues, vectors = torch.linalg.eigh(auto)
    eigenvalues = eigenvalues.clamp(min=0.0)
    floor = max(WHITEN_SHRINKAGE * float(eigenvalues.mean()), 1e-300)
    return (vectors * (eigenvalues + floor).rsqrt()) @ vectors.T


def whitened_cross(cross, auto_target, auto_source):
    """Return the cross-covariance of whitened coordinates, S_B^(-1/2) C S_A^(-1/2).

    Plain Procrustes weighs directions by their variance, so in a stream with a few high-variance
    coordinates the low-variance directions may rotate freely. Whitening weighs every direction by
    its correlation instead. An exact re-parameterisation x_B = R x_A still gives exactly R, since the
    whitened matrix is then R times a positive definite matrix.
    """
    return _inverse_sqrt(auto_target) @ cross @ _inverse_sqrt(auto_source)


def procrustes_near_identity(cross) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Return (Q, singular values): U V^T on the directions `cross` determines, nearest the identity on the rest.

    Among all maps that maximise tr(Q^T C), this picks the one closest to the identity, so
    directions the calibration data never reach are left in place instead of rotated at random.
    """
    import torch

    u, s, vh = torch.linalg.svd(cross, full_matrices=True)
    rank = int((s > s[0] * UNDETERMINED).sum()) if s.numel() and float(s[0]) > 0 else 0
    q = u[:, :rank] @ vh[:rank]
    u_rest, v_rest = u[:, rank:], vh[rank:].T
    if u_rest.shape[1] and v_rest.shape[1]:
        identity = torch.eye(*cross.shape, dtype=cross.dtype)
        inner_u, _, inner_vh = torch.linalg.svd(u_rest.T @ identity @ v_rest, full_matrices=False)
        q = q + u_rest @ (inner_u @ inner_vh) @ v_rest.T
    return q, s


def _map_for(statistics, key: str, head_dim: int | None, report: dict, side: str):
    import torch

    cross = statistics[key]
    whiten = key + ".auto_source" in statistics
    if whiten:
        cross = whitened_cross(cross, statistics[key + ".auto_target"], statistics[key + ".auto_source"])
    if head_dim is not None:
        q = rotary_map(cross, head_dim)
        singular_values = torch.linalg.svdvals(cross)
    else:
        q, singular_values = procrustes_near_identity(cross) if whiten else procrustes(cross)
    rank = _rank(singular_values)
    report[f"{side}_residual"] = _residual(q, statistics[key], statistics[key + ".norm_source"],
                                          statistics[key + ".norm_target"])
    report[f"{side}_rank"] = rank
    report[f"{side}_width"] = min(cross.shape)
    return q


def _decoder_layer_groups(names) -> list[list[str]]:
    """Group linear-layer names by decoder layer; a name outside the decoder layers forms its own group."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        match = LAYER_PATTERN.match(name)
        groups.setdefault(match.group(1) if match else name, []).append(name)
    return list(groups.values())


def layer_maps(statistics: dict[str, Any], matched: dict[str, str], *, head_dim: int,
               method: str) -> Iterator[tuple[str, Any, Any, dict]]:
    """Yield (target layer, Q_in, Q_out, report) per matched linear layer, one decoder layer at a time.

    Q_out is None for lm_head, whose output map is the identity. The report contains the matched
    source layer and the residual, rank and width of each map. Only the maps of one decoder layer
    are alive at a time, so a caller that drops each map after use keeps a few d x d matrices, not
    all of them.
    """
    for group in _decoder_layer_groups(matched):
        input_maps: dict[str, tuple[Any, dict]] = {}
        for name in group:
            key = f"in/{input_key(name)}"
            if key not in input_maps:
                input_report: dict = {}
                input_maps[key] = (_map_for(statistics, key, None, input_report, "input"), input_report)
            q_in, input_report = input_maps[key]
            report = {"source": matched[name], **input_report}
            q_out = None
            if name != LM_HEAD:
                match = LAYER_PATTERN.match(name)
                rotary = method == "bico" and match is not None and match.group(2) in ROTARY_OUTPUTS
                q_out = _map_for(statistics, f"out/{name}", head_dim if rotary else None, report, "output")
            yield name, q_in, q_out, report


def rank_warnings(name: str, report: dict, tokens: int) -> list[str]:
    """Return one warning per map of `name` whose cross-covariance has lower rank than its width."""
    warnings = []
    for side in ("input", "output"):
        if f"{side}_rank" in report and report[f"{side}_rank"] < report[f"{side}_width"]:
            warnings.append(f"{name}: the {side} cross-covariance has rank {report[f'{side}_rank']} of "
                            f"{report[f'{side}_width']} ({tokens} calibration tokens), so its map is not "
                            "determined in every direction; raise --calib-tokens")
    return warnings


def _folded_update(vector: dict, source_state: dict, weight_name: str, norm: str | None, tied_head: bool):
    """Return the source update of one linear weight in gain-free form (None when the vector leaves it unchanged)."""
    import torch

    update_name = EMBEDDING if tied_head else weight_name
    weight = source_state[update_name].to(torch.float64)
    update = vector[update_name].to(torch.float64) if update_name in vector else None
    if norm is None:
        return update
    gain = source_state[f"{norm}.weight"].to(torch.float64)
    gain_update = vector.get(f"{norm}.weight")
    if update is None and gain_update is None:
        return None
    update = update if update is not None else torch.zeros_like(weight)
    folded = update * gain.unsqueeze(0)
    if gain_update is not None:
        folded = folded + (weight + update) * gain_update.to(torch.float64).unsqueeze(0)
    return folded


def transport_vector(vector: dict, source_state: dict, target_state: dict, maps, *,
                     source_tied: bool, target_tied: bool) -> tuple[dict[str, Any], list[str]]:
    """Return the target task vector tau_B (float32) and the names of source tensors it does not carry.

    `maps` is an iterable of (target layer, Q_in, Q_out) such as `layer_maps` yields; each map is
    used once and dropped. The structure rules of this module's docstring decide each tensor.
    """
    import torch

    transported, carried = {}, set()
    embedding_map = None
    for name, q_in, q_out in maps:
        if name == "model.layers.0.self_attn.q_proj":
            embedding_map = q_in
        weight_name = f"{name}.weight"
        if name == LM_HEAD and target_tied:
            continue
        norm = norm_of(name)
        tied_head = name == LM_HEAD and source_tied
        folded = _folded_update(vector, source_state, weight_name, norm, tied_head)
        carried.update({EMBEDDING if tied_head else weight_name, f"{norm}.weight" if norm else weight_name})
        if folded is None:
            continue
        update = folded if q_out is None else q_out @ folded
        update = update @ q_in.T
        if norm is not None:
            update = update / target_state[f"{norm}.weight"].to(torch.float64).unsqueeze(0)
        transported[weight_name] = update.to(torch.float32)

    if EMBEDDING in vector and embedding_map is not None:
        transported[EMBEDDING] = (vector[EMBEDDING].to(torch.float64) @ embedding_map.T).to(torch.float32)
        carried.add(EMBEDDING)
    if source_tied:
        carried.add(f"{LM_HEAD}.weight")
    skipped = sorted(name for name in vector if name not in carried)
    return transported, skipped


def check_naive_shapes(vector: dict, target_state: dict) -> None:
    """Raise ForgeError naming the first tensor that the target lacks or has in another shape."""
    for name, update in sorted(vector.items()):
        if name not in target_state:
            raise ForgeError(f"--align naive adds the vector unchanged, but the target has no tensor {name}; "
                             "use --align bico")
        if tuple(target_state[name].shape) != tuple(update.shape):
            raise ForgeError(f"--align naive adds the vector unchanged, but {name} has shape "
                             f"{tuple(update.shape)} in the vector and {tuple(target_state[name].shape)} in the "
                             "target; use --align bico")
