"""Reconcile, scheduling and Secret writing: everything the operator decides.

Nothing here imports kopf; :mod:`tokensync.handlers` feeds watch events in.
"""

from tokensync.controller.kube import KubeClient, bearer_header, load_configuration
from tokensync.controller.reconciler import REFRESH_ANNOTATION, Controller, Key
from tokensync.controller.redis_backend import redis_store_factory

__all__ = [
    "REFRESH_ANNOTATION",
    "Controller",
    "Key",
    "KubeClient",
    "bearer_header",
    "load_configuration",
    "redis_store_factory",
]
