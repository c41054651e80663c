"""`semid serve --run RUN [--host 127.0.0.1] [--port 8000]`: the HTTP JSON service (generator.serving)."""

from __future__ import annotations

import argparse
import logging
import os
import socket

from semid_cli.args import (
    add_decoder,
    add_expect_sha256,
    add_run,
    add_run_data,
    add_table_dtype,
    positive_int,
)


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {value}")
    return value


def _ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds (a number >= 0), got {text!r}") from None
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"expected milliseconds in [0, 10000], got {value}")
    return value


DESCRIPTION = (
    "Serve a run as an HTTP JSON service: POST /recommend, POST /recommend/batch, GET /items/{id}, "
    "GET /healthz, GET /readyz, GET /metrics (Prometheus), POST /admin/reload, the OpenAPI page at /docs. "
    "Concurrent requests are decoded as one batch by one worker thread; a reload loads the run folder again "
    "beside the served version and swaps without dropping a request."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    add_decoder(p, "the default decoder of a request that names none (default auto: the run's beam search); the "
                "run's other decoders are served too")
    p.add_argument("--max-batch", type=positive_int, default=256, help="most histories decoded as one batch (default 256)")
    p.add_argument("--max-wait-ms", type=_ms, default=5.0, help="longest a request waits for others to join its batch "
                   "(default 5; a lone client does not wait)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads of the decoding worker (default 1)")
    p.add_argument("--alpha", type=float, help="serve the hybrid as the pool blend with this weight (default: the fusion "
                   "chosen on validation users, RUN/hybrid.json)")
    add_table_dtype(p)
    add_run_data(p, " for titles and asins")
    add_expect_sha256(p, "(`semid digest --run RUN`); a reload must then send the new digest")
    p.add_argument("--admin-token", default=os.environ.get("SEMID_ADMIN_TOKEN"), help="let non-loopback clients that send "
                   "`Authorization: Bearer TOKEN` use /admin routes (default: $SEMID_ADMIN_TOKEN; none: loopback only)")
    p.add_argument("--watch-seconds", type=float, default=0.0, help="poll the run's files this often and reload when "
                   "they change (a new IDs version from add-items, a new best checkpoint); default 0: off")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="largest request body (default 1 MiB)")


def _check_address(host: str, port: int) -> None:
    """Raise ValueError naming ``host:port`` unless a server can listen there now (a port in use, an address not this
    machine's), as uvicorn would find only after the run has loaded."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:  # every address the name has, bound as asyncio's create_server binds them (uvicorn's server)
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(address)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"{shown}: cannot listen there ({getattr(e, 'strerror', None) or e}): pick another --port, or "
                         "a --host of this machine") from None


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.watch_seconds <= 86_400:
        raise ValueError(f"`--watch-seconds` must be in [0, 86400], got {args.watch_seconds}")
    if args.watch_seconds and args.expect_sha256:
        raise ValueError("`--watch-seconds` cannot reload a pinned run (--expect-sha256): reload it with POST "
                         "/admin/reload and the new digest")
    def loaded() -> None:  # (no pin: nothing to check after the load)
        return None

    if args.expect_sha256 is not None:  # before anything of the run is loaded (and, returned, the check after it)
        from generator.runs.pinning import pin

        loaded = pin(args.run, args.expect_sha256)
    _check_address(args.host, args.port)  # before the run loads (a large one takes a minute), not after
    import torch
    import uvicorn

    from generator.runs.recommender import Recommender
    from generator.serving.app import create_app
    from generator.serving.framing import json_protocol
    from generator.serving.holder import Holder, Served, settle_heap
    from generator.serving.requests import Limits

    torch.set_num_threads(args.threads)

    def load() -> Recommender:
        return Recommender.from_run(args.run, decoder=args.decoder, data=args.data, table_dtype=args.table_dtype,
                                    alpha=args.alpha)

    first = load()
    loaded()  # the files loaded are the ones the pin checked
    holder = Holder(load, args.run, served=Served.build(first), pinned=args.expect_sha256 is not None)
    app = create_app(holder, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, threads=args.threads,
                     limits=Limits(max_body_bytes=args.max_body_bytes), admin_token=args.admin_token,
                     watch_seconds=args.watch_seconds)
    rec = holder.current.rec
    print(f"semid serve: {args.run} ({rec.version}), decoders {list(rec.decoders)}, default {rec.resolve(None)}")
    print(f"semid serve: http://{args.host}:{args.port}  (API docs: /docs; Ctrl-C stops)", flush=True)
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    settle_heap()  # everything loaded so far out of the collector's full passes (generator.serving.holder)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if verbose else "warning", access_log=verbose,
                timeout_graceful_shutdown=10, http=json_protocol())  # (bad framing: a JSON 400 too)
    return 0
