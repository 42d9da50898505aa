"""train.py under torchrun with test hooks for preemption (tests/test_train_robust.py).

PREEMPT_SLOW=SECONDS  every step takes that much longer, so a signal from outside lands mid-run
PREEMPT_SELF=R:S:SIG  rank R sends itself SIG (e.g. SIGUSR1) at step S, before that step's stop check
Without them it is train.py.
"""
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402

rank = int(os.environ.get("RANK", "0"))
slow = float(os.environ.get("PREEMPT_SLOW", "0"))
self_signal = os.environ.get("PREEMPT_SELF", "").split(":") if os.environ.get("PREEMPT_SELF") else None
ema_decay = train.ema_decay


def slow_or_signalled_ema_decay(args, step):
    """Called once per step, right after the optimizer step and before the stop check."""
    time.sleep(slow)
    if self_signal and int(self_signal[0]) == rank and int(self_signal[1]) == step:
        os.kill(os.getpid(), getattr(signal, self_signal[2]))
    return ema_decay(args, step)


train.ema_decay = slow_or_signalled_ema_decay

if __name__ == "__main__":
    sys.exit(train.main(train.get_args()))
