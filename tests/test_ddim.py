"""DDIM timesteps, step and inversion with the reference's scheduler settings."""
import torch

from dragdiffusion.backbone import make_ddim_scheduler
from dragdiffusion.ddim import alpha_bar, ddim_denoise, ddim_invert, ddim_inversion_step, ddim_step, inversion_timesteps


def test_reference_timesteps_and_t_start():
    s = make_ddim_scheduler()
    inv, den = inversion_timesteps(s, 50, 0.7)
    assert [int(t) for t in s.timesteps[:2]] == [981, 961] and int(s.timesteps[-1]) == 1
    assert len(inv) == 35 and inv[0] == 1 and inv[-1] == 681
    assert den == list(reversed(inv)) and den[0] == 681


def test_scheduler_settings_are_the_reference():
    c = make_ddim_scheduler({"beta_start": 0.5, "prediction_type": "v_prediction"}).config
    assert (c.beta_start, c.beta_end, c.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert c.clip_sample is False and c.set_alpha_to_one is False and c.steps_offset == 1
    assert c.prediction_type == "v_prediction"


def test_final_alpha_is_alphas_cumprod_0():
    s = make_ddim_scheduler()
    s.set_timesteps(50)
    assert torch.equal(alpha_bar(s, -19), s.alphas_cumprod[0])


def test_inversion_step_and_ddim_step_are_inverse_for_fixed_eps():
    s = make_ddim_scheduler()
    s.set_timesteps(50)
    z = torch.randn(1, 4, 8, 8)
    eps = torch.randn(1, 4, 8, 8)
    up = ddim_inversion_step(s, eps, 681, z)  # 661 -> 681
    down = ddim_step(s, eps, 681, up)  # 681 -> 661
    assert torch.allclose(down, z, atol=1e-5)


def test_invert_then_denoise_roundtrip_with_an_eps_that_ignores_z():
    s = make_ddim_scheduler()
    inv, den = inversion_timesteps(s, 50, 0.7)
    eps_field = {t: torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(t)) for t in inv}
    fn = lambda z, t, c: eps_field[int(t)]
    z0 = torch.randn(1, 4, 8, 8)
    zt = ddim_invert(fn, s, z0, torch.zeros(1, 77, 8), inv)
    assert not torch.allclose(zt, z0)
    back = ddim_denoise(fn, s, zt, torch.zeros(1, 77, 8), den)
    # the reference inversion evaluates eps at the next timestep: with z-independent eps it is exact
    assert torch.allclose(back, z0, atol=1e-4)
