"""Options as the engine uses them: task options over flow options over defaults, in ms."""

from __future__ import annotations

from dataclasses import dataclass

from taskflow.api.durations import parse_duration_ms
from taskflow.api.spec import Options, RetryBackoff

DEFAULT_TIMEOUT_MS = 60_000
DEFAULT_RETRY_DELAY_MS = 1_000
DEFAULT_BACKOFF_FACTOR = 2.0
DEFAULT_MAX_DELAY_MS = 5 * 60_000


@dataclass(frozen=True, slots=True)
class EffectiveOptions:
    timeout_ms: int
    max_retries: int
    retry_delay_ms: int
    max_age_ms: int | None  # None: no budget beyond each attempt's timeout
    continue_on_task_failure: bool
    exactly_once_task_execution: bool
    # Backoff: each retry waits retry_delay_ms * factor ** retries, at most max_delay_ms, less
    # up to jitter of it. factor 1 (no retryBackoff): every retry waits retry_delay_ms.
    backoff_factor: float = 1.0
    max_delay_ms: int | None = None
    jitter: float = 0.0
    non_retryable_codes: frozenset[str] = frozenset()
    # "wait": no responders means send again until the timeout; "fail": end the attempt.
    when_no_service: str = "wait"
    # An attempt must be heartbeaten at least this often (None: no heartbeats needed).
    heartbeat_timeout_ms: int | None = None

    def retry_delay(self, *, retries: int, spread: float) -> int:
        """The wait before the next attempt, after ``retries`` retries of this run;
        ``spread`` in [0, 1) picks where in the jitter it falls (the engine derives it from
        the attempt, so a decision made again is the same)."""
        delay = float(self.retry_delay_ms)
        if self.backoff_factor > 1.0:
            delay *= self.backoff_factor ** min(retries, 1000)
        if self.max_delay_ms is not None:
            delay = min(delay, float(self.max_delay_ms))
        return int(delay * (1.0 - self.jitter * spread))

    def as_wire(self) -> dict[str, object]:
        """The seed's ``options`` object, milliseconds throughout."""
        out: dict[str, object] = {
            "maxRetries": self.max_retries,
            "timeout": self.timeout_ms,
            "retryDelay": self.retry_delay_ms,
            "exactlyOnceTaskExecution": self.exactly_once_task_execution,
            "continueOnTaskFailure": self.continue_on_task_failure,
        }
        if self.max_age_ms is not None:
            out["maxAge"] = self.max_age_ms
        if self.heartbeat_timeout_ms is not None:
            out["heartbeatTimeout"] = self.heartbeat_timeout_ms
        return out


def effective_options(flow: Options | None, task: Options | None) -> EffectiveOptions:
    def pick(field: str) -> object:
        for source in (task, flow):
            if source is not None and getattr(source, field) is not None:
                return getattr(source, field)
        return None

    def ms(field: str, default: int | None) -> int | None:
        value = pick(field)
        return default if value is None else parse_duration_ms(value)  # type: ignore[arg-type]

    timeout = ms("timeout", DEFAULT_TIMEOUT_MS)
    delay = ms("retry_delay", DEFAULT_RETRY_DELAY_MS)
    backoff = pick("retry_backoff")  # a whole object: a task's replaces the flow's
    backed: dict[str, object] = {}
    if isinstance(backoff, RetryBackoff):
        backed = {
            "backoff_factor": DEFAULT_BACKOFF_FACTOR
            if backoff.factor is None
            else float(backoff.factor),
            "max_delay_ms": DEFAULT_MAX_DELAY_MS
            if backoff.max_delay is None
            else parse_duration_ms(backoff.max_delay),
            "jitter": float(backoff.jitter or 0.0),
        }
    codes = pick("non_retryable_codes")
    return EffectiveOptions(
        timeout_ms=timeout if timeout else DEFAULT_TIMEOUT_MS,
        max_retries=int(pick("max_retries") or 0),  # type: ignore[call-overload]
        retry_delay_ms=delay or 0,
        max_age_ms=ms("max_age", None) or None,
        continue_on_task_failure=bool(pick("continue_on_task_failure")),
        exactly_once_task_execution=bool(pick("exactly_once_task_execution")),
        non_retryable_codes=frozenset(codes) if isinstance(codes, list) else frozenset(),
        heartbeat_timeout_ms=ms("heartbeat_timeout", None) or None,
        when_no_service=str(pick("when_no_service") or "wait"),
        **backed,  # type: ignore[arg-type]
    )
