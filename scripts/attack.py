#!/usr/bin/env python3
"""The attackers of `scripts/bench.sh`'s "attack" row (standard library only, asyncio).

Runs until SIGTERM or SIGINT, then writes what it saw as JSON to OUT:
  * idle sockets: IDLE connections to the image port and STATUS_IDLE to the status port that send
    nothing; when the server closes one (or it fails), it is opened again, so the pressure stays
    constant. A socket the server dropped within a second waits 100 ms before reconnecting, so a
    server that refuses them at once meets a steady stream of connects rather than a busy loop that
    would take a core from it (the attacker shares the machine).
  * hostile requests: RATE per second in all, one per fresh connection (`Connection: close`), the
    kinds taking turns (so each gets RATE/kinds per second). A kind is NAME=TEMPLATE[,TEMPLATE...];
    `{n}` in a template is the kind's request count 1, 2, ... (wrapping after IDS), and several
    templates of one kind take turns too (`decoder=/p/i/pb{n}/x.jpg,/p/i/gb{n}/x.jpg`: pb1, gb1,
    pb2, ...). A request gets HOSTILE_TIMEOUT seconds for its whole answer.
  * /health on the status port every 100 ms on a fresh connection, 5 s timeout, from a child process
    with its own event loop: in the attackers' loop, a wave of 2,000 reconnects (the server closing
    idle sockets at its header deadline) stalled it for 200-600 ms, and those stalls landed in the
    probes' latencies. The child exits by itself if this process dies.
Sends are scheduled on absolute times (start + i / rate), so a slow answer never delays the next one.

The probes start at once; when every idle socket has connected once (or after 20 s, whichever is
first), the hostile requests start and READY (a small JSON file) is written: bench.sh waits for it.

OUT holds wall-clock times (time.time(), comparable with `date +%s.%N`) so bench.py can keep the
samples inside the wrk run's window:
  health:  [[sent_at, ms, status], ...]        status: HTTP code, "timeout" (ms = 5000), "closed"
                                               (closed without an answer), "error:<exception>"
  hostile: [[sent_at, kind, status, ms], ...]  status as above
  idle:    [[t, open_image, open_status], ...] every 100 ms
  idle_totals: connects, server_closes, connect_failures per port
  cpu_s, wall_s: this process's and the prober's CPU (user + system) and its lifetime: the attackers
               share the machine with the server
At the stop no new request is sent, the idle sockets are closed and the requests under way are waited
for (each has its timeout, so this takes at most HOSTILE_TIMEOUT + 1 s); one still unanswered after
that stays "pending".
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import signal
import sys
import time

HOST = "127.0.0.1"
HEALTH_EVERY = 0.1
HEALTH_TIMEOUT = 5.0
READY_WAIT = 20.0


def raise_nofile(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        print(f"attack.py: RLIMIT_NOFILE is {soft}, below the {needed} sockets wanted", file=sys.stderr)


def parse_status(data):
    # "HTTP/1.1 422 Unprocessable Entity\r\n..." -> 422
    if not data:
        return "closed"
    parts = data.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return "error:no status line"


async def request(port, path, timeout):
    """One GET on a fresh connection: (status, ms). The whole exchange, connect included, is timed."""
    t0 = time.monotonic()
    writer = None

    async def exchange():
        nonlocal writer
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        return await reader.read()  # the server closes after the answer (Connection: close)

    try:
        data = await asyncio.wait_for(exchange(), timeout)
        status = parse_status(data)
    except asyncio.TimeoutError:
        status = "timeout"
    except OSError as e:
        status = f"error:{type(e).__name__}"
    finally:
        if writer is not None:
            writer.close()
    return status, (time.monotonic() - t0) * 1000


class Idle:
    """The idle sockets of one port."""

    def __init__(self, port, count, connect_slots):
        self.port, self.count, self.slots = port, count, connect_slots
        self.open = 0
        self.connected_once = 0
        self.connects = 0
        self.server_closes = 0
        self.connect_failures = 0

    async def one(self):
        first = True
        while True:
            try:
                async with self.slots:  # not 2,200 SYNs at once: the accept backlog would drop them
                    reader, writer = await asyncio.open_connection(HOST, self.port)
            except OSError:
                self.connect_failures += 1
                await asyncio.sleep(0.1)
                continue
            self.connects += 1
            if first:
                self.connected_once += 1
                first = False
            self.open += 1
            t0 = time.monotonic()
            try:
                while await reader.read(4096):  # an answer (a 408, say) before the close
                    pass
            except OSError:
                pass
            except asyncio.CancelledError:  # the stop
                writer.close()
                raise
            self.open -= 1
            self.server_closes += 1
            writer.close()
            if time.monotonic() - t0 < 1:
                await asyncio.sleep(0.1)


def prober_main(sport, out, stop, parent):
    """The child process: /health every HEALTH_EVERY until `stop` is set or the parent is gone."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # the parent stops it through `stop`, after its own work
    asyncio.run(prober(sport, out, stop, parent))


async def prober(sport, out, stop, parent):
    health, inflight = [], set()

    async def probe():
        entry = [time.time(), None, "pending"]
        health.append(entry)
        entry[2], entry[1] = await request(sport, "/health", HEALTH_TIMEOUT)
        if entry[2] == "timeout":
            entry[1] = HEALTH_TIMEOUT * 1000

    start, i = time.monotonic(), 0
    while not stop.is_set() and os.getppid() == parent:
        task = asyncio.create_task(probe())
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        i += 1
        await asyncio.sleep(max(0, start + i * HEALTH_EVERY - time.monotonic()))
    if inflight:
        await asyncio.wait(set(inflight), timeout=HEALTH_TIMEOUT + 1)
    with open(out, "w") as f:
        json.dump(health, f)


async def main(args, prober_stop, prober_process):
    born = time.monotonic()
    raise_nofile(args.idle + args.status_idle + int(args.rate * args.hostile_timeout) + 200)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    kinds = []
    for spec in args.kind:
        name, templates = spec.split("=", 1)
        kinds.append((name, templates.split(",")))

    slots = asyncio.Semaphore(100)
    idle = [Idle(args.port, args.idle, slots), Idle(args.sport, args.status_idle, slots)]
    background = [asyncio.create_task(i.one()) for i in idle for _ in range(i.count)]

    deadline = time.monotonic() + READY_WAIT
    while not stop.is_set() and time.monotonic() < deadline:
        if all(i.connected_once == i.count for i in idle):
            break
        await asyncio.sleep(0.05)

    hostile, idle_samples = [], []
    inflight = set()

    def track(coro):
        task = asyncio.create_task(coro)
        inflight.add(task)
        task.add_done_callback(inflight.discard)

    async def attack(kind, path):
        entry = [time.time(), kind, "pending", None]
        hostile.append(entry)
        entry[2], entry[3] = await request(args.port, path, args.hostile_timeout)

    async def schedule(every, fire):
        start, i = time.monotonic(), 0
        while not stop.is_set():
            fire(i)
            i += 1
            delay = start + i * every - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass

    counts = [0] * len(kinds)

    def fire_hostile(i):
        k = i % len(kinds)
        name, templates = kinds[k]
        c = counts[k]
        counts[k] += 1
        n = (c // len(templates)) % args.ids + 1
        track(attack(name, templates[c % len(templates)].replace("{n}", str(n))))

    def sample_idle(_):
        idle_samples.append([time.time(), idle[0].open, idle[1].open])

    loops = [asyncio.create_task(schedule(HEALTH_EVERY, sample_idle))]
    if kinds and args.rate > 0:
        loops.append(asyncio.create_task(schedule(1 / args.rate, fire_hostile)))

    with open(args.ready, "w") as f:
        json.dump({"idle_open": [i.open for i in idle], "idle_wanted": [i.count for i in idle]}, f)

    await stop.wait()
    prober_stop.set()
    await asyncio.gather(*loops)
    for t in background:
        t.cancel()
    if inflight:
        # Each has its own timeout: this ends within hostile_timeout (bench.sh waits that long, + 5 s).
        await asyncio.wait(set(inflight), timeout=args.hostile_timeout + 1)
    for t in list(inflight):
        t.cancel()  # (not expected) their entries stay "pending"
    # The prober waits for its last probes too (5 s timeout each), at the same time as the above.
    prober_process.join(HEALTH_TIMEOUT + 2)
    try:
        with open(args.out + ".health") as f:
            health = json.load(f)
        os.unlink(args.out + ".health")
    except OSError as e:
        print(f"attack.py: no /health results from the prober: {e}", file=sys.stderr)
        health = []
    totals = {
        name: {
            "connects": i.connects,
            "server_closes": i.server_closes,
            "connect_failures": i.connect_failures,
        }
        for name, i in zip(("image", "status"), idle)
    }
    with open(args.out, "w") as f:
        json.dump(
            {
                "kinds": [k for k, _ in kinds],
                "rate": args.rate,
                "idle_wanted": [args.idle, args.status_idle],
                "health": health,
                "hostile": hostile,
                "idle": idle_samples,
                "idle_totals": totals,
                "cpu_s": sum(
                    r.ru_utime + r.ru_stime
                    for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
                ),
                "wall_s": time.monotonic() - born,
            },
            f,
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("port", type=int, help="image port")
    p.add_argument("sport", type=int, help="status port")
    p.add_argument("out", help="results (JSON), written at the stop")
    p.add_argument("ready", help="written once the attack is under way")
    p.add_argument("--idle", type=int, default=2000, help="idle sockets on the image port")
    p.add_argument("--status-idle", type=int, default=200, help="idle sockets on the status port")
    p.add_argument("--rate", type=float, default=50, help="hostile requests per second, all kinds")
    p.add_argument("--kind", action="append", default=[], help="NAME=TEMPLATE[,TEMPLATE...]")
    p.add_argument("--ids", type=int, default=20000, help="{n} wraps after this")
    p.add_argument("--hostile-timeout", type=float, default=10, help="seconds per hostile request")
    args = p.parse_args()
    # Forked before any event loop exists (fork: its getppid() is this process, for the exit check).
    context = multiprocessing.get_context("fork")
    prober_stop = context.Event()
    prober_process = context.Process(
        target=prober_main, args=(args.sport, args.out + ".health", prober_stop, os.getpid())
    )
    prober_process.start()
    asyncio.run(main(args, prober_stop, prober_process))
