"""Pydantic models: the bottom layer, imported by every other layer and importing none."""

from tokensync.models.tokens import TokenSet, jwt_expiry, utcnow

__all__ = ["TokenSet", "jwt_expiry", "utcnow"]
