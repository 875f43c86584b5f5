"""Local-only training: each client fine-tunes its own adapter and sends nothing.

The lower reference for any federated method: a method that does not beat local-only on the
clients' own test splits gives them no reason to federate.
- Trained: A and B, each client's own, kept across rounds.
- Sent: nothing (zero bytes up and down).
- Combined: never; each client is scored with its own adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.fl.methods.base import ClientUpdate, Method, TensorDict, clone
from fedlora.fl.methods.registry import register


@register
class LocalOnly(Method):
    name = "local"
    not_mean_because = "local training sends nothing to aggregate"
    personalized = True

    def init_server(self, initial: TensorDict) -> TensorDict:
        return {}

    def init_client(self, client_id: int, initial: TensorDict) -> TensorDict:
        return clone(initial)

    def download(self, server: TensorDict, client_id: int) -> TensorDict:
        return {}

    def start_local(self, received: TensorDict, client: TensorDict) -> TensorDict:
        return client

    def upload(self, trained: TensorDict, client: TensorDict) -> tuple[TensorDict, TensorDict]:
        return {}, trained

    def aggregate(self, server: TensorDict, updates: Sequence[ClientUpdate]) -> TensorDict:
        return server

    def personal_adapter(self, server: TensorDict, client: TensorDict) -> TensorDict:
        return client

    def global_adapter(self, server: TensorDict) -> TensorDict | None:
        return None
