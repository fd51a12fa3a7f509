import math

import pytest
import torch

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import ConfigError
from simpletuner.train.schedules import build_lr_scheduler, sine_factor


def _cfg(**options) -> TrainingConfig:
    return TrainingConfig(model_family="sd1x", pretrained_model_name_or_path="unused", learning_rate=1.0, **options)


def _lrs(cfg: TrainingConfig, total: int, steps_per_update: int = 1) -> list[float]:
    """The learning rate used by each of `total` updates."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    scheduler = build_lr_scheduler(optimizer, cfg, total, steps_per_update)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for _ in range(steps_per_update):
            scheduler.step()
    return rates


def test_constant_is_flat():
    assert _lrs(_cfg(lr_scheduler="constant"), 5) == [1.0] * 5


def test_constant_honours_warmup():
    assert _lrs(_cfg(lr_scheduler="constant", lr_warmup_steps=4), 6) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_constant_with_warmup():
    assert _lrs(_cfg(lr_scheduler="constant_with_warmup", lr_warmup_steps=2), 4) == [0.0, 0.5, 1.0, 1.0]


def test_linear_warms_up_then_decays_to_zero():
    rates = _lrs(_cfg(lr_scheduler="linear", lr_warmup_steps=2), 10)
    assert rates[:3] == [0.0, 0.5, 1.0]
    assert rates[6] == pytest.approx(0.5)  # halfway through the 8 decay steps
    assert rates[9] == pytest.approx(1 / 8)


def test_cosine_is_half_a_wave():
    rates = _lrs(_cfg(lr_scheduler="cosine", lr_warmup_steps=2), 12)
    assert rates[2] == pytest.approx(1.0)
    assert rates[7] == pytest.approx(0.5)  # halfway through the 10 decay steps
    assert rates[11] == pytest.approx((1 + math.cos(math.pi * 0.9)) / 2)


def test_cosine_with_restarts_restarts():
    rates = _lrs(_cfg(lr_scheduler="cosine_with_restarts", lr_num_cycles=2), 8)
    assert rates[0] == pytest.approx(1.0)
    assert rates[2] == pytest.approx(0.5)
    assert rates[4] == pytest.approx(1.0)  # second cycle starts from the peak
    assert rates[6] == pytest.approx(0.5)


def test_polynomial_uses_power():
    rates = _lrs(_cfg(lr_scheduler="polynomial", lr_power=2.0, lr_warmup_steps=1), 5)
    assert rates[0] == 0.0
    # remaining fraction 3/4 after one decay step, squared (lr_end is 1e-7)
    assert rates[2] == pytest.approx((1 - 1e-7) * (3 / 4) ** 2 + 1e-7)


def test_sine_swings_between_peak_and_half():
    cfg = _cfg(lr_scheduler="sine", lr_warmup_steps=2, lr_num_cycles=2)
    rates = _lrs(cfg, 10)
    assert rates[:3] == [0.0, 0.5, 1.0]
    assert rates[4] == pytest.approx(0.5)  # trough a quarter of the way through 8 steps x 2 cycles
    assert rates[6] == pytest.approx(1.0)  # crest again
    assert all(0.5 - 1e-9 <= r <= 1.0 for r in rates[2:])


def test_sine_factor_is_pure_and_bounded():
    values = [sine_factor(s, warmup_steps=10, total_steps=110, num_cycles=3) for s in range(200)]
    assert values == [sine_factor(s, warmup_steps=10, total_steps=110, num_cycles=3) for s in range(200)]
    assert values[5] == 0.5
    assert min(values[10:]) >= 0.5 and max(values) <= 1.0


def test_steps_per_update_stretches_the_schedule():
    single = _lrs(_cfg(lr_scheduler="linear", lr_warmup_steps=2), 6)
    stepped_twice = _lrs(_cfg(lr_scheduler="linear", lr_warmup_steps=2), 6, steps_per_update=2)
    assert stepped_twice == pytest.approx(single)


def test_schedulefree_gets_a_constant_schedule():
    cfg = _cfg(lr_scheduler="cosine", lr_warmup_steps=3, optimizer="adamw_schedulefree")
    assert _lrs(cfg, 5) == [1.0] * 5


def test_no_steps_is_an_error():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="total_steps=0"):
        build_lr_scheduler(optimizer, _cfg(), 0)


def test_scheduler_state_round_trips():
    cfg = _cfg(lr_scheduler="sine", lr_warmup_steps=3)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, cfg, 20)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fresh = build_lr_scheduler(fresh_optimizer, cfg, 20)
    fresh.load_state_dict(state)
    optimizer.step(), scheduler.step(), fresh_optimizer.step(), fresh.step()
    assert fresh.get_last_lr() == scheduler.get_last_lr()
