#!/usr/bin/env python
"""Benchmark of the exact bidirectional WKV backends: time and peak memory vs T.

For each sequence length T (default 256 ... 262144, B=2, C=64, float32) and backend

* ``kernel`` -- ``cuda_wkv.bi_wkv`` with the compiled C++ (CPU) or CUDA kernel,
* ``scan``   -- ``cuda_wkv.bi_wkv_scan``: the PyTorch fallback backend,
* ``lcse``   -- :func:`logcumsumexp_wkv` below: the plain PyTorch ``logcumsumexp``
  formulation of the same math (the baseline of the CPU speed target),
* ``dense``  -- ``cuda_wkv.bi_wkv_dense`` unchunked (one B x C x T x T score tensor),
  only where its estimated footprint fits ``--dense-budget-gb``,

it measures the median wall time of the forward (under ``torch.no_grad``) and of
forward + backward (gradients w.r.t. w, u, k, v), and the peak extra memory of each.

Memory method.  CPU: every (backend, T) point runs in a fresh subprocess; the peak is
``ru_maxrss`` after the first forward (resp. forward+backward) minus the resident set
size measured just before it (inputs allocated, kernel loaded).  PyTorch's CPU
allocator returns large blocks to the OS, so this is the op's own peak working set
(including its outputs and, for fwd+bwd, the saved tensors and the gradients).  CUDA:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the memory
allocated before the op.

Writes ``<out>/wkv_<device>.json``, ``.png`` (log-log time and memory vs T with
O(T) / O(T^2) guides) and ``.md`` (table incl. the scan and lcse / kernel time ratios).

With ``--device cuda`` the table also gives the effective bandwidth (the bytes the op
must move at least -- every input read once, every output written once -- per second)
and its share of the card's peak memory bandwidth (``--peak-gbps``, or a small table of
known cards).

Other modes:

* ``--targets``: the CPU targets in one run -- fwd+bwd at B=2, T=32768, C=64 kernel vs
  lcse, and few lanes (B=1, C=8, T=262144) at 1 vs 2 threads.
* ``--work-items``: the parallel work the kernels offer at GLSP's shapes on default
  3d_fullres plans (128^3 patch, widths 32..320, batch 2), per encoder stage; needs no GPU.
* ``--accuracy``: max errors vs the float64 dense reference (load-independent), and at
  GLSP's longest sequence (T = 32768, too long for the dense reference) vs the float64
  kernel, with the automatic chunk length.
* ``--chunk-sweep``: the float32 kernel against its float64 run per forced chunk length
  (``--chunks``) over ``--seeds`` draws at B=1, T=32768, C=64 by default: what the automatic
  float32 chunk cap is chosen from.
* ``--call-cost``: what one call costs at B=1, T=1, C=8 (the op's fixed costs: the
  extension alone, ``bi_wkv`` from eager code, the custom op ``torch.compile`` traces).
* ``--profile`` (with the sweep): more calls per point under the PyTorch profiler
  (``PROFILE_CALLS``: 5 on CUDA, 1 on the CPU); the markdown tabulates where a call's time went,
  their mean (CUDA: each kernel's device time and the bandwidth on device time; CPU: operators' self time, the op's kernel calls named
  ``cuda_wkv::forward_kernel`` / ``backward_kernel``).

    python benchmarks/bench_wkv.py                 # full CPU sweep (~10-20 min on 2 cores)
    python benchmarks/bench_wkv.py --device cuda
    python benchmarks/bench_wkv.py --targets
    python benchmarks/bench_wkv.py --work-items
    python benchmarks/bench_wkv.py --call-cost --threads 1
    python benchmarks/bench_wkv.py --chunk-sweep --chunks 128 256 512 1024
    python benchmarks/bench_wkv.py --T 1024 4096 --repeat 3 --out-dir /tmp/bench
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nnunetv2_ext.publish import write_atomically  # noqa: E402  (this checkout's)

DEFAULT_T = [256 * 2 ** i for i in range(11)]  # 256 ... 262144
PROFILE_CALLS = {False: 1, True: 5}  # calls profiled per point (--profile), keyed by "on CUDA"
BACK_TO_BACK_CALLS = 20  # CUDA: at most this many calls per batch of the back-to-back time (median of 3)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        return 0


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _dense_bytes(B: int, T: int, C: int, itemsize: int, backward: bool) -> int:
    # scores, where-result, softmax output (+ autograd copies) of B*C*T*T elements
    return B * C * T * T * itemsize * (6 if backward else 3)


# Peak memory bandwidth of known cards, GB/s (vendor data sheets).
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
             "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0, "A100-PCIE-40GB": 1555.0,
             "A100 80GB PCIe": 1935.0, "L40S": 864.0, "L4": 300.0, "A10": 600.0,
             "RTX 4090": 1008.0, "RTX 3090": 936.0, "V100": 900.0, "T4": 320.0}


def peak_gbps(device_name: str, override: float = 0.0):
    """The card's peak memory bandwidth: ``override`` if > 0, else the longest entry of
    PEAK_GBPS contained in the device name, else None."""
    if override > 0:
        return override
    hits = [k for k in PEAK_GBPS if k.lower() in device_name.lower()]
    return PEAK_GBPS[max(hits, key=len)] if hits else None


def min_bytes(B: int, T: int, C: int, itemsize: int, mode: str) -> int:
    """Bytes the op must move at least: forward reads k, v and writes y (and the two
    saved (B, T, C) tensors); backward reads k, v, y, m, r, gy and writes gk, gv."""
    tensors = 5 if mode == "fwd" else 5 + 8
    return tensors * B * T * C * itemsize


def logcumsumexp_wkv(w, u, k, v):
    """The plain O(T) PyTorch formulation (float32): the left sum at t is
    e^{-(t-1)w} sum_{i<t} e^{k_i + i w} v_i and the right sum e^{(t+1)w} sum_{i>t}
    e^{k_i - i w} v_i, both by (reverse, exclusive) ``torch.logcumsumexp``, with v shifted
    by min(v) - 1 so that log(v - s) exists.  A speed baseline only: its float32 error
    grows with |w| T."""
    import torch

    T = k.shape[1]
    i = torch.arange(T, dtype=k.dtype, device=k.device).reshape(1, T, 1)
    s = v.detach().amin(dim=1, keepdim=True) - 1.0
    lv = torch.log(v - s)
    iw = i * w

    def excl(x, reverse):
        x = x.flip(1) if reverse else x
        pad = x.new_full((x.shape[0], 1, x.shape[2]), -1e30)
        out = torch.cat([pad, torch.logcumsumexp(x[:, :-1], dim=1)], dim=1)
        return out.flip(1) if reverse else out

    zf, zb = k + iw, k - iw
    left, right = (i - 1.0) * w, (i + 1.0) * w
    num = torch.stack([excl(zf + lv, False) - left, excl(zb + lv, True) + right,
                       u + k + lv]).logsumexp(0)
    den = torch.stack([excl(zf, False) - left, excl(zb, True) + right, u + k]).logsumexp(0)
    return torch.exp(num - den) + s


def wkv_inputs(B: int, T: int, C: int, device: str, dtype: str):
    """The benchmarks' inputs, seeded: ``w`` (C,) uniform in ±5/T (GLSP's decay/T scale), ``u`` (C,),
    ``k``, ``v`` and the output gradient ``gy`` (B, T, C) standard normal."""
    import torch

    dt, dev = getattr(torch, dtype), torch.device(device)
    g = torch.Generator().manual_seed(0)
    w = ((torch.rand(C, generator=g) * 2 - 1) * 5.0 / T).to(dev, dt)
    u = (torch.randn(C, generator=g) * 0.5).to(dev, dt)
    k, v, gy = (torch.randn(B, T, C, generator=g).to(dev, dt) for _ in range(3))
    return w, u, k, v, gy


# ---------------------------------------------------------------- one measured point
def run_point(backend: str, T: int, B: int, C: int, device: str, dtype: str, repeat: int,
              max_seconds: float, modes, profile: bool = False) -> dict:
    import torch
    import cuda_wkv

    dev = torch.device(device)
    w, u, k, v, gy = wkv_inputs(B, T, C, device, dtype)

    if backend == "kernel":
        os.environ["CUDA_WKV_BACKEND"] = "auto"
        used = cuda_wkv.backend_for(k)
        if used == "torch":
            return {"error": "kernel unavailable: fell back to torch"}
        fn = cuda_wkv.bi_wkv
    elif backend == "scan":
        used, fn = "torch", cuda_wkv.bi_wkv_scan
    elif backend == "lcse":
        used, fn = "lcse", logcumsumexp_wkv
    elif backend == "dense":
        used = "dense"

        def fn(w_, u_, k_, v_):
            return cuda_wkv.bi_wkv_dense(w_, u_, k_, v_, max_chunk_elements=B * C * T * T)
    else:
        raise ValueError(backend)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            return fn(w, u, k, v)

    def fwd_bwd():
        leaves = [x.detach().requires_grad_() for x in (w, u, k, v)]
        y = fn(*leaves)
        return torch.autograd.grad(y, leaves, gy)

    # Warm up on tiny inputs first (kernel load, autograd engine threads, allocator
    # pools) so that the memory measured below belongs to the op at this T.
    tiny = [x[..., :16, :] if x.dim() == 3 else x for x in (w, u, k, v)]
    with torch.no_grad():
        fn(*tiny)
    leaves = [x.detach().requires_grad_() for x in tiny]
    torch.autograd.grad(fn(*leaves), leaves, gy[:, :16])
    del leaves

    out = {"backend": backend, "impl": used, "T": T}
    for mode, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        if mode not in modes:
            continue
        # first call: peak memory (and warm-up)
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        else:
            base = _rss_bytes()
        t0 = time.perf_counter()
        res = f()
        sync()
        first = time.perf_counter() - t0
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) - base
        else:
            peak = max(0, _maxrss_bytes() - base)
        del res
        times = []
        n = max(1, min(repeat, int(max_seconds / max(first, 1e-6))))
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            res = f()
            sync()
            times.append(time.perf_counter() - t0)
            del res
        out[f"{mode}_s"] = statistics.median(times)
        out[f"{mode}_min_s"] = min(times)
        out[f"{mode}_runs"] = len(times)
        out[f"{mode}_peak_bytes"] = int(peak)
        if dev.type == "cuda" and backend == "kernel":  # throughput: calls issued back to back, as in training
            n = max(1, min(BACK_TO_BACK_CALLS, int(max_seconds / 3 / max(out[f"{mode}_s"], 1e-6))))
            batches = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    f()  # its result dropped at once: the allocator reuses the memory
                sync()
                batches.append((time.perf_counter() - t0) / n)
            out[f"{mode}_b2b_s"] = statistics.median(batches)
            out[f"{mode}_b2b_calls"] = n
        if profile:  # where one call's time goes: kernels on CUDA, operators on CPU
            from nnunetv2_ext.benchmark import top_ops
            out[f"{mode}_ops"] = top_ops(f, dev, calls=PROFILE_CALLS[dev.type == "cuda"])
    return out


def _spawn(args, backend, T, modes, rss_allocator: bool = True) -> dict:
    """One point in a fresh subprocess.  ``rss_allocator``: glibc's mmap threshold fixed at
    128 KiB so that RSS follows the live tensors (needed for the CPU peak memory); every
    large tensor is then a fresh mmap, and the time includes first-touch page faults that
    the default allocator, reusing freed heap memory, does not pay in training (measured:
    95 vs 147 ms for the kernel's fwd+bwd at B=2, T=32768, C=64, 2 threads).  Time-only
    runs (``--targets``) pass False."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_point", backend, str(T),
           "--B", str(args.B), "--C", str(args.C), "--device", args.device, "--dtype",
           args.dtype, "--repeat", str(args.repeat), "--max-seconds", str(args.max_seconds),
           "--threads", str(args.threads),
           "--modes", *modes] + (["--profile"] if args.profile else [])
    env = dict(os.environ)
    # Fixed glibc mmap threshold: blocks >= 128 KiB are mmapped and returned to the OS
    # on free (no dynamic threshold growth), so RSS follows the live tensors.
    if rss_allocator:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"backend": backend, "T": T, "error": (r.stderr or r.stdout)[-800:]}


# ------------------------------------------------------------------------ reporting
def _fmt_s(x):
    if x is None:
        return "—"
    return f"{x * 1e3:.1f} ms" if x < 10 else f"{x:.1f} s"


def _fmt_b(x):
    if x is None:
        return "—"
    return f"{x / 2 ** 20:.0f} MiB" if x >= 2 ** 20 else f"{x / 2 ** 10:.0f} KiB"


def write_markdown(path: Path, meta: dict, rows: list) -> None:
    by = {(r["backend"], r["T"]): r for r in rows if "error" not in r}
    Ts = sorted({r["T"] for r in rows})
    lines = [f"# bi_wkv benchmark ({meta['device']}, {meta['dtype']}, "
             f"B={meta['B']}, C={meta['C']})", "",
             f"Generated by `{meta['command']}` on {meta['date']}.", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}; "
             f"{meta['threads']} intra-op threads; load average (1, 5, 15 min) at the end "
             f"{meta['load_average']} (anything near or above the CPU count means the "
             "machine was shared: figures are then upper bounds).", "",
             f"Time: median of up to {meta['repeat']} runs after one warm-up run "
             "(forward under `torch.no_grad`; fwd+bwd = forward + `autograd.grad` w.r.t. "
             "w, u, k, v).  Memory: " + meta["memory_method"], "",
             "`scan` is the PyTorch fallback (`bi_wkv_scan`), `lcse` the plain PyTorch "
             "`logcumsumexp` formulation (`logcumsumexp_wkv`); `×` columns = their time / "
             "kernel time.  `dense` = O(T²) reference, run only where it fits the memory "
             "budget.", "",
             "| T | kernel fwd | kernel fwd+bwd | scan fwd+bwd | lcse fwd+bwd | scan × | "
             "lcse × | dense fwd+bwd | kernel peak fwd+bwd | scan peak fwd+bwd | "
             "lcse peak fwd+bwd | dense peak fwd+bwd |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for T in Ts:
        kr, sr, lr, dr = (by.get((b, T), {}) for b in ("kernel", "scan", "lcse", "dense"))

        def ratio(other):
            a, b = other.get("fwd_bwd_s"), kr.get("fwd_bwd_s")
            return f"{a / b:.1f}×" if a and b else "—"
        lines.append(
            f"| {T} | {_fmt_s(kr.get('fwd_s'))} | {_fmt_s(kr.get('fwd_bwd_s'))} | "
            f"{_fmt_s(sr.get('fwd_bwd_s'))} | {_fmt_s(lr.get('fwd_bwd_s'))} | {ratio(sr)} | "
            f"{ratio(lr)} | {_fmt_s(dr.get('fwd_bwd_s'))} | "
            + " | ".join(_fmt_b(r.get("fwd_bwd_peak_bytes")) for r in (kr, sr, lr, dr)) + " |")
    if meta["device"] == "cuda":
        peak = meta.get("peak_gbps")
        lines += ["", "Kernel bandwidth: effective GB/s = minimal bytes (every input read once, "
                  "every output written once: 5 (B, T, C) tensors forward, 13 forward+backward) "
                  f"/ time; peak {peak or 'unknown (pass --peak-gbps)'} GB/s.  *One call*: the "
                  "median time above, each call waited for (its host-side cost included); *back to "
                  f"back*: up to {BACK_TO_BACK_CALLS} calls (`*_b2b_calls` in the json) issued without "
                  "waiting, one wait at the end, time per call (median of 3 batches): the device's time "
                  "once the host runs ahead, as in a training step (the host's, if that is longer).", "",
                  "| T | fwd GB/s | fwd % of peak | fwd+bwd GB/s | fwd+bwd % of peak | "
                  "back to back: fwd GB/s | fwd % of peak | fwd+bwd GB/s | fwd+bwd % of peak |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for T in Ts:
            kr = by.get(("kernel", T), {})
            cells = []
            for key in ("fwd_s", "fwd_bwd_s", "fwd_b2b_s", "fwd_bwd_b2b_s"):
                sec = kr.get(key)
                mode = "fwd_bwd" if key.startswith("fwd_bwd") else "fwd"
                gbps = (min_bytes(meta["B"], T, meta["C"], meta["itemsize"], mode) / sec / 1e9
                        if sec else None)
                cells.append(f"{gbps:.0f}" if gbps else "—")
                cells.append(f"{100 * gbps / peak:.1f} %" if gbps and peak else "—")
            lines.append(f"| {T} | " + " | ".join(cells) + " |")
    profiled = [r for r in rows if "error" not in r and any(k.endswith("_ops") for k in r)]
    if profiled:
        from nnunetv2_ext.benchmark import top_ops_table, top_ops_unit
        calls = PROFILE_CALLS[meta["device"] == "cuda"]
        what = "one call per point" if calls == 1 else f"a call per point, mean of {calls}"
        lines += ["", f"Profile of {what} ({top_ops_unit(meta['device'] == 'cuda')}; "
                  "`(total)` is their sum, to "
                  "compare with the wall time above: the difference is host-side overhead "
                  "and idle device time).", ""]
        for r in profiled:
            for mode in ("fwd", "fwd_bwd"):
                ops = r.get(f"{mode}_ops")
                if not ops:
                    continue
                extra = ""
                if meta["device"] == "cuda":
                    gbps = min_bytes(meta["B"], r["T"], meta["C"], meta["itemsize"], mode) / (
                        ops[-1]["ms"] / 1e3) / 1e9
                    peak = meta.get("peak_gbps")
                    extra = f"; {gbps:.0f} GB/s on device time" + (
                        f" = {100 * gbps / peak:.1f} % of peak" if peak else "")
                lines += [f"{r['backend']} {mode.replace('_', '+')}, T={r['T']}: wall "
                          f"{_fmt_s(r.get(mode + '_s'))}{extra}", "", *top_ops_table(ops), ""]
    errs = [r for r in rows if "error" in r]
    if errs:
        lines += ["", "Points that failed or were skipped:", ""]
        lines += [f"* {r['backend']} T={r['T']}: {r['error'].strip().splitlines()[-1]}"
                  for r in errs]
    write_atomically(str(path), "\n".join(lines) + "\n")


def write_plot(path: Path, meta: dict, rows: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"kernel": ("C0", "o"), "scan": ("C1", "s"), "lcse": ("C2", "v"),
              "dense": ("C3", "^")}
    for ax, (key, label) in zip(axes, (("s", "time [s]"), ("peak_bytes", "peak memory [MiB]"))):
        for backend, (color, marker) in styles.items():
            for mode, ls in (("fwd", "--"), ("fwd_bwd", "-")):
                pts = sorted((r["T"], r[f"{mode}_{key}"]) for r in rows
                             if r.get("backend") == backend and f"{mode}_{key}" in r
                             and r[f"{mode}_{key}"] > 0)
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                ys = [p[1] / (2 ** 20 if key == "peak_bytes" else 1) for p in pts]
                ax.plot(xs, ys, ls, color=color, marker=marker,
                        label=f"{backend} {mode.replace('_', '+')}")
        # O(T) and O(T^2) guides through the first kernel fwd+bwd point
        ref = sorted((r["T"], r.get(f"fwd_bwd_{key}")) for r in rows
                     if r.get("backend") == "kernel" and r.get(f"fwd_bwd_{key}"))
        if ref:
            T0, y0 = ref[0]
            y0 = y0 / (2 ** 20 if key == "peak_bytes" else 1)
            Ts = sorted({r["T"] for r in rows})
            ax.plot(Ts, [y0 * t / T0 for t in Ts], ":", color="gray", label="∝ T")
            ax.plot(Ts, [y0 * (t / T0) ** 2 for t in Ts], ":", color="black", label="∝ T²")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"bi_wkv on {meta['device']} ({meta['dtype']}, B={meta['B']}, C={meta['C']}, "
                 f"{meta['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------- accuracy
ACC_CASES = [  # (B, T, C, |w|*T signed, |k| max)
    (2, 1000, 16, 0.0, 3.0), (2, 1000, 16, 1.0, 3.0), (2, 1000, 16, -1.0, 3.0),
    (2, 1000, 16, 10.0, 3.0), (2, 1000, 16, -10.0, 3.0), (2, 1000, 16, 10.0, 30.0),
    (2, 1000, 16, -10.0, 30.0), (1, 4099, 4, 10.0, 30.0), (1, 4099, 4, -10.0, 30.0),
] + [(1, 4099, 4, sign * wT, 30.0) for wT in (1e2, 1e3, 1e4, 1e5) for sign in (1.0, -1.0)]


def _backends():
    """(name, CUDA_WKV_BACKEND value, function) of the backends the accuracy tables compare."""
    import cuda_wkv

    return (("kernel", "auto", cuda_wkv.bi_wkv), ("scan", "torch", cuda_wkv.bi_wkv_scan))


def _run(fn, args, gy, device: str, dtype):
    """fn's leaves (args on device in dtype) and [y, *gradients] for the incoming gradient gy."""
    import torch

    leaves = [x.to(device, dtype).requires_grad_() for x in args]
    y = fn(*leaves)
    return leaves, [y.detach(), *torch.autograd.grad(y, leaves, gy.to(device, dtype))]


def run_accuracy(device: str, out: Path) -> None:
    """Max errors of every backend vs the float64 dense reference (values and grads)."""
    import torch
    import cuda_wkv

    rows = []
    for B, T, C, wT, kmax in ACC_CASES:
        g = torch.Generator().manual_seed(0)
        w = (0.5 + 0.5 * torch.rand(C, generator=g, dtype=torch.float64)) * wT / T
        u = torch.randn(C, generator=g, dtype=torch.float64)
        k = torch.rand(B, T, C, generator=g, dtype=torch.float64) * 2 * kmax - kmax
        v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
        gy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
        leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
        ref_y = cuda_wkv.bi_wkv_dense(*leaves)
        ref_g = torch.autograd.grad(ref_y, leaves, gy)
        ref_y = ref_y.detach()
        for name, env, fn in _backends():
            os.environ["CUDA_WKV_BACKEND"] = env
            for dt in (torch.float32, torch.float64):
                leaves, (y, *grads) = _run(fn, (w, u, k, v), gy, device, dt)
                rec = {"B": B, "T": T, "C": C, "wT": wT, "kmax": kmax, "backend": name,
                       "impl": cuda_wkv.backend_for(leaves[2]) if name == "kernel" else "torch",
                       "dtype": str(dt).replace("torch.", ""),
                       "y": (y.detach().double().cpu() - ref_y).abs().max().item()}
                for gname, gg, rr in zip(("gw", "gu", "gk", "gv"), grads, ref_g):
                    rec[gname] = ((gg.double().cpu() - rr).abs().max()
                                  / rr.abs().max().clamp_min(1e-300)).item()
                rows.append(rec)
                print(json.dumps(rec), flush=True)
    os.environ.pop("CUDA_WKV_BACKEND", None)
    stem = f"wkv_accuracy_{device}"
    lines = [f"# bi_wkv accuracy vs the float64 dense reference ({device})", "",
             "Generated by `"
             + (f"CUDA_WKV_CHUNK={os.environ['CUDA_WKV_CHUNK']} " if os.environ.get("CUDA_WKV_CHUNK") else "")
             + "python benchmarks/bench_wkv.py --accuracy"
             + (" --device cuda" if device == "cuda" else "") + "`.  "
             "`y`: max |y - y_ref| (v ~ N(0,1), so |y| <= ~4); gradients: max abs error "
             "divided by max |g_ref| (gy ~ N(0,1)).  w = U(0.5, 1) * wT / T, "
             "k ~ U(-kmax, kmax).  The inputs are float64; float32 runs round them.",
             "", "| B×T×C | w·T | kmax | backend | dtype | y | gw | gu | gk | gv |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['B']}×{r['T']}×{r['C']} | {r['wT']:g} | {r['kmax']:g} | "
                     f"{r['backend']} ({r['impl']}) | {r['dtype']} | {r['y']:.1e} | "
                     f"{r['gw']:.1e} | {r['gu']:.1e} | {r['gk']:.1e} | {r['gv']:.1e} |")
    worst = {}
    for r in rows:
        key = (r["backend"], r["dtype"])
        worst[key] = max(worst.get(key, 0.0), *(r[n] for n in ("y", "gw", "gu", "gk", "gv")))
    lines += ["", "Worst case per backend and dtype (max over all columns and cases): " +
              ", ".join(f"{b} {d}: {e:.1e}" for (b, d), e in sorted(worst.items())) + "."]
    long_rows = run_long_accuracy(device)
    lengths = ", ".join(str(T) for T in sorted({r["T"] for r in long_rows}))
    lines += ["", f"## T = {lengths} vs the float64 kernel", "",
              "GLSP's longest sequence on default 3d_fullres plans, too long for the dense reference: "
              "each backend in float32 against the same backend in float64 on the same rounded "
              "inputs, with the automatic chunk length ("
              + (f"CPU, {torch.get_num_threads()} threads: column `chunks`, float32 / float64"
                 if device == "cpu" else "CUDA: chunks of ~100") + ").  "
              "w = U(0, 1) * wT / T > 0 (GLSP's w = decay / T), "
              "k ~ N(0, 2^2); columns as above, every one relative to the largest reference entry.",
              "", "| B×T×C | w·T | backend | chunks | y | gw | gu | gk | gv |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in long_rows:
        chunks = " / ".join(map(str, r["chunks"])) if "chunks" in r else "—"
        lines.append(f"| {r['B']}×{r['T']}×{r['C']} | {r['wT']:g} | {r['backend']} ({r['impl']}) | "
                     f"{chunks} | {r['y']:.1e} | {r['gw']:.1e} | {r['gu']:.1e} | {r['gk']:.1e} | "
                     f"{r['gv']:.1e} |")
    (out / f"{stem}.json").write_text(json.dumps({"dense": rows, "long": long_rows}, indent=1))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json/.md")


# GLSP's longest sequence, and the CPU target's few-lanes shape (B = 1, C = 8, T = 262144)
LONG_ACC_CASES = ([(1, 32768, C, wT) for C in (4, 64) for wT in (0.0, 0.1, 1.0, 10.0, 100.0)]
                  + [(1, 262144, 8, wT) for wT in (0.0, 1.0, 100.0)])


def _glsp_like_inputs(B: int, T: int, C: int, wT: float, seed: int) -> list:
    """Rounded float32 [w, u, k, v, gy] for the float32-vs-float64 comparisons: w = U(0, 1) wT / T > 0
    (GLSP's decay / T), u ~ N(0, 1), k ~ N(0, 2^2), v, gy ~ N(0, 1), drawn in float64 in that order."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.rand(C, generator=g, dtype=torch.float64) * wT / T
    u = torch.randn(C, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64) * 2.0
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    gy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return [x.float() for x in (w, u, k, v, gy)]


def _error_vs_largest(got, ref) -> float:
    """max |got - ref| / max |ref| (the denominator at least 1e-3), in float64 on the CPU."""
    ref = ref.double().cpu()
    return ((got.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-3)).item()


def run_long_accuracy(device: str) -> list:
    """float32 vs float64 of each backend at T = 32768 and 262144 (LONG_ACC_CASES), values and
    gradients."""
    import torch
    import cuda_wkv
    from cuda_wkv import loader

    cpu_ext = loader.load_extension("cpu") if device == "cpu" else None
    rows = []
    for B, T, C, wT in LONG_ACC_CASES:
        rounded = _glsp_like_inputs(B, T, C, wT, seed=5)
        for name, env, fn in _backends():
            os.environ["CUDA_WKV_BACKEND"] = env
            outs = {dt: _run(fn, rounded[:4], rounded[4], device, dt) for dt in (torch.float32, torch.float64)}
            leaves = outs[torch.float64][0]
            rec = {"B": B, "T": T, "C": C, "wT": wT, "backend": name,
                   "impl": cuda_wkv.backend_for(leaves[2]) if name == "kernel" else "torch"}
            if cpu_ext is not None and rec["impl"] == "cpu":  # the chunk lengths the kernel used
                rec["chunks"] = [cpu_ext.chunk_length("cpu", B, T, C, torch.get_num_threads(), size)
                                 for size in (4, 8)]
            for col, a, b in zip(("y", "gw", "gu", "gk", "gv"), outs[torch.float32][1], outs[torch.float64][1]):
                rec[col] = _error_vs_largest(a, b)
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    os.environ.pop("CUDA_WKV_BACKEND", None)
    return rows


CHUNK_SWEEP_WT = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def run_chunk_sweep(args) -> None:
    """The float32 kernel against its float64 run on the same rounded inputs for each forced
    chunk length in ``--chunks``: B = 1, T = ``--T[0]``, C = ``--C``, |w| T in CHUNK_SWEEP_WT
    (w = U(0, 1) |w| T / T > 0, GLSP's decay / T), k ~ N(0, 2^2), ``--seeds`` draws each; per
    chunk length the worst error of y and of the four gradients (each relative to the largest
    reference entry), and in a row that of ``bi_wkv`` itself in float32 (automatic chunks;
    beyond cuda_wkv.dispatch.float32_max_t() the float64 kernel's results rounded).  With
    ``--vs-scan`` a last row checks the reference itself: the float64 kernel against the float64
    ``bi_wkv_scan``, an independent algorithm.  What the automatic float32 chunk cap
    (wkv::kFloatChunkMax) is chosen from; writes ``wkv_chunk_sweep_<device>.md`` under
    ``--out-dir``."""
    import torch
    import cuda_wkv

    from cuda_wkv import dispatch

    T, C, cols = args.T[0], args.C, ("y", "gw", "gu", "gk", "gv")
    rows = [*args.chunks, "bi_wkv"]
    scan_row = "float64 kernel vs bi_wkv_scan"
    worst = {L: {c: 0.0 for c in cols} for L in [*rows, scan_row]}
    fn = dispatch.kernel_bi_wkv  # the kernel in the dtype asked for, whatever T
    if len(args.T) > 1:
        print(f"--chunk-sweep: one sequence length, T = {T} (ignoring {args.T[1:]})", flush=True)
    saved = {name: os.environ.get(name) for name in ("CUDA_WKV_CHUNK", "CUDA_WKV_BACKEND")}
    try:
        os.environ.pop("CUDA_WKV_BACKEND", None)
        backend = cuda_wkv.backend_for(torch.device(args.device))
        if backend not in ("cpu", "cuda"):
            raise SystemExit(f"--chunk-sweep needs the compiled kernel on {args.device}, which is not in use "
                             f"(backend {backend!r}): the PyTorch path has no chunks")
        for wT in CHUNK_SWEEP_WT:
            for seed in range(args.seeds):
                rounded = _glsp_like_inputs(1, T, C, wT, seed)
                os.environ.pop("CUDA_WKV_CHUNK", None)
                ref = _run(fn, rounded[:4], rounded[4], args.device, torch.float64)[1]
                for L in rows:
                    if L == "bi_wkv":
                        os.environ.pop("CUDA_WKV_CHUNK", None)
                    else:
                        os.environ["CUDA_WKV_CHUNK"] = str(L)
                    got = _run(cuda_wkv.bi_wkv if L == "bi_wkv" else fn, rounded[:4], rounded[4], args.device,
                               torch.float32)[1]
                    for c, a, b in zip(cols, got, ref):
                        worst[L][c] = max(worst[L][c], _error_vs_largest(a, b))
                if args.vs_scan:
                    scan = _run(cuda_wkv.bi_wkv_scan, rounded[:4], rounded[4], args.device, torch.float64)[1]
                    for c, a, b in zip(cols, ref, scan):
                        worst[scan_row][c] = max(worst[scan_row][c], _error_vs_largest(a, b))
            print(f"|w|T = {wT:g} done", flush=True)
    finally:  # the caller's values back (unset where they were unset)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    lines = [f"# float32 error of the WKV kernel per chunk length ({args.device})", "",
             f"Generated by `python benchmarks/bench_wkv.py --chunk-sweep --T {T} --C {C} --seeds "
             f"{args.seeds} --chunks {' '.join(map(str, args.chunks))}"
             + (" --vs-scan" if args.vs_scan else "")
             + (" --device cuda" if args.device == "cuda" else "") + f"` on "
             f"{_dt.datetime.now().isoformat(timespec='minutes')} (torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads).  B = 1; |w|·T in "
             f"{', '.join(f'{x:g}' for x in CHUNK_SWEEP_WT)}, {args.seeds} draws each "
             "(w = U(0, 1)·|w|·T / T > 0, k ~ N(0, 2²), v, gy ~ N(0, 1)); float32 against the "
             "float64 kernel on the same rounded inputs; each column the worst over all draws of "
             "max |error| / max |reference|.  Last row: `bi_wkv` in float32 (automatic chunks; "
             f"for T > {dispatch.float32_max_t()} the float64 kernel's results rounded)"
             + (f"; `{scan_row}`: the reference itself against the float64 PyTorch scan." if args.vs_scan
                else "."), "",
             "| chunk length | y | gw | gu | gk | gv |", "|---:|---:|---:|---:|---:|---:|"]
    for L in [*rows, scan_row] if args.vs_scan else rows:
        lines.append(f"| {L} | " + " | ".join(f"{worst[L][c]:.1e}" for c in cols) + " |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(str(out / f"wkv_chunk_sweep_{args.device}.md"), text)
    print(f"wrote {out / f'wkv_chunk_sweep_{args.device}.md'}")


# -------------------------------------------------------------------------- targets
def run_targets(args) -> None:
    """The CPU targets in one run: kernel vs the plain logcumsumexp formulation, fwd+bwd at
    B=2, T=32768, C=64 (fresh subprocess each, default threads), and the few-lanes case
    B=1, C=8, T=262144 at 1 and 2 threads.  Each time is the median of ``--repeat`` runs (what
    the targets are stated in); the fastest run is printed beside it, and the ratios by the
    fastest runs after them, because on a shared VM a run's second core is now and then taken
    by the host: a median far above its minimum says so (the kernel's own split of the work is
    seen in ``--profile``'s kernel times)."""
    import torch

    def point(backend, B, T, C, threads):
        sub = argparse.Namespace(**{**vars(args), "B": B, "C": C, "threads": threads})
        res = _spawn(sub, backend, T, ["fwd_bwd"], rss_allocator=False)
        if "error" in res:
            raise SystemExit(f"{backend} T={T} failed: {res['error']}")
        return res["fwd_bwd_s"], res["fwd_bwd_min_s"], res["fwd_bwd_runs"]

    def both(t):
        return f"{_fmt_s(t[0])} (fastest {_fmt_s(t[1])}, {t[2]} runs)"

    def ratios(slow, fast, digits, goal):
        return (f"{slow[0] / fast[0]:.{digits}f}x (target >= {goal}x; "
                f"by the fastest runs {slow[1] / fast[1]:.{digits}f}x)")

    print(f"machine load average before: {os.getloadavg()}", flush=True)
    print(f"fwd+bwd times: median of up to {args.repeat} runs (fewer where one run exceeds "
          f"--max-seconds / {args.repeat}) after one warm-up run", flush=True)
    threads = args.threads or torch.get_num_threads()
    kern = point("kernel", 2, 32768, 64, threads)
    lcse = point("lcse", 2, 32768, 64, threads)
    print(f"B=2 T=32768 C=64 fp32 fwd+bwd, {threads} threads: kernel {both(kern)}, "
          f"plain logcumsumexp {both(lcse)}: {ratios(lcse, kern, 1, 30)}", flush=True)
    one = point("kernel", 1, 262144, 8, 1)
    two = point("kernel", 1, 262144, 8, 2)
    print(f"B=1 T=262144 C=8 fp32 fwd+bwd kernel: 1 thread {both(one)}, 2 threads "
          f"{both(two)}: {ratios(one, two, 2, 1.6)}", flush=True)
    print(f"machine load average after: {os.getloadavg()}", flush=True)


def run_call_cost(args) -> None:
    """What one call costs when the kernel has almost nothing to do (fixed shape B=1, T=1, C=8,
    float32; ``--B/--T/--C/--dtype`` do not apply): the extension's forward (+ backward) alone,
    ``bi_wkv`` as eager code calls it (validation, backend choice, autograd), the autograd
    Function it calls, and the custom op that traced calls use, called eagerly.
    Median over ``--repeat`` batches of 2000 calls after 200 warm-up calls (CUDA: synchronised
    after each batch, so queued kernels count)."""
    import torch
    from cuda_wkv import bi_wkv, dispatch

    device = torch.device(args.device)
    if dispatch.kernel_backend(device) is None:
        raise SystemExit(f"no compiled kernel for {device}: "
                         f"{dispatch.loader.failure_reason(device.type)}")
    gen = torch.Generator().manual_seed(0)
    w, u = (torch.rand(8, generator=gen).to(device) for _ in range(2))
    k, v = (torch.randn(1, 1, 8, generator=gen).to(device) for _ in range(2))
    ext = dispatch._ext_for(k)
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
    gy = torch.ones_like(k)

    def fwd_bwd(fn):
        def call():
            torch.autograd.grad(fn(*leaves), leaves, gy)
        return call

    def ext_fwd_bwd():
        y, m, r = ext.forward(w, u, k, v)
        ext.backward(w, u, k, v, y, m, r, gy)

    def no_grad_fwd():
        with torch.no_grad():
            bi_wkv(w, u, k, v)

    cases = [("extension forward", lambda: ext.forward(w, u, k, v)),
             ("extension forward + backward", ext_fwd_bwd),
             ("bi_wkv forward (no grad)", no_grad_fwd),
             ("bi_wkv forward + backward (autograd.grad)", fwd_bwd(bi_wkv)),
             ("autograd Function forward + backward (eager bi_wkv's path, without its checks)",
              fwd_bwd(dispatch._BiWKVFunction.apply))]
    if dispatch._FWD_OP is not None:
        cases.append(("custom op forward + backward, eager (the op torch.compile traces)",
                      fwd_bwd(lambda *a: dispatch._FWD_OP(*a)[0])))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = 2000
    print(f"machine load average before: {os.getloadavg()}", flush=True)
    print(f"| call ({device}, torch {torch.__version__}, {torch.get_num_threads()} threads) "
          f"| us per call, median of {args.repeat} x {n} |\n|---|---:|")
    for name, call in cases:
        for _ in range(200):
            call()
        sync()
        batches = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            sync()
            batches.append((time.perf_counter() - t0) / n)
        print(f"| {name} | {statistics.median(batches) * 1e6:.1f} |", flush=True)
    print(f"machine load average after: {os.getloadavg()}", flush=True)


# GLSP's encoder on default 3d_fullres plans: 128^3 patch, strides 1, 2, 2, 2, 2, 2 and
# widths 32 * 2^s capped at 320 (nnU-Net's defaults), batch 2.
GLSP_STAGES = [(128 // 2 ** s, min(32 * 2 ** s, 320)) for s in range(6)]


def run_work_items(args) -> None:
    """Parallel work the kernels offer per encoder stage (no GPU needed): CPU tasks and
    CUDA threads of the chunked scan at the automatic chunk length."""
    import torch
    from cuda_wkv import loader

    ext = loader.load_extension("cpu")
    if ext is None:
        raise SystemExit(f"the CPU kernel is needed for its chunk rule: "
                         f"{loader.failure_reason('cpu')}")
    per_sm, source = args.resident_per_sm, "--resident-per-sm"
    if per_sm <= 0 and torch.cuda.is_available() and loader.load_extension("cuda") is not None:
        per_sm, source = loader.load_extension("cuda").resident_threads_per_sm(False), "this GPU"
    if per_sm <= 0:
        per_sm, source = 512, "sm_90 float32, from the kernels' registers"
    slots = args.sms * per_sm
    threads = args.threads or torch.get_num_threads()
    B, itemsize = 2, 4  # float32 (the half types run in float32 too)
    print(f"GLSP on default 3d_fullres plans (128^3 patch, batch {B}, float32); CUDA: {args.sms} SMs x "
          f"{per_sm} resident threads ({source}) = {slots} slots; CPU: {threads} threads, "
          f"16-channel blocks.")
    print("| stage | grid | T | C | CUDA chunk | chunks | threads phases 1+3 | % of slots | "
          "phase 2 groups | threads phase 2 | phase 2 merges in a row | CPU chunk | CPU tasks |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, (side, C) in enumerate(GLSP_STAGES):
        T = side ** 3
        L = ext.chunk_length("cuda", B, T, C, slots, itemsize)
        nch = -(-T // L)
        th = B * -(-C // 32) * 32 * nch
        groups = ext.carry_groups(nch)
        # merges one phase-2 thread does one after another: the sequential scan, or a group's
        # summary, the scan over the groups and a group's carries
        G = -(-nch // groups)
        chain = nch - 1 if groups == 1 else G + (groups - 1) + (G - 1)
        Lc = ext.chunk_length("cpu", B, T, C, threads, itemsize)
        tasks = B * -(-C // 16) * -(-T // Lc)
        print(f"| {s} | {side}^3 | {T} | {C} | {L} | {nch} | {th} | "
              f"{100 * min(th, slots) / slots:.0f} % | {groups} | {2 * B * C * groups} | {chain} | "
              f"{Lc} | {tasks} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=None,
                   help="sequence lengths (default 256 ... 262144; --chunk-sweep: 32768)")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--C", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--backends", nargs="+", default=["kernel", "scan", "lcse", "dense"],
                   choices=["kernel", "scan", "lcse", "dense"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    p.add_argument("--repeat", type=int, default=5, help="timed runs per point (median)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="fewer repeats when one run is slow (time budget per mode)")
    p.add_argument("--dense-budget-gb", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: PyTorch default)")
    p.add_argument("--timeout", type=float, default=1800.0, help="per point, seconds")
    p.add_argument("--out-dir", default=str(REPO / "docs" / "benchmarks"))
    p.add_argument("--accuracy", action="store_true",
                   help="measure max errors vs the float64 dense reference instead")
    p.add_argument("--peak-gbps", type=float, default=0.0,
                   help="--device cuda: the card's peak memory bandwidth in GB/s (default: "
                        "looked up from the device name)")
    p.add_argument("--targets", action="store_true",
                   help="run the CPU targets (kernel vs logcumsumexp, 1 vs 2 threads) and print them")
    p.add_argument("--work-items", action="store_true",
                   help="print the parallel work items per GLSP encoder stage (no GPU needed)")
    p.add_argument("--sms", type=int, default=132,
                   help="--work-items: streaming multiprocessors of the GPU (H200/H100: 132)")
    p.add_argument("--resident-per-sm", type=int, default=0,
                   help="--work-items: threads of the chunk kernels an SM keeps resident (default: "
                        "this GPU's, else 512, sm_90 in float32)")
    p.add_argument("--profile", action="store_true",
                   help="also profile calls per point (5 on CUDA, 1 on the CPU) and tabulate where its time goes "
                        "(CUDA: each kernel's device time, so host overhead shows as the gap "
                        "to the wall time; CPU: operators' self time)")
    p.add_argument("--call-cost", action="store_true",
                   help="print what one call costs at a fixed tiny shape, B=1 T=1 C=8 float32 (the "
                        "op's fixed costs: extension alone, bi_wkv eager, its autograd Function, "
                        "the custom op)")
    p.add_argument("--chunk-sweep", action="store_true",
                   help="float32 vs float64 kernel error per forced chunk length (--chunks) over "
                        "--seeds draws at B=1, T=--T[0], C=--C (what the float32 chunk cap is chosen from)")
    p.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512, 1024],
                   help="--chunk-sweep: the chunk lengths")
    p.add_argument("--seeds", type=int, default=32, help="--chunk-sweep: draws per |w|T")
    p.add_argument("--vs-scan", action="store_true",
                   help="--chunk-sweep: also check the float64 kernel (the reference) against the float64 "
                        "PyTorch scan, an independent algorithm (slow at long T)")
    p.add_argument("--_point", nargs=2, metavar=("BACKEND", "T"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.T is None:
        args.T = [32768] if args.chunk_sweep else DEFAULT_T

    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    if args._point:
        res = run_point(args._point[0], int(args._point[1]), args.B, args.C, args.device,
                        args.dtype, args.repeat, args.max_seconds, args.modes, args.profile)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    import torch
    if args.work_items:
        run_work_items(args)
        return 0
    if args.targets:
        run_targets(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is available")
    if args.call_cost:
        run_call_cost(args)
        return 0
    if args.chunk_sweep:
        run_chunk_sweep(args)
        return 0
    if args.accuracy:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        run_accuracy(args.device, out)
        return 0
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    itemsize = max(itemsize, 4)  # computed in float32
    if args.device == "cuda":
        machine = torch.cuda.get_device_name()
        mem_method = ("`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, "
                      "minus the memory allocated before the op.")
    else:
        from nnunetv2_ext.benchmark import cpu_model
        machine = f"{cpu_model()}, {os.cpu_count()} CPUs"
        mem_method = ("fresh subprocess per (backend, T) with `MALLOC_MMAP_THRESHOLD_=131072`; "
                      "`ru_maxrss` after the first call minus the resident set size just "
                      "before it (inputs allocated, kernel loaded, warmed up on tiny inputs), "
                      "i.e. the op's own peak working set including outputs (and, for "
                      "fwd+bwd, saved tensors and gradients).  Values below ~1 MiB are "
                      "at the noise level of this method.")
    meta = {
        "device": args.device, "dtype": args.dtype, "B": args.B, "C": args.C,
        "repeat": args.repeat, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": machine,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_wkv.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:])),
        "memory_method": mem_method,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "itemsize": itemsize,
        "peak_gbps": peak_gbps(machine, args.peak_gbps) if args.device == "cuda" else None,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"wkv_{args.device}"
    rows = []
    for T in args.T:
        for backend in args.backends:
            if backend == "dense":
                need = _dense_bytes(args.B, T, args.C, itemsize, "fwd_bwd" in args.modes)
                if need > args.dense_budget_gb * 2 ** 30:
                    continue
            t0 = time.time()
            if args.device == "cpu":
                res = _spawn(args, backend, T, args.modes)
            else:
                try:
                    res = run_point(backend, T, args.B, args.C, args.device, args.dtype,
                                    args.repeat, args.max_seconds, args.modes, args.profile)
                except Exception as exc:  # one failed point (out of memory, a profiler gap)
                    res = {"error": f"{type(exc).__name__}: {exc}"}  # must not lose the others
                    torch.cuda.empty_cache()
            res.setdefault("backend", backend)
            res.setdefault("T", T)
            rows.append(res)
            print(f"T={T:>7} {backend:>6}: " + ", ".join(
                f"{m} {_fmt_s(res.get(m + '_s'))} / {_fmt_b(res.get(m + '_peak_bytes'))}"
                for m in args.modes) + (f"  ERROR {res['error'][-200:]}" if "error" in res else "")
                + f"  ({time.time() - t0:.0f}s)", flush=True)
            # the tables so far, replaced whole after every point: a sweep stopped by a time
            # limit keeps the points it measured
            write_atomically(str(out / f"{stem}.json"), json.dumps({"meta": meta, "results": rows}, indent=1))
            write_markdown(out / f"{stem}.md", meta, rows)
    try:
        write_plot(out / f"{stem}.png", meta, rows)
    except ImportError as exc:  # pragma: no cover
        print(f"no plot ({exc})")
    print(f"wrote {out / stem}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
