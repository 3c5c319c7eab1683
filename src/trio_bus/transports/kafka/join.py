"""Joining a group's consumer to its subscriptions' topics (asyncio side).

A group's ``AIOKafkaConsumer`` is subscribed to the union of its
subscriptions' topics; every change of that set is a rejoin, i.e. a
rebalance of the whole group (eager protocol: every member gives up every
partition, then the leader assigns anew). Rejoins are therefore shared:

* :meth:`Joiner.add` takes any number of subscriptions (``subscribe_many``
  hands all of them at once): it learns the partitions of all their topics
  with one metadata request, re-subscribes the consumer **once**, and
  waits for the one assignment that covers them all;
* concurrent adds (plain ``subscribe`` calls started together) each
  re-subscribe as soon as their metadata is known; since they wait for the
  same metadata answer, they re-subscribe in the same loop turn, and
  aiokafka folds subscription changes that arrive while a join is under
  way into the next join.

A subscription is live once an assignment whose join included its topic
has arrived and every assigned partition has a position (resolved by the
group's ``on_assigned`` before it calls :meth:`Joiner.assigned`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ...errors import BusClosedError, TransportUnavailableError
from .._base import StartPosition
from .errors import retrieve_when_done
from .options import KafkaOptions

if TYPE_CHECKING:
    from aiokafka import TopicPartition

    from .consumer import KafkaConsumer

__all__ = ["Joiner"]

#: Seconds between metadata requests while a topic's partitions are unknown.
_METADATA_RETRY = 0.05
#: Kafka API key of JoinGroup, and its "rejoin with this member id" answer.
_JOIN_GROUP, _MEMBER_ID_REQUIRED = 11, 79


class Joiner:
    """The topics a group's consumer is subscribed to, and the subscribe
    calls waiting for a join that includes theirs.

    Attributes:
        subscribed: Topics the consumer is subscribed to (or about to be).
        starts: Where a partition of each topic starts when the group has
            no committed offset for it (the first subscription's ``start``).
    """

    def __init__(
        self,
        name: str,
        options: KafkaOptions,
        routes: dict[str, list[KafkaConsumer]],
        subscribe: Callable[[Sequence[str]], None],
    ) -> None:
        self._name = name
        self._options = options
        self._routes = routes
        # Re-subscribes the consumer to the given topics (none: unsubscribe).
        self._subscribe = subscribe
        self.subscribed: set[str] = set()
        self.starts: dict[str, StartPosition] = {}
        self.client: Any = None
        # Joins under way by topic (several topics may share one).
        self._joining: dict[str, asyncio.Future[None]] = {}
        # Subscriptions waiting for a join that includes all of their topics.
        self._waiters: list[tuple[frozenset[str], asyncio.Future[None]]] = []
        self.closed = False
        # (generation, member -> topics) of the last assignment this member
        # computed as the group's leader.
        self._led: tuple[int, dict[str, set[str]]] | None = None
        # Member ids the broker gave this consumer (some abandoned), and it.
        self._own_ids: set[str] = set()
        self._coordinator: Any = None

    async def add(self, subs: Sequence[KafkaConsumer]) -> None:
        """Route *subs* here; return once the group assigned all their topics.

        On failure or cancellation none of *subs* stays routed.
        """
        for sub in subs:
            self._routes.setdefault(sub.topic, []).append(sub)
            self.starts.setdefault(sub.topic, sub.spec.start)
        topics = {sub.topic for sub in subs}
        try:
            waits = {self._joining[t] for t in topics if t in self._joining}
            new = sorted(t for t in topics if t not in self._joining and t not in self.subscribed)
            if new:
                waits.add(await self._join(new))
            for done in waits:
                await self._wait_assigned(done, topics)
        except BaseException:
            # No orphan route may hold records nobody fetches (their
            # partitions' commit points would never move).
            if any([self.drop_route(sub) for sub in subs]):  # noqa: C419 - drop every one
                self.resubscribe()
            raise

    async def _join(self, topics: list[str]) -> asyncio.Future[None]:
        """Subscribe to *topics* as soon as their partitions are known; the
        returned future completes with the assignment that includes them.
        Adds of these topics arriving meanwhile wait for the same future."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        retrieve_when_done(done)  # the adds waiting for it may all be gone
        for topic in topics:
            self._joining[topic] = done
        done.add_done_callback(lambda _: self._forget(topics, done))
        try:
            await self._wait_partitions_known(topics)
            self.subscribed.update(topics)
            self._waiters.append((frozenset(topics), done))
            self.resubscribe()
        except BaseException as exc:
            self._forget(topics, done)
            if not done.done():
                done.set_exception(
                    exc if isinstance(exc, Exception) else BusClosedError("join cancelled")
                )
            raise
        return done

    def _forget(self, topics: Iterable[str], done: asyncio.Future[None]) -> None:
        for topic in topics:
            if self._joining.get(topic) is done:
                del self._joining[topic]

    async def _wait_assigned(self, done: asyncio.Future[None], topics: Collection[str]) -> None:
        timeout = self._options.join_timeout
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            shown = sorted(topics)
            what = repr(shown[0]) if len(shown) == 1 else f"{len(shown)} topics ({shown[0]!r}...)"
            raise TransportUnavailableError(
                f"consumer group {self._name!r} did not assign {what} within {timeout} s"
            ) from None

    async def _wait_partitions_known(self, topics: Sequence[str]) -> None:
        """Wait until this consumer's metadata lists every topic's partitions.

        The group leader assigns from its own metadata: joining with a topic
        it does not know yet (just created) assigns none of its partitions,
        and the later rejoin would resolve "latest" after messages published
        in between -- skipping them. All topics are added before awaiting,
        so one metadata request asks for all of them.
        """
        client = self.client
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.join_timeout
        missing = [t for t in topics if not client.cluster.partitions_for_topic(t)]
        while missing:
            if loop.time() > deadline:
                raise TransportUnavailableError(
                    f"no partition metadata for kafka topics {missing} within "
                    f"{self._options.join_timeout} s"
                )
            await asyncio.gather(*[client.add_topic(t) for t in missing])
            missing = [t for t in missing if not client.cluster.partitions_for_topic(t)]
            if missing:
                await asyncio.sleep(_METADATA_RETRY)  # not there yet: ask again
                await client.force_metadata_update()

    def resubscribe(self) -> None:
        """Subscribe the consumer to the topics ready to join (a topic whose
        partitions the leader does not know yet would be assigned none)."""
        if not self.closed:
            self._subscribe(sorted(self.subscribed))

    def drop_route(self, sub: KafkaConsumer) -> bool:
        """Forget *sub*; True when its topic has no subscription left."""
        subs = self._routes.get(sub.topic, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._routes.pop(sub.topic, None)
            self.starts.pop(sub.topic, None)
            self.subscribed.discard(sub.topic)
            self._joining.pop(sub.topic, None)  # a later add joins it anew
            return True
        return False

    def assigned(self, joined: Collection[str]) -> None:
        """An assignment for a join of the topics *joined* arrived (positions
        resolved): wake the adds all of whose topics it included (topics
        dropped meanwhile -- a cancelled add -- are not waited for)."""
        for waiter in list(self._waiters):
            topics, done = waiter
            if (topics & self.subscribed).issubset(joined):
                self._waiters.remove(waiter)
                if not done.done():
                    done.set_result(None)

    def watch(self, coordinator: Any) -> None:
        """Remember the assignments *coordinator* computes as the group's
        leader (aiokafka's ``_perform_assignment``) and the member ids the
        broker handed this consumer (JoinGroup ``MEMBER_ID_REQUIRED``), for
        :meth:`covered`."""
        perform: Callable[[Any], Awaitable[Any]] = coordinator._perform_assignment
        send: Callable[[Any], Awaitable[Any]] = coordinator._send_req

        async def perform_assignment(response: Any) -> Any:
            assignments = await perform(response)
            self._led = (
                coordinator.generation,
                {member: {tp.topic for tp in a.partitions()} for member, a in assignments.items()},
            )
            return assignments

        async def send_req(request: Any) -> Any:
            response = await send(request)
            if (
                getattr(request, "API_KEY", None) == _JOIN_GROUP
                and getattr(response, "error_code", None) == _MEMBER_ID_REQUIRED
            ):
                self._own_ids.add(response.member_id)
            return response

        coordinator._perform_assignment = perform_assignment
        coordinator._send_req = send_req
        self._coordinator = coordinator

    def covered(
        self, joined: set[str], assigned: Collection[TopicPartition], generation: int
    ) -> set[str]:
        """The topics of *joined* that the assignment *assigned* (this
        member's, of *generation*) really covers.

        A join can include a topic that the leader did not assign: its
        metadata lacked the topic when it assigned (a metadata answer for
        fewer topics, still in flight, replaced a fuller one), or the broker
        answered SyncGroup with the previous assignment of the generation
        (seen on Tansu when a join changed its topics). Waking that topic's
        subscription now would resolve "latest" only at the next rebalance,
        after messages published in between. When this member led the join
        it knows what was assigned: alone in the group, a topic counts when
        some partition of it is ours; with others, when some member got
        one. A follower trusts the leader (another process with the same
        check).

        Members that are this consumer's own abandoned ids do not count:
        aiokafka restarts a first join whose subscription changed between
        the broker's ``MEMBER_ID_REQUIRED`` answer and the retry, with a
        fresh id, and Tansu keeps the first id as a member (a ghost that
        never fetches, until its session expires).
        """
        led = self._led
        if led is None or led[0] != generation:
            return joined
        me = getattr(self._coordinator, "member_id", None)
        members = {m: t for m, t in led[1].items() if m == me or m not in self._own_ids}
        mine = {tp.topic for tp in assigned}
        anyone = mine.union(*members.values()) if len(members) > 1 else mine
        return joined & anyone

    def fail(self, error: BaseException) -> None:
        """The group stopped or failed: every waiting add raises *error*."""
        for _, done in self._waiters:
            if not done.done():
                done.set_exception(error)
        self._waiters.clear()
