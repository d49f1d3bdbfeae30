"""Pure message parsing shared by ingest and IMAP sync: bytes -> ParsedMessage, forwards unwrapped.

No I/O, no asyncio, no store: `parse.py` reads one message, `forward.py` finds the
original inside a forwarded one, `dates.py` and `text.py` are their helpers.
"""
