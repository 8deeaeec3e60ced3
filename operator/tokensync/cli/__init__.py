"""The ``tokensync`` command.

Errors are one clear line plus a hint, and a non-zero exit code; never a
traceback for a user mistake, never a secret value.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import click

from tokensync import __version__
from tokensync.models.credential import StoreBackend

__all__ = ["main"]


def _setup_logging(level: str, fmt: str) -> None:
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
        logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    else:
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        payload = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tokensync")
def main() -> None:
    """Keep OAuth2 access tokens fresh in Kubernetes Secrets."""


@main.command()
@click.option("--once", is_flag=True, help="Exit 0 once every credential has refreshed its token (for tests).")
@click.option("--lifetime", type=click.IntRange(4, 3600), default=20, show_default=True, help="Token lifetime (s).")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="With --once: give up after this.")
def demo(once: bool, lifetime: int, timeout: float) -> None:
    """Run the operator on an embedded default: API emulator, OAuth2 server, live table."""
    try:
        from tokensync.cli.demo import run_demo
    except ImportError as exc:
        raise click.ClickException(
            f"the demo needs the 'demo' extra ({exc.name} is missing): pip install 'tokensync[demo]'"
        ) from None
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = asyncio.run(run_demo(lifetime=lifetime, once=once, timeout=timeout))
    except KeyboardInterrupt:
        click.echo("stopped")
        code = 0
    sys.exit(code)


@main.command()
def crd() -> None:
    """Print the OAuthCredential CustomResourceDefinition (generated from the models)."""
    from tokensync.models.crd import crd_yaml

    click.echo(crd_yaml(), nl=False)


@main.command()
@click.option("-n", "--namespace", "namespaces", multiple=True, help="Watch only these namespaces (repeatable).")
@click.option("-A", "--all-namespaces", is_flag=True, help="Watch the whole cluster (the default).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None, help="Kubeconfig file.")
@click.option("--context", default=None, help="Kubeconfig context.")
@click.option("--store", type=click.Choice([b.value for b in StoreBackend]), default=None, help="Default store.")
@click.option("--redis-url", default=None, envvar="TOKENSYNC_REDIS_URL", help="Redis URL for the redis store.")
@click.option("--concurrency", type=int, default=None, help="Credentials renewed at the same time.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", type=click.Choice(["text", "json"]))
@click.option("--liveness", default="http://0.0.0.0:8080/healthz", help="Kopf liveness endpoint ('' to disable).")
@click.option("--metrics-port", type=int, default=None, help="Prometheus metrics port (default 9090; 0 disables).")
def run(
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    kubeconfig: str | None,
    context: str | None,
    store: str | None,
    redis_url: str | None,
    concurrency: int | None,
    log_level: str,
    log_format: str,
    liveness: str,
    metrics_port: int | None,
) -> None:
    """Run the operator."""
    from pydantic import ValidationError

    from tokensync.handlers import Wiring
    from tokensync.models.settings import OperatorSettings

    _setup_logging(log_level, log_format)
    overrides: dict[str, Any] = {}
    if namespaces and not all_namespaces:
        overrides["namespaces"] = list(namespaces)
    if store:
        overrides["default_store"] = store
    if redis_url:
        overrides["redis_url"] = redis_url
    if concurrency is not None:
        overrides["concurrency"] = concurrency
    if metrics_port is not None:
        overrides["metrics_port"] = metrics_port
    try:
        settings = OperatorSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        raise click.UsageError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    from tokensync.controller import load_configuration

    try:
        configuration = load_configuration(kubeconfig, context)
    except Exception as exc:  # kubeconfig parsing raises a zoo of types; the text names the file
        raise click.ClickException(
            f"cannot load Kubernetes credentials: {exc}\n"
            "hint: pass --kubeconfig, set KUBECONFIG, or run in a pod with a service account"
        ) from None
    wiring = Wiring(settings=settings, configuration=configuration)
    asyncio.run(run_operator(wiring, liveness=liveness or None))


async def run_operator(wiring: Any, *, liveness: str | None = None, stop: asyncio.Event | None = None) -> None:
    """The operator in this event loop, until ``stop`` is set (or forever)."""
    import kopf

    from tokensync.handlers import REGISTRY

    memo = kopf.Memo(wiring=wiring)
    settings = wiring.settings
    await kopf.operator(
        registry=REGISTRY,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        standalone=True,
        memo=memo,
        liveness_endpoint=liveness,
        stop_flag=stop,
    )


from tokensync.cli.cluster import refresh_command, status_command  # noqa: E402
from tokensync.cli.token import token_command  # noqa: E402

main.add_command(token_command)
main.add_command(status_command)
main.add_command(refresh_command)
