"""Worker groups the controller can wait on without hanging.

verl's worker-group methods block in `ray.get` with no limit: a worker that dies raises only when
its turn in the list comes, and one that hangs (a peer lost in a collective, a stuck engine) blocks
the driver for ever. `SupervisedGroup` keeps verl's dispatch and collect functions but waits on the
workers' results together, so the first death is reported at once and silence after
`trainer.worker_timeout_s` is reported too, as a `WorkerFailure` naming the role, the ranks and the
method.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group
from verl.protocol import _padding_size_key
from verl.single_controller.base.decorator import MAGIC_ATTR, get_predefined_dispatch_fn
from verl.single_controller.ray import RayWorkerGroup


class WorkerFailure(RuntimeError):
    """A worker died or did not answer within the timeout."""


class SupervisedGroup:
    """A verl worker group of `cls` workers in the role `role`, whose registered methods are called
    as on the group itself (`group.generate(...)`), each bounded by `timeout_s`."""

    def __init__(self, group: RayWorkerGroup, cls: type, role: str, timeout_s: float) -> None:
        self.group, self.cls, self.role, self.timeout_s = group, cls, role, timeout_s

    @property
    def world_size(self) -> int:
        return self.group.world_size

    def __getattr__(self, method: str):
        attrs = getattr(getattr(self.cls, method, None), MAGIC_ATTR, None)
        if attrs is None:
            raise AttributeError(f"{self.cls.__name__} has no registered method {method!r}")
        return lambda *args, **kwargs: self.call(method, attrs["dispatch_mode"], *args, **kwargs)

    def call(self, method: str, dispatch_mode, *args, **kwargs) -> Any:
        functions = get_predefined_dispatch_fn(dispatch_mode)
        args, kwargs = functions["dispatch_fn"](self.group, *args, **kwargs)
        if kwargs.pop(_padding_size_key, 0):
            raise ValueError(f"{method}: rows must come padded to a multiple of the ranks")
        refs = self.group.execute_all_async(method, *args, **kwargs)
        return functions["collect_fn"](self.group, self._wait(refs, method))

    def _wait(self, refs: list[ray.ObjectRef], method: str) -> list:
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending, deadline = list(refs), time.monotonic() + self.timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                ranks = sorted(rank_of[r] for r in pending)
                raise WorkerFailure(
                    f"{self.role} worker(s) {ranks} did not finish `{method}` within "
                    f"trainer.worker_timeout_s={self.timeout_s:g}"
                )
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as died:
                cause = died.error_msg.splitlines()[0]
                raise WorkerFailure(
                    f"{self.role} worker {rank_of[ready[0]]} died during `{method}`: {cause}"
                ) from None
        return ray.get(refs)

    def shutdown(self) -> None:
        """Kill every worker of the group and give back its placement groups."""
        for worker in self.group.workers:
            ray.kill(worker, no_restart=True)
        for pg in self.group.resource_pool.pgs or []:
            remove_placement_group(pg)
