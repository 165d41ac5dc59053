#!/usr/bin/python3
"""An SMTP server for delivery tests, on aiosmtpd (Debian's python3-aiosmtpd).

Run with /usr/bin/python3. It listens on 127.0.0.1:PORT, prints READY once
it accepts connections, and stops when its standard input closes.

Every accepted message is written to OUT as N.eml (the data as received:
CRLF line endings, dots unstuffed) and N.json (envelope, options, whether
TLS was on). --reply ADDRESS=TEXT answers RCPT TO for ADDRESS with TEXT
(for instance "451 4.2.0 try later"). --cert/--key offer STARTTLS.
--pipelining announces PIPELINING.
"""

import argparse
import json
import os
import ssl
import sys

from aiosmtpd.controller import Controller


class Recorder:
    def __init__(self, out, replies, pipelining):
        self.out = out
        self.replies = replies
        self.pipelining = pipelining
        self.count = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.replies.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        base = os.path.join(self.out, str(self.count))
        with open(base + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content)
        os.rename(base + ".eml.tmp", base + ".eml")
        record = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "rcpt_options": envelope.rcpt_options,
            "tls": session.ssl is not None,
            "ehlo": session.host_name,
        }
        with open(base + ".json.tmp", "w") as f:
            json.dump(record, f)
        os.rename(base + ".json.tmp", base + ".json")
        return "250 2.0.0 OK queued as %d" % self.count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reply", action="append", default=[])
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--pipelining", action="store_true")
    args = parser.parse_args()

    replies = {}
    for rule in args.reply:
        address, text = rule.split("=", 1)
        replies[address.lower()] = text

    tls_context = None
    if args.cert:
        tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls_context.load_cert_chain(args.cert, args.key)

    controller = Controller(
        Recorder(args.out, replies, args.pipelining),
        hostname="127.0.0.1",
        port=args.port,
        tls_context=tls_context,
        enable_SMTPUTF8=True,
    )
    controller.start()
    print("READY", flush=True)
    sys.stdin.read()
    controller.stop()


if __name__ == "__main__":
    main()
