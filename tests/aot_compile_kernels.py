"""Compile every Triton kernel ahead of time for a GPU target, on a machine without a GPU.

The CPU interpreter checks what the kernels compute but not whether the GPU compiler accepts
them (types carried through loops, tl.dot shapes and dtypes, wgmma lowering). This script runs
the real compiler down to a cubin for sm_90 (and sm_80), for the configurations the launchers
use, and checks what the launch will need: shared memory within the device's limit, and register
spills within their budget (SPILL_BUDGET_BYTES, SPILL_MEASURED; read from the cubin's SASS).

It compiles the program the JIT compiles at run time for aligned inputs: each case lists example
arguments (aligned pointers, the integers a typical launch passes: INT_EXAMPLES) and Triton's own
launch-time binder specializes them (tt.divisibility=16 on aligned pointers and multiples of 16,
integers equal to 1 as constants, i32 or i64 by value), exactly as JITFunction.run does.
Run it without TRITON_INTERPRET:  python tests/aot_compile_kernels.py [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the compiler")

import torch  # noqa: E402
import triton  # noqa: E402
from prefkern._kernels import (  # noqa: E402
    divergence,
    divergence_fused,
    gae,
    linear_logprobs_fused,
    logits_slice,
)
from prefkern._kernels import logprobs_from_logits as logits_kernels  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

# ------------------------------------------------------------------- example arguments by name

# Element type of each pointer argument; "elt" is the case's input dtype (bf16 or fp32).
POINTERS = {
    "targets_ptr": "i64", "y_ptr": "i64", "lse_ptr": "fp32", "entropy_ptr": "fp32",
    "ent_ptr": "fp32", "g_logp_ptr": "fp32", "g_ent_ptr": "fp32", "g_lse_ptr": "fp32",
    "gl_ptr": "fp32", "ge_ptr": "fp32", "gs_ptr": "fp32", "logp_ptr": "fp32", "m_ptr": "fp32",
    "s_ptr": "fp32", "u_ptr": "fp32", "zy_ptr": "fp32", "part_ptr": "fp32", "acc_ptr": "fp32",
    "db_ptr": "fp32", "inv_temp_ptr": "fp32", "logits_ptr": "elt", "grad_ptr": "elt",
    "raw_ptr": "elt", "dz_ptr": "elt",
    "h_ptr": "elt", "w_ptr": "elt", "b_ptr": "elt",
    # divergence kernels: two rows of logits in, row statistics and gradients out
    "zp_ptr": "elt", "zq_ptr": "elt", "dp_ptr": "elt", "dq_ptr": "elt", "div_ptr": "fp32",
    "m_p_ptr": "fp32", "ls_p_ptr": "fp32", "m_q_ptr": "fp32", "ls_q_ptr": "fp32",
    "c_p_ptr": "fp32", "c_q_ptr": "fp32", "g_div_ptr": "fp32", "inv_temp_p_ptr": "fp32",
    "inv_temp_q_ptr": "fp32",
    # fused divergence kernels: both heads' hidden / weight / bias, the packed row terms
    "hp_ptr": "elt", "wp_ptr": "elt", "bp_ptr": "elt", "hq_ptr": "elt", "wq_ptr": "elt",
    "bq_ptr": "elt", "terms_ptr": "fp32", "acc_p_ptr": "fp32", "acc_q_ptr": "fp32",
    "db_p_ptr": "fp32", "db_q_ptr": "fp32",
    # extra row statistics (return_stats) and their gradient
    "stats_ptr": "fp32", "s2_ptr": "fp32", "sz_ptr": "fp32", "idx_ptr": "fp32",
    "g_extra_ptr": "fp32",
    "gx_ptr": "fp32",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "i64": torch.int64, "i32": torch.int32, "u8": torch.uint8}

# Integer arguments: the value a typical launch passes, with Llama-3-like shapes H = 4096 and
# V = 128256 (vocabularies are padded to multiples of 64 or more: Qwen2 151936, Gemma 256000;
# GPT-2's 50257 is not, and then the JIT compiles the variant without divisibility on V).
# The binder gives tt.divisibility=16 to exactly the values that are multiples of 16 (0 too).
INT_EXAMPLES = {
    # -- multiples of 16 at run time, so marked divisible --
    "H": 4096,                # hidden size: every production model's is a multiple of 16
    "stride_h": 4096,         # fused launcher requires contiguous hidden (N, H): stride = H
    "stride_w": 4096,         #   and contiguous weight (V, H): stride = H
    "H_p": 4096, "H_q": 4096,  # fused divergence: each head's hidden size and strides
    "stride_hp": 4096, "stride_wp": 4096, "stride_hq": 4096, "stride_wq": 4096,
    "V": 128256,              # vocabulary size (see above)
    "stride_inner": 128256,   # logits rows are contiguous along V: row stride = V
    "stride_outer": 0,        #   the op passes (N, V) logits, for which the launcher passes 0
    "grad_stride_inner": 128256,  # the gradient: a new contiguous (N, V) tensor, or the
    "grad_stride_outer": 0,       #   logits themselves (inplace_backward): their layout
    "C": 16384,               # fast-mode slice width: all of V, or a multiple of 128
    "stride_row": 16384,      #   (linear_sliced._slice_width); slices are contiguous: = C
    "stride_dz_row": 16384,   #   and so is the slice's gradient buffer
    "zp_stride": 128256,      # divergence rows: whole rows of contiguous (N, V) logits
    "zq_stride": 128256,
    "dp_stride": 16384,       #   and their gradient: a slice of C columns (linear backward)
    "dq_stride": 16384,
    "col0": 32768,            # slice start / dW wave start: multiples of the slice or wave width
    "row0": 4096,             # dh wave start: multiples of the wave, a multiple of BLOCK_N
    "col1": 8192,             # dW wave end: min(V, col0 + wave), a multiple of 16 with V's
    "cols_per_split": 1024,   # the launchers round split lengths up to multiples of the block
    "rows_per_split": 256,    #   (linear_logprobs_fused._split / _waves)
    # -- not divisible in general --
    "N": 1000,                # number of tokens (B * T after packing): arbitrary
    "row1": 1000,             # dh wave end: min(N, row0 + wave) = N on the last wave
    "inner": 1000,            # (N, V) logits: N; (B, T, V): T
    "seq_len": 1000,          # GAE (B, T): T
    "ignore_index": -100,
}
FLOATS = {"inv_temp": 1.0, "softcap": 30.0, "gamma": 0.99, "lam": 0.95, "lam_critic": 1.0,
          "inv_temp_p": 1.0, "inv_temp_q": 1.0, "softcap_p": 30.0, "softcap_q": 30.0,
          "beta": 0.5, "log1m_beta": -0.693, "log_beta": -0.693, "alpha": 0.5}


class AlignedPointer:
    """Stands in for a tensor argument: the JIT reads only its dtype and data_ptr(). CUDA
    allocations (torch's caching allocator) are at least 256-byte aligned."""

    def __init__(self, dtype: torch.dtype, address: int = 256):
        self.dtype = dtype
        self.address = address

    def data_ptr(self) -> int:
        return self.address


def _example_args(fn, elt: str, pointers: dict, constexprs: dict) -> dict:
    """Keyword arguments for ``fn`` by name; raises on an argument no table describes."""
    args = {}
    for name in fn.arg_names:
        if name in constexprs:
            args[name] = constexprs[name]
        elif name in pointers:
            dtype = elt if pointers[name] == "elt" else pointers[name]
            args[name] = AlignedPointer(DTYPES[dtype])
        elif name in INT_EXAMPLES:
            args[name] = INT_EXAMPLES[name]
        elif name in FLOATS:
            args[name] = FLOATS[name]
        elif not any(p.name == name and p.has_default for p in fn.params):
            raise KeyError(f"argument {name!r} of {fn.__name__} is in no table of "
                           f"{Path(__file__).name}: add its type / example value")
    return args


def _specialize(fn, backend, args: dict, launch: dict):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run derives them: the same
    binder (native specialize_impl on each argument) and the same _pack_args."""
    kwargs = dict(args, **launch)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for option in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # as run() adds them
        if hasattr(knobs.compilation, option):
            kwargs[option] = getattr(knobs.compilation, option)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    return signature, constexprs, attrs, options


# ------------------------------------------------------------------------------ the cases

def _pointers(**extra) -> dict:
    return dict(POINTERS, **extra)


def _cases():
    """(name, kernel, input dtype, pointer dtypes, constexprs, launch options): the launchers'
    configurations, with every optional input present (the most code)."""
    grads = dict(HAS_G_LOGP=True, HAS_G_ENT=True, ROW_TEMP=True)
    rows = dict(num_warps=8)
    for elt in ("bf16", "fp32"):
        p = _pointers()
        # fast mode (ops/linear_sliced.py): fp32 logit slices, gradients in the input dtype
        sliced = _pointers(raw_ptr="fp32", dz_ptr="elt")
        # each row kernel without and with the extra statistics (return_stats)
        for stats, suffix in ((False, ""), (True, "+stats")):
            yield (f"logprobs_fwd[{elt}]{suffix}", logits_kernels._logprobs_fwd_kernel, elt, p,
                   dict(WITH_ENTROPY=True, WITH_STATS=stats, ROW_TEMP=True,
                        BLOCK_V=logits_kernels._block_v(128256, stats)), rows)
            yield (f"logprobs_bwd[{elt}]{suffix}", logits_kernels._logprobs_bwd_kernel, elt, p,
                   dict(BLOCK_V=4096, HAS_G_LSE=True, HAS_G_EXTRA=stats, **grads), rows)
            if elt == "fp32":  # the same program for every input dtype
                yield (f"slice_stats{suffix}", logits_slice._slice_stats_kernel, elt, sliced,
                       dict(SOFTCAP=True, ROW_TEMP=True, EXTRA=stats, BLOCK=4096), rows)
            yield (f"slice_grad[{elt}]{suffix}", logits_slice._slice_grad_kernel, elt, sliced,
                   dict(SOFTCAP=True, BLOCK=4096, HAS_G_LSE=True, HAS_G_EXTRA=stats, **grads),
                   rows)
        # the launcher's own GPU configuration
        cfg = linear_logprobs_fused._gpu_config(DTYPES[elt])
        launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        fused = dict(cfg, HAS_BIAS=True, SOFTCAP=True, ROW_TEMP=True)
        # each fused kernel without and with the extra statistics (return_stats): the tiles
        # sit at the register cap, so the stats variant has its own spill budget
        bwd = dict(fused, HAS_G_LSE=True, ATOMIC=True, HAS_G_LOGP=True, HAS_G_ENT=True)
        for stats, suffix in ((False, ""), (True, "+stats")):
            yield (f"fused_fwd[{elt}]{suffix}", linear_logprobs_fused._fused_fwd_kernel, elt, p,
                   dict(fused, EXTRA=stats), launch)
            yield (f"fused_dh[{elt}]{suffix}", linear_logprobs_fused._fused_dh_kernel, elt, p,
                   dict(bwd, HAS_G_EXTRA=stats), launch)
            yield (f"fused_dw[{elt}]{suffix}", linear_logprobs_fused._fused_dw_kernel, elt, p,
                   dict(bwd, HAS_G_EXTRA=stats, NEED_DW=True, NEED_DB=True), launch)
        # deterministic=True: one split per block, plain read-modify-writes and a barrier
        yield (f"fused_dh[{elt}]+deterministic", linear_logprobs_fused._fused_dh_kernel, elt,
               p, dict(bwd, HAS_G_EXTRA=False, ATOMIC=False), launch)
        yield (f"fused_dw[{elt}]+deterministic", linear_logprobs_fused._fused_dw_kernel, elt,
               p, dict(bwd, HAS_G_EXTRA=False, NEED_DW=True, NEED_DB=True, ATOMIC=False),
               launch)
    # divergences: every kind is its own program; materialized bf16 logits forward (logits
    # path), fp32 GEMM slices in with bf16 gradients out backward (linear path)
    heads = dict(ROW_TEMP_P=True, ROW_TEMP_Q=True, SOFTCAP_P=True, SOFTCAP_Q=True)
    for kind, kind_id in divergence.KIND_IDS.items():
        yield (f"divergence_fwd[{kind}]", divergence._divergence_fwd_kernel, "bf16", _pointers(),
               dict(KIND=kind_id, NEED_Q=True, BLOCK_V=divergence.FWD_BLOCK, **heads), rows)
        yield (f"divergence_bwd[{kind}]", divergence._divergence_bwd_kernel, "bf16",
               _pointers(zp_ptr="fp32", zq_ptr="fp32"),
               dict(KIND=kind_id, NEED_Q=True, HAS_G_DIV=True, HAS_G_LOGP=True, BLOCK_V=2048,
                    **heads), rows)
    # fused divergence kernels (min_memory): linear_logprobs_fused._config's tiles, both
    # heads with bias, softcap and per-row temperatures, the reference taking a gradient
    fused = dict(DOT_FP32=False, HAS_BIAS_P=True, HAS_BIAS_Q=True, **heads)
    bwd = dict(NEED_Q=True, HAS_G_DIV=True, HAS_G_LOGP=True, ATOMIC=True)
    for elt, kinds in (("bf16", divergence.KIND_IDS), ("fp32", ("jsd",))):
        tiles = divergence_fused._tiles(DTYPES[elt])  # the launcher's (TRITON_INTERPRET unset)
        launch = {k: tiles.pop(k) for k in ("num_warps", "num_stages")}
        tiles = {k: v for k, v in tiles.items() if k.startswith("BLOCK") or k == "PRECISION"}
        for kind in kinds:
            k = dict(fused, **tiles, KIND=divergence.KIND_IDS[kind])
            yield (f"div_fused_fwd[{elt},{kind}]", divergence_fused._fused_divergence_fwd_kernel,
                   elt, _pointers(), k, launch)
            if kind in ("jsd", "tv"):
                yield (f"div_fused_sums[{elt},{kind}]",
                       divergence_fused._fused_divergence_sums_kernel, elt, _pointers(), k,
                       launch)
            yield (f"div_fused_dh[{elt},{kind}]", divergence_fused._fused_divergence_dh_kernel,
                   elt, _pointers(), dict(k, **bwd, NEED_P=True), launch)
            yield (f"div_fused_dw[{elt},{kind}]", divergence_fused._fused_divergence_dw_kernel,
                   elt, _pointers(), dict(k, **bwd, NEED_DW_P=True, NEED_DB_P=True), launch)
            if kind == "jsd":  # deterministic=True
                yield (f"div_fused_dh[{elt},{kind}]+deterministic",
                       divergence_fused._fused_divergence_dh_kernel, elt, _pointers(),
                       dict(k, **dict(bwd, ATOMIC=False), NEED_P=True), launch)
                yield (f"div_fused_dw[{elt},{kind}]+deterministic",
                       divergence_fused._fused_divergence_dw_kernel, elt, _pointers(),
                       dict(k, **dict(bwd, ATOMIC=False), NEED_DW_P=True, NEED_DB_P=True),
                       launch)
    p = _pointers(r_ptr="fp32", v_ptr="fp32", m_ptr="u8", g_ptr="fp32", cu_ptr="i64",
                  boot_ptr="fp32", trunc_ptr="u8", adv_ptr="fp32", ret_ptr="fp32")
    yield ("gae", gae._gae_kernel, "fp32", p,
           dict(HAS_MASK=True, HAS_GAMMAS=False, PACKED=False, HAS_TRUNC=True, HAS_BOOT=False,
                FIND_LAST=True, DUAL=True, BLOCK=1024), dict(num_warps=4))


# ------------------------------------------------------------------------------ the checks

# max dynamic shared memory per block (opt-in), bytes
# (sm_86 and sm_89, the A10/A40/L4/L40S/RTX GPUs: 99 KiB, the tightest of the targets)
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# Spilled bytes (spill stores + spill loads, as ptxas -v counts them; read here from the local
# memory accesses in the cubin's SASS) allowed per kernel: 0, since a spill in these kernels sits
# in the hot loop (a row loop, a tl.dot tile loop) and costs local-memory traffic per iteration.
SPILL_BUDGET_BYTES = 0
# Kernels that spill today, at their measured spills: {(arch, case): {triton: bytes}}. Each is
# the budget on that Triton (and the ptxas it bundles), so any growth fails; another Triton
# version gets the largest entry. linear_logprobs' fused kernels: bf16 64 x 128 tiles at the
# 255-register cap on sm_80; fp32 32 x 64 tiles (8 warps, 2 stages: they were 64 x 128 and
# spilled 0.1-40 KB per thread, and needed 112 KiB of shared memory on sm_86/89) a few words.
SPILL_MEASURED = {
    (80, "fused_dw[bf16]"): {"3.6": 0, "3.9": 80},
    (80, "fused_dh[fp32]"): {"3.6": 0, "3.9": 32},
    (80, "fused_dw[fp32]"): {"3.6": 16, "3.9": 0},
    # the same kernels with the extra statistics (return_stats: two more row accumulators
    # forward, two more row terms backward)
    (90, "fused_dw[bf16]+stats"): {"3.6": 0, "3.9": 24},
    (80, "fused_dw[bf16]+stats"): {"3.6": 0, "3.9": 128},
    (80, "fused_fwd[fp32]+stats"): {"3.6": 16, "3.9": 0},
    (80, "fused_dh[fp32]+stats"): {"3.6": 0, "3.9": 32},
    # deterministic=True (plain read-modify-writes and a barrier instead of atomics)
    (80, "fused_dh[bf16]+deterministic"): {"3.6": 0, "3.9": 32},
    (80, "fused_dw[bf16]+deterministic"): {"3.6": 48, "3.9": 0},
    (80, "fused_dh[fp32]+deterministic"): {"3.6": 0, "3.9": 16},
    (90, "fused_dw[bf16]+deterministic"): {"3.6": 24, "3.9": 24},
    (90, "fused_dw[fp32]+deterministic"): {"3.6": 32, "3.9": 0},
    (80, "div_fused_dh[bf16,jsd]+deterministic"): {"3.6": 64, "3.9": 72},
    (80, "div_fused_dh[fp32,jsd]+deterministic"): {"3.6": 0, "3.9": 32},
    (86, "div_fused_dh[bf16,jsd]+deterministic"): {"3.6": 48, "3.9": 40},
    (86, "div_fused_dh[fp32,jsd]+deterministic"): {"3.6": 56, "3.9": 0},
    (86, "div_fused_dw[fp32,jsd]+deterministic"): {"3.6": 0, "3.9": 112},
    # the fused divergence kernels (two live logit tiles; tiles chosen for no spills on sm_90
    # with bf16 on triton 3.6): what spills at those tiles elsewhere
    (90, "div_fused_dw[bf16,jsd]"): {"3.6": 0, "3.9": 24},
    (90, "div_fused_dw[fp32,jsd]"): {"3.6": 40, "3.9": 48},
    (80, "div_fused_dh[bf16,alpha]"): {"3.6": 64, "3.9": 312},
    (80, "div_fused_dh[bf16,forward_kl]"): {"3.6": 16, "3.9": 176},
    (80, "div_fused_dh[bf16,jsd]"): {"3.6": 80, "3.9": 304},
    (80, "div_fused_dh[bf16,reverse_kl]"): {"3.6": 16, "3.9": 168},
    (80, "div_fused_dh[bf16,tv]"): {"3.6": 16, "3.9": 200},
    (80, "div_fused_dh[fp32,jsd]"): {"3.6": 0, "3.9": 128},
    (80, "div_fused_dw[bf16,alpha]"): {"3.6": 48, "3.9": 144},
    (80, "div_fused_dw[bf16,forward_kl]"): {"3.6": 0, "3.9": 128},
    (80, "div_fused_dw[bf16,jsd]"): {"3.6": 0, "3.9": 128},
    (80, "div_fused_dw[bf16,reverse_kl]"): {"3.6": 0, "3.9": 96},
    (80, "div_fused_dw[bf16,tv]"): {"3.6": 0, "3.9": 128},
    (80, "div_fused_dw[fp32,jsd]"): {"3.6": 968, "3.9": 1364},
    (80, "div_fused_fwd[fp32,jsd]"): {"3.6": 32, "3.9": 16},
    (80, "div_fused_sums[fp32,jsd]"): {"3.6": 32, "3.9": 0},
    # sm_86 and sm_89: the fused divergence's gradient kernels spill a few words there too
    (86, "div_fused_dh[bf16,forward_kl]"): {"3.6": 32, "3.9": 64},
    (86, "div_fused_dw[bf16,forward_kl]"): {"3.6": 0, "3.9": 8},
    (86, "div_fused_dh[bf16,reverse_kl]"): {"3.6": 24, "3.9": 24},
    (86, "div_fused_dh[bf16,jsd]"): {"3.6": 16, "3.9": 152},
    (86, "div_fused_dw[bf16,jsd]"): {"3.6": 48, "3.9": 64},
    (86, "div_fused_dh[bf16,tv]"): {"3.6": 32, "3.9": 64},
    (86, "div_fused_dh[bf16,alpha]"): {"3.6": 32, "3.9": 64},
    (86, "div_fused_dw[fp32,jsd]"): {"3.6": 20, "3.9": 0},
}


def _spill_budget(arch: int, name: str) -> int:
    # sm_89 compiles these kernels to the same register allocation as sm_86 (measured)
    measured = SPILL_MEASURED.get((86 if arch == 89 else arch, name))
    if measured is None:
        return SPILL_BUDGET_BYTES
    version = ".".join(triton.__version__.split(".")[:2])
    return measured.get(version, max(measured.values()))


_LOCAL_ACCESS = re.compile(r"\b(STL|LDL)((?:\.[A-Z0-9]+)*)\s")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def _cuobjdump() -> str:
    tool = getattr(knobs.nvidia, "cuobjdump", None)
    path = getattr(tool, "path", None)
    if not path:
        raise RuntimeError("no cuobjdump: cannot read registers and spills from the cubin")
    return path


def _resources(cubin: bytes) -> dict:
    """Registers, stack frame, local memory and spilled bytes of the cubin's kernel, read from
    the cubin itself (Triton's metadata has n_regs/n_spills only after loading on a GPU)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    res = {key.lower(): int(val) for key, val in
           re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage.split("Function", 1)[-1])}
    if len(res) != 3 or "Function :" not in sass:  # never pass on output we cannot read
        raise RuntimeError(f"unreadable cuobjdump output:\n{usage[-500:]}\n{sass[:500]}")
    spill = {"STL": 0, "LDL": 0}  # bytes of local-memory stores / loads, as ptxas -v counts
    for op, mods in _LOCAL_ACCESS.findall(sass):
        spill[op] += next((_WIDTH[m] for m in mods.split(".") if m in _WIDTH), 4)
    res["spill_stores"], res["spill_loads"] = spill["STL"], spill["LDL"]
    return res


def _undivisible(ttir: str, args: dict, constexprs: dict) -> list[str]:
    """Arguments that are aligned pointers or multiples of 16 but lack tt.divisibility = 16 in
    the compiled TTIR: the compile would not be the aligned program that runs."""
    head = next((line for line in ttir.splitlines() if "tt.func public" in line), "")
    missing = []
    for name, value in args.items():
        if name in constexprs:
            continue
        if isinstance(value, AlignedPointer) or (type(value) is int and value % 16 == 0):
            m = re.search(rf"%{name}: [^%]*", head)
            if m is None or "tt.divisibility = 16" not in m.group(0):
                missing.append(name)
    return missing


def _compile_one(arch: int, name: str, fn, elt: str, pointers: dict, constexprs: dict,
                 launch: dict) -> tuple[bool, str]:
    gone = sorted(set(constexprs) - set(fn.arg_names))
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    args = _example_args(fn, elt, pointers, constexprs)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, consts, attrs, options = _specialize(fn, backend, args, launch)
    out = triton_compile(ASTSource(fn, signature, consts, attrs), target=target,
                         options=options.__dict__)
    problems = [f"case sets {k}, which the kernel no longer takes (ignored)" for k in gone]
    ok = True
    if "cubin" not in out.asm:
        return False, "NO CUBIN"
    shared = out.metadata.shared
    if shared > SHARED_LIMIT[arch]:
        ok = False
        problems.append(f"shared memory {shared} B > {SHARED_LIMIT[arch]} B")
    missing = _undivisible(out.asm["ttir"], args, constexprs)
    if missing:
        ok = False
        problems.append(f"compiled without tt.divisibility on {', '.join(missing)}")
    ordered = re.findall(r"\b(?:atom|red)\.[\w.]*\.(?:acq_rel|acquire|release)\.[\w.]+",
                         out.asm["ptx"])
    if ordered:  # the gradient sums need no ordering; an ordered atomic fences every add
        ok = False
        problems.append(f"ordered atomics {sorted(set(ordered))}: use sem='relaxed'")
    res = _resources(out.asm["cubin"])
    spilled = res["spill_stores"] + res["spill_loads"]
    budget = _spill_budget(arch, name)
    if spilled > budget:
        ok = False
        problems.append(f"spills {spilled} B > budget {budget} B")
    line = (f"shared {shared / 1024:5.1f} KiB  regs {res['reg']:3d}  "
            f"stack {res['stack']} B  local {res['local']} B  "
            f"spill st/ld {res['spill_stores']}/{res['spill_loads']} B")
    return ok, line + "".join(f"\n    {p}" for p in problems)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                        help="SM version (default 90)")
    args = parser.parse_args(argv)
    failures = 0
    for arch in args.arch or [90]:
        for name, fn, elt, pointers, constexprs, launch in _cases():
            start = time.perf_counter()
            try:
                ok, line = _compile_one(arch, name, fn, elt, pointers, constexprs, launch)
            except Exception as err:  # report every kernel, then fail
                ok, line = False, f"FAILED: {type(err).__name__}: {err}"[:2000]
            failures += not ok
            print(f"sm_{arch} {name:<20} {'ok  ' if ok else 'FAIL'} {line} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"triton {triton.__version__}: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
