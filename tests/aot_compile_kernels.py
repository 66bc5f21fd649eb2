"""Compile every Triton kernel ahead of time for a GPU target, on a machine without a GPU.

The CPU interpreter checks what the kernels compute but not whether the GPU compiler accepts
them (types carried through loops, tl.dot shapes and dtypes, wgmma lowering). This script runs
the real compiler down to a cubin for sm_90 (and sm_80), for the configurations the launchers
use. Run it without TRITON_INTERPRET:  python tests/aot_compile_kernels.py [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the compiler")

import triton  # noqa: E402
from prefkern._kernels import gae, linear_logprobs_fused, logits_slice  # noqa: E402
from prefkern._kernels import logprobs_from_logits as logits_kernels  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402


def _sig(fn, types: dict, constexprs: dict) -> dict:
    """Signature in argument order: pointers/scalars from ``types``, the rest constexpr."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types[name]
    return sig


ROW = {"targets_ptr": "*i64", "y_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
       "ent_ptr": "*fp32", "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32", "g_lse_ptr": "*fp32",
       "gl_ptr": "*fp32", "ge_ptr": "*fp32", "gs_ptr": "*fp32", "logp_ptr": "*fp32",
       "m_ptr": "*fp32", "s_ptr": "*fp32", "u_ptr": "*fp32", "zy_ptr": "*fp32",
       "part_ptr": "*fp32", "acc_ptr": "*fp32", "db_ptr": "*fp32"}
INTS = ("stride_outer", "stride_inner", "stride_row", "stride_grad_row", "stride_h", "stride_w")
I32 = ("inner", "V", "C", "col0", "N", "H", "ignore_index", "cols_per_split", "rows_per_split",
       "row0", "row1", "seq_len")
F32 = ("inv_temp", "softcap", "gamma", "lam", "lam_critic")


def _types(elt: str, **extra) -> dict:
    types = dict(ROW)
    types.update({k: "i64" for k in INTS})
    types.update({k: "i32" for k in I32})
    types.update({k: "fp32" for k in F32})
    types.update(extra)
    return types


def _cases():
    grads = dict(HAS_G_LOGP=True, HAS_G_ENT=True)
    for elt in ("bf16", "fp32"):
        t = _types(elt, logits_ptr=f"*{elt}", grad_ptr=f"*{elt}", raw_ptr=f"*{elt}",
                   h_ptr=f"*{elt}", w_ptr=f"*{elt}", b_ptr=f"*{elt}", col1="i32")
        yield (f"logprobs_fwd[{elt}]", logits_kernels._logprobs_fwd_kernel, t,
               dict(WITH_ENTROPY=True, BLOCK_V=4096), 8)
        yield (f"logprobs_bwd[{elt}]", logits_kernels._logprobs_bwd_kernel, t,
               dict(BLOCK_V=4096, **grads), 8)
        yield (f"slice_stats[{elt}]", logits_slice._slice_stats_kernel, t,
               dict(SOFTCAP=True, BLOCK=4096), 8)
        yield (f"slice_grad[{elt}]", logits_slice._slice_grad_kernel, t,
               dict(SOFTCAP=True, BLOCK=4096, HAS_G_LSE=True, **grads), 8)
        fused = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, DOT_FP32=False,
                     PRECISION="ieee" if elt == "fp32" else "tf32", HAS_BIAS=True, SOFTCAP=True)
        yield (f"fused_fwd[{elt}]", linear_logprobs_fused._fused_fwd_kernel, t, fused, 8)
        bwd = dict(fused, HAS_G_LSE=True, ATOMIC=True, **grads)
        yield (f"fused_dh[{elt}]", linear_logprobs_fused._fused_dh_kernel, t, bwd, 8)
        yield (f"fused_dw[{elt}]", linear_logprobs_fused._fused_dw_kernel, t,
               dict(bwd, NEED_DW=True, NEED_DB=True), 8)
    t = _types("fp32", r_ptr="*fp32", v_ptr="*fp32", m_ptr="*u8", g_ptr="*fp32",
               cu_ptr="*i64", boot_ptr="*fp32", trunc_ptr="*u8", adv_ptr="*fp32",
               ret_ptr="*fp32")
    yield ("gae", gae._gae_kernel, t,
           dict(HAS_MASK=True, HAS_GAMMAS=False, PACKED=False, HAS_TRUNC=True, HAS_BOOT=False,
                FIND_LAST=True, DUAL=True, BLOCK=1024), 4)


# max dynamic shared memory per block (opt-in), bytes
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                        help="SM version (default 90)")
    args = parser.parse_args(argv)
    failures = 0
    for arch in args.arch or [90]:
        for name, fn, types, constexprs, warps in _cases():
            start = time.perf_counter()
            try:
                src = ASTSource(fn=fn, signature=_sig(fn, types, constexprs), constexprs=constexprs)
                out = triton_compile(src, target=GPUTarget("cuda", arch, 32),
                                     options={"num_warps": warps})
                ok = "cubin" in out.asm and out.metadata.shared <= SHARED_LIMIT[arch]
                print(f"sm_{arch} {name:<22} {'ok' if ok else 'NO CUBIN / SMEM'} "
                      f"shared {out.metadata.shared // 1024} KiB "
                      f"({time.perf_counter() - start:.1f} s)")
                failures += not ok
            except Exception as err:  # report every kernel, then fail
                failures += 1
                print(f"sm_{arch} {name:<22} FAILED: {type(err).__name__}: {err}"[:2000])
    print(f"triton {triton.__version__}: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
