"""Load test of `rdm serve`: N concurrent clients for D seconds against a tiny model, batched vs one at a time.

    python scripts/load_serve.py                      # 16 clients x 60 s, max-batch 8 then 1, tiny model
    python scripts/load_serve.py --clients 4 --duration 10 --modes 8

Each client submits a generate job (random prompt, database A or B, its own seeds), follows its event
stream to the end, and submits the next; on 429 it waits Retry-After. The server runs in its own
process (`rdm serve`) on 127.0.0.1. Checks: no 5xx, every accepted job finished; reports p50/p99
latency (submit -> done) and jobs/s per mode, and the batched/one-at-a-time throughput ratio.
Exits 1 when a check fails.
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


def start_server(model: Path, home: Path, max_batch: int, max_queue: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(home.parent / f"serve-{max_batch}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "rdm.cli", "--indexes", str(home), "serve", "--port", str(port),
                             "--model", str(model), "--max-batch", str(max_batch), "--max-queue", str(max_queue),
                             "--threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/api/health", timeout=2):
                return proc, base
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {(home.parent / f'serve-{max_batch}.log').read_text()}")
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def post(url: str, body: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read() or b"{}")


FINAL = ("done", "failed", "cancelled")


def follow(base: str, job: dict) -> tuple[str, bool]:
    """Read the job's event stream to its final event -> (final state, whether the stream ended early and the
    state had to be polled)."""
    with urllib.request.urlopen(base + job["events_url"], timeout=300) as stream:
        for line in stream:
            if line.startswith(b"event:") and line.decode().split(":", 1)[1].strip() in FINAL:
                return line.decode().split(":", 1)[1].strip(), False
    while True:
        with urllib.request.urlopen(base + job["status_url"], timeout=60) as r:
            state = json.loads(r.read())["state"]
        if state in FINAL:
            return state, True
        time.sleep(0.1)


def run_mode(base: str, clients: int, duration: float, steps: int) -> dict:
    lock = threading.Lock()
    stats = {"accepted": 0, "finished": 0, "done": 0, "refused_429": 0, "5xx": 0, "other_4xx": 0, "latencies": [],
             "states": {}, "streams_ended_early": 0}
    stop_at = time.monotonic() + duration

    def client(cid: int):
        try:
            submit_loop(cid)
        except Exception as e:  # noqa: BLE001 - counted: a client error is a failed check, not a crash
            with lock:
                stats["states"][f"client error: {type(e).__name__}: {e}"] = 1

    def submit_loop(cid: int):
        rng = random.Random(cid)
        i = 0
        while time.monotonic() < stop_at:
            body = {"prompt": rng.choice(PROMPTS), "databases": [{"name": rng.choice("AB")}], "steps": steps,
                    "seed": cid * 100_000 + i}
            i += 1
            t0 = time.monotonic()
            status, headers, job = post(f"{base}/api/generate", body)
            if status == 429:
                with lock:
                    stats["refused_429"] += 1
                time.sleep(min(float(headers.get("retry-after", 1)), max(0.0, stop_at - time.monotonic())))
                continue
            if status >= 500:
                with lock:
                    stats["5xx"] += 1
                continue
            if status != 202:
                with lock:
                    stats["other_4xx"] += 1
                continue
            with lock:
                stats["accepted"] += 1
            state, early = follow(base, job)
            with lock:
                stats["finished"] += 1
                stats["streams_ended_early"] += early
                stats["states"][state] = stats["states"].get(state, 0) + 1
                if state == "done":
                    stats["done"] += 1
                    stats["latencies"].append(time.monotonic() - t0)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["seconds"] = time.monotonic() - started  # includes finishing the jobs in flight at the deadline
    with urllib.request.urlopen(f"{base}/api/stats", timeout=10) as r:
        stats["server"] = json.loads(r.read())
    return stats


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of submitting per mode")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per job")
    parser.add_argument("--modes", type=int, nargs="+", default=[8, 1], help="--max-batch of each run")
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=8, help="tiny model's image side (pixel space)")
    parser.add_argument("--channels", type=int, default=16, help="tiny model's U-Net width (two levels)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: a tiny one made here)")
    parser.add_argument("--indexes", type=Path, default=None, help="databases' home with A and B")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rdm-load-") as tmp:
        if args.model:
            model, home = args.model, args.indexes
        else:
            model, home = make_world(Path(tmp), args.resolution, args.channels)
        results = {}
        for max_batch in args.modes:
            proc, base = start_server(model, home, max_batch, args.max_queue, args.threads)
            try:
                results[max_batch] = run_mode(base, args.clients, args.duration, args.steps)
            finally:
                proc.terminate()
                proc.wait(30)
            server_log = (home.parent / f"serve-{max_batch}.log").read_text()
            trouble = ("Traceback", "in flight at shutdown")
            if any(t in server_log for t in trouble) or results[max_batch]["streams_ended_early"]:
                print(f"server log (max-batch {max_batch}):\n{server_log[-3000:]}", file=sys.stderr)

    ok = True
    shape = "given model" if args.model else f"tiny model {args.resolution}px, U-Net width {args.channels}"
    print(f"\n{args.clients} clients x {args.duration:g} s, {args.steps} steps, {shape}, server torch threads "
          f"{args.threads}, {os.cpu_count()} CPU(s)\n")
    print("| max-batch | jobs done | jobs/s | p50 latency s | p99 latency s | 429s | 5xx | unfinished | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for max_batch, s in results.items():
        unfinished = s["accepted"] - s["done"]
        ok &= s["5xx"] == 0 and unfinished == 0
        print(f"| {max_batch} | {s['done']} | {s['done'] / s['seconds']:.2f} | {percentile(s['latencies'], 50):.2f} | "
              f"{percentile(s['latencies'], 99):.2f} | {s['refused_429']} | {s['5xx']} | {unfinished} | "
              f"{s['server'].get('mean_batch_size')} |")
    for max_batch, s in results.items():
        if s["states"].keys() - {"done"} or s["streams_ended_early"]:
            print(f"max-batch {max_batch}: final states {s['states']}, event streams that ended before the final "
                  f"event: {s['streams_ended_early']}")
    if len(results) >= 2 and 1 in results:
        best = max(k for k in results if k != 1)
        rate = {m: results[m]["done"] / results[m]["seconds"] for m in (best, 1)}
        ratio = rate[best] / max(rate[1], 1e-9)
        print(f"\nbatched (max-batch {best}) / one at a time: {ratio:.2f}x throughput")
        ok &= ratio >= 1.5
    print("\nchecks:", "passed" if ok else "FAILED (5xx, unfinished jobs, or batching gain < 1.5x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
