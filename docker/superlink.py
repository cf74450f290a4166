#!/usr/bin/env python3
"""`flower-superlink` with the Fleet guard: the SuperLink as the image and the tests start it.

    superlink.py [flower-superlink's arguments]

Flower 1.41's Fleet API checks that a request's signing key belongs to `request.node`, but never
that the messages a node pushes come from that node: a push without `reply_to_message_id` is stored
as the coordinator's instruction to whichever node it names (FLOWER.md, "Members do not trust each
other"). So one organisation could queue instructions for another. The guard refuses, before
anything reaches LinkState, a push-messages request unless every message in it is a reply from the
authenticated node to an instruction addressed to that node (docs/gateway.md, "Fleet guard").

The seam: Flower's SuperLink puts `flwr.superlink.extensions.get_middleware()` first in its
middleware list (an open-core hook that only Flower Enterprise fills). This launcher wraps it
before starting the SuperLink, so the guard runs outermost and sees the raw body.
tests/test_fleet_guard.py pins every internal it relies on.
"""

from __future__ import annotations

import os
import sys
from logging import WARNING

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.message import DecodeError
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from flwr.common.constant import FLWR_INTERNAL_GRPC_FLEET_API
from flwr.common.logger import log
from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=E0611
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES
from flwr.supercore.utils import int64_to_uint64
from flwr.superlink import extensions
from flwr.superlink.dependencies.linkstate import get_linkstate
from flwr.superlink.routers.fleet.node_auth import authenticate_node


def instruction_destination(state, message_id: str) -> int | None:
    """The node an undelivered or delivered, unexpired instruction is addressed to (None: no such
    instruction). LinkState has no public read of one instruction, so each store is read as its own
    reply check reads it (store_message_res)."""
    if isinstance(state, SqlLinkState):
        row = state.get_valid_message_ins(message_id)
        return None if row is None else int64_to_uint64(row["dst_node_id"])
    if isinstance(state, InMemoryLinkState):
        with state.lock:
            message = state.message_ins_store.get(message_id)
        return None if message is None else message.metadata.dst_node_id
    raise TypeError(f"the Fleet guard cannot read instructions from a {type(state).__name__}: "
                    "extend docker/superlink.py's instruction_destination for it")


def refusal(request: Request, push: PushMessagesRequest) -> str | None:
    """Why this push from an authenticated node must not reach LinkState, or None."""
    node = push.node.node_id
    if not push.messages_list:
        return "push-messages without a message"
    state = get_linkstate(request)
    for message in push.messages_list:
        meta = message.metadata
        if meta.src_node_id != node:
            return f"node {node} pushed a message claiming to come from node {meta.src_node_id}"
        if not meta.reply_to_message_id:
            return f"node {node} pushed a message that replies to nothing: nodes may only reply to instructions"
        destination = instruction_destination(state, meta.reply_to_message_id)
        if destination != node:
            return (f"node {node} replied to instruction {meta.reply_to_message_id}, which is "
                    + ("unknown or expired" if destination is None else f"addressed to node {destination}"))
    return None


class FleetGuard(BaseHTTPMiddleware):
    """Refuse forged Fleet pushes: only replies from the authenticated node to its own instructions."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        # Flower's own routing table decides which bodies are push-messages requests.
        if PROTOBUF_REQUEST_TYPES.get((request.method, request.url.path)) is not PushMessagesRequest:
            return await call_next(request)
        push = PushMessagesRequest()
        try:
            push.ParseFromString(await request.body())
        except DecodeError:
            return JSONResponse({"detail": "Invalid protobuf payload"}, status_code=400)
        # Authenticate first, with Flower's own check (NodeAuthMiddleware runs it again later), so
        # that an unauthenticated caller learns nothing about instructions from the answers below.
        request.state.protobuf_request = push
        try:
            await run_in_threadpool(authenticate_node, request)
        except HTTPException as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        try:
            why = await run_in_threadpool(refusal, request, push)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            # Fail closed: a push the guard could not check must not reach LinkState either.
            log(WARNING, "[FleetGuard] refused a push it could not check: %s", exc)
            return JSONResponse({"detail": "The SuperLink could not check this push"}, status_code=503)
        if why:
            log(WARNING, "[FleetGuard] refused: %s", why)
            return JSONResponse({"detail": f"Refused by the SuperLink's Fleet guard: {why}"}, status_code=403)
        return await call_next(request)


def install() -> None:
    """Put the guard first in the SuperLink's middleware, ahead of whatever Flower puts there."""
    flower_middleware = extensions.get_middleware
    if getattr(flower_middleware, "fleet_guard", False):
        return

    def get_middleware() -> tuple[Middleware, ...]:
        return (Middleware(FleetGuard), *flower_middleware())

    get_middleware.fleet_guard = True
    extensions.get_middleware = get_middleware


def main() -> None:
    # Flower can still start its legacy gRPC Fleet servicer beside the HTTP API; it would bypass
    # the guard (and the gateway, which passes HTTP only).
    if os.environ.get(FLWR_INTERNAL_GRPC_FLEET_API) == "1":
        sys.exit(f"{FLWR_INTERNAL_GRPC_FLEET_API}=1 starts Flower's gRPC Fleet API, which the Fleet guard does "
                 "not cover: unset it")
    install()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
