"""The readings API as a state machine: random sequences of client requests keep its promises.

Runs on the embedded profile (a fresh app per example); the same rules hold on both
profiles, which the example-based tests beside this file check.
"""

from __future__ import annotations

import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from litestar.testing import TestClient

from almanac.app import create_app
from almanac.bootstrap import bootstrap
from tests.conftest import embedded_settings
from tests.factories import birth_json

OWNERS = ("alice", "bob")
KEYS = ("k1", "k2", "k3")
valid_birth = st.fixed_dictionaries(
    {
        "date": st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 12, 31)).map(str),
        "time": st.sampled_from(["00:00", "06:15", "12:00", "23:59:59"]),
        "timezone": st.sampled_from(["UTC", "+05:30", "America/New_York", "Asia/Tokyo"]),
        "latitude": st.floats(min_value=-66, max_value=66, allow_nan=False),
        "longitude": st.floats(min_value=-180, max_value=180, allow_nan=False),
    }
)
valid_body = st.fixed_dictionaries(
    {"birth": valid_birth, "kind": st.sampled_from(["natal", "love", "career"])},
    optional={
        "label": st.text(
            alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20
        )
    },
)
bad_body = st.sampled_from(
    [
        ({"birth": birth_json(latitude=120)}, "birth.latitude"),
        ({"birth": birth_json(date="2021-13-01")}, "birth.date"),
        ({"birth": birth_json(timezone="Atlantis/Capital")}, "birth.timezone"),
        ({"birth": birth_json(), "kind": "horoscope"}, "kind"),
        ({"birth": birth_json(), "label": "tab\there"}, "label"),
        ({"birth": birth_json(), "label": "nul\x00"}, "label"),
    ]
)


class ReadingsApi(RuleBasedStateMachine):
    readings = Bundle("readings")

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory()
        conf = embedded_settings(Path(self._tmp.name))
        self.container = bootstrap(conf)
        self.client = TestClient(create_app(conf, self.container)).__enter__()
        self.keys = {
            owner: self.container.keyring.issue(name=owner, role="client", owner=owner).secret
            for owner in OWNERS
        }
        self.by_key: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {}
        self.accepted = 0

    def _post(self, owner: str, body: dict[str, Any], key: str | None) -> Any:
        headers = {"Authorization": f"Bearer {self.keys[owner]}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        return self.client.post("/api/v1/readings", json=body, headers=headers)

    def _requested(self) -> int:
        events = self.container.store.read_sync(0, 100_000)
        return sum(1 for e in events if e.type == "reading.requested")

    @rule(
        target=readings,
        owner=st.sampled_from(OWNERS),
        body=valid_body,
        key=st.none() | st.sampled_from(KEYS),
    )
    def post_reading(self, owner: str, body: dict[str, Any], key: str | None) -> Any:
        response = self._post(owner, body, key)
        remembered = self.by_key.get((owner, key)) if key else None
        if remembered is not None and remembered[0] != body:
            assert response.status_code == 422
            assert response.json()["errors"][0]["field"] == "Idempotency-Key"
            return None
        assert response.status_code == 202, response.text
        accepted = response.json()
        if remembered is not None:
            assert accepted == remembered[1], "a replay returns the original response"
        else:
            self.accepted += 1
            if key:
                self.by_key[(owner, key)] = (body, accepted)
        return (owner, accepted, body)

    @rule(owner=st.sampled_from(OWNERS), bad=bad_body)
    def post_bad_reading(self, owner: str, bad: tuple[dict[str, Any], str]) -> None:
        body, field = bad
        response = self._post(owner, body, None)
        assert response.status_code == 422
        assert field in [e["field"] for e in response.json()["errors"]]

    @rule(reading=consumes(readings), reader=st.sampled_from(OWNERS))
    def get_reading(self, reading: Any, reader: str) -> None:
        if reading is None:
            return
        owner, accepted, body = reading
        response = self.client.get(
            f"/api/v1/readings/{accepted['id']}?min_position={accepted['position']}",
            headers={"Authorization": f"Bearer {self.keys[reader]}"},
        )
        if reader != owner:
            assert response.status_code == 404
            return
        assert response.status_code == 200, response.text
        view = response.json()
        assert view["kind"] == body["kind"] and view["label"] == body.get("label")
        assert view["position"] >= accepted["position"]

    @invariant()
    def every_accepted_reading_was_appended_once(self) -> None:
        assert self._requested() == self.accepted

    def teardown(self) -> None:
        self.client.__exit__(None, None, None)
        self._tmp.cleanup()


ReadingsApi.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_readings_api_keeps_its_promises = ReadingsApi.TestCase
