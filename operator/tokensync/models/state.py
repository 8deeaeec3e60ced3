"""What the operator keeps per credential in its CredentialStore.

The token set alone is not enough to survive a restart correctly: the operator
must also know *which inputs* produced it, or a changed spec or a rotated client
secret would go unnoticed until the next refresh. Two fingerprints are kept:

* ``spec_hash`` covers the non-secret inputs (issuer, grant settings, which
  Secrets are referenced). It is compared on every reconcile, for free.
* ``inputs_hash`` also covers the *values* of the referenced Secrets. Computing it
  needs those Secrets, so it is compared whenever they are read anyway (before
  any grant or refresh, and when a watched source Secret changes). It lives only
  in the store, next to the refresh token, never in status or annotations.
* ``bootstrap_hash`` covers only the bootstrap refresh token of a ``refresh_token``
  credential. While it is unchanged, a changed spec or client secret continues
  the stored refresh-token chain: starting again from the bootstrap token would
  present a token that was spent at the first exchange, which servers with reuse
  protection answer by revoking the whole family.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from tokensync.models.tokens import TokenSet

__all__ = ["StoredCredential"]


class StoredCredential(BaseModel):
    model_config = ConfigDict(frozen=True)

    token_set: TokenSet
    spec_hash: str
    inputs_hash: str
    bootstrap_hash: str = ""

    def to_json(self) -> str:
        """Serialise with secrets revealed: for a CredentialStore only."""
        return json.dumps(
            {
                "spec_hash": self.spec_hash,
                "inputs_hash": self.inputs_hash,
                "bootstrap_hash": self.bootstrap_hash,
                "token_set": self.token_set.to_dict(),
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> StoredCredential:
        raw: Any = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("stored credential is not a JSON object")
        return cls(
            token_set=TokenSet.model_validate(raw.get("token_set")),
            spec_hash=str(raw.get("spec_hash", "")),
            inputs_hash=str(raw.get("inputs_hash", "")),
            bootstrap_hash=str(raw.get("bootstrap_hash", "")),
        )
