#!/usr/bin/env python3
"""The parts of `scripts/bench.sh` that are easier in Python than in bash (standard library only).

Subcommands (bench.sh calls them; each prints plain text on stdout):
  ports N                       N free loopback TCP ports, space-separated
  bombs DIR                     writes DIR/png-bomb (IHDR claims 100000x100000, valid CRCs) and
                                DIR/gif-bomb (1x1 frame at offset 60000,60000), the two decoder bombs
                                PLATFORM.md measured (7.7 s / 14.3 GB when decoded blindly)
  links DIR TARGET PREFIX COUNT DIR/PREFIX1..COUNT become hard links to TARGET (one inode: every id
                                is a distinct URL and cache key, the bytes come from the page cache)
  floor JPEG SCALE RUNS         mean CPU (user+sys) in ms of `djpeg -scale SCALE -outfile /dev/null
                                JPEG` over RUNS runs, from getrusage(RUSAGE_CHILDREN)
  cpu PID                       utime+stime of PID in seconds, from /proc/PID/stat
  hwm PID                       VmHWM (peak RSS) of PID in MB, from /proc/PID/status
  tree-cpu PID                  like cpu, summed over PID and its children (nginx master + workers)
  tree-hwm PID                  the largest VmHWM of PID and its children, in MB
  stampede PORT SPORT PATH N PID
                                N connections opened first, then N requests for PATH sent at once;
                                prints one result line with the status-page deltas and PID's CPU
  ratio OURS.out THEIRS.out      W5's comparison line from two wrk outputs
  record KEY=VALUE...           one result line: name, conns, wrk=FILE (the `BENCH ...` line our wrk
                                Lua done() prints), cpu_s, hwm_mb, floor_ms, note, all_answers=1
                                (req/s counts non-2xx answers too: for rows of expected refusals)
  status SPORT KEY.KEY          one number from the status page JSON
  table RESULTS                 the final table from the result lines in RESULTS

A result line is JSON with the keys the table reads (name, conns, requests, seconds, non2xx,
socket_errors, p50_us, p99_us, cpu_s, hwm_mb, floor_ms, note).
"""

import asyncio
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib


def ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bombs(out_dir):
    # The same bytes as the unit tests in src/image/vips.rs (png_bomb…, gif_frame_far_outside…).
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes([8, 2, 0, 0, 0])
    png = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    png += png_chunk(b"IDAT", bytes([0x78, 0x9C, 0x63, 0x00, 0x00])) + png_chunk(b"IEND", b"")
    gif = b"GIF89a" + bytes([1, 0, 1, 0, 0, 0, 0])  # 1x1 screen, no global palette
    gif += b"\x2c" + struct.pack("<HHHH", 60_000, 60_000, 1, 1) + b"\x80"  # frame, local palette
    gif += bytes([0, 0, 0, 255, 255, 255]) + bytes([0x02, 0x02, 0x44, 0x01, 0x00]) + b"\x3b"
    with open(os.path.join(out_dir, "png-bomb"), "wb") as f:
        f.write(png)
    with open(os.path.join(out_dir, "gif-bomb"), "wb") as f:
        f.write(gif)


def links(out_dir, target, prefix, count):
    for i in range(1, count + 1):
        path = os.path.join(out_dir, f"{prefix}{i}")
        if not os.path.exists(path):
            os.link(target, path)


def floor(jpeg, scale, runs):
    cmd = ["djpeg", "-scale", scale, "-outfile", "/dev/null", jpeg]
    subprocess.run(cmd, check=True)  # once untimed: page cache, dynamic loader
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(runs):
        subprocess.run(cmd, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"{cpu / runs * 1000:.2f}")


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        # The command name is in parentheses and may hold spaces: split after the last ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat(5) (utime, stime) are the 12th and 13th after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid):
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return kids


def status(sport, dotted):
    with urllib.request.urlopen(f"http://127.0.0.1:{sport}/", timeout=10) as r:
        value = json.load(r)
    for part in dotted.split("."):
        value = value[part]
    return value


async def stampede_async(port, path, n):
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(n)))
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
    start = asyncio.Event()
    latencies, statuses, sizes = [], [], []

    async def one(reader, writer):
        await start.wait()
        t0 = time.perf_counter()
        writer.write(request)
        await writer.drain()
        data = await reader.read()  # the server closes after the response (Connection: close)
        latencies.append(time.perf_counter() - t0)
        head, _, body = data.partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        statuses.append(int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0)
        sizes.append(len(body))
        writer.close()

    tasks = [asyncio.create_task(one(r, w)) for r, w in conns]
    await asyncio.sleep(0.1)  # every task is parked on the event
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return time.perf_counter() - t0, latencies, statuses, sizes


def stampede(port, sport, path, n, pid):
    fetches0 = status(sport, "downloads.total")
    renders0 = status(sport, "processing.total")
    cpu0 = proc_cpu(pid)
    total, lat, statuses, sizes = asyncio.run(stampede_async(port, path, n))
    cpu = proc_cpu(pid) - cpu0
    fetches = status(sport, "downloads.total") - fetches0
    renders = status(sport, "processing.total") - renders0
    lat.sort()
    ok = sum(1 for s in statuses if s == 200)
    same = len(set(sizes)) == 1
    note = (
        f"total {total * 1000:.0f} ms for {n}; origin fetches {fetches}, renders {renders} "
        f"(expect 1, 1); {ok}/{n} answered 200{'' if same else ', bodies differ!'}"
    )
    print(
        json.dumps(
            {
                "name": "W6 stampede (1 cold key)",
                "conns": n,
                "requests": ok,
                "seconds": total,
                "non2xx": n - ok,
                "socket_errors": 0,
                "p50_us": lat[len(lat) // 2] * 1e6,
                "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6,
                "cpu_s": cpu,
                "hwm_mb": proc_hwm(pid),
                "note": note,
            }
        )
    )


def record(pairs):
    kv = dict(p.split("=", 1) for p in pairs)
    stats = wrk_stats(kv.pop("wrk"))
    row = {
        "name": kv.pop("name"),
        "conns": int(kv.pop("conns")),
        "requests": int(stats["requests"]),
        "seconds": int(stats["duration_us"]) / 1e6,
        "non2xx": int(stats["status_errors"]),
        "socket_errors": int(stats["socket_errors"]),
        "p50_us": float(stats["p50_us"]),
        "p99_us": float(stats["p99_us"]),
        "note": kv.pop("note", ""),
    }
    if kv.get("all_answers") == "1":
        row["all_answers"] = True  # refusals are the expected answer: req/s counts them
    for key in ("cpu_s", "hwm_mb", "floor_ms"):
        if kv.get(key):
            row[key] = float(kv[key])
    print(json.dumps(row))


def wrk_stats(path):
    """The BENCH line of a wrk output; several (W5's rounds) are summed: requests, duration and
    errors add up, p50 is the median round's and p99 the worst round's."""
    rounds = []
    with open(path) as f:
        for line in f:
            if line.startswith("BENCH "):
                rounds.append({k: int(v) for k, v in (p.split("=", 1) for p in line.split()[1:])})
    if not rounds:
        sys.exit(f"bench.py: no BENCH line in {path}")
    total = {k: sum(r[k] for r in rounds) for k in rounds[0]}
    total["p50_us"] = sorted(r["p50_us"] for r in rounds)[len(rounds) // 2]
    total["p99_us"] = max(r["p99_us"] for r in rounds)
    return total


def ratio(ours_path, theirs_path):
    rate = lambda s: (s["requests"] - s["status_errors"]) / (s["duration_us"] / 1e6)
    ours, theirs = wrk_stats(ours_path), wrk_stats(theirs_path)
    print(
        f"image-server/nginx req/s = {rate(ours) / rate(theirs):.2f} (target >= 0.8); "
        f"p99 {ours['p99_us'] / 1000:.2f} vs {theirs['p99_us'] / 1000:.2f} ms"
    )


def fmt_ms(us):
    if us is None:
        return "-"
    ms = us / 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def table(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    head = [
        "workload",
        "conns",
        "req/s",
        "non-2xx",
        "req/CPU-s",
        "CPU ms/req",
        "cores",
        "p50 ms",
        "p99 ms",
        "peak RSS MB",
        "x floor",
        "notes",
    ]
    out = []
    for r in rows:
        ok = r["requests"] if r.get("all_answers") else r["requests"] - r["non2xx"]
        secs = r["seconds"] or 1e-9
        cpu = r.get("cpu_s")
        per_req = cpu / ok * 1000 if cpu is not None and ok > 0 else None
        floor_ms = r.get("floor_ms")
        out.append(
            [
                r["name"],
                str(r["conns"]),
                f"{ok / secs:.1f}" if ok / secs < 1000 else f"{ok / secs:.0f}",
                str(r["non2xx"] + r.get("socket_errors", 0)),
                "-" if per_req is None else f"{1000 / per_req:.1f}",
                "-" if per_req is None else f"{per_req:.2f}",
                "-" if cpu is None else f"{cpu / secs:.2f}",
                fmt_ms(r.get("p50_us")),
                fmt_ms(r.get("p99_us")),
                "-" if r.get("hwm_mb") is None else f"{r['hwm_mb']:.0f}",
                "-" if not floor_ms or per_req is None else f"{per_req / floor_ms:.2f}",
                r.get("note", ""),
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *out)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for cells in out:
        print(line(cells))


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "ports":
        ports(int(args[0]))
    elif cmd == "bombs":
        bombs(args[0])
    elif cmd == "links":
        links(args[0], args[1], args[2], int(args[3]))
    elif cmd == "floor":
        floor(args[0], args[1], int(args[2]))
    elif cmd == "cpu":
        print(f"{proc_cpu(int(args[0])):.3f}")
    elif cmd == "hwm":
        print(f"{proc_hwm(int(args[0])):.1f}")
    elif cmd == "tree-cpu":
        pid = int(args[0])
        print(f"{sum(proc_cpu(p) for p in [pid] + children(pid)):.3f}")
    elif cmd == "tree-hwm":
        pid = int(args[0])
        print(f"{max(proc_hwm(p) for p in [pid] + children(pid)):.1f}")
    elif cmd == "stampede":
        stampede(int(args[0]), int(args[1]), args[2], int(args[3]), int(args[4]))
    elif cmd == "status":
        print(status(int(args[0]), args[1]))
    elif cmd == "ratio":
        ratio(args[0], args[1])
    elif cmd == "record":
        record(args)
    elif cmd == "table":
        table(args[0])
    else:
        sys.exit(f"bench.py: unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
