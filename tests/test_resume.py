"""lib.train.resume: what a resume restores, and what it says when it cannot restore all of it."""
from __future__ import annotations

import torch
from accelerate import Accelerator

from lib.train import checkpoint as ck
from lib.train.resume import load_training_state
from tests.helpers import reset_accelerate


def test_unreadable_random_states_are_a_warning_not_silence(tmp_path):
    """Accelerate carries on without random states it cannot read and says so only at its INFO
    level; the resume warns (the run goes on, but no longer repeats an uninterrupted one)."""
    reset_accelerate()
    acc = Accelerator(cpu=True)
    net = torch.nn.Linear(2, 2)
    acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    folder = tmp_path / "step-0000001"
    acc.save_state(str(folder / "accelerate"))
    info = ck.CheckpointInfo(folder, 1, {"step": 1})
    assert load_training_state(acc, info) is None
    (folder / "accelerate" / "random_states_0.pkl").write_bytes(b"not a pickle")
    warning = load_training_state(acc, info)
    assert warning.startswith(f"{folder / 'accelerate'}: the random states (random_states_0.pkl) could not be read")
    reset_accelerate()
