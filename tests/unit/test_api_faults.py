"""The fault-injecting API emulator of the fault tests (tests/support/api_faults.py).

Each fault must look to a client exactly as it would from a real API server in trouble,
and must leave the cluster in the state that server would: applied or not.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from support.api_faults import TOUCH_ANNOTATION, FaultyCluster
from tokensync.devkit.kube import RunningCluster, cluster_in_thread

SECRETS = "/api/v1/namespaces/default/secrets"


@pytest.fixture
def faulty() -> Iterator[RunningCluster]:
    with cluster_in_thread(emulator=FaultyCluster()) as cluster:
        yield cluster


def call(cluster: RunningCluster, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        cluster.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def secret(name: str, **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, **metadata}, "data": {}}


def writes(method: str, path: str) -> bool:
    return method in ("POST", "PUT", "PATCH", "DELETE")


def test_status_faults_apply_nothing_and_pass_after_their_limit(faulty):
    faulty.emulator.inject("status", match=writes, limit=2, status=429, retry_after=3)
    for _ in range(2):
        code, body = call(faulty, "POST", SECRETS, secret("s1"))
        assert (code, body["kind"], body["reason"]) == (429, "Status", "TooManyRequests")
        assert call(faulty, "GET", f"{SECRETS}/s1")[0] == 404
    assert call(faulty, "POST", SECRETS, secret("s1"))[0] == 201
    assert faulty.emulator.injected == {"status": 2}


def test_retry_after_is_sent(faulty):
    faulty.emulator.inject("status", match=writes, status=429, retry_after=3)
    request = urllib.request.Request(faulty.url + SECRETS, data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.headers["Retry-After"] == "3"


def test_applied_then_status_lands_the_write_but_answers_500(faulty):
    faulty.emulator.inject("applied-then-status", match=writes, status=500)
    code, _ = call(faulty, "POST", SECRETS, secret("s2"))
    assert code == 500
    assert call(faulty, "GET", f"{SECRETS}/s2")[0] == 200


@pytest.mark.parametrize(("mode", "applied"), [("reset", False), ("applied-then-reset", True)])
def test_resets_lose_the_answer_and_apply_only_if_said(faulty, mode, applied):
    faulty.emulator.inject(mode, match=writes)
    with pytest.raises((ConnectionError, http.client.HTTPException, urllib.error.URLError)):
        call(faulty, "POST", SECRETS, secret("s3"))
    assert call(faulty, "GET", f"{SECRETS}/s3")[0] == (200 if applied else 404)


def test_conflict_is_a_genuine_409_from_another_writer(faulty):
    _, created = call(faulty, "POST", SECRETS, secret("s4"))
    faulty.emulator.inject("conflict", match=lambda method, path: method == "PUT")
    stale = {**created, "metadata": {**created["metadata"], "labels": {"mine": "yes"}}}
    code, body = call(faulty, "PUT", f"{SECRETS}/s4", stale)
    assert (code, body["reason"]) == (409, "Conflict")
    _, current = call(faulty, "GET", f"{SECRETS}/s4")
    assert TOUCH_ANNOTATION in current["metadata"]["annotations"]  # the other writer's change
    assert int(current["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    # Read again, write again: it lands.
    fresh = {**current, "metadata": {**current["metadata"], "labels": {"mine": "yes"}}}
    assert call(faulty, "PUT", f"{SECRETS}/s4", fresh)[0] == 200


def test_drop_watches_aborts_open_watch_connections(faulty):
    call(faulty, "POST", SECRETS, secret("s5"))
    outcome: dict[str, Any] = {}
    opened = threading.Event()

    def watch() -> None:
        try:
            with urllib.request.urlopen(f"{faulty.url}{SECRETS}?watch=true&timeoutSeconds=20", timeout=30) as stream:
                outcome["first"] = json.loads(stream.readline())["type"]
                opened.set()
                outcome["rest"] = stream.read()  # blocks until the stream ends
        except (ConnectionError, http.client.HTTPException) as exc:
            outcome["error"] = type(exc).__name__
        opened.set()

    thread = threading.Thread(target=watch)
    thread.start()
    assert opened.wait(10)

    async def drop() -> int:
        return faulty.emulator.drop_watches()

    assert faulty.call(drop()) == 1
    thread.join(10)
    assert not thread.is_alive(), "the watch was not dropped"
    assert outcome["first"] == "ADDED"
    assert "error" in outcome  # aborted mid-stream (chunked): not a clean end
    assert faulty.emulator.injected["watch dropped"] == 1
