"""EMA: the update rule against its formula, and load_state_dict's checks."""

import pytest
import torch
from torch import nn

from fastflow.train.ema import EMA


def _model():
    return nn.Sequential(nn.Linear(3, 5), nn.GroupNorm(1, 5), nn.Linear(5, 2))


def test_update_follows_the_warmup_formula(seed):
    model = _model()
    ema = EMA(model, decay=0.9, warmup_steps=3)
    expected = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    for n_update in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.9, (1 + n_update) / (10 + n_update)) if n_update < 3 else 0.9
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach().double()
        ema.update()
    for n in expected:
        torch.testing.assert_close(ema.shadow[n].double(), expected[n], rtol=1e-6, atol=1e-6, msg=f"{n} seed {seed}")
    assert ema.step == 5


def test_load_state_dict_round_trip_and_checks(seed):
    source = EMA(_model(), decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for p in source.model.parameters():
                p.add_(torch.randn_like(p))
        source.update()
    target = EMA(_model(), decay=0.99)
    target.load_state_dict(source.state_dict())
    assert target.step == 3 and all(torch.equal(target.shadow[n], source.shadow[n]) for n in source.names)

    before = {n: t.clone() for n, t in target.shadow.items()}
    # a (5,) bias where (1, 5) is expected would broadcast into place: refused, nothing changed
    bad = source.state_dict()
    bad["shadow"] = dict(bad["shadow"], **{"0.bias": torch.zeros(1)})
    bad["step"] = 99
    with pytest.raises(ValueError, match=r"0\.bias: \(1,\) vs \(5,\)"):
        target.load_state_dict(bad)
    extra = source.state_dict()
    extra["shadow"] = dict(extra["shadow"], **{"3.weight": torch.zeros(2)})
    with pytest.raises(KeyError, match=r"unexpected \['3\.weight'\]"):
        target.load_state_dict(extra)
    short = source.state_dict()
    short["shadow"] = {n: t for n, t in short["shadow"].items() if n != "2.weight"}
    with pytest.raises(KeyError, match=r"missing \['2\.weight'\]"):
        target.load_state_dict(short)
    with pytest.raises(KeyError, match="'shadow'"):
        target.load_state_dict({"step": 1})
    assert target.step == 3 and all(torch.equal(target.shadow[n], before[n]) for n in before)
