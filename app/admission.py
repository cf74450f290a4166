"""Node admission: which connected nodes take part in a round, and as which organisation.

A node's organisation is the name the coordinator registered its public key under
(`make register-org`, stored by the SuperLink with the key), never what the node claims: node
authentication proves the key, the registration names it. A node is refused, for the rest of the
run, when its key was registered without a name, when another connected node holds the same name,
or when its `--node-config org` differs from its registered name (a misconfigured or dishonest
node). Admitted nodes encode their data once ("prepare") and report their example counts.
"""

from __future__ import annotations

import time
from collections import Counter
from logging import ERROR, INFO, WARNING

from flwr.app import Message
from flwr.common import Code, GetPropertiesIns
from flwr.common.constant import MessageTypeLegacy
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy

from .config import RunConfig

# With fewer participants, each one can subtract its own update from the aggregate and read the
# other's: secure aggregation then hides nothing from the participants themselves.
SECAGG_MIN_PRIVATE = 3
POLL_SECONDS = 1.0


class RunFailed(RuntimeError):
    """The run cannot produce a correct result; the message says why and what to check."""


class Admission:
    def __init__(self, grid, clients: SimpleClientManager, cfg: RunConfig, org_of: dict[int, str]) -> None:
        self.grid, self.clients, self.cfg = grid, clients, cfg
        self.org_of = org_of  # node id -> registered organisation, for admitted nodes
        self.proxies: dict[int, ClientProxy] = {}
        self.counts: dict[int, int] = {}  # node id -> training examples, for prepared nodes
        self.refused: dict[int, str] = {}  # node id -> why, for the rest of the run

    def _refuse(self, nid: int, why: str) -> None:
        if nid not in self.refused:
            self.refused[nid] = why
            log(ERROR, "refused node %s: %s", nid, why)

    def _identify(self, online: dict[int, str]) -> None:
        """Refuse online nodes whose registration does not name exactly one organisation."""
        holders = Counter(name for name in online.values() if name)
        for nid, name in online.items():
            if not name:
                self._refuse(nid, "its key was registered without an organisation name (plain `flwr supernode "
                                  f"register`?). Coordinator: `flwr supernode unregister {nid} <connection>`, then "
                                  "`make register-org ORG=<name> KEY=<its .pub>`.")
            elif holders[name] > 1:
                self._refuse(nid, f"{holders[name]} connected nodes are registered as '{name}'. Coordinator: keep one "
                                  "key per organisation (`make orgs`, `make unregister-org`).")

    def _prepare_new_nodes(self) -> dict[int, str]:
        """Have unseen nodes encode their data; returns the errors of nodes that failed, by node."""
        online = {n.node_id: n.name for n in self.grid.get_nodes()}
        for gone in set(self.proxies) - set(online):
            self.clients.unregister(self.proxies.pop(gone))
            self.counts.pop(gone, None)
        self._identify(online)
        new = sorted(set(online) - set(self.proxies) - set(self.refused))
        if not new:
            return {}
        content = compat.getpropertiesins_to_recorddict(GetPropertiesIns({}))
        msgs = [Message(content=content, dst_node_id=nid, message_type=MessageTypeLegacy.GET_PROPERTIES,
                        group_id="prepare") for nid in new]
        t0 = time.perf_counter()
        # Bounded by the wait for nodes, not a stage's timeout: a node that went away never
        # answers, and must not hold the run for long.
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.node_wait_timeout))
        errors = {}
        for msg in replies:
            nid = msg.metadata.src_node_id
            org = online[nid]
            if msg.has_error():
                errors[nid] = f"{org}: {msg.error.reason}"
                continue
            res = compat.recorddict_to_getpropertiesres(msg.content)
            if res.status.code != Code.OK:
                errors[nid] = f"{org}: {res.status.message}"
                continue
            props = res.properties
            if props["org"] != org:
                self._refuse(nid, f"registered as '{org}' but configured as '{props['org']}'. Its admin: start the "
                                  f"SuperNode with --node-config org='{org}' (ORG={org}); it can join the next run.")
                continue
            proxy = GridClientProxy(node_id=nid, grid=self.grid, run_id=self.grid.run.run_id)
            self.proxies[nid] = proxy
            self.clients.register(proxy)
            self.org_of[nid] = org
            if self.cfg.org_metrics == "private":
                log(INFO, "node of %s ready (org-metrics=private: its image counts stay on the node)", org)
                continue
            self.counts[nid] = int(props["num-train"])
            log(INFO, "node of %s ready: %s train / %s held-out images, %s unreadable skipped",
                org, props["num-train"], props["num-heldout"], props["skipped-images"])
        for error in errors.values():
            log(ERROR, "a node could not prepare its data: %s", error)
        log(INFO, "prepare: %d node(s) answered in %.1f s", len(replies), time.perf_counter() - t0)
        return errors

    def participants(self, rnd: int) -> list[ClientProxy]:
        """This round's nodes: every admitted node online, once at least min-nodes are."""
        deadline = time.monotonic() + self.cfg.node_wait_timeout
        errors: dict[int, str] = {}
        while True:
            errors |= self._prepare_new_nodes()
            online = set(self.grid.get_node_ids())
            ready = [p for nid, p in sorted(self.proxies.items()) if nid in online]
            if len(ready) >= self.cfg.min_nodes:
                break
            if time.monotonic() > deadline:
                orgs = sorted(self.org_of[p.node_id] for p in ready)
                problems = list(errors.values()) + [f"node {nid} refused: {why}" for nid, why in self.refused.items()]
                raise RunFailed(
                    f"round {rnd}: {len(ready)} of min-nodes={self.cfg.min_nodes} nodes ready after "
                    f"{self.cfg.node_wait_timeout:.0f} s (ready: {orgs or 'none'})"
                    + (f"; {'; '.join(problems)}" if problems else "")
                    + ". Check that every SuperNode runs and reaches the SuperLink, or lower min-nodes."
                )
            time.sleep(POLL_SECONDS)
        if self.cfg.aggregation == "secagg+" and len(ready) < SECAGG_MIN_PRIVATE:
            log(WARNING, "!" * 78)
            log(WARNING, "round %d: only %d participants. With fewer than %d, secure aggregation hides "
                "NOTHING: each one can recover the other's update from the average.", rnd, len(ready), SECAGG_MIN_PRIVATE)
            log(WARNING, "!" * 78)
        return ready
