"""lib.optim.ChannelsLastAdamW: torch's AdamW to the bit, without copies of channels_last weights."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.optim.adam as torch_adam

from lib.optim import ChannelsLastAdamW


def _model(channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                            torch.nn.Conv2d(8, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    return m.to(memory_format=torch.channels_last) if channels_last else m


def _train(m: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 4) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 3, 6, 6, generator=g).to(memory_format=torch.channels_last)
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_same_update_as_torch_adamw_to_the_bit(fused, channels_last):
    ours, theirs = _model(channels_last), _model(channels_last)
    kw = dict(lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1, fused=fused)
    opt_ours, opt_theirs = ChannelsLastAdamW(ours.parameters(), **kw), torch.optim.AdamW(theirs.parameters(), **kw)
    _train(ours, opt_ours)
    _train(theirs, opt_theirs)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b) and a.stride() == b.stride()      # same values, layout kept
    sa, sb = opt_ours.state_dict()["state"], opt_theirs.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_the_kernel_gets_contiguous_tensors_only(monkeypatch):
    """The point of the class: no channels_last tensor reaches the fused kernel (which would
    copy it there and back)."""
    seen = []
    real = torch_adam.adam

    def spy(params, grads, exp_avgs, exp_avg_sqs, *a, **k):
        seen.extend(t.is_contiguous() for t in (*params, *grads, *exp_avgs, *exp_avg_sqs))
        return real(params, grads, exp_avgs, exp_avg_sqs, *a, **k)

    monkeypatch.setattr(torch_adam, "adam", spy)
    m = _model(channels_last=True)
    assert any(not p.is_contiguous() for p in m.parameters())        # the case this is about
    _train(m, ChannelsLastAdamW(m.parameters(), lr=1e-3, fused=True), steps=2)
    assert seen and all(seen)


def test_state_dict_round_trip_continues_identically():
    m = _model(channels_last=True)
    opt = ChannelsLastAdamW(m.parameters(), lr=1e-2, fused=True)
    _train(m, opt, steps=2)
    m2 = copy.deepcopy(m)
    opt2 = ChannelsLastAdamW(m2.parameters(), lr=1e-2, fused=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(m, opt, steps=2)
    _train(m2, opt2, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
