"""A fused block-sparse layer in Triton: ``y = relu(x @ W + bias)`` over the live tiles only, one launch.

The torch backend's block layer gathers, for every output tile-row, a copy of its K live input tiles and then
runs a batched matmul: at large batches it moves K times the input through memory before any arithmetic. This
kernel reads the live input tiles *in place*: each program owns one b-wide output tile for a block of batch
rows, loops over that tile-row's K live input tiles (``idx``), accumulates ``x_tile @ w_tile`` in fp32 on the
tensor cores, adds the bias, applies ReLU and stores the tile once.

Plain tensors in, so any owner of the packed weights can call it: ``blocks`` [O, K*b, b] (tile k of row o is
``blocks[o, k*b:(k+1)*b]``, an (in, out) matrix), ``idx`` [O, K] (input tile numbers), ``bias`` [O*b].
Precisions: fp32 (exact fp32 products, or TF32 tensor cores with ``allow_tf32``), bf16 and fp16 weights and
activations; the accumulator is always fp32.

Runs on CUDA tensors; on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` set before this
module is imported: ``triton.jit`` reads it when the kernel is defined), which the CPU tests use.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_TILE = 16  # tl.dot needs every dimension >= 16
GROUP = 8  # batch blocks that run tile after tile together, so their inputs and the tile's weights stay in L2


@triton.jit
def _block_sparse_kernel(x_ptr, w_ptr, idx_ptr, bias_ptr, y_ptr, n_rows, n_tiles, stride_x, stride_y,
                         K: tl.constexpr, B: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                         RELU: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SWAP: tl.constexpr):
    # Program order: GROUP batch blocks for output tile 0, the same blocks for tile 1, ... (swizzled like
    # Triton's matmul tutorial) so a wave of programs shares both its input rows and its weight tiles in L2.
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n_rows, BLOCK_N)
    per_group = GROUP * n_tiles
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_blocks - first, GROUP)
    block = first + (pid % per_group) % size
    tile = (pid % per_group) // size

    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, B)
    row_ok = rows[:, None] < n_rows
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :]
    w_tile0 = w_ptr + tile.to(tl.int64) * (K * B * B)
    if SWAP:  # the transposed tile, W^T x^T: batch rows are the MMA's wide side (Hopper: m64 x n256, not n64)
        w_tiles = w_tile0 + cols[None, :] * B + cols[:, None]  # element (out, in) of W^T
        acc = tl.zeros((B, BLOCK_N), dtype=tl.float32)
    else:
        w_tiles = w_tile0 + cols[:, None] * B + cols[None, :]
        acc = tl.zeros((BLOCK_N, B), dtype=tl.float32)
    for k in range(K):
        src = tl.load(idx_ptr + tile * K + k).to(tl.int64)
        a = tl.load(x_rows + src * B, mask=row_ok, other=0.0)
        w = tl.load(w_tiles + k * B * B)
        if UPCAST:  # the interpreter multiplies bf16 wrongly; bf16 x bf16 products are exact in fp32 anyway
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP:
            acc = tl.dot(w, tl.trans(a), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if SWAP:
        acc = tl.trans(acc)  # back to (rows, out): one epilogue for both
    acc += tl.load(bias_ptr + tile * B + cols).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y = y_ptr + rows[:, None].to(tl.int64) * stride_y + tile * B + cols[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


def supports(block_size: int) -> bool:
    """Tile sizes the kernel handles: powers of two of at least 16 (tl.dot's smallest shape)."""
    return block_size >= MIN_TILE and block_size & (block_size - 1) == 0


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


# Launch settings per precision measured on a GPU by ``python -m g2gserve.bench.triton_tune --write`` (which
# names the machine); without the file, the defaults below (a starting point, not a tuned table).
TUNED_PATH = Path(__file__).with_name("triton_tuned.json")
MAX_ROWS = 128  # rows per program without a measured setting


@functools.lru_cache(maxsize=None)
def tuned_launch(precision: str) -> dict | None:
    """The measured {block_n, warps, stages[, swap]} for ``precision`` (fp32, tf32, bf16, fp16; fp16 falls back to
    bf16's, which moves the same bytes), or None."""
    try:
        table = json.loads(TUNED_PATH.read_text())["best"]
    except (OSError, ValueError, KeyError):
        return None
    return table.get(precision) or table.get({"fp16": "bf16"}.get(precision, ""))


def launch_config(n_rows: int, n_tiles: int, block_size: int, multiprocessors: int = 1,
                  precision: str = "fp32", launch: dict | None = None) -> tuple[int, int, int, bool]:
    """(batch rows per program, warps, pipeline stages, swap). Large batches take the measured setting of
    ``precision`` (``launch`` overrides it); fewer rows per program where the grid would otherwise leave
    multiprocessors idle (mid-size batches of narrow layers), down to 16 (tl.dot's smallest). ``swap``: programs
    compute the transposed tile (W^T x^T), where the measured setting says so; the layout and the arithmetic
    are the same, only the MMA's shape differs."""
    best = launch or tuned_launch(precision)
    block_n = min(best["block_n"] if best else MAX_ROWS, max(MIN_TILE, triton.next_power_of_2(n_rows)))
    while block_n > MIN_TILE and n_tiles * triton.cdiv(n_rows, block_n) < 2 * multiprocessors:
        block_n //= 2
    return (block_n, *program_settings(block_n, block_size, best), bool(best and best.get("swap", False)))


def program_settings(block_n: int, block_size: int, best: dict | None) -> tuple[int, int]:
    """(warps, stages) for programs of ``block_n`` rows: the measured ones at the measured row count, else
    8 warps from 128 x 128 accumulator elements on and 3 stages."""
    if best and block_n == best["block_n"]:
        return best["warps"], best["stages"]
    return (8 if block_n * block_size >= 128 * 128 else 4), 3


def precision_name(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if allow_tf32 and dtype == torch.float32 else SIGNATURE_DTYPES[dtype]


def block_sparse_linear(x: torch.Tensor, blocks: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor,
                        relu: bool = True, allow_tf32: bool = False, out: torch.Tensor | None = None,
                        launch: dict | None = None) -> torch.Tensor:
    """(N, I*b) -> (N, O*b): ``relu(x @ W + bias)`` for the block-sparse W of ``blocks``/``idx``, one launch.

    ``x``, ``blocks`` and ``bias`` share one dtype (fp32, bf16 or fp16); the output has it too. ``allow_tf32``
    lets fp32 products use TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation). ``launch``
    ({block_n, warps, stages[, swap]}) replaces the tuned launch setting: for the tuning sweep.
    """
    n_out, kb, b = blocks.shape
    k = kb // b
    if x.dim() != 2 or kb != k * b or idx.shape != (n_out, k) or bias.numel() != n_out * b:
        raise ValueError(f"shapes do not fit a block-sparse layer: x {tuple(x.shape)}, blocks {tuple(blocks.shape)}, "
                         f"idx {tuple(idx.shape)}, bias {tuple(bias.shape)}")
    if not supports(b):
        raise ValueError(f"block size {b} is not supported (a power of two >= {MIN_TILE})")
    if x.dtype not in DTYPES or blocks.dtype != x.dtype or bias.dtype != x.dtype:
        raise ValueError(f"x, blocks and bias must share one of {DTYPES}; got {x.dtype}, {blocks.dtype}, {bias.dtype}")
    if x.shape[1] % b:
        raise ValueError(f"input width {x.shape[1]} is not a multiple of the block size {b}")
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError("the Triton kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    x = x if x.stride(1) == 1 else x.contiguous()
    blocks, idx, bias = blocks.contiguous(), idx.contiguous(), bias.contiguous()
    n = x.shape[0]
    if out is None:
        out = torch.empty(n, n_out * b, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    name = precision_name(x.dtype, allow_tf32)
    block_n, warps, stages, swap = launch_config(n, n_out, b, _multiprocessors(x.device), name, launch)
    grid = (n_out * triton.cdiv(n, block_n),)
    precision = "tf32" if name == "tf32" else "ieee"
    _block_sparse_kernel[grid](x, blocks, idx, bias, out, n, n_out, x.stride(0), out.stride(0),
                               K=k, B=b, BLOCK_N=block_n, GROUP=GROUP, RELU=relu, PRECISION=precision,
                               UPCAST=INTERPRETED and x.dtype == torch.bfloat16, SWAP=swap,
                               num_warps=warps, num_stages=stages)
    return out


SIGNATURE_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# Arguments the JIT specialises as multiples of 16 when launched on our tensors (16-byte aligned storage, widths
# that are multiples of the tile): the ahead-of-time compile assumes the same, or it would show narrow,
# unpipelined loads that the GPU never runs.
ALIGNED_ARGS = ("x_ptr", "w_ptr", "idx_ptr", "bias_ptr", "y_ptr", "stride_x", "stride_y")
# (dtype, allow_tf32) of every precision the kernels run: fp32, tf32, bf16, fp16
PRECISIONS = ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.float16, False))


def aot_compile(kernel, signature: dict, constants: dict, aligned: tuple[str, ...], capability: int, warps: int,
                stages: int):
    """Compile a Triton ``kernel`` ahead of time for an NVIDIA GPU of compute ``capability`` (90: H100/H200), no
    GPU needed (Triton ships ptxas), with the ``aligned`` arguments specialised as multiples of 16 as the JIT
    does: catches what only the GPU compiler refuses, and shows the instructions."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("ahead-of-time compilation needs the compiled kernel: unset TRITON_INTERPRET")
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    source = ASTSource(fn=kernel, signature=signature | {name: "constexpr" for name in constants},
                       constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": warps, "num_stages": stages})


def compile_for(capability: int, dtype: torch.dtype, k: int, b: int, block_n: int, allow_tf32: bool = False,
                swap: bool = False, launch: dict | None = None):
    """The block-sparse kernel compiled ahead of time (``aot_compile``) at the launch setting it would run with."""
    t = SIGNATURE_DTYPES[dtype]
    signature = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "idx_ptr": "*i32", "bias_ptr": f"*{t}", "y_ptr": f"*{t}",
                 "n_rows": "i32", "n_tiles": "i32", "stride_x": "i32", "stride_y": "i32"}
    constants = {"K": k, "B": b, "BLOCK_N": block_n, "GROUP": GROUP, "RELU": True,
                 "PRECISION": "tf32" if allow_tf32 and dtype == torch.float32 else "ieee", "UPCAST": False,
                 "SWAP": swap}
    warps, stages = program_settings(block_n, b, launch or tuned_launch(precision_name(dtype, allow_tf32)))
    return aot_compile(_block_sparse_kernel, signature, constants, ALIGNED_ARGS, capability, warps, stages)


def compile_report(capability: int = 90, b: int = 64, k: int = 4) -> list[dict]:
    """For every precision, the smallest rows per program, the default largest and the measured one, and the
    swapped tile at 256 rows and 4 warps (``kernel`` "block"), and the patch encoder's kernel at 16 and 64 images
    per program (``kernel`` "encoder"): does the kernel compile, which MMA it issues (``mma``: the tensor
    cores; ``wgmma``: Hopper's, with its shape, e.g. m64n256k16), are its loads asynchronous and pipelined
    (``cp.async``), does it spill registers to local memory, how much shared memory."""
    rows = []
    for dtype, tf32 in PRECISIONS:
        tuned = tuned_launch(precision_name(dtype, tf32))
        variants = [(n, False, None) for n in sorted({MIN_TILE, MAX_ROWS, tuned["block_n"] if tuned else MAX_ROWS})]
        variants.append((256, True, {"block_n": 256, "warps": 4, "stages": 3}))
        for block_n, swap, launch in variants:
            compiled = compile_for(capability, dtype, k, b, block_n, tf32, swap, launch)
            rows.append({"kernel": "block", "dtype": "tf32" if tf32 else SIGNATURE_DTYPES[dtype], "block_n": block_n,
                         "swap": swap, **_ptx_facts(compiled)})
    from g2gserve.runtime import triton_encoder  # imports this module: not at the top
    for dtype, tf32 in PRECISIONS:
        for block_n in (MIN_TILE, triton_encoder.MAX_ROWS):
            compiled = triton_encoder.compile_for(capability, dtype, block_n, allow_tf32=tf32)
            rows.append({"kernel": "encoder", "dtype": "tf32" if tf32 else SIGNATURE_DTYPES[dtype],
                         "block_n": block_n, "swap": False, **_ptx_facts(compiled)})
    return rows


def _ptx_facts(compiled) -> dict:
    ptx = compiled.asm["ptx"]
    shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    return {"tensor_cores": "mma" in ptx, "wgmma": ",".join(shapes), "async_loads": "cp.async" in ptx,
            "spills": "ld.local" in ptx, "shared_bytes": compiled.metadata.shared}


if __name__ == "__main__":
    import sys

    print(json.dumps(compile_report(int(sys.argv[1]) if len(sys.argv) > 1 else 90), indent=1))
