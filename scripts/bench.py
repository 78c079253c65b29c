#!/usr/bin/env python3
"""The parts of `scripts/bench.sh` that are easier in Python than in bash (standard library only).

Subcommands (bench.sh calls them; each prints plain text on stdout):
  ports N                       N free loopback TCP ports, space-separated
  bombs DIR                     writes DIR/png-bomb (IHDR claims 100000x100000, valid CRCs) and
                                DIR/gif-bomb (1x1 frame at offset 60000,60000), the two decoder bombs
                                libvips 8.14.1 costs (7.7 s / 14.3 GB when decoded blindly)
  scanbomb OUT COPIES           writes OUT, a JPEG scan bomb: flat grey 6000x6000 encoded by cjpeg as a
                                progressive JPEG (one DC scan, one full AC scan per component), then its
                                last AC scan (SOS header and entropy-coded data) repeated COPIES times
                                before EOI; checks that `djpeg -maxscans 100` refuses it and that djpeg
                                decodes all of it without a warning (timed: minutes of CPU), and prints
                                (and writes to OUT.txt) one line describing it
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
  has-row RESULTS NAME CONNS    "yes" when RESULTS has a row NAME with CONNS connections, else "no"
  attack-record KEY=VALUE...    the attack row's three result lines: wrk=FILE (the valid requests),
                                attack=FILE (scripts/attack.py's results), t0= t1= (the wrk run's wall
                                clock window: only samples sent inside it count), results=FILE (to find
                                the quiet W1 fit c=8 row), sport (status page: limits.max_memory_mb),
                                cpu_s, hwm_mb, note
  table RESULTS                 the final table from the result lines in RESULTS

A result line is JSON with the keys the table reads (name, conns, requests, seconds, non2xx,
socket_errors, p50_us, p99_us, cpu_s, hwm_mb, floor_ms, note).
"""

import asyncio
import json
import math
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
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
    # The same bytes as the unit tests in src/image/render.rs (png_bomb…, gif_frame_far_outside…).
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


def jpeg_segments(data):
    """(marker, start, end) of every segment after SOI; an SOS segment runs to the end of its
    entropy-coded data (the next marker other than a stuffed FF00 or a restart marker RSTn)."""
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    segments, i = [], 2
    while i < len(data):
        if data[i] != 0xFF:
            sys.exit(f"bench.py: no JPEG marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:
            segments.append((marker, i, i + 2))
            break
        end = i + 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        segments.append((marker, i, end))
        i = end
    return segments


def scan_bomb(out, copies):
    # cjpeg -scans: components 0,1,2 in one DC scan, then each component's AC 1-63 at full precision
    # (Ah = Al = 0). Repeating such an AC scan is legal JPEG: each copy refines nothing (libjpeg only
    # warns when a scan's Ah disagrees with what came before, and 0 = 0), but a decoder that reads
    # the whole file entropy-decodes every block of the image once per scan.
    w = h = 6000
    script = "0,1,2: 0-0, 0, 0;\n0: 1-63, 0, 0;\n1: 1-63, 0, 0;\n2: 1-63, 0, 0;\n"
    with tempfile.TemporaryDirectory() as tmp:
        scans = os.path.join(tmp, "scans.txt")
        with open(scans, "w") as f:
            f.write(script)
        ppm = b"P6\n%d %d\n255\n" % (w, h) + bytes([128]) * (w * h * 3)
        # -sample 1x1: 4:4:4, so the repeated scan (the last one, Cr: its Huffman table is the one
        # the last DHT left in force) covers as many blocks as the luma one.
        cmd = ["cjpeg", "-sample", "1x1", "-scans", scans]
        jpeg = subprocess.run(cmd, input=ppm, stdout=subprocess.PIPE, check=True).stdout
    segments = jpeg_segments(jpeg)
    ac = [(s, e) for m, s, e in segments if m == 0xDA and jpeg[s + 4 + 1 + 2 * jpeg[s + 4]] > 0]
    if len(ac) != 3 or segments[-1][0] != 0xD9:
        sys.exit("bench.py: cjpeg's scan bomb base has an unexpected layout")
    start, end = ac[-1]
    eoi = segments[-1][1]
    bomb = jpeg[:eoi] + jpeg[start:end] * copies + jpeg[eoi:]
    tmp_out = out + ".tmp"
    with open(tmp_out, "wb") as f:
        f.write(bomb)
    # djpeg's -maxscans stops at the first scan past the limit, with an error and status 1.
    r = subprocess.run(["djpeg", "-maxscans", "100", tmp_out], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode == 0 or "exceeds maximum scans" not in r.stderr:
        sys.exit(f"bench.py: djpeg -maxscans 100 did not refuse the scan bomb: {r.stderr.strip()}")
    # The whole file: status 0 and nothing on stderr (djpeg exits 2 after a warning).
    scans_total = 4 + copies
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(["djpeg", "-maxscans", str(scans_total + 100), tmp_out],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # (with -maxscans, djpeg's progress monitor erases its line on stderr at the end: "\r   \r")
    if r.returncode != 0 or r.stderr.strip():
        sys.exit(f"bench.py: djpeg does not decode the scan bomb cleanly (status {r.returncode}): "
                 f"{r.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    os.rename(tmp_out, out)
    line = (f"scan bomb: flat grey {w}x{h} progressive JPEG, {scans_total} scans (an AC scan of "
            f"{end - start} bytes {copies} more times), {len(bomb) / 1024:.0f} KB; djpeg -maxscans 100 "
            f"refuses it, a full djpeg decode took {cpu:.1f} s of CPU")
    with open(out + ".txt", "w") as f:
        f.write(line + "\n")
    print(line)


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


def followup(port, sport, count, served):
    """After W8: for the first COUNT ids, asks the three most popular versions of product/image
    other than SERVED (from /versions) and reports the share answered from memory."""
    with urllib.request.urlopen(f"http://127.0.0.1:{sport}/versions", timeout=10) as r:
        table = json.load(r)["classes"].get("product/image", [])
    popular = [row["version"] for row in table if row["version"] != served][:3]
    hits = asked = 0
    for i in range(1, count + 1):
        for v in popular:
            url = f"http://127.0.0.1:{port}/product/image/{i}/{v}"
            with urllib.request.urlopen(url, timeout=30) as r:
                asked += 1
                hits += r.headers.get("X-Cache") == "memory"
    share = hits / asked if asked else 0.0
    return f"{hits}/{asked} from memory ({share:.0%}) for {', '.join(popular)} of ids 1-{count}"


async def pages_async(port, seconds, workers, versions, ids):
    """W7's client: WORKERS page loads at a time; each sends its id's VERSIONS at once, one per
    keep-alive connection, and waits for all of them."""
    counter = {"next": 0}
    latencies, statuses = [], []
    deadline = time.perf_counter() + seconds

    async def read_response(reader):
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        await reader.readexactly(length)
        parts = head.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    async def worker():
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in versions]
        while time.perf_counter() < deadline:
            page = counter["next"] % ids + 1
            counter["next"] += 1
            t0 = time.perf_counter()
            for (_, writer), v in zip(conns, versions):
                writer.write(f"GET /product/image/{page}/{v} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            got = await asyncio.gather(*(read_response(r) for r, _ in conns))
            latencies.append(time.perf_counter() - t0)
            statuses.extend(got)
        for _, writer in conns:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - t0, latencies, statuses


def pages(args):
    kv = dict(p.split("=", 1) for p in args)
    port, sport, pid = int(kv["port"]), int(kv["sport"]), int(kv["pid"])
    versions = kv["versions"].split(",")
    decodes0 = status(sport, "processing.decodes")
    cpu0 = proc_cpu(pid)
    wall, lat, statuses = asyncio.run(
        pages_async(port, float(kv["seconds"]), int(kv["workers"]), versions, int(kv["ids"]))
    )
    cpu = proc_cpu(pid) - cpu0
    decodes = status(sport, "processing.decodes") - decodes0
    lat.sort()
    n = len(lat)
    per_page_ms = cpu / n * 1000 if n else 0.0
    w1 = None
    for line in open(kv["results"]):
        row = json.loads(line)
        if row["name"] == "W1 fit" and row["conns"] == 8 and row.get("cpu_s"):
            w1 = row["cpu_s"] / row["requests"] * 1000
    versus = f" = {per_page_ms / w1:.2f}x one W1 request ({w1:.1f} ms)" if w1 else ""
    print(
        json.dumps(
            {
                "name": "W7 page (6 versions per id)",
                "conns": int(kv["workers"]) * len(versions),
                "requests": len(statuses),
                "seconds": wall,
                "non2xx": sum(1 for s in statuses if s != 200),
                "socket_errors": 0,
                "p50_us": nearest_rank(lat, 50) * 1e6 if n else 0,
                "p99_us": nearest_rank(lat, 99) * 1e6 if n else 0,
                "cpu_s": cpu,
                "hwm_mb": proc_hwm(pid),
                "note": f"{n} pages, CPU {per_page_ms:.1f} ms per page{versus}; "
                f"{decodes} decode passes ({decodes / n if n else 0:.2f} per page); "
                f"p50/p99 are per page",
            }
        )
    )


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


def nearest_rank(sorted_values, pct):
    return sorted_values[max(0, math.ceil(len(sorted_values) * pct / 100) - 1)]


def ok_rate(row):
    return (row["requests"] - row["non2xx"]) / (row["seconds"] or 1e-9)


def max_memory(sport):
    """limits.max_memory_mb from the status page, or the default the config key will have."""
    try:
        return f"{status(sport, 'limits.max_memory_mb')}"
    except (KeyError, TypeError):
        return "1024 (default)"
    except OSError as e:
        return f"? (status page: {e})"


def by_status(statuses):
    counts = {}
    for st in statuses:
        counts[str(st)] = counts.get(str(st), 0) + 1
    # HTTP codes first, in order, then timeout / error:... / pending
    order = sorted(counts, key=lambda k: (not k.isdigit(), k))
    return " ".join(f"{k}:{counts[k]}" for k in order) or "none"


def attack_record(pairs):
    kv = dict(p.split("=", 1) for p in pairs)
    t0, t1 = float(kv["t0"]), float(kv["t1"])
    seconds = t1 - t0
    with open(kv["attack"]) as f:
        attack = json.load(f)
    inside = lambda sample: t0 <= sample[0] <= t1

    # The quiet reference: this run's W1 fit c=8 row, else the quiet run bench.sh made for this row.
    quiet = None
    for line in open(kv["results"]):
        if line.strip():
            row = json.loads(line)
            if row["conns"] == 8 and row["name"] in ("W1 fit", "attack: quiet W1 fit (reference)"):
                quiet = row
                break

    stats = wrk_stats(kv["wrk"])
    valid = {
        "name": "attack: valid W1 fit",
        "conns": 8,
        "requests": stats["requests"],
        "seconds": stats["duration_us"] / 1e6,
        "non2xx": stats["status_errors"],
        "socket_errors": stats["socket_errors"],
        "p50_us": float(stats["p50_us"]),
        "p99_us": float(stats["p99_us"]),
    }
    for key in ("cpu_s", "hwm_mb"):
        if kv.get(key):
            valid[key] = float(kv[key])
    if quiet is not None:
        ratio = f"{ok_rate(valid) / ok_rate(quiet):.2f} of quiet W1 c=8's {ok_rate(quiet):.1f}"
    else:
        ratio = "n/a (no quiet W1 c=8 run)"
    bad = valid["non2xx"] + valid["socket_errors"]
    rss = f"{valid['hwm_mb']:.0f} MB" if "hwm_mb" in valid else "?"
    valid["note"] = (
        f"req/s {ratio} (target >= 0.7); non-2xx {bad} (target 0); peak RSS {rss}, "
        f"max_memory_mb {max_memory(int(kv['sport']))}; CPU columns: all server CPU (attack too) "
        "per valid answer" + kv.get("note", "")
    )

    # /health: a probe that failed (timeout, error, not 200) counts as 5000 ms, a timeout's worth.
    probes = [h for h in attack["health"] if inside(h)]
    lat = sorted(h[1] if h[2] == 200 else 5000.0 for h in probes)
    failed = sum(1 for h in probes if h[2] != 200)
    p99 = nearest_rank(lat, 99) if lat else None
    health = {
        "name": "attack: /health every 100 ms",
        "conns": "-",
        "requests": len(probes),
        "seconds": seconds,
        "non2xx": failed,
        "socket_errors": 0,
        "p50_us": nearest_rank(lat, 50) * 1000 if lat else None,
        "p99_us": p99 * 1000 if lat else None,
        "note": (
            f"p99 {fmt_ms(p99 * 1000) if lat else '-'} ms (target < 100), max "
            f"{fmt_ms(lat[-1] * 1000) if lat else '-'} ms; {len(probes)} probes, {failed} failed "
            f"({by_status(h[2] for h in probes)}; a failure counts as 5000 ms); fresh connection each"
        ),
    }

    sent = [h for h in attack["hostile"] if inside(h)]
    answered = [h for h in sent if isinstance(h[2], int)]
    hlat = sorted(h[3] for h in answered)
    kinds = "; ".join(
        f"{k} {by_status(h[2] for h in sent if h[1] == k)}" for k in attack["kinds"]
    )
    idle = [s for s in attack["idle"] if inside(s)]
    wanted = attack["idle_wanted"]
    if idle:
        mean = lambda k: sum(s[k] for s in idle) / len(idle)
        held = (f"idle sockets open (image+status, of {wanted[0]}+{wanted[1]}): mean "
                f"{mean(1):.0f}+{mean(2):.0f}, min {min(s[1] for s in idle)}+{min(s[2] for s in idle)}")
    else:
        held = "idle sockets: no sample"
    totals = attack["idle_totals"]
    closes = totals["image"]["server_closes"] + totals["status"]["server_closes"]
    hostile = {
        "name": f"attack: hostile, {attack['rate']:g}/s",
        "conns": "-",
        "requests": len(answered),
        "seconds": seconds,
        "non2xx": sum(1 for h in answered if not 200 <= h[2] < 300),
        "socket_errors": len(sent) - len(answered),
        "p50_us": nearest_rank(hlat, 50) * 1000 if hlat else None,
        "p99_us": nearest_rank(hlat, 99) * 1000 if hlat else None,
        "all_answers": True,
        "note": (
            f"answers by kind: {kinds}; {held}, closed by the server {closes} times; "
            f"attack.py used {attack['cpu_s']:.1f} CPU-s in {attack['wall_s']:.0f} s (these two: "
            "whole attack); req/s: all answers, non-2xx: refusals + no answer (10 s timeout)"
        ),
    }
    for row in (valid, health, hostile):
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
    elif cmd == "pages":
        pages(args)
    elif cmd == "followup":
        print(followup(int(args[0]), int(args[1]), int(args[2]), args[3]))
    elif cmd == "status":
        print(status(int(args[0]), args[1]))
    elif cmd == "ratio":
        ratio(args[0], args[1])
    elif cmd == "record":
        record(args)
    elif cmd == "has-row":
        rows = [json.loads(line) for line in open(args[0]) if line.strip()]
        found = any(r["name"] == args[1] and str(r["conns"]) == args[2] for r in rows)
        print("yes" if found else "no")
    elif cmd == "attack-record":
        attack_record(args)
    elif cmd == "scanbomb":
        scan_bomb(args[0], int(args[1]))
    elif cmd == "table":
        table(args[0])
    else:
        sys.exit(f"bench.py: unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
