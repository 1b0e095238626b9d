"""The stages of a run (config level, no training): the finetune stage when enabled, then the method on the
model it exports; the step's named record and sums."""
import os

import torch

from simnpo_fast.train import load_config, stages


def test_finetune_stage_then_the_method_on_its_model():
    cfg = load_config("default", ["output_dir=/tmp/never-written", "finetune.lr=0.02", "finetune.epochs=3"])
    ft, main = stages(cfg)
    assert (ft.name, main.name) == ("finetune", cfg.loss.objective)
    assert ft.cfg.output_dir == os.path.join(cfg.output_dir, "finetune")
    assert ft.cfg.loss.objective == "finetune" and ft.cfg.loss.retain_weight == 0.0
    assert ft.cfg.data.forget_split == cfg.data.finetune_split  # the finetune method trains on its own rows
    assert (ft.cfg.optim.lr, ft.cfg.epochs, ft.cfg.batch_size) == (0.02, 3.0, cfg.finetune.batch_size)
    assert not ft.cfg.finetune.enabled and not ft.cfg.evaluate and not ft.cfg.checkpoint.final
    assert main.cfg.model.path == os.path.join(ft.cfg.output_dir, "hf") and main.cfg.model.preset is None
    assert main.cfg.data.path == ft.cfg.data.path == os.path.join(cfg.output_dir, "data")
    assert not main.cfg.finetune.enabled
    assert (main.cfg.loss, main.cfg.optim, main.cfg.data.forget_split) == (cfg.loss, cfg.optim, cfg.data.forget_split)
    assert cfg.finetune.enabled and cfg.model.preset == "tiny-llama"  # the run's own config is left as it was


def test_without_finetune_one_stage():
    cfg = load_config("default", ["output_dir=/tmp/never-written", "finetune.enabled=false"])
    (only,) = stages(cfg)
    assert only.cfg is cfg


def test_step_stats_sum_the_terms_and_record_is_named():
    from simnpo_fast.train.step import StepRecord, StepStats

    s = StepStats()
    s.add(torch.tensor(1.5), {"forget_loss": torch.tensor(1.0), "forget_logp_sum": torch.tensor([-2.0, -3.0])})
    s.add(torch.tensor(0.5), {"forget_loss": torch.tensor(0.25), "retain_loss": torch.tensor(0.25),
                              "forget_logp_sum": torch.tensor([-1.0]), "retain_logp_sum": torch.tensor([-4.0])})
    assert (s.loss, s.forget_loss, s.retain_loss, s.forget_logp, s.retain_logp) == (2.0, 1.25, 0.25, -6.0, -4.0)
    assert s.all_reduce(torch.device("cpu")) == s  # one process: unchanged
    keys = list(StepRecord(1, 0, 0.0, 0.0, None, 0.0, None, 0.0, 0.0, 1, 1.0, 1.0, 1.0).as_dict())
    assert keys == ["step", "epoch", "loss", "forget_loss", "retain_loss", "forget_loglik", "retain_loglik",
                    "grad_norm", "lr", "tokens", "tokens_per_s", "step_time_s", "peak_mem_mb"]
