"""Entropy terms of group-wise lookup-free quantization (WeTok paper Sec. 3.1, Eqs. 6-8), computed exactly.

Notation: latents ``u`` are (N, d) (one row per position) with d = g * d'; group k owns channels
[k*d', (k+1)*d'). The soft assignment of group k is q_k(c | u_k) = softmax_c(2<u_k, c>/tau) over
c in {-1, +1}^{d'}. Because 2<u_k, c>/tau is a sum over channels, q_k is a product of independent bits with

    p(bit j = +1) = sigmoid(4 u_{k, j} / tau),

and code index c has bit j = +1 iff (c >> j) & 1 (channel j of the group is the least significant bit, as in
:mod:`wetok.quantizer`). Every term below uses that factorisation:

* **token** entropy, mean over positions of sum_k H(q_k) (paper Eq. 6) = sum of per-bit Bernoulli entropies,
  O(N*d). ``token_reduction="mean"`` divides by g, which is what the official code optimises.
* **grouped** codebook entropy, sum_k H(mean_n q_k) (paper Eq. 8, our default).
* **pooled** codebook entropy, H(mean over n and k of q_k): one 2^{d'} distribution shared by all groups
  (what the official code computes; use it to fine-tune released models the way they were trained).
* **joint** codebook entropy, H(mean_n prod_k q_k) over all 2^d codes (exact LFQ). The joint code index is
  sum_c bit_c * 2^c over all d channels, i.e. sum_k index_k * 2^(k*d').

No N x 2^{d'} tensor is ever built. A group's bits are split into a low half A and a high half B; P_A (N x 2^|A|)
holds the products of A's per-bit probabilities (built bit by bit with outer products), likewise P_B, and the
batch-mean distribution is (1/N) P_B^T P_A, flattened so that code a + 2^|A| * b sits at index a + 2^|A| * b.
That is one matrix product with memory O(N * 2^(d'/2) + 2^d').

Entropies are in nats. The entropy of a distribution uses p * log(max(p, tiny)) with tiny =
``torch.finfo(dtype).tiny``: identical to the xlogy convention 0 log 0 = 0 for every p (no +eps bias, so float64
results match a brute force exactly), while the gradient at p = 0 stays finite (log(tiny) * dp/du with dp/du = 0)
instead of inf * 0 = NaN when float32 probabilities underflow at tau = 0.01.

No subnormal number reaches any operation, forward or backward: float32 GEMMs over subnormals run tens of
times slower on some CPUs, and ``torch.set_flush_denormal`` only covers the calling thread. P_A and P_B are built
as exp of summed log-sigmoids, with every product below F = 2^(minexp/3) (:func:`flush_floor`, 2^-42 in float32)
set to exact zero; the backward of the code sums is written out (:class:`_CodeSums`) with its factors flushed the
same way; bit entropies are exactly zero beyond |logit| = log(1/sqrt(tiny)). What is dropped is below float32
round-off of every entropy and gradient (float64 keeps F = 2^-341).

Everything is computed in float32 at least, with autocast disabled; float64 input stays float64.
Under ``torch.distributed`` the batch-mean distributions are averaged over all processes, weighted by each
process's number of positions, before any entropy is taken (see :func:`batch_distributions`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ._distributed import is_distributed

__all__ = [
    "AUTO_JOINT_BITS",
    "CODEBOOK_FORMS",
    "batch_distributions",
    "bit_entropy",
    "commitment",
    "entropy_loss",
    "entropy_of",
    "entropy_terms",
    "flatten_positions",
    "flush_floor",
    "token_entropy",
]

CODEBOOK_FORMS = ("grouped", "pooled", "joint")
# entropy_terms(joint=None) adds the joint term up to this many channels (2^16 codes: cheap at any batch size).
AUTO_JOINT_BITS = 16


def flatten_positions(latents: Tensor) -> Tensor:
    """(N, d) latents pass through; (B, d, h, w) become (B*h*w, d) with positions in row-major (b, h, w) order."""
    if latents.dim() == 2:
        return latents
    if latents.dim() == 4:
        return latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    raise ValueError(f"expected latents of shape (N, d) or (B, d, h, w), got {tuple(latents.shape)}")


@contextmanager
def _full_precision(latents: Tensor) -> Iterator[Tensor]:
    """Disable autocast and yield the latents upcast to float32 (float64 stays float64)."""
    with torch.autocast(device_type=latents.device.type, enabled=False):
        yield latents if latents.dtype == torch.float64 else latents.float()


def _check(latents: Tensor, groups: int, temperature: float) -> tuple[int, int]:
    if not latents.is_floating_point():
        raise TypeError(f"latents must be a floating-point tensor, got {latents.dtype}")
    d = latents.shape[-1]
    if groups < 1 or d % groups:
        raise ValueError(f"{d} channels cannot be split into {groups} groups")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return d, d // groups


def bit_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), element-wise, finite and NaN-free at any saturation.

    H = softplus(-|x|) + |x| * sigmoid(-|x|) (the symmetric form of p * softplus(-x) + (1 - p) * softplus(x), no
    cancellation). Beyond |x| = log(1/sqrt(tiny)) (43.7 in float32, where H < 5e-18) it is exactly zero, so
    neither the value nor its gradient ever holds a subnormal number.
    """
    bound = _logit_bound(logits.dtype)
    a = logits.abs().clamp_max(bound)
    return torch.where(logits.abs() >= bound, 0.0, F.softplus(-a) + a * torch.sigmoid(-a))


def token_entropy(
    latents: Tensor, groups: int, temperature: float = 0.01, *, token_reduction: str = "sum"
) -> Tensor:
    """Mean over positions of sum_k H(q_k(. | u_k)) (``"sum"``, paper Eq. 6) or of its mean over groups
    (``"mean"``, the official code's per-sample entropy), in O(N*d) through the per-bit factorisation."""
    if token_reduction not in ("sum", "mean"):
        raise ValueError(f"token_reduction must be 'sum' or 'mean', got {token_reduction!r}")
    latents = flatten_positions(latents)
    _check(latents, groups, temperature)
    with _full_precision(latents) as u:
        per_position = bit_entropy(u * (4.0 / temperature)).sum(-1)
        token = per_position.mean()
        return token / groups if token_reduction == "mean" else token


def flush_floor(dtype: torch.dtype) -> float:
    """F = 2^(minexp/3) (2^-42 for float32, 2^-341 for float64): the smallest magnitude a probability-like factor
    keeps in :func:`batch_distributions` and its backward. Two factors >= F multiply to >= F^2, sums of such
    products stay on a grid far above the subnormal range, so no GEMM, product or reduction meets a subnormal."""
    min_exponent = math.frexp(torch.finfo(dtype).tiny)[1] - 1  # tiny = 2^min_exponent
    return 2.0 ** (min_exponent // 3)


def _logit_bound(dtype: torch.dtype) -> float:
    """Logits are clamped to +-log(1/sqrt(tiny)) (43.7 for float32): sigmoid(-|x|) >= sqrt(tiny) stays normal. A bit
    that far out has an unlikely side below F, flushed anyway, so clamping changes no result."""
    return -0.5 * math.log(torch.finfo(dtype).tiny)


def _flush(x: Tensor, floor: float) -> Tensor:
    """x with |x| <= floor set to exact zero, in one pass (x itself holds no subnormal: the caller ensures it)."""
    return F.hardshrink(x, floor)


def _log_products(log_probs: Tensor) -> Tensor:
    """log_probs (..., n_bits, 2) [log P(bit=-1), log P(bit=+1)] -> (..., 2^n_bits) log-products over bits, bit 0
    least significant. Built one bit at a time: appending bit j maps index a to a + 2^j * bit_j. Every term is
    <= 0, so the sums never cancel towards zero."""
    out = log_probs.new_zeros(*log_probs.shape[:-2], 1)
    for j in range(log_probs.shape[-2]):
        out = (log_probs[..., j, :].unsqueeze(-1) + out.unsqueeze(-2)).flatten(-2)
    return out


def _products(log_probs: Tensor, floor: float) -> Tensor:
    """exp of :func:`_log_products`, exactly zero where the product is below ``floor`` (never subnormal)."""
    logs = _log_products(log_probs)
    return logs.masked_fill_(logs < math.log(floor), -math.inf).exp_()


def _bit_masks(n_bits: int, like: Tensor) -> Tensor:
    """(2^n_bits, 2 n_bits) 0/1 matrix: column j selects the codes with bit j = +1, column n_bits + j those with -1."""
    ones = (torch.arange(2**n_bits, device=like.device)[:, None] >> torch.arange(n_bits, device=like.device)) & 1
    return torch.cat([ones, 1 - ones], dim=1).to(like.dtype)


class _CodeSums(torch.autograd.Function):
    """logits (G, N, m) of the per-bit probabilities -> (G, 2^|B|, 2^|A|) position sums of each group's code
    distribution, with a backward written out so that its intermediates are flushed like the forward's.

    Forward: P_A, P_B (N x 2^|A|, N x 2^|B|, probabilities below F set to zero) from log-sigmoids summed bit by
    bit, then sums = P_B^T P_A. Backward, with Gs = dL/dsums scaled by its largest magnitude (so that everything
    is <= 1 and flushed at F): dL/dP_A = P_B Gs, W = dL/dP_A * P_A, and since
    dP(c)/dx_j = P(c) * (sigmoid(-x_j) if bit j of c is +1 else -sigmoid(x_j)),
    dL/dx_j = sigmoid(-x_j) * sum_{c: bit j = +1} W_c - sigmoid(x_j) * sum_{c: bit j = -1} W_c (one GEMM with
    :func:`_bit_masks`). Hand-written because autograd's backward of the products multiplies three small factors
    and produces the subnormals this module avoids.
    """

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:  # type: ignore[override]
        floor = flush_floor(logits.dtype)
        bound = _logit_bound(logits.dtype)
        x = logits.clamp(-bound, bound)
        log_probs = torch.stack([F.logsigmoid(-x), F.logsigmoid(x)], dim=-1)  # (G, N, m, 2)
        low = (x.shape[-1] + 1) // 2
        p_a = _products(log_probs[..., :low, :], floor)  # (G, N, 2^|A|)
        p_b = _products(log_probs[..., low:, :], floor)  # (G, N, 2^|B|)
        ctx.save_for_backward(x, p_a, p_b)
        return torch.bmm(p_b.transpose(1, 2), p_a)  # row b, column a; products >= F^2, no subnormal

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        x, p_a, p_b = ctx.saved_tensors
        floor = flush_floor(x.dtype)
        tiny = torch.finfo(x.dtype).tiny
        # scale the incoming gradient to |.| <= 1 and drop what lies F below its largest entry
        low, high = torch.aminmax(grad)  # one pass, no |grad| temporary
        scale = max(-low.item(), high.item(), tiny / floor)
        grad = _flush(grad, scale * floor) * (1.0 / scale)
        low = p_a.shape[-1].bit_length() - 1
        parts = []
        for probs, other, g, n_bits in ((p_a, p_b, grad, low), (p_b, p_a, grad.transpose(1, 2), x.shape[-1] - low)):
            d_probs = _flush(torch.bmm(other, g), floor)  # dL/dP, |.| <= 1 since each row of `other` sums to <= 1
            sums = _flush((d_probs * probs) @ _bit_masks(n_bits, x), floor)  # (G, N, 2 n_bits)
            parts.append((sums[..., :n_bits], sums[..., n_bits:]))
        (plus_a, minus_a), (plus_b, minus_b) = parts
        plus, minus = torch.cat([plus_a, plus_b], -1), torch.cat([minus_a, minus_b], -1)
        d_x = _flush(
            _flush(torch.sigmoid(-x), floor) * plus - _flush(torch.sigmoid(x), floor) * minus, floor
        )
        return d_x * scale


def _code_sums(logits: Tensor) -> Tensor:
    """logits (G, N, m) of p(bit = +1) -> (G, 2^m): sum over the N positions of each group's code distribution.

    Uses sum_n q(a + 2^|A| b) = (P_B^T P_A)[b, a] with A the low ceil(m/2) bits; memory O(N 2^ceil(m/2)).
    """
    return _CodeSums.apply(logits).flatten(1)


def _is_distributed(distributed: bool | None) -> bool:
    if distributed is None:
        return is_distributed()
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True but torch.distributed is not initialised")
    return distributed


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes with the gradient summed over processes too.

    Hand-written because torch.distributed.nn.functional.all_reduce (same semantics) is deprecated as of
    torch 2.x and its suggested replacement lives in a private module.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group: object) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: Tensor, group: object = None) -> Tensor:
    """Sum ``tensor`` over the processes of ``group``; the gradient is summed over processes as well."""
    return _AllReduceSum.apply(tensor, group)


def batch_distributions(
    latents: Tensor,
    groups: int,
    temperature: float = 0.01,
    forms: Iterable[str] = ("grouped",),
    *,
    max_joint_bits: int = 24,
    distributed: bool | None = None,
    process_group: object = None,
) -> dict[str, Tensor]:
    """Batch-mean code distributions, the inputs of the codebook entropies.

    Args:
        latents: (N, d) or (B, d, h, w).
        groups: g, with d % g == 0.
        temperature: tau of softmax(2<u, c>/tau).
        forms: any of ``"grouped"`` -> (g, 2^d') (row k = mean_n q_k), ``"pooled"`` -> (2^d',) (mean of the
            rows), ``"joint"`` -> (2^d,) (mean_n prod_k q_k; refused when d > ``max_joint_bits``).
        distributed: average over all processes of ``process_group`` (``None``: whenever torch.distributed is
            initialised with more than one process). Each process contributes its position sums and its
            position count, so the result equals the single-process one on the concatenated batch. Gradients
            follow the all-reduce-sum convention: each process's backward gives world_size times its share of
            the gradient, so DDP's gradient averaging yields exactly the single-process gradient. Every
            process must call this with the same ``forms``.

    Returns:
        dict mapping each requested form to its probability tensor (float32, or float64 for float64 input).
    """
    forms = tuple(dict.fromkeys(forms))
    unknown = [f for f in forms if f not in CODEBOOK_FORMS]
    if unknown:
        raise ValueError(f"unknown codebook form(s) {unknown}; choose from {CODEBOOK_FORMS}")
    latents = flatten_positions(latents)
    d, bits_per_group = _check(latents, groups, temperature)
    if "joint" in forms and d > max_joint_bits:
        raise ValueError(
            f"the joint codebook entropy over 2^{d} codes is refused above max_joint_bits={max_joint_bits}"
        )
    with _full_precision(latents) as u:
        x = u * (4.0 / temperature)  # (N, d) logits of p(bit = +1)
        sums: dict[str, Tensor] = {}
        if "grouped" in forms or "pooled" in forms:
            per_group = x.reshape(-1, groups, bits_per_group).transpose(0, 1)  # (g, N, d')
            group_sums = _code_sums(per_group)  # (g, 2^d')
            if "grouped" in forms:
                sums["grouped"] = group_sums
            if "pooled" in forms:
                sums["pooled"] = group_sums.mean(0)
        if "joint" in forms:
            sums["joint"] = _code_sums(x.unsqueeze(0))[0]  # (2^d,)
        count = torch.tensor(float(u.shape[0]), dtype=u.dtype, device=u.device)
        if _is_distributed(distributed):
            names = list(sums)
            packed = torch.cat([sums[n].reshape(-1) for n in names] + [count.reshape(1)])
            packed = all_reduce_sum(packed, process_group)
            count = packed[-1].detach()
            pieces = packed[:-1].split([sums[n].numel() for n in names])
            sums = {n: p.view_as(sums[n]) for n, p in zip(names, pieces, strict=True)}
        return {f: sums[f] / count for f in forms}


def entropy_of(probs: Tensor) -> Tensor:
    """Entropy (nats) along the last axis, with 0 log 0 = 0 and a finite gradient at p = 0 (see module doc)."""
    tiny = torch.finfo(probs.dtype).tiny
    return -(probs * probs.clamp_min(tiny).log()).sum(-1)


def _codebook_entropy(form: str, probs: Tensor) -> Tensor:
    # grouped: sum of the g per-group entropies (Eq. 8); pooled and joint are single distributions.
    return entropy_of(probs).sum() if form == "grouped" else entropy_of(probs)


def entropy_terms(
    latents: Tensor,
    groups: int,
    temperature: float = 0.01,
    *,
    joint: bool | None = None,
    token_reduction: str = "sum",
    max_joint_bits: int = 24,
    distributed: bool | None = None,
    process_group: object = None,
) -> dict[str, Tensor]:
    """All entropy terms as scalars (nats): ``token``, ``grouped``, ``pooled`` and, if asked, ``joint``.

    ``joint=None`` includes the joint term when d <= :data:`AUTO_JOINT_BITS`; ``True`` always (error above
    ``max_joint_bits``); ``False`` never. ``token_reduction`` and ``distributed`` as in :func:`entropy_loss`.
    """
    d = flatten_positions(latents).shape[-1]
    want_joint = d <= AUTO_JOINT_BITS if joint is None else joint
    forms = ("grouped", "pooled", "joint") if want_joint else ("grouped", "pooled")
    probs = batch_distributions(
        latents, groups, temperature, forms,
        max_joint_bits=max_joint_bits, distributed=distributed, process_group=process_group,
    )
    terms = {"token": token_entropy(latents, groups, temperature, token_reduction=token_reduction)}
    terms.update({form: _codebook_entropy(form, p) for form, p in probs.items()})
    return terms


def entropy_loss(
    latents: Tensor,
    groups: int,
    *,
    temperature: float = 0.01,
    token_weight: float = 1.0,
    codebook_weight: float = 1.0,
    codebook_form: str = "grouped",
    token_reduction: str = "sum",
    max_joint_bits: int = 24,
    distributed: bool | None = None,
    process_group: object = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Entropy loss token_weight * token - codebook_weight * codebook (minimise token, maximise codebook).

    ``codebook_form``: ``"grouped"`` (paper Eq. 8), ``"pooled"`` (official code) or ``"joint"`` (exact LFQ).
    ``token_reduction``: ``"sum"`` over groups (paper Eq. 6) or ``"mean"`` (official code; with ``"pooled"``
    this reproduces the official loss up to its +1e-5 inside the log). ``distributed``: see
    :func:`batch_distributions`; the token term is always local.

    Returns:
        (loss, terms) with terms ``token``, ``codebook``, the same value under the form's name, and the
        batch-mean distribution under ``probs_<form>`` (all still attached to the graph).
    """
    if codebook_form not in CODEBOOK_FORMS:
        raise ValueError(f"codebook_form must be one of {CODEBOOK_FORMS}, got {codebook_form!r}")
    probs = batch_distributions(
        latents, groups, temperature, (codebook_form,),
        max_joint_bits=max_joint_bits, distributed=distributed, process_group=process_group,
    )[codebook_form]
    token = token_entropy(latents, groups, temperature, token_reduction=token_reduction)
    codebook = _codebook_entropy(codebook_form, probs)
    loss = token_weight * token - codebook_weight * codebook
    terms = {"token": token, "codebook": codebook, codebook_form: codebook, f"probs_{codebook_form}": probs}
    return loss, terms


def commitment(latents: Tensor) -> Tensor:
    """mean((u - sign(u))^2) with sign(0) = -1 and the sign detached (official convention), in float32+."""
    with _full_precision(latents) as u:
        target = torch.where(u > 0, 1.0, -1.0).to(u.dtype).detach()
        return (u - target).pow(2).mean()
