#!/usr/bin/python3
"""A real SMTP server that keeps every message it accepts, for black-box tests.

It is aiosmtpd (Debian's python3-aiosmtpd, importable only under
/usr/bin/python3) with a handler that writes each accepted message to
--dir as two files, named by a counter starting at 1:

  N.eml   the DATA bytes exactly as received, after dot-unstuffing (RFC 5321
          4.5.2) and with their CRLF line ends; written first, atomically
  N.json  {"mail_from", "rcpt_tos", "peer", "tls", "mail_options",
          "rcpt_options", "smtp_utf8", "eml"}; written last, atomically, so a
          reader that sees N.json can read N.eml whole

and keeps DIR/stats.json up to date (atomically rewritten on every change):

  {"connections_total", "connections_open", "peak_concurrent",
   "peak_concurrent_by_domain": {domain: peak}, "messages"}

where a connection counts for the domain of its first RCPT.

--script FILE scripts replies, so a test can make this host fail on purpose:

  {"mail": [451, 250],
   "rcpt": {"fail@x.test": 550, "later@x.test": [451, 451, 250]},
   "data": [451, 250]}

Each value is one reply or a list of replies used one per attempt, the last
one repeating: "rcpt" counts the RCPTs for each address (case-insensitive)
over the whole run, "mail" and "data" count every MAIL and every DATA
command. A reply is a code (250, 451, 550, ...) or a whole reply line
("452 4.2.2 Mailbox full"). Addresses not in "rcpt" are accepted.

--data-delay-ms makes each message take that long: the reply to its end
of data waits (a slow receiver; --delay-ms waits before every reply).

It prints READY on stdout once it listens.
"""

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys

from aiosmtpd.smtp import SMTP

DEFAULT_TEXT = {
    2: "2.0.0 OK (scripted)",
    4: "4.3.0 Try again later (scripted)",
    5: "5.7.1 Refused (scripted)",
}


def reply_line(spec):
    """A reply line from a script entry: a code or a whole line."""
    if isinstance(spec, int):
        return f"{spec} {DEFAULT_TEXT.get(spec // 100, '')}".rstrip()
    return str(spec)


class Sequence:
    """The replies of one scripted step: one per attempt, the last repeats."""

    def __init__(self, spec):
        self.replies = [reply_line(s) for s in (spec if isinstance(spec, list) else [spec])]
        if not self.replies:
            raise ValueError("a scripted reply list must not be empty")
        self.used = 0

    def next(self):
        reply = self.replies[min(self.used, len(self.replies) - 1)]
        self.used += 1
        return reply


class Script:
    def __init__(self, rules):
        unknown = set(rules) - {"mail", "rcpt", "data"}
        if unknown:
            raise ValueError(f"unknown script keys {sorted(unknown)}; expected mail, rcpt, data")
        self.mail = Sequence(rules["mail"]) if "mail" in rules else None
        self.data = Sequence(rules["data"]) if "data" in rules else None
        self.rcpt = {k.lower(): Sequence(v) for k, v in rules.get("rcpt", {}).items()}

    def for_mail(self):
        return self.mail.next() if self.mail else None

    def for_rcpt(self, address):
        seq = self.rcpt.get(address.lower())
        return seq.next() if seq else None

    def for_data(self):
        return self.data.next() if self.data else None


def write_atomically(path, data):
    # No fsync: the tests read these files on this machine while the sink
    # runs, and no test crashes the machine. The event loop waits for each
    # write, so an fsync per write stalled every connection on a busy disk
    # (greetings missed the relay's timeout).
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Stats:
    def __init__(self, path):
        self.path = path
        self.connections_total = 0
        self.open = 0
        self.peak = 0
        self.open_by_domain = {}
        self.peak_by_domain = {}
        self.messages = 0
        self.save()

    def connected(self):
        self.connections_total += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        self.save()

    def domain_seen(self, domain):
        now = self.open_by_domain.get(domain, 0) + 1
        self.open_by_domain[domain] = now
        self.peak_by_domain[domain] = max(self.peak_by_domain.get(domain, 0), now)
        self.save()

    def disconnected(self, domain):
        self.open -= 1
        if domain is not None:
            self.open_by_domain[domain] -= 1
        self.save()

    def message(self):
        self.messages += 1
        self.save()

    def save(self):
        stats = {
            "connections_total": self.connections_total,
            "connections_open": self.open,
            "peak_concurrent": self.peak,
            "peak_concurrent_by_domain": self.peak_by_domain,
            "messages": self.messages,
        }
        write_atomically(self.path, json.dumps(stats).encode())


class Handler:
    def __init__(self, args, script, stats):
        self.dir = args.dir
        self.no_8bitmime = args.no_8bitmime
        self.data_delay = args.data_delay_ms / 1000.0
        self.pipelining = args.pipelining
        self.script = script
        self.stats = stats
        self.store = not args.no_store
        self.count = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.no_8bitmime:
            responses = [r for r in responses if r[4:].upper() != "8BITMIME"]
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.no_8bitmime and "BODY=8BITMIME" in mail_options:
            return "555 5.5.4 BODY=8BITMIME not offered here"
        scripted = self.script.for_mail()
        if scripted and not scripted.startswith("2"):
            return scripted
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.rcpt_params = {}
        return scripted or "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if server.first_domain is None:
            server.first_domain = address.rpartition("@")[2].lower()
            self.stats.domain_seen(server.first_domain)
        scripted = self.script.for_rcpt(address)
        if scripted and not scripted.startswith("2"):
            return scripted
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.rcpt_params[address] = rcpt_options
        return scripted or "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        scripted = self.script.for_data()
        if scripted and not scripted.startswith("2"):
            return scripted
        self.count += 1
        n = self.count
        if not self.store:
            self.stats.message()
            return scripted or f"250 2.0.0 OK: counted as {n}"
        eml = os.path.join(self.dir, f"{n}.eml")
        write_atomically(eml, envelope.original_content)
        record = {
            # aiosmtpd keeps the null reverse path as "<>".
            "mail_from": "" if envelope.mail_from == "<>" else envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "peer": f"{session.peer[0]}:{session.peer[1]}",
            "tls": session.ssl is not None,
            "helo": session.host_name,
            "mail_options": envelope.mail_options,
            "rcpt_options": getattr(envelope, "rcpt_params", {}),
            "smtp_utf8": envelope.smtp_utf8,
            "eml": f"{n}.eml",
        }
        write_atomically(os.path.join(self.dir, f"{n}.json"), json.dumps(record).encode())
        self.stats.message()
        return scripted or f"250 2.0.0 OK: stored as {n}"


class SinkSMTP(SMTP):
    """aiosmtpd's server with a delay before every reply and connection counts."""

    def __init__(self, handler, stats, delay, **kwargs):
        super().__init__(handler, **kwargs)
        self.stats = stats
        self.delay = delay
        self.first_domain = None
        self.counted = False

    def connection_made(self, transport):
        # Called again on the TLS transport after STARTTLS: count once.
        if not self.counted:
            self.counted = True
            self.stats.connected()
        super().connection_made(transport)

    def connection_lost(self, error):
        if self.counted:
            self.counted = False
            self.stats.disconnected(self.first_domain)
        super().connection_lost(error)

    async def push(self, status):
        if self.delay:
            await asyncio.sleep(self.delay)
        await super().push(status)


def parse_listen(text):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=parse_listen, required=True, metavar="HOST:PORT")
    parser.add_argument("--dir", required=True, help="where messages and stats.json go")
    parser.add_argument("--tls-cert", help="PEM certificate: offer STARTTLS")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--no-8bitmime", action="store_true", help="do not offer 8BITMIME")
    parser.add_argument("--no-smtputf8", action="store_true", help="do not offer SMTPUTF8")
    parser.add_argument("--pipelining", action="store_true", help="offer PIPELINING")
    parser.add_argument("--script", help="JSON file of scripted replies")
    parser.add_argument("--delay-ms", type=int, default=0, help="wait before every reply")
    parser.add_argument("--data-delay-ms", type=int, default=0,
                        help="wait before the reply to each message's end of data")
    parser.add_argument("--no-store", action="store_true",
                        help="count messages without writing them: "
                        "a receiver for benchmarks that is never the bottleneck")
    parser.add_argument("--hostname", default="sink.test", help="name in the greeting")
    args = parser.parse_args()

    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    os.makedirs(args.dir, exist_ok=True)
    script = Script({})
    if args.script:
        with open(args.script, encoding="utf-8") as f:
            script = Script(json.load(f))
    tls_context = None
    if args.tls_cert:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(args.tls_cert, args.tls_key)

    stats = Stats(os.path.join(args.dir, "stats.json"))
    handler = Handler(args, script, stats)
    delay = args.delay_ms / 1000.0

    def factory():
        return SinkSMTP(
            handler,
            stats,
            delay,
            hostname=args.hostname,
            decode_data=False,
            enable_SMTPUTF8=not args.no_smtputf8,
            tls_context=tls_context,
        )

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    host, port = args.listen
    server = loop.run_until_complete(loop.create_server(factory, host=host, port=port))
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    print("READY", flush=True)
    loop.run_until_complete(stop)
    server.close()
    loop.run_until_complete(server.wait_closed())
    return 0


if __name__ == "__main__":
    sys.exit(main())
