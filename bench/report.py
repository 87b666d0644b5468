"""Every headline figure of the server in one run (by hand, not in CI).

Runs, one after the other, each against its own fresh ``exposrd``:

1. ``http_bench.py --target nginx``: req/s and p50/p99 at 10 and 50
   connections (3 alternating rounds, the median round printed with the
   range of ratios: direct varies run to run on a shared machine) and a
   100 MiB download, direct to an nginx of this run and through the tunnel
   (this server and this client), with the ratios, CPU and system calls per
   request;
2. ``relay_floor.py``: the same nginx through one and two plain Twisted
   relays (no HTTP parsing, no WebSocket): what two Python processes that
   only copy bytes reach on this machine, the floor under the tunnel's ratios;
3. ``rest_bench.py``: REST calls/s, latency and server CPU per call (account,
   token, PUT, PATCH, GET, WebSocket connect) for 1,000 and 4,000 tunnels,
   16 calls at a time, first vs last 10% of the tunnels;
4. ``tunnel_memory.py``: exposrd's RSS with 1,000 and 10,000 tunnels x 2
   connections, KiB per tunnel over the idle process;

and prints their tables, each under a heading, with the wall time of each
part. Needs what they need: ``nginx``, ``wrk``, ``curl``, ``perf`` (for the
system calls; ``--no-syscalls`` without it).

    .venv/bin/python bench/report.py [--quick] [--no-syscalls] [--skip http,floor,rest,memory]

``--quick``: shorter runs and smaller N (a smoke run of the whole report:
5 s wrk runs, 1 download each way, 200 and 800 tunnels, 1,000 and 2,000
tunnels for memory); the figures of record come from a run without it.
"""

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parts(args):
    http = ["http_bench.py", "--target", "nginx", "--connections", "10,50"]
    http += (["--duration", "5", "--downloads", "1"] if args.quick
             else ["--duration", "10", "--downloads", "3", "--rounds", "3"])
    if not args.no_syscalls:
        http.append("--syscalls")
    rest = ["rest_bench.py", "--parallel", "16", "--tunnels", "200,800" if args.quick else "1000,4000"]
    memory = ["tunnel_memory.py", "--tunnels", "1000,2000" if args.quick else "1000,10000"]
    floor = ["relay_floor.py", "--rounds", "1" if args.quick else "2", "--duration", "3" if args.quick else "5"]
    return [
        ("http", "HTTP through the tunnel vs direct (nginx target)", http),
        ("floor", "The floor: plain Twisted relays in front of the same nginx", floor),
        ("rest", "REST calls and connects with N tunnels (16 at a time)", rest),
        ("memory", "exposrd memory with N tunnels x 1 and x 2 connections", memory),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs, small N (a smoke run)")
    ap.add_argument("--no-syscalls", action="store_true", help="no perf stat of system calls")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: http, floor, rest, memory")
    args = ap.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    failed = []
    started = time.monotonic()
    for name, title, argv in parts(args):
        if name in skip:
            continue
        print(f"\n=== {title}: bench/{' '.join(argv)}", flush=True)
        t0 = time.monotonic()
        status = subprocess.call([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]])
        print(f"--- {name}: {time.monotonic() - t0:.0f} s" + ("" if status == 0 else f", FAILED (exit {status})"),
              flush=True)
        if status:
            failed.append(name)
    print(f"\nreport: {time.monotonic() - started:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
