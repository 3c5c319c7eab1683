"""OpenTelemetry tracing: W3C trace context in headers, producer and
consumer spans.

Only ``opentelemetry-api`` is a dependency. Without an SDK the API is a
no-op, and the bus skips tracing altogether (it costs a few microseconds per
message even as a no-op): ``open_bus(tracing=None)`` turns it on when a real
tracer provider is installed when the bus opens; ``tracing=provider`` uses
that provider instead of the global one.

Every span starts and ends in the same task: the producer span around the
publish in the publishing task, the consumer span around the handler call
in the actor task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from opentelemetry import propagate, trace

from ._message import Message, OutgoingMessage

__all__ = ["publish_span", "traced_handler", "tracer_for"]


def tracer_for(setting: bool | trace.TracerProvider | None) -> trace.Tracer | None:
    """The tracer the bus uses, or None for no tracing.

    None: the global provider's tracer if an SDK provider is installed;
    True: the global provider's (even a no-op); a provider: its own.
    """
    if isinstance(setting, trace.TracerProvider):
        return setting.get_tracer("trio_bus")
    if setting is None:
        setting = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return trace.get_tracer("trio_bus") if setting else None


def _attributes(system: str, topic: str, operation: str) -> dict[str, str]:
    return {
        "messaging.system": system,
        "messaging.destination.name": topic,
        "messaging.operation.type": operation,
    }


@contextmanager
def publish_span(
    tracer: trace.Tracer, system: str, records: list[OutgoingMessage]
) -> Iterator[list[OutgoingMessage]]:
    """Open one producer span per record and give back the records with the
    span's trace context injected in their headers."""
    spans = []
    out = []
    try:
        for record in records:
            span = tracer.start_span(
                f"send {record.topic}",
                kind=trace.SpanKind.PRODUCER,
                attributes=_attributes(system, record.topic, "send"),
            )
            spans.append(span)
            headers = dict(record.headers)
            propagate.inject(headers, context=trace.set_span_in_context(span))
            out.append(
                OutgoingMessage(
                    topic=record.topic,
                    value=record.value,
                    key=record.key,
                    headers=headers,
                    message_id=record.message_id,
                )
            )
        yield out
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
        raise
    finally:
        for span in spans:
            span.end()


def traced_handler(
    tracer: trace.Tracer, system: str, topic: str, call: Callable[[Message], Awaitable[None]]
) -> Callable[[Message], Awaitable[None]]:
    """Wrap *call* in a consumer span continuing the trace from the
    message's headers."""

    async def handler(message: Message) -> None:
        parent = propagate.extract(message.headers)
        with tracer.start_as_current_span(
            f"process {topic}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                **_attributes(system, topic, "process"),
                "messaging.message.attempt": message.attempt,
            },
        ):
            await call(message)

    return handler
