"""Test-only fault injection: a process that SIGKILLs or SIGSTOPs itself at a named step of publishing a result.

``DGXQ_TEST_KILL_AT`` names the step to die at, ``DGXQ_TEST_STOP_AT`` the step to stop at (once,
the first time it is reached, so that the test can act in the window and then SIGCONT it); both
are read once, at import (not ``DGXQUEUE_``: that prefix belongs to the configuration). Unset
(always, outside the acceptance tests) each point costs two comparisons and does nothing. The
steps, in order:

- ``temporary-created``: the attempt's temporary WAV exists but holds nothing yet
- ``before-commit``: the batch's temporaries are written and fsynced, their outcomes not committed
- ``after-commit``: the outcomes are committed, the temporaries not yet renamed into place
- ``archive-committed`` (``dgxqueue archive``, not the daemon): a batch is committed at the archive,
  not yet deleted at the source
- ``demo-interrupted`` (``dgxqueue demo``): its first Ctrl-C answered, its daemon not yet told to stop
"""

from __future__ import annotations

import os
import signal

STEPS = ("temporary-created", "before-commit", "after-commit")
#: The archive's step (dgxqueue.storage.transfer), apart: the daemon's tests run every one of STEPS.
ARCHIVE_STEP = "archive-committed"
_KILL_AT = os.environ.get("DGXQ_TEST_KILL_AT") or None
_stop_at = os.environ.get("DGXQ_TEST_STOP_AT") or None


def reached(step: str) -> None:
    """Die here, as a power cut or the OOM killer would, when the tests asked for ``step``; or
    stop here (SIGSTOP, as a debugger or a stalled disk would hold it) the first time, when they
    asked to stop at ``step``."""
    global _stop_at
    if step == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    if step == _stop_at:
        _stop_at = None  # once: the test continues the process and watches what follows
        os.kill(os.getpid(), signal.SIGSTOP)
