"""Prediction types (epsilon, v_prediction): our DDIM step and inversion step agree with diffusers' schedulers on
the same model output; "sample" is refused with a clear error; the epsilon path is the old arithmetic bit for bit."""
import pytest
import torch
from diffusers import DDIMInverseScheduler

from dragdiffusion.backbone import make_ddim_scheduler
from dragdiffusion.ddim import ddim_denoise, ddim_inversion_step, ddim_step, inversion_timesteps
from dragdiffusion.errors import ConfigError

TYPES = ["epsilon", "v_prediction"]


def _sched(prediction_type):
    s = make_ddim_scheduler({"prediction_type": prediction_type})
    s.set_timesteps(50)
    return s


def _randn(seed, shape=(1, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction_type", TYPES)
@pytest.mark.parametrize("t", [681, 21, 1])
def test_ddim_step_matches_diffusers(prediction_type, t):
    s = _sched(prediction_type)
    z, out = _randn(0), _randn(1)
    ref = s.step(out, t, z, eta=0.0).prev_sample
    assert torch.allclose(ddim_step(s, out, t, z), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", TYPES)
@pytest.mark.parametrize("t_next", [681, 21, 1])
def test_ddim_inversion_step_matches_diffusers_inverse_scheduler(prediction_type, t_next):
    s = _sched(prediction_type)
    inv = DDIMInverseScheduler.from_config(s.config)
    inv.set_timesteps(50)
    z, out = _randn(2), _randn(3)
    ref = inv.step(out, t_next, z).prev_sample  # the model output evaluated at t_next, as we do
    assert torch.allclose(ddim_inversion_step(s, out, t_next, z), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", TYPES)
def test_denoise_loop_matches_diffusers_loop(prediction_type):
    s = _sched(prediction_type)
    _, den = inversion_timesteps(s, 50, 0.7)
    den = den[:5]
    outputs = {t: _randn(100 + t) for t in den}
    fn = lambda z, t, c: outputs[int(t)]
    z = _randn(4)
    ours = ddim_denoise(fn, s, z, torch.zeros(1, 77, 8), den)
    ref = z
    for t in den:
        ref = s.step(outputs[t], t, ref, eta=0.0).prev_sample
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_v_prediction_denoising_is_exact_for_an_exact_model():
    """A v model that is exact for one (x0, eps) pair: denoising its z_681 lands on its latent at the end."""
    s = _sched("v_prediction")
    _, den = inversion_timesteps(s, 50, 0.7)
    x0, noise = _randn(5), _randn(6)
    a = s.alphas_cumprod

    def fn(z, t, c):  # the v of the trajectory z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
        return a[int(t)].sqrt() * noise - (1 - a[int(t)]).sqrt() * x0

    zt = a[681].sqrt() * x0 + (1 - a[681]).sqrt() * noise
    z_end = a[0].sqrt() * x0 + (1 - a[0]).sqrt() * noise  # the final alpha (set_alpha_to_one false)
    assert torch.allclose(ddim_denoise(fn, s, zt, torch.zeros(1, 77, 8), den), z_end, atol=1e-4)


def test_sample_prediction_is_refused_with_a_clear_error():
    s = make_ddim_scheduler()
    s.register_to_config(prediction_type="sample")
    s.set_timesteps(50)
    with pytest.raises(ConfigError, match=r"scheduler\.prediction_type.*'sample'.*epsilon.*v_prediction"):
        ddim_step(s, _randn(1), 681, _randn(0))
    with pytest.raises(ConfigError, match=r"scheduler\.prediction_type"):
        ddim_inversion_step(s, _randn(1), 681, _randn(0))


def test_epsilon_path_is_the_old_arithmetic_bit_for_bit():
    s = _sched("epsilon")
    z, eps = _randn(7), _randn(8)
    for t in (681, 1):
        a_t = s.alphas_cumprod[t].to(z)
        a_prev = (s.alphas_cumprod[t - 20] if t - 20 >= 0 else s.final_alpha_cumprod).to(z)
        x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        assert torch.equal(ddim_step(s, eps, t, z), a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps)
        t_cur = t - 20
        a_cur = (s.alphas_cumprod[t_cur] if t_cur >= 0 else s.final_alpha_cumprod).to(z)
        a_next = s.alphas_cumprod[t].to(z)
        x0 = (z - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        assert torch.equal(ddim_inversion_step(s, eps, t, z), a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps)
