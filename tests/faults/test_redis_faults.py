"""Redis killed (SIGKILL) and restarted under an operator that keeps its tokens there.

The Redis holds credentials, so it runs as one should for that: append-only file,
fsync on every write (a SIGKILL loses nothing Redis acknowledged). While it is down,
the operator keeps serving from memory and says so on the credential
(StoreUnavailable); once Redis is back that goes away, and nothing is lost.
"""

from __future__ import annotations

import shutil
import time

from support.faults import FaultProxy, SecretSampler, credential_world, tally_harm
from support.operator import Cluster, eventually, running_operator
from support.redis_server import RedisServer
from tokensync.models.settings import OperatorSettings

LIFETIME = 10
REFRESH = {"renewBeforePercentage": 50}  # every renewal leaves 5 s; Redis stays down longer than that
DOWN_AT_LEAST = 6.0
CYCLES = 2


def _store_unavailable(cluster: Cluster, name: str) -> bool:
    for condition in ((cluster.credential(name) or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "StoreUnavailable" and condition.get("status") == "True":
            return True
        if condition.get("reason") == "StoreUnavailable":
            return True
    return False


def test_redis_killed_and_restarted(counts, kube, kube_api, make_idp, tmp_path):
    """Redis SIGKILLed and restarted (Redis store)"""
    executable = shutil.which("redis-server")
    assert executable is not None, "redis-server is not on PATH: run `bash scripts/ensure-redis`"
    redis_server = RedisServer(executable, tmp_path, persistent=True)
    redis_server.start()
    idp = make_idp(access_token_lifetime=LIFETIME)
    idp.reset_counters()
    cluster = Cluster(kube_api)
    try:
        with FaultProxy(idp.url) as proxy:
            specs = credential_world(cluster, idp, proxy.token_url, refresh=REFRESH)
            names = list(specs)
            settings = OperatorSettings(
                default_store="redis", redis_url=redis_server.url, backoff_initial=0.5, backoff_max=2, metrics_port=0
            )
            sampler = SecretSampler([(kube.url, "default", n) for n in names], introspect=lambda t: idp.introspect(t))
            with running_operator(kube.url, settings=settings), sampler:
                cluster.apply_until_ready(specs)
                for cycle in range(CYCLES):
                    redis_server.kill()
                    counts.faults += 1
                    down = time.monotonic()
                    reported = eventually(lambda: any(_store_unavailable(cluster, n) for n in names), 3 * LIFETIME)
                    counts.check(
                        reported, f"cycle {cycle}: no credential reported StoreUnavailable while Redis was down"
                    )
                    time.sleep(max(0.0, DOWN_AT_LEAST - (time.monotonic() - down)))  # the outage lasts this long
                    counts.details.append(f"cycle {cycle}: Redis down {time.monotonic() - down:.1f} s")
                    redis_server.start()
                    counts.check(
                        eventually(lambda: not any(_store_unavailable(cluster, n) for n in names), 3 * LIFETIME),
                        f"cycle {cycle}: StoreUnavailable stayed after Redis came back",
                    )
                    counts.check(
                        eventually(lambda: all(cluster.ready(n) for n in names), 3 * LIFETIME),
                        f"cycle {cycle}: not all Ready after Redis came back: "
                        + str({n: (cluster.condition(n) or {}).get("reason") for n in names}),
                    )
                    # A little steady state after each restart: a full renewal round on Redis.
                    time.sleep(LIFETIME / 2)
            tally_harm(counts, cluster, idp, names, sampler, proxy)
            counts.details += proxy.reuse_report()
            counts.details.append(f"{sampler.samples} samples")
    finally:
        redis_server.stop()
    counts.assert_clean()
