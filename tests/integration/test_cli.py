"""The `tokensync` command as a user runs it: a subprocess, its output and exit code."""

import os
import subprocess
import sys
from pathlib import Path

CRDS = Path(__file__).resolve().parents[2] / "crds" / "oauthcredential.yaml"


def tokensync(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from tokensync.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_demo_once_shows_tokens_landing_and_refreshing_then_exits_zero():
    result = tokensync("demo", "--once", "--lifetime", "5", "--timeout", "60")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "applied OAuthCredential billing-api (client_credentials)" in out
    assert "every credential got a token and refreshed it: done" in out
    last_table = out.rsplit("CREDENTIAL", 1)[1]
    for name in ("billing-api", "reports-user", "partner-sync"):
        row = next(line for line in last_table.splitlines() if line.startswith(name))
        assert " True " in row and "TokenIssued" in row
    assert "Traceback" not in result.stderr


def test_crd_prints_the_checked_in_crd():
    result = tokensync("crd")
    assert result.returncode == 0
    assert result.stdout == CRDS.read_text()


def test_run_rejects_bad_settings_with_one_line_naming_the_field():
    result = tokensync("run", "--concurrency", "0", "--kubeconfig", "/nonexistent")
    assert result.returncode == 2
    assert "concurrency" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_kubeconfig_serves_credentials_until_terminated(kube, kube_api, idp, tmp_path):
    import signal

    from support.operator import Cluster, eventually

    cluster = Cluster(kube_api)
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    # Output to a file, not a pipe nobody reads until the end: a full pipe would block
    # the operator's logging, and a failure shows what the operator said.
    log_path = tmp_path / "operator.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "from tokensync.cli import main; main()", "run", "--kubeconfig", str(kubeconfig),
             "--liveness", "", "--metrics-port", "0", "--log-format", "json"],
            stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        cluster.apply_credential("api", {
            "issuer": {"tokenURL": idp.token_url},
            "grant": {"type": "client_credentials", "clientID": "cc-client", "clientSecretRef": {"name": "cc", "key": "secret"}},
        })  # fmt: skip
        ready = eventually(lambda: cluster.ready("api") or process.poll() is not None, 30)
        assert ready and process.poll() is None, log_path.read_text()[-3000:]
        assert cluster.ready("api")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    stderr = log_path.read_text()
    assert process.returncode == 0, stderr[-3000:]
    assert '"level": "INFO"' in stderr  # JSON logs
    assert idp.client_secret("cc-client") not in stderr


def test_run_with_the_metrics_port_in_use_exits_naming_the_setting(kube, tmp_path):
    import socket

    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-c", "from tokensync.cli import main; main()", "run", "--kubeconfig", str(kubeconfig),
             "--liveness", "", "--metrics-port", str(port)],
            env={**os.environ, "TOKENSYNC_METRICS_ADDRESS": "127.0.0.1"},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "--metrics-port" in result.stderr
