"""Small, Django-free parsers for what arrives on the wire."""

from __future__ import annotations

import base64
import binascii
from urllib.parse import unquote_plus

__all__ = ["JWT_BEARER_ASSERTION_TYPE", "basic_client_id"]

#: RFC 7523 §2.2 ``client_assertion_type`` of a JWT client assertion.
JWT_BEARER_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def basic_client_id(credentials: str) -> str | None:
    """The client_id in ``Authorization: Basic <credentials>`` (RFC 6749 §2.3.1 encoding).

    Only the id is returned; the secret half is never kept.
    """
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    client_id, sep, _ = decoded.partition(":")
    return unquote_plus(client_id) if sep else None
