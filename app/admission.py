"""Node admission: which connected nodes take part in a round, and as which organisation.

A node's organisation is the name the coordinator registered its public key under
(`make register-org`, stored by the SuperLink with the key), never what the node claims: node
authentication proves the key, the registration names it. A node is refused, for the rest of the
run, when its key was registered without a name, when another connected node holds the same name,
or when its `--node-config org` differs from its registered name (a misconfigured or dishonest
node). Admitted nodes encode their data once ("prepare") and report their example counts.

A node is also refused for the rest of the run when it misbehaves: a prepare reply without its
organisation or with counts that are not counts, more training examples than max-weight-per-org (its
weight would outweigh the cap), or later a malformed or inconsistent round reply (app/aggregate.py,
`expel`). Each refusal is logged with the node's name and reason, kept for metrics.jsonl
(`refused_orgs`) and counted in Prometheus (fedlora_org_refused); the run goes on while min-nodes
remain. A node that answers with an error (it declined, or failed) is not refused: it is asked again.

One exception, for trying the app on one machine: in Flower's Simulation Engine nothing is
registered (simulated nodes have no key and no name), so there a node is named by its own node
config (org-N for partition N-1, app/config.py). Whether the run is a simulation is decided by the
grid Flower hands the ServerApp (`InMemoryGrid`: the Simulation Engine's, in the same process as
the nodes), never by a run setting: a deployment's ServerApp always gets a grid to a SuperLink, so
its nodes are still admitted by registration only.

Preparing is asked for without waiting on it: a first-time encoding of a large folder can take far
longer than nodes take to connect, so it has its own bound (prepare-timeout), and a node that joins
mid-run never holds up the nodes that are ready; it takes part from the round after it answers.
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

from . import metrics
from .config import RunConfig

# With fewer participants, each one can subtract its own update from the aggregate and read the
# other's: secure aggregation then hides nothing from the participants themselves.
SECAGG_MIN_PRIVATE = 3
# A prepare reply, or a node that connects, is seen within this; each poll is two or three requests.
POLL_SECONDS = 0.25
# In the error of a node whose organisation has not approved this run's app bundle (docker/bundle_guard.py):
# it will not run this code, so it is not asked again this run.
BUNDLE_REFUSED = "refused app bundle sha256:"


class RunFailed(RuntimeError):
    """The run cannot produce a correct result; the message says why and what to check."""


class Admission:
    def __init__(self, grid, clients: SimpleClientManager, cfg: RunConfig, org_of: dict[int, str],
                 simulated: bool = False) -> None:
        self.grid, self.clients, self.cfg = grid, clients, cfg
        self.simulated = simulated  # Flower's Simulation Engine: no registration, names from node config
        self.org_of = org_of  # node id -> registered organisation, for admitted nodes
        self.proxies: dict[int, ClientProxy] = {}
        self.counts: dict[int, int] = {}  # node id -> training examples, for prepared nodes
        self.refused: dict[int, str] = {}  # node id -> why, for the rest of the run
        self.refused_names: dict[int, str] = {}  # node id -> its organisation (or "node N"), for records
        self.preparing: dict[str, tuple[int, str, float]] = {}  # prepare message id -> (node id, org, when sent)
        self.started = False  # whether a round has had its participants chosen

    def _refuse(self, nid: int, why: str, name: str | None = None) -> None:
        if nid not in self.refused:
            self.refused[nid] = why
            self.refused_names[nid] = name = name or self.org_of.get(nid) or f"node {nid}"
            metrics.org_view().refused.labels(name).inc()
            log(ERROR, "refused node %s: %s", nid, why)

    def expel(self, nid: int, why: str) -> None:
        """A node that sent a malformed or inconsistent reply: it takes no further part in this run,
        exactly as if it had gone away; the run fails only if fewer than min-nodes remain."""
        org = self.org_of.get(nid, f"node {nid}")
        self._refuse(nid, f"{org} {why}; it takes no further part in this run", org)
        proxy = self.proxies.pop(nid, None)
        if proxy is not None:
            self.clients.unregister(proxy)
        self.counts.pop(nid, None)

    def refused_orgs(self) -> dict[str, str]:
        """Every node refused so far in this run, by organisation: why."""
        return {self.refused_names[nid]: why for nid, why in self.refused.items()}

    def _online(self) -> dict[int, str]:
        """Online nodes: id -> registered organisation (in simulation: its name once prepared, a label before)."""
        nodes = self.grid.get_nodes()
        if self.simulated:
            return {n.node_id: self.org_of.get(n.node_id, f"simulated node {n.node_id}") for n in nodes}
        return {n.node_id: n.name for n in nodes}

    def _identify(self, online: dict[int, str]) -> None:
        """Refuse online nodes whose registration does not name exactly one organisation."""
        if self.simulated:
            return  # nothing is registered: a simulated node is named by its prepare reply (_admit)
        holders = Counter(name for name in online.values() if name)
        for nid, name in online.items():
            if not name:
                self._refuse(nid, "its key was registered without an organisation name (plain `flwr supernode "
                                  f"register`?). Coordinator: `flwr supernode unregister {nid} <connection>`, then "
                                  "`make register-org ORG=<name> KEY=<its .pub>`.")
            elif holders[name] > 1:
                self._refuse(nid, f"{holders[name]} connected nodes are registered as '{name}'. Coordinator: keep one "
                                  "key per organisation (`make orgs`, `make unregister-org`).", name)

    def _prepare_new_nodes(self) -> dict[int, str]:
        """Ask unseen nodes to encode their data and admit those whose answers have arrived, without
        waiting; returns the errors of nodes that failed or went away while preparing, by node."""
        online = self._online()
        for gone in set(self.proxies) - set(online):
            self.clients.unregister(self.proxies.pop(gone))
            self.counts.pop(gone, None)
        self._identify(online)
        errors = {}
        for mid, (nid, org, _) in list(self.preparing.items()):
            if nid not in online:  # its reply will never come; if it returns, it is asked again
                del self.preparing[mid]
                errors[nid] = f"{org}: went offline before answering prepare (see its SuperNode log)"
        asked = {nid for nid, _, _ in self.preparing.values()}
        new = sorted(set(online) - set(self.proxies) - set(self.refused) - asked)
        if new:
            content = compat.getpropertiesins_to_recorddict(GetPropertiesIns({}))
            msgs = [Message(content=content, dst_node_id=nid, message_type=MessageTypeLegacy.GET_PROPERTIES,
                            group_id="prepare") for nid in new]
            for mid, nid in zip(self.grid.push_messages(msgs), new):
                if mid:  # Flower returns None for a message it could not push: asked again next poll
                    self.preparing[mid] = (nid, online[nid], time.monotonic())
        replies = list(self.grid.pull_messages(list(self.preparing))) if self.preparing else []
        for msg in replies:
            nid, _, sent = self.preparing.pop(msg.metadata.reply_to_message_id, (None, None, 0.0))
            if nid not in online:  # also None: a reply to nothing this run asked
                continue
            error = self._admit(nid, online[nid], msg)
            if error:
                errors[nid] = error
            elif nid in self.proxies:
                log(INFO, "prepare: %s answered in %.1f s", self.org_of.get(nid, online[nid]), time.monotonic() - sent)
        for error in errors.values():
            log(ERROR, "a node could not prepare its data: %s", error)
        return errors

    def _admit(self, nid: int, org: str, msg: Message) -> str | None:
        """Admit a node from its prepare reply; returns the error if it could not prepare."""
        if msg.has_error():
            if BUNDLE_REFUSED in msg.error.reason:
                self._refuse(nid, f"{org}: {msg.error.reason}")
                return None
            return f"{org}: {msg.error.reason}"
        res = compat.recorddict_to_getpropertiesres(msg.content)
        if res.status.code != Code.OK:
            return f"{org}: {res.status.message}"
        props = res.properties
        claimed = props.get("org")
        if not isinstance(claimed, str) or not claimed.strip():
            self._refuse(nid, f"{org}'s prepare reply names no organisation (org={claimed!r}): it runs other code than "
                              "this app", org)
            return None
        if self.simulated:
            org = claimed
            if org in {self.org_of[n] for n in self.proxies}:
                self._refuse(nid, f"another simulated node is already '{org}'", org)
                return None
        elif claimed != org:
            self._refuse(nid, f"registered as '{org}' but configured as '{claimed}'. Its admin: start the "
                              f"SuperNode with --node-config org='{org}' (ORG={org}); it can join the next run.", org)
            return None
        if self.cfg.org_metrics != "private":
            why = self._bad_counts(props)
            if why:
                self._refuse(nid, f"{org} {why}", org)
                return None
        proxy = GridClientProxy(node_id=nid, grid=self.grid, run_id=self.grid.run.run_id)
        self.proxies[nid] = proxy
        self.clients.register(proxy)
        self.org_of[nid] = org
        if self.cfg.org_metrics == "private":
            log(INFO, "node of %s ready (org-metrics=private: its image counts stay on the node)", org)
            return None
        self.counts[nid] = int(props["num-train"])
        log(INFO, "node of %s ready: %s train / %s held-out images, %s unusable skipped",
            org, props["num-train"], props["num-heldout"], props["skipped-images"])
        return None

    def _bad_counts(self, props) -> str | None:
        """Why a prepare reply's counts cannot be used, or None."""
        for key in ("num-train", "num-heldout", "skipped-images"):
            value = props.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "num-train" else 0):
                return f"reported {key}={value!r} at prepare, not a count: it runs other code than this app"
        cap = self.cfg.max_weight_per_org
        if props["num-train"] > cap:
            return (f"reported {props['num-train']} training images, more than max-weight-per-org={cap}: no "
                    "organisation may outweigh that cap. Coordinator: raise max-weight-per-org if the count is real; "
                    "the organisation can also train on a subset of its images")
        return None

    def _still_preparing(self) -> dict[int, tuple[str, bool]]:
        """Nodes asked to prepare that have not answered: node id -> (org, still within prepare-timeout)."""
        now = time.monotonic()
        return {nid: (org, now - sent < self.cfg.prepare_timeout) for nid, org, sent in self.preparing.values()}

    def participants(self, rnd: int) -> list[ClientProxy]:
        """This round's nodes: every admitted node online, once at least min-nodes are.

        Waits node-wait-timeout for nodes to connect, and longer while a node is still preparing
        within prepare-timeout. The first round also waits for every node still preparing, so that
        every connected organisation trains from round 1 and round 0's held-out loss covers them all;
        later rounds never wait for a joiner."""
        t0 = time.monotonic()
        errors: dict[int, str] = {}
        while True:
            errors |= self._prepare_new_nodes()
            online = set(self.grid.get_node_ids())
            ready = [p for nid, p in sorted(self.proxies.items()) if nid in online]
            preparing = self._still_preparing()
            # A node whose preparation failed is asked again on every poll: it is not worth waiting for.
            waiting = [nid for nid, (_, within) in preparing.items() if within and nid not in errors]
            if len(ready) >= self.cfg.min_nodes and (self.started or not waiting):
                break
            if time.monotonic() - t0 > self.cfg.node_wait_timeout and not waiting:
                orgs = sorted(self.org_of[p.node_id] for p in ready)
                problems = [e for nid, e in errors.items() if nid not in self.proxies]
                problems += [f"{org}: online, but no answer to prepare within prepare-timeout="
                             f"{self.cfg.prepare_timeout:g} s: still encoding its images? (its SuperNode log shows "
                             "the progress) A first run on a large folder takes long: raise prepare-timeout"
                             for nid, (org, _) in sorted(preparing.items()) if nid not in errors]
                problems += [f"node {nid} refused: {why}" for nid, why in self.refused.items()]
                raise RunFailed(
                    f"round {rnd}: {len(ready)} of min-nodes={self.cfg.min_nodes} nodes ready after "
                    f"{time.monotonic() - t0:.0f} s (ready: {orgs or 'none'})"
                    + (f"; {'; '.join(problems)}" if problems else "")
                    + ". Check that every SuperNode runs and reaches the SuperLink, or lower min-nodes."
                )
            time.sleep(POLL_SECONDS)
        self.started = True
        if self.cfg.aggregation == "secagg+" and len(ready) < SECAGG_MIN_PRIVATE:
            log(WARNING, "!" * 78)
            log(WARNING, "round %d: only %d participants. With fewer than %d, secure aggregation hides "
                "NOTHING: each one can recover the other's update from the average.", rnd, len(ready), SECAGG_MIN_PRIVATE)
            log(WARNING, "!" * 78)
        return ready
