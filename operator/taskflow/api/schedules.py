"""CronTaskflow: a Taskflow run on a schedule, with the semantics of Kubernetes' CronJob.

``schedule`` is a cron expression (five fields, or six with seconds last, or ``@hourly``,
``@daily``...: parsed by ``croniter``) in ``timeZone`` (an IANA name; default UTC), or
``@every <duration>`` (from the CronTaskflow's creation). At each scheduled time the operator
creates a Taskflow from ``taskflow`` (an inline spec, or one with ``templateRef``), named after
the CronTaskflow and the time, so a restart or a second replica never creates it twice.
``concurrencyPolicy`` says what happens when the previous run is still active (Allow: run
anyway; Forbid: skip this run; Replace: cancel the previous one). A run missed while the
operator was down is made once when it comes back, if ``startingDeadlineSeconds`` allows
(only the most recent missed run, as CronJob does). Finished runs beyond the history limits
are deleted, oldest first.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from taskflow.api.durations import parse_duration_ms
from taskflow.api.spec import FreeForm
from taskflow.api.spec import StrictModel as _Model

KIND = "CronTaskflow"
PLURAL = "crontaskflows"
# The label on a run: the CronTaskflow's name (not under taskflow.dev/: those are the parent
# links' only).
CRON_LABEL = "crontaskflow.taskflow.dev/name"


class CronTaskflowSpec(_Model):
    schedule: str = Field(
        min_length=1, max_length=128, description="cron, @hourly/@daily/..., or @every <duration>."
    )
    time_zone: str | None = Field(default=None, alias="timeZone", max_length=64)
    taskflow: FreeForm = Field(description="The spec of each run: stages, or a templateRef.")
    concurrency_policy: Literal["Allow", "Forbid", "Replace"] = Field(
        default="Allow", alias="concurrencyPolicy"
    )
    starting_deadline_seconds: int | None = Field(
        default=None, alias="startingDeadlineSeconds", ge=0, le=7 * 24 * 3600
    )
    successful_history_limit: int = Field(default=3, alias="successfulHistoryLimit", ge=0, le=100)
    failed_history_limit: int = Field(default=1, alias="failedHistoryLimit", ge=0, le=100)
    suspend: bool | None = None

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        schedule_problem(value)
        return value

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r}") from None
        return value


class CronTaskflowStatus(_Model):
    last_schedule_time: str | None = Field(default=None, alias="lastScheduleTime")
    active: list[str] = Field(default_factory=list, max_length=1000)


def schedule_problem(schedule: str) -> None:
    """Raise ValueError naming what is wrong with ``schedule``."""
    if schedule.startswith("@every "):
        if parse_duration_ms(schedule[len("@every ") :].strip()) < 1000:
            raise ValueError("@every needs a period of at least 1s")
        return
    from croniter import croniter

    if not croniter.is_valid(schedule):
        raise ValueError(f"not a cron expression: {schedule!r}")


def latest_due(spec: CronTaskflowSpec, *, created: datetime, now: datetime) -> datetime | None:
    """The most recent scheduled time at or before ``now`` (and after ``created``), or None."""
    if spec.schedule.startswith("@every "):
        period = timedelta(milliseconds=parse_duration_ms(spec.schedule[7:].strip()))
        if now < created + period:
            return None
        return created + period * ((now - created) // period)
    from croniter import croniter

    zone = ZoneInfo(spec.time_zone) if spec.time_zone else UTC
    found: datetime = croniter(spec.schedule, now.astimezone(zone)).get_prev(datetime)
    return found if found > created else None


def run_name(cron: str, at: datetime) -> str:
    """A run's name: the same for the same scheduled time, whoever creates it."""
    return f"{cron[:40]}-{int(at.timestamp())}"


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def format_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
