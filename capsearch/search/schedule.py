"""The trial scheduler of a search: FIFO, or ASHA stopping trials on their probes, and its step budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capsearch.config import Spec


def max_steps(spec: Spec) -> int:
    """The most training steps any trial can run (ASHA's max_t)."""
    steps = [spec.train.steps] + [b.train.get("steps", 0) for b in spec.baseline_points]
    p = spec.search_space.steps
    if p is not None:
        steps += [int(p.high)] if p.kind == "int" else [int(v) for v in (p.choices or [p.value])]
    return max(steps)


def trial_scheduler(spec: Spec) -> Any:
    """Ray Tune's scheduler for the spec: FIFO, or ASHA on the probe score over training steps."""
    # lazy: Ray loads for a search, not for a report that only counts max_steps
    from ray.tune.schedulers import FIFOScheduler

    sched = spec.search.scheduler
    if sched.name != "asha":
        return FIFOScheduler()
    return _asha()(time_attr="training_step", metric="probe_score", mode="min",
                   max_t=max_steps(spec), grace_period=sched.grace_period,
                   reduction_factor=sched.reduction_factor, stop_last_trials=False)  # fmt: skip


def _asha() -> type:
    """Ray's ASHA, except that a trial's last probe never stops it: its training is done, and only its
    evaluation is left (Ray's rungs can include max_t itself, where `stop_last_trials=False` does not
    help: grace 2, factor 2, 8 steps stopped a trial at step 8)."""
    # lazy: Ray loads for a search, not for a report that only counts max_steps
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class LastProbeKeeps(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and result.get(self._time_attr, 0) >= self._max_t:
                self._num_stopped -= 1
                return TrialScheduler.CONTINUE
            return action

    return LastProbeKeeps
