"""A real OAuth2/OIDC identity provider on loopback, for tests and ``tokensync demo``.

Built on django-oauth-toolkit (DOT), so token issuance, refresh-token rotation with
reuse protection, introspection and revocation are a maintained server library's
behaviour, not a mock's. What DOT lacks (``private_key_jwt``, TOTP on the password
grant, per-client auth-method policy) is added through its validator hook, see
:mod:`tokensync.devkit.idp.validator`.

Two ways to run it, one implementation (:func:`start_idp`):

* in-process: ``with start_idp(IdpConfig(...)) as idp: ... idp.token_url``
* as a process: ``python -m tokensync.devkit.idp --port 0 --config c.json --state-dir d``
  prints ``READY http://127.0.0.1:PORT`` once it serves.

Importing this package does not import Django; :func:`start_idp` does.
"""

from __future__ import annotations

from tokensync.devkit.idp.client import IdpAdmin, IdpAdminError
from tokensync.devkit.idp.config import ClientConfig, IdpConfig, UserConfig
from tokensync.devkit.idp.server import RunningIdp, start_idp

__all__ = ["ClientConfig", "IdpAdmin", "IdpAdminError", "IdpConfig", "RunningIdp", "UserConfig", "start_idp"]
