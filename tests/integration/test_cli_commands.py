"""`tokensync token`, `status` and `refresh` as a user runs them: a subprocess against the real
IdP (and, for the cluster commands, the API emulator with the real operator running)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import leaks
from support.idp import ALICE_PASSWORD, CC_SECRET, PW_SECRET
from support.operator import Cluster, running_operator, wait_until

COMMAND = [sys.executable, "-c", "from tokensync.cli import main; main()"]


def tokensync(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert "Traceback" not in result.stderr, result.stderr
    # Never a secret in what the command says (stdout of `token` is the access token, by request).
    hits = leaks.find(result.stdout + result.stderr)
    assert not hits, hits
    return result


def credential(path: Path, issuer: dict, grant: dict, name: str = "api", **spec) -> Path:
    body = {
        "apiVersion": "tokensync.dev/v1alpha1",
        "kind": "OAuthCredential",
        "metadata": {"name": name},
        "spec": {"issuer": issuer, "grant": grant, **spec},
    }
    # A Secret in the same file, as in the repository's examples: skipped by `token -f`.
    other = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cc"}, "stringData": {"secret": "change-me"}}
    path.write_text(yaml.safe_dump_all([other, body]))
    return path


def cc_grant(**extra) -> dict:
    return {
        "type": "client_credentials",
        "clientID": "cc-client",
        "clientSecretRef": {"name": "cc", "key": "secret"},
        **extra,
    }


def secret_dir(root: Path, values: dict[str, str]) -> Path:
    """Files laid out like mounted Secrets: root/<secret>/<key>, with the newline `echo` leaves."""
    for ref, value in values.items():
        name, key = ref.split("/")
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / key).write_text(value + "\n")
    return root


@pytest.fixture
def home(tmp_path) -> dict[str, str]:
    """HOME and XDG_CONFIG_HOME in tmp_path, so the default file store never touches the real one."""
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config")}


# -- token ------------------------------------------------------------------------------------


def test_client_credentials_with_secrets_from_a_directory_prints_an_active_token(idp, tmp_path, home):
    spec = credential(tmp_path / "cred.yaml", {"tokenURL": idp.token_url}, cc_grant())
    secrets = secret_dir(tmp_path / "secrets", {"cc/secret": CC_SECRET})
    result = tokensync("token", "-f", str(spec), "--secret-dir", str(secrets), "--print", "token", env=home)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert "\n" not in token
    assert idp.introspect(token)["active"] is True

    header = tokensync("token", "-f", str(spec), "--secret-dir", str(secrets), "--print", "header", env=home)
    assert header.stdout == f"Bearer {token}\n"  # the stored token, as a header value


def test_password_grant_with_secrets_from_env_and_discovery_prints_json(idp, tmp_path, home):
    grant = {
        "type": "password",
        "clientID": "pw-client",
        "clientSecretRef": {"name": "pw", "key": "secret"},
        "usernameRef": {"name": "alice-login", "key": "user.name"},
        "passwordRef": {"name": "alice-login", "key": "password"},
    }
    spec = credential(tmp_path / "cred.yaml", {"issuerURL": idp.issuer_url}, grant)
    env = {
        **home,
        "TOKENSYNC_SECRET_PW_SECRET": PW_SECRET,
        "TOKENSYNC_SECRET_ALICE_LOGIN_USER_NAME": "alice",
        "TOKENSYNC_SECRET_ALICE_LOGIN_PASSWORD": ALICE_PASSWORD,
    }
    result = tokensync("token", "-f", str(spec), "--from-env", "--print", "json", "--store", "none", env=env)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) == {"access_token", "token_type", "expires_at"}  # never the refresh token
    assert printed["token_type"] == "Bearer" and printed["expires_at"].endswith("Z")
    introspection = idp.introspect(printed["access_token"])
    assert introspection["active"] is True and introspection["username"] == "alice"


def test_the_file_store_serves_the_second_run_without_a_token_request(idp, tmp_path, home):
    spec = credential(tmp_path / "cred.yaml", {"tokenURL": idp.token_url}, cc_grant())
    secrets = secret_dir(tmp_path / "secrets", {"cc/secret": CC_SECRET})
    first = tokensync("token", "-f", str(spec), "--secret-dir", str(secrets), env=home)
    assert first.returncode == 0, first.stderr
    store = Path(home["XDG_CONFIG_HOME"]) / "tokensync" / "default-api.json"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    idp.reset_counters()
    second = tokensync("token", "-f", str(spec), "--secret-dir", str(secrets), env=home)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert idp.token_request_count("cc-client") == 0
    # A token made with other inputs is not handed out: a wrong secret now fails at the IdP.
    wrong = tokensync("token", "-f", str(spec), "--secret", "cc/secret=not-the-secret-1", env=home)
    assert wrong.returncode == 3, wrong.stderr
    assert idp.token_request_count("cc-client") == 1


def test_bad_yaml_and_invalid_specs_exit_2_naming_the_problem(tmp_path, home):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    result = tokensync("token", "-f", str(bad), env=home)
    assert result.returncode == 2
    assert "not valid YAML at line" in result.stderr

    spec = credential(tmp_path / "cred.yaml", {"tokenURL": "https://idp.example/token"}, {"type": "client_credentials"})
    result = tokensync("token", "-f", str(spec), env=home)
    assert result.returncode == 2
    assert result.stderr.startswith("Error: ") and "spec.grant.clientID: Field required" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    spec = credential(tmp_path / "cred.yaml", {"tokenURL": "https://idp.example/token"}, cc_grant())
    result = tokensync("token", "-f", str(spec), env=home)  # no secret source at all
    assert result.returncode == 2
    assert "grant.clientSecretRef (Secret cc, key secret)" in result.stderr
    assert "TOKENSYNC_SECRET_CC_SECRET" in result.stderr

    result = tokensync("token", "-f", str(spec), "--secret", "just-a-value-secret", env=home)
    assert result.returncode == 2 and "NAME/KEY=VALUE" in result.stderr


def test_a_wrong_client_secret_exits_3_with_invalid_client(idp, tmp_path, home):
    spec = credential(tmp_path / "cred.yaml", {"tokenURL": idp.token_url}, cc_grant())
    wrong = "wrong-test-secret-value"
    result = tokensync("token", "-f", str(spec), "--secret", f"cc/secret={wrong}", "--store", "none", env=home)
    assert result.returncode == 3
    assert "invalid_client" in result.stderr
    assert "hint: " in result.stderr
    assert result.stdout == ""


def test_an_unreachable_issuer_exits_4(tmp_path, home):
    spec = credential(tmp_path / "cred.yaml", {"tokenURL": "http://127.0.0.1:9/token"}, cc_grant())
    result = tokensync("token", "-f", str(spec), "--secret", f"cc/secret={CC_SECRET}", "--store", "none", env=home)
    assert result.returncode == 4
    assert "unreachable" in result.stderr


def test_watch_keeps_the_file_fresh_and_exits_0_on_sigterm(make_idp, tmp_path, home):
    idp = make_idp(access_token_lifetime=4)
    spec = credential(tmp_path / "cred.yaml", {"tokenURL": idp.token_url}, cc_grant())
    secrets = secret_dir(tmp_path / "secrets", {"cc/secret": CC_SECRET})
    out = tmp_path / "run" / "token"
    process = subprocess.Popen(
        [*COMMAND, "token", "-f", str(spec), "--secret-dir", str(secrets), "--watch", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **home},
    )
    try:
        wait_until(lambda: out.exists() or process.poll() is not None, timeout=15, what="the token file")
        assert process.poll() is None
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        first = out.read_text()
        assert idp.introspect(first)["active"] is True
        wait_until(lambda: out.read_text() != first, timeout=10, what="a renewed token in the file")
        assert idp.introspect(out.read_text())["active"] is True
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert stdout == ""
    assert "Traceback" not in stderr and not leaks.find(stderr)
    assert f"wrote {out}" in stderr


# -- status and refresh ------------------------------------------------------------------------


def test_status_and_refresh_wait_against_the_operator(kube, kube_api, idp, tmp_path):
    cluster = Cluster(kube_api)
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    kubeconfig = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
    spec = {"issuer": {"tokenURL": idp.token_url}, "grant": cc_grant()}
    with running_operator(kube.url):
        cluster.apply_credential("api", spec)
        wait_until(lambda: cluster.ready("api"), what="Ready")
        first = cluster.secret_data("api")["access_token"]

        result = tokensync("status", "--kubeconfig", kubeconfig)
        assert result.returncode == 0, result.stderr
        header, row = result.stdout.splitlines()
        assert header.split() == [
            "NAMESPACE",
            "NAME",
            "GRANT",
            "READY",
            "REASON",
            "EXPIRES-IN",
            "NEXT-REFRESH",
            "SECRET",
        ]
        assert row.split()[:5] == ["default", "api", "client_credentials", "True", "TokenIssued"]
        assert " in 59m " in row or " in 1h " in row  # expiry of a one-hour token
        assert row.split()[-1] == "api"
        everywhere = tokensync("status", "-A", "--kubeconfig", kubeconfig)
        assert everywhere.stdout == result.stdout
        empty = tokensync("status", "-n", "elsewhere", "--kubeconfig", kubeconfig)
        assert empty.returncode == 0 and "No OAuthCredentials found in namespace elsewhere" in empty.stderr

        result = tokensync("refresh", "api", "--kubeconfig", kubeconfig, "--wait", "--timeout", "20")
        assert result.returncode == 0, result.stderr
        requested, renewed = result.stdout.splitlines()
        value = requested.rsplit("=", 1)[1].rstrip(")")
        assert requested.startswith(
            "oauthcredential default/api: refresh requested (tokensync.dev/refresh-requested-at="
        )
        assert "token renewed, expires at " in renewed
        body = cluster.credential("api")
        assert body["metadata"]["annotations"]["tokensync.dev/refresh-requested-at"] == value
        assert body["status"]["handledRefreshRequest"] == value
        assert cluster.secret_data("api")["access_token"] != first

        missing = tokensync("refresh", "nope", "--kubeconfig", kubeconfig)
        assert missing.returncode == 1
        assert "OAuthCredential nope not found in namespace default" in missing.stderr
