import pytest
import torch

from lightning_mp.scaler import LossScaleError, LossScaler


def test_defaults_match_the_issue():
    s = LossScaler()
    assert (s.scale, s.growth_factor, s.backoff_factor) == (2.0**16, 2.0, 0.5)
    assert (s.growth_interval, s.hysteresis, s.min_scale) == (2000, 2, 1.0)


def test_hysteresis_delays_backoff_and_growth_refills_it():
    s = LossScaler(1024.0, growth_interval=3, hysteresis=2)
    s.update(found_inf=True)  # first overflow spends hysteresis, no back-off
    assert s.scale == 1024.0 and s.hysteresis_tracker == 1
    s.update(found_inf=True)  # hysteresis spent: back off
    assert s.scale == 512.0
    s.update(found_inf=True)  # stays spent until growth: every overflow backs off now
    assert s.scale == 256.0
    for _ in range(2):
        s.update(found_inf=False)
    assert s.scale == 256.0 and s.growth_tracker == 2
    s.update(found_inf=False)  # third clean step in a row: grow, refill hysteresis
    assert s.scale == 512.0 and s.growth_tracker == 0 and s.hysteresis_tracker == 2


def test_overflow_resets_growth_tracker():
    s = LossScaler(8.0, growth_interval=2, hysteresis=5)
    s.update(False)
    s.update(True)
    s.update(False)
    assert s.scale == 8.0  # the overflow broke the run of clean steps
    s.update(False)
    assert s.scale == 16.0


def test_backoff_clamps_at_min_scale_then_raises():
    s = LossScaler(4.0, hysteresis=1, min_scale=2.0)
    s.update(True)
    assert s.scale == 2.0
    with pytest.raises(LossScaleError, match="minimum loss scale"):
        s.update(True)


def test_static_scale_never_changes():
    s = LossScaler(128.0, dynamic=False)
    for found_inf in (True, False, True):
        s.update(found_inf)
    assert s.scale == 128.0


def test_scale_and_inv_scale():
    s = LossScaler(2.0**16)
    assert s.scale_loss(torch.tensor(3.0)).item() == 3.0 * 2**16
    assert s.inv_scale(torch.device("cpu")).item() == 2.0**-16


def test_state_dict_round_trip_keeps_hysteresis():
    a = LossScaler(1024.0, growth_interval=10, hysteresis=3)
    a.update(True)
    a.update(False)
    b = LossScaler(1024.0, growth_interval=10, hysteresis=3)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == {"scale": 1024.0, "growth_tracker": 1, "hysteresis_tracker": 2} == a.state_dict()


@pytest.mark.parametrize(
    "kwargs",
    [dict(growth_factor=1.0), dict(backoff_factor=1.0), dict(growth_interval=0), dict(hysteresis=0), dict(min_scale=0)],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        LossScaler(**kwargs)


@pytest.mark.parametrize("growth_interval, hysteresis, backoff", [(1, 1, 0.5), (3, 2, 0.5), (2, 3, 0.25)])
def test_the_device_policy_follows_the_host_policy_step_for_step(growth_interval, hysteresis, backoff):
    """Sync-free steps advance the policy on the device from the flag alone; the host's floats,
    advanced when the flag is read, agree after every step (growths, hysteresis, back-offs, the floor)."""
    g = torch.Generator().manual_seed(growth_interval + hysteresis)
    flags = (torch.rand(200, generator=g) < 0.3).tolist()
    host = LossScaler(2.0**6, growth_interval=growth_interval, hysteresis=hysteresis, backoff_factor=backoff,
                      min_scale=1.0)
    device = LossScaler(2.0**6, growth_interval=growth_interval, hysteresis=hysteresis, backoff_factor=backoff,
                        min_scale=1.0)
    for flag in flags:
        device.advance_on_device(torch.tensor(float(flag)))
        try:
            host.update(flag)
        except LossScaleError:  # the host raises at the floor; the device stays there
            assert float(device.current()) == host.min_scale
            return
        assert float(device.current()) == host.scale  # trackers included: a wrong one shows in a later scale
        assert device.scale_loss(torch.tensor(3.0)).item() == host.scale_loss(torch.tensor(3.0)).item()
        assert torch.equal(device.inv_scale(torch.device("cpu")), host.inv_scale(torch.device("cpu")))
