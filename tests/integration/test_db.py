"""SQLite engine behaviour the services rely on."""

from __future__ import annotations

import threading

from sqlalchemy import Column, Integer, MetaData, Table, insert, select

from libs.db import make_engine, read_only

metadata = MetaData()
numbers = Table("numbers", metadata, Column("n", Integer, primary_key=True))


def test_sqlite_reads_do_not_wait_for_an_open_write_transaction(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(numbers).values(n=1))
    read_done = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        with read_only(engine).connect() as conn:
            seen.extend(conn.execute(select(numbers.c.n)).scalars())
        read_done.set()

    with engine.begin() as writer:  # BEGIN IMMEDIATE: holds the write lock
        writer.execute(insert(numbers).values(n=2))
        thread = threading.Thread(target=reader)
        thread.start()
        finished_while_writing = read_done.wait(5)
    thread.join()
    assert finished_while_writing
    assert seen == [1]  # the uncommitted row is invisible
    engine.dispose()
