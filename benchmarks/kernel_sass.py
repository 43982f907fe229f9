"""The decode step's elementwise kernels and the LoRA expand compiled for Hopper (sm_90) on any machine, no GPU needed,
and their machine code (SASS) counted: instructions by opcode, global loads by width (and how many carry a
predicate), barriers, shuffles, and where in the program the loads sit. At decode sizes these kernels are bound by
instruction issue and load latency, not bandwidth (ncu on an H200: ~11% of peak issue, L2 at 5-10% of its
throughput), so the counts say much of what a change will do before it reaches the GPU; a load that should be a
16-byte vector and is not shows here as many narrow ones.

    python3 -m benchmarks.kernel_sass [--kernels add_rms_norm,rope_and_cache,silu_mul,lora_expand,lora_expand_rows]
                                      [--dump DIR]

Compiled by the Triton installed here (which may be newer than the GPU machine's), the elementwise kernels at
Llama-3.2-1B sizes, rank 16, P = 8, with the constexprs and warps the launchers pick (kernels/elementwise.py), the
expand with prefill tiles at ranks 16 and 64, the rows expand (decode) at ranks 16 and 64; --dump writes each
variant's SASS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple

INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)")


class Variant(NamedTuple):
    kernel: str  # kernels.elementwise attribute
    types: dict  # runtime argument -> Triton type (others: i32)
    consts: dict
    num_warps: int
    num_stages: int = 3


def _nvdisasm() -> str:
    import triton.backends.nvidia

    return os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "nvdisasm")


def compile_sass(fn, types: dict, consts: dict, num_warps: int, num_stages: int = 3) -> str:
    """fn (a @triton.jit function) compiled for sm_90 with the constexprs `consts`, its SASS as text. Pointers and
    the integer arguments named in types as "i32:16" are taken as 16-divisible, as Triton specialises them at a
    launch (strides and widths that are multiples of 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else types.get(n, "i32").split(":")[0] for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in consts and (sig[n].startswith("*") or types.get(n, "").endswith(":16"))}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        return subprocess.run([_nvdisasm(), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout


def opcodes(sass: str) -> list[tuple[str, bool]]:
    """(opcode with its modifiers, whether a predicate guards it) per instruction, in program order."""
    out = []
    for line in sass.splitlines():
        m = INSTRUCTION.match(line)
        if m:
            out.append((m.group(2), m.group(1) is not None))
    return out


def _load_bits(op: str) -> int:
    """LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32, ...; LDGSTS (an asynchronous copy into shared memory) and
    LDGDEPBAR (its wait) -> 0."""
    if op.startswith("LDGSTS") or op.startswith("LDGDEPBAR"):
        return 0
    for part in reversed(op.split(".")):
        digits = part.lstrip("US")
        if digits.isdigit():
            return int(digits)
    return 32


def summary(sass: str) -> dict:
    ops = opcodes(sass)
    counts = Counter(op for op, _ in ops)
    loads = [i for i, (op, _) in enumerate(ops) if op.startswith("LDG")]
    widths = Counter(_load_bits(ops[i][0]) for i in loads)
    return {
        "instructions": len(ops),
        "global loads": len(loads),
        "load bits": dict(sorted(widths.items())),  # width -> loads (0: asynchronous copies to shared memory)
        "predicated loads": sum(1 for i in loads if ops[i][1]),
        "load span": (loads[-1] - loads[0]) if loads else 0,  # instructions from the first load to the last
        "barriers": sum(n for op, n in counts.items() if op.startswith("BAR")),
        "shuffles": sum(n for op, n in counts.items() if op.startswith("SHFL")),
        # bf16 rounded on the bits (an add of 0x7fff plus the kept bit), not by the convert: the interpreter's way
        # (an AND with 0x7fff, as a shared-memory offset's, is not one)
        "bit roundings": sum(1 for line in sass.splitlines()
                             if (m := INSTRUCTION.match(line)) and "ADD" in m.group(2) and "0x7fff," in line),
        "top": counts.most_common(8),
    }


def variants() -> dict[str, Variant]:
    """The elementwise kernels as the engine's batch-64, 8-adapter decode step launches them (base and expanding)."""
    from kernels.consumer_expand import rank_block
    from kernels.elementwise import (
        EXPAND_ONE_BLOCK_WARPS,
        EXPAND_WARPS,
        SILU_ROW_EXPAND_BN,
        SILU_ROW_EXPAND_WARPS,
    )

    rb = rank_block(16)
    bf16 = "*bf16"
    norm_types = {n: bf16 for n in ("h_ptr", "r_ptr", "w_ptr", "x_ptr", "hout_ptr", "d_ptr", "y_ptr", "b_ptr")}
    norm_types.update(ds_ptr="*i32", ranks_ptr="*i32", es_ptr="*i32", eps="fp32", pf_base="i64", pf_stride="i64",
                      **{n: "i32:16" for n in ("N", "s_h", "s_r", "s_x", "s_ho", "s_yt", "s_yp", "s_bp")})
    norm = dict(HAS_RESIDUAL=True, BLOCK=2048, EMULATED=False, PREFETCH=False)
    rope_types = {n: bf16 for n in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "kc_ptr", "vc_ptr", "dq_ptr",
                                    "dk_ptr", "dv_ptr", "y_ptr", "bq_ptr", "bk_ptr", "bv_ptr")}
    rope_types.update(pos_ptr="*i64", slot_ptr="*i64", ds_ptr="*i32", ranks_ptr="*i32", es_ptr="*i32",
                      **{n: "i32:16" for n in ("H", "s_qt", "s_qh", "s_kt", "s_kh", "s_vt", "s_vh", "s_cos", "s_cs",
                                               "s_ch", "s_yt", "s_yp", "s_bp")})
    rope = dict(H_PAD=32, KVH_PAD=8, HALF=32, EMULATED=False)
    # Expanding in a decode graph on Hopper: the row's B loaded first, launched dependent (kernels/launch.py).
    plain, early = {"EARLY_B": False, "PDL": False}, {"EARLY_B": True, "PDL": True}
    silu_types = {"gu_ptr": bf16, "out_ptr": bf16, "d_ptr": bf16, "y_ptr": bf16, "bg_ptr": bf16, "bu_ptr": bf16,
                  "ds_ptr": "*i32", "ranks_ptr": "*i32", "es_ptr": "*i32",
                  **{n: "i32:16" for n in ("N", "s_gu", "s_o", "s_yt", "s_yp", "s_bp")}}
    # The LoRA expand at prefill sizes (kernels/lora_expand.py), gate_up of Llama-3-8B (2 x 14,336 columns), as
    # kernels.bench's 2,048-8,192-token cases launch it; Triton specialises the unit strides to constants.
    expand_types = {n: bf16 for n in ("out_ptr", "b0_ptr", "b1_ptr", "b2_ptr", "b3_ptr")}
    expand_types.update(y_ptr="*fp32", ranks_ptr="*i32", scale_ptr="*fp32", sorted_ptr="*i32", active_ptr="*i32",
                        start_ptr="*i32", len_ptr="*i32",
                        **{n: "i32:16" for n in ("stride_b0", "stride_b1", "stride_b2", "stride_b3", "stride_bo", "w0",
                                                 "w1", "col0", "col1", "stride_yt", "stride_ys", "stride_ot", "R")})
    expand = dict(MAX_SLOTS=128, SLOTS_PAD=128, NUM_SLICES=2, ONE_K=True, HAS_SCALE=False, DOT=0, ACCUMULATE=True,
                  SUB=1, stride_oc=1, stride_br=1)
    # The rows expand (kernels/lora_expand_rows.py) as lora_expand launches it at decode sizes: a row a program.
    rows_types = {**{n: t for n, t in expand_types.items() if n not in ("active_ptr", "start_ptr", "len_ptr")},
                  "sorted_slots_ptr": "*i32", "T": "i32",
                  **{n: "i32:16" for n in ("w2", "w3", "col2", "col3", "stride_ys")}}
    rows = dict(HAS_SCALE=False, ACCUMULATE=True, DOT=0, stride_oc=1, stride_br=1)
    return {
        "lora_expand_rows r16": Variant("_expand_rows_kernel", rows_types, {**rows, "BLOCK_N": 512, "BLOCK_R": 16}, 4,
                                        1),
        "lora_expand_rows r64": Variant("_expand_rows_kernel", rows_types, {**rows, "BLOCK_N": 128, "BLOCK_R": 64}, 4,
                                        1),
        "lora_expand r16": Variant("_expand_kernel", expand_types,
                                   {**expand, "BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 16}, 4, 3),
        "lora_expand r64": Variant("_expand_kernel", expand_types,
                                   {**expand, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 4, 2),
        "add_rms_norm base": Variant("_add_rms_norm_kernel", norm_types,
                                     {**norm, "LORA": 0, "R": 1, "RB": 1, **plain}, 4),
        "add_rms_norm expand": Variant("_add_rms_norm_kernel", norm_types,
                                       {**norm, "LORA": 2, "R": 16, "RB": rb, **early}, EXPAND_WARPS),
        "rope_and_cache base": Variant("_rope_cache_kernel", rope_types,
                                       {**rope, "LORA": 0, "R": 1, "RB": 1, **plain, "Q_PARTS": 0}, 4),
        # A program per part of a row (q in 4 parts, k, v: elementwise.rope_parts).
        "rope_and_cache expand": Variant("_rope_cache_kernel", rope_types,
                                         {**rope, "LORA": 2, "R": 16, "RB": rb, **early, "Q_PARTS": 4},
                                         EXPAND_WARPS),
        "silu_mul base": Variant("_silu_mul_kernel", silu_types, {"HAS_DELTA": False, "BLOCK": 1024,
                                                                  "EMULATED": False}, 4),
        "silu_mul expand": Variant("_silu_mul_expand_kernel", silu_types,
                                   {"BM": 64, "BN": 64, "BK": 128, "EVEN_K": True, "DOT": 0, "EMULATED": False,
                                    "R": 16, "RB": rb, "PDL": True, "GROUPS": 1}, EXPAND_ONE_BLOCK_WARPS, 1),
        # 32 adapters at P = 32: a program per block of 8 slots (the rows of its slots), 32 columns.
        "silu_mul grouped": Variant("_silu_mul_expand_kernel", silu_types,
                                    {"BM": 64, "BN": 32, "BK": 128, "EVEN_K": True, "DOT": 0, "EMULATED": False,
                                     "R": 16, "RB": rb, "PDL": True, "GROUPS": 4}, 4, 1),
        # The same, a row a program over 512 columns of each slice (elementwise.SILU_ROW_EXPAND_MIN_SLOTS).
        "silu_mul rows": Variant("_silu_mul_row_expand_kernel", silu_types,
                                 {"BN": SILU_ROW_EXPAND_BN, "EMULATED": False, "R": 16, "RB": rb, **early},
                                 SILU_ROW_EXPAND_WARPS, 1),
        # Eager steps (prompts): the segmented shrink's float32 y, tiles of 64 rows mostly of one slot.
        "silu_mul eager": Variant("_silu_mul_expand_kernel", {**silu_types, "y_ptr": "*fp32"},
                                  {"BM": 64, "BN": 64, "BK": 16, "EVEN_K": True, "DOT": 0, "EMULATED": False,
                                   "R": 16, "RB": rb, "PDL": False, "GROUPS": 0}, 4, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.kernel_sass", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="add_rms_norm,rope_and_cache,silu_mul,lora_expand,lora_expand_rows")
    p.add_argument("--dump", type=Path, help="write each variant's SASS here")
    p.add_argument("--json", action="store_true", help="one JSON object: variant -> counts and opcodes used")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU machine's Triton fuses; say so to a newer one
    import importlib

    import kernels.elementwise as ew

    # `kernels.lora_expand` is also the function, hence the modules by name.
    modules = {"_expand_kernel": importlib.import_module("kernels.lora_expand"),
               "_expand_rows_kernel": importlib.import_module("kernels.lora_expand_rows")}
    if getattr(ew._add_rms_norm_kernel, "cache_key", None) is None:
        raise SystemExit("the kernels are interpreted here (TRITON_INTERPRET=1): run without it")
    wanted = args.kernels.split(",")
    report = {}
    for name, v in variants().items():
        if name.split()[0] not in wanted:
            continue
        module = modules.get(v.kernel, ew)
        sass = compile_sass(getattr(module, v.kernel), v.types, v.consts, v.num_warps, v.num_stages)
        s = summary(sass)
        if args.json:
            report[name] = {**s, "opcodes": sorted({op for op, _ in opcodes(sass)})}
            continue
        print(f"{name:24} {v.num_warps} warps: {s['instructions']:5d} instructions, {s['global loads']:3d} global "
              f"loads (bits: {s['load bits']}; {s['predicated loads']} predicated, spread over {s['load span']}), "
              f"{s['barriers']} barriers, "
              f"{s['shuffles']} shuffles; " + ", ".join(f"{op} {n}" for op, n in s["top"]))
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{name.replace(' ', '-')}.sass").write_text(sass)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
