"""Studio latency (not a test): click to first result, 8 concurrent previews vs 8 sequential.

    python -m sdedit_jax.tools.bench_studio [--model default] [--repeats 3]

Starts the studio in this process on a free loopback port with the model (the
shipped one by default), compiles the default preset at start as the command does,
then times HTTP requests as the page sends them (POST /api/edit, then
GET /api/jobs/<id>?wait=...). Every request has its own seed, so nothing comes
from the cache. Prints one JSON line per figure; BENCHMARKS.md records them.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import platform
import threading
import time
import urllib.request

import numpy as np
from PIL import Image

from sdedit_jax import pretrained
from sdedit_jax.studio import previews, server


def _guide(size: int) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "api/edit", data=json.dumps(body).encode())
    with urllib.request.urlopen(request) as reply:
        return json.loads(reply.read())


def _preview(url: str, body: dict) -> float:
    """Seconds from the click (POST) to the finished result."""
    start = time.perf_counter()
    reply = _post(url, body)
    while reply["status"] == "running":
        with urllib.request.urlopen(f"{url}api/jobs/{reply['job']}?wait=30") as r:
            reply = json.loads(r.read())
    assert reply["status"] == "done", reply
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each measurement")
    parser.add_argument("--t0", type=float, default=0.5)
    args = parser.parse_args()
    model = pretrained.load_model(None if args.model == "default" else args.model)
    start = time.perf_counter()
    previewer = previews.Previewer(model)
    previewer.warm()
    print(json.dumps({"figure": "start_compile_s", "value": round(time.perf_counter() - start, 2)}))
    httpd = server.StudioServer(("127.0.0.1", 0), server.Studio(previewer, args.model))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    previewer.start()
    base = {"guide": _guide(model.image_size), "t0": args.t0, "samples": 1}
    seeds = iter(range(1, 10**6))
    host = {"cpu": platform.processor() or platform.machine(), "image_size": model.image_size}
    for round_ in range(args.repeats):
        first = _preview(httpd.url, {**base, "seed": next(seeds)})
        start = time.perf_counter()
        for _ in range(8):
            _preview(httpd.url, {**base, "seed": next(seeds)})
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        bodies = [{**base, "seed": next(seeds)} for _ in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda b: _preview(httpd.url, b), bodies))
        concurrent_s = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "round": round_,
                    "click_to_first_result_s": round(first, 3),
                    "eight_sequential_s": round(sequential, 3),
                    "eight_concurrent_s": round(concurrent_s, 3),
                    "engine_calls": previewer.engine_calls,
                    **host,
                }
            ),
            flush=True,
        )
    httpd.shutdown()
    previewer.stop()


if __name__ == "__main__":
    main()
