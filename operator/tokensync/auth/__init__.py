"""OAuth2 token library: grant providers, token managers and the error tree.

Nothing here knows about Kubernetes; the operator builds these objects from its
custom resources, and applications use them directly::

    import httpx
    from tokensync.auth import ClientCredentialsAuth, TokenManager
    from tokensync.stores import FileStore

    manager = TokenManager(
        ClientCredentialsAuth("my-client", client_secret),
        http=httpx.Client(timeout=10),
        token_url="https://idp.example.com/oauth2/token",
        store=FileStore.for_tokens("~/.config/my-app/token.json"),
    )
    response = httpx.get(url, headers={"Authorization": manager.authorization_header()})
"""

from tokensync.auth.client_auth import (
    CLIENT_AUTH_METHODS,
    ClientAuth,
    ClientAuthMethod,
    ClientSecretBasic,
    ClientSecretPost,
    PrivateKeyJWT,
    PublicClient,
    client_auth_for,
)
from tokensync.auth.errors import (
    ConfigurationError,
    EndpointUnreachableError,
    InvalidClientError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidResponseError,
    InvalidScopeError,
    OAuthError,
    PermanentTokenError,
    RateLimitedError,
    ReauthenticationRequired,
    ResponseLostError,
    ServerUnavailableError,
    TokenError,
    TokenTransportError,
    TransientTokenError,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
)
from tokensync.auth.manager import AsyncTokenManager, AsyncTokenStore, Superseded, TokenManager, TokenStore
from tokensync.auth.providers import (
    DEFAULT_CLIENT_ID,
    AuthProvider,
    ClientCredentialsAuth,
    ClientOptions,
    PasswordAuth,
    RefreshTokenAuth,
    Totp,
)
from tokensync.models.tokens import TokenSet

__all__ = [
    "CLIENT_AUTH_METHODS",
    "DEFAULT_CLIENT_ID",
    "AsyncTokenManager",
    "AsyncTokenStore",
    "AuthProvider",
    "ClientAuth",
    "ClientAuthMethod",
    "ClientCredentialsAuth",
    "ClientOptions",
    "ClientSecretBasic",
    "ClientSecretPost",
    "ConfigurationError",
    "EndpointUnreachableError",
    "InvalidClientError",
    "InvalidGrantError",
    "InvalidRequestError",
    "InvalidResponseError",
    "InvalidScopeError",
    "OAuthError",
    "PasswordAuth",
    "PermanentTokenError",
    "PrivateKeyJWT",
    "PublicClient",
    "RateLimitedError",
    "ReauthenticationRequired",
    "RefreshTokenAuth",
    "ResponseLostError",
    "ServerUnavailableError",
    "Superseded",
    "TokenError",
    "TokenManager",
    "TokenSet",
    "TokenStore",
    "TokenTransportError",
    "Totp",
    "TransientTokenError",
    "UnauthorizedClientError",
    "UnsupportedGrantTypeError",
    "client_auth_for",
]
