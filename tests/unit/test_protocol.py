"""Enhanced status codes are added to aiosmtpd's bare replies; the AUTH limiter counts."""

import pytest

from gateway.smtp.protocol import AuthLimiter, add_enhanced_code


@pytest.mark.parametrize(("raw", "want"), [
    ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
    ("500 Line too long (see RFC5321 4.5.3.1.6)", "500 5.5.6 Line too long (see RFC5321 4.5.3.1.6)"),
    ("552 Error: Too much mail data", "552 5.3.4 Error: Too much mail data"),
    ("250 2.0.0 Ok: queued as X", "250 2.0.0 Ok: queued as X"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ("220 gw ESMTP", "220 gw ESMTP"),
    ("530 5.7.0 Authentication required", "530 5.7.0 Authentication required"),
])
def test_enhanced(raw: str, want: str) -> None:
    assert add_enhanced_code(raw) == want


def test_auth_limiter() -> None:
    lim = AuthLimiter(3, 60)
    for _ in range(2):
        lim.failed("192.0.2.1")
    assert not lim.blocked("192.0.2.1")
    lim.failed("192.0.2.1")
    assert lim.blocked("192.0.2.1")
    assert not lim.blocked("192.0.2.2")
    lim.succeeded("192.0.2.1")
    assert not lim.blocked("192.0.2.1")


def test_auth_limiter_window_expires() -> None:
    lim = AuthLimiter(1, 0.0)
    lim.failed("192.0.2.1")
    assert not lim.blocked("192.0.2.1")
