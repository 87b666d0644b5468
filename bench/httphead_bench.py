"""Micro-benchmark of exposr.ingress.httphead (the ingress hot path).

Prints parses/s of a typical ~400-byte request head and MB/s of body
passthrough (chunked with 16 KiB chunks, aligned and misaligned to the reads,
and Content-Length).

    .venv/bin/python bench/httphead_bench.py [seconds-per-figure]
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from exposr.ingress.httphead import (  # noqa: E402
    RequestParser,
    RequestHead,
    ResponseParser,
    derive_base_url,
)

HEAD = (
    b"GET /api/v1/items?page=2&sort=desc HTTP/1.1\r\n"
    b"Host: foo.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=abcdef0123456789; theme=dark\r\n"
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"\r\n"
)


def rate(fn, seconds):
    """Calls of fn per second (fn does `batch` operations, returns count)."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        done += fn()
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def bench_head(seconds):
    parser = RequestParser()

    def keepalive():
        feed = parser.feed
        for _ in range(1000):
            feed(HEAD)
        return 1000

    def fresh():
        for _ in range(1000):
            RequestParser().feed(HEAD)
        return 1000

    head = RequestParser().feed(HEAD)[0].head

    def serialize():
        for _ in range(1000):
            head.serialize()
        return 1000

    def rewrite():
        for _ in range(1000):
            h = RequestHead(head.method, head.target, head.version, list(head.headers))
            derive_base_url(h)
            h.set(b"x-forwarded-for", b"127.0.0.1")
            h.set(b"x-real-ip", b"127.0.0.1")
            h.remove(b"connection")
            h.serialize()
        return 1000

    print("request head: %d bytes" % len(HEAD))
    print("  parse, keep-alive parser   %9.0f heads/s" % rate(keepalive, seconds))
    print("  parse, new parser each     %9.0f heads/s" % rate(fresh, seconds))
    print("  serialize                  %9.0f heads/s" % rate(serialize, seconds))
    print("  derive+3 edits+serialize   %9.0f heads/s" % rate(rewrite, seconds))


def bench_body(seconds):
    chunk = os.urandom(16384)
    framed = b"4000\r\n" + chunk + b"\r\n"  # one 16 KiB chunk per read
    stream = framed * 64  # 1 MiB of chunked body
    misaligned = [stream[i : i + 16384] for i in range(0, len(stream), 16384)]
    head = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"

    def chunked(reads, nbytes):
        def run():
            parser = RequestParser()
            parser.feed(head)
            feed = parser.feed
            for _ in range(16):
                for data in reads:
                    feed(data)
            return 16 * nbytes

        return run

    def content_length():
        parser = RequestParser()
        total = 16384 * 1024
        parser.feed(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
        feed = parser.feed
        for _ in range(1024):
            feed(chunk)
        return total

    def response_eof():
        parser = ResponseParser()
        parser.expect(b"GET")
        parser.feed(b"HTTP/1.0 200 OK\r\n\r\n")
        feed = parser.feed
        for _ in range(1024):
            feed(chunk)
        return 16384 * 1024

    mb = 1024.0 * 1024.0
    aligned = [framed] * 64
    print("body passthrough, 16 KiB reads:")
    print(
        "  chunked, aligned reads     %9.0f MB/s"
        % (rate(chunked(aligned, len(stream)), seconds) / mb)
    )
    print(
        "  chunked, misaligned reads  %9.0f MB/s"
        % (rate(chunked(misaligned, len(stream)), seconds) / mb)
    )
    print("  Content-Length             %9.0f MB/s" % (rate(content_length, seconds) / mb))
    print("  close-delimited response   %9.0f MB/s" % (rate(response_eof, seconds) / mb))


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    print("python %s" % sys.version.split()[0])
    bench_head(seconds)
    bench_body(seconds)


if __name__ == "__main__":
    main()
