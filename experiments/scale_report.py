"""The table of ``experiments/scale.py``: experiments/results/scale.md and scale.json."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from semid.io import atomic_open


def _f(value: object, fmt: str = ".0f") -> str:
    return "—" if value is None else format(value, fmt)


def _label(size: str) -> str:
    return "Beauty (real)" if size == "beauty" else f"{int(size):,} (synthetic)"


def write_report(results: dict, args: argparse.Namespace, total_s: float, out_dir: Path, command: str,
                 name: str = "scale") -> None:
    L = ["# Scale: from Beauty's 12k items to synthetic catalogues of millions, one CPU thread", "",
         f"Run: `{command}` (OMP_NUM_THREADS=1, `torch.set_num_threads(1)`; every size and phase in its own process, "
         f"{getattr(args, 'jobs', 1)} size(s) at a time; "
         f"{total_s / 60:.1f} minutes in all). Machine: {platform.processor() or platform.machine()}, 2 shared cores, "
         f"24 GiB. **Also running on the machine: {args.others}.** Codebook and training times are wall clock on a "
         "shared machine: read ratios within a row, and expect ±20% between runs. Decoding rates and build times are "
         "per CPU second of the phase's one thread (its process time), which a busy machine changes less.", "",
         "Catalogues other than Beauty are **synthetic** (clustered Gaussian 64-d item embeddings, Zipf popularity, "
         "20k users following the clusters; see the docstring of `experiments/scale.py`): they measure cost, never "
         "quality. Peak memory is the phase's process peak RSS (it includes Python, torch and the catalogue).", ""]
    ran = {ph for r in results.values() for ph in r}
    if "codebooks" in ran:
        L += ["## Codebooks and the prefix tree", "",
              "| items | fit-codebooks s | centres fitted on | colliding items | largest group | codes used per level | rel. error | tree MB | tree bytes/item | peak MB |",
              "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for size, r in results.items():
        if "codebooks" not in r:
            continue
        c = r["codebooks"]
        if "error" in c:
            L.append(f"| {_label(size)} | error: {c['error']} |")
            continue
        fitted_on = "all" if c["fit_sample"] is None else f"{c['fit_sample']:,} sampled"
        L.append(f"| {_label(size)} | {c['fit_s']:.1f} | {fitted_on} | "
                 f"{100 * c['colliding']:.2f}% | {c['largest_group']} | {'/'.join(map(str, c['codes_used']))} | "
                 f"{c['rel_error']:.3f} | {c['tree_bytes'] / 2**20:.1f} | {c['tree_bytes_per_item']:.0f} | {c['peak_mb']:.0f} |")
    if ran & {"train-full", "train-sampled", "train-sparse"}:
        L += ["", "## Training step (causal preset, 128 windows of <= 50 positions, joint loss, AdamW)", "",
              "| items | dense head | positions/step | ms/step | ms per 1k positions | of which forward + backward | of which optimiser step | parameters (M) | peak MB |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size, r in results.items():
        for head in ("full", "sampled", "sparse"):
            if f"train-{head}" not in r:
                continue
            t = r[f"train-{head}"]
            label = {"full": "full softmax", "sampled": "sampled (1,024 uniform + in-batch, log-Q)",
                     "sparse": "sampled + sparse tables (lazy AdamW)"}[head]
            if "skipped" in t or "error" in t:
                L.append(f"| {_label(size)} | {label} | | skipped: {t.get('skipped') or t.get('error')} | | | | | {_f(t.get('peak_mb'))} |")
                continue
            pos = t.get("positions")
            per_k = None if pos is None else 1000 * t["ms_step"] / pos
            L.append(f"| {_label(size)} | {label} | {_f(pos)} | {t['ms_step']:.0f} | {_f(per_k)} | {t['ms_fwd_bwd']:.0f} | {t['ms_opt']:.0f} | "
                     f"{t['params_m']:.1f} | {t['peak_mb']:.0f} |")
    if "decode" in ran:
        kept = "kept" if getattr(args, "keep_model_tables", False) else "released after the build"
        L += ["", f"## Decoding ({args.users} users, k = 10, one thread; users per CPU second; serving tables "
              f"{getattr(args, 'table_dtype', 'float32')}, the model's N-row tables {kept})", "",
              "| items | build CPU s (paths, tables) | beam users/s (20 beams) | exact users/s (chunked, 256 MiB) | dense exact users/s (torch) "
              "| dense IndexFlatIP users/s | IVF build s | dense IVF users/s (32 / 128 lists probed) | IVF recall@10 vs exact (32 / 128) "
              "| model MB | decoders MB (paths / edge tables / item vectors) | peak MB after model / build / serving "
              "| model MB kept after the build | prefix tree MB built / kept | serving RSS MB after the build / after decoding |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size, r in results.items():
        if "decode" not in r:
            continue
        d = r["decode"]
        if "error" in d:
            L.append(f"| {_label(size)} | error: {d['error']} |")
            continue
        g = d.get
        L.append(f"| {_label(size)} | {_f(g('build_cpu_s', g('build_s')), '.1f')} | {_f(g('beam_users_s'))} | {_f(g('exact_users_s'), '.1f')} | "
                 f"{_f(g('dense_exact_users_s'))} | {_f(g('dense_flat_users_s'))} | {_f(g('ivf_build_s'), '.1f')} | "
                 f"{_f(g('dense_ivf_users_s'))} / {_f(g('dense_ivf128_users_s'))} | "
                 f"{_f(g('ivf_recall@10'), '.3f')} / {_f(g('ivf128_recall@10'), '.3f')} | {_f(g('model_mb'))} | "
                 f"{_f(g('paths_mb'))} / {_f(g('tables_mb'))} / {_f(g('vectors_mb'))} | "
                 f"{_f(g('model_peak_mb'))} / {_f(g('build_peak_mb'))} / {_f(g('serve_peak_mb'))} | "
                 f"{_f(g('model_after_mb'))} | {_f(g('tree_mb'))} / {_f(g('tree_kept_mb', g('tree_mb')))} | {_f(g('build_rss_mb'))} / {_f(g('serve_rss_mb'))} |")
    mapped = {size: r for size, r in results.items() if r.get("decode", {}).get("from_checkpoint")}
    if mapped:
        L += ["", "## Serving from a checkpoint, memory-mapped (what `Recommender.from_run` does)", "",
              "Resident memory split into anonymous (what the process allocated) and file-backed (the mapped checkpoint's "
              "pages: page cache the kernel may drop and read again). The start-up peak is the most anonymous memory seen "
              "(sampled every 10 ms) while the checkpoint was loaded and the decoders built; the model's remaining tensors "
              "are then copied and the file unmapped (`own_tensors`).", "",
              "| items | model MB | checkpoint file MB | write s | load s | start-up peak anonymous MB | after the build: anonymous / "
              "file MB | after decoding: anonymous / file MB | peak anonymous MB, whole phase |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for size, r in mapped.items():
            c, d = r.get("checkpoint", {}), r["decode"]
            L.append(f"| {_label(size)} | {_f(c.get('model_mb'))} | {_f(c.get('file_mb'))} | {_f(c.get('save_s'), '.1f')} | "
                     f"{_f(d.get('load_s'), '.1f')} | {_f(d.get('startup_anon_peak_mb'))} | {_f(d.get('build_anon_mb'))} / "
                     f"{_f(d.get('build_file_mb'))} | {_f(d.get('serve_anon_mb'))} / {_f(d.get('serve_file_mb'))} | "
                     f"{_f(d.get('anon_peak_mb'))} |")
    text = "\n".join(L) + "\n"
    print(text)
    out_dir.mkdir(exist_ok=True)
    with atomic_open(out_dir / f"{name}.md", "w", encoding="utf-8") as f:
        f.write(text)
    with atomic_open(out_dir / f"{name}.json", "w", encoding="utf-8") as f:
        json.dump({"command": command, "others": args.others, "total_s": total_s, "results": results}, f, indent=1)
