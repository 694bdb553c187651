"""The weight update (``eamet.edit.solve``, algorithm.md §6): U = K (λC + KᵀK)⁻¹ by Cholesky and by explicit
inverse against numpy, the normal equations it satisfies, the λ = 0 failure, and W ← W + Δ for both weight
layouts with a single rounding to the weight's dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eamet.base.errors import SolveError
from eamet.edit.solve import LayerUpdate, apply_update, solve_layer


def _problem(n: int, d_ff: int, seed: int, samples: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """A moment C = XᵀX / m (SPD for m > d_ff) and N keys, float64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, d_ff)) * rng.uniform(0.2, 3.0, d_ff)
    keys = rng.standard_normal((n, d_ff))
    return torch.from_numpy(x.T @ x / samples), torch.from_numpy(keys)


def _numpy_oracle(moment: torch.Tensor, keys: torch.Tensor, lam: float) -> np.ndarray:
    c, k = moment.numpy(), keys.numpy()
    a = lam * c + k.T @ k
    # U A = K  <=>  A Uᵀ = Kᵀ (A symmetric).
    return np.asarray(np.linalg.solve(a, k.T).T)


@pytest.mark.parametrize(("n", "d_ff", "lam"), [(5, 24, 1.0), (30, 24, 15000.0), (1, 8, 0.5), (40, 16, 0.0)])
def test_solvers_agree_with_numpy(n: int, d_ff: int, lam: float) -> None:
    moment, keys = _problem(n, d_ff, seed=n * 100 + d_ff)
    chol = solve_layer(moment, keys, lam, solver="cholesky")
    inv = solve_layer(moment, keys, lam, solver="inverse")
    assert chol.dtype == inv.dtype == torch.float64 and chol.shape == (n, d_ff)
    oracle = _numpy_oracle(moment, keys, lam)
    np.testing.assert_allclose(chol.numpy(), oracle, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(inv.numpy(), oracle, rtol=1e-8, atol=1e-11)
    # lstsq on the same system (a different algorithm: SVD-based).
    a = (lam * moment + keys.T @ keys).numpy()
    lstsq = np.linalg.lstsq(a, keys.numpy().T, rcond=None)[0].T
    np.testing.assert_allclose(chol.numpy(), lstsq, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("solver", ["cholesky", "inverse"])
def test_solution_satisfies_normal_equations(solver: str) -> None:
    moment, keys = _problem(12, 20, seed=3)
    lam = 2.5
    u = solve_layer(moment, keys, lam, solver=solver)
    lhs = u @ (lam * moment + keys.T @ keys)
    torch.testing.assert_close(lhs, keys, rtol=1e-10, atol=1e-10)


def test_float32_inputs_are_solved_in_float64() -> None:
    moment, keys = _problem(6, 16, seed=4)
    u32 = solve_layer(moment.float(), keys.float(), 3.0)
    assert u32.dtype == torch.float64
    u64 = solve_layer(moment.float().double(), keys.float().double(), 3.0)
    torch.testing.assert_close(u32, u64, rtol=0, atol=0)


def test_singular_system_raises_solve_error() -> None:
    # λ = 0 and N < d_ff: KᵀK has rank N < d_ff, so λC + KᵀK is singular.
    moment, keys = _problem(4, 16, seed=5)
    with pytest.raises(SolveError, match="not positive definite") as info:
        solve_layer(moment, keys, 0.0, layer=7)
    assert info.value.argument == "mom2_update_weight"
    assert "layer 7" in str(info.value)
    assert isinstance(info.value, ArithmeticError)
    # Any λ > 0 with an SPD moment is fine.
    solve_layer(moment, keys, 1e-3)


def test_singular_moment_is_rescued_by_keys_only_when_they_span() -> None:
    # A rank-deficient moment (fewer samples than d_ff) and λ > 0: singular unless the keys fill the gap.
    moment, keys = _problem(3, 16, seed=6, samples=8)
    with pytest.raises(SolveError):
        solve_layer(moment, keys, 1.0)
    moment, keys = _problem(10, 16, seed=6, samples=8)
    u = solve_layer(moment, keys, 1.0)
    torch.testing.assert_close(u @ (moment + keys.T @ keys), keys, rtol=1e-8, atol=1e-8)


def _update(n: int, d: int, d_ff: int, seed: int) -> LayerUpdate:
    g = torch.Generator().manual_seed(seed)
    return LayerUpdate(
        layer=2,
        path="model.layers.2.mlp.down_proj",
        shares=torch.randn(n, d, generator=g),
        solved_keys=torch.randn(n, d_ff, generator=g) * 0.01,
    )


def test_delta_is_residuals_transposed_times_solved_keys() -> None:
    update = _update(5, 6, 10, seed=7)
    delta = update.weight_change()
    assert delta.dtype == torch.float64 and delta.shape == (6, 10)
    expected = update.shares.double().numpy().T @ update.solved_keys.double().numpy()
    np.testing.assert_allclose(delta.numpy(), expected, rtol=1e-12, atol=1e-15)
    # Δ = Σ_i r_i u_iᵀ: a sum of outer products.
    outer = sum(
        torch.outer(r.double(), u.double()) for r, u in zip(update.shares, update.solved_keys, strict=True)
    )
    torch.testing.assert_close(delta, outer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_apply_update_adds_delta_once_rounded(layout: str, dtype: torch.dtype) -> None:
    d, d_ff = 6, 10
    update = _update(4, d, d_ff, seed=8)
    shape = (d, d_ff) if layout == "out_in" else (d_ff, d)
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    before = weight.clone()
    storage = weight.data_ptr()
    apply_update(weight, update, layout)
    delta = update.weight_change() if layout == "out_in" else update.weight_change().T
    expected = (before.double() + delta).to(dtype)
    assert weight.dtype == dtype and weight.data_ptr() == storage  # in place
    assert torch.equal(weight, expected)
    if dtype == torch.bfloat16:
        # Rounding twice (Δ to bf16 first, then the sum) differs somewhere: the single rounding is visible.
        twice = before + delta.to(dtype)
        assert not torch.equal(twice, expected)


def test_apply_update_works_on_a_parameter_under_grad_mode() -> None:
    update = _update(3, 4, 8, seed=10)
    layer = torch.nn.Linear(8, 4, bias=False)
    before = layer.weight.detach().clone()
    apply_update(layer.weight, update, "out_in")
    assert torch.equal(layer.weight.detach(), (before.double() + update.weight_change()).float())
    assert layer.weight.requires_grad and layer.weight.grad_fn is None


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_apply_update_shape_mismatch(layout: str) -> None:
    update = _update(3, 4, 8, seed=11)
    wrong = torch.zeros(4, 8) if layout == "in_out" else torch.zeros(8, 4)
    before = wrong.clone()
    with pytest.raises(SolveError, match="does not fit weight"):
        apply_update(wrong, update, layout)
    assert torch.equal(wrong, before)


def test_apply_then_subtract_restores_float32_weights_closely() -> None:
    update = _update(3, 4, 8, seed=12)
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(13))
    before = weight.clone()
    apply_update(weight, update, "out_in")
    negated = LayerUpdate(update.layer, update.path, -update.shares, update.solved_keys)
    apply_update(weight, negated, "out_in")
    torch.testing.assert_close(weight, before, rtol=0, atol=1e-6)


def test_measure_fit() -> None:
    moment, keys = _problem(5, 12, seed=14)
    rng = np.random.default_rng(15)
    residuals = torch.from_numpy(rng.standard_normal((5, 4)))
    for lam, small in [(1e-9, True), (1e3, False)]:
        u = solve_layer(moment, keys, lam)
        update = LayerUpdate(0, "w", residuals.float(), u.float())
        update.measure_fit(keys.float())
        moved = keys @ update.weight_change().T
        expected = (moved - residuals.float().double()).norm(dim=1) / residuals.float().double().norm(dim=1)
        assert update.fit_error.dtype == torch.float32 and update.fit_error.shape == (5,)
        torch.testing.assert_close(update.fit_error, expected.float(), rtol=1e-5, atol=1e-6)
        # λ → 0 with N < d_ff: the keys are mapped onto their residuals exactly (up to float32 storage).
        assert (update.fit_error.max() < 1e-4) == small


def test_old_names_of_shares_and_weight_change_still_work_and_warn() -> None:
    update = _update(3, 4, 5, seed=11)
    with pytest.warns(DeprecationWarning, match="shares"):
        assert update.residuals is update.shares
    with pytest.warns(DeprecationWarning, match="weight_change"):
        assert torch.equal(update.delta(), update.weight_change())
