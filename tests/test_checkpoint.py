"""Resumable state without pickle: what is saved comes back equal, and a pickled state is refused unopened."""

import pickle
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from trainer import checkpoint
from trainer.checkpoint import Progress, StateError


class Adapter:
    def __init__(self):
        self.weight = torch.nn.Parameter(torch.randn(4, 3))

    def state_dict(self):
        return {"unet.0": self.weight.detach()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.weight.copy_(state["unet.0"])


def trained(steps: int):
    torch.manual_seed(0)
    net = Adapter()
    optimizer = torch.optim.AdamW([net.weight], lr=1e-2, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    for _ in range(steps):
        (net.weight ** 2).sum().backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return net, optimizer, schedule


def test_a_state_comes_back_equal_and_training_goes_on_identically(tmp_path):
    acc = Accelerator(cpu=True)
    net, optimizer, schedule = trained(3)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    folder = checkpoint.save(tmp_path, acc, net, Progress(3, 1, 2), optimizer, schedule)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.bin"))
    fresh, fresh_opt, fresh_schedule = trained(0)
    progress = Progress()
    checkpoint.load(folder, acc, fresh, progress, fresh_opt, fresh_schedule)
    assert progress == Progress(3, 1, 2)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert torch.equal(fresh.weight, net.weight) and fresh_schedule.get_last_lr() == schedule.get_last_lr()
    for model, opt, sched in ((net, optimizer, schedule), (fresh, fresh_opt, fresh_schedule)):
        (model.weight ** 2).sum().backward()
        opt.step()
        sched.step()
    assert torch.equal(fresh.weight, net.weight)  # the same next step, bit for bit


def test_a_pickled_state_is_refused_and_never_unpickled(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    folder = tmp_path / "state" / "step-00000001"
    folder.mkdir(parents=True)
    (folder / "random_states_0.pkl").write_bytes(pickle.dumps(Payload()))
    (folder / "progress.json").write_text('{"step": 1, "epoch": 0, "batch": 1}')
    net, optimizer, schedule = trained(0)
    with pytest.raises(StateError, match="never unpickles"):
        checkpoint.load(checkpoint.latest(tmp_path), Accelerator(cpu=True), net, Progress(), optimizer, schedule)
    assert not (tmp_path / "pwned").exists()


def test_what_json_cannot_hold_is_refused():
    with pytest.raises(TypeError, match="without pickle"):
        checkpoint.split({"f": lambda: 0}, {})
    tensors = {}
    skeleton = checkpoint.split({"state": {0: {"step": torch.tensor(3.0)}}, "groups": [{"betas": (0.9, 0.99)}]},
                                tensors)
    back = checkpoint.join(skeleton, tensors)
    assert list(back["state"]) == [0] and back["groups"][0]["betas"] == [0.9, 0.99]
