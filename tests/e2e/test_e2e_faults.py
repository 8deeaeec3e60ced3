"""The fault scenarios of tests/faults, against a real cluster and a real IdP (see conftest.py).

The same tools (tests/support/faults.py: the fault-injecting proxy in front of the
test IdP, the Secret sampler, the credential world, :class:`Counts`) and the same harm
counted: credentials lost, expired tokens served, refresh tokens spent twice, secrets
leaked. What a user does goes through kubectl (secret values on stdin only); what pods
see goes through ``kubectl proxy`` with the admin kubeconfig: the sampler lists the
namespace's Secrets every 150 ms from the real API server.

1. An IdP outage (503s) that covers every renewal and ends before the tokens expire,
   with the shipped backoff (the session operator): no Secret ever holds an expired token.
2. Hostile specs. A real API server checks the CRD's schema, so a spec with a wrong type,
   a huge value or a field the schema does not have is either refused by ``kubectl
   create`` (the refusal must name the field: that is what the user sees) or, if it gets
   through, must end Ready=False naming the field. Cross-namespace references never
   reach another namespace; a foreign Secret, another credential's target Secret or its
   state Secret as the target is never overwritten; templates cannot read files, loop,
   reach attributes or the refresh token; the healthy credential keeps being renewed.
3. The operator process SIGKILLed ``TOKENSYNC_E2E_KILLS`` times (default 20), at random
   and mid-refresh, and restarted each time (as a container of the same Pod: same
   identity), with the exclusion of ``tests/faults/test_operator_kills.py``: no kill
   while a refresh_token-only credential's rotated token is not yet stored. The session
   operator is stopped meanwhile (this scenario must own the only operator) and started
   again afterwards.

Each credential here is named ``f<scenario>-...`` and deleted when its scenario ends.
Each scenario prints its counts line to stderr (``-rA`` or ``-s`` shows it).
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import leaks
from support.faults import (
    CC_CLIENT,
    PASSWORD_CLIENT,
    RT_ONLY_CLIENT,
    STATUS,
    Counts,
    FaultProxy,
    KillSwitch,
    SecretSampler,
    cc_spec,
    check_refusal,
    counting,
    credential_world,
    hostile_specs,
    rotations_stored,
    scan_for_leaks,
    valid_token_problems,
)
from support.operator import eventually
from tokensync.models.credential import OAuthCredential

GROUP_VERSION = "tokensync.dev/v1alpha1"
STARTED = "tokensync started"


# -- the API server as pods see it: kubectl proxy ----------------------------------------------


@pytest.fixture(scope="module")
def api(kubectl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``kubectl proxy --port=0`` with the admin kubeconfig: ``http://127.0.0.1:PORT``, no auth needed."""
    log = tmp_path_factory.mktemp("e2e-kubectl-proxy") / "proxy.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [kubectl.binary, "--kubeconfig", kubectl.kubeconfig, "proxy", "--port=0"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not (match := re.search(r"Starting to serve on ([\d.]+:\d+)", log.read_text(errors="replace"))):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"kubectl proxy did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield f"http://{match[1]}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def get_json(api: str, path: str) -> Any:
    """GET through kubectl proxy; None for a 404."""
    try:
        with urllib.request.urlopen(api + path, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def parse_stamp(value: str) -> float:
    """An RFC 3339 UTC stamp to the second (``2026-01-01T00:00:00Z``), as the operator writes them."""
    return float(calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")))


# -- the e2e Cluster as support.faults wants it -----------------------------------------------------


class World:
    """The test namespace for :func:`credential_world` and :func:`valid_token_problems`.

    Writes go through kubectl (Secret values on stdin, and remembered for the log leak
    checks); reads, which the scenarios make many times a second, through kubectl proxy.
    """

    def __init__(self, cluster: Any, api: str) -> None:
        self.cluster = cluster
        self.api = api
        self.namespace: str = cluster.namespace

    def apply_secret(self, name: str, data: dict[str, str]) -> None:
        self.cluster.apply(self.cluster.secret(name, data))
        leaks.register(*data.values())

    def apply_credentials(self, specs: dict[str, dict[str, Any]]) -> None:
        bodies = [credential_body(name, spec) for name, spec in specs.items()]
        for body in bodies:
            OAuthCredential.model_validate(body)  # what the operator accepts: fail here, not in a wait
        self.cluster.apply(*bodies)

    def apply_until_ready(self, specs: dict[str, dict[str, Any]], timeout: float) -> None:
        self.apply_credentials(specs)
        deadline = time.monotonic() + timeout
        while not all(self.ready(name) for name in specs):
            if time.monotonic() > deadline:
                reasons = {name: (self.condition(name) or {}).get("reason") for name in specs}
                raise AssertionError(f"not all Ready within {timeout:.0f} s: {reasons}")
            time.sleep(0.2)

    def delete_credentials(self, names: Iterable[str]) -> None:
        names = list(names)
        if names:
            self.cluster.kubectl.run(
                "delete", "oauthcredential", *names, "-n", self.namespace, "--ignore-not-found",
                "--wait=true", f"--timeout={self.cluster.wait_seconds:.0f}s", check=False,
                timeout=self.cluster.wait_seconds + 30,
            )  # fmt: skip

    def credential(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        path = f"/apis/{GROUP_VERSION}/namespaces/{namespace or self.namespace}/oauthcredentials/{name}"
        body: dict[str, Any] | None = get_json(self.api, path)
        return body

    def condition(self, name: str, kind: str = "Ready") -> dict[str, Any] | None:
        conditions = ((self.credential(name) or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c.get("type") == kind), None)

    def ready(self, name: str) -> bool:
        return (self.condition(name) or {}).get("status") == "True"

    def secret(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        body: dict[str, Any] | None = get_json(
            self.api, f"/api/v1/namespaces/{namespace or self.namespace}/secrets/{name}"
        )
        return body

    def secret_data(self, name: str) -> dict[str, str] | None:
        body = self.secret(name)
        if body is None:
            return None
        data = {k: base64.b64decode(v).decode() for k, v in (body.get("data") or {}).items()}
        # Tokens belong in Secrets, nowhere else (expiry and type are public facts).
        values = [v for k, v in data.items() if k not in ("token_type", "expires_at")]
        leaks.register(*values)
        self.cluster.secret_values.update(v for v in values if len(v) >= 8)
        return data

    def leak_report(self) -> list[str]:
        """Known secrets in any credential's status or annotations, or any Event, of the namespace."""
        leaks.register(*self.cluster.secret_values)
        problems = []
        credentials = get_json(self.api, f"/apis/{GROUP_VERSION}/namespaces/{self.namespace}/oauthcredentials")
        for item in (credentials or {}).get("items") or []:
            text = json.dumps(item.get("status")) + json.dumps(item["metadata"].get("annotations"))
            problems += [f"OAuthCredential {item['metadata']['name']} status/annotations contain {hit}"
                         for hit in leaks.find(text)]  # fmt: skip
        events = get_json(self.api, f"/api/v1/namespaces/{self.namespace}/events")
        for event in (events or {}).get("items") or []:
            problems += [f"Event {event.get('reason')} contains {hit}"
                         for hit in leaks.find(f"{event.get('reason')} {event.get('message')}")]  # fmt: skip
        return problems

    def log_leaks(self, logs: dict[str, str]) -> list[str]:
        leaks.register(*self.cluster.secret_values)
        return scan_for_leaks(logs)


def credential_body(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": GROUP_VERSION, "kind": "OAuthCredential", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def world(cluster, api: str) -> World:
    return World(cluster, api)


@pytest.fixture
def counts(request: pytest.FixtureRequest) -> Iterator[Counts]:
    """This scenario's figures (:func:`support.faults.counting`, as in tests/faults)."""
    with counting(request) as result:
        yield result


def report(request: pytest.FixtureRequest, counts: Counts, seconds: float) -> None:
    """The counts line and details on stderr, and the line as a property (junit XML): then assert."""
    counts.seconds = seconds
    print(counts.line(), file=sys.stderr)
    for detail in counts.details:
        print(f"    {detail}", file=sys.stderr)
    request.node.user_properties.append(("fault counts", counts.line()))
    counts.assert_clean()


def finish(
    request: pytest.FixtureRequest, counts: Counts, world: World, operator: Any, since: int, started: float
) -> None:
    """Leaks in the namespace and the session operator's log since ``since``, its log problems: then report."""
    leaked = world.leak_report() + world.log_leaks({"operator log": operator.log()[since:]})
    counts.leaked += len(leaked)
    counts.details += leaked
    for problem in session_log_problems(operator, since):
        counts.check(False, problem)
    report(request, counts, time.monotonic() - started)


def written_expiry(data: dict[str, str]) -> float:
    return parse_stamp(data["expires_at"])


def settled_problems(world: World, idp: Any, names: list[str]) -> list[str]:
    """:func:`valid_token_problems`, asked once more a second later if it found any: an operator
    that renewed between the read of a Secret and the introspection of its token (a refresh
    revokes the previous access token) is not a lost credential; a lost one stays lost."""
    problems = valid_token_problems(world, idp, names)
    if problems:
        time.sleep(1)
        problems = valid_token_problems(world, idp, names)
    return problems


def session_log_problems(operator: Any, since: int) -> list[str]:
    """What the session operator logged since ``since`` that means it broke."""
    log = operator.log()[since:]
    problems = [] if operator.running else ["the session operator exited"]
    if "Traceback" in log:
        problems.append("the session operator logged a traceback: " + log[log.index("Traceback") :][:300])
    return problems


# -- 1. an IdP outage shorter than the token's life ----------------------------------------------

#: Tokens live 30 s and are renewed 12 s before they expire. The IdP answers 503 from
#: right after the credentials are Ready until OUTAGE_ENDS_BEFORE_EXPIRY seconds before
#: the first token expires: every renewal meets ~9.5 s of outage, less than the 12 s its
#: token had left, and with the shipped backoff (5 s doubling, closing in on the expiry)
#: some attempt lands between the outage's end and the expiry. 2.5 s rather than the
#: fault suite's 1.5 s: a real API server takes longer to store the renewed token.
OUTAGE_LIFETIME = 30
OUTAGE_RENEW_BEFORE = 12.0
OUTAGE_ENDS_BEFORE_EXPIRY = 2.5


def test_outage_shorter_than_the_token_life_is_invisible(request, cluster, world, api, make_idp, counts):
    """IdP outage outlasting backoff, within token life (real cluster)"""
    started = time.monotonic()
    operator = cluster.operator
    assert operator.running, "the session operator is not running:\n" + operator.log_tail()
    since = len(operator.log())
    idp = make_idp(fresh=True, access_token_lifetime=OUTAGE_LIFETIME)
    names: list[str] = []
    try:
        with FaultProxy(idp.url) as proxy:
            specs = credential_world(
                world, idp, proxy.token_url, refresh={"renewBefore": f"{OUTAGE_RENEW_BEFORE:.0f}s"}, prefix="fo-"
            )
            names = list(specs)
            sampler = SecretSampler([(api, world.namespace, n) for n in names], introspect=idp.introspect)
            with sampler:
                world.apply_until_ready(specs, timeout=cluster.wait_seconds)
                before = {n: (world.secret_data(n) or {}) for n in names}
                expiries = [written_expiry(data) for data in before.values()]
                planned = [parse_stamp(world.credential(n)["status"]["nextRefreshTime"]) for n in names]  # type: ignore[index]
                proxy.set_fault(STATUS, status=503)
                outage_start = time.time()
                # The outage must begin before the first renewal is due (nextRefreshTime, to the
                # second, rounded down), or it covers none: on a slow cluster the setup took too long.
                counts.check(
                    outage_start < min(planned),
                    f"the outage began {outage_start - min(planned):.1f} s after the first renewal was due",
                )
                time.sleep(max(0.0, min(expiries) - OUTAGE_ENDS_BEFORE_EXPIRY - time.time()))
                proxy.passthrough()
                counts.faults += proxy.faults
                faulted = Counter(r.client_id for r in proxy.requests if r.fault)
                counts.details.append(f"{time.time() - outage_start:.1f} s of outage; 503s by client: {dict(faulted)}")
                for client in (CC_CLIENT, PASSWORD_CLIENT, RT_ONLY_CLIENT):
                    counts.check(faulted[client] >= 2, f"{client}: only {faulted[client]} requests met the outage")
                time.sleep(max(0.0, max(expiries) + 2 - time.time()))  # every token's old expiry has passed
                counts.check(
                    eventually(lambda: not valid_token_problems(world, idp, names), 15),
                    "not every credential was Ready with an active token after the outage",
                )
                for name in names:
                    after = (world.secret_data(name) or {}).get("access_token")
                    counts.check(after != before[name].get("access_token"), f"{name}: never renewed")
            problems = settled_problems(world, idp, names)
            counts.lost = len(problems)
            counts.expired = sampler.expired_samples
            counts.spent_twice = max(idp.refresh_token_reuse_count(), proxy.refresh_tokens_spent_twice)
            counts.details += problems + sampler.violations
            counts.details.append(f"{sampler.samples} samples")
    finally:
        world.delete_credentials(names)
        idp.stop()
    finish(request, counts, world, operator, since, started)


# -- 2. hostile specs --------------------------------------------------------------------------------

HOSTILE_LIFETIME = 10


def _hostile(token_url: str, good: str, victim: str) -> dict[str, tuple[dict[str, Any], str, str]]:
    """The fault suite's hostile specs, plus Secrets another credential owns as the target:
    its target, and its state (its token set)."""
    state = f"{good}-tokensync-state"
    return {
        **hostile_specs(token_url, prefix="fh-", victim=victim, victim_secret="victim-src", foreign="fh-foreign"),
        "fh-other-target": (cc_spec(token_url, target={"secretName": good}), "SecretConflict", f"Secret {good} "),
        "fh-state-target": (cc_spec(token_url, target={"secretName": state}), "SecretConflict", f"Secret {state}"),
    }


#: Hostile specs a real API server may refuse (the CRD's schema: types, lengths,
#: patterns, unknown fields), by name prefix. The others pass any schema check.
SCHEMA_REFUSES = ("fh-type-", "fh-huge-", "fh-cross-ns-")


def test_hostile_specs(request, cluster, world, api, make_idp, counts):
    """Hostile specs: wrong types, huge, cross-namespace, foreign, templates (real cluster)"""
    started = time.monotonic()
    operator = cluster.operator
    assert operator.running, "the session operator is not running:\n" + operator.log_tail()
    since = len(operator.log())
    kubectl, namespace = cluster.kubectl, cluster.namespace
    victim = f"{namespace}-victim"
    idp = make_idp(fresh=True, access_token_lifetime=HOSTILE_LIFETIME)
    names: list[str] = []
    try:
        kubectl.apply({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": victim, "labels": {"tokensync.dev/e2e": "true"}}})  # fmt: skip
        kubectl.apply(cluster.secret("victim-src", {"secret": idp.client_secret(CC_CLIENT)}), namespace=victim)
        world.apply_secret("fh-foreign", {"mine": "do-not-touch-e2e"})
        untouched = {(victim, "victim-src"): world.secret("victim-src", victim),
                     (namespace, "fh-foreign"): world.secret("fh-foreign")}  # fmt: skip
        with FaultProxy(idp.url) as proxy:
            specs = credential_world(world, idp, proxy.token_url, password=0, refresh_token=0, prefix="fh-")
            good = next(iter(specs))
            names.append(good)
            sampler = SecretSampler([(api, namespace, good)], introspect=idp.introspect)
            with sampler:
                world.apply_until_ready(specs, timeout=cluster.wait_seconds)
                good_uid = world.credential(good)["metadata"]["uid"]  # type: ignore[index]
                untouched[(namespace, f"{good}-tokensync-state")] = world.secret(f"{good}-tokensync-state")
                hostile = _hostile(proxy.token_url, good, victim)
                refused: dict[str, str] = {}
                for name, (spec, _, _) in hostile.items():
                    result = kubectl.run("create", "-n", namespace, "-f", "-",
                                         stdin=json.dumps(credential_body(name, spec)), check=False, timeout=120)  # fmt: skip
                    counts.faults += 1
                    if result.returncode != 0:
                        refused[name] = result.stderr.strip()
                    else:
                        names.append(name)
                refreshes = world.credential(good)["status"].get("refreshCount", 0)  # type: ignore[index]
                for name, (spec, reason, field) in hostile.items():
                    if name in refused:
                        message = refused[name]
                        counts.details.append(f"{name}: refused by the API server: {message[:200]}")
                        counts.check(field in message, f"{name}: the refusal does not name {field}: {message[:300]}")
                        counts.check(
                            name.startswith(SCHEMA_REFUSES),
                            f"{name}: refused, but nothing in its schema forbids it: {message[:300]}",
                        )
                        counts.check(world.credential(name) is None, f"{name}: refused, yet it exists")
                        continue
                    stored = (world.credential(name) or {}).get("spec")
                    if stored != spec and stored is not None and name.startswith("fh-cross-ns"):
                        # An API server without strict field validation prunes unknown fields.
                        counts.details.append(f"{name}: accepted with the unknown field pruned")
                        continue
                    condition = wait_for_condition(world, name, timeout=30)
                    if condition is None:
                        counts.check(False, f"{name}: no Ready condition other than Progressing within 30 s")
                        continue
                    check_refusal(counts, name, condition, reason, field)
                    if reason != "SecretConflict":
                        counts.check(world.secret(name) is None, f"{name}: a target Secret was written")
                # The healthy credential kept being renewed all along.
                counts.check(
                    eventually(
                        lambda: (
                            (world.credential(good) or {}).get("status", {}).get("refreshCount", 0) >= refreshes + 2
                        ),
                        4 * HOSTILE_LIFETIME,
                    ),
                    f"{good} was not renewed twice in {4 * HOSTILE_LIFETIME} s after the hostile specs arrived",
                )
                target = world.secret(good) or {}
                counts.check(
                    (target.get("metadata", {}).get("annotations") or {}).get("tokensync.dev/credential") == good,
                    f"Secret {good} no longer belongs to credential {good}",
                )
                time.sleep(0.5)
            for (ns, name), before in untouched.items():
                now = world.secret(name, ns)
                if name.endswith("-tokensync-state"):  # renewals rewrite it; it must stay the good one's
                    owners = [o.get("uid") for o in ((now or {}).get("metadata") or {}).get("ownerReferences") or []]
                    counts.check(owners == [good_uid], f"{ns}/{name} changed owners: {owners}")
                    continue
                version = (before or {}).get("metadata", {}).get("resourceVersion")
                counts.check(
                    now is not None and now["metadata"]["resourceVersion"] == version, f"{ns}/{name} was modified"
                )
            counts.check(world.secret("stolen", victim) is None, f"a Secret was written in {victim}")
            problems = settled_problems(world, idp, [good])
            counts.lost = len(problems)
            counts.expired = sampler.expired_samples
            counts.details += problems + sampler.violations
    finally:
        world.delete_credentials(names)
        kubectl.run("delete", "secret", "fh-foreign", "-n", namespace, "--ignore-not-found", check=False)
        if os.environ.get("TOKENSYNC_E2E_KEEP", "") != "1":
            kubectl.run("delete", "namespace", victim, "--ignore-not-found", "--wait=false", check=False)
        idp.stop()
    finish(request, counts, world, operator, since, started)


def wait_for_condition(world: World, name: str, timeout: float) -> dict[str, Any] | None:
    """The Ready condition once it is past Progressing, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        condition = world.condition(name)
        if condition is not None and condition.get("reason") != "Progressing":
            return condition
        time.sleep(0.25)
    return None


# -- 3. the operator SIGKILLed mid-refresh ----------------------------------------------------------

#: Tokens live 10 s (the fault suite: 6 s; an operator start here is a whole `tokensync`
#: process, ~1-2 s, and the API server is slower), so renewals are nearly always due.
KILL_LIFETIME = 10
#: An expired token in a Secret is tolerated from a kill until RESTART_GRACE seconds
#: after the next operator process logged that it started (it then lists the cluster's
#: credentials and renews what is due: a few round trips to the API server).
RESTART_GRACE = 5.0
#: Every process is the same Pod's container restarted: the same identity, so a restart
#: takes back its own refresh leases; the fault suite's quick retries.
KILL_ENV = {
    "TOKENSYNC_IDENTITY": "tokensync-e2e-kills",
    "TOKENSYNC_BACKOFF_INITIAL": "0.5",
    "TOKENSYNC_BACKOFF_MAX": "2",
    "TOKENSYNC_METRICS_PORT": "0",
}
#: How long a kill may wait for the moment it wants (a token request; nothing of a
#: refresh_token-only credential in flight) before it falls back or kills anyway.
KILL_WAIT = 20.0
#: Other refresh_token-only credentials in the cluster (not behind this test's proxy) are
#: never killed near their renewal: not within this many seconds of their nextRefreshTime.
BYSTANDER_MARGIN = 3.0


@dataclass
class Window:
    """From a kill until RESTART_GRACE after the next process started: expired tokens tolerated."""

    start: float
    end: float = math.inf
    process: Any = None


def bystanders_due(api: str, bystanders: set[tuple[str, str]]) -> list[str]:
    """Which refresh_token-only credentials outside this scenario are, or are about to be, renewing.

    Killing the operator there could lose the rotated refresh token the IdP just sent
    (the window this scenario excludes for its own credentials). Their renewal is due
    at ``status.nextRefreshTime`` (to the second); until a renewal is stored and the
    status moved on, that time is in the past.
    """
    listing = get_json(api, f"/apis/{GROUP_VERSION}/oauthcredentials") or {}
    now = time.time()
    due = []
    for item in listing.get("items") or []:
        key = (item["metadata"].get("namespace", ""), item["metadata"]["name"])
        stamp = (item.get("status") or {}).get("nextRefreshTime")
        if key in bystanders and stamp and parse_stamp(stamp) - now < BYSTANDER_MARGIN:
            due.append("/".join(key))
    return due


def kill_command(command: list[str]) -> list[str]:
    """The session operator's command with ``-A``: with ``--namespace``, every start would spend
    ~70 s in kopf's fallback from listing namespaces (conftest.py), and the kills are not about scope."""
    command = list(command)
    if "--namespace" in command:
        index = command.index("--namespace")
        command[index : index + 2] = ["--all-namespaces"]
    return command


def test_operator_sigkilled_mid_refresh(request, cluster, world, api, make_idp, counts, tmp_path: Path):
    """Operator process SIGKILLed mid-refresh, restarted (real cluster)"""
    started = time.monotonic()
    session = cluster.operator
    assert session.running, "the session operator is not running:\n" + session.log_tail()
    kills = cluster.kills
    idp = make_idp(fresh=True, access_token_lifetime=KILL_LIFETIME)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    counts.details.append(f"random seed {seed}")
    command, env = kill_command(session.command), {**session.env, **KILL_ENV}
    spawned: list[Any] = []
    windows: list[Window] = []
    kinds: Counter[str] = Counter()
    kill_log: list[tuple[float, str]] = []
    names: list[str] = []
    state: dict[str, Any] = {"process": None, "killed_at": 0.0, "forced": 0, "bystander_waits": 0}
    stop_watching = threading.Event()

    def spawn() -> Any:
        process = type(session)(command, env, tmp_path / f"operator-{len(spawned):03d}.log")
        process.start()
        spawned.append(process)
        return process

    def kill() -> None:
        process = state["process"].process
        process.kill()  # SIGKILL
        process.wait(10)  # dead (and reaped) before anything else is admitted
        state["killed_at"] = time.time()

    def tolerated(t: float) -> bool:
        return any(w.start <= t <= w.end for w in list(windows))

    def watch_starts() -> None:
        """Close the open window RESTART_GRACE after its process logs that it started."""
        while not stop_watching.wait(0.05):
            window = windows[-1] if windows else None
            if window is not None and window.end == math.inf and window.process is not None:
                with contextlib.suppress(OSError):
                    if STARTED in window.process.log():
                        window.end = time.time() + RESTART_GRACE

    session.stop()
    watcher = threading.Thread(target=watch_starts, name="e2e-kill-windows", daemon=True)
    try:
        with FaultProxy(idp.url) as proxy:
            specs = credential_world(world, idp, proxy.token_url, cc=1, password=2, refresh_token=2, prefix="fk-")
            names = list(specs)
            ours = {(world.namespace, n) for n in names}
            listing = get_json(api, f"/apis/{GROUP_VERSION}/oauthcredentials") or {}
            bystanders = {
                (item["metadata"].get("namespace", ""), item["metadata"]["name"])
                for item in listing.get("items") or []
                if ((item.get("spec") or {}).get("grant") or {}).get("type") == "refresh_token"
            } - ours
            counts.details.append(f"other refresh_token-only credentials never killed near renewal: {len(bystanders)}")

            def quiet() -> bool:
                """Every refresh_token-only chain is safe (ours stored, the bystanders' not due)."""
                if not rotations_stored(proxy, api, world.namespace):
                    return False
                if bystanders and bystanders_due(api, bystanders):
                    state["bystander_waits"] += 1
                    return False
                return True

            switch = KillSwitch(proxy, quiet, kill)

            state["process"] = spawn()
            state["process"].wait_for_log(STARTED, timeout=cluster.wait_seconds)
            world.apply_until_ready(specs, timeout=cluster.wait_seconds)
            watcher.start()
            sampler = SecretSampler(
                [(api, world.namespace, n) for n in names], introspect=idp.introspect, tolerated=tolerated
            )
            kills_started = time.monotonic()
            with sampler:
                for i in range(kills):
                    kind = rng.choice(["random", "before-send", "after-answer"])
                    if kind != "random" and not switch.at(kind, KILL_WAIT):
                        kind = "random"  # no matching request in time: a random kill instead
                    if kind == "random":
                        time.sleep(rng.uniform(0.2, 4.0))
                        if not switch.now(KILL_WAIT):
                            state["forced"] += 1
                            counts.details.append("a random kill could not wait for a quiet moment: killed anyway")
                            kill()
                    assert state["process"].process.poll() is not None, "the operator survived its SIGKILL"
                    killed_at = state["killed_at"]
                    if windows and windows[-1].end == math.inf:
                        windows[-1].end = killed_at  # killed before it started: the next window goes on
                    windows.append(Window(killed_at))
                    kinds[kind] += 1
                    kill_log.append((killed_at, kind))
                    state["process"] = spawn()
                    windows[-1].process = state["process"]
                    if i == kills // 2:  # a stretch longer than a token's life with no kill at all
                        time.sleep(KILL_LIFETIME * 1.5)
                # The last process keeps running: every credential must come back and stay fresh.
                counts.check(
                    eventually(lambda: not valid_token_problems(world, idp, names), 30),
                    "not every credential was Ready with an active token 30 s after the last restart",
                )
                time.sleep(KILL_LIFETIME * 1.5)
            counts.details.append(f"kills by kind: {dict(kinds)}; {time.monotonic() - kills_started:.0f} s of kills")
            counts.details.append(
                f"{proxy.fenced_out} refresh_token requests written by a killed process, dropped; "
                f"{state['bystander_waits']} kill checks deferred for another credential's renewal"
            )
            counts.details.append(f"{sampler.samples} samples, {sampler.tolerated_samples} tolerated after restarts")
            state["process"].stop()  # SIGTERM, as a Pod ends; then nothing renews under the final checks
            problems = settled_problems(world, idp, names)
            counts.faults = sum(kinds.values())
            counts.lost = len(problems)
            counts.expired = sampler.expired_samples
            counts.spent_twice = max(idp.refresh_token_reuse_count(), proxy.refresh_tokens_spent_twice)
            counts.details += problems + sampler.violations
            counts.details.append(f"final reasons: { {n: (world.condition(n) or {}).get('reason') for n in names} }")
            counts.details.append(
                "spent twice per client (IdP): "
                + str({c: idp.refresh_token_reuse_count(c) for c in (PASSWORD_CLIENT, RT_ONLY_CLIENT)})
            )
            counts.details += proxy.reuse_report()
            counts.details += [
                f"kill {kind} at {time.strftime('%H:%M:%S', time.localtime(at))}.{int(at * 1000) % 1000:03d}"
                for at, kind in kill_log
            ]
            counts.leaked += len(leaked := world.leak_report())
            counts.details += leaked
    finally:
        stop_watching.set()
        if state["process"] is not None:
            state["process"].stop()
        world.delete_credentials(names)
        idp.stop()
        session.restart()  # later tests need it
    logs = {p.log_path.name: p.log() for p in spawned}
    leaked = world.log_leaks(logs)
    counts.leaked += len(leaked)
    counts.details += leaked
    crashed = [name for name, text in logs.items() if "Traceback" in text]
    counts.check(not crashed, f"tracebacks in the logs of {crashed}")
    counts.check(
        kinds["before-send"] + kinds["after-answer"] >= max(1, kills // 5), f"too few mid-refresh kills: {dict(kinds)}"
    )
    report(request, counts, time.monotonic() - started)
