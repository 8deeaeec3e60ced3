"""Hostile specs applied while the operator serves a healthy credential.

The API emulator does not enforce the CRD's schema (clusters that skip CEL, or a
client that sends whatever it likes, get the same treatment), so every body below
reaches the operator as written. Each must end Ready=False with a reason and a short
message naming the field; foreign Secrets stay untouched; the healthy credential keeps
being renewed (no expired token in its Secret); nothing in the operator crashes.
"""

from __future__ import annotations

import logging
import time

import kubernetes.client

from support.faults import (
    FaultProxy,
    SecretSampler,
    check_refusal,
    credential_world,
    hostile_specs,
    valid_token_problems,
)
from support.operator import Cluster, eventually, running_operator, wait_until
from tokensync.models.settings import OperatorSettings


class _Crashes(logging.Handler):
    """Records logged with a traceback: an exception nobody handled on purpose."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.name.startswith(("tokensync", "kopf")):
            self.records.append(f"{record.name}: {record.getMessage()[:200]}")


def test_hostile_specs(counts, kube, kube_api, make_idp):
    """Hostile specs: wrong types, huge, cross-namespace, foreign, templates"""
    idp = make_idp(access_token_lifetime=6)
    cluster = Cluster(kube_api)
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespace({"metadata": {"name": "victim"}})
    Cluster(kube_api, "victim").apply_secret("cc-src", {"secret": idp.client_secret("cc-client")})
    cluster.apply_secret("foreign", {"mine": "do-not-touch"})
    untouched = {
        ("victim", "cc-src"): core.read_namespaced_secret("cc-src", "victim").metadata.resource_version,
        ("default", "foreign"): core.read_namespaced_secret("foreign", "default").metadata.resource_version,
    }
    crashes = _Crashes()
    logging.getLogger().addHandler(crashes)
    try:
        with FaultProxy(idp.url) as proxy:
            specs = credential_world(cluster, idp, proxy.token_url, password=0, refresh_token=0)
            good = next(iter(specs))
            hostile = hostile_specs(proxy.token_url)
            sampler = SecretSampler([(kube.url, "default", good)], introspect=lambda t: idp.introspect(t))
            settings = OperatorSettings(backoff_initial=0.5, backoff_max=2, metrics_port=0)
            with running_operator(kube.url, settings=settings) as operator, sampler:
                cluster.apply_credential(good, specs[good])
                wait_until(lambda: cluster.ready(good), timeout=20, what="good Ready")
                for name, (spec, _, _) in hostile.items():
                    cluster.apply_credential(name, spec)
                    counts.faults += 1
                refreshes = cluster.credential(good)["status"].get("refreshCount", 0)
                for name, (_, reason, field) in hostile.items():
                    try:
                        condition = wait_until(
                            lambda name=name: (c := cluster.condition(name)) and c["reason"] != "Progressing" and c,
                            timeout=20,
                            what=f"{name} condition",
                        )
                    except AssertionError as exc:
                        counts.check(False, f"{name}: no condition: {exc}")
                        continue
                    check_refusal(counts, name, condition, reason, field)
                    counts.check(
                        cluster.secret(name) is None or name == "foreign-target",
                        f"{name}: a target Secret was written for an invalid spec",
                    )
                # The healthy credential kept being renewed all along (6 s tokens).
                counts.check(
                    eventually(lambda: cluster.credential(good)["status"].get("refreshCount", 0) >= refreshes + 2, 20),
                    f"{good} was not renewed twice after the hostile specs arrived",
                )
                counts.check(
                    operator.thread.is_alive() and not operator.errors, f"the operator died: {operator.errors}"
                )
                time.sleep(0.5)
            for (namespace, name), version in untouched.items():
                now = core.read_namespaced_secret(name, namespace).metadata.resource_version
                counts.check(now == version, f"{namespace}/{name} was modified")
            counts.check(Cluster(kube_api, "victim").secret("stolen") is None, "a Secret was written in victim")
            counts.check(not crashes.records, f"unhandled exceptions logged: {crashes.records[:5]}")
            problems = valid_token_problems(cluster, idp, [good])
            counts.lost = len(problems)
            counts.expired = sampler.expired_samples
            leaked = cluster.leak_report()
            counts.leaked += len(leaked)
            counts.details += problems + sampler.violations + leaked
    finally:
        logging.getLogger().removeHandler(crashes)
    counts.assert_clean()
