"""The math of BOFT's rotation, in plain torch: Cayley blocks, butterfly permutations, and the
product ``x R`` applied factor by factor without ever forming the ``d × d`` matrix.

    R   = M_{m-1} ⋯ M_1 M_0,        M_i = P_i · blockdiag(B_i1, …, B_iD) · P_iᵀ
    B   = (I + Q)(I − Q)⁻¹,         Q skew-symmetric (b × b), stored as its upper triangle

``P_i`` is the butterfly permutation of factor ``i`` (``P[k, perm[k]] = 1``), the same as HF
PEFT's ``block_butterfly_perm``; ``P_0 = I``. Vectors are rows, as in PEFT (``x_rot = x @ R``),
so ``y @ P = y[..., inv]`` and ``y @ Pᵀ = y[..., perm]``.
"""

from __future__ import annotations

import torch

from ...errors import AdapterConfigError


def block_layout(block_size: int, block_num: int, n_factors: int, d: int, layer: str) -> tuple:
    """``(D, b)``: number of blocks and block size on a layer with input size ``d`` (PEFT's
    rules: ``D · b = d``, and with butterfly factors ``b·2^(m-1)`` divides ``d``)."""
    if block_size:
        if d % block_size:
            raise AdapterConfigError(
                f"boft: layer {layer} has {d} input features, not divisible by block_size "
                f"{block_size}; choose a block size that divides every target's input size"
            )
        block_num = d // block_size
    else:
        if d % block_num:
            raise AdapterConfigError(
                f"boft: layer {layer} has {d} input features, not divisible by block_num "
                f"{block_num}; choose a block count that divides every target's input size"
            )
        block_size = d // block_num
    if block_size < 2:
        raise AdapterConfigError(
            f"boft: layer {layer} would get blocks of size {block_size} ({block_num} blocks for "
            f"{d} input features); use fewer blocks (a 1×1 orthogonal block cannot move)"
        )
    spread = 2 ** (n_factors - 1)
    if n_factors > 1 and (block_num % spread or block_num % 2 or block_size % 2):
        raise AdapterConfigError(
            f"boft: layer {layer}: {block_num} blocks of size {block_size} do not allow "
            f"{n_factors} butterfly factors (need an even block size and a block count divisible "
            f"by 2^(n_butterfly_factor-1) = {spread}); lower n_butterfly_factor or change the blocks"
        )
    return block_num, block_size


def butterfly_permutation(d: int, groups: int, half: int) -> torch.Tensor:
    """PEFT's ``block_butterfly_perm(d, groups, half)``: inside each of ``groups`` equal groups,
    the chunks of ``half`` indices are reordered evens first, then odds."""
    group = d // groups
    chunks = group // half
    order = torch.cat([torch.arange(0, chunks, 2), torch.arange(1, chunks, 2)])  # (chunks,)
    within = (order[:, None] * half + torch.arange(half)).flatten()  # (group,)
    return (torch.arange(groups)[:, None] * group + within).flatten()  # (d,)


def butterfly_permutations(d: int, block_num: int, block_size: int, n_factors: int) -> torch.Tensor:
    """``perm (m, d)`` of every factor; all identities when ``m = 1`` (plain OFT)."""
    if n_factors == 1:
        return torch.arange(d)[None]
    return torch.stack(
        [butterfly_permutation(d, block_num // 2**i, block_size // 2) for i in range(n_factors)]
    )


def triangle_size(block_size: int) -> int:
    return block_size * (block_size - 1) // 2


def skew_from_upper(q: torch.Tensor, block_size: int) -> torch.Tensor:
    """``Q (..., b, b)`` skew-symmetric from its strict upper triangle ``q (..., b(b-1)/2)``
    (row-major order, as ``torch.triu_indices(b, b, 1)``)."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=q.device)
    skew = q.new_zeros(*q.shape[:-1], block_size, block_size)
    skew[..., rows, cols] = q
    return skew - skew.transpose(-1, -2)


def cayley(q: torch.Tensor, block_size: int) -> torch.Tensor:
    """Orthogonal blocks ``(I + Q)(I − Q)⁻¹`` (..., b, b) from upper triangles (..., b(b-1)/2).
    ``q = 0`` gives the identity exactly."""
    skew = skew_from_upper(q, block_size)
    eye = torch.eye(block_size, dtype=q.dtype, device=q.device).expand_as(skew)
    return torch.linalg.solve(eye - skew, eye + skew, left=False)  # X (I − Q) = I + Q


def peft_to_upper(boft_r: torch.Tensor) -> torch.Tensor:
    """PEFT's ``boft_R`` (m, D, b, b) to our upper triangles (m, D, b(b-1)/2). PEFT's blocks are
    ``(I − S)(I + S)⁻¹`` with ``S = (R − Rᵀ)/2``: the same as ours with ``Q = −S``."""
    b = boft_r.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1)
    return 0.5 * (boft_r[..., cols, rows] - boft_r[..., rows, cols])


def upper_to_peft(q: torch.Tensor, block_size: int) -> torch.Tensor:
    """Our upper triangles to a PEFT ``boft_R`` with the same rotation: ``−Q`` (PEFT keeps the
    skew part ``S = (R − Rᵀ)/2 = −Q``)."""
    return -skew_from_upper(q, block_size)


def rotate_rows(
    y: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor:
    """``y @ R`` for row vectors ``y (..., d)``. ``blocks``: ``(m, D, b, b)`` for every row, or
    ``(B, m, D, b, b)`` for ``y (B, ..., d)`` (one rotation per batch row)."""
    per_row = blocks.dim() == 5
    n_factors, n_blocks, b = blocks.shape[-4], blocks.shape[-3], blocks.shape[-1]
    shape = y.shape
    y = y.reshape(shape[0], -1, n_blocks, b) if per_row else y.reshape(-1, n_blocks, b)
    permuted = n_factors > 1
    for i in reversed(range(n_factors)):  # y R = (((y M_{m-1}) M_{m-2}) ⋯) M_0
        if permuted:
            y = y.flatten(-2).index_select(-1, inverse[i]).unflatten(-1, (n_blocks, b))
        if per_row:
            y = torch.einsum("btdi,bdij->btdj", y, blocks[:, i])  # (B, T, D, b)
        else:
            y = torch.einsum("ndi,dij->ndj", y, blocks[i])  # (N, D, b)
        if permuted:
            y = y.flatten(-2).index_select(-1, perms[i]).unflatten(-1, (n_blocks, b))
    return y.reshape(shape)


def dense_rotation(
    blocks: torch.Tensor, perms: torch.Tensor, inverse: torch.Tensor, d: int
) -> torch.Tensor:
    """``R (d, d)`` from one adapter's blocks ``(m, D, b, b)`` (``I @ R``)."""
    eye = torch.eye(d, dtype=blocks.dtype, device=blocks.device)
    return rotate_rows(eye, blocks, perms, inverse)


class BlockDropout(torch.nn.Module):
    """PEFT's multiplicative dropout: in training, replace a fraction ``p`` of the blocks of one
    randomly chosen butterfly factor by the identity (the rotation stays orthogonal)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:  # (m, D, b, b)
        if not self.training or self.p == 0:
            return blocks
        n_factors, n_blocks, b, _ = blocks.shape
        factor = int(torch.randint(0, n_factors, (1,)))
        count = int(self.p * n_blocks)
        chosen = torch.randperm(n_blocks)[:count].to(blocks.device)
        mask = blocks.new_zeros(n_factors, n_blocks, 1, 1)
        mask[factor, chosen] = 1.0
        eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
        return (1 - mask) * blocks + mask * eye
