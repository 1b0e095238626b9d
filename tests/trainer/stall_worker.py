"""Test worker: the real ``unlearn`` command line, with an ``after_step`` hook that prints ``STALLED after step
N`` and sleeps once step ``$SIMNPO_TEST_STALL_AFTER`` is logged and checkpointed (the test then kills it).

    python tests/trainer/stall_worker.py unlearn --config ... key=value ...

Nothing of this is in the package: the hook is injected by wrapping ``simnpo_fast.train.train`` here."""
import os
import sys
import time


def main() -> int:
    import simnpo_fast.train as T
    from simnpo_fast.trainer_cli import main as cli_main

    after = int(os.environ["SIMNPO_TEST_STALL_AFTER"])
    original = T.train

    def train(cfg, *, hooks=None, **kw):
        hooks = dict(hooks or {})
        if cfg.loss.objective != "finetune":  # not inside a finetune stage
            def stall(run, step):
                if step == after:
                    print(f"STALLED after step {step}", flush=True)
                    while True:
                        time.sleep(60)

            hooks["after_step"] = stall
        return original(cfg, hooks=hooks, **kw)

    T.train = train
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
