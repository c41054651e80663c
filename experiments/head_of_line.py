"""Head-of-line blocking in `semid serve`: how long a one-history request waits while a large batch request is decoded.

    python -m experiments.head_of_line --run RUN [--histories 1024] [--big-decoder hybrid] [--max-batch 256]
                                       [--probes 200] [--port 8766] [--out experiments/results/head_of_line.md]

Starts ``semid serve --run RUN --threads 1 --max-batch B`` on 127.0.0.1 (one decoding thread, one torch thread), then,
bounded in requests and time: one ``POST /recommend/batch`` of ``--histories`` test users' histories (decoder
``--big-decoder``, k = 10) from one client thread, and from another, one ``POST /recommend`` (beam, k = 10) after
another while it runs (at most ``--probes``, each 20 ms after the last answer). Reports the large request's seconds
and the one-history requests' latencies while it was in flight (median, p90, max). ``--python DIR`` starts the
service from another checkout (``PYTHONPATH=DIR``, e.g. ``git archive`` of the code before) to compare.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from experiments.serve_load import _histories

RESULTS = Path(__file__).parent / "results"


def _serve(run: Path, port: int, max_batch: int, python: Path | None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if python is not None:
        env["PYTHONPATH"] = str(python)
    cmd = [sys.executable, "-m", "semid_cli", "serve", "--run", str(run), "--host", "127.0.0.1", "--port", str(port),
           "--threads", "1", "--max-batch", str(max_batch)]
    return subprocess.Popen(cmd, env=env, cwd=python or Path.cwd(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # loop until the service answers (bounded)
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def measure(url: str, histories: list[list[int]], big: int, decoder: str, probes: int) -> dict[str, float]:
    one = {"history": histories[0], "k": 10, "decoder": "beam"}
    with httpx.Client(timeout=120) as c:
        for _ in range(5):  # warm-up
            c.post(f"{url}/recommend", json=one).raise_for_status()
    body = {"histories": histories[:big], "k": 10, "decoder": decoder}
    done, big_seconds, waits = threading.Event(), [], []

    def large() -> None:
        t0 = time.perf_counter()
        with httpx.Client(timeout=600) as c:
            c.post(f"{url}/recommend/batch", json=body).raise_for_status()
        big_seconds.append(time.perf_counter() - t0)
        done.set()

    thread = threading.Thread(target=large)
    thread.start()
    time.sleep(0.05)  # (the large request is queued first)
    with httpx.Client(timeout=600) as c:
        for i in range(probes):  # loop over one-history requests while the large one is in flight (bounded)
            if done.is_set():
                break
            t0 = time.perf_counter()
            c.post(f"{url}/recommend", json={**one, "history": histories[1 + i % (len(histories) - 1)]}).raise_for_status()
            waits.append(time.perf_counter() - t0)
            time.sleep(0.02)
    thread.join(600)
    w = np.asarray(waits) * 1e3
    return {"big_s": big_seconds[0], "probes": len(w), "p50": float(np.median(w)) if len(w) else float("nan"),
            "p90": float(np.percentile(w, 90)) if len(w) else float("nan"), "max": float(w.max()) if len(w) else float("nan")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--histories", type=int, default=1024)
    p.add_argument("--big-decoder", default="hybrid")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--probes", type=int, default=200)
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--python", type=Path, help="start the service from this checkout (PYTHONPATH)")
    p.add_argument("--label", default="this code")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, help="append a row to this Markdown file")
    args = p.parse_args(argv)
    from generator.runs.folder import read_config

    args.run = args.run.resolve()  # (the service may start in another checkout: --python)
    data = Path(read_config(args.run)["data"])
    histories = _histories(data, args.histories + 1, seed=0)
    url = f"http://127.0.0.1:{args.port}"
    proc = _serve(args.run, args.port, args.max_batch, args.python)
    try:
        _wait_ready(url, proc, args.start_timeout)
        r = measure(url, histories, args.histories, args.big_decoder, args.probes)
    finally:
        proc.terminate()
        proc.wait(30)
    row = (f"| {args.label} | {args.histories} x {args.big_decoder} | {args.max_batch} | {r['big_s']:.2f} | {r['probes']} | "
           f"{r['p50']:.1f} | {r['p90']:.1f} | {r['max']:.1f} |")
    print(row)
    if args.out is not None:
        new = not args.out.exists()
        with args.out.open("a", encoding="utf-8") as f:
            if new:
                f.write("# One-history requests while a large batch request is decoded (`semid serve`, one decoding "
                        "thread)\n\n")
                f.write(f"Run `{args.run}`; {platform.machine()}, {os.cpu_count()} CPUs, one torch thread; one "
                        "`/recommend` (beam, k = 10) 20 ms after another while one `/recommend/batch` is in flight.\n\n")
                f.write("| code | large request | --max-batch | its seconds | one-history requests | p50 ms | p90 ms | "
                        "max ms |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
            f.write(row + "\n")
            f.write(f"\ncommand: `{' '.join(shlex.quote(a) for a in ['python', '-m', 'experiments.head_of_line', *(argv or sys.argv[1:])])}`\n\n")


if __name__ == "__main__":
    main()
