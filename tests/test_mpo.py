"""Tests of the MPO (tensor-train matrix) decomposition in `mpoe_exp.mpo` (docs/method.md: 'MPO decomposition',
'Factorizations', 'Parameter counts', 'Cost model of GPU hours').

Reference computations here are written from the formulas of docs/method.md and the paper (section 2.2, eq. 3),
independently of `mpo`: the interleaved unfolding of W, an einsum contraction and a slice-by-slice product for
single entries, the untruncated bond formula, singular values of W's unfoldings, and tensorly's
`tensor_train_matrix` (Oseledets' TT-SVD).

Error measures: float64 reconstructions are checked by max abs error (<= 1e-10 on N(0, 1) entries); float32 ones
by relative Frobenius error ||W - R||_F / ||W||_F (<= 1e-5). In float32 the max abs error is not a good measure:
the first SVD of a very wide unfolding (e.g. 4 x 1,048,576) loses orthogonality in its right factor (~5e-4), and
a few entries of the reconstruction err by up to ~1e-3 while the relative Frobenius error stays ~4e-6.

Runtime: the float64 decompositions of the 4096 x 1024 cases take 3-9 s each on 2 cores and are marked slow;
1024 x 4096 keeps all m in float64 and both 4096 orientations run in float32 by default. Each configured case is
decomposed once (a module-scoped parametrized fixture) and shared by the reconstruction, shape and gauge tests.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from mpoe_exp import mpo

try:  # numpy's BLAS (tensorly tests) suffers from the same thread contention as torch's
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Run this module's SVDs single-threaded.

    They are medium-sized LAPACK calls that gain little from a second thread, while with other processes busy on a
    2-core box a 2-thread run was measured 5-10x slower than a 1-thread one (OpenMP threads spinning against each
    other). The previous setting is restored afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    limits = threadpool_limits(1) if threadpool_limits is not None else contextlib.nullcontext()
    with limits:
        yield
    torch.set_num_threads(previous)


# --- independent reference computations -------------------------------------------------------------------------


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def _site_dims(row_shape, col_shape) -> list[int]:
    return [i * j for i, j in zip(row_shape, col_shape)]


def _unfolding(matrix: torch.Tensor, row_shape, col_shape, cut: int) -> torch.Tensor:
    """W as (i_1 j_1 ... i_cut j_cut, i_{cut+1} j_{cut+1} ... i_m j_m): the interleaved C-order unfolding
    (docs/method.md, 'MPO decomposition')."""
    m = len(row_shape)
    order = []
    for k in range(m):
        order += [k, m + k]
    interleaved = matrix.reshape(*row_shape, *col_shape).permute(*order)
    return interleaved.reshape(math.prod(_site_dims(row_shape, col_shape)[:cut]), -1)


def _reference_contract(tensors, row_shape, col_shape) -> torch.Tensor:
    """Contract (r, i, j, r') tensors left to right with einsum, then undo the interleaving."""
    m = len(tensors)
    out = tensors[0].reshape(-1, tensors[0].shape[-1])  # (1, i_1, j_1, r_1) -> (P, r) with P = i_1 j_1
    for t in tensors[1:]:
        out = torch.einsum("pa,aijb->pijb", out, t).reshape(-1, t.shape[-1])
    dims = [d for i, j in zip(row_shape, col_shape) for d in (i, j)]
    order = list(range(0, 2 * m, 2)) + list(range(1, 2 * m, 2))
    return out.reshape(dims).permute(*order).reshape(math.prod(row_shape), math.prod(col_shape))


def _entry(tensors, row_shape, col_shape, row: int, col: int) -> torch.Tensor:
    """W[row, col] = T_1[:, i_1, j_1, :] @ ... @ T_m[:, i_m, j_m, :] (paper eq. 3), C-order multi-indices."""
    rows = np.unravel_index(row, row_shape)
    cols = np.unravel_index(col, col_shape)
    product = torch.ones(1, 1, dtype=tensors[0].dtype)
    for t, i, j in zip(tensors, rows, cols):
        product = product @ t[:, int(i), int(j), :]
    return product[0, 0]


def _untruncated_bonds(row_shape, col_shape) -> list[int]:
    """r_k = min(prod_{t<=k} i_t j_t, prod_{t>k} i_t j_t) (docs/method.md, 'MPO decomposition')."""
    sites = _site_dims(row_shape, col_shape)
    return [1] + [min(math.prod(sites[:k]), math.prod(sites[k:])) for k in range(1, len(sites))] + [1]


def _assert_gauge(decomposition: mpo.MPO, norm: float, atol: float) -> None:
    """Left-orthonormal left of the centre, right-orthonormal right of it, the centre carrying the norm."""
    centre = decomposition.central_index
    for k, t in enumerate(decomposition.tensors):
        r_prev, i, j, r_next = t.shape
        q = t.double()
        if k < centre:
            q = q.reshape(r_prev * i * j, r_next)
            gram = q.T @ q
        elif k > centre:
            q = q.reshape(r_prev, i * j * r_next)
            gram = q @ q.T
        else:
            continue
        eye = torch.eye(gram.shape[0], dtype=torch.float64)
        err = (gram - eye).abs().max().item()
        assert err <= atol, f"tensor {k} of {len(decomposition.tensors)} (centre {centre}) not orthonormal: {err:.2e}"
    central_norm = torch.linalg.norm(decomposition.central.double()).item()
    assert central_norm == pytest.approx(norm, rel=max(atol, 1e-12))


# --- every configured factorization, decomposed once --------------------------------------------------------------

CONFIGURED_SHAPES = [(3072, 768), (768, 3072), (4096, 1024), (1024, 4096)]
CONFIGURED_M = [3, 5, 7, 9]
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _configured_cases():
    for rows, cols in CONFIGURED_SHAPES:
        for m in CONFIGURED_M:
            for dtype_name in DTYPES:
                slow = rows * cols == 4096 * 1024 and dtype_name == "float64"  # T5-large both ways: fast in float32
                yield pytest.param(
                    (rows, cols, m, dtype_name),
                    id=f"{rows}x{cols}-m{m}-{dtype_name}",
                    marks=[pytest.mark.slow] if slow else [],
                )


@pytest.fixture(scope="module", params=list(_configured_cases()))
def configured(request):
    rows, cols, m, dtype_name = request.param
    row_shape, col_shape = mpo.KNOWN_FACTORIZATIONS[(rows, cols)][m]
    matrix = _randn(rows, cols, seed=rows + 10 * cols + m, dtype=DTYPES[dtype_name])
    return matrix, row_shape, col_shape, mpo.decompose(matrix, row_shape, col_shape)


def test_known_factorizations_cover_the_configured_shapes():
    assert set(mpo.KNOWN_FACTORIZATIONS) == set(CONFIGURED_SHAPES)
    for (rows, cols), by_m in mpo.KNOWN_FACTORIZATIONS.items():
        assert sorted(by_m) == CONFIGURED_M
        for m, (row_shape, col_shape) in by_m.items():
            assert len(row_shape) == len(col_shape) == m
            assert math.prod(row_shape) == rows and math.prod(col_shape) == cols
            # the transpose's column factors are this matrix's row factors
            assert mpo.KNOWN_FACTORIZATIONS[(cols, rows)][m] == (col_shape, row_shape)


def test_reconstruction(configured):
    matrix, row_shape, col_shape, decomposition = configured
    rebuilt = decomposition.to_matrix()
    assert rebuilt.shape == matrix.shape
    assert rebuilt.dtype == matrix.dtype
    assert all(t.dtype == matrix.dtype for t in decomposition.tensors)
    diff = (rebuilt.double() - matrix.double()).abs()
    if matrix.dtype == torch.float64:
        assert diff.max().item() <= 1e-10
    else:
        relative = (torch.linalg.norm(diff) / torch.linalg.norm(matrix.double())).item()
        assert relative <= 1e-5
    assert decomposition.truncation_error == 0.0


def test_shapes_agree_with_shape_only_functions(configured):
    _, row_shape, col_shape, decomposition = configured
    m = len(row_shape)
    assert decomposition.num_tensors == m
    assert decomposition.row_shape == tuple(row_shape) and decomposition.col_shape == tuple(col_shape)
    assert decomposition.bond_dims == _untruncated_bonds(row_shape, col_shape)
    assert decomposition.bond_dims == mpo.bond_dims(row_shape, col_shape)
    assert [tuple(t.shape) for t in decomposition.tensors] == mpo.tensor_shapes(row_shape, col_shape)
    assert decomposition.central_index == m // 2
    assert decomposition.central is decomposition.tensors[m // 2]
    assert decomposition.auxiliary == [t for k, t in enumerate(decomposition.tensors) if k != m // 2]
    numels = [t.numel() for t in decomposition.tensors]
    assert decomposition.num_params == sum(numels)
    assert decomposition.num_central_params == numels[m // 2]
    assert decomposition.num_auxiliary_params == sum(numels) - numels[m // 2]


def test_gauge(configured):
    matrix, _, _, decomposition = configured
    atol = 1e-10 if matrix.dtype == torch.float64 else 1e-5
    _assert_gauge(decomposition, torch.linalg.norm(matrix.double()).item(), atol)


# --- paper shapes (docs/method.md, 'Factorizations') ------------------------------------------------------------------

PAPER = {
    # rows, cols: (row factors, col factors, bonds, central shape, central numel, auxiliary total)
    (3072, 768): ((4, 4, 8, 6, 4), (3, 4, 4, 4, 4), [1, 12, 192, 384, 16, 1], (192, 8, 4, 384), 2_359_296, 184_720),
    (768, 3072): ((3, 4, 4, 4, 4), (4, 4, 8, 6, 4), [1, 12, 192, 384, 16, 1], (192, 4, 8, 384), 2_359_296, 184_720),
    (4096, 1024): ((4, 4, 8, 8, 4), (4, 4, 4, 4, 4), [1, 16, 256, 512, 16, 1], (256, 8, 4, 512), 4_194_304, 328_192),
    (1024, 4096): ((4, 4, 4, 4, 4), (4, 4, 8, 8, 4), [1, 16, 256, 512, 16, 1], (256, 4, 8, 512), 4_194_304, 328_192),
}


@pytest.mark.parametrize("shape", list(PAPER), ids=lambda s: f"{s[0]}x{s[1]}")
def test_paper_factorizations_shape_only(shape):
    rows, cols = shape
    row_shape, col_shape, bonds, central_shape, central_numel, aux_total = PAPER[shape]
    assert mpo.KNOWN_FACTORIZATIONS[shape][5] == (row_shape, col_shape)
    assert mpo.factorization(rows, cols, 5) == (row_shape, col_shape)
    assert mpo.bond_dims(row_shape, col_shape) == bonds
    shapes = mpo.tensor_shapes(row_shape, col_shape)
    assert shapes[2] == central_shape
    numels = [math.prod(s) for s in shapes]
    assert numels[2] == central_numel == rows * cols
    assert sum(numels) - numels[2] == aux_total


@pytest.mark.parametrize("shape", [(3072, 768), (4096, 1024)], ids=["t5-base-wi", "t5-large-wi"])
def test_paper_factorizations_decompose(shape):
    rows, cols = shape
    row_shape, col_shape, bonds, central_shape, central_numel, aux_total = PAPER[shape]
    matrix = _randn(rows, cols, seed=7, dtype=torch.float32)
    decomposition = mpo.decompose(matrix, row_shape, col_shape)
    assert decomposition.bond_dims == bonds
    assert decomposition.central_index == 2
    assert tuple(decomposition.central.shape) == central_shape
    assert decomposition.num_central_params == central_numel
    assert decomposition.num_auxiliary_params == aux_total
    assert sum(t.numel() for t in decomposition.auxiliary) == aux_total
    assert decomposition.num_params == central_numel + aux_total


def test_t5_base_mpoe_parameter_totals_from_spec():
    """total = base + L * n * (2 * aux + d + 1) (docs/method.md, 'Parameter counts'), aux from the shape-only
    functions."""
    base, layers, d_model = 222_903_552, 24, 768
    wi = mpo.tensor_shapes(*mpo.factorization(3072, 768, 5))
    wo = mpo.tensor_shapes(*mpo.factorization(768, 3072, 5))
    aux_wi = sum(math.prod(s) for k, s in enumerate(wi) if k != 2)
    aux_wo = sum(math.prod(s) for k, s in enumerate(wo) if k != 2)
    assert aux_wi == aux_wo == 184_720
    assert base + layers * 8 * (aux_wi + aux_wo + d_model + 1) == 293_983_680
    assert base + layers * 16 * (aux_wi + aux_wo + d_model + 1) == 365_063_808


# --- small matrices: all m, truncation, gauge details ---------------------------------------------------------------

SMALL = [
    # (row_shape, col_shape) of 256 x 64-ish matrices; m = 1 .. 6, odd and even
    ((256,), (64,)),
    ((16, 16), (8, 8)),
    ((8, 4, 8), (4, 4, 4)),
    ((4, 4, 4, 4), (2, 4, 4, 2)),
    ((2, 2, 4, 4, 4), (2, 2, 2, 2, 4)),
    ((2, 2, 4, 4, 2, 2), (2, 2, 2, 2, 2, 2)),
    ((3, 5, 2), (7, 1, 3)),  # odd factors and a factor 1
]


def _small_id(case) -> str:
    return "x".join(map(str, case[0])) + "_" + "x".join(map(str, case[1]))


@pytest.mark.parametrize("case", SMALL, ids=_small_id)
def test_small_exact_decomposition(case):
    row_shape, col_shape = case
    matrix = _randn(math.prod(row_shape), math.prod(col_shape), seed=len(row_shape))
    decomposition = mpo.decompose(matrix, row_shape, col_shape)
    assert decomposition.bond_dims == _untruncated_bonds(row_shape, col_shape)
    assert [tuple(t.shape) for t in decomposition.tensors] == mpo.tensor_shapes(row_shape, col_shape)
    assert (decomposition.to_matrix() - matrix).abs().max().item() <= 1e-12
    # the formula of the paper's eq. 3, entry by entry, on the raw local tensors
    rows, cols = matrix.shape
    for row, col in [(0, 0), (rows - 1, cols - 1), (37 % rows, 11 % cols), (100 % rows, 50 % cols)]:
        value = _entry(decomposition.tensors, row_shape, col_shape, row, col).item()
        assert value == pytest.approx(matrix[row, col].item(), abs=1e-12)
    _assert_gauge(decomposition, torch.linalg.norm(matrix).item(), 1e-12)


@pytest.mark.parametrize("case", SMALL[1:], ids=_small_id)
def test_central_bond_carries_singular_values_of_w(case):
    """Mixed-canonical centre: C as (r_{c-1} i_c j_c, r_c) has orthogonal columns whose norms are the singular
    values, in descending order, of W's unfolding at the cut right of the centre. With m = 2 the centre is the
    last tensor and the same holds for its rows and the cut left of it."""
    row_shape, col_shape = case
    matrix = _randn(math.prod(row_shape), math.prod(col_shape), seed=3)
    decomposition = mpo.decompose(matrix, row_shape, col_shape)
    centre = decomposition.central_index
    central = decomposition.central
    if centre < len(row_shape) - 1:
        vectors = central.reshape(-1, central.shape[-1])
        cut = centre + 1
    else:
        vectors = central.reshape(central.shape[0], -1).T
        cut = centre
    gram = vectors.T @ vectors
    expected = torch.linalg.svdvals(_unfolding(matrix, row_shape, col_shape, cut))
    torch.testing.assert_close(torch.diagonal(gram).sqrt(), expected, rtol=1e-10, atol=1e-12)
    off_diagonal = gram - torch.diag(torch.diagonal(gram))
    assert off_diagonal.abs().max().item() <= 1e-10


def test_central_singular_values_t5_base_shape():
    row_shape, col_shape = PAPER[(3072, 768)][:2]
    matrix = _randn(3072, 768, seed=11)
    decomposition = mpo.decompose(matrix, row_shape, col_shape)
    columns = decomposition.central.reshape(-1, decomposition.central.shape[-1])
    expected = torch.linalg.svdvals(_unfolding(matrix, row_shape, col_shape, 3))
    torch.testing.assert_close(torch.linalg.norm(columns, dim=0), expected, rtol=1e-10, atol=1e-12)
    _assert_gauge(decomposition, torch.linalg.norm(matrix).item(), 1e-10)


TRUNC_ROWS, TRUNC_COLS = (2, 2, 4, 4, 4), (2, 2, 2, 2, 4)  # 256 x 64, untruncated bonds [1, 4, 16, 128, 16, 1]


def test_truncation_error_is_exact_and_decreasing():
    matrix = _randn(256, 64, seed=5)
    assert _untruncated_bonds(TRUNC_ROWS, TRUNC_COLS) == [1, 4, 16, 128, 16, 1]
    norm = torch.linalg.norm(matrix).item()
    errors = []
    max_bonds = [1, 2, 3, 4, 8, 15, 16, 17, 32, 64, 100, 127]
    for max_bond in max_bonds:
        decomposition = mpo.decompose(matrix, TRUNC_ROWS, TRUNC_COLS, max_bond=max_bond)
        rebuilt = decomposition.to_matrix()
        error = torch.linalg.norm(matrix - rebuilt).item()
        assert decomposition.truncation_error == pytest.approx(error, rel=1e-8, abs=1e-12)
        assert decomposition.bond_dims == mpo.bond_dims(TRUNC_ROWS, TRUNC_COLS, max_bond=max_bond)
        assert [tuple(t.shape) for t in decomposition.tensors] == mpo.tensor_shapes(TRUNC_ROWS, TRUNC_COLS, max_bond)
        assert max(decomposition.bond_dims) <= max_bond
        # gauge holds after truncation too; the centre then carries the norm of the approximation
        _assert_gauge(decomposition, torch.linalg.norm(rebuilt).item(), 1e-10)
        errors.append(error)
    assert errors[0] > 0.1 * norm
    for smaller, larger, e_small, e_large in zip(max_bonds, max_bonds[1:], errors, errors[1:]):
        assert e_large < e_small, f"error did not decrease from max_bond {smaller} ({e_small}) to {larger} ({e_large})"

    for max_bond in (128, 1000, None):
        decomposition = mpo.decompose(matrix, TRUNC_ROWS, TRUNC_COLS, max_bond=max_bond)
        assert decomposition.bond_dims == [1, 4, 16, 128, 16, 1]
        assert (decomposition.to_matrix() - matrix).abs().max().item() <= 1e-12
        assert decomposition.truncation_error <= 1e-10
    assert mpo.decompose(matrix, TRUNC_ROWS, TRUNC_COLS).truncation_error == 0.0


def test_truncation_error_bounds_from_unfoldings():
    """TT-SVD error bounds (Oseledets 2011) from W's own unfoldings: the error is at least the best rank-r_k error
    of every single cut, and at most the root sum of squares of those; with one cut (m = 2) it is Eckart-Young's."""
    matrix = _randn(256, 64, seed=9)
    for max_bond in (2, 6, 20, 50):
        decomposition = mpo.decompose(matrix, TRUNC_ROWS, TRUNC_COLS, max_bond=max_bond)
        tails = []
        for cut, rank in enumerate(decomposition.bond_dims[1:-1], start=1):
            s = torch.linalg.svdvals(_unfolding(matrix, TRUNC_ROWS, TRUNC_COLS, cut))
            tails.append(torch.linalg.norm(s[rank:]).item())
        assert (
            max(tails) * (1 - 1e-10)
            <= decomposition.truncation_error
            <= math.sqrt(sum(t * t for t in tails)) * (1 + 1e-10)
        )

    rows, cols = (16, 16), (8, 8)
    matrix = _randn(256, 64, seed=10)
    s = torch.linalg.svdvals(_unfolding(matrix, rows, cols, 1))
    for max_bond in (1, 5, 40, 127):
        decomposition = mpo.decompose(matrix, rows, cols, max_bond=max_bond)
        best = torch.linalg.norm(s[max_bond:]).item()
        assert decomposition.truncation_error == pytest.approx(best, rel=1e-10)
        assert torch.linalg.norm(matrix - decomposition.to_matrix()).item() == pytest.approx(best, rel=1e-8)


def test_truncated_shapes_agree_with_shape_only_t5_base():
    row_shape, col_shape = PAPER[(3072, 768)][:2]
    for max_bond in (10, 100, 300):
        shapes = mpo.tensor_shapes(row_shape, col_shape, max_bond=max_bond)
        bonds = mpo.bond_dims(row_shape, col_shape, max_bond=max_bond)
        expected = [min(b, max_bond) for b in [1, 12, 192, 384, 16, 1]]
        assert bonds == expected
        assert shapes == [(bonds[k], i, j, bonds[k + 1]) for k, (i, j) in enumerate(zip(row_shape, col_shape))]
    matrix = _randn(3072, 768, seed=12, dtype=torch.float32)
    decomposition = mpo.decompose(matrix, row_shape, col_shape, max_bond=100)
    assert [tuple(t.shape) for t in decomposition.tensors] == mpo.tensor_shapes(row_shape, col_shape, 100)
    assert decomposition.bond_dims == [1, 12, 100, 100, 16, 1]


# --- agreement with tensorly ------------------------------------------------------------------------------------------


def _tensorly_reconstruction(matrix: torch.Tensor, row_shape, col_shape, max_bond: int | None):
    tensorly = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train_matrix
    from tensorly.tt_matrix import tt_matrix_to_tensor

    tensorly.set_backend("numpy")
    m = len(row_shape)
    bound = 10**9 if max_bond is None else max_bond  # tensorly clamps each rank to what the unfolding allows
    factors = tensor_train_matrix(matrix.numpy().reshape(*row_shape, *col_shape), [1] + [bound] * (m - 1) + [1])
    ranks = [1] + [f.shape[-1] for f in factors]
    rebuilt = np.asarray(tt_matrix_to_tensor(factors)).reshape(matrix.shape)
    return torch.from_numpy(rebuilt), ranks


TENSORLY_CASES = [
    ((2, 2, 4, 4, 4), (2, 2, 2, 2, 4), None),
    ((2, 2, 4, 4, 4), (2, 2, 2, 2, 4), 3),
    ((2, 2, 4, 4, 4), (2, 2, 2, 2, 4), 10),
    ((2, 2, 4, 4, 4), (2, 2, 2, 2, 4), 50),
    ((8, 4, 8), (4, 4, 4), None),
    ((8, 4, 8), (4, 4, 4), 7),
    ((3, 5, 2), (7, 1, 3), 4),
    ((4, 4, 8, 6, 4), (3, 4, 4, 4, 4), None),
    ((4, 4, 8, 6, 4), (3, 4, 4, 4, 4), 100),
]


@pytest.mark.parametrize(
    "row_shape, col_shape, max_bond",
    TENSORLY_CASES,
    ids=[f"{math.prod(r)}x{math.prod(c)}-m{len(r)}-bond{b}" for r, c, b in TENSORLY_CASES],
)
def test_agrees_with_tensorly(row_shape, col_shape, max_bond):
    matrix = _randn(math.prod(row_shape), math.prod(col_shape), seed=21 + len(row_shape))
    ours = mpo.decompose(matrix, row_shape, col_shape, max_bond=max_bond)
    theirs, their_ranks = _tensorly_reconstruction(matrix, row_shape, col_shape, max_bond)
    assert ours.bond_dims == their_ranks
    rebuilt = ours.to_matrix()
    assert (rebuilt - theirs).abs().max().item() <= 1e-9
    if max_bond is not None:
        assert torch.linalg.norm(matrix - theirs).item() == pytest.approx(ours.truncation_error, rel=1e-8)


# --- contraction ------------------------------------------------------------------------------------------------------

CONTRACT_CASES = [
    # (row_shape, col_shape, bonds): both orders of the central contraction, m = 1 .. 5, ragged bonds
    ((2, 3, 4), (3, 2, 2), [1, 5, 7, 1]),  # right side first
    ((4, 3, 2), (2, 2, 3), [1, 7, 5, 1]),  # left side first
    ((5,), (3,), [1, 1]),
    ((2, 3), (4, 2), [1, 3, 1]),
    ((2, 3, 2, 2), (1, 2, 3, 2), [1, 2, 6, 4, 1]),
    ((2, 2, 3, 2, 2), (3, 2, 2, 1, 2), [1, 3, 5, 6, 2, 1]),
]


def _random_tensors(row_shape, col_shape, bonds, seed: int, batch: int | None = None, requires_grad=False):
    tensors = []
    for k, (i, j) in enumerate(zip(row_shape, col_shape)):
        shape = (bonds[k], i, j, bonds[k + 1])
        if batch is not None:
            shape = (batch, *shape)
        t = _randn(*shape, seed=seed + k)
        tensors.append(t.requires_grad_(requires_grad))
    return tensors


@pytest.mark.parametrize("case", CONTRACT_CASES, ids=lambda c: f"m{len(c[0])}-{'-'.join(map(str, c[2]))}")
def test_contract_matches_reference(case):
    row_shape, col_shape, bonds = case
    tensors = _random_tensors(row_shape, col_shape, bonds, seed=100)
    out = mpo.contract(tensors, row_shape, col_shape)
    assert out.shape == (math.prod(row_shape), math.prod(col_shape))
    torch.testing.assert_close(out, _reference_contract(tensors, row_shape, col_shape), rtol=1e-12, atol=1e-12)
    rows, cols = out.shape
    for row, col in [(0, 0), (rows - 1, cols - 1), (rows // 2, cols // 3), (1 % rows, cols - 1)]:
        assert out[row, col].item() == pytest.approx(_entry(tensors, row_shape, col_shape, row, col).item(), abs=1e-12)


@pytest.mark.parametrize("case", CONTRACT_CASES, ids=lambda c: f"m{len(c[0])}-{'-'.join(map(str, c[2]))}")
@pytest.mark.parametrize("batched", ["auxiliary", "central", "all"])
def test_contract_batched_over_experts_with_gradients(case, batched):
    row_shape, col_shape, bonds = case
    m, centre, experts = len(row_shape), len(row_shape) // 2, 3
    if m == 1 and batched == "auxiliary":
        pytest.skip("m = 1 has no auxiliary tensor")
    shared = _random_tensors(row_shape, col_shape, bonds, seed=200, requires_grad=True)
    stacked = _random_tensors(row_shape, col_shape, bonds, seed=300, batch=experts, requires_grad=True)

    def is_batched(k: int) -> bool:
        return batched == "all" or (k == centre) == (batched == "central")

    tensors = [stacked[k] if is_batched(k) else shared[k] for k in range(m)]
    out = mpo.contract(tensors, row_shape, col_shape)
    assert out.shape == (experts, math.prod(row_shape), math.prod(col_shape))
    weights = _randn(*out.shape, seed=400)
    (out * weights).sum().backward()
    grads = [t.grad.clone() for t in tensors]
    for t in (*shared, *stacked):
        t.grad = None

    # reference: each expert separately, with the independent einsum contraction
    loss = 0.0
    for e in range(experts):
        per_expert = [stacked[k][e] if is_batched(k) else shared[k] for k in range(m)]
        expected = _reference_contract(per_expert, row_shape, col_shape)
        torch.testing.assert_close(out[e], expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            out[e], mpo.contract([t.detach() for t in per_expert], row_shape, col_shape), rtol=1e-12, atol=1e-12
        )
        loss = loss + (expected * weights[e]).sum()
    loss.backward()
    for k, t in enumerate(tensors):
        assert grads[k].shape == t.shape
        assert grads[k].abs().sum().item() > 0, f"no gradient reached tensor {k}"
        torch.testing.assert_close(grads[k], t.grad, rtol=1e-10, atol=1e-10)


def test_contract_expert_stack_of_decomposed_weights():
    """The MPOE use: experts' auxiliary tensors stacked, one shared central; upcycled experts all equal W."""
    row_shape, col_shape = (2, 2, 4, 4, 4), (2, 2, 2, 2, 4)
    matrix = _randn(256, 64, seed=31)
    decomposition = mpo.decompose(matrix, row_shape, col_shape)
    centre = decomposition.central_index
    experts = 4
    tensors = [t if k == centre else t.expand(experts, *t.shape) for k, t in enumerate(decomposition.tensors)]
    out = mpo.contract(tensors, row_shape, col_shape)
    assert out.shape == (experts, 256, 64)
    for e in range(experts):
        assert (out[e] - matrix).abs().max().item() <= 1e-12


# --- errors -------------------------------------------------------------------------------------------------------


def test_mismatched_factorization_names_both_shapes():
    matrix = torch.zeros(768, 3072)
    with pytest.raises(ValueError) as info:
        mpo.decompose(matrix, (4, 4, 8, 6, 4), (3, 4, 4, 4, 4))
    message = str(info.value)
    assert "768 x 3072" in message  # the matrix
    assert "3072 x 768" in message  # what the factors multiply to
    assert "(4, 4, 8, 6, 4)" in message and "(3, 4, 4, 4, 4)" in message
    with pytest.raises(ValueError, match=r"256 x 64"):
        mpo.decompose(torch.zeros(256, 64), (4, 4, 4), (4, 4, 2))


def test_invalid_inputs_raise():
    matrix = torch.zeros(256, 64)
    with pytest.raises(ValueError, match="same length"):
        mpo.decompose(matrix, (4, 8, 8), (8, 8))
    with pytest.raises(ValueError, match="2-d"):
        mpo.decompose(torch.zeros(4, 64, 4), (4, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match="2-d"):
        mpo.decompose(torch.zeros(256), (4, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError):
        mpo.decompose(matrix, (), ())
    with pytest.raises(ValueError):
        mpo.decompose(matrix, (-4, -8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match="max_bond"):
        mpo.decompose(matrix, (4, 8, 8), (4, 4, 4), max_bond=0)
    with pytest.raises(ValueError):
        mpo.check_shapes((256, 64), (4, 8, 8), (4, 4, 4, 1))


@pytest.mark.parametrize("m", [4, 1, 2, 0, -3, 6])
def test_factorization_rejects_unsupported_m(m):
    with pytest.raises(ValueError, match=f"m = {m}"):
        mpo.factorization(3072, 768, m)


def test_factorization_sources():
    # known table, both orientations
    assert mpo.factorization(3072, 768, 5) == ((4, 4, 8, 6, 4), (3, 4, 4, 4, 4))
    assert mpo.factorization(768, 3072, 5) == ((3, 4, 4, 4, 4), (4, 4, 8, 6, 4))
    assert mpo.factorization(1024, 4096, 5) == ((4, 4, 4, 4, 4), (4, 4, 8, 8, 4))
    for m in CONFIGURED_M:
        assert mpo.factorization(4096, 1024, m) == mpo.KNOWN_FACTORIZATIONS[(4096, 1024)][m]
    # override wins over the table, lists become int tuples
    override = {"3072x768": [[2, 8, 12, 8, 2], [2, 4, 24, 2, 2]]}
    assert mpo.factorization(3072, 768, 5, overrides=override) == ((2, 8, 12, 8, 2), (2, 4, 24, 2, 2))
    # an override for another shape is ignored
    assert mpo.factorization(768, 3072, 5, overrides=override) == ((3, 4, 4, 4, 4), (4, 4, 8, 6, 4))
    assert mpo.factorization(3072, 768, 5, overrides={}) == ((4, 4, 8, 6, 4), (3, 4, 4, 4, 4))
    # override with the wrong number of factors, or that does not multiply out
    with pytest.raises(ValueError, match="3072x768"):
        mpo.factorization(3072, 768, 3, overrides=override)
    with pytest.raises(ValueError):
        mpo.factorization(3072, 768, 3, overrides={"3072x768": [[16, 12, 16], [8, 12]]})
    with pytest.raises(ValueError, match="3072 x 768"):
        mpo.factorization(3072, 768, 3, overrides={"3072x768": [[16, 12, 16], [8, 12, 4]]})
    # unconfigured shapes: automatic
    assert mpo.factorization(512, 128, 5) == (mpo.factor_dimension(512, 5), mpo.factor_dimension(128, 5))


def _assert_central_peak(factors, n: int, m: int) -> None:
    assert len(factors) == m
    assert all(isinstance(f, int) and f >= 1 for f in factors)
    assert math.prod(factors) == n
    centre = m // 2
    assert factors[centre] == max(factors)
    # sizes grow towards the centre from both ends
    assert all(factors[k] <= factors[k + 1] for k in range(centre))
    assert all(factors[k] >= factors[k + 1] for k in range(centre, m - 1))


@pytest.mark.parametrize(
    "n, m, sorted_factors",
    [
        (3072, 5, [4, 4, 4, 6, 8]),
        (768, 5, [3, 4, 4, 4, 4]),
        (4096, 5, [4, 4, 4, 8, 8]),
        (1024, 5, [4, 4, 4, 4, 4]),
        (3072, 3, [12, 16, 16]),
        (4096, 7, [2, 2, 4, 4, 4, 4, 4]),
        (512, 5, [2, 4, 4, 4, 4]),
        (128, 7, [2, 2, 2, 2, 2, 2, 2]),
        (64, 9, [1, 1, 1, 2, 2, 2, 2, 2, 2]),
        (1, 3, [1, 1, 1]),
        (13, 3, [1, 1, 13]),
        (2 * 3 * 5 * 7, 5, [1, 2, 3, 5, 7]),
        (97 * 4, 3, [2, 2, 97]),
        (768, 1, [768]),
    ],
)
def test_factor_dimension(n, m, sorted_factors):
    factors = mpo.factor_dimension(n, m)
    _assert_central_peak(factors, n, m)
    assert sorted(factors) == sorted_factors


@pytest.mark.parametrize("n", [768, 1024, 3072, 4096, 512, 6 * 5 * 7, 1000])
@pytest.mark.parametrize("m", [3, 5, 7, 9])
def test_factor_dimension_properties(n, m):
    _assert_central_peak(mpo.factor_dimension(n, m), n, m)


def test_factor_dimension_rejects_non_positive():
    for n, m in [(0, 3), (-5, 3), (12, 0)]:
        with pytest.raises(ValueError):
            mpo.factor_dimension(n, m)


@pytest.mark.parametrize("m", [5, 7])
def test_automatic_factorization_decomposes_exactly(m):
    rows, cols = 512, 128
    assert (rows, cols) not in mpo.KNOWN_FACTORIZATIONS
    row_shape, col_shape = mpo.factorization(rows, cols, m)
    _assert_central_peak(row_shape, rows, m)
    _assert_central_peak(col_shape, cols, m)
    matrix = _randn(rows, cols, seed=m)
    decomposition = mpo.decompose(matrix, row_shape, col_shape)
    assert decomposition.bond_dims == _untruncated_bonds(row_shape, col_shape)
    assert (decomposition.to_matrix() - matrix).abs().max().item() <= 1e-12
    _assert_gauge(decomposition, torch.linalg.norm(matrix).item(), 1e-12)


@pytest.mark.parametrize("shape", sorted(mpo.KNOWN_FACTORIZATIONS))
@pytest.mark.parametrize("m", [3, 5, 7, 9])
@pytest.mark.parametrize("transpose", [False, True])
def test_contraction_macs_counts_what_contract_does(shape, m, transpose):
    """The analytic cost (layer benchmark, GPU-hour estimate) equals the matmul FLOPs torch counts in `contract`."""
    from torch.utils.flop_counter import FlopCounterMode

    rows, cols = mpo.KNOWN_FACTORIZATIONS[shape][m]
    if transpose:
        rows, cols = cols, rows
    shapes = mpo.tensor_shapes(rows, cols)
    centre = len(shapes) // 2
    tensors = [torch.empty(s if k == centre else (8, *s), device="meta") for k, s in enumerate(shapes)]
    with FlopCounterMode(display=False) as counter:
        mpo.contract(tensors, rows, cols)
    assert counter.get_total_flops() == 2 * 8 * mpo.contraction_macs(rows, cols)


@pytest.mark.parametrize("reverse", [False, True], ids=["bonds-36-12", "bonds-12-36"])
@pytest.mark.parametrize("central", ["shared", "per-expert", "frozen"])
def test_contract_gradients_equal_an_einsum_chain(reverse, central):
    """The regrouped, batched contraction and its backward against one einsum: shared, per-expert and frozen
    (shared, without gradient) centrals; the factors reversed swap the bonds around the centre, so that a frozen
    central is brought in from the left in one case and from the right in the other."""
    g = torch.Generator().manual_seed(0)
    rows, cols = (2, 3, 2, 2, 3), (3, 2, 2, 1, 2)
    if reverse:
        rows, cols = rows[::-1], cols[::-1]
    shapes = mpo.tensor_shapes(rows, cols)
    tensors = [
        torch.randn(s if (k == 2 and central != "per-expert") else (3, *s), generator=g, dtype=torch.float64)
        for k, s in enumerate(shapes)
    ]
    for k, t in enumerate(tensors):
        t.requires_grad_(k != 2 or central != "frozen")
    got = mpo.contract(tensors, rows, cols)
    expanded = [t if t.dim() == 5 else t.expand(3, *t.shape) for t in tensors]
    full = torch.einsum("eaibB,eBjcC,eCkdD,eDlfF,eFmgG->eijklmbcdfg", *[t for t in expanded])
    want = full.reshape(3, math.prod(rows), math.prod(cols))
    torch.testing.assert_close(got, want)
    probe = torch.randn(want.shape, generator=g, dtype=torch.float64)
    trainable = [t for t in tensors if t.requires_grad]
    for a, b in zip(
        torch.autograd.grad((got * probe).sum(), trainable), torch.autograd.grad((want * probe).sum(), trainable)
    ):
        torch.testing.assert_close(a, b)


def contraction_flops(rows, cols, central_grad: bool, experts: int = 8) -> int:
    """FLOPs torch counts in `contract` forward + backward over an expert stack with a shared central (meta)."""
    from torch.utils.flop_counter import FlopCounterMode

    shapes = mpo.tensor_shapes(rows, cols)
    centre = len(shapes) // 2
    tensors = [
        torch.empty(s if k == centre else (experts, *s), device="meta", requires_grad=k != centre or central_grad)
        for k, s in enumerate(shapes)
    ]
    with FlopCounterMode(display=False) as counter:
        mpo.contract(tensors, rows, cols).sum().backward()
    return counter.get_total_flops()


def test_a_frozen_central_is_brought_in_from_the_side_cheapest_for_backward():
    """On a masked step the centrals take no gradient, so the backward skips one of its products; the order is chosen
    for forward + backward. T5-base's (3072, 768) at m = 5: bonds 192 and 384 around the centre, so either order costs
    |W| (192 + 384) multiply-adds forward and |W| (2 x 192 + 2 x 384) backward; with the central frozen the backward
    costs |W| (2 x 384 + 192) from the left and |W| (2 x 192 + 384) from the right."""
    rows, cols = mpo.KNOWN_FACTORIZATIONS[(3072, 768)][5]
    assert mpo.bond_dims(rows, cols)[2:4] == [192, 384]
    ratio = contraction_flops(rows, cols, central_grad=False) / contraction_flops(rows, cols, central_grad=True)
    assert ratio == pytest.approx((576 + 768) / (3 * 576), rel=0.01)
