"""The patch encoder in one Triton kernel: ``relu(patchify(x) @ W + bias)``, read from the image in place.

The torch backend encodes with a patch copy (reshape + permute + reshape of the whole input), one ``addmm`` and
a ReLU, after casting the input to the compute precision: four passes over memory and four kernels before the
first hidden layer, the same for the sparse model and its dense twin. At batch 65,536 in bf16 they were a third
of the sparse model's time (docs/gpu.md), at batch 1 four of the ten kernels of a graph replay. Here each program
loads the pixels of one patch for a block of images straight from the (N, C, H, W) input, converts them in
registers (float32 input, any compute precision), multiplies them by the [C*p*p, ch] weight on the tensor cores
(fp32 accumulation; TF32 where allowed), adds the bias, applies ReLU and writes the patch's ch features into the
patch-major feature row (``formats.encoder``'s layout). One launch, one read of the image.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from g2gserve.runtime.triton_kernel import DTYPES, INTERPRETED, MIN_TILE, SIGNATURE_DTYPES, aot_compile

MAX_PATCH_VALUES = 256  # C*p*p padded to a power of two: one dot per patch and block of images (RGB 8x8: 192)
MAX_ROWS = 64  # images per program


@triton.jit
def _patch_encoder_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, n_rows, stride_x, stride_y,
                          HW: tl.constexpr, WIDTH: tl.constexpr, P: tl.constexpr, GRID: tl.constexpr,
                          CH: tl.constexpr, Q: tl.constexpr, QP: tl.constexpr, BLOCK_N: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    block = tl.program_id(0)
    patch = tl.program_id(1)
    py = patch // GRID
    px = patch % GRID
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    q = tl.arange(0, QP)  # the patch's values in (channel, row, column) order, padded to QP
    pixel = (q // (P * P)) * HW + (py * P + (q % (P * P)) // P) * WIDTH + px * P + q % P
    row_ok = rows[:, None] < n_rows
    a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + pixel[None, :],
                mask=row_ok & (q[None, :] < Q), other=0.0)
    a = a.to(w_ptr.dtype.element_ty)  # the input's cast to the compute precision, in registers
    ch = tl.arange(0, CH)
    w = tl.load(w_ptr + q[:, None] * CH + ch[None, :], mask=q[:, None] < Q, other=0.0)
    if UPCAST:  # the interpreter multiplies bf16 wrongly; bf16 x bf16 products are exact in fp32 anyway
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    acc = tl.dot(a, w, input_precision=PRECISION)
    acc = tl.maximum(acc + tl.load(bias_ptr + ch).to(tl.float32)[None, :], 0.0)
    y = y_ptr + rows[:, None].to(tl.int64) * stride_y + patch * CH + ch[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


def supports(patch_values: int, channels: int) -> bool:
    """Encoders the kernel takes: ch a power of two >= 16 (tl.dot's N), C*p*p at most ``MAX_PATCH_VALUES``."""
    return channels >= MIN_TILE and channels & (channels - 1) == 0 and 0 < patch_values <= MAX_PATCH_VALUES


def rows_per_program(n_rows: int) -> int:
    return min(MAX_ROWS, max(MIN_TILE, triton.next_power_of_2(n_rows)))


def patch_encode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, patch: int, allow_tf32: bool = False,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C, H, W) images (float32, or the compute precision) -> (N, (H/p)^2 * ch) features in the dtype of
    ``weight`` [C*p*p, ch] and ``bias`` [ch] (fp32, bf16 or fp16): ``formats.encoder.encode`` in one launch."""
    if x.dim() != 4 or x.shape[2] != x.shape[3] or x.shape[2] % patch:
        raise ValueError(f"expected square (N, C, H, W) images in whole {patch}x{patch} patches, got {tuple(x.shape)}")
    q, ch = weight.shape
    if q != x.shape[1] * patch * patch or bias.shape != (ch,):
        raise ValueError(f"encoder weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit "
                         f"{x.shape[1]}-channel {patch}x{patch} patches")
    if not supports(q, ch):
        raise ValueError(f"the encoder kernel needs a power-of-two channel count >= {MIN_TILE} and at most "
                         f"{MAX_PATCH_VALUES} values per patch; got {ch} channels, {q} values")
    if weight.dtype not in DTYPES or bias.dtype != weight.dtype or x.dtype not in (torch.float32, weight.dtype):
        raise ValueError(f"weight and bias must share one of {DTYPES}, the images be float32 or that dtype; got "
                         f"{x.dtype}, {weight.dtype}, {bias.dtype}")
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError("the Triton kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    n, size = x.shape[0], x.shape[2]
    grid = size // patch
    if out is None:
        out = torch.empty(n, grid * grid * ch, dtype=weight.dtype, device=x.device)
    if n == 0:
        return out
    block_n = rows_per_program(n)
    tf32 = allow_tf32 and weight.dtype == torch.float32
    _patch_encoder_kernel[(triton.cdiv(n, block_n), grid * grid)](
        x, weight, bias, out, n, x.stride(0), out.stride(0), HW=size * size, WIDTH=size, P=patch, GRID=grid,
        CH=ch, Q=q, QP=triton.next_power_of_2(q), BLOCK_N=block_n, PRECISION="tf32" if tf32 else "ieee",
        UPCAST=INTERPRETED and weight.dtype == torch.bfloat16, num_warps=4)
    return out


def compile_for(capability: int, dtype: torch.dtype, block_n: int = MAX_ROWS, channels: int = 32, size: int = 28,
                patch: int = 7, in_channels: int = 1, allow_tf32: bool = False):
    """The kernel compiled ahead of time (``triton_kernel.aot_compile``) for float32 images in; the default shape is
    the Fashion-MNIST G2GNet's encoder."""
    t = SIGNATURE_DTYPES[dtype]
    q = in_channels * patch * patch
    signature = {"x_ptr": "*fp32", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "y_ptr": f"*{t}", "n_rows": "i32",
                 "stride_x": "i32", "stride_y": "i32"}
    constants = {"HW": size * size, "WIDTH": size, "P": patch, "GRID": size // patch, "CH": channels, "Q": q,
                 "QP": triton.next_power_of_2(q), "BLOCK_N": block_n,
                 "PRECISION": "tf32" if allow_tf32 and dtype == torch.float32 else "ieee", "UPCAST": False}
    # pointers 16-byte aligned and row strides multiples of 16 elements, as the JIT specialises them on launch
    aligned = ("x_ptr", "w_ptr", "bias_ptr", "y_ptr", "stride_x", "stride_y")
    return aot_compile(_patch_encoder_kernel, signature, constants, aligned, capability, warps=4, stages=1)
