"""How the suite waits: for a signal (a file, a log line, a reply, a process exit), never for
a number of seconds of quiet, with budgets in minutes so a busy machine only makes it slower.

MOA_TEST_WAIT_MINUTES scales every budget (default 1.0; CI on a loaded machine may raise it)."""
from __future__ import annotations

import os
import time
from typing import Callable

SCALE = float(os.environ.get("MOA_TEST_WAIT_MINUTES", "1.0"))


def minutes(n: float) -> float:
    """A budget of n minutes, in seconds, scaled by MOA_TEST_WAIT_MINUTES."""
    return 60.0 * n * SCALE


def wait_for(ready: Callable[[], object], what: str, budget_minutes: float, poll: float = 0.2,
             alive: Callable[[], None] | None = None):
    """Poll `ready()` until it returns something truthy (returned); `alive()` may raise to stop
    early (a process that died). TimeoutError names what was awaited and the budget."""
    deadline = time.monotonic() + minutes(budget_minutes)
    while True:
        if alive is not None:
            alive()
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not seen within {budget_minutes * SCALE:g} minute(s)")
        time.sleep(poll)
