"""The event log: seqs, group commit, flush, subscriptions (slow ones too), reopening, errors,
projections that fail."""

import sqlite3
import time

import pytest
import trio

from modelium.core.messages import ModelRemoved, RequestArrived, ServerStarted, Tick
from storage.eventlog import EventLog, LogError, ProjectionError, read_events


def arrivals(n, model="m"):
    return [RequestArrived(model=model, request_id=f"r{i}") for i in range(n)]


async def test_publish_assigns_contiguous_seqs_and_flush_makes_them_durable(tmp_path):
    db = tmp_path / "log.db"
    log = EventLog(db)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        seqs = [log.publish(e) for e in arrivals(1000)]
        assert seqs == list(range(1, 1001))
        await log.flush(seqs[-1])
        assert log.committed_seq == 1000
        # a separate reader sees exactly what was published, in order
        back = list(read_events(db))
        assert [s for s, _ in back] == seqs
        assert [e.request_id for _, e in back] == [f"r{i}" for i in range(1000)]
        # group commit: far fewer transactions than events
        assert log.commits < 100
        n.cancel_scope.cancel()
    log.close()


async def test_ts_is_stamped_by_the_log_clock_when_missing(tmp_path):
    log = EventLog(tmp_path / "log.db", clock=lambda: 1234.5)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        log.publish(Tick())
        log.publish(Tick(ts=7.0))
        await log.flush()
        n.cancel_scope.cancel()
    log.close()
    assert [e.ts for _, e in read_events(tmp_path / "log.db")] == [1234.5, 7.0]


async def test_subscriber_gets_history_then_live_events_without_gap_or_duplicate(tmp_path):
    log = EventLog(tmp_path / "log.db")
    got = []
    async with trio.open_nursery() as n:
        await n.start(log.run)
        for e in arrivals(50):
            log.publish(e)

        async def reader():
            async for seq, event in log.subscribe(since=10):
                got.append(seq)
                if seq == 150:
                    return

        n.start_soon(reader)
        await trio.sleep(0.01)
        for e in arrivals(100):
            log.publish(e)
            await trio.sleep(0)
        with trio.fail_after(5):
            while len(got) < 140:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    log.close()
    assert got == list(range(11, 151))


async def test_a_subscriber_that_stops_reading_does_not_block_publishing_and_resumes(tmp_path):
    log = EventLog(tmp_path / "log.db", ring=1000)  # small ring: resuming must read the table
    async with trio.open_nursery() as n:
        await n.start(log.run)
        sub = log.subscribe(since=0, buffer=16)
        first = []

        async def read_one():
            first.append(await sub.__anext__())

        n.start_soon(read_one)
        await trio.sleep(0.01)  # the subscriber is attached to the live fan-out, waiting
        log.publish(Tick())
        await trio.sleep(0.01)
        assert first[0][0] == 1
        # publish 20,000 events while the subscriber reads nothing: publish never waits
        for e in arrivals(20000):
            log.publish(e)
        assert sub.overflows == 1  # it was cut off from the live fan-out
        seqs = []
        async for seq, _ in sub:
            seqs.append(seq)
            if seq == 20001:
                break
        assert seqs == list(range(2, 20002))
        # and it goes on with what is published next
        await trio.sleep(0.01)
        log.publish(Tick())
        seq, event = await sub.__anext__()
        assert seq == 20002 and isinstance(event, Tick)
        n.cancel_scope.cancel()
    log.close()


async def test_filtered_subscription(tmp_path):
    log = EventLog(tmp_path / "log.db")
    async with trio.open_nursery() as n:
        await n.start(log.run)
        log.publish(Tick())
        log.publish(ModelRemoved(model="a"))
        log.publish(ModelRemoved(model="b"))
        sub = log.subscribe(types=["ModelRemoved"], models=["b"])
        log.publish(ModelRemoved(model="b"))
        assert [s for s, _ in [await sub.__anext__(), await sub.__anext__()]] == [3, 4]
        n.cancel_scope.cancel()
    log.close()


async def test_reopening_continues_the_seq_and_old_events_stay_readable(tmp_path):
    db = tmp_path / "log.db"
    log = EventLog(db)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        for e in arrivals(10):
            log.publish(e)
        n.cancel_scope.cancel()  # the writer commits what is queued when it stops
    log.close()
    log = EventLog(db)
    assert log.last_seq == 10
    async with trio.open_nursery() as n:
        await n.start(log.run)
        assert log.publish(ServerStarted(pid=1)) == 11
        sub = log.subscribe(since=5)
        seqs = [(await sub.__anext__())[0] for _ in range(6)]
        assert seqs == [6, 7, 8, 9, 10, 11]
        n.cancel_scope.cancel()
    log.close()


def test_a_second_writer_is_refused_with_a_clear_error(tmp_path):
    db = tmp_path / "log.db"
    first = EventLog(db)
    with pytest.raises(LogError, match="in use by another Modelium server"):
        EventLog(db)
    first.close()
    EventLog(db).close()  # free again once the first one closed


def test_a_file_that_is_not_a_log_gives_a_clear_error(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LogError, match="is damaged"):
        EventLog(junk)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.commit()
    with pytest.raises(LogError, match="no 'events' table"):
        EventLog(other)


def test_a_log_from_a_newer_modelium_is_refused(tmp_path):
    db = tmp_path / "log.db"
    EventLog(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(LogError, match="newer Modelium"):
        EventLog(db)
    with pytest.raises(LogError, match="newer Modelium"):
        list(read_events(db))


async def test_a_failing_projection_is_loud_keeps_the_event_and_stops_the_log(tmp_path):
    db = tmp_path / "log.db"
    log = EventLog(db)
    folded = []

    def project(seq, event):
        if isinstance(event, ModelRemoved):
            raise KeyError(event.model)
        folded.append(seq)

    log.add_projection(project, name="the test fold")
    with pytest.raises(ExceptionGroup) as excinfo:
        async with trio.open_nursery() as n:
            await n.start(log.run)
            sub = log.subscribe()
            log.publish(Tick())
            with pytest.raises(ProjectionError) as raised:
                log.publish(ModelRemoved(model="ghost"))
            err = raised.value
            assert (err.seq, err.type_name) == (2, "ModelRemoved") and isinstance(err.__cause__, KeyError)
            assert str(err).startswith("the test fold failed on event 2 (ModelRemoved): KeyError('ghost')")
            # subscribers still see the event, in order; later events are still recorded, not folded
            assert [s for s, _ in [await sub.__anext__(), await sub.__anext__()]] == [1, 2]
            assert log.publish(Tick()) == 3 and folded == [1]
            with pytest.raises(ProjectionError):
                log.save_snapshot("schema", b"a registry that is not the fold of the log")
            await trio.sleep_forever()  # the log's run stops the nursery once the event is durable
    [stopped] = excinfo.value.exceptions
    assert stopped is err and log.committed_seq >= 2
    log.close()
    assert [(s, type(e).__name__) for s, e in read_events(db)] == [(1, "Tick"), (2, "ModelRemoved"), (3, "Tick")]
    assert sqlite3.connect(db).execute("SELECT count(*) FROM snapshots").fetchone()[0] == 0


async def test_recent_and_published_read_this_runs_events_from_memory(tmp_path):
    db = tmp_path / "log.db"
    log = EventLog(db)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        log.publish(Tick())
        n.cancel_scope.cancel()
    log.close()
    log = EventLog(db, ring=4)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        for e in [ModelRemoved(model="a"), Tick(), Tick(), ModelRemoved(model="b"), Tick()]:
            log.publish(e)
        assert [s for s, _ in log.recent()] == [3, 4, 5, 6]  # the ring holds four; seq 1 is of the last run
        assert [s for s, _ in log.recent(since=4)] == [5, 6]
        assert [e.model for e in log.published(ModelRemoved)] == ["b"]
        assert len(log.published()) == 4
        n.cancel_scope.cancel()
    log.close()


async def test_rows_taken_for_a_commit_are_not_lost_when_the_writer_is_cancelled(tmp_path):
    db = tmp_path / "log.db"
    log = EventLog(db, commit_interval=0.0)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        # compaction holds the connection: the writer takes its batch, then waits for its turn
        n.start_soon(log.writer.transact, lambda conn: time.sleep(0.3))
        await trio.sleep(0.05)
        for e in arrivals(10):
            log.publish(e)
        await trio.sleep(0.05)
        assert log.writer.queued == 0 and log.committed_seq == 0  # taken, not committed
        n.cancel_scope.cancel()
    log.close()
    assert [s for s, _ in read_events(db)] == list(range(1, 11))
