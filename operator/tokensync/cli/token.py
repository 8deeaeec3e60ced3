"""``tokensync token``: an OAuthCredential's access token, outside any cluster.

The same YAML that ``kubectl apply`` takes, validated by the same models, turned
into the same grant the operator would send: so a credential can be tried on a
laptop before it goes to a cluster, and a workload that cannot use the operator
(no cluster, or no permission to install it) can run this as a sidecar with
``--watch --out FILE``.

The referenced Secret values come from where a user or a pod has them: files
laid out like a mounted Secret (``--secret-dir DIR``, ``DIR/<secretName>/<key>``),
environment variables (``--from-env``), or ``--secret name/key=value`` flags.

Exit codes, so scripts can tell "fix it" from "retry it": 0 success, 1 local
failure (store, output file), 2 spec or usage error, 3 permanent OAuth error
(wrong secret, rejected grant), 4 transient error (endpoint unreachable, 5xx).

The meaning of a spec (provider, URL policy, value clean-up) comes from
:mod:`tokensync.auth.spec`, shared with the operator; only where the values come
from differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NoReturn, TypeVar

import click
import httpx
import yaml
from pydantic import ValidationError

from tokensync.auth import (
    AsyncTokenManager,
    AsyncTokenStore,
    AuthProvider,
    ConfigurationError,
    InvalidClientError,
    InvalidGrantError,
    InvalidScopeError,
    PermanentTokenError,
    ReauthenticationRequired,
    TransientTokenError,
    UnauthorizedClientError,
)
from tokensync.auth.discovery import DiscoveryCache
from tokensync.auth.spec import (
    insecure_url_problem,
    normalise_secret_value,
    provider_from_spec,
    spec_references,
    ssl_context_for_ca,
)
from tokensync.controller.outcomes import InvalidSpecError
from tokensync.controller.reconciler import FingerprintedStore, describe_validation_error, inputs_hash, spec_hash
from tokensync.controller.schedule import backoff_delay, refresh_time
from tokensync.models.credential import KIND, GrantSpec, OAuthCredential, SecretKeyRef
from tokensync.models.state import StoredCredential
from tokensync.models.tokens import TokenSet, utcnow
from tokensync.stores import AsyncCredentialStore, CredentialStore, FileStore, KeyringStore, StoreError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_PERMANENT",
    "EXIT_TRANSIENT",
    "EXIT_USAGE",
    "CommandError",
    "Renewer",
    "SecretSources",
    "default_store_path",
    "env_name",
    "exit_with",
    "http_client_for",
    "human_delta",
    "load_credential",
    "parse_secret_flags",
    "render",
    "token_command",
]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PERMANENT = 3
EXIT_TRANSIENT = 4

# The operator's defaults (OperatorSettings): a token counts as expired 5 s early.
EXPIRY_SKEW = 5.0
# No jitter: it spreads many credentials of one operator, and a CLI renews one.
JITTER = 0.0
# Backoff of --watch after a transient failure, as the operator's defaults.
BACKOFF_INITIAL = 5.0
BACKOFF_MAX = 300.0

PrintFormat = Literal["token", "header", "json"]
T = TypeVar("T")


class CommandError(Exception):
    """One line saying what failed, an optional hint, and the exit code that classifies it.

    Messages name files, fields and Secret keys, never a value.
    """

    def __init__(self, message: str, *, code: int = EXIT_FAILURE, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


def exit_with(error: CommandError) -> NoReturn:
    """Print ``Error: ...`` and the hint on stderr, exit with the error's code: never a traceback."""
    click.echo(f"Error: {error}", err=True)
    if error.hint:
        click.echo(f"hint: {error.hint}", err=True)
    sys.exit(error.code)


# -- the credential --------------------------------------------------------------------


def load_credential(source: str) -> OAuthCredential:
    """The one OAuthCredential in a YAML file (``-``: stdin); other documents are skipped.

    Skipping them lets the repository's examples (a Secret, the credential, a Pod)
    be used as they are.
    """
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise CommandError(f"cannot read {source}: {reason}", code=EXIT_USAGE) from None
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        # Only the position and the problem: the parser's snippet would quote the file.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise CommandError(f"{source} is not valid YAML{where}: {problem}", code=EXIT_USAGE) from None
    candidates = [doc for doc in documents if isinstance(doc, dict) and doc.get("kind") == KIND]
    if not candidates and len(documents) == 1 and isinstance(documents[0], dict):
        candidates = documents  # validate it anyway: the error then names what is wrong (kind, apiVersion)
    if len(candidates) != 1:
        found = "no" if not candidates else str(len(candidates))
        raise CommandError(
            f"{source} holds {found} OAuthCredential documents; expected one",
            code=EXIT_USAGE,
            hint="put the OAuthCredential to use in a file of its own",
        )
    try:
        return OAuthCredential.model_validate(candidates[0])
    except ValidationError as exc:
        raise CommandError(
            f"{source}: invalid OAuthCredential: {describe_validation_error(exc)}", code=EXIT_USAGE
        ) from None


def env_name(ref: SecretKeyRef) -> str:
    """``TOKENSYNC_SECRET_<NAME>_<KEY>``, upper-cased, anything not alphanumeric as ``_``."""
    return "TOKENSYNC_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", f"{ref.name}_{ref.key}").upper()


def parse_secret_flags(flags: tuple[str, ...]) -> dict[tuple[str, str], str]:
    """``NAME/KEY=VALUE`` flags by (name, key). A malformed flag is reported without its text,
    which may be a secret typed in the wrong place."""
    parsed: dict[tuple[str, str], str] = {}
    for position, flag in enumerate(flags, start=1):
        ref, equals, value = flag.partition("=")
        name, slash, key = ref.partition("/")
        if not equals or not slash or not name or not key:
            raise CommandError(f"--secret number {position} is not of the form NAME/KEY=VALUE", code=EXIT_USAGE)
        parsed[(name, key)] = value
    return parsed


@dataclass(frozen=True)
class SecretSources:
    """Where referenced Secret values come from, in this order: flags, environment, directory.

    Read again at every renewal, so a mounted Secret that the kubelet updates
    (``--secret-dir`` in a sidecar) is picked up as the operator picks up a
    changed Secret.
    """

    flags: Mapping[tuple[str, str], str]
    directory: Path | None = None
    environ: Mapping[str, str] | None = None

    def resolve(self, refs: Mapping[str, SecretKeyRef]) -> dict[str, str]:
        values: dict[str, str] = {}
        missing: list[tuple[str, SecretKeyRef]] = []
        for path, ref in refs.items():
            value = self.flags.get((ref.name, ref.key))
            if value is None and self.environ is not None:
                value = self.environ.get(env_name(ref))
            if value is None and self.directory is not None:
                value = self._read(path, ref)
            if value is None:
                missing.append((path, ref))
            else:
                values[path] = normalise_secret_value(value)
        if missing:
            path, ref = missing[0]
            names = ", ".join(f"{p} (Secret {r.name}, key {r.key})" for p, r in missing)
            raise CommandError(
                f"no value for {names}",
                code=EXIT_USAGE,
                hint=f"pass --secret-dir DIR with a file DIR/{ref.name}/{ref.key}, or --from-env with "
                f"{env_name(ref)} set, or --secret {ref.name}/{ref.key}=...",
            )
        return values

    def _read(self, path: str, ref: SecretKeyRef) -> str | None:
        assert self.directory is not None
        file = self.directory / ref.name / ref.key
        try:
            return file.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise CommandError(f"{path}: {file} is not UTF-8 text", code=EXIT_USAGE) from None
        except OSError as exc:
            raise CommandError(f"{path}: cannot read {file}: {exc.strerror}", code=EXIT_USAGE) from None


# -- mirrors of the controller's pure pieces (see the module docstring) ----------------------


def _provider(grant: GrantSpec, values: Mapping[str, str]) -> AuthProvider:
    try:
        return provider_from_spec(grant, values)
    except ValueError as exc:
        raise InvalidSpecError(str(exc)) from None


def http_client_for(credential: OAuthCredential, values: Mapping[str, str]) -> httpx.AsyncClient:
    """The issuer's timeout, and its CA bundle (``issuer.caSecretRef``) instead of the system roots."""
    verify: ssl.SSLContext | bool = True
    ca = values.get("issuer.caSecretRef")
    if ca is not None:
        try:
            verify = ssl_context_for_ca(ca)
        except ValueError as exc:
            raise InvalidSpecError(str(exc)) from None
    return httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(credential.spec.issuer.effective_timeout()))


# -- stores ----------------------------------------------------------------------------------


def default_store_path(credential: OAuthCredential) -> Path:
    """``~/.config/tokensync/<namespace>-<name>.json`` (``$XDG_CONFIG_HOME`` when set)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tokensync" / f"{credential.metadata.namespace}-{credential.metadata.name}.json"


class _InThread(AsyncCredentialStore[T]):
    """A synchronous store behind the async manager: in a thread, because a keyring
    backend may block on D-Bus or a Keychain prompt."""

    def __init__(self, inner: CredentialStore[T]) -> None:
        self._inner = inner

    async def load(self) -> T | None:
        return await asyncio.to_thread(self._inner.load)

    async def save(self, value: T) -> None:
        await asyncio.to_thread(self._inner.save, value)

    async def clear(self) -> None:
        await asyncio.to_thread(self._inner.clear)


StoreKind = Literal["file", "keyring", "none"]


# -- getting a token ------------------------------------------------------------------------


class Renewer:
    """One credential's token manager, rebuilt when its inputs change, as the operator's is.

    The file store keeps the operator's format (:class:`StoredCredential`, the token
    set plus fingerprints of the spec and of the Secret values), so a token made for
    another client, scope or secret reads as absent instead of being handed out.
    The keyring holds bare token sets; its entries are named after the token URL
    and the client ID.
    """

    def __init__(
        self,
        credential: OAuthCredential,
        sources: SecretSources,
        *,
        store: StoreKind,
        store_path: Path | None,
        allow_insecure_http: bool,
    ) -> None:
        self.credential = credential
        self._sources = sources
        self._store_kind = store
        self._store_path = store_path or default_store_path(credential)
        self._allow_insecure_http = allow_insecure_http
        self._refs = spec_references(credential.spec)
        self._spec_fp = spec_hash(credential.spec)
        self._identity = f"{credential.metadata.namespace}/{credential.metadata.name}"
        self._discovery = DiscoveryCache()
        self._http: httpx.AsyncClient | None = None
        self._http_key: str | None = None
        self._manager: AsyncTokenManager | None = None
        self._manager_key: tuple[str, str] | None = None
        self._store: AsyncTokenStore | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def current(self) -> TokenSet:
        """The held token if it is not due by the operator's rule, else a renewed one."""
        problem = insecure_url_problem(self.credential.spec.issuer, allow_insecure_http=self._allow_insecure_http)
        if problem is not None:
            raise InvalidSpecError(problem.replace("allow insecure http explicitly", "pass --allow-insecure-http"))
        values = self._sources.resolve(self._refs)
        http = await self._client(values)
        token_url = await self._token_url(http)
        manager = self._manager_for(values, http, token_url)
        held = await self._store.load() if self._store is not None else None
        held = held or manager.token_set
        if held is None:
            return await manager.token()
        now = utcnow()
        if held.access_valid(EXPIRY_SKEW, now=now) and now < self.next_refresh(held):
            return held
        return await manager.force_refresh()

    def next_refresh(self, token_set: TokenSet) -> datetime:
        return refresh_time(
            token_set, self.credential.spec.effective_refresh(), identity=self._identity, jitter_fraction=JITTER
        )

    async def _client(self, values: Mapping[str, str]) -> httpx.AsyncClient:
        key = values.get("issuer.caSecretRef", "")
        if self._http is None or key != self._http_key:
            if self._http is not None:
                await self._http.aclose()
            self._http = http_client_for(self.credential, values)
            self._http_key = key
        return self._http

    async def _token_url(self, http: httpx.AsyncClient) -> str:
        issuer = self.credential.spec.issuer
        if issuer.token_url is not None:
            return issuer.token_url
        assert issuer.issuer_url is not None
        return await self._discovery.token_endpoint(http, issuer.issuer_url)

    def _manager_for(self, values: Mapping[str, str], http: httpx.AsyncClient, token_url: str) -> AsyncTokenManager:
        inputs_fp = inputs_hash(self._spec_fp, dict(values))
        key = (inputs_fp, token_url)
        if self._manager is None or self._manager_key != key:  # the CA bundle is an input: http follows
            grant = self.credential.spec.grant
            self._store = self._make_store(inputs_fp, token_url, grant.client_id)
            self._manager = AsyncTokenManager(
                _provider(grant, values),
                http=http,
                token_url=token_url,
                store=self._store,
                expiry_skew=EXPIRY_SKEW,
            )
            self._manager_key = key
        return self._manager

    def _make_store(self, inputs_fp: str, token_url: str, client_id: str) -> AsyncTokenStore | None:
        match self._store_kind:
            case "file":
                file = FileStore[StoredCredential](
                    self._store_path, serialize=StoredCredential.to_json, deserialize=StoredCredential.from_json
                )
                return FingerprintedStore(_InThread(file), self._spec_fp, inputs_fp)
            case "keyring":
                return _InThread(KeyringStore(for_endpoint=f"{token_url}#{client_id}"))
            case "none":
                return None


def render(token_set: TokenSet, fmt: PrintFormat) -> str:
    """What ``--print`` shows: the token, a header value, or JSON without the refresh token."""
    match fmt:
        case "token":
            return token_set.access_token.get_secret_value()
        case "header":
            return token_set.authorization_header
        case "json":
            expires = token_set.expires_at
            return json.dumps(
                {
                    "access_token": token_set.access_token.get_secret_value(),
                    "token_type": token_set.token_type,
                    "expires_at": expires.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if expires else None,
                }
            )


def _text_file(path: Path) -> FileStore[str]:
    """The output file: written like a token store (new file, mode 0600, fsync, rename)."""

    def decode(payload: str | bytes) -> str:
        return payload.decode("utf-8") if isinstance(payload, bytes) else payload

    def encode(value: str) -> str:
        return value

    return FileStore[str](path, serialize=encode, deserialize=decode)


def human_delta(seconds: float) -> str:
    """``4m``, ``1h30m``, ``3s``: how far a moment is, coarsely, as people say it."""
    total = abs(round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m"
    if total < 36000:
        hours, minutes = divmod(total // 60, 60)
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if total < 172800:
        return f"{total // 3600}h"
    return f"{total // 86400}d"


def _fail(exc: BaseException, endpoint: str | None = None) -> CommandError:
    """The one line, the hint and the exit code of a failure. Token errors are already redacted;
    the endpoint is added where the library leaves it out, because a user has several issuers."""
    text = str(exc) or type(exc).__name__
    if endpoint and isinstance(exc, TransientTokenError | ConfigurationError) and endpoint not in text:
        text = f"{text}: {endpoint}"
    match exc:
        case CommandError():
            return exc
        case InvalidSpecError():
            return CommandError(text, code=EXIT_USAGE, hint="fix the OAuthCredential spec")
        case InvalidClientError() | UnauthorizedClientError():
            hint = "check grant.clientID and the client secret or key (grant.clientSecretRef, grant.privateKeyRef)"
            return CommandError(text, code=EXIT_PERMANENT, hint=hint)
        case ReauthenticationRequired():
            return CommandError(text, code=EXIT_PERMANENT, hint="supply a new refresh token (grant.refreshTokenRef)")
        case InvalidGrantError():
            return CommandError(text, code=EXIT_PERMANENT, hint="check the username and password (or the TOTP seed)")
        case InvalidScopeError():
            return CommandError(text, code=EXIT_PERMANENT, hint="check grant.scopes")
        case ConfigurationError():
            return CommandError(text, code=EXIT_PERMANENT, hint="check issuer.tokenURL or issuer.issuerURL")
        case PermanentTokenError():
            return CommandError(text, code=EXIT_PERMANENT, hint="the token endpoint rejected the request")
        case TransientTokenError():
            return CommandError(text, code=EXIT_TRANSIENT, hint="the issuer is unavailable or unreachable; retry later")
        case StoreError():
            return CommandError(text, code=EXIT_FAILURE, hint="pass --store-path to another file, or --store none")
        case _:
            # Only the type: an unknown exception's text is not known to be free of secrets.
            return CommandError(f"unexpected {type(exc).__name__}", code=EXIT_FAILURE)


async def _once(renewer: Renewer, fmt: PrintFormat, out: Path | None) -> None:
    try:
        token_set = await renewer.current()
        if out is None:
            click.echo(render(token_set, fmt))
        else:
            await asyncio.to_thread(_text_file(out).save, render(token_set, fmt))
    finally:
        await renewer.close()


async def _watch(renewer: Renewer, fmt: PrintFormat, out: Path) -> None:
    """Keep ``out`` fresh until SIGTERM or Ctrl-C.

    A renewal in flight is finished, not cancelled, when the signal arrives: a
    rotated refresh token that was sent for but not yet stored would be lost. It is
    bounded by the issuer timeout. Transient failures back off as the operator does
    and leave the last good file in place; permanent ones end the command.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
            loop.add_signal_handler(signum, stop.set)
    target = _text_file(out)
    written: str | None = None
    failures = 0
    try:
        while not stop.is_set():
            try:
                token_set = await renewer.current()
            except (TransientTokenError, StoreError) as exc:
                failures += 1
                retry_after = exc.retry_after if isinstance(exc, TransientTokenError) else None
                delay = backoff_delay(
                    failures, initial=BACKOFF_INITIAL, maximum=BACKOFF_MAX, identity=str(out), retry_after=retry_after
                )
                click.echo(f"tokensync: {exc}; retrying in {human_delta(delay)}", err=True)
                await _sleep(stop, delay)
                continue
            failures = 0
            content = render(token_set, fmt)
            if content != written:
                await asyncio.to_thread(target.save, content)
                written = content
                expires = token_set.expires_at
                left = f"expires in {human_delta((expires - utcnow()).total_seconds())}" if expires else "no expiry"
                click.echo(f"tokensync: wrote {out} ({left})", err=True)
            delay = (renewer.next_refresh(token_set) - utcnow()).total_seconds()
            await _sleep(stop, max(delay, 1.0))
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)
        await renewer.close()
    click.echo("tokensync: stopped", err=True)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


@click.command("token")
@click.option(
    "-f",
    "--filename",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="The OAuthCredential manifest (YAML, '-' for stdin); other documents in it are skipped.",
)
@click.option(
    "--secret-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Secret values as files DIR/<secretName>/<key>, like mounted Secrets.",
)
@click.option(
    "--secret",
    "secret_flags",
    multiple=True,
    metavar="NAME/KEY=VALUE",
    help="A Secret value (repeatable). Visible in the process list: prefer --secret-dir or --from-env.",
)
@click.option("--from-env", is_flag=True, help="Secret values from TOKENSYNC_SECRET_<NAME>_<KEY> variables.")
@click.option(
    "--print",
    "print_format",
    type=click.Choice(["token", "header", "json"]),
    default="token",
    show_default=True,
    help="The access token, an Authorization header value, or JSON (no refresh token).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file (mode 0600).")
@click.option("--watch", is_flag=True, help="With --out: keep the file fresh until SIGTERM or Ctrl-C.")
@click.option(
    "--store",
    type=click.Choice(["file", "keyring", "none"]),
    default="file",
    show_default=True,
    help="Where tokens are kept between runs.",
)
@click.option(
    "--store-path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The file store's path (default ~/.config/tokensync/<namespace>-<name>.json).",
)
@click.option("--allow-insecure-http", is_flag=True, help="Allow plain http:// to a non-loopback issuer.")
def token_command(
    filename: str,
    secret_dir: Path | None,
    secret_flags: tuple[str, ...],
    from_env: bool,
    print_format: PrintFormat,
    out: Path | None,
    watch: bool,
    store: StoreKind,
    store_path: Path | None,
    allow_insecure_http: bool,
) -> None:
    """Get an access token for an OAuthCredential, outside any cluster.

    \b
    Exit codes: 0 ok, 1 local failure (store, output file), 2 spec or usage error,
    3 permanent OAuth error (e.g. invalid_client), 4 transient error (retry later).
    """
    if watch and out is None:
        exit_with(CommandError("--watch needs --out FILE", code=EXIT_USAGE))
    if store_path is not None and store != "file":
        exit_with(CommandError("--store-path applies to --store file only", code=EXIT_USAGE))
    logging.basicConfig(level=logging.WARNING, format="tokensync: %(levelname)s: %(message)s", force=True)
    endpoint: str | None = None
    try:
        credential = load_credential(filename)
        endpoint = credential.spec.issuer.token_url or credential.spec.issuer.issuer_url
        sources = SecretSources(
            flags=parse_secret_flags(secret_flags),
            directory=secret_dir,
            environ=dict(os.environ) if from_env else None,
        )
        renewer = Renewer(
            credential, sources, store=store, store_path=store_path, allow_insecure_http=allow_insecure_http
        )
        if watch:
            assert out is not None
            asyncio.run(_watch(renewer, print_format, out))
        else:
            asyncio.run(_once(renewer, print_format, out))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        exit_with(_fail(exc, endpoint))
