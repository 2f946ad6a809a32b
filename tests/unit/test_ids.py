"""Random ids from the buffered source: well-formed version-4 UUIDs, never repeated, also
across a fork."""

from __future__ import annotations

import os
import uuid

from almanac.ids import BATCH, new_uuid


def test_ids_are_random_version_4_uuids_and_never_repeat() -> None:
    ids = [new_uuid() for _ in range(BATCH * 3 + 5)]  # across several refills
    assert len(set(ids)) == len(ids)
    assert {i.version for i in ids} == {4}
    assert {i.variant for i in ids} == {uuid.RFC_4122}


def test_a_forked_child_does_not_hand_out_its_parents_next_ids() -> None:
    new_uuid()  # the buffer now holds the parent's next ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.close(read)
        os.write(write, b"".join(new_uuid().bytes for _ in range(8)))
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    child = {uuid.UUID(bytes=data[i : i + 16]) for i in range(0, len(data), 16)}
    parent = {new_uuid() for _ in range(8)}
    assert len(child) == 8
    assert not child & parent
