"""Registering the servicers with request decoding that refuses cleanly.

The generated `add_*Servicer_to_server` functions decode requests with
`Message.FromString`; a request that does not parse (a corrupt wire format, a
string field that is not UTF-8) then raises inside grpcio, and the caller gets
UNKNOWN. Here the same handlers are built from the service descriptors, with a
decoder that turns such a request into INVALID_ARGUMENT (ErrorInfo + BadRequest,
like every other bad input) before any servicer code runs: nothing changes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from callcredit_server.errors import invalid

__all__ = ["UndecodableRequest", "register"]

Context = grpc.aio.ServicerContext[Any, Any]


class UndecodableRequest(Exception):
    """A request message that is not a valid encoding of its type.

    The decoder hands one over in place of the request. Raised out of a Control
    stream's request iterator (the servicer ends the stream with the status it
    carries); unary requests are refused before the servicer sees them.
    """

    def __init__(self, type_name: str) -> None:
        self.status = invalid("request", f"is not a valid {type_name} message")
        super().__init__(self.status.message)


def _decoder(message: type[Message]) -> Callable[[bytes], Message | UndecodableRequest]:
    """`message.FromString`, handing over (not raising) an UndecodableRequest for bytes
    that do not parse: grpcio would turn a raised one into UNKNOWN."""
    name = message.DESCRIPTOR.name

    def decode(data: bytes) -> Message | UndecodableRequest:
        try:
            return message.FromString(data)
        except DecodeError:
            return UndecodableRequest(name)

    return decode


def _unary(
    method: Callable[[Any, Context], Awaitable[Any]],
) -> Callable[[Any, Context], Awaitable[Any]]:
    async def handle(request: Any, context: Context) -> Any:
        if isinstance(request, UndecodableRequest):
            await context.abort_with_status(rpc_status.to_status(request.status))
        return await method(request, context)

    return handle


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, UndecodableRequest):
            raise request
        yield request


def _streaming(
    method: Callable[[AsyncIterator[Any], Context], AsyncGenerator[Any, None]],
) -> Callable[[AsyncIterator[Any], Context], AsyncGenerator[Any, None]]:
    # An async generator function itself: grpcio serves those by iterating them
    # (anything else it awaits, expecting the servicer to call context.write).
    async def handle(requests: AsyncIterator[Any], context: Context) -> AsyncGenerator[Any, None]:
        responses = method(_checked(requests), context)
        try:
            async for response in responses:
                yield response
        finally:
            await responses.aclose()

    return handle


def _server_streaming(
    method: Callable[[Any, Context], AsyncGenerator[Any, None]],
) -> Callable[[Any, Context], AsyncGenerator[Any, None]]:
    async def handle(request: Any, context: Context) -> AsyncGenerator[Any, None]:
        if isinstance(request, UndecodableRequest):
            await context.abort_with_status(rpc_status.to_status(request.status))
        responses = method(request, context)
        try:
            async for response in responses:
                yield response
        finally:
            await responses.aclose()

    return handle


def _serialized(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """`serialize`, except that a response already serialized (bytes) goes as it is:
    WatchEvents encodes each event once for all of its streams."""

    def serializer(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serializer


def _handler(servicer: object, method: MethodDescriptor, messages: ModuleType) -> Any:
    request = getattr(messages, method.input_type.name)
    response = getattr(messages, method.output_type.name)
    implementation = getattr(servicer, method.name)
    decode = _decoder(request)
    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _streaming(implementation),
            request_deserializer=decode,
            response_serializer=response.SerializeToString,
        )
    if not (method.client_streaming or method.server_streaming):
        return grpc.unary_unary_rpc_method_handler(
            _unary(implementation),
            request_deserializer=decode,
            response_serializer=response.SerializeToString,
        )
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _server_streaming(implementation),
            request_deserializer=decode,
            response_serializer=_serialized(response.SerializeToString),
        )
    raise ValueError(f"{method.full_name}: client-streaming methods are not served")


def register(
    server: grpc.aio.Server, servicer: object, service: ServiceDescriptor, messages: ModuleType
) -> None:
    """Serve `servicer`'s implementation of `service`, whose messages are in `messages`."""
    handlers = {method.name: _handler(servicer, method, messages) for method in service.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
