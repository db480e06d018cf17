import pytest
import torch

from dit_sparse.distill import sigmas as S


def test_velocity_clean_sample_and_noise_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 3, 2, 4, 4, generator=g), torch.randn(3, 3, 2, 4, 4, generator=g)
    for sigma in (1.0, 0.75, 0.3, 1e-3, torch.tensor([0.9, 0.5, 0.01])):
        x = S.add_noise(x0, eps, sigma)
        v = S.velocity(x0, eps)
        x0_back, eps_back = S.pred_x0_eps(v, x, sigma)
        torch.testing.assert_close(x0_back, x0, atol=1e-5, rtol=0)
        torch.testing.assert_close(eps_back, eps, atol=1e-5, rtol=0)
        torch.testing.assert_close(S.x0_from(v, x, sigma), x0, atol=1e-5, rtol=0)
        # the velocity that maps x back to x0 is v itself; adding noise to the predictions gives x back
        if not (isinstance(sigma, float) and sigma < 0.01):
            torch.testing.assert_close(S.velocity_target(x, x0, sigma), v, atol=2e-4, rtol=0)
        torch.testing.assert_close(S.add_noise(x0_back, eps_back, sigma), x, atol=1e-5, rtol=0)
    # the deterministic re-noise (eta = 1) is exactly the Euler step x + (s' - s) v
    x = S.add_noise(x0, eps, 0.75)
    torch.testing.assert_close(S.renoise(x0, eps, 0.5, 1.0), x + (0.5 - 0.75) * S.velocity(x0, eps), atol=1e-5, rtol=0)


def test_renoise_and_diffuse_keep_mean_and_std():
    g = torch.Generator().manual_seed(1)
    n = 400_000
    x0 = torch.full((n, 1), 0.8)
    # fresh-noise re-noise (eta = 0) to level s: mean (1 - s) x0, std s
    z = torch.randn(n, 1, generator=g)
    x = S.renoise(x0, torch.zeros_like(x0), 0.4, 0.0, z)
    assert abs(float(x.mean()) - 0.6 * 0.8) < 4e-3 and abs(float(x.std()) - 0.4) < 4e-3
    # partial eta: the noise part keeps unit variance
    eps = torch.randn(n, 1, generator=g)
    x = S.renoise(x0, eps, 0.4, 0.6, torch.randn(n, 1, generator=g))
    assert abs(float(x.mean()) - 0.48) < 4e-3 and abs(float(x.std()) - 0.4) < 4e-3
    # diffuse from s_mid to t: mean (1 - t) x0 and std t, as if x0 had been noised to t directly
    for s_mid, t in ((0.25, 0.5), (0.0, 0.3), (0.5, 0.5), (0.5, 0.99)):
        x_mid = S.add_noise(x0, torch.randn(n, 1, generator=g), s_mid)
        x_t = S.diffuse(x_mid, s_mid, t, torch.randn(n, 1, generator=g))
        assert abs(float(x_t.mean()) - (1 - t) * 0.8) < 5e-3, (s_mid, t)
        assert abs(float(x_t.std()) - t) < 5e-3, (s_mid, t)
    # per-sample t (B,) broadcasts over the sample dimensions
    t = torch.tensor([0.3, 0.6])
    out = S.diffuse(torch.zeros(2, 3, 1, 2, 2), 0.2, t, torch.ones(2, 3, 1, 2, 2))
    r = (1 - t) / 0.8
    expected = (t ** 2 - (r * 0.2) ** 2).sqrt()
    torch.testing.assert_close(out[:, 0, 0, 0, 0], expected)


def test_sampled_t_stays_inside_its_interval():
    g = torch.Generator().manual_seed(2)
    u = torch.rand(100_000, generator=g)
    u[:2] = torch.tensor([0.0, 1.0 - 2 ** -24])
    grid = S.sigma_grid(4, 1.0, 0.25).tolist()
    for k in range(4):
        lo, hi = grid[k + 1], grid[k]
        t = S.sample_in_interval(lo, hi, u, min_sigma=1e-3)
        assert float(t.min()) >= max(lo, 1e-3) and float(t.max()) <= hi
        assert float(t.max()) > hi - 1e-3 * (hi - lo) - 1e-6  # the whole interval is covered
    assert float(S.sample_in_interval(0.0, 0.25, u, min_sigma=0.0).min()) == 0.0


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_sigma_at_step_boundaries_equals_direct_formula_and_the_scheduler(steps, shift):
    for terminal in {None, S.default_terminal(steps), 0.1 if steps > 1 else None}:
        grid = S.sigma_grid(steps, shift, terminal)
        assert grid.dtype == torch.float32 and grid.shape == (steps + 1,)
        assert float(grid[0]) == 1.0 and float(grid[-1]) == 0.0
        assert bool((grid[1:] < grid[:-1]).all())
        direct = torch.tensor(S.closed_form_grid(steps, shift, terminal), dtype=torch.float64)
        assert float((grid.double() - direct).abs().max()) < 1e-6
        scheduler = S.make_scheduler(steps, shift, terminal)
        assert torch.equal(scheduler.sigmas, grid)  # bit for bit: the sampler visits the training levels
        assert torch.equal(scheduler.timesteps, S.timestep(grid[:-1]))
        S.check_scheduler(scheduler, steps, grid)


def test_default_grid_is_evenly_spaced_at_shift_one():
    assert S.sigma_grid(4, 1.0, S.default_terminal(4)).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert S.sigma_grid(2, 1.0, S.default_terminal(2)).tolist() == [1.0, 0.5, 0.0]
    # the stock ramp would spend the last step at the smallest training sigma
    assert abs(S.sigma_grid(4, 1.0, None)[3].item() - 0.001) < 1e-6


def test_timestep_is_1000_sigma_in_float32():
    t = S.timestep(torch.tensor([0.75, 0.123456789]), device="cpu")
    assert t.dtype == torch.float32
    assert torch.equal(t, torch.tensor([0.75, 0.123456789], dtype=torch.float32) * 1000)
    assert S.timestep(0.5, batch=3).shape == (3,)


def test_bad_grids_are_refused():
    with pytest.raises(ValueError):
        S.sigma_grid(0)
    with pytest.raises(ValueError):
        S.sigma_grid(4, 1.0, 1.5)
    with pytest.raises(ValueError):
        S.sigma_grid(1, 1.0, 0.5)
    with pytest.raises(ValueError):
        S.check_scheduler(S.make_scheduler(4, 1.0, None), 4, S.sigma_grid(4, 1.0, 0.25))
