"""An idle writer's memory: status and spec kept serialised while nothing happens.

Most active flows wait on slow services most of the time. A waiting writer keeps its status
pickled and its spec as compressed JSON (about a tenth of the models and dicts) and brings them
back, exactly as they were, the moment it reads ``status`` or ``spec()``. A mixin of
``runner.FlowRunner``, whose state it reads.
"""

from __future__ import annotations

import json
import pickle
import zlib
from typing import Any

from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import TaskflowStatus


class IdleState:
    """The status and spec of a writer, thawed on use (``runner.FlowRunner`` holds them)."""

    body: dict[str, Any]
    _status: TaskflowStatus | None
    _frozen_status: bytes | None
    _frozen_spec: bytes | None
    _spec: tuple[Any, TaskflowSpec] | None

    @property
    def status(self) -> TaskflowStatus:
        if self._status is None:
            assert self._frozen_status is not None
            self._status = pickle.loads(zlib.decompress(self._frozen_status))
            self._frozen_status = None
        return self._status

    @status.setter
    def status(self, value: TaskflowStatus) -> None:
        self._status = value
        self._frozen_status = None

    def compact(self) -> None:
        """Idle for a while (e.g. waiting on slow services): keep status and spec serialised,
        about a tenth of the memory of the models and dicts, until something wakes the writer.
        Reading ``status`` or ``spec()`` brings them back exactly as they were."""
        if self._status is not None:
            self._frozen_status = zlib.compress(
                pickle.dumps(self._status, pickle.HIGHEST_PROTOCOL), 1
            )
            self._status = None
        spec = self.body.get("spec")
        if spec is not None:
            self._frozen_spec = zlib.compress(json.dumps(spec, separators=(",", ":")).encode(), 1)
            self.body["spec"] = None
        self._spec = None

    def spec(self) -> TaskflowSpec:
        generation = self.body["metadata"].get("generation")
        if self._spec is None or self._spec[0] != generation or generation is None:
            if self.body.get("spec") is None and self._frozen_spec is not None:
                self.body["spec"] = json.loads(zlib.decompress(self._frozen_spec))
            self._frozen_spec = None
            self._spec = (generation, TaskflowSpec.model_validate(self.body["spec"]))
        return self._spec[1]
