"""Several API processes: a client on any of them gets every event, through NATS."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import websockets

from almanac.auth import KeyRing
from almanac.eventstore import EventStore
from almanac.settings import Settings
from tests.conftest import services_settings
from tests.e2e.support_server import events_until, next_frame
from tests.factories import birth_json
from tests.integration.support_processes import RoleProcess, RoleProcesses
from tests.integration.support_redis import free_port
from tests.integration.support_waiting import eventually


async def ready(process: RoleProcess) -> None:
    async def answers() -> bool:
        process.ensure_running()
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                got = await http.get(f"http://127.0.0.1:{process.port}/health/ready")
        except httpx.HTTPError:
            return False
        return got.status_code == 200

    await eventually(answers, within=60, what=f"the {process.roles} process answers")


async def test_a_client_on_one_api_process_sees_commands_taken_by_another(
    postgres_url: str, tmp_path: Path
) -> None:
    settings: Settings = services_settings(postgres_url)
    store = EventStore(settings)
    try:
        key = (
            await asyncio.to_thread(KeyRing(store, 0).issue, name="k", role="client", owner="o")
        ).secret
    finally:
        store.close()
    with RoleProcesses(settings, tmp_path) as processes:
        # Commands go to the first process; the second only serves the API to its clients.
        taking = processes.start("api,worker,projector,relay", port=free_port())
        watching = processes.start("api", port=free_port())
        for process in (taking, watching):
            await ready(process)
        headers = {"Authorization": f"Bearer {key}"}
        async with websockets.connect(
            f"ws://127.0.0.1:{watching.port}/ws?topics=event:reading.*",
            additional_headers=headers,
            open_timeout=10,
        ) as socket:
            assert (await next_frame(socket))["type"] == "welcome"
            async with httpx.AsyncClient(timeout=20) as http:
                accepted = await http.post(
                    f"http://127.0.0.1:{taking.port}/api/v1/readings",
                    json={"birth": birth_json()},
                    headers=headers,
                )
            assert accepted.status_code == 202, accepted.text
            frames = await events_until(
                socket,
                lambda fs: any(f["event_type"] == "reading.generated" for f in fs),
                timeout=30,
            )
        for process in (taking, watching):
            assert process.terminate(timeout=20) == 0, process.output()[-3000:]
    reading_id = accepted.headers["location"].rsplit("/", 1)[1]
    assert [f["event_type"] for f in frames] == [
        "reading.requested",
        "reading.chart_calculated",
        "reading.generated",
    ]
    assert {f["aggregate_id"] for f in frames} == {reading_id}
    assert frames[0]["payload"]["metadata"]["owner"] == "o"
