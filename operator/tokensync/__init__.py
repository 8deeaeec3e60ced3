"""tokensync: OAuth2 access tokens kept fresh, in Kubernetes Secrets or in your own process.

The package is layered, top to bottom (import-linter enforces it, see ``pyproject.toml``)::

    cli         the ``tokensync`` command
    handlers    thin kopf handlers: validate once, delegate
    controller  reconcile, scheduling, Secret writing
    stores      CredentialStore[T] backends        auth   grants, TokenManager (no Kubernetes)
    models      pydantic models: TokenSet, the OAuthCredential CRD, settings
"""

__version__ = "0.1.0"
