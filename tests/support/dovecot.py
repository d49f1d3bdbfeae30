"""A private Dovecot IMAP server for tests, configured and started on loopback ports.

    with Dovecot(workdir, tokeninfo_url=ts.tokeninfo_url) as dc:
        dc.add_user("alice@example.test", "alice-pw")
        uid = dc.append("alice@example.test", "INBOX", raw, flags=(), date=when)
        dc.flags("alice@example.test", "INBOX", uid)        # -> {"\\Recent"} (never \\Seen)
        dc.restart()                                          # same ports
        dc.set_uid_validity("alice@example.test", "INBOX", 4242)

Everything lives in one directory: `dovecot.conf` written here, `run/` (base_dir),
`mail/<user>/` (Maildir), `users/<user>` and `passwd.master` (passwd-file), the log.
The server (`dovecot -F`, a child process) listens on 127.0.0.1 on a free port for
plain IMAP (plaintext auth allowed on loopback, STARTTLS offered when `tls=True`)
and, with `tls=True`, on a second port with implicit TLS (a self-signed certificate
from `tlscert.make_cert`; trust `ca_file`).

The one namespace has special-use mailboxes (RFC 6154), all created at login:
`Sent Items` \\Sent, `Drafts` \\Drafts, `Junk` \\Junk, `Trash` \\Trash, `Archive`
\\Archive, `All Mail` \\All and `Starred` \\Flagged. CONDSTORE and QRESYNC are
advertised (Dovecot's default), IDLE too.

Authentication: `passwd-file` users (PLAIN/LOGIN); a master user (`master`, password
`master_password`) that logs in as anyone either with SASL PLAIN's authorization
identity or as `user*master`; and, when `tokeninfo_url` is given, an `oauth2` passdb
for XOAUTH2 and OAUTHBEARER that validates bearer tokens against that URL
(`tests/support/oauth_server.TokenServer` serves one).

Run as root (tests and CI), the master process drops privileges: internal processes run
as `dovecot`, login processes as `dovenull`, mail as `nobody`; run as an ordinary user
everything runs as that user (Dovecot's rootless mode).

Helpers are synchronous (stdlib `imaplib`, `doveadm`); from an async test that needs the
server to answer its own client at the same time, call them via `asyncio.to_thread`.
Nothing here imports `gateway`.
"""

from __future__ import annotations

import contextlib
import email.utils
import grp
import imaplib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tests.conftest import free_port
from tests.support.tlscert import CertFiles, make_cert

__all__ = ["SPECIAL_USE", "Dovecot", "DovecotError"]

# mailbox name -> special-use flag, as configured in the namespace
SPECIAL_USE: dict[str, str] = {
    "Sent Items": "\\Sent",
    "Drafts": "\\Drafts",
    "Junk": "\\Junk",
    "Trash": "\\Trash",
    "Archive": "\\Archive",
    "All Mail": "\\All",
    "Starred": "\\Flagged",
}


class DovecotError(RuntimeError):
    """Dovecot would not start or a helper command failed (the log tail is in the text)."""


@dataclass(frozen=True)
class _Ids:
    internal_user: str
    internal_group: str
    login_user: str
    mail_uid: int
    mail_gid: int


def _ids() -> _Ids:
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        return _Ids(me, group, me, os.getuid(), os.getgid())
    try:
        pwd.getpwnam("dovecot")
        pwd.getpwnam("dovenull")
        nobody = pwd.getpwnam("nobody")
    except KeyError as exc:
        raise DovecotError(f"system user missing ({exc}); is dovecot-core installed?") from None
    return _Ids("dovecot", grp.getgrgid(pwd.getpwnam("dovecot").pw_gid).gr_name, "dovenull",
                nobody.pw_uid, nobody.pw_gid)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Dovecot:
    """One private Dovecot instance (see the module docstring)."""

    master_user = "master"
    master_password = "master-secret"

    def __init__(self, workdir: Path | None = None, *, tls: bool = False,
                 tokeninfo_url: str | None = None, oauth2_scope: str | None = None,
                 binary: str | None = None, max_clients: int | None = None) -> None:
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="mailgw-dovecot-"))
            self._own_dir = True
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            self._own_dir = False
        self.dir = workdir
        # every path component must be traversable by the unprivileged processes
        self.dir.chmod(0o755)
        self.binary = binary or shutil.which("dovecot") or "/usr/sbin/dovecot"
        self.doveadm_binary = shutil.which("doveadm") or "/usr/bin/doveadm"
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.certs: CertFiles | None = make_cert(self.dir / "tls") if tls else None
        self.tokeninfo_url = tokeninfo_url
        self.oauth2_scope = oauth2_scope
        #: IMAP sessions open at once beyond Dovecot's default process limit (100), e.g.
        #: a benchmark with a thousand mailboxes in IDLE
        self.max_clients = max_clients
        self.users: dict[str, str] = {}
        self.ids = _ids()
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = self.dir / "dovecot.conf"
        self.log_path = self.dir / "dovecot.log"
        self.mail_dir = self.dir / "mail"
        for sub in ("run", "state", "mail", "users"):
            (self.dir / sub).mkdir(exist_ok=True)
        if os.geteuid() == 0:
            os.chown(self.mail_dir, self.ids.mail_uid, self.ids.mail_gid)
        (self.dir / "passwd.master").write_text(
            f"{self.master_user}:{{PLAIN}}{self.master_password}\n")
        self._write_config()

    # -- configuration --------------------------------------------------------------------
    @property
    def ca_file(self) -> Path | None:
        return self.certs.cert_file if self.certs else None

    def _write_config(self) -> None:
        d = self.dir
        ids = self.ids
        mechs = "plain login" + (" xoauth2 oauthbearer" if self.tokeninfo_url else "")
        mailboxes = "\n".join(
            f"  mailbox {_quote(name)} {{\n    auto = subscribe\n    special_use = {flag}\n  }}"
            for name, flag in SPECIAL_USE.items())
        # many clients at once (benchmarks): logins in high-performance mode, one process for
        # many connections, instead of a process per login (process_limit 100 by default)
        login_mode = "  service_count = 0\n" if self.max_clients else ""
        tls_listener = ""
        ssl = "ssl = no"
        if self.certs is not None:
            ssl = (f"ssl = yes\nssl_cert = <{self.certs.cert_file}\nssl_key = <{self.certs.key_file}\n"
                   "ssl_min_protocol = TLSv1.2")
            tls_listener = (f"  inet_listener imaps {{\n    address = {self.host}\n"
                            f"    port = {self.tls_port}\n    ssl = yes\n  }}")
        oauth_passdb = ""
        if self.tokeninfo_url:
            ext = d / "oauth2.conf.ext"
            lines = [f"tokeninfo_url = {self.tokeninfo_url}",
                     "username_attribute = email",
                     "username_format = %Lu",
                     "timeout_msecs = 5000"]
            if self.oauth2_scope:
                lines.append(f"scope = {self.oauth2_scope}")
            ext.write_text("\n".join(lines) + "\n")
            oauth_passdb = (f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                            f"  args = {ext}\n}}")
        conf = f"""# written by tests/support/dovecot.py
instance_name = mailgw-test-{self.port}
base_dir = {d}/run
state_dir = {d}/state
log_path = {self.log_path}
info_log_path = {self.log_path}
debug_log_path = {self.log_path}
auth_verbose = yes
listen = {self.host}
protocols = imap
{ssl}
disable_plaintext_auth = no
auth_mechanisms = {mechs}
auth_master_user_separator = *
auth_failure_delay = 0
auth_cache_size = 0
default_internal_user = {ids.internal_user}
default_internal_group = {ids.internal_group}
default_login_user = {ids.login_user}
first_valid_uid = {min(ids.mail_uid, 500)}
first_valid_gid = {min(ids.mail_gid, 500)}
mail_uid = {ids.mail_uid}
mail_gid = {ids.mail_gid}
mail_location = maildir:{self.mail_dir}/%u
mail_fsync = never
maildir_very_dirty_syncs = no
mail_max_userip_connections = 200
imap_idle_notify_interval = 1 secs
# IDLE learns of new mail by inotify; without an inotify instance (the mail user's
# fs.inotify.max_user_instances used up, e.g. by other Dovecots on the machine) it looks
# every mailbox_idle_check_interval, 30 s by default: longer than the tests wait
mailbox_idle_check_interval = 1 secs
shutdown_clients = yes

namespace inbox {{
  inbox = yes
  separator = /
{mailboxes}
}}

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd.master
  master = yes
  pass = yes
}}
{oauth_passdb}
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {d}/users/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d}/users/%u
  default_fields = uid={ids.mail_uid} gid={ids.mail_gid} home={self.mail_dir}/%u
}}

service imap-login {{
  chroot =
  inet_listener imap {{
    address = {self.host}
    port = {self.port}
  }}
{tls_listener}
  process_min_avail = 1
{login_mode}}}
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""
        if self.max_clients:
            conf += (f"default_client_limit = {self.max_clients * 2 + 100}\n"
                     f"service imap {{\n  process_limit = {self.max_clients + 50}\n}}\n")
        self.config_path.write_text(conf)

    def add_user(self, name: str, password: str) -> None:
        """Add (or replace) a user: one passwd-file per user, so a new user is seen at once.

        (Dovecot checks a passwd-file for changes at most once a second; a file per user
        name is opened fresh on the first lookup of that name.)
        """
        if "/" in name or name.startswith("."):
            raise ValueError(f"unusable user name {name!r}")
        self.users[name] = password
        tmp = self.dir / "users" / f".{name}.tmp"
        tmp.write_text(f"{name}:{{PLAIN}}{password}::::::\n")
        tmp.replace(self.dir / "users" / name)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> Dovecot:
        if self.proc is not None and self.proc.poll() is None:
            return self
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([self.binary, "-F", "-c", str(self.config_path)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        ports = [p for p in (self.port, self.tls_port) if p]
        while True:
            if self.proc.poll() is not None:
                raise DovecotError(f"dovecot exited with {self.proc.returncode}:\n{self.log_tail()}")
            if all(self._greets(p) for p in ports):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise DovecotError(f"dovecot did not greet within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def _greets(self, port: int) -> bool:
        """True when something accepts on the port (the TLS port gets no greeting read)."""
        try:
            with socket.create_connection((self.host, port), 1.0) as s:
                if port == self.port:
                    s.settimeout(2.0)
                    return s.recv(64).startswith(b"* OK")
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """Stop as systemd does: SIGTERM to the master and every process it started (imap
        sessions say BYE and close), then wait until all are gone and the ports are free."""
        self._signal_all(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the master and all its children (a crash: connections cut at once)."""
        self._signal_all(signal.SIGKILL, 10.0)

    def _signal_all(self, sig: int, timeout: float) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the master leads its own process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(5)
        deadline = time.monotonic() + timeout
        while True:  # the group's other members (imap, imap-login, auth) must be gone too
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                break
            time.sleep(0.01)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- helpers through IMAP (stdlib imaplib) --------------------------------------------
    def imap(self, user: str) -> imaplib.IMAP4:
        """A logged-in stdlib imaplib connection as `user` (password from add_user)."""
        conn = imaplib.IMAP4(self.host, self.port, timeout=30)
        conn.login(user, self.users[user])
        return conn

    def append(self, user: str, mailbox: str, raw: bytes, *, flags: Sequence[str] = (),
               date: datetime | None = None) -> int:
        """APPEND one message; return its UID (from APPENDUID, RFC 4315)."""
        conn = self.imap(user)
        try:
            when = imaplib.Time2Internaldate((date or datetime.now(UTC)).timestamp())
            typ, data = conn.append(_quote(mailbox), f"({' '.join(flags)})" if flags else None,
                                    when, raw)
            if typ != "OK":
                raise DovecotError(f"APPEND failed: {data!r}")
            m = re.search(rb"APPENDUID \d+ (\d+)", data[0] or b"")
            if m is None:
                raise DovecotError(f"no APPENDUID in {data!r}")
            return int(m.group(1))
        finally:
            with contextlib.suppress(Exception):
                conn.logout()

    def flags(self, user: str, mailbox: str, uid: int) -> set[str]:
        """The message's flags, read through a separate read-only (EXAMINE) session."""
        conn = self.imap(user)
        try:
            typ, _ = conn.select(_quote(mailbox), readonly=True)
            if typ != "OK":
                raise DovecotError(f"EXAMINE {mailbox} failed")
            typ, data = conn.uid("FETCH", str(uid), "(FLAGS)")
            for item in data:
                if isinstance(item, bytes):
                    m = re.search(rb"FLAGS \(([^)]*)\)", item)
                    if m:
                        return {f.decode() for f in m.group(1).split()}
            raise DovecotError(f"no message with UID {uid} in {mailbox}: {data!r}")
        finally:
            with contextlib.suppress(Exception):
                conn.logout()

    def all_flags(self, user: str, mailbox: str) -> dict[int, set[str]]:
        """UID -> flags for every message in the mailbox (read-only session)."""
        conn = self.imap(user)
        try:
            conn.select(_quote(mailbox), readonly=True)
            _, data = conn.uid("FETCH", "1:*", "(UID FLAGS)")
            out: dict[int, set[str]] = {}
            for item in data:
                if isinstance(item, bytes):
                    m = re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", item) or re.search(
                        rb"FLAGS \(([^)]*)\) UID (\d+)", item)
                    if m and m.group(1).isdigit():
                        out[int(m.group(1))] = {f.decode() for f in m.group(2).split()}
                    elif m:
                        out[int(m.group(2))] = {f.decode() for f in m.group(1).split()}
            return out
        finally:
            with contextlib.suppress(Exception):
                conn.logout()

    def store_flags(self, user: str, mailbox: str, uid: int, flags: Sequence[str]) -> None:
        """Add flags to a message, as another mail client would (UID STORE +FLAGS)."""
        conn = self.imap(user)
        try:
            conn.select(_quote(mailbox))
            typ, data = conn.uid("STORE", str(uid), "+FLAGS", f"({' '.join(flags)})")
            if typ != "OK":
                raise DovecotError(f"STORE failed: {data!r}")
        finally:
            with contextlib.suppress(Exception):
                conn.logout()

    def create_mailbox(self, user: str, mailbox: str) -> None:
        conn = self.imap(user)
        try:
            typ, data = conn.create(_quote(mailbox))
            if typ != "OK" and b"ALREADYEXISTS" not in (data[0] or b""):
                raise DovecotError(f"CREATE {mailbox}: {data!r}")
        finally:
            with contextlib.suppress(Exception):
                conn.logout()

    # -- helpers through the file system and doveadm --------------------------------------
    def fill(self, user: str, messages: Iterable[tuple[bytes, Sequence[str], datetime]],
             mailbox: str = "INBOX") -> int:
        """Write many messages straight into the user's Maildir (fast; for hundreds or more).

        Flags go into the file name (`:2,S` for \\Seen ...), the internal date is the
        file's mtime. Dovecot assigns UIDs in file-name order at its next sync; names are
        chosen so that order is the iteration order. Returns how many were written.
        """
        box = self.mail_dir / user
        if mailbox != "INBOX":
            box = box / ("." + mailbox.replace("/", "."))
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        letters = {"\\Seen": "S", "\\Answered": "R", "\\Flagged": "F", "\\Draft": "D",
                   "\\Deleted": "T"}
        n = 0
        base = int(time.time())
        for raw, flags, date in messages:
            info = "".join(sorted(letters[f] for f in flags if f in letters))
            name = f"{base}.M{n:08d}P{os.getpid()}.mailgw,S={len(raw)}:2,{info}"
            path = box / "cur" / name
            path.write_bytes(raw)
            ts = date.timestamp()
            os.utime(path, (ts, ts))
            n += 1
        if os.geteuid() == 0:
            for root, dirs, files in os.walk(self.mail_dir / user):
                for name in dirs + files:
                    os.lchown(os.path.join(root, name), self.ids.mail_uid, self.ids.mail_gid)
            os.chown(self.mail_dir / user, self.ids.mail_uid, self.ids.mail_gid)
        return n

    def doveadm(self, *args: str, timeout: float = 60.0) -> str:
        res = subprocess.run([self.doveadm_binary, "-c", str(self.config_path), *args],
                             capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise DovecotError(f"doveadm {' '.join(args)} -> {res.returncode}: "
                               f"{res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def uid_validity(self, user: str, mailbox: str) -> int:
        out = self.doveadm("mailbox", "status", "-u", user, "uidvalidity", mailbox)
        m = re.search(r"uidvalidity=(\d+)", out)
        if m is None:
            raise DovecotError(f"no uidvalidity in {out!r}")
        return int(m.group(1))

    def set_uid_validity(self, user: str, mailbox: str, value: int) -> None:
        """Change a mailbox's UIDVALIDITY (what a server does after rebuilding its indexes)."""
        self.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(value), mailbox)

    def session_pids(self, user: str) -> list[int]:
        """Process ids of the user's imap sessions that are still running (from the log)."""
        pids = [int(m) for m in re.findall(rf"Login: user=<{re.escape(user)}>.*?mpid=(\d+)",
                                           self.log_path.read_text(errors="replace"))]
        alive = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 0)
                alive.append(pid)
        return alive

    def freeze(self, user: str) -> list[int]:
        """SIGSTOP the user's imap sessions: connections stay open, nothing answers
        (a half-dead server or a NAT that dropped the flow). `thaw()` resumes them."""
        pids = self.session_pids(user)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    def thaw(self, pids: Iterable[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def kick(self, user: str) -> None:
        """Disconnect every IMAP session of the user (doveadm kick)."""
        self.doveadm("kick", user)


def message(subject: str, *, sender: str = "bob@example.net", to: str = "alice@example.test",
            body: str = "hello\r\n", message_id: str | None = None,
            date: datetime | None = None) -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    when = date or datetime.now(UTC)
    mid = message_id or email.utils.make_msgid(domain="example.net")
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.format_datetime(when)}\r\nMessage-ID: {mid}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
    return head.encode() + body.replace("\r\n", "\n").replace("\n", "\r\n").encode()
