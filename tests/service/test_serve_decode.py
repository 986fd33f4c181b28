"""The decode budget on the real server on 127.0.0.1 (issue 25): a 87 KB 16-bit 6000x6000 PNG costs ~300 MB to decode
(it cost ~930 MB through float64 arrays before), so concurrent uploads of it must wait for room (or get 503) instead
of all decoding at once; an image that costs more than the whole budget gets 413 at once. The server runs in this
process, so its peak RSS is ours."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rdm.images.budget import BudgetBusy, DecodeBudget, OverBudget, read_header
from tests.helpers.servekit import build_world, call, multipart, serve_world

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 6000
RSS_MARGIN = 256 * 1024**2  # besides the decodes: request bodies, kept uploads, threads' stacks and malloc arenas


def png16(side: int) -> bytes:
    """A smooth 16-bit greyscale PNG (mode I;16): tiny on the wire, side x side x ~30 bytes to decode."""
    column = np.linspace(1000, 60000, side).astype("<u2")
    buf = io.BytesIO()
    Image.frombytes("I;16", (side, side), np.repeat(column[:, None], side, axis=1).tobytes()).save(buf, "PNG")
    return buf.getvalue()


def rss(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def upload(base: str, data: bytes) -> tuple[int, dict, dict]:
    body, headers = multipart("file", "big.png", data)
    status, reply_headers, reply = call(f"{base}/api/uploads", "POST", raw=body, headers=headers, timeout=60)
    return status, reply_headers, json.loads(reply) if reply else {}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    return build_world(tmp_path_factory.mktemp("serve-decode"), tiny_clip)


def test_ten_concurrent_16bit_uploads_stay_within_the_decode_budget(world):
    data = png16(SIDE)
    cost = read_header(data).cost
    budget_bytes = int(2.5 * cost)  # room for two at once
    running = serve_world(world, decode_budget_bytes=budget_bytes, decode_wait_s=3.0)
    try:
        budget = running.app.state.engine.decode_budget
        assert budget.budget == budget_bytes and budget.peak == 0
        results: list = [None] * 10
        go = threading.Barrier(10)

        def send(i: int) -> None:
            go.wait()
            try:
                results[i] = upload(running.url, data)
            except Exception as e:  # noqa: BLE001 - a hang (timeout), a dropped connection: reported below
                results[i] = (type(e).__name__, {}, {"error": str(e)})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(10)]
        before = rss("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        elapsed = time.monotonic() - start
        growth = rss("VmHWM") - before
        statuses = [r[0] for r in results]
        print(f"\n{len(data)} byte PNG, estimated {cost / 1e6:.0f} MB to decode; budget {budget_bytes / 1e6:.0f} MB; "
              f"statuses {sorted(statuses)}; budget peak {budget.peak / 1e6:.0f} MB; RSS growth {growth / 1e6:.0f} MB; "
              f"{elapsed:.1f} s; {budget.stats()}")
        assert not any(t.is_alive() for t in threads), "an upload hung"
        assert set(statuses) <= {200, 503}, results
        assert statuses.count(200) >= 1, results
        for status, headers, reply in results:
            if status == 503:
                assert headers.get("retry-after") == "2" and "busy decoding" in reply["error"], reply
            else:
                assert reply["width"] == SIDE and reply["height"] == SIDE, reply
        assert cost <= budget.peak <= budget.budget
        assert budget.in_use == 0  # every lease given back
        assert growth < budget_bytes + RSS_MARGIN, (growth, budget_bytes)
        assert elapsed < 60
    finally:
        running.stop()


def test_an_image_costing_more_than_the_whole_budget_is_413_at_once(world):
    big = png16(2000)  # ~40 MB to decode
    small = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(small, "PNG")
    budget_bytes = 16 * 1024**2
    assert read_header(big).cost > budget_bytes
    running = serve_world(world, decode_budget_bytes=budget_bytes, decode_wait_s=30.0)
    try:
        budget = running.app.state.engine.decode_budget
        start = time.monotonic()
        status, _, reply = upload(running.url, big)
        assert status == 413 and "2000x2000" in reply["error"] and "decode budget" in reply["error"], reply
        status, _, raw = call(f"{running.url}/knn-service", "POST", {"image": base64.b64encode(big).decode(),
                                                                      "indice_name": "A"})
        assert status == 413 and "2000x2000" in json.loads(raw)["error"], raw
        assert time.monotonic() - start < 5  # refused at once, not after decode_wait_s
        assert budget.refused_over == 2 and budget.peak == 0 and budget.in_use == 0
        status, _, reply = upload(running.url, small.getvalue())  # what fits still decodes
        assert status == 200 and reply["width"] == 64, reply
        admitted = budget.admitted
        status, headers, _ = call(f"{running.url}/api/databases/A/image?id=img000.png&size=full")
        assert status == 200 and headers["content-type"] == "image/png"
        assert budget.admitted == admitted + 1  # database images are decoded under the budget too
        assert 0 < budget.peak <= budget_bytes and budget.in_use == 0
    finally:
        running.stop()


def test_the_budget_waits_for_room_and_refuses_what_never_fits():
    budget = DecodeBudget(100)
    first = budget.acquire(60, timeout=1)
    with pytest.raises(OverBudget):
        budget.acquire(101, timeout=10)  # at once, not after the wait
    start = time.monotonic()
    with pytest.raises(BudgetBusy):
        budget.acquire(50, timeout=0.2)
    assert 0.15 < time.monotonic() - start < 2
    threading.Timer(0.2, first.release).start()
    with budget.acquire(50, timeout=5) as lease:  # admitted once the first is given back
        assert budget.in_use == 50 and lease.cost == 50
        with budget.acquire(50, timeout=0):  # fits beside it
            assert budget.in_use == 100
    first.release()  # twice: harmless
    assert budget.in_use == 0 and budget.peak == 100
    assert budget.stats()["refused_over"] == budget.stats()["refused_busy"] == 1
