"""Test worker: the real ``unlearn`` command line, with an ``after_step`` hook that prints ``STALLED after step
N`` and sleeps once step ``$SIMNPO_TEST_STALL_AFTER`` is logged and checkpointed (the test then kills it); with
``$SIMNPO_TEST_STALL_UNTIL_SIGNAL`` set it sleeps only until a preemption signal has arrived (the loop then
checkpoints and stops), and with ``$SIMNPO_TEST_STALL_SECONDS`` at most that long. The line names the rank and
the pid (under torchrun the test signals one rank only).

    python tests/trainer/stall_worker.py unlearn --config ... key=value ...

Nothing of this is in the package: the hook is injected by wrapping ``simnpo_fast.train.train`` here."""
import os
import sys
import time


def main() -> int:
    import simnpo_fast.train as T
    from simnpo_fast.train.preempt import signal_received
    from simnpo_fast.cli import main as cli_main

    after = int(os.environ["SIMNPO_TEST_STALL_AFTER"])
    original = T.train

    def train(cfg, *, hooks=None, **kw):
        hooks = dict(hooks or {})
        if cfg.loss.objective != "finetune":  # not inside a finetune stage
            def stall(run, step):
                if step == after:
                    print(f"STALLED after step {step} rank {os.environ.get('RANK', '0')} pid {os.getpid()}",
                          flush=True)
                    deadline = time.time() + float(os.environ.get("SIMNPO_TEST_STALL_SECONDS", "inf"))
                    until_signal = bool(os.environ.get("SIMNPO_TEST_STALL_UNTIL_SIGNAL"))
                    while not (until_signal and signal_received()) and time.time() < deadline:
                        time.sleep(0.05)

            hooks["after_step"] = stall
        return original(cfg, hooks=hooks, **kw)

    T.train = train
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
