import pytest
import torch
from torch import nn

from simpletuner.train.ema import EMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _nudge(model: nn.Module, amount: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)


def test_average_moves_towards_the_weights_by_one_minus_decay():
    model = _model()
    start = model.weight.detach().clone()
    ema = EMA(model.parameters(), decay=0.75)
    _nudge(model, 1.0)
    assert ema.update(step=1)
    with ema.applied():
        torch.testing.assert_close(model.weight, start + 0.25)
    torch.testing.assert_close(model.weight, start + 1.0)  # restored after the block
    _nudge(model, 1.0)
    ema.update(step=2)
    ema.copy_to()
    torch.testing.assert_close(model.weight, start + 0.25 * 0.75 + 2.0 * 0.25)


def test_updates_only_every_n_steps():
    model = _model()
    ema = EMA(model.parameters(), decay=0.9, update_every=3)
    before = [t.clone() for t in ema.shadow]
    _nudge(model, 1.0)
    assert [ema.update(s) for s in (1, 2)] == [False, False]
    assert all(torch.equal(a, b) for a, b in zip(before, ema.shadow))
    assert ema.update(3)
    assert not torch.equal(before[0], ema.shadow[0])


def test_average_is_float32_on_its_own_device_and_copies_back_in_the_weights_dtype():
    model = _model().to(torch.bfloat16)
    ema = EMA(model.parameters(), decay=0.5, device="cpu")
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in ema.shadow)
    ema.copy_to()
    assert model.weight.dtype == torch.bfloat16


def test_frozen_parameters_are_not_followed():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    assert len(EMA(model.parameters(), decay=0.9).parameters) == 2


def test_state_round_trips_into_a_fresh_average():
    model = _model()
    ema = EMA(model.parameters(), decay=0.9)
    for step in range(1, 5):
        _nudge(model, 0.1)
        ema.update(step)
    fresh = EMA(_model().parameters(), decay=0.9)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.updates == 4
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, fresh.shadow))


def test_state_of_another_model_is_refused():
    ema = EMA(nn.Linear(2, 2).parameters(), decay=0.9)
    with pytest.raises(ValueError, match="holds 2 tensors, the model trains 1"):
        EMA([nn.Parameter(torch.zeros(2))], decay=0.9).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match=r"shape \(2, 2\) where the model trains one of \(3, 2\)"):
        EMA(nn.Linear(2, 3).parameters(), decay=0.9).load_state_dict(ema.state_dict())


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        EMA(_model().parameters(), decay=decay)
