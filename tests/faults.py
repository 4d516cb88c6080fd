"""Fault injection for the engine's own recovery: a subclass of a Ray Data actor-pool callable that
SIGKILLs its own process in the middle of one call, or a task function that does so after its work, once
per marker file. Ray Data restarts the actor (actor pools run with max_restarts=-1) or retries the task and
the batch; the tests check the published result is the uninterrupted one. Pickled by value, so Ray's workers need not import the tests package."""

from __future__ import annotations

import os
import signal

import ray.cloudpickle


def killed_once(base: type, marker: str, at_call: int = 2) -> type:
    """A `base` whose `__call__` SIGKILLs the actor process on its `at_call`-th call, the first time only
    (the `marker` file records that it happened, across the restart)."""

    class KilledOnce(base):
        calls = 0

        def __call__(self, batch):
            type(self).calls += 1
            if type(self).calls == at_call and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)  # mid-batch: nothing of this call is returned
            return super().__call__(batch)

    KilledOnce.__name__ = KilledOnce.__qualname__ = f"KilledOnce{base.__name__}"
    return KilledOnce


def killed_after_once(fn, marker: str):
    """A task function that runs `fn` and then SIGKILLs its worker before returning, the first time only:
    what `fn` wrote is on disk but its result is lost, so Ray retries the task on the same batch."""

    def killed_after(batch, *args):
        out = fn(batch, *args)
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    return killed_after


ray.cloudpickle.register_pickle_by_value(__import__(__name__))
