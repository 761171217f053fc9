"""Matrix product operator (MPO, a.k.a. tensor-train matrix) decomposition of weight matrices.

A matrix W of shape (I, J) with I = i_1*...*i_m and J = j_1*...*j_m is written as the contraction of m local
tensors T_k of shape (r_{k-1}, i_k, j_k, r_k), r_0 = r_m = 1 (paper section 2.2, eq. 3;
docs/method.md, 'MPO decomposition'):

    W[(i_1..i_m), (j_1..j_m)] = T_1[:, i_1, j_1, :] @ T_2[:, i_2, j_2, :] @ ... @ T_m[:, i_m, j_m, :]

Rows and columns are flattened in C order, so `row_shape` and `col_shape` factor the matrix exactly as
`W.reshape(*row_shape, *col_shape)` does.

Gauge. `decompose` returns the MPO in mixed-canonical ("bi-canonical") form with its orthogonality centre at
index m // 2: tensors left of the centre are left-orthonormal, tensors right of it right-orthonormal, and the
central tensor carries the whole norm of W (||C||_F == ||W||_F), its bonds ordered by descending singular value.
The reference code splits every cut's singular values as a square root on both sides; that is another gauge of
the same MPO (same bond dimensions, same parameter count, same reconstruction). We pick the mixed-canonical gauge
deliberately: the auxiliary tensors are then isometries and the central tensor holds all of the "core
information", which is what MPOE shares between experts (docs/method.md, 'Gauge: which tensor is central').

Truncation (`max_bond`) happens in the left-to-right TT-SVD sweep, exactly as in Oseledets (2011) and tensorly's
`tensor_train_matrix`, so the result equals theirs at the same ranks and `truncation_error` is the exact
Frobenius norm of what was discarded. The gauge sweep afterwards never truncates.

This module is pure torch and knows nothing of experts or models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]


@dataclass
class MPO:
    """An MPO of a (prod(row_shape), prod(col_shape)) matrix: m tensors of shape (r_{k-1}, i_k, j_k, r_k)."""

    tensors: list[torch.Tensor]
    row_shape: Shape
    col_shape: Shape
    truncation_error: float = 0.0

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    @property
    def central_index(self) -> int:
        return self.num_tensors // 2

    @property
    def central(self) -> torch.Tensor:
        return self.tensors[self.central_index]

    @property
    def auxiliary(self) -> list[torch.Tensor]:
        return [t for k, t in enumerate(self.tensors) if k != self.central_index]

    @property
    def bond_dims(self) -> list[int]:
        """[r_0, r_1, ..., r_m] with r_0 = r_m = 1."""
        return [self.tensors[0].shape[0]] + [t.shape[-1] for t in self.tensors]

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @property
    def num_central_params(self) -> int:
        return self.central.numel()

    @property
    def num_auxiliary_params(self) -> int:
        return self.num_params - self.num_central_params

    def to_matrix(self) -> torch.Tensor:
        """Contract all local tensors back into the (I, J) matrix."""
        return contract(self.tensors, self.row_shape, self.col_shape)


def check_shapes(matrix_shape: Sequence[int], row_shape: Sequence[int], col_shape: Sequence[int]) -> None:
    """Raise a ValueError naming both shapes when the factorization does not fit the matrix."""
    rows, cols = matrix_shape
    if len(row_shape) != len(col_shape):
        raise ValueError(
            f"row_shape {tuple(row_shape)} and col_shape {tuple(col_shape)} must have the same length "
            f"(one row and one column factor per local tensor)"
        )
    if len(row_shape) < 1 or any(int(f) < 1 for f in (*row_shape, *col_shape)):
        raise ValueError(f"factors must be positive integers, got rows {tuple(row_shape)} cols {tuple(col_shape)}")
    if math.prod(row_shape) != rows or math.prod(col_shape) != cols:
        raise ValueError(
            f"factorization rows {tuple(row_shape)} x cols {tuple(col_shape)} "
            f"(= {math.prod(row_shape)} x {math.prod(col_shape)}) does not match the matrix shape {rows} x {cols}"
        )


def bond_dims(row_shape: Sequence[int], col_shape: Sequence[int], max_bond: int | None = None) -> list[int]:
    """Bond dimensions [1, r_1, ..., r_{m-1}, 1] of `decompose` for these factors, computed from shapes alone."""
    site_dims = [i * j for i, j in zip(row_shape, col_shape)]
    bonds = [1]
    for k in range(1, len(site_dims)):
        rank = min(bonds[-1] * site_dims[k - 1], math.prod(site_dims[k:]))
        if max_bond is not None:
            rank = min(rank, max_bond)
        bonds.append(rank)
    bonds.append(1)
    return bonds


def tensor_shapes(
    row_shape: Sequence[int], col_shape: Sequence[int], max_bond: int | None = None
) -> list[tuple[int, int, int, int]]:
    """Shapes (r_{k-1}, i_k, j_k, r_k) of the local tensors `decompose` returns."""
    bonds = bond_dims(row_shape, col_shape, max_bond)
    return [(bonds[k], i, j, bonds[k + 1]) for k, (i, j) in enumerate(zip(row_shape, col_shape))]


def decompose(
    matrix: torch.Tensor,
    row_shape: Sequence[int],
    col_shape: Sequence[int],
    max_bond: int | None = None,
) -> MPO:
    """MPO decomposition of `matrix` in mixed-canonical gauge (centre m // 2); exact unless `max_bond` is set."""
    if matrix.dim() != 2:
        raise ValueError(f"expected a 2-d matrix, got shape {tuple(matrix.shape)}")
    check_shapes(matrix.shape, row_shape, col_shape)
    if max_bond is not None and max_bond < 1:
        raise ValueError(f"max_bond must be a positive integer or None, got {max_bond}")
    row_shape, col_shape = tuple(int(i) for i in row_shape), tuple(int(j) for j in col_shape)
    m = len(row_shape)
    site_dims = [i * j for i, j in zip(row_shape, col_shape)]

    # (I, J) -> (i_1..i_m, j_1..j_m) -> interleaved (i_1, j_1, ..., i_m, j_m) -> sites (i_1 j_1, ..., i_m j_m)
    interleave = [axis for k in range(m) for axis in (k, m + k)]
    remainder = matrix.reshape(*row_shape, *col_shape).permute(*interleave).reshape(-1)

    # Left-to-right TT-SVD sweep: left-orthonormal tensors, truncation at each cut.
    tensors: list[torch.Tensor] = []
    discarded_sq = 0.0
    rank = 1
    for k in range(m - 1):
        unfolding = remainder.reshape(rank * site_dims[k], -1)
        u, s, vh = _svd(unfolding)
        keep = s.numel() if max_bond is None else min(max_bond, s.numel())
        discarded_sq += float((s[keep:].double() ** 2).sum())
        u, s, vh = u[:, :keep], s[:keep], vh[:keep]
        tensors.append(u.reshape(rank, row_shape[k], col_shape[k], keep))
        remainder = s[:, None] * vh  # (keep, rest)
        rank = keep
    tensors.append(remainder.reshape(rank, row_shape[-1], col_shape[-1], 1))

    # Right-to-left gauge sweep (no truncation) down to the centre: right-orthonormal tensors, sorted bonds.
    for k in range(m - 1, m // 2, -1):
        r_prev, i, j, r_next = tensors[k].shape
        u, s, vh = _svd(tensors[k].reshape(r_prev, i * j * r_next))
        tensors[k] = vh.reshape(-1, i, j, r_next)
        tensors[k - 1] = torch.einsum("aijb,bc->aijc", tensors[k - 1], u * s)
    return MPO(
        tensors=[t.contiguous() for t in tensors],
        row_shape=row_shape,
        col_shape=col_shape,
        truncation_error=math.sqrt(discarded_sq),
    )


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD; wide matrices through their transpose (LAPACK is ~3x faster and more accurate on tall ones)."""
    if a.shape[0] >= a.shape[1]:
        return torch.linalg.svd(a, full_matrices=False)
    u, s, vh = torch.linalg.svd(a.mT, full_matrices=False)
    return vh.mT, s, u.mT


def contract(tensors: Sequence[torch.Tensor], row_shape: Sequence[int], col_shape: Sequence[int]) -> torch.Tensor:
    """Contract local tensors (r, i, j, r') into the (I, J) matrix; tensors may share one leading batch dim.

    With a leading batch dimension E (an expert stack) on some tensors, the result has shape (E, I, J); tensors
    without it are broadcast (a shared central tensor, multiplied with all experts' rows in one matmul).

    Order: the chains left and right of the centre first (small), their row and column indices regrouped while
    they are small, then the central tensor from whichever side is cheaper forward + backward (`_centre_costs`; with
    a frozen central, on a masked step of the gradient mask, the backward skips a product): ~ |W| * (r_{c-1} + r_c)
    multiply-adds forward per matrix (`contraction_macs`; docs/method.md, 'Cost model of GPU hours'). Last, one permute
    of W-sized data, of 6 grouped dimensions:
    (I_left, J_left, i_c, j_c, I_right, J_right) -> (I_left, i_c, I_right, J_left, j_c, J_right).
    """
    centre = len(tensors) // 2
    batched = any(t.dim() == 5 for t in tensors)
    stacked = [t if t.dim() == 5 else t.unsqueeze(0) for t in tensors]  # (E or 1, r, i, j, r')
    central = stacked[centre]
    _, r_prev, i_c, j_c, r_next = central.shape
    rows_left, cols_left = math.prod(row_shape[:centre]), math.prod(col_shape[:centre])
    rows_right, cols_right = math.prod(row_shape[centre + 1 :]), math.prod(col_shape[centre + 1 :])
    # left (E, I_l J_l, r_prev) and right (E, r_next, I_r J_r), their rows grouped before their columns
    left = _group_rows_cols(_chain(stacked[:centre], central), row_shape[:centre], col_shape[:centre], bond_last=True)
    right = _group_rows_cols(
        _chain_right(stacked[centre + 1 :], central), row_shape[centre + 1 :], col_shape[centre + 1 :]
    )
    grads = [torch.is_grad_enabled() and any(t.requires_grad for t in part) for part in (left, central, right)]
    left_first, right_first = _centre_costs(rows_left * cols_left, central.shape[1:], rows_right * cols_right, grads)
    if left_first <= right_first:
        if central.shape[0] == 1:  # shared: every expert's left rows times the one central tensor
            central_matrix = central.reshape(r_prev, i_c * j_c * r_next)
        else:
            central_matrix = central.reshape(-1, r_prev, i_c * j_c * r_next)
        left_central = torch.matmul(left, central_matrix)  # (E, I_l J_l, i_c j_c r_next)
        full = torch.matmul(left_central.reshape(left_central.shape[0], -1, r_next), right)
    else:
        central_right = torch.matmul(central.reshape(-1, r_prev * i_c * j_c, r_next), right)  # (E, r_prev i_c j_c, P_r)
        full = torch.matmul(left, central_right.reshape(central_right.shape[0], r_prev, -1))
    # full: (E, I_l J_l i_c j_c, I_r J_r) -> (E, I, J)
    experts = full.shape[0]
    full = full.reshape(experts, rows_left, cols_left, i_c, j_c, rows_right, cols_right).permute(0, 1, 3, 5, 2, 4, 6)
    matrix = full.reshape(experts, math.prod(row_shape), math.prod(col_shape))
    return matrix if batched else matrix[0]


def _centre_costs(
    p_left: int, central_shape: Sequence[int], p_right: int, grads: tuple[bool, bool, bool] = (False, False, False)
) -> tuple[int, int]:
    """Multiply-adds of bringing in the central tensor (r_prev, i_c, j_c, r_next) between a left chain of p_left
    entries per bond and a right chain of p_right: (left first, right first), for one expert. The forward's two
    products, plus, for `grads` = which of (left chain, central, right chain) need a gradient, the backward's:
    each product's backward costs what it did forward, once per input that needs a gradient."""
    r_prev, i_c, j_c, r_next = central_shape
    g_left, g_central, g_right = grads
    left_central = p_left * r_prev * i_c * j_c * r_next  # (left central), then x right
    then_right = p_left * i_c * j_c * r_next * p_right
    left_first = left_central * (1 + g_left + g_central) + then_right * (1 + (g_left or g_central) + g_right)
    central_right = r_prev * i_c * j_c * r_next * p_right  # (central right), then left x
    then_left = p_left * r_prev * i_c * j_c * p_right
    right_first = central_right * (1 + g_central + g_right) + then_left * (1 + g_left + (g_central or g_right))
    return left_first, right_first


def _group_rows_cols(
    chain: torch.Tensor, row_shape: Sequence[int], col_shape: Sequence[int], bond_last: bool = False
) -> torch.Tensor:
    """A chain's sites from interleaved (i_1, j_1, i_2, j_2, ...) to grouped (i_1, i_2, ..., j_1, j_2, ...) order.
    chain: (E, P, r) with bond_last, else (E, r, P)."""
    n = len(row_shape)
    if n <= 1:
        return chain
    e = chain.shape[0]
    interleaved = [d for i, j in zip(row_shape, col_shape) for d in (i, j)]
    sites = list(range(1, 2 * n + 1, 2)) + list(range(2, 2 * n + 1, 2))  # i's then j's, after the batch dim
    if bond_last:
        r = chain.shape[-1]
        return chain.reshape(e, *interleaved, r).permute(0, *sites, 2 * n + 1).reshape(e, -1, r)
    r = chain.shape[1]
    return chain.reshape(e, r, *interleaved).permute(0, 1, *(s + 1 for s in sites)).reshape(e, r, -1)


def contraction_macs(row_shape: Sequence[int], col_shape: Sequence[int], max_bond: int | None = None) -> int:
    """Multiply-adds `contract` spends on one matrix (one expert) of these shapes: its left and right chains, then
    the central tensor from the cheaper side: ~|W| * (r_{c-1} + r_c) (docs/method.md, 'Cost model of GPU hours')."""
    shapes = tensor_shapes(row_shape, col_shape, max_bond)
    centre = len(shapes) // 2
    macs, p_left, p_right = 0, 1, 1
    for k, (r_prev, i, j, r_next) in enumerate(shapes[:centre]):  # (P, r_prev) @ (r_prev, i j r_next)
        macs += p_left * r_prev * i * j * r_next if k > 0 else 0  # the first tensor is only reshaped
        p_left *= i * j
    for k, (r_prev, i, j, r_next) in enumerate(reversed(shapes[centre + 1 :])):  # (r_prev i j, r_next) @ (r_next, P)
        macs += r_prev * i * j * r_next * p_right if k > 0 else 0
        p_right *= i * j
    return macs + min(_centre_costs(p_left, shapes[centre], p_right))


def _chain(tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Left chain (E, 1, i, j, r) ... -> (E, P, r); P = 1 and r = 1 for an empty chain."""
    if not tensors:
        return like.new_ones(1, 1, 1)
    out = tensors[0].reshape(tensors[0].shape[0], -1, tensors[0].shape[-1])  # (E, i j, r)
    for t in tensors[1:]:
        e, r_prev, i, j, r_next = t.shape
        out = torch.matmul(out, t.reshape(e, r_prev, i * j * r_next))  # (E, P, i j r')
        out = out.reshape(out.shape[0], -1, r_next)
    return out


def _chain_right(tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Right chain ... (E, r, i, j, 1) -> (E, r, P)."""
    if not tensors:
        return like.new_ones(1, 1, 1)
    last = tensors[-1]
    out = last.reshape(last.shape[0], last.shape[1], -1)  # (E, r, i j)
    for t in reversed(tensors[:-1]):
        e, r_prev, i, j, r_next = t.shape
        out = torch.matmul(t.reshape(e, r_prev * i * j, r_next), out)  # (E, r i j, P)
        out = out.reshape(out.shape[0], r_prev, -1)
    return out


# --- factorizations --------------------------------------------------------------------------------------------

# Rows x cols of the stored (out_features, in_features) weight, per number of local tensors m.
# m = 5 is the reference code's. m = 3, 7, 9 are ours: balanced factors, the largest in the centre, and the column
# factors of a matrix equal to the row factors of its transpose (docs/method.md, 'Factorizations').
_FACTORS: dict[tuple[int, int], dict[int, tuple[Shape, Shape]]] = {
    (3072, 768): {
        3: ((16, 12, 16), (8, 12, 8)),
        5: ((4, 4, 8, 6, 4), (3, 4, 4, 4, 4)),
        7: ((2, 4, 4, 3, 4, 4, 2), (2, 2, 4, 3, 4, 2, 2)),
        9: ((2, 2, 2, 4, 3, 4, 2, 2, 2), (2, 2, 2, 2, 3, 2, 2, 2, 2)),
    },
    (4096, 1024): {
        3: ((16, 16, 16), (8, 16, 8)),
        5: ((4, 4, 8, 8, 4), (4, 4, 4, 4, 4)),
        7: ((2, 4, 4, 4, 4, 4, 2), (2, 2, 4, 4, 4, 2, 2)),
        9: ((2, 2, 2, 4, 4, 4, 2, 2, 2), (2, 2, 2, 2, 4, 2, 2, 2, 2)),
    },
}
# ... and each transposed matrix (cols x rows): the same factors, rows and columns swapped.
KNOWN_FACTORIZATIONS = {
    **_FACTORS,
    **{(c, r): {m: (cf, rf) for m, (rf, cf) in by_m.items()} for (r, c), by_m in _FACTORS.items()},
}


def factor_dimension(n: int, m: int) -> Shape:
    """Split n into m factors, as balanced as possible, largest in the centre; 1s pad the ends if n is too small.

    Prime factors are dealt largest first to the currently smallest slot; the slots are then ordered so that
    size grows towards the centre (index m // 2). A prime larger than n ** (1/m) still works, it just unbalances.
    """
    if n < 1 or m < 1:
        raise ValueError(f"cannot factor {n} into {m} factors")
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    slots = [1] * m
    for prime in sorted(primes, reverse=True):
        slots[slots.index(min(slots))] *= prime
    ascending = sorted(slots)
    # place ascending sizes alternately on the outside, so the largest lands at the centre
    arranged: list[int] = [0] * m
    positions = sorted(range(m), key=lambda k: (abs(k - m // 2), k), reverse=True)
    for size, pos in zip(ascending, positions):
        arranged[pos] = size
    return tuple(arranged)


def factorization(rows: int, cols: int, num_tensors: int, overrides: dict | None = None) -> tuple[Shape, Shape]:
    """Row and column factors for a (rows, cols) weight: user override, then the known table, then automatic."""
    if num_tensors < 3 or num_tensors % 2 == 0:
        raise ValueError(
            f"MPO with m = {num_tensors} local tensors is not supported: m must be odd and >= 3 "
            f"so that one central tensor sits in the middle (the paper uses 3, 5, 7, 9)"
        )
    key = f"{rows}x{cols}"
    if overrides and key in overrides:
        row_shape, col_shape = (tuple(int(f) for f in fs) for fs in overrides[key])
        if len(row_shape) != num_tensors:
            raise ValueError(
                f"factorization for {key} has {len(row_shape)} factors but m = {num_tensors} local tensors "
                f"were asked for"
            )
        check_shapes((rows, cols), row_shape, col_shape)
        return row_shape, col_shape
    known = KNOWN_FACTORIZATIONS.get((rows, cols), {})
    if num_tensors in known:
        return known[num_tensors]
    return factor_dimension(rows, num_tensors), factor_dimension(cols, num_tensors)
