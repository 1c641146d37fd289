"""Fault injection for tests: make one trial fail at one point, inside the Ray worker that runs it.

Trials run in Ray worker processes, out of reach of a test's monkeypatching. The environment variable
`CAPSEARCH_INJECT_FAULT` reaches them (a local Ray started by the test process passes the driver's
environment to its workers): a comma-separated list of `TRIAL:POINT:FAULT`, e.g.

    CAPSEARCH_INJECT_FAULT="t001:delta:enospc,t002:train_step:kill"

TRIAL is the trial's folder name (tNNN). POINT is where it strikes: `train_step` (each training step,
after the loss), `checkpoint` (a checkpoint's files written, before they are swapped in), `delta` (the
delta's tensors written to their temporary file), `metrics` (metrics.json written to its temporary
file). FAULT is what happens there: `raise` (RuntimeError), `nan` (the loss becomes NaN; train_step
only), `memory` (MemoryError), `enospc` (OSError ENOSPC, as a full disk raises it), `kill` (SIGKILL to
the worker's own process). Only tests set the variable; unset, `maybe_fail` reads one environment
variable and returns.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "CAPSEARCH_INJECT_FAULT"
POINTS = ("train_step", "checkpoint", "delta", "metrics")
FAULTS = ("raise", "nan", "memory", "enospc", "kill")


def parse(text: str) -> dict[tuple[str, str], str]:
    """{(trial, point): fault} from the variable's text (ValueError naming a malformed entry)."""
    faults = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        parts = entry.split(":")
        if len(parts) != 3 or parts[1] not in POINTS or parts[2] not in FAULTS:
            raise ValueError(
                f"{ENV}: {entry!r} is not TRIAL:POINT:FAULT (points: {', '.join(POINTS)}; "
                f"faults: {', '.join(FAULTS)})"
            )
        if parts[2] == "nan" and parts[1] != "train_step":
            raise ValueError(f"{ENV}: {entry!r}: the nan fault strikes at train_step only")
        faults[(parts[0], parts[1])] = parts[2]
    return faults


def maybe_fail(trial: str | None, point: str) -> str | None:
    """Strike the fault injected at this trial's `point`, if any; return "nan" for the caller to apply."""
    text = os.environ.get(ENV)
    if not text or trial is None:
        return None
    fault = parse(text).get((trial, point))
    where = f"injected at {point} of {trial}"
    if fault == "raise":
        raise RuntimeError(f"fault {where}")
    if fault == "memory":
        raise MemoryError(f"fault {where}")
    if fault == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return fault  # "nan" or None
