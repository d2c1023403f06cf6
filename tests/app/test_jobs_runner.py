"""The job runner's parts on their own: the engine adapter's waits, heartbeats, claims and the orphan sweep."""

from __future__ import annotations

import asyncio

from app.errors import NotReady, Overloaded
from app.jobs import engine as adapter


def test_job_work_waits_while_the_engine_is_full_or_restarting() -> None:
    refusals: list[Exception] = [NotReady("the engine process went away; retry shortly"), Overloaded("queue full")]

    async def attempt() -> int:
        if refusals:
            raise refusals.pop(0)
        return 7

    assert asyncio.run(adapter._with_room(attempt)) == 7
    assert not refusals
