"""What credentials reach a backend (the proxy's header hook).

The client's `Authorization` and `x-api-key` are the gateway's credentials (the
`auth` filter checks them), so by default they are stripped before forwarding:
a backend never sees a client's key. A cluster may instead forward them
(`forward_client_auth: true`, for a gateway in front of a backend that checks the
same keys) and/or set its own credential (`backend_auth: {header, value_env}`),
read from the environment at each request so a rotated secret needs no restart.
"""

from __future__ import annotations

import os

from multidict import CIMultiDict

from gateway.config import ClusterConfig

CLIENT_CREDENTIALS = ("Authorization", "x-api-key")


def apply_upstream_auth(headers: CIMultiDict[str], cluster: ClusterConfig) -> CIMultiDict[str]:
    """Edit forwarded request headers in place for `cluster`'s credential policy."""
    if not cluster.forward_client_auth:
        for name in CLIENT_CREDENTIALS:
            headers.popall(name, None)
    auth = cluster.backend_auth
    if auth is not None:
        value = os.environ.get(auth.value_env)
        if value:
            headers[auth.header] = value
    return headers
