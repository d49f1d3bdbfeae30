"""Reusable real peers for tests, all on loopback: SMTP upstreams, TLS certificates, DNS.

- `upstream.Upstream`: an aiosmtpd server on 127.0.0.1 (free port) in the test's own
  event loop that records what it receives and can misbehave on request.
- `tlscert.make_cert`: a self-signed certificate and key for localhost/127.0.0.1.
- `dns.DNSServer`: a UDP DNS server on 127.0.0.1 answering from a dict.

Nothing here imports `gateway`: these are stand-ins for the outside world.
"""
