"""Load test of `rdm serve` with API keys: 16 clients, each with its own key, for D seconds per scenario.

    python scripts/load_serve.py                      # the four scenarios below, 60 s each, tiny model
    python scripts/load_serve.py --duration 10 --scenarios fair

Scenarios (the server runs in its own process, `rdm serve --keys FILE`, on 127.0.0.1):
- batched / one-at-a-time: 16 polite clients, --max-batch 8 then 1 (the batching gain);
- fair: 14 polite clients and 2 flooding ones, the fair queue (each key at most --max-jobs-per-key jobs,
  keys served in turn); fifo: the same load first come, first served, one key may fill the queue.
A polite client submits a generate job (random prompt, database A or B, its own seeds), follows its event
stream to the end and submits the next; on 429 it waits Retry-After. A flooding client submits as fast as
it can (50 ms after a 429, ignoring Retry-After) and follows each accepted job in a thread of its own.
Checks: no 5xx; every accepted job finished; batching gains >= 1.5x; with flooders and the fair queue no
flooder gets more than 1.5 fair shares of the jobs done (a fair share: the jobs done / the clients) and
every polite client at least 0.75. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

PROMPTS = ["a red circle", "a blue square", "a green star", "a yellow heart", "a purple cross", "an orange ring"]


def make_world(root: Path, resolution: int, channels: int) -> tuple[Path, Path]:
    """Tiny CLIP, tiny rdm model, databases A and B (24 and 16 pictures) under root."""
    import numpy as np
    from PIL import Image

    from rdm import api
    from rdm.models.tiny import make_tiny_clip, make_tiny_rdm

    clip = make_tiny_clip(root / "clip")
    identity = api.load_embedder(clip, "cpu", "float32").identity.to_dict()
    model = make_tiny_rdm(root / "model", identity, resolution=resolution, channels=channels)
    rng = np.random.default_rng(0)
    for name, n in (("A", 24), ("B", 16)):
        folder = root / f"pics{name}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
        api.build_index(str(folder), name=name, clip=clip, indexes=str(root / "indexes"), workers=0, progress=False)
    return model, root / "indexes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_keys(path: Path, clients: int) -> list[str]:
    """One key per client (search, generate; every collection), stored hashed in `path`; the keys themselves."""
    from rdm.service.access import add_key

    return [add_key(path, f"client-{c:02d}", ("search", "generate"), ("*",)) for c in range(clients)]


def start_server(model: Path, home: Path, keys: Path, name: str, extra: list[str],
                 threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(home.parent / f"serve-{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "rdm.cli", "--indexes", str(home), "serve", "--port", str(port),
                             "--model", str(model), "--keys", str(keys), "--threads", str(threads), *extra],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/api/health", timeout=2):
                return proc, base
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {(home.parent / f'serve-{name}.log').read_text()}")
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def post(url: str, body: dict, key: str) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json",
                                                                      "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read() or b"{}")


FINAL = ("done", "failed", "cancelled")


def get(url: str, key: str, timeout: float = 60):
    return urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"}),
                                  timeout=timeout)


def follow(base: str, job: dict, key: str) -> tuple[str, bool]:
    """Read the job's event stream to its final event -> (final state, whether the stream ended early and the
    state had to be polled)."""
    with get(base + job["events_url"], key, timeout=600) as stream:
        for line in stream:
            if line.startswith(b"event:") and line.decode().split(":", 1)[1].strip() in FINAL:
                return line.decode().split(":", 1)[1].strip(), False
    while True:
        with get(base + job["status_url"], key) as r:
            state = json.loads(r.read())["state"]
        if state in FINAL:
            return state, True
        time.sleep(0.1)


def run_mode(base: str, keys: list[str], flooders: int, duration: float, steps: int, admin: str) -> dict:
    """Clients 0..flooders-1 flood, the others are polite; per-client counts and latencies (submit -> done)."""
    lock = threading.Lock()
    per = [{"accepted": 0, "done": 0, "refused_429": 0, "5xx": 0, "other_4xx": 0, "latencies": [], "states": {},
            "streams_ended_early": 0, "flooder": c < flooders} for c in range(len(keys))]
    stop_at = time.monotonic() + duration
    followers: list[threading.Thread] = []

    def submit(cid: int, i: int, rng: random.Random):
        body = {"prompt": rng.choice(PROMPTS), "databases": [{"name": rng.choice("AB")}], "steps": steps,
                "seed": cid * 100_000 + i}
        t0 = time.monotonic()
        status, headers, job = post(f"{base}/api/generate", body, keys[cid])
        with lock:
            if status == 429:
                per[cid]["refused_429"] += 1
            elif status >= 500:
                per[cid]["5xx"] += 1
            elif status != 202:
                per[cid]["other_4xx"] += 1
            else:
                per[cid]["accepted"] += 1
        return status, headers, job, t0

    def finish(cid: int, job: dict, t0: float):
        state, early = follow(base, job, keys[cid])
        with lock:
            s = per[cid]
            s["streams_ended_early"] += early
            s["states"][state] = s["states"].get(state, 0) + 1
            if state == "done":
                s["done"] += 1
                s["latencies"].append(time.monotonic() - t0)

    def polite(cid: int):
        rng, i = random.Random(cid), 0
        while time.monotonic() < stop_at:
            status, headers, job, t0 = submit(cid, i, rng)
            i += 1
            if status == 429:
                time.sleep(min(float(headers.get("retry-after", 1)), max(0.0, stop_at - time.monotonic())))
            elif status == 202:
                finish(cid, job, t0)

    def flood(cid: int):
        rng, i = random.Random(cid), 0
        while time.monotonic() < stop_at:
            status, _, job, t0 = submit(cid, i, rng)
            i += 1
            if status == 202:
                t = threading.Thread(target=guarded, args=(finish, cid, job, t0))
                t.start()
                with lock:
                    followers.append(t)
            else:
                time.sleep(0.05)  # an abusive client: Retry-After ignored

    def guarded(fn, cid, *args):
        try:
            fn(cid, *args)
        except Exception as e:  # noqa: BLE001 - counted: a client error is a failed check, not a crash
            with lock:
                per[cid]["states"][f"client error: {type(e).__name__}: {e}"] = 1

    started = time.monotonic()
    threads = [threading.Thread(target=guarded, args=(flood if c < flooders else polite, c)) for c in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in list(followers):
        t.join()
    seconds = time.monotonic() - started  # includes finishing the jobs in flight at the deadline
    with get(f"{base}/api/stats", admin, timeout=10) as r:
        server = json.loads(r.read())
    return {"per": per, "seconds": seconds, "server": server}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


SCENARIOS = {  # name: (--max-batch, flooding clients, extra rdm serve options)
    "batched": (8, 0, []),
    "one-at-a-time": (1, 0, []),
    "fair": (8, 2, ["--fair-queue"]),
    "fifo": (8, 2, ["--fifo", "--max-jobs-per-key", "{max_queue}"]),
}


def summary(result: dict) -> dict:
    per = result["per"]
    polite = [p for p in per if not p["flooder"]]
    floods = [p for p in per if p["flooder"]]
    done = sum(p["done"] for p in per)
    lat = [x for p in polite for x in p["latencies"]]
    return {"done": done, "rate": done / result["seconds"], "p50": percentile(lat, 50), "p95": percentile(lat, 95),
            "polite_done": sum(p["done"] for p in polite), "flood_done": [p["done"] for p in floods],
            "flood_share": (max(p["done"] for p in floods) / max(done, 1) * len(per)) if floods else None,
            "polite_share": min(p["done"] for p in polite) / max(done, 1) * len(per) if polite else None,
            "429": sum(p["refused_429"] for p in per), "5xx": sum(p["5xx"] for p in per),
            "other_4xx": sum(p["other_4xx"] for p in per),
            "unfinished": sum(p["accepted"] - p["done"] for p in per),
            "batch": result["server"].get("mean_batch_size"),
            "trouble": {k: v for p in per for k, v in p["states"].items() if k != "done"},
            "early": sum(p["streams_ended_early"] for p in per)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of submitting per scenario")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per job")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--max-jobs-per-key", type=int, default=4, help="each key's share of the queue (fair)")
    parser.add_argument("--resolution", type=int, default=8, help="tiny model's image side (pixel space)")
    parser.add_argument("--channels", type=int, default=16, help="tiny model's U-Net width (two levels)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: a tiny one made here)")
    parser.add_argument("--indexes", type=Path, default=None, help="databases' home with A and B")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rdm-load-") as tmp:
        if args.model:
            model, home = args.model, args.indexes
        else:
            model, home = make_world(Path(tmp), args.resolution, args.channels)
        keys_file = Path(tmp) / "keys.json"
        keys = make_keys(keys_file, args.clients + 1)  # the last one watches /api/stats
        from rdm.service.access import add_key

        admin = add_key(keys_file, "operator", ("admin",), ("*",))
        results = {}
        for name in args.scenarios:
            max_batch, flooders, extra = SCENARIOS[name]
            extra = [e.format(max_queue=args.max_queue) for e in extra]
            options = ["--max-batch", str(max_batch), "--max-queue", str(args.max_queue), "--max-jobs-per-key",
                       str(args.max_jobs_per_key), *extra]  # a later --max-jobs-per-key wins (fifo)
            proc, base = start_server(model, home, keys_file, name, options, args.threads)
            try:
                results[name] = summary(run_mode(base, keys[:args.clients], flooders, args.duration, args.steps,
                                                 admin))
            finally:
                proc.terminate()
                proc.wait(30)
            server_log = (home.parent / f"serve-{name}.log").read_text()
            if "Traceback" in server_log or results[name]["early"]:
                print(f"server log ({name}):\n{server_log[-3000:]}", file=sys.stderr)

    ok = True
    shape = "given model" if args.model else f"tiny model {args.resolution}px, U-Net width {args.channels}"
    print(f"\n{args.clients} clients (one key each) x {args.duration:g} s per scenario, {args.steps} steps, {shape}, "
          f"server torch threads {args.threads}, max-queue {args.max_queue}, {args.max_jobs_per_key} jobs per key, "
          f"{os.cpu_count()} CPU(s)\n")
    header = ("scenario", "jobs done", "jobs/s", "polite p50 s", "polite p95 s", "polite jobs", "flooders' jobs",
              "top flooder / fair share", "least polite / fair share", "429s", "5xx", "unfinished", "mean batch")
    rows = []
    for name, r in results.items():
        ok &= r["5xx"] == 0 and r["unfinished"] == 0 and not r["trouble"] and not r["early"]
        rows.append((name, r["done"], f"{r['rate']:.2f}", f"{r['p50']:.2f}", f"{r['p95']:.2f}", r["polite_done"],
                     "/".join(map(str, r["flood_done"])) or "-",
                     f"{r['flood_share']:.2f}" if r["flood_share"] is not None else "-",
                     f"{r['polite_share']:.2f}" if r["polite_share"] is not None else "-", r["429"], r["5xx"],
                     r["unfinished"], r["batch"]))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        args.csv.write_text(",".join(header) + "\n" + "\n".join(",".join(map(str, row)) for row in rows) + "\n")
    for name, r in results.items():
        if r["trouble"] or r["early"]:
            print(f"{name}: other final states {r['trouble']}, streams that ended before the final event: {r['early']}")
    if {"batched", "one-at-a-time"} <= results.keys():
        ratio = results["batched"]["rate"] / max(results["one-at-a-time"]["rate"], 1e-9)
        print(f"\nbatched / one at a time: {ratio:.2f}x throughput")
        ok &= ratio >= 1.5
    if "fair" in results:
        fair = results["fair"]
        slow = fair["p95"] / max(results["batched"]["p95"], 1e-9) if "batched" in results else float("nan")
        print(f"fair queue, 2 flooders: the busiest flooder got {fair['flood_share']:.2f} fair shares of the jobs "
              f"done, the least-served polite client {fair['polite_share']:.2f}; polite p95 latency {slow:.2f}x the "
              "polite-only run")
        ok &= fair["flood_share"] <= 1.5 and fair["polite_share"] >= 0.75
    if {"batched", "fifo"} <= results.keys():
        print(f"first come, first served, 2 flooders: polite p95 latency "
              f"{results['fifo']['p95'] / max(results['batched']['p95'], 1e-9):.2f}x the polite-only run; the busiest "
              f"flooder got {results['fifo']['flood_share']:.2f} fair shares")
    print("\nchecks:", "passed" if ok else "FAILED (5xx, unfinished jobs, batching gain < 1.5x, or the fair queue "
          "let a flooder take more than its share)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
