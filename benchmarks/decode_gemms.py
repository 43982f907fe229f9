"""The base model's projections at decode sizes, timed alone: how close cuBLAS comes to the copy bandwidth on
each, and whether another way of calling it does better. A graphed decode step's base GEMMs reached 27-59% of
the copy bandwidth on an H200 (qkv 7.1 us for 12.6 MB, o_proj 6.6 us for 8.4 MB; benchmarks/README.md).

    python3 -m benchmarks.decode_gemms [--rows 1,16,32,64,128] [--workspaces 1024,32768]

Llama-3.2-1B shapes (qkv, o, gate_up, down, lm_head), bf16. Each way is captured in a CUDA graph over rotated
copies of the weight (together past 4x the L2, so weights come from HBM, as in a model) and replayed; the
median us per call, and the GB/s of the weight bytes against the device-to-device copy bandwidth measured in
the same run. Ways:
  linear      F.linear(x, W), W [N, K] (the engine's call), with torch's default BLAS library;
  linear-lt   the same with torch.backends.cuda.preferred_blas_library("cublaslt");
  mm-kmajor   torch.mm(x, W.T contiguous): the weight stored [K, N], another cuBLAS layout;
  triton      kernels/decode_gemm.py (checked against F.linear first), default tiles, or
              triton/BLOCK_N/BLOCK_K/warps/stages/waves to try others (up to 128 rows).
--workspaces runs the whole table again in a child process per CUBLASLT_WORKSPACE_SIZE value (KiB; cuBLAS picks
split-K kernels only when they fit its workspace).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from benchmarks.synthetic import LLAMA_3_2_1B
from kernels.bench import copy_bandwidth, graph_time_us
from kernels.decode_gemm import MAX_ROWS, DecodeGemm, GemmConfig


def shapes() -> dict[str, tuple[int, int]]:
    """name -> (N, K) of W [N, K]."""
    c = LLAMA_3_2_1B
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    return {"qkv": (h + 2 * kv, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (c["vocab_size"], h)}


def time_way(way: str, rows: int, n: int, k: int, l2_bytes: int) -> float:
    weight_bytes = n * k * 2
    copies = max(2, min(16, -(-4 * l2_bytes // weight_bytes)))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    xs = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    if way.startswith("triton"):
        if rows > MAX_ROWS:
            return float("nan")
        # triton or triton/BLOCK_N/BLOCK_K/warps/stages/waves
        fields = [int(f) for f in way.split("/")[1:]]
        cfg = GemmConfig(**dict(zip(("block_n", "block_k", "num_warps", "num_stages", "waves"), fields)))
        gemm = DecodeGemm(rows, n, k, torch.device("cuda"), cfg)
        outs = [torch.empty(rows, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        err = float((gemm(xs[0], ws[0], outs[0]).double() - F.linear(xs[0], ws[0]).double()).norm()
                    / F.linear(xs[0], ws[0]).double().norm())
        if not err <= 1e-2:
            raise AssertionError(f"{way} {rows} x {n} x {k}: relative error {err:.2e} against F.linear")

        def run():
            for x, w, o in zip(xs, ws, outs):
                gemm(x, w, o)
    elif way == "mm-kmajor":
        ws = [w.t().contiguous() for w in ws]
        outs = [torch.empty(rows, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]

        def run():
            for x, w, o in zip(xs, ws, outs):
                torch.mm(x, w, out=o)
    else:
        def run():
            for x, w in zip(xs, ws):
                F.linear(x, w)
    if way == "linear-lt":
        saved = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return graph_time_us(run, copies)
        finally:
            torch.backends.cuda.preferred_blas_library(saved)
    return graph_time_us(run, copies)


def table(rows_list: list[int], ways: list[str]) -> None:
    bw = copy_bandwidth() / 1e9  # GB/s, read + write counted
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    ws = os.environ.get("CUBLASLT_WORKSPACE_SIZE", "default")
    print(f"{torch.cuda.get_device_name()}, copy {bw:.0f} GB/s (read + write), L2 {l2 >> 20} MiB, "
          f"CUBLASLT_WORKSPACE_SIZE={ws}")
    print(f"{'gemm':8} {'rows':>5} " + " ".join(f"{w + ' us':>14} {'%copy':>6}" for w in ways))
    for name, (n, k) in shapes().items():
        for rows in rows_list:
            cells = []
            for way in ways:
                us = time_way(way, rows, n, k, l2)
                gbs = (n * k + rows * (n + k)) * 2 / us / 1e3
                cells.append(f"{us:14.2f} {100 * gbs / bw:6.1f}")
            print(f"{name:8} {rows:5d} " + " ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.decode_gemms", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,16,32,64,128")
    p.add_argument("--ways", default="linear,linear-lt,mm-kmajor")
    p.add_argument("--workspaces", default="", help="CUBLASLT_WORKSPACE_SIZE values (KiB) to run again with, "
                   "each in a child process")
    args = p.parse_args(argv)
    table([int(r) for r in args.rows.split(",")], args.ways.split(","))
    for size in filter(None, args.workspaces.split(",")):
        subprocess.run([sys.executable, "-m", "benchmarks.decode_gemms", "--rows", args.rows, "--ways", args.ways],
                       env={**os.environ, "CUBLASLT_WORKSPACE_SIZE": size}, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
