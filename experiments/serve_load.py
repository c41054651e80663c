"""Load on `semid serve`: latency and throughput at 1, 8 and 64 clients, a soak with a reload, malformed requests.

    python -m experiments.serve_load --run RUN [--seconds 10] [--soak-seconds 60] [--port 8765]

Starts ``semid serve --run RUN --threads 1`` on 127.0.0.1 (one process: the event loop and one decoding thread with
one torch thread) and drives it with ``wrk`` (Debian's package; one wrk thread, C connections = C clients, each
sending its next request when the last is answered) over 127.0.0.1 only, every phase bounded in time:

1. p50 / p99 latency and requests/s at 1, 8 and 64 clients for the beam, dense and hybrid decoders (``--seconds``
   each); one request = one test user's history (a seeded sample of 1,000 users of the run's dataset), top-10;
2. a soak of ``--soak-seconds`` at 64 clients (beam) with ``POST /admin/reload`` half-way; failed requests are
   non-2xx answers plus wrk's socket errors (connect, read, write, timeout);
3. 100 malformed requests (bad JSON, unknown and non-integer ids, k out of range, empty and oversized histories,
   oversized bodies): each must be a 4xx; then the service must still answer.

Writes ``experiments/results/serve_load.md`` with the command, the machine's load and what else ran.

    python -m experiments.serve_load --run RUN --grouping [--batches 15]

measures, without HTTP, what the batcher's grouping costs: the same batches of 8 and 64 histories (k = 10, exclusion
on) decoded as the batcher groups them now and as it grouped them before (one call per exact beam count
``max(loaded beams, k + distinct items)``, for every decoder); CPU seconds of the decoding thread
(``time.thread_time``, one torch thread), so the ratio holds on a shared machine. Writes
``experiments/results/serve_grouping.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
DECODERS = ("beam", "dense", "hybrid")
CLIENTS = (1, 8, 64)
LUA = """
local bodies = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "%s", {["Content-Type"] = "application/json"}, bodies[(n %% #bodies) + 1])
end
"""


def _histories(data: Path, users: int, seed: int) -> list[list[int]]:
    lines = (data / "sequences.txt").read_text().splitlines()
    rng = random.Random(seed)
    picked = rng.sample(lines, min(users, len(lines)))
    return [[int(t) for t in line.split()[1:]][:-1][-50:] for line in picked]  # all but the test item, last 50


def _lua(bodies: list[str], path: str = "/recommend") -> str:
    quoted = ",".join("[[" + b + "]]" for b in bodies)
    return LUA % (quoted, path)


def _wrk(url: str, script: str, clients: int, seconds: float) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--timeout", "10s", "--latency", "-s", f.name, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    os.unlink(f.name)
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * unit[m.group(2)] if m else float("nan")

    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {"p50": pct("50"), "p99": pct("99"), "rps": float(rps.group(1)) if rps else float("nan"),
            "requests": int(total.group(1)) if total else 0, "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(map(int, sock.groups())) if sock else 0, "raw": out}


def _scrape(url: str) -> dict[str, float]:
    """The batcher's running sums from /metrics: batches, histories, requests and decoder calls (groups) so far."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for name in ("semid_batch_histories_count", "semid_batch_histories_sum", "semid_batch_requests_sum",
                 "semid_batch_groups_sum", "semid_decode_seconds_sum"):
        m = re.search(rf"^{name} ([\d.e+-]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measured(url: str, pid: int, run: Callable[[], dict]) -> dict[str, float]:
    """``run()`` (a wrk result) plus the service's CPU seconds and the batcher's means over it."""
    m0, c0 = _scrape(url), _cpu_seconds(pid)
    r = run()
    m1, c1 = _scrape(url), _cpu_seconds(pid)
    d = {k: m1[k] - m0[k] for k in m0}
    batches = max(d["semid_batch_histories_count"], 1)
    r.update(cpu=c1 - c0, per_batch=d["semid_batch_histories_sum"] / batches,
             groups=d["semid_batch_groups_sum"] / batches, decode=d["semid_decode_seconds_sum"])
    return r


def _malformed(url: str, history: list[int]) -> tuple[int, list[int]]:
    """100 malformed requests; (how many got a 4xx, the statuses of the others)."""
    kinds = [b"{", b"[]", b"not json", b'{"history": [1, 2', json.dumps({"history": []}).encode(),
             json.dumps({"history": ["a"]}).encode(), json.dumps({"history": [10**12]}).encode(),
             json.dumps({"history": [1.5]}).encode(), json.dumps({"history": history, "k": 0}).encode(),
             json.dumps({"history": history, "k": 10**6}).encode(), json.dumps({"history": [1] * 5000}).encode(),
             json.dumps({"history": history, "decoder": "nope"}).encode(), b" " * (2 << 20), b"\xc3\x28"]
    good, bad = 0, []
    with httpx.Client(timeout=30) as c:
        for i in range(100):
            r = c.post(f"{url}/recommend", content=kinds[i % len(kinds)])
            good += 400 <= r.status_code < 500
            if not 400 <= r.status_code < 500:
                bad.append(r.status_code)
    return good, bad


def _others() -> str:
    """The busiest other processes (from ps), to say what else ran."""
    out = subprocess.run(["ps", "-eo", "pcpu,ni,args", "--sort=-pcpu"], capture_output=True, text=True).stdout.splitlines()
    mine = str(os.getpid())
    rows = [" ".join(line.split()[:2] + [" ".join(line.split()[2:])[:90]]) for line in out[1:8] if mine not in line]
    return "; ".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per (decoder, clients) cell")
    p.add_argument("--soak-seconds", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=RESULTS / "serve_load.md")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds the service may take to load the run")
    p.add_argument("--grouping", action="store_true", help="measure the batcher's grouping only (no HTTP)")
    p.add_argument("--batches", type=int, default=15, help="--grouping: batches per (decoder, size)")
    args = p.parse_args(argv)
    if args.grouping:
        _grouping(args)
        return
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tempfile.mktemp(suffix=".serve.log"), "w+")  # noqa: SIM115 - read back at the end
    server = subprocess.Popen([sys.executable, "-m", "semid_cli", "serve", "--run", str(args.run), "--port", str(args.port),
                               "--threads", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    load_before, others_before = os.getloadavg(), _others()
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=5).json()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"the service did not start; its log: {log.name}") from None
                time.sleep(0.5)
        data = _data_dir(args.run)
        hist = _histories(data, 1000, seed=0)
        rows = []
        for decoder in DECODERS:
            bodies = [json.dumps({"history": h, "k": 10, "decoder": decoder}) for h in hist]
            script = _lua(bodies)
            _wrk(url, script, 8, 2)  # warm-up
            for clients in CLIENTS:
                r = _measured(url, server.pid, lambda s=script, c=clients: _wrk(url, s, c, args.seconds))
                rows.append((decoder, clients, r))
                print(f"{decoder:>6} {clients:>3} clients: p50 {r['p50']:.1f} ms  p99 {r['p99']:.1f} ms  {r['rps']:.0f} req/s  "
                      f"failed {r['non2xx'] + r['socket_errors']}  service CPU {r['cpu']:.1f} s  histories/batch "
                      f"{r['per_batch']:.1f}  calls/batch {r['groups']:.2f}", flush=True)
        # soak with a reload half-way
        reload_result = {}

        def reload_later() -> None:
            time.sleep(args.soak_seconds / 2)
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/admin/reload", timeout=120)
            reload_result.update(status=r.status_code, body=r.json(), seconds=time.perf_counter() - t0)

        t = threading.Thread(target=reload_later)
        t.start()
        soak_script = _lua([json.dumps({"history": h, "k": 10, "decoder": "beam"}) for h in hist])
        soak = _measured(url, server.pid, lambda: _wrk(url, soak_script, 64, args.soak_seconds))
        t.join()
        print(f"soak: {soak['requests']} requests, failed {soak['non2xx'] + soak['socket_errors']}, reload {reload_result}")
        good, bad = _malformed(url, hist[0])
        alive = httpx.post(f"{url}/recommend", json={"history": hist[0], "k": 10}, timeout=30).status_code
        ready_after = httpx.get(f"{url}/readyz", timeout=30).status_code
        print(f"malformed: {good}/100 got a 4xx (others: {bad}); then /recommend {alive}, /readyz {ready_after}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    log.seek(0)
    tracebacks = log.read().count("Traceback")
    load_after, others_after = os.getloadavg(), _others()
    _write(args, ready, rows, soak, reload_result, (good, bad, alive, ready_after), tracebacks,
           (load_before, load_after), (others_before, others_after))


def _grouping(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from generator.runs.recommender import Recommender
    from generator.serving.batcher import Job, MicroBatcher, plan

    torch.set_num_threads(1)
    rec = Recommender.from_run(args.run)
    hist = [np.asarray(h, dtype=np.int64) for h in _histories(_data_dir(args.run), 1000, seed=0)]
    batcher, rows = MicroBatcher(max_batch=256), []
    for decoder in DECODERS:
        for size in (8, 64):
            batches = [hist[(i * size) % 1000:][:size] for i in range(args.batches)]
            t0, calls_new = time.thread_time(), 0
            for batch in batches:  # now: the batcher's own grouping
                jobs = []
                for h in batch:
                    job = Job(rec, [h], 10, decoder, True, future=None, loop=None)
                    job.wants, job.beams, job.keys = plan(rec, [h], 10, decoder, True)
                    jobs.append(job)
                calls_new += batcher._decode([(j, 0, len(j.histories)) for j in jobs])  # (pieces; returns the groups)
            new = time.thread_time() - t0
            t0, calls_old = time.thread_time(), 0
            for batch in batches:  # before: one call per exact beam count
                groups: dict[int, list] = {}
                for h in batch:
                    groups.setdefault(max(rec.num_beams, 10 + len(np.unique(h))), []).append(h)
                for beams, hs in groups.items():
                    rec.recommend(hs, 10, decoder, exclude_history=True, num_beams=beams, batch_size=256)
                calls_old += len(groups)
            old = time.thread_time() - t0
            n = args.batches
            rows.append((decoder, size, calls_old / n, calls_new / n, 1e3 * old / n, 1e3 * new / n))
            print(f"{decoder:>6} batch {size:>2}: calls {calls_old / n:.1f} -> {calls_new / n:.1f}, CPU ms per batch "
                  f"{1e3 * old / n:.1f} -> {1e3 * new / n:.1f} ({old / new:.2f}x)", flush=True)
    lines = ["# The batcher's grouping: decoder calls and CPU per batch (issue 20)", "",
             f"Command: `python -m experiments.serve_load {shlex.join(sys.argv[1:])}`", "",
             f"Run `{args.run}` ({rec.version}, {rec.run.ids.num_items:,} items, {rec.num_beams} beams loaded, hybrid "
             f"C = {rec.num_candidates}). {args.batches} batches per row, of 8 or 64 of 1,000 sampled users' histories "
             "(last 50 items), k = 10, exclude_history on; the same batches both ways, decoded on one thread with one "
             "torch thread, no HTTP. CPU ms: `time.thread_time` of the decoding thread per batch (CPU time, so the "
             "ratio holds beside other jobs). Before: one `recommend` call per exact beam count max(20, k + distinct "
             "history items); now: the batcher's groups (beam buckets 20/40/80/..., exact and dense one group, the "
             "hybrid one group up to C, k and exclusion cut from one ranking).", "",
             "| decoder | histories / batch | calls before | calls now | CPU ms before | CPU ms now | histories / CPU s now | "
             "speed-up |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for decoder, size, co, cn, mo, mn in rows:
        lines.append(f"| {decoder} | {size} | {co:.1f} | {cn:.1f} | {mo:.1f} | {mn:.1f} | {1e3 * size / mn:.0f} | {mo / mn:.2f}x |")
    lines += ["", f"Beside this run (ps, busiest first, %CPU NI command): {_others()}", ""]
    out = RESULTS / "serve_grouping.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")


def _data_dir(run: Path) -> Path:
    from generator.runs.folder import read_config

    return Path(read_config(run)["data"])


def _write(args: argparse.Namespace, ready: dict, rows: list, soak: dict, reload_result: dict, malformed: tuple,
           tracebacks: int, loads: tuple, others: tuple) -> None:
    good, bad, alive, ready_after = malformed
    target = {("beam", 1): "p50 <= 15 ms", ("beam", 64): ">= 500 req/s, p99 <= 150 ms"}
    lines = ["# `semid serve` under load (issue 20)", "",
             f"Command: `python -m experiments.serve_load {shlex.join(sys.argv[1:])}`", "",
             f"Service: `semid serve --run {args.run} --threads 1` on 127.0.0.1 (one process: the event loop, and one "
             f"decoding thread with one torch thread; max-batch 256, max-wait 5 ms), version `{ready['version']}`, "
             f"{ready['items']:,} items. Client: wrk 4.1 (one thread, C connections), one request = one of 1,000 "
             f"sampled users' histories (last 50 items), k = 10, exclude_history on; {args.seconds:.0f} s per cell "
             f"after a 2 s warm-up. Machine: {platform.machine()}, {os.cpu_count()} CPUs shared; load average "
             f"{loads[0][0]:.1f} before, {loads[1][0]:.1f} after. The service, wrk and the lead's training jobs (which "
             "run at higher priority, nice -10) share the 2 cores: the figures are what the service got beside them "
             "(see its CPU seconds per cell).", "",
             "Service CPU: the CPU seconds the service process (all threads) got during the cell, out of "
             f"{args.seconds:.0f} s of wall time; histories / batch and decoder calls / batch: means from its /metrics "
             "over the cell (a call decodes one group of histories that rank alike).", "",
             "| decoder | clients | p50 ms | p99 ms | requests/s | requests | failed | service CPU s | histories / batch | "
             "calls / batch | target |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for decoder, clients, r in rows:
        t = target.get((decoder, clients), "")
        lines.append(f"| {decoder} | {clients} | {r['p50']:.1f} | {r['p99']:.1f} | {r['rps']:.0f} | {r['requests']} | "
                     f"{r['non2xx'] + r['socket_errors']} | {r['cpu']:.1f} | {r['per_batch']:.1f} | {r['groups']:.2f} | {t} |")
    lines += ["", f"Soak: {args.soak_seconds:.0f} s at 64 clients (beam), `POST /admin/reload` at {args.soak_seconds / 2:.0f} s: "
              f"{soak['requests']} requests, p50 {soak['p50']:.1f} ms, p99 {soak['p99']:.1f} ms, {soak['rps']:.0f} req/s, "
              f"**{soak['non2xx'] + soak['socket_errors']} failed** (non-2xx {soak['non2xx']}, socket errors "
              f"{soak['socket_errors']}; service CPU {soak['cpu']:.1f} s, {soak['per_batch']:.1f} histories and "
              f"{soak['groups']:.2f} decoder calls per batch); the reload answered {reload_result.get('status')} in "
              f"{reload_result.get('seconds', float('nan')):.2f} s ({reload_result.get('body')}).", "",
              f"Malformed: **{good}/100 answered 4xx** (others: {bad or 'none'}); afterwards /recommend answered {alive} "
              f"and /readyz {ready_after}. Tracebacks in the service's log: {tracebacks}.", "",
              f"Beside this run (ps, busiest first, %CPU NI command), before: {others[0]}", "",
              f"after: {others[1]}", ""]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
