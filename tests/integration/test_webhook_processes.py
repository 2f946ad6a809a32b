"""Webhook deliverers as real processes: kill -9 one with attempts pending, and the next one
delivers every message, each once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from almanac.settings import Settings
from tests.e2e.conftest import serving
from tests.e2e.test_webhooks import Hooks
from tests.integration.support_processes import RoleProcesses
from tests.integration.support_receiver import Reply, receiving
from tests.integration.support_waiting import eventually

# Everything but the deliverer runs in the test's process.
OTHER_ROLES = ("api", "worker", "projector", "relay")


async def test_a_killed_deliverer_loses_no_pending_attempt(
    settings: Settings, tmp_path: Path
) -> None:
    # A short timeout keeps the lease of a message claimed by the killed process short too.
    settings = msgspec.structs.replace(
        settings, webhooks=msgspec.structs.replace(settings.webhooks, timeout=1.0)
    )
    async with receiving() as receiver, serving(settings, roles=OTHER_ROLES) as api:
        hooks = Hooks(api, receiver)
        receiver.default["/down"] = Reply(503)
        endpoint = await hooks.register(api.alice, "/down")
        ids = [await hooks.test(api.alice, endpoint) for _ in range(6)]
        with RoleProcesses(settings, tmp_path) as processes:
            first = processes.start("deliver")

            async def all_tried() -> bool:
                first.ensure_running()
                return {r.id for r in receiver.at("/down")} >= set(ids)

            await eventually(all_tried, within=60, what="every message attempted and failed")
            first.kill()
            for message_id in ids:
                detail = await hooks.delivery(api.alice, endpoint, message_id)
                assert detail["status"] == "pending", detail
            receiver.default["/down"] = Reply(200)
            second = processes.start("deliver")

            async def all_delivered() -> Any:
                second.ensure_running()
                ok = [r.id for r in receiver.at("/down") if r.id in ids]
                details = [await hooks.delivery(api.alice, endpoint, i) for i in ids]
                return all(d["status"] == "succeeded" for d in details) and ok

            await eventually(all_delivered, within=60, what="every message delivered")
            second.terminate(timeout=20)
        for message_id in ids:
            detail = await hooks.delivery(api.alice, endpoint, message_id)
            succeeded = [a for a in detail["attempt_log"] if a["outcome"] == "succeeded"]
            assert len(succeeded) == 1, detail
