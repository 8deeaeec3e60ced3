"""The operator process SIGKILLed mid-refresh, again and again, and restarted each time.

The API emulator runs in this test process and serves the operator over HTTP, so the
cluster's state (CRs, target and state Secrets) survives every death. Tokens live
6 s, so renewals are nearly always in flight. Kills are of three kinds:

* ``random``: at a random moment of the operator's life;
* ``before-send``: when a token request reaches the IdP's proxy, which drops it (the
  IdP never sees the request);
* ``after-answer``: once the IdP has answered (and rotated the refresh token), before
  the operator hears: the response dies with the operator.

Harm counted: a credential that does not end Ready with an active token (lost; a
refresh_token-only credential whose chain broke is lost), a Secret holding an expired
token outside the allowed window after a restart, a refresh token spent twice
(counted by the IdP and the proxy), and secrets in the operator's logs, Events or
status.

One window is left alone on purpose: from a refresh_token-only credential's request
leaving the operator until the operator stored the rotated token the IdP answered
with. A kill there destroys the only copy of the new refresh token, and with an IdP
that has no reuse grace period no client can recover from that (there is nothing to
re-authenticate with). So a kill happens only when no such request is in flight at
the proxy and every refresh token such a credential was sent is in a state Secret;
the proxy admits no request while it checks and kills, and drops one the killed
process wrote but the proxy had not read yet (``FaultProxy.kill_if``).
"""

from __future__ import annotations

import random
import time

import pytest

from support.faults import (
    PASSWORD_CLIENT,
    RT_ONLY_CLIENT,
    FaultProxy,
    KillSwitch,
    SecretSampler,
    credential_world,
    rotations_stored,
    tally_harm,
    valid_token_problems,
)
from support.operator import Cluster, eventually

LIFETIME = 6
KILLS = 50
#: "After restart no Secret holds an expired token longer than one refresh takes": an
#: expired token in a Secret is tolerated from a kill until RESTART_GRACE seconds after
#: the next operator process was started (its start-up, ~0.5 s forked from a warm
#: parent, plus one refresh, well under a second, with room for a loaded CI machine).
RESTART_GRACE = 3.0
#: Every process is the same pod's container restarted: the same identity (the Pod name,
#: as the manifests set TOKENSYNC_IDENTITY), so a restart takes back its own refresh leases.
SETTINGS = {
    "namespaces": ["default"],
    "metrics_port": 0,
    "backoff_initial": 0.5,
    "backoff_max": 2.0,
    "identity": "tokensync-7d9f8-x2x4q",
}


@pytest.mark.timeout(300)
def test_operator_sigkilled_mid_refresh(counts, kube, kube_api, make_idp, operators):
    """Operator process SIGKILLed mid-refresh, restarted"""
    idp = make_idp(access_token_lifetime=LIFETIME)
    idp.reset_counters()
    cluster = Cluster(kube_api)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    counts.details.append(f"random seed {seed}")
    windows: list[tuple[float, float]] = []  # (killed at, next process started at + RESTART_GRACE)
    kinds: dict[str, int] = {}
    kill_log: list[tuple[float, str]] = []

    def tolerated(t: float) -> bool:
        return any(start <= t <= end for start, end in windows)

    with FaultProxy(idp.url) as proxy:
        specs = credential_world(cluster, idp, proxy.token_url, cc=1, password=2, refresh_token=2)
        names = list(specs)

        state = {"pid": operators.spawn(kube.url, SETTINGS, "kills.log")}

        def kill() -> None:
            operators.kill(state["pid"])

        switch = KillSwitch(proxy, lambda: rotations_stored(proxy, kube.url, "default"), kill)

        cluster.apply_until_ready(specs, timeout=40)
        sampler = SecretSampler(
            [(kube.url, "default", n) for n in names], introspect=lambda t: idp.introspect(t), tolerated=tolerated
        )
        started = time.monotonic()
        with sampler:
            for i in range(KILLS):
                kind = rng.choice(["random", "before-send", "after-answer"])
                if kind != "random" and not switch.at(kind, 8):
                    kind = "random"  # no matching request in time: a random kill instead
                if kind == "random":
                    time.sleep(rng.uniform(0.1, 2.0))
                    if not switch.now(10):
                        counts.details.append("a random kill could not wait for refresh tokens to be stored")
                        kill()
                killed_at = time.time()
                assert not operators.alive(state["pid"])
                kinds[kind] = kinds.get(kind, 0) + 1
                kill_log.append((killed_at, kind))
                state["pid"] = operators.spawn(kube.url, SETTINGS, "kills.log")
                windows.append((killed_at, time.time() + RESTART_GRACE))
                if i == KILLS // 2:  # a stretch longer than a token's life with no kill at all
                    time.sleep(LIFETIME * 1.5)
            # The last process keeps running: every credential must come back and stay fresh.
            counts.check(
                eventually(lambda: not valid_token_problems(cluster, idp, names), 20),
                "not every credential was Ready with an active token 20 s after the last restart",
            )
            time.sleep(LIFETIME * 1.5)
        counts.details.append(f"kills by kind: {kinds}; {time.monotonic() - started:.0f} s of kills and checks")
        counts.details.append(f"{proxy.fenced_out} refresh_token requests written by a killed process, dropped")
        counts.details.append(f"{sampler.samples} samples, {sampler.tolerated_samples} tolerated after restarts")
        operators.terminate(state["pid"])
        counts.faults = sum(kinds.values())
        tally_harm(counts, cluster, idp, names, sampler, proxy, logs={"operator log": operators.log_text()})
        reasons = {n: (cluster.condition(n) or {}).get("reason") for n in names}
        counts.details.append(f"final reasons: {reasons}")
        counts.details.append(
            "spent twice per client (IdP): "
            + str({c: idp.refresh_token_reuse_count(c) for c in (PASSWORD_CLIENT, RT_ONLY_CLIENT)})
        )
        counts.details += proxy.reuse_report()
        counts.details += [
            f"kill {kind} at {time.strftime('%H:%M:%S', time.localtime(at))}.{int(at * 1000) % 1000:03d}"
            for at, kind in kill_log
        ]
    counts.check(
        kinds.get("before-send", 0) + kinds.get("after-answer", 0) >= 10, f"too few mid-refresh kills: {kinds}"
    )
    counts.assert_clean()
