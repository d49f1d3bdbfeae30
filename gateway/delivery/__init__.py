"""Outbound delivery: the scheduler (retry, expiry, DSN) and its primitives.

`transport` is the `Transport` protocol the scheduler delivers through and its values
(`Destination`, `RcptResult`); `smtp` is its aiosmtplib implementation (pooled
connections, one result per recipient), the only user of `aiosmtplib_compat`; `mx`
turns a domain into mail exchangers through DNS, `dsn` writes RFC 3464 bounce
messages. Import the submodules directly; this package imports nothing on purpose (no
import-time side effects, no cycles with the scheduler).
"""
