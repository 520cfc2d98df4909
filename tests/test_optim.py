"""lib.train.optim: ChannelsLastAdamW is torch's AdamW to the bit, without copies of channels_last weights;
``update`` clips before it steps, steps every schedule once per applied update and none for a
skipped one, and goes through fp16's gradient scaler as it should."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.optim.adam as torch_adam

from lib.config import TrainConfig
from lib.train.optim import ChannelsLastAdamW, update
from lib.train.schedule import build_scheduler, lr_at


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


# ----------------------------------------------------------------------------- the update (lib.train.optim.update)
class OneProcess:
    """What lib.train.optim.update asks of an Accelerator, on one process (``scaler``: fp16's GradScaler)."""
    num_processes, device = 1, torch.device("cpu")

    def __init__(self, scaler=None) -> None:
        self.scaler = scaler


def _sgd(values, lr=1.0):
    w = torch.nn.Parameter(torch.tensor(values))
    return w, torch.optim.SGD([w], lr=lr)


def test_the_update_uses_the_clipped_gradient():
    """Clipping comes before the step (the reference trainer clipped after it, to no effect): the
    weights move by the clipped gradient, and the pre-clip norm is returned for the log."""
    w, opt = _sgd([1.0, 2.0, 3.0, 4.0])
    before = w.detach().clone()
    grad = torch.tensor([6.0, 0.0, 8.0, 0.0])                     # norm 10
    w.grad = grad.clone()
    result = update(OneProcess(), [opt], [], 1.0, [torch.tensor(0.5)])
    assert result.applied and result.grad_norms[0].item() == pytest.approx(10.0)
    clipped = grad * (1.0 / (10.0 + 1e-6))                          # torch's clip coefficient
    torch.testing.assert_close(w.detach(), before - clipped, rtol=0, atol=1e-7)
    assert w.grad is None                                           # dropped after the step


def test_one_schedule_step_per_update_and_none_for_a_skipped_one():
    """Every schedule advances exactly once per applied update, also one whose optimizer sat it
    out (the discriminator's before disc_start); a non-finite update changes nothing."""
    cfg = TrainConfig(max_steps=20, lr=1e-2, min_lr=1e-4, warmup_steps=3)
    (w_g, opt_g), (w_d, opt_d) = _sgd([1.0, 1.0]), _sgd([2.0, 2.0])
    scheds = [build_scheduler(opt_g, cfg), build_scheduler(opt_d, cfg)]
    for n in range(1, 8):
        w_g.grad = torch.ones(2)
        assert update(OneProcess(), [opt_g], scheds, 0.0, [torch.tensor(1.0)]).applied
        assert [o.param_groups[0]["lr"] for o in (opt_g, opt_d)] == pytest.approx([lr_at(cfg, n)] * 2, rel=1e-12)
        assert [s.last_epoch for s in scheds] == [n, n]
    assert torch.equal(w_d.detach(), torch.tensor([2.0, 2.0]))     # the optimizer that sat out did not move
    kept = w_g.detach().clone()
    w_g.grad = torch.tensor([float("nan"), 1.0])
    assert not update(OneProcess(), [opt_g], scheds, 1.0, [torch.tensor(1.0)]).applied
    assert [s.last_epoch for s in scheds] == [7, 7] and torch.equal(w_g.detach(), kept) and w_g.grad is None
    w_g.grad = torch.ones(2)
    assert not update(OneProcess(), [opt_g], scheds, 1.0, [torch.tensor(float("inf"))]).applied   # a loss too
    assert [s.last_epoch for s in scheds] == [7, 7]


def test_fp16_scaler_unscales_once_before_clipping_and_a_skip_keeps_the_schedule():
    """With fp16's gradient scaler (torch's GradScaler runs on the CPU too): the gradients are
    unscaled exactly once, before clipping (the norms are the true ones), the step is the
    scaler's, and an overflow skips the step without advancing the schedule."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1000)
    cfg = TrainConfig(max_steps=10, lr=1.0, min_lr=0.0, lr_scheduler="constant")
    w, opt = _sgd([0.0, 0.0])
    sched = build_scheduler(opt, cfg)
    scaler.scale((w * torch.tensor([3.0, 4.0])).sum()).backward()             # scaled, as accelerator.backward
    assert w.grad.tolist() == [3.0 * 2 ** 8, 4.0 * 2 ** 8]
    result = update(OneProcess(scaler), [opt], [sched], 1.0, [torch.tensor(1.0)])
    assert result.applied and result.grad_norms[0].item() == pytest.approx(5.0)   # unscaled: |(3, 4)|
    torch.testing.assert_close(w.detach(), -torch.tensor([3.0, 4.0]) / (5.0 + 1e-6), rtol=0, atol=1e-6)
    assert sched.last_epoch == 1
    w.grad = torch.tensor([float("inf"), 1.0])
    kept = w.detach().clone()
    result = update(OneProcess(scaler), [opt], [sched], 1.0, [torch.tensor(1.0)])
    assert not result.applied and torch.equal(w.detach(), kept)
    assert sched.last_epoch == 1 and scaler.get_scale() == 2.0 ** 7       # skipped, scale backed off
