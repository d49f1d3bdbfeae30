"""Raw message bytes, content-addressed by SHA-256: files on disk or rows of ``raw_messages``.

``store.raw: disk`` keeps each message once as ``<dir>/ab/cd/<sha256>``, written before
the transaction that refers to it (tmp, fsync, rename), so a committed
``messages.raw_sha256`` always has its file; ``store.raw: database`` keeps the bytes in
``raw_messages``, inserted in the transaction that stores the message. A file written for
a transaction that then failed is harmless: the same bytes find it next time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.crm import rawfiles
from gateway.crm.models import raw_table
from gateway.crm.sql import insert
from gateway.errors import StoreError


class RawStore:
    """Raw message bytes, content-addressed: on disk (``dir/ab/cd/<sha256>``) or in the database."""

    def __init__(self, directory: Path | None, in_database: bool) -> None:
        self.directory = directory
        self.in_database = in_database

    @property
    def enabled(self) -> bool:
        """Raw bytes are kept at all (``store.raw`` is not ``none``)."""
        return self.in_database or self.directory is not None

    @property
    def on_disk(self) -> bool:
        """Raw bytes are kept as files (``store.raw: disk``)."""
        return self.directory is not None and not self.in_database

    def path(self, digest: str) -> Path:
        assert self.directory is not None
        return rawfiles.path(self.directory, digest)

    def write_files(self, blobs: Mapping[str, bytes]) -> None:
        """Write each blob not on disk yet (:func:`gateway.crm.rawfiles.write_files`)."""
        assert self.directory is not None
        rawfiles.write_files(self.directory, blobs)

    def read_file(self, digest: str) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except (FileNotFoundError, AssertionError):
            return None

    async def delete_files(self, digests: Sequence[str]) -> None:
        """Remove these blobs' files (off the event loop); one already gone is no error."""
        def unlink() -> None:
            for d in digests:
                try:
                    self.path(d).unlink()
                except FileNotFoundError:
                    pass
        await asyncio.to_thread(unlink)

    async def save_files(self, blobs: Mapping[str, bytes]) -> None:
        """:meth:`write_files` off the event loop; a failure is a StoreError (nothing stored)."""
        try:
            await asyncio.to_thread(self.write_files, blobs)
        except OSError as exc:
            raise StoreError(f"cannot write raw messages to {self.directory}: "
                             f"{exc.strerror or exc}") from exc

    @staticmethod
    async def insert_rows(conn: AsyncConnection, dialect: str,
                          blobs: Mapping[str, bytes | None]) -> None:
        """Add the blobs not in ``raw_messages`` yet, in the caller's transaction."""
        await conn.execute(insert(dialect, raw_table).on_conflict_do_nothing(
            index_elements=[raw_table.c.sha256]),
            [{"sha256": d, "data": b, "size": len(b or b"")} for d, b in blobs.items()])

    @staticmethod
    async def read_row(conn: AsyncConnection, digest: str) -> bytes | None:
        """The bytes kept in ``raw_messages`` under `digest`, if any."""
        data = (await conn.execute(sa.select(raw_table.c.data)
                                   .where(raw_table.c.sha256 == digest))).scalar()
        return bytes(data) if data is not None else None
