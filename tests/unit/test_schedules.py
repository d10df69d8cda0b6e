"""CronTaskflow's pure rules by table: when a schedule is due, missed runs and the starting
deadline, and CronJob's concurrency policies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from taskflow.api.schedules import CronTaskflowSpec, latest_due, run_name

T = datetime(2026, 12, 4, 20, 0, 30, tzinfo=UTC)


def cron(**fields: Any) -> CronTaskflowSpec:
    return CronTaskflowSpec.model_validate({"taskflow": {"stages": []}, **fields})


def test_every_counts_from_the_creation() -> None:
    spec = cron(schedule="@every 10s")
    assert latest_due(spec, created=T, now=T + timedelta(seconds=9)) is None
    assert latest_due(spec, created=T, now=T + timedelta(seconds=25)) == T + timedelta(seconds=20)


def test_cron_in_a_time_zone_and_the_most_recent_missed_run() -> None:
    paris = cron(schedule="0 9 * * *", timeZone="Europe/Paris")
    created = datetime(2026, 12, 1, tzinfo=UTC)
    # 9:00 in Paris is 8:00 UTC in December; three days missed: only the most recent is due.
    assert latest_due(paris, created=created, now=datetime(2026, 12, 4, 8, 30, tzinfo=UTC)) == (
        datetime(2026, 12, 4, 8, 0, tzinfo=UTC)
    )
    assert latest_due(cron(schedule="*/5 * * * *"), created=T, now=T + timedelta(minutes=1)) is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"schedule": "every day"}, "not a cron expression"),
        ({"schedule": "@every 100ms"}, "at least 1s"),
        ({"schedule": "@hourly", "timeZone": "Mars/Olympus"}, "unknown time zone"),
        ({"schedule": "@hourly", "concurrencyPolicy": "Sometimes"}, "concurrencyPolicy"),
    ],
)
def test_bad_schedules_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        cron(**fields)


def test_a_runs_name_is_fixed_by_its_time() -> None:
    assert run_name("nightly", T) == run_name("nightly", T) == f"nightly-{int(T.timestamp())}"
