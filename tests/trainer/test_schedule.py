"""The learning-rate schedule (``train/schedule.py``) against transformers' own schedulers."""
import pytest
import torch

from simnpo_fast.train.config import OptimConfig


def test_warmup_from_zero_is_hf_linear_schedule():
    """Issue 23: the authors' runs use HF's linear schedule (TrainingArguments' default, warmup_steps =
    steps_per_epoch, OPTML-Group/Unlearn-Simple TOFU/forget.py): the first step takes learning rate 0. The oracle
    is transformers' own get_linear_schedule_with_warmup; the default (warmup_from_zero=False) starts at lr / W."""
    from transformers import get_linear_schedule_with_warmup

    from simnpo_fast.train.schedule import build_scheduler

    def lrs(make):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-5)
        sched = make(opt)
        out = []
        for _ in range(125):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cfg = OptimConfig(lr=1e-5, schedule="linear", warmup_steps=12, warmup_from_zero=True)
    ours = lrs(lambda o: build_scheduler(o, cfg, 125))
    hf = lrs(lambda o: get_linear_schedule_with_warmup(o, 12, 125))
    assert ours == pytest.approx(hf, rel=1e-12, abs=0) and ours[0] == 0.0
    cfg.warmup_from_zero = False
    assert lrs(lambda o: build_scheduler(o, cfg, 125))[0] == pytest.approx(1e-5 / 12)
