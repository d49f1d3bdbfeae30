"""The relay adds trace headers on top, strips Bcc and never touches the body."""

from gateway.relay import Submission, prepare

BODY = b"Line one\r\n.leading dot\r\n\r\nBcc: not a header, part of the body\r\n"


def sub(data: bytes, rcpts: list[str] | None = None) -> Submission:
    return Submission(mail_from="a@example.com", rcpts=rcpts or ["b@example.net"], data=data,
                      client_ip="127.0.0.1", client_helo="client.example", user="a@example.com",
                      tls=True)


def test_body_untouched_and_bcc_stripped() -> None:
    header = (b"From: A <a@example.com>\r\nTo: b@example.net\r\nBcc: secret@example.org,\r\n"
              b" other@example.org\r\nSubject: hi\r\nMessage-ID: <x@example.com>\r\n"
              b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n")
    out, mid = prepare(sub(header + b"\r\n" + BODY), "gw.example.com", "QID", 1.7e9)
    assert mid == "<x@example.com>"
    assert out.endswith(b"\r\n\r\n" + BODY)
    head = out[: out.index(b"\r\n\r\n") + 2]
    assert b"secret@example.org" not in head and b"other@example.org" not in head
    assert head.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby gw.example.com"
                           b" (mailgw) with ESMTPSA id QID\r\n\tfor <b@example.net>; ")
    # everything but the Received and Bcc fields is byte-identical
    assert head.split(b"\r\n", 3)[3] == header.replace(
        b"Bcc: secret@example.org,\r\n other@example.org\r\n", b"")


def test_missing_message_id_and_date_added() -> None:
    out, mid = prepare(sub(b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"),
                       "gw.example.com", "QID", 1.7e9)
    assert mid.startswith("<") and mid.endswith("@gw.example.com>")
    assert f"Message-ID: {mid}\r\n".encode() in out
    assert b"\r\nDate: " in out
    assert out.endswith(b"\r\n\r\nbody\r\n")


def test_header_only_message() -> None:
    out, _ = prepare(sub(b"From: a@example.com\r\nSubject: x\r\nMessage-ID: <m@x>\r\nDate: x\r\n"),
                     "gw", "QID", 1.7e9)
    assert out.endswith(b"Date: x\r\n")
    assert b"\r\n\r\n" not in out
