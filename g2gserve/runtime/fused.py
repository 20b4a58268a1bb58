"""The ``fused`` CPU backend: the whole packed network as one compiled function (numba).

Why: at small batches a block-sparse layer's arithmetic is tiny, and onnxruntime and torch spend as
long on the ~10 small ops around each batched matmul (gather, reshapes, transposes, bias, ReLU) and
on intermediate tensors as on the matmul itself; at large batches what counts is how close each
multiply-add runs to the machine's peak. Here one ``@njit`` function runs the encoder, every layer and
the head, and every one of them is the same loop over *panels*:

* a layer's weights are stored, per output tile, as panels of ``Isa.panel`` output units: for each live
  input unit the panel holds those units' weights side by side ([k*t_in, panel], zero-padded past the
  tile's end), so a panel is one sequential stream and no input is ever gathered or copied;
* up to ``Isa.max_rows`` rows at a time, a micro-kernel written directly in LLVM IR (``_micro_kernel``)
  keeps the rows x panel sums in vector registers and, per input unit, loads the panel row, broadcasts
  each row's input value and issues one fused multiply-add per sum vector: the layout of a tuned GEMM
  micro-kernel, with no horizontal sums and no C compiler (numba's LLVM compiles it for the CPU it runs on);
* bias and ReLU are applied as the sums are written out.

The vector width and register blocking (``ISAS``) are chosen once, at load, for the CPU (``host_isa``):
16-float vectors and a 12 x 32 tile where AVX-512 is present (32 vector registers; output tiles of 64 as one
6 x 64 panel), 8-float vectors and
6 x 16 on AVX2 (16 registers), 4-float vectors elsewhere (SSE, Arm NEON). With ``threads`` > 1 the threads
claim the panels (and, where there are few, the row chunks) of every layer from shared counters, in one
parallel region (``_share``).
``precision="bf16"`` (AVX512-BF16 only) stores the panels as bfloat16 pairs and runs ``vdpbf16ps``
(two products per lane, fp32 sums): the activations are rounded to bf16 on their way into each layer.
``precision="int8"`` (AVX512-VNNI only) stores int8 quads with a scale per output unit and runs
``vpdpbusd`` (four products per lane, int32 sums) on inputs staged as uint8 with a scale and zero point
per row; with ``activation_scales`` (calibrated at export: ``g2gserve.export.calibration``) each layer's epilogue
writes the next layer's uint8 inputs itself at a static scale, and that staging pass disappears. At both
precisions the encoder stays fp32 (see ``FusedNet``).

Only live tiles are stored and read, so compute and memory traffic shrink with the density. Dense
layers (the head, every layer of the dense twin) are panels over one input tile spanning all inputs,
so sparse and dense run on the same kernel. CSR layers run densified. The encoder's patch conv reads
the image itself: each patch is an output tile whose live input tiles are its rows of pixels, all
patches sharing one set of weights, so no patch is copied out (at batch 64 the copy cost ~40 us).
The first call compiles (seconds per variant); numba caches the machine code on disk for later processes.
"""
from __future__ import annotations

import functools
import mmap
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from g2gserve.formats import PackedLayer, PackedNet

import numba  # imported only when the fused backend is asked for (runtime.load imports this module lazily)
from llvmlite import binding as llvm, ir  # numba's own code generator
from numba import prange
from numba.core import cgutils, types
from numba.extending import intrinsic


@dataclass(frozen=True)
class Isa:
    """One micro-kernel shape: ``vec``-float vectors, ``vectors`` of them per panel row (panel =
    vec * vectors output units), up to ``max_rows`` rows per call, so rows * vectors sums live in
    registers; ``chains`` is how many independent FMA chains hide the FMA latency (few rows: the
    inputs are split over several sets of sums). ``wide``: output tiles that are a multiple of two panels get
    *wide* panels, twice as many outputs (2 * vectors vectors, up to max_rows / 2 rows per call, the same number of
    sums); up to ``wide_pair_rows`` rows two wide panels run in one call, each reading its own input tiles."""
    name: str
    vec: int
    vectors: int
    max_rows: int
    chains: int
    wide: bool = False
    wide_pair_rows: int = 0

    @property
    def panel(self) -> int:
        return self.vec * self.vectors


ISAS = {
    # 32 zmm: 24 sums + 2 weight vectors + 1 broadcast; wide (6 x 64): 24 + 4 + 1; two wide at 2 rows: 16 + 8 + 2
    "avx512": Isa("avx512", 16, 2, 12, 16, wide=True, wide_pair_rows=2),
    "avx2": Isa("avx2", 8, 2, 6, 10),        # 16 ymm: 12 sums + 2 + 1
    "generic": Isa("generic", 4, 2, 6, 10),  # 128-bit vectors, which every 64-bit CPU has (SSE2, NEON)
}
PRECISIONS = ("fp32", "bf16", "int8")
PREFETCH_BYTES = 4096  # how far ahead of the panel row being read the kernel prefetches (see _emit_kernel)


def host_features() -> set[str]:
    """The CPU features LLVM sees on this machine (what numba compiles for)."""
    try:
        return {name for name, on in llvm.get_host_cpu_features().items() if on}
    except RuntimeError:  # LLVM cannot list them on some hosts: assume nothing
        return set()


def host_isa(features: set[str] | None = None) -> str:
    """The widest ``ISAS`` entry this CPU runs natively."""
    features = host_features() if features is None else features
    if "avx512f" in features:
        return "avx512"
    if {"avx2", "fma"} <= features:
        return "avx2"
    return "generic"


def supported(isa: str, precision: str, features: set[str] | None = None) -> bool:
    """Whether this CPU can run ``isa`` at ``precision`` (every ISA's shape runs on a wider CPU; bf16 needs
    AVX512-BF16, int8 AVX512-VNNI)."""
    features = host_features() if features is None else features
    order = ("generic", "avx2", "avx512")
    native = order.index(isa) <= order.index(host_isa(features))
    needs = {"fp32": set(), "bf16": {"avx512bf16"}, "int8": {"avx512vnni"}}[precision]
    return native and (precision == "fp32" or (isa == "avx512" and needs <= features))


def describe(isa: str | None = None, precision: str = "fp32", threads: int = 1) -> dict:
    """The micro-kernel that ``FusedNet(..., isa, precision, threads)`` runs on this CPU, as a benchmark records it."""
    spec = ISAS[host_isa() if isa is None else isa]
    tile = f"{spec.max_rows} x {spec.panel} tile" + (f", wide {spec.max_rows // 2} x {2 * spec.panel}" if spec.wide else "")
    return {"isa": spec.name, "vector_floats": spec.vec, "tile_rows": spec.max_rows, "tile_columns": spec.panel,
            "tile": tile, "precision": precision, "threads": threads, "cpu": llvm.get_host_cpu_name(),
            "bf16_available": supported("avx512", "bf16"), "int8_available": supported("avx512", "int8")}


_F32, _I32, _I16, _I8 = ir.FloatType(), ir.IntType(32), ir.IntType(16), ir.IntType(8)
_FAST = ("fast",)  # lets LLVM fuse the multiply and add into one FMA where the CPU has it


VARIANTS = tuple((isa, precision) for isa in ISAS for precision in PRECISIONS
                 if precision == "fp32" or isa == "avx512")
# The compiled micro-kernels (isa, precision, vectors per panel, panels per call, input streams): every variant at its
# full tile;
# narrow (one vector of outputs per panel) for layers with at most one vector of outputs, the head of a 10-class
# model: a 32-wide panel there would read and multiply three times its 10 live columns (the head's padding was 3% of
# the sparse model's weight bytes); and paired (two panels side by side, up to half the rows) for few rows, where a
# panel's fixed costs (the call, its tile loop, the sums' set-up and write-out) weigh most and a single row's sums
# use a quarter of the registers: in-process A/B at batch 1-2 it took 5-15% off the sparse model and its dense twin;
# and, where the ISA has them (``Isa.wide``), wide panels (a 64-wide block tile or dense tile as one panel, one weight
# stream, at up to half the rows) alone and two per call, each with its own input tiles (two block tiles of 64), at
# 1-2 rows, where a sparse tile's stream is short (k live tiles): docs/kernel.md.
KERNELS = tuple((isa, precision, vectors, span, streams) for isa, precision in VARIANTS
                for vectors, span, streams in ((ISAS[isa].vectors, 1, 1), (1, 1, 1), (ISAS[isa].vectors, 2, 1),
                                               (2 * ISAS[isa].vectors, 1, 1), (2 * ISAS[isa].vectors, 2, 2))
                if vectors <= ISAS[isa].vectors or ISAS[isa].wide)


def _emit_kernel(isa: Isa, precision: str, vectors: int, span: int, streams: int, context, builder, signature,
                 args) -> None:
    """The body of ``_kernel`` for one variant (see there)."""
    bf16, int8 = precision == "bf16", precision == "int8"
    vec, pv = isa.vec, vectors
    panel = vec * pv
    nv = pv * span  # sum vectors per row: ``span`` panels side by side
    groups = streams  # 2: the second half of the panels reads its inputs from tiles[gstride + kk]
    top_rows = isa.wide_pair_rows if streams == 2 else min(isa.max_rows, isa.max_rows * isa.vectors // nv)
    fvec, ivec = ir.VectorType(_F32, vec), ir.VectorType(_I32, vec)
    rows_v, w_off_v, x_off_v, ldx_v, k_v, t_v, b_off_v, dest_off_v, ld_v, s_off_v, c_off_v, row0_v, gstride_v = (
        context.cast(builder, args[i], signature.args[i], types.intp)
        for i in (1, 3, 5, 6, 8, 9, 11, 14, 15, 16, 17, 20, 22))
    intp = context.get_value_type(types.intp)
    const = lambda v: ir.Constant(intp, v)  # noqa: E731
    data = lambda i: context.make_array(signature.args[i])(context, builder, args[i]).data  # noqa: E731
    at = lambda p, off, ty=_F32: builder.gep(p, [off], source_etype=ty)  # noqa: E731
    load_vec = lambda p, ty: builder.load(builder.bitcast(p, ty.as_pointer()), typ=ty, align=4)  # noqa: E731
    x_base, tiles_ptr = at(data(4), x_off_v), data(7)
    undef_f, undef_i = ir.Constant(fvec, ir.Undefined), ir.Constant(ivec, ir.Undefined)
    prefetch = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0")
    splat = ir.Constant(ir.VectorType(_I32, vec), [0] * vec)
    if bf16:  # bf16 pairs passed as i32 lanes: LLVM 15's signature, which newer LLVMs upgrade to <32 x bfloat>
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fvec, [fvec, ivec, ivec]),
                                            f"llvm.x86.avx512bf16.dpbf16ps.{32 * vec}")
    if int8:  # u8 x s8 quads summed into i32 lanes
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ivec, [ivec, ivec, ivec]),
                                            f"llvm.x86.avx512.vpdpbusd.{32 * vec}")
    group = 2 if bf16 else 4 if int8 else 1          # inputs per multiply-add step (one 32-bit x element)
    w_type = _I16 if bf16 else _I8 if int8 else _F32
    steps = builder.udiv(t_v, const(group)) if group > 1 else t_v  # multiply-add steps per tile
    row_len = group * panel                                        # w elements per step
    acc_vec = ivec if int8 else fvec
    end = builder.append_basic_block("kernel.end")
    panel_stride = builder.mul(builder.mul(k_v, t_v), const(panel))  # one panel's elements: the next panel's start
    cases = [(rows, builder.append_basic_block(f"kernel.rows{rows}")) for rows in range(1, top_rows + 1)]
    switch = builder.switch(rows_v, cases[0][1])
    for rows, block in cases:
        switch.add_case(ir.Constant(intp, rows), block)
    for rows, block in cases:
        builder.position_at_end(block)
        splits = max(1, min(4, isa.chains // (nv * rows)))
        sets = [[cgutils.alloca_once(builder, acc_vec) for _ in range(nv * rows)] for _ in range(splits)]
        for slot in (s for slots in sets for s in slots):  # promoted to registers by LLVM
            builder.store(ir.Constant(acc_vec, [0 if int8 else 0.0] * vec), slot)

        def step(w_base, x_rows, i, slots, rows=rows):  # slots[nv*r + c] += x[r, i] * w[i, c*vec : +vec]
            w_row = at(w_base, builder.mul(i, const(row_len)), w_type)
            # the weights PREFETCH_BYTES ahead (past the panel: the next one, which follows in memory), in single panels
            # up to the ISA's width at 2+ rows; in pairs and wide panels (2-6 rows) it slowed both models down
            if rows > 1 and span == 1 and pv <= isa.vectors:
                size = {1: 4, 2: 2, 4: 1}[group]  # bytes per weight
                for line in range(0, row_len * size, 64):
                    ahead = builder.bitcast(at(w_row, const((PREFETCH_BYTES + line) // size), w_type), _I8.as_pointer())
                    builder.call(prefetch, [ahead, *(ir.Constant(_I32, v) for v in (0, 2, 1))])  # read, L2, data
            w_rows = [w_row] + [at(w_row, builder.mul(panel_stride, const(p)), w_type) for p in range(1, span)]
            if group > 1:
                w_vecs = [load_vec(at(w_rows[c // pv], const(group * vec * (c % pv)), w_type), ivec) for c in range(nv)]
            else:
                w_vecs = [load_vec(at(w_rows[c // pv], const(vec * (c % pv))), fvec) for c in range(nv)]
            for r in range(rows):
                bcasts = []
                for g in range(groups):
                    if group > 1:  # x holds the input pair / quad (group*i ...) in one 32-bit element: broadcast it
                        value = builder.load(builder.bitcast(at(x_rows[g][r], i), _I32.as_pointer()), typ=_I32)
                        undef = undef_i
                    else:
                        value = builder.load(at(x_rows[g][r], i), typ=_F32)
                        undef = undef_f
                    bcasts.append(builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(_I32, 0)),
                                                         undef, splat))
                for c, w_vec in enumerate(w_vecs):
                    bcast = bcasts[c * groups // nv]
                    slot = slots[nv * r + c]
                    acc = builder.load(slot, typ=acc_vec)
                    if group > 1:
                        total = builder.call(dp, [acc, bcast, w_vec])
                    else:
                        total = builder.fadd(acc, builder.fmul(bcast, w_vec, flags=_FAST), flags=_FAST)
                    builder.store(total, slot)

        main = builder.udiv(steps, const(splits)) if splits > 1 else steps
        with cgutils.for_range(builder, k_v) as tile:
            w_base = at(data(2), builder.add(w_off_v, builder.mul(tile.index, builder.mul(t_v, const(panel)))), w_type)
            x_rows = []
            for g in range(groups):
                live = builder.add(tile.index, builder.mul(gstride_v, const(g)))
                src = builder.mul(builder.load(builder.gep(tiles_ptr, [live], source_etype=intp), typ=intp), steps)
                x_rows.append([at(x_base, builder.add(src, builder.mul(ldx_v, const(r)))) for r in range(rows)])
            with cgutils.for_range(builder, main) as loop:
                for s_, slots in enumerate(sets):
                    step(w_base, x_rows, builder.add(builder.mul(loop.index, const(splits)), const(s_)), slots)
            if splits > 1:
                with cgutils.for_range(builder, builder.sub(steps, builder.mul(main, const(splits)))) as loop:
                    step(w_base, x_rows, builder.add(builder.mul(main, const(splits)), loop.index), sets[0])
        # int8: (sum q_x q_w - z_r sum q_w) s_r s_w + b = sum * (s_r s_w) + (b - (z_r s_r) (s_w sum q_w)), with
        # s_w sum q_w stored per output (``colsum_offset``): one multiply-add per sum vector. The per-column vectors
        # are loaded where used: loaded up front they would take registers from the sums (spills).
        splat_of = lambda v: builder.shuffle_vector(  # noqa: E731
            builder.insert_element(undef_f, v, ir.Constant(_I32, 0)), undef_f, splat)
        column = lambda off, c: load_vec(at(data(10), builder.add(off, const(vec * c))), fvec)  # noqa: E731
        lo = splat_of(args[12])
        results = []  # (row, vector, its outputs after bias and activation)
        for r in range(rows):
            if int8:
                row = builder.add(row0_v, const(r))
                scale_r = builder.load(at(data(18), row), typ=_F32)
                shift_r = splat_of(builder.fmul(builder.load(at(data(19), row), typ=_F32), scale_r, flags=_FAST))
                scale_r = splat_of(scale_r)
            for c in range(nv):
                j = nv * r + c
                total = builder.load(sets[0][j], typ=acc_vec)
                for extra in sets[1:]:
                    more = builder.load(extra[j], typ=acc_vec)
                    total = builder.add(total, more) if int8 else builder.fadd(total, more, flags=_FAST)
                if int8:
                    offset = builder.fsub(column(b_off_v, c), builder.fmul(shift_r, column(c_off_v, c), flags=_FAST),
                                          flags=_FAST)
                    total = builder.fadd(builder.fmul(builder.sitofp(total, fvec),
                                                      builder.fmul(scale_r, column(s_off_v, c), flags=_FAST),
                                                      flags=_FAST), offset, flags=_FAST)
                else:
                    total = builder.fadd(total, column(b_off_v, c), flags=_FAST)
                results.append((r, c, builder.select(builder.fcmp_unordered(">", total, lo), total, lo)))  # max
        # q_inv > 0: the outputs (a ReLU's, >= 0) go out as the next int8 layer's uint8 inputs, q = min(255,
        # floor(y * q_inv + 1/2)) at one static scale 1/q_inv (calibrated), offsets and ld counted in bytes;
        # else as float32.
        with builder.if_else(builder.fcmp_ordered(">", args[21], ir.Constant(_F32, 0.0))) as (quantised, floats):
            with quantised:
                q_inv, half, top = splat_of(args[21]), ir.Constant(fvec, [0.5] * vec), ir.Constant(fvec, [255.0] * vec)
                bytes_ = builder.bitcast(data(13), _I8.as_pointer())
                u8vec = ir.VectorType(_I8, vec)
                for r, c, total in results:
                    y = builder.fadd(builder.fmul(total, q_inv, flags=_FAST), half, flags=_FAST)
                    y = builder.select(builder.fcmp_ordered("<", y, top), y, top)
                    q = builder.trunc(builder.fptosi(y, ivec), u8vec)
                    target = builder.gep(bytes_, [builder.add(dest_off_v, builder.add(builder.mul(ld_v, const(r)),
                                                                                      const(vec * c)))],
                                         source_etype=_I8)
                    builder.store(q, builder.bitcast(target, u8vec.as_pointer()), align=1)
            with floats:
                for r, c, total in results:
                    target = at(data(13), builder.add(dest_off_v, builder.add(builder.mul(ld_v, const(r)),
                                                                              const(vec * c))))
                    builder.store(total, builder.bitcast(target, fvec.as_pointer()), align=4)
        builder.branch(end)
    builder.position_at_end(end)


@intrinsic
def _kernel(typingctx, variant, rows, w, w_off, x, x_off, ldx, tiles, k, t, bias, b_off, lo, dest, dest_off, ld,
            s_off, c_off, rs, rz, row0, q_inv, gstride):
    """_kernel(variant, rows, w, w_off, x, x_off, ldx, tiles, k, t, bias, b_off, lo, dest, dest_off, ld,
    s_off, c_off, rs, rz, row0, q_inv, gstride):
    dest[dest_off + r*ld + 0:panel] = max(bias[b_off:b_off + panel] + sum over live input tiles kk < k and
    units i < t of x[x_off + r*ldx + tiles[kk]*t + i] * w[w_off + panel*(kk*t + i) : +panel], lo) for
    r < rows (1..max_rows), lo 0 (ReLU) or -inf (none); ``variant`` (a compile-time constant, an index into
    ``KERNELS``) picks the vector width, panel width, tile and precision. A paired variant computes two panels side
    by side (outputs and biases 2*panel wide, the second panel's weights k*t*panel elements after the first's) for
    1..max_rows / 2 rows; a wide variant one panel of twice the width for as many rows; a wide pair two wide panels,
    the second reading input tiles tiles[gstride + kk] instead of tiles[kk], for 1..wide_pair_rows rows.

    fp32: w and x are float32. bf16: w holds bfloat16 bits (uint16), t is even, the panel row of inputs
    (2j, 2j+1) is 2*panel values with the pair interleaved per output (what ``vdpbf16ps`` reads); x is a
    float32 array whose every element holds one input pair as two bf16 (offsets count pairs), broadcast
    as one 32-bit value. int8: w holds int8 quads (inputs 4j..4j+3 per output), x four uint8 per element,
    and row r's sum becomes sum * rs[row0 + r] * bias[s_off + j] - rz[row0 + r] * rs[row0 + r] * bias[c_off + j]:
    the inputs' scale and zero point per row, the weights' scales and scaled column sums per output
    (``vpdpbusd``).
    The other precisions ignore s_off .. row0. With q_inv > 0 (any precision; lo must be 0) the outputs are
    written as uint8, min(255, floor(y * q_inv + 1/2)), into ``dest`` viewed as bytes (dest_off and ld in bytes):
    the next int8 layer's inputs at a static scale, so it needs no staging pass.

    The loops are emitted in LLVM IR with explicit vectors because numba's auto-vectoriser vectorises
    the i loop instead (strided loads, sums spilled to the stack) whatever the source says. Every row
    count is its own unrolled kernel behind one ``switch``. The sums stay in registers over all live
    tiles; bias and activation are applied on the way out, and ``dest`` is the layer's output itself
    for whole panels, so a panel costs one call and nothing else. With few rows there are too few
    independent sums to hide the FMA latency, so consecutive inputs go to ``splits`` separate sets of
    sums, added up at the end."""
    if not isinstance(variant, types.IntegerLiteral) or not 0 <= variant.literal_value < len(KERNELS):
        raise numba.core.errors.TypingError("micro-kernel: variant must be a constant index into KERNELS")
    isa_name, precision, vectors, span, streams = KERNELS[variant.literal_value]
    wtype = {"fp32": types.float32, "bf16": types.uint16, "int8": types.int8}[precision]
    arrays = {w: wtype, x: types.float32, tiles: types.intp, bias: types.float32, dest: types.float32,
              rs: types.float32, rz: types.float32}
    if not all(isinstance(a, types.Array) and a.dtype == d and a.layout == "C" for a, d in arrays.items()):
        raise numba.core.errors.TypingError(f"micro-kernel: w must be C-contiguous {wtype}, x, bias and dest "
                                            "float32, tiles intp")
    if not all(isinstance(i, types.Integer) for i in (rows, w_off, x_off, ldx, k, t, b_off, dest_off, ld, s_off, c_off,
                                                      row0, gstride)):
        raise numba.core.errors.TypingError("micro-kernel: offsets and counts must be integers")
    sig = types.void(variant, rows, w, w_off, x, x_off, ldx, tiles, k, t, bias, b_off, types.float32, dest,
                     dest_off, ld, s_off, c_off, rs, rz, row0, types.float32, gstride)

    def codegen(context, builder, signature, args):
        _emit_kernel(ISAS[isa_name], precision, vectors, span, streams, context, builder, signature, args)
        return context.get_dummy_value()
    return sig, codegen


_njit = functools.partial(numba.njit, fastmath=True, cache=True, nogil=True)


@_njit
def _to_bf16(x, t, t_pad, out):
    """out[tile*t_pad + i] = bf16 bits of x[tile*t + i] (round to nearest even), 0 for t <= i < t_pad: a row
    with every input tile padded to an even length, for the bf16 kernel's input pairs."""
    bits = x.view(np.uint32)
    for tile in range(x.size // t):
        src, dst = bits[tile * t:(tile + 1) * t], out[tile * t_pad:(tile + 1) * t_pad]  # slices: vectorises
        for i in range(t):
            b = src[i]
            dst[i] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        for i in range(t, t_pad):
            dst[i] = 0


@intrinsic
def _max_with_zero(typingctx, x, sign):
    """_max_with_zero(x, sign) -> max(0, max over i of sign * x[i]) for a 1-d float32 array: the int8 staging's
    range (sign 1: the top, -1: minus the bottom). Written with explicit 16-float vectors and ``maxnum``
    because LLVM does not vectorise a float max loop from numba (NaN semantics), and the scalar loop was
    most of the int8 staging (~0.3 ns a value)."""
    if not (isinstance(x, types.Array) and x.ndim == 1 and x.dtype == types.float32 and x.layout == "C"):
        raise numba.core.errors.TypingError("_max_with_zero: x must be a 1-d C-contiguous float32 array")
    sig = types.float32(x, types.float32)

    def codegen(context, builder, signature, args):
        vec = 16
        fvec = ir.VectorType(_F32, vec)
        intp = context.get_value_type(types.intp)
        array = context.make_array(signature.args[0])(context, builder, args[0])
        n, data = builder.extract_value(array.shape, 0), array.data
        vmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fvec, [fvec, fvec]), "llvm.maxnum.v16f32")
        smax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, _F32]), "llvm.maxnum.f32")
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [fvec]),
                                                "llvm.vector.reduce.fmax.v16f32")
        sign = builder.shuffle_vector(builder.insert_element(ir.Constant(fvec, ir.Undefined), args[1],
                                                             ir.Constant(_I32, 0)),
                                      ir.Constant(fvec, ir.Undefined), ir.Constant(ir.VectorType(_I32, vec), [0] * vec))
        accs = [cgutils.alloca_once_value(builder, ir.Constant(fvec, [0.0] * vec)) for _ in range(4)]  # 4 chains
        step = ir.Constant(intp, 4 * vec)
        with cgutils.for_range(builder, builder.udiv(n, step)) as loop:
            for a, acc in enumerate(accs):
                i = builder.add(builder.mul(loop.index, step), ir.Constant(intp, a * vec))
                v = builder.load(builder.bitcast(builder.gep(data, [i], source_etype=_F32), fvec.as_pointer()), typ=fvec,
                                 align=4)
                builder.store(builder.call(vmax, [builder.load(acc, typ=fvec), builder.fmul(v, sign)]), acc)
        total = builder.load(accs[0], typ=fvec)
        for acc in accs[1:]:
            total = builder.call(vmax, [total, builder.load(acc, typ=fvec)])
        out = cgutils.alloca_once_value(builder, builder.call(reduce, [total]))
        done = builder.mul(builder.udiv(n, step), step)
        with cgutils.for_range(builder, builder.sub(n, done)) as loop:
            v = builder.load(builder.gep(data, [builder.add(done, loop.index)], source_etype=_F32), typ=_F32)
            builder.store(builder.call(smax, [builder.load(out, typ=_F32), builder.fmul(v, args[1])]), out)
        return builder.load(out, typ=_F32)
    return sig, codegen


@_njit
def _to_u8(x, t, t_pad, out, scales, zeros, r, signed):
    """Row x as uint8 with its own scale and zero point (x ~ (q - zero) * scale, q in 0..255), every input tile
    padded to ``t_pad`` (a multiple of 4; the padding meets zero weights): the int8 kernel's inputs. The range
    always holds 0, so 0 (ReLU's, padding's) stays exact; ``signed`` False: x >= 0 (a ReLU's output), so the
    bottom of the range is 0 without a look."""
    lo = -_max_with_zero(x, np.float32(-1.0)) if signed else np.float32(0.0)
    hi = _max_with_zero(x, np.float32(1.0))
    scale = (hi - lo) / np.float32(255.0) if hi > lo else np.float32(1.0)
    zero = np.float32(np.rint(-lo / scale))
    inv, shift = np.float32(1.0) / scale, zero + np.float32(0.5)  # q = floor(x / scale + zero + 1/2)
    scales[r], zeros[r] = scale, zero
    if t_pad == t:  # no padding: one loop the compiler vectorises
        for i in range(x.size):
            out[i] = np.uint8(np.int32(min(max(x[i] * inv + shift, np.float32(0.0)), np.float32(255.0))))
        return
    for tile in range(x.size // t):
        src, dst = x[tile * t:(tile + 1) * t], out[tile * t_pad:(tile + 1) * t_pad]
        for i in range(t):
            dst[i] = np.uint8(np.int32(min(max(src[i] * inv + shift, np.float32(0.0)), np.float32(255.0))))
        for i in range(t, t_pad):
            dst[i] = 0


def _sync_intrinsics():
    """Atomic fetch-add, atomic load and a spin-wait hint on int64 counters: what threads need to share the work of
    one parallel region (numba has no atomics of its own)."""
    import platform
    pause = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

    def element(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.gep(array.data, [args[1]], source_etype=ir.IntType(64))

    def check(counters):
        if not (isinstance(counters, types.Array) and counters.dtype == types.int64 and counters.layout == "C"):
            raise numba.core.errors.TypingError("counters must be a C-contiguous int64 array")

    @intrinsic
    def fetch_add(typingctx, counters, i):
        """counters[i] += 1 (sequentially consistent); returns the old value."""
        check(counters)

        def codegen(context, builder, signature, args):
            return builder.atomic_rmw("add", element(context, builder, signature, args),
                                      ir.Constant(ir.IntType(64), 1), "seq_cst")
        return types.int64(counters, types.intp), codegen

    @intrinsic
    def wait_for(typingctx, counters, i, value):
        """Spin until counters[i] >= value (acquire loads, a ``pause`` per try on x86)."""
        check(counters)

        def codegen(context, builder, signature, args):
            ptr = element(context, builder, signature, args)
            target = context.cast(builder, args[2], signature.args[2], types.int64)
            spin, done = builder.append_basic_block("wait.spin"), builder.append_basic_block("wait.done")
            builder.branch(spin)
            builder.position_at_end(spin)
            current = builder.load_atomic(ptr, "acquire", 8, typ=ir.IntType(64))
            if pause:
                builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                            "llvm.x86.sse2.pause"), [])
            builder.cbranch(builder.icmp_signed(">=", current, target), done, spin)
            builder.position_at_end(done)
            return context.get_dummy_value()
        return types.void(counters, types.intp, value), codegen

    return fetch_add, wait_for


_fetch_add, _wait_for = _sync_intrinsics()


@_njit
def _pairable(li, meta, tiles):
    """Whether layer li's panels can run two at a time, side by side in one call (pair mode, see ``_plan``; decided
    once at load: the ``pairable`` column of ``FusedNet.meta``): every even-numbered panel (o, c) in (tile, panel)
    order has a next one with the same live input tiles, both whole (width ``panel``), its weights one panel further
    on and its outputs ``panel`` further on: the panels of one output tile, or (one panel per tile) consecutive
    tiles that read the same inputs, as every dense layer's do."""
    t_off, n_tiles, k, t_out, panel = meta[li, 2], meta[li, 3], meta[li, 4], meta[li, 6], meta[li, 13]
    if meta[li, 11] or meta[li, 12] or meta[li, 14] or meta[li, 18] or t_out % panel or meta[li, 7] != n_tiles * t_out:
        return False  # shared (encoder), float panels, narrow, wide, cut-short panels
    n_panels = t_out // panel
    if n_panels % 2 == 0:
        return True
    if n_panels > 1 or n_tiles % 2:
        return False
    for o in range(0, n_tiles, 2):
        for kk in range(k):
            if tiles[t_off + o * k + kk] != tiles[t_off + (o + 1) * k + kk]:
                return False
    return True


@_njit
def _rows_per_call(li, meta, max_rows):
    """The most rows layer li's single-panel kernel takes per call: half of them for wide panels (the same sums)."""
    return max_rows // 2 if meta[li, 18] else max_rows


@_njit
def _plan(x, meta, max_rows, wide_pair_rows, threads, bf16, int8):
    """Every layer's buffers in one float32 scratch array: offsets (n_layers, 4) of its staged input (bf16 pairs /
    uint8 quads, as float32 elements), its int8 row scales and zero points, and its output; and how its work splits
    into jobs: (n_layers, 3) = jobs, row parts per job (several where there are too few panels for the threads),
    mode: 1 patch-row mode (the encoder with fewer images than patches per patch row: a job is one patch row of one
    image, its patches the kernel's rows, instead of one patch for every image), 2 pair mode (at most max_rows / 2
    rows, ``_pairable``: a job is two panels side by side for all the rows, the paired kernel), 3 wide-pair mode (at
    most wide_pair_rows rows, a layer of wide panels, an even number: a job is two of them, each reading its own input
    tiles), else 0. Rows go in chunks of at most ``_rows_per_call``."""
    rows, n_layers = x.shape[0], meta.shape[0]
    offsets, jobs = np.zeros((n_layers + 1, 4), np.int64), np.zeros((n_layers, 3), np.int64)
    width, size = x.shape[1], 0
    for li in range(n_layers):
        t_in, t_out, width_out, t, floats = meta[li, 5], meta[li, 6], meta[li, 7], meta[li, 8], meta[li, 12]
        staged = (bf16 or int8) and not floats
        group = 2 if bf16 else 4
        offsets[li, 0] = size
        size += rows * ((width // t_in) * t // group) if staged else 0
        offsets[li, 1] = size
        size += 2 * rows if int8 and staged else 0
        offsets[li, 2] = size
        size += rows * width_out
        n_jobs = meta[li, 3] * ((t_out + meta[li, 13] - 1) // meta[li, 13])
        wide, per_call = meta[li, 18], _rows_per_call(li, meta, max_rows)
        chunks = (rows + per_call - 1) // per_call
        jobs[li, 0] = n_jobs
        jobs[li, 1] = min(chunks, (4 * threads + n_jobs - 1) // n_jobs) if threads > 1 and n_jobs < 4 * threads else 1
        across = meta[li, 15]  # patches per patch row (the encoder), else 0
        if rows < across <= max_rows and t_out % meta[li, 13] == 0:
            jobs[li, 0], jobs[li, 1], jobs[li, 2] = rows * (meta[li, 3] // across) * (t_out // meta[li, 13]), 1, 1
        elif 0 < rows <= wide_pair_rows and wide and n_jobs % 2 == 0 and t_out % meta[li, 13] == 0 \
                and width_out == meta[li, 3] * t_out:  # two wide panels per call (wide-pair mode)
            jobs[li, 0], jobs[li, 1], jobs[li, 2] = n_jobs // 2, 1, 3
        elif 0 < rows <= max_rows // 2 and meta[li, 16]:  # pairable (``_pairable``, decided at load)
            jobs[li, 0], jobs[li, 1], jobs[li, 2] = n_jobs // 2, 1, 2
        width = width_out
    offsets[n_layers, 0] = size
    return offsets, jobs


@_njit
def _stage(li, h, biases, meta, scratch, offsets, counters, claim, bf16, int8):
    """Layer li's input rows in the kernel's precision (bf16 pairs / uint8 quads, tiles padded): every row, or with
    ``claim`` the rows this thread claims from counters[4*li] (counted done in counters[4*li + 1]). Where the layer
    before wrote its outputs as uint8 at a static scale (``quant_offset``), only that scale is recorded per row."""
    t_in, t = meta[li, 5], meta[li, 8]
    q_off = meta[li - 1, 17] if li > 0 else -1
    rows = h.shape[0]
    n = (h.shape[1] // t_in) * t // (2 if bf16 else 4)
    staged = scratch[offsets[li, 0]:offsets[li, 0] + rows * n]
    params = scratch[offsets[li, 1]:offsets[li, 1] + 2 * rows]
    scales, zeros = params[:rows], params[rows:]
    r = -1
    while True:
        r = _fetch_add(counters, 4 * li) if claim else r + 1
        if r >= rows:
            return
        row = staged[r * n:(r + 1) * n]
        if q_off >= 0:
            scales[r], zeros[r] = biases[q_off], np.float32(0.0)
        elif bf16:
            _to_bf16(h[r], t_in, t, row.view(np.uint16))
        else:
            _to_u8(h[r], t_in, t, row.view(np.uint8), scales, zeros, r, li == 0)
        if claim:
            _fetch_add(counters, 4 * li + 1)


@_njit
def _jobs(li, h, weights, biases, tiles, meta, scratch, offsets, jobs, counters, claim, code, code_fp32,
          code_narrow, code_pair, code_wide, code_wide_pair, max_rows, bf16, int8):
    """Layer li's jobs (see ``_plan``): each one panel of one output tile for a part of the rows, through the
    micro-kernel, straight into the layer's output (bias, ReLU but on the head). Every job, or with ``claim`` the
    jobs this thread claims from counters[4*li + 2] (counted done in counters[4*li + 3]). One call per layer, not
    per job: a call passing arrays costs reference counting per array, ~10 us a forward at batch 1."""
    w_off, b_off, t_off, k, t_in, t_out, width_out, t, s_off, c_off, shared, floats, panel_width, narrow = (
        meta[li, 0], meta[li, 1], meta[li, 2], meta[li, 4], meta[li, 5], meta[li, 6], meta[li, 7], meta[li, 8],
        meta[li, 9], meta[li, 10], meta[li, 11], meta[li, 12], meta[li, 13], meta[li, 14])
    rows, wide = h.shape[0], meta[li, 18]
    max_rows = _rows_per_call(li, meta, max_rows)
    staged = (bf16 or int8) and not floats
    ldx = (h.shape[1] // t_in) * t // (2 if bf16 else 4) if staged else h.shape[1]
    flat = scratch[offsets[li, 0]:offsets[li, 0] + rows * ldx] if staged else h.reshape(-1)
    params = scratch[offsets[li, 1]:offsets[li, 1] + 2 * rows]
    scales, zeros = params[:rows], params[rows:]
    q_off = meta[li, 17]  # >= 0: the outputs go out as uint8 at a static scale, into the next layer's staged input
    if q_off >= 0:
        dest = scratch[offsets[li + 1, 0]:offsets[li + 1, 0] + rows * width_out // 4]
        q_inv = biases[q_off + 1]
    else:
        dest = scratch[offsets[li, 2]:offsets[li, 2] + rows * width_out]
        q_inv = np.float32(0.0)
    n_panels, parts = (t_out + panel_width - 1) // panel_width, jobs[li, 1]
    panel_size = k * t * panel_width  # bf16: t/2 input pairs x 2*panel values
    lo = np.float32(0.0) if li < meta.shape[0] - 1 else np.float32(-np.inf)  # ReLU but on the head
    chunks = (rows + max_rows - 1) // max_rows
    small, extra = rows // chunks, rows % chunks
    job = -1
    if jobs[li, 2] >= 2:  # pair / wide-pair mode (see _plan): panels 2*job, 2*job + 1 side by side
        while True:
            job = _fetch_add(counters, 4 * li + 2) if claim else job + 1
            if job >= jobs[li, 0]:
                return
            first = 2 * job
            o, c, o2 = first // n_panels, first % n_panels, (first + 1) // n_panels  # o2: the second panel's tile
            live = tiles[t_off + o * k:t_off + (o2 + 1) * k]
            col = o * t_out + c * panel_width
            if jobs[li, 2] == 3:  # the second wide panel reads tiles (o2 - o) * k further on
                _kernel(numba.literally(code_wide_pair), rows, weights, w_off + first * panel_size, flat, 0, ldx, live,
                        k, t, biases, b_off + col, lo, dest, col, width_out, s_off + col, c_off + col, scales, zeros,
                        0, q_inv, (o2 - o) * k)
            else:
                _kernel(numba.literally(code_pair), rows, weights, w_off + first * panel_size, flat, 0, ldx, live, k,
                        t, biases, b_off + col, lo, dest, col, width_out, s_off + col, c_off + col, scales, zeros, 0,
                        q_inv, 0)
            if claim:
                _fetch_add(counters, 4 * li + 3)
    if jobs[li, 2] == 1:  # patch-row mode (see _plan): patch px of the row is the kernel's row px, p values apart
        across = meta[li, 15]
        per_image = (meta[li, 3] // across) * n_panels
        while True:
            job = _fetch_add(counters, 4 * li + 2) if claim else job + 1
            if job >= jobs[li, 0]:
                return
            b, py, c = job // per_image, job % per_image // n_panels, job % n_panels
            live = tiles[t_off + py * across * k:t_off + (py * across + 1) * k]
            col = py * across * t_out + c * panel_width
            if floats:
                _kernel(numba.literally(code_fp32), across, biases, w_off + c * panel_size, flat, b * ldx, t_in, live,
                        k, t, biases, b_off + col, lo, dest, b * width_out + col, t_out, 0, 0, scales, zeros, b, q_inv,
                        0)
            else:
                _kernel(numba.literally(code), across, weights, w_off + c * panel_size, flat, b * ldx, t_in, live,
                        k, t, biases, b_off + col, lo, dest, b * width_out + col, t_out, 0, 0, scales, zeros, b, q_inv,
                        0)
            if claim:
                _fetch_add(counters, 4 * li + 3)
    while True:
        job = _fetch_add(counters, 4 * li + 2) if claim else job + 1
        if job >= jobs[li, 0] * parts:
            return
        o, c, part = job // parts // n_panels, job // parts % n_panels, job % parts
        live = tiles[t_off + o * k:t_off + (o + 1) * k]
        col = o * t_out + c * panel_width
        width = min(panel_width, t_out - c * panel_width, width_out - col)
        base = w_off + ((0 if shared else o) * n_panels + c) * panel_size
        first, stop = part * chunks // parts, (part + 1) * chunks // parts
        b0 = first * small + min(first, extra)
        for chunk in range(first, stop):
            n = small + (1 if chunk < extra else 0)
            full = width == panel_width  # else a panel cut short by the tile or layer end (rare)
            target = dest if full else np.empty(max_rows * panel_width, np.float32)
            at, ld = (b0 * width_out + col, width_out) if full else (0, panel_width)
            if floats:
                _kernel(numba.literally(code_fp32), n, biases, base, flat, b0 * ldx, ldx, live, k, t, biases,
                        b_off + col, lo, target, at, ld, 0, 0, scales, zeros, b0, q_inv, 0)
            elif narrow:
                _kernel(numba.literally(code_narrow), n, weights, base, flat, b0 * ldx, ldx, live, k, t, biases,
                        b_off + col, lo, target, at, ld, s_off + col, c_off + col, scales, zeros, b0, q_inv, 0)
            elif wide:
                _kernel(numba.literally(code_wide), n, weights, base, flat, b0 * ldx, ldx, live, k, t, biases,
                        b_off + col, lo, target, at, ld, s_off + col, c_off + col, scales, zeros, b0, q_inv, 0)
            else:
                _kernel(numba.literally(code), n, weights, base, flat, b0 * ldx, ldx, live, k, t, biases,
                        b_off + col, lo, target, at, ld, s_off + col, c_off + col, scales, zeros, b0, q_inv, 0)
            if not full:
                for r in range(n):
                    dest[(b0 + r) * width_out + col:(b0 + r) * width_out + col + width] = \
                        target[r * panel_width:r * panel_width + width]
            b0 += n
        if claim:
            _fetch_add(counters, 4 * li + 3)


@_njit
def _output(li, x, scratch, offsets, meta):
    """Layer li's output (li = -1: the input ``x``), (rows, width)."""
    if li < 0:
        return x
    return scratch[offsets[li, 2]:offsets[li, 2] + x.shape[0] * meta[li, 7]].reshape(x.shape[0], meta[li, 7])


@_njit
def _layers(x, weights, biases, tiles, meta, code, code_fp32, code_narrow, code_pair, code_wide, code_wide_pair,
            max_rows, wide_pair_rows, bf16, int8):
    """Encoder (layer 0), hidden layers, head (last, no ReLU) of ``x`` (one flattened image per row), one thread.

    Layer li is described by meta[li], a row of ``FusedNet.meta``: output tile o (t_out units) reads its k live
    input tiles tiles[tiles_off + o*k ...] (t units each in the layer's input); its panel c, at weights[w_off +
    (o' * C + c) * k * t * panel] (o' = o, or 0 where the tiles share one set of weights: the encoder), holds
    units o*t_out + panel*c .. +panel (panel: the layer's; narrow set: one vector, its own kernel); a layer with
    float_weights set (the encoder at bf16 and int8) has float32 panels in ``biases`` instead and runs the fp32
    kernel on unconverted input. Rows go in near-equal chunks of at most max_rows. ``_share`` runs the same steps
    on several threads (kept apart: passing the planned buffers into one shared loop from the serial forward cost
    ~0.4 us, 1%, at batch 1). ``code``, ``code_fp32`` and ``code_narrow`` (indices into KERNELS: the micro-kernel,
    the fp32 one of the same ISA, the narrow one) must be compile-time constants."""
    offsets, jobs = _plan(x, meta, max_rows, wide_pair_rows, 1, bf16, int8)
    scratch = np.empty(offsets[meta.shape[0], 0], np.float32)
    none = np.zeros(0, np.int64)
    for li in range(meta.shape[0]):
        h = _output(li - 1, x, scratch, offsets, meta)
        if (bf16 or int8) and not meta[li, 12]:
            _stage(li, h, biases, meta, scratch, offsets, none, False, bf16, int8)
        _jobs(li, h, weights, biases, tiles, meta, scratch, offsets, jobs, none, False, code, code_fp32, code_narrow,
              code_pair, code_wide, code_wide_pair, max_rows, bf16, int8)
    return _output(meta.shape[0] - 1, x, scratch, offsets, meta)


@_njit
def _share(x, weights, biases, tiles, meta, scratch, offsets, jobs, counters, code, code_fp32, code_narrow,
           code_pair, code_wide, code_wide_pair, max_rows, bf16, int8):
    """One thread's part of ``_layers`` with several threads: every step (a layer's staging, then its panels) is a
    list of items that the threads claim one at a time from a shared counter and count when done; a thread that
    finds none left waits until all are done, then goes on to the next step. All threads meet once per step, in
    one parallel region (a region per layer cost ~10-20 us each), every panel is read by one thread only, and
    no thread ever waits for work that nobody has claimed, so it finishes even if only one thread runs."""
    for li in range(meta.shape[0]):
        h = _output(li - 1, x, scratch, offsets, meta)
        if (bf16 or int8) and not meta[li, 12]:
            _stage(li, h, biases, meta, scratch, offsets, counters, True, bf16, int8)
            _wait_for(counters, 4 * li + 1, h.shape[0])
        _jobs(li, h, weights, biases, tiles, meta, scratch, offsets, jobs, counters, True, code, code_fp32,
              code_narrow, code_pair, code_wide, code_wide_pair, max_rows, bf16, int8)
        _wait_for(counters, 4 * li + 3, jobs[li, 0] * jobs[li, 1])


@functools.lru_cache(maxsize=None)
def _compiled(isa_name: str, precision: str, parallel: bool):
    """The forward function of one micro-kernel variant: (x, weights, biases, tiles, meta, threads) -> logits.

    A closure per variant, so every variant can be compiled and tested in one process. It captures only
    plain constants (numba's disk cache keys a closure on them; a captured function would have a
    process-unique identity and never hit the cache) and calls the module-level functions above.

    In parallel, ``threads`` threads run ``_share`` in one parallel region over buffers planned beforehand: each
    panel is claimed by one thread for all the rows (its weights read once), and every job is the one-thread job,
    so the logits are bit-identical to one thread's."""
    isa = ISAS[isa_name]
    code, max_rows = KERNELS.index((isa_name, precision, isa.vectors, 1, 1)), isa.max_rows
    code_fp32 = KERNELS.index((isa_name, "fp32", isa.vectors, 1, 1))
    code_narrow = KERNELS.index((isa_name, precision, 1, 1, 1))
    code_pair = KERNELS.index((isa_name, precision, isa.vectors, 2, 1))
    # no wide kernels on the 16-register shapes: no layer has wide panels there, others stand in
    code_wide = KERNELS.index((isa_name, precision, 2 * isa.vectors, 1, 1)) if isa.wide else code
    code_wide_pair = KERNELS.index((isa_name, precision, 2 * isa.vectors, 2, 2)) if isa.wide else code_pair
    wide_pair_rows = isa.wide_pair_rows
    bf16, int8 = precision == "bf16", precision == "int8"

    def forward(x, weights, biases, tiles, meta, threads):
        if not parallel:
            return _layers(x, weights, biases, tiles, meta, code, code_fp32, code_narrow, code_pair, code_wide,
                           code_wide_pair, max_rows, wide_pair_rows, bf16, int8)
        offsets, jobs = _plan(x, meta, max_rows, wide_pair_rows, threads, bf16, int8)
        scratch = np.empty(offsets[meta.shape[0], 0], np.float32)
        counters = np.zeros(4 * meta.shape[0], np.int64)
        for _ in prange(threads):
            _share(x, weights, biases, tiles, meta, scratch, offsets, jobs, counters, code, code_fp32, code_narrow,
                   code_pair, code_wide, code_wide_pair, max_rows, bf16, int8)
        return _output(meta.shape[0] - 1, x, scratch, offsets, meta)

    # A name of its own per variant: numba names a cached function's machine code and its environment after
    # the qualified name, and variants sharing one loaded each other's constants from the disk cache.
    forward.__name__ = f"forward_{isa_name}_{precision}_{'parallel' if parallel else 'serial'}"
    forward.__qualname__ = f"_compiled.<locals>.{forward.__name__}"
    return _njit(parallel=parallel)(forward)


def _per_output(values: np.ndarray, t_out: int) -> np.ndarray:
    """[O, C, panel] per-panel-column values -> flat per output unit (o*t_out + c*panel + j), as bias is."""
    n_tiles, n_panels, width = values.shape
    out = np.zeros((n_tiles, t_out), np.float32)
    for c in range(n_panels):
        w = min(width, t_out - c * width)
        out[:, c * width:c * width + w] = values[:, c, :w]
    return out.reshape(-1)


def _panels(blocks: np.ndarray, t_in: int, t_out: int, isa: Isa, precision: str, width: int | None = None) -> tuple:
    """[O, k*t_in, t_out] (per output tile, input unit major) -> (flat panels, scales, column sums).

    fp32: panels [O, ceil(t_out/panel), k*t_in, panel] float32, zero-padded. bf16: every input tile padded to
    even length and the input pairs interleaved per output, [O, C, k*t_pad/2, panel, 2] as bfloat16 bits
    (uint16). int8: each output's weights scaled to -127..127 (scale = max |w| / 127, per output unit: finer
    than per panel), tiles padded to a multiple of 4, quads interleaved, [O, C, k*t_pad/4, panel, 4] int8;
    scales and the int8 column sums times the scales per output unit. Other precisions: empty scales and sums."""
    n_tiles, rows, _ = blocks.shape
    width = isa.panel if width is None else width
    n_panels = -(-t_out // width)
    out = np.zeros((n_tiles, n_panels, rows, width), np.float32)
    for c in range(n_panels):
        w = min(width, t_out - c * width)
        out[:, c, :, :w] = blocks[:, :, c * width:c * width + w]
    none = np.zeros(0, np.float32)
    if precision == "fp32":
        return out.reshape(-1), none, none
    group = 2 if precision == "bf16" else 4
    k, t_pad = rows // t_in, -(-t_in // group) * group
    padded = np.zeros((n_tiles, n_panels, k, t_pad, width), np.float32)
    padded[:, :, :, :t_in] = out.reshape(n_tiles, n_panels, k, t_in, width)
    scale = colsum = none
    if precision == "int8":
        scale = np.abs(padded).max(axis=(2, 3)) / 127  # [O, C, panel]
        scale[scale == 0] = 1
        padded = np.rint(padded / scale[:, :, None, None, :])
        colsum = _per_output(padded.sum(axis=(2, 3)) * scale, t_out)  # the weights' column sums, times their scales
        scale = _per_output(scale, t_out)
    grouped = padded.reshape(n_tiles, n_panels, k * t_pad // group, group, width).transpose(0, 1, 2, 4, 3)
    flat = np.ascontiguousarray(grouped).reshape(-1)
    if precision == "int8":
        return flat.astype(np.int8), scale, colsum
    bits = np.empty(flat.size, np.uint16)
    _to_bf16(flat, flat.size, flat.size, bits)
    return bits, none, none


def _panel_width(isa: Isa, t_out: int) -> int:
    """Outputs per panel for output tiles of t_out units: one vector (the narrow kernel) where that holds them all;
    two panels' worth (the wide kernel) where the ISA has it and the tile is a multiple of that."""
    if t_out <= isa.vec:
        return isa.vec
    return 2 * isa.panel if isa.wide and t_out % (2 * isa.panel) == 0 else isa.panel


def _dense(weight: np.ndarray, bias: np.ndarray, isa: Isa, precision: str) -> tuple:
    """A dense [out, in] weight as panels over one input tile spanning all inputs (tiles of one panel)."""
    n_out, n_in = weight.shape
    width = _panel_width(isa, n_out)
    n_tiles = -(-n_out // width)
    padded = np.zeros((n_tiles * width, n_in), np.float32)
    padded[:n_out] = weight
    blocks = padded.reshape(n_tiles, width, n_in).transpose(0, 2, 1)  # [O, in, panel]
    return (_panels(blocks, n_in, width, isa, precision, width), np.zeros((n_tiles, 1), np.int64), n_in, width, bias,
            n_out)


def _encoder(packed: PackedNet, isa: Isa, precision: str) -> tuple:
    """The patch conv as a layer over the flattened image itself, so no patch is ever copied out: output tile o is
    patch (py, px) (its ``channels`` units in the order the hidden layers read them) and reads, as its k = C*p live
    input tiles of p units, the p rows of p pixels of that patch in every channel; all tiles share one set of
    weights (the conv's [channels, C*p*p] as one panel set). Image width is a multiple of p (``G2GConfig``)."""
    p, (channels_in, height, width_px) = packed.patch_size, packed.input_shape
    conv = packed.conv_weight.reshape(packed.conv_weight.shape[0], -1)  # [channels, C*p*p], (c, i, j) order
    channels, grid_y, grid_x = conv.shape[0], height // p, width_px // p
    panels, scale, colsum = _panels(np.ascontiguousarray(conv.T)[None], p, channels, isa, precision)
    rows = np.arange(channels_in)[:, None] * height + np.arange(p)[None, :]  # (c, i) -> image row c*H + i
    idx = np.array([((rows + py * p) * grid_x + px).reshape(-1) for py in range(grid_y) for px in range(grid_x)])
    patches = grid_y * grid_x
    per_output = tuple(np.tile(v, patches) if v.size else v for v in (scale, colsum))
    return (panels, *per_output), idx, p, channels, np.tile(packed.conv_bias, patches), patches * channels


def _layer(layer: PackedLayer, isa: Isa, precision: str) -> tuple:
    """(panels, idx, t_in, t_out, bias, out_features) of any packed layer, from its format's tiles."""
    blocks, idx, t_in, t_out = layer.spec.fused_tiles(layer)  # blocks: [O, k*t_in, t_out], input unit major
    return (_panels(blocks, t_in, t_out, isa, precision, _panel_width(isa, t_out)), idx.astype(np.int64), t_in, t_out,
            layer.tensors["bias"], layer.out_features)


META = ("weights_offset", "bias_offset", "tiles_offset", "n_tiles", "k", "t_in", "t_out", "out_features", "t_kernel",
        "scale_offset", "colsum_offset", "shared_weights", "float_weights", "panel", "narrow", "patches_across",
        "pairable", "quant_offset", "wide")


HUGE_PAGE = 2 << 20  # x86-64 / arm64 transparent huge page


def _aligned(size: int, dtype, line: int) -> np.ndarray:
    """A zeroed array of ``size`` elements starting on a 64-byte boundary; from ``HUGE_PAGE`` bytes up, in memory
    the kernel is asked to back with transparent huge pages (Linux ``MADV_HUGEPAGE``; elsewhere, or where it is
    off, plain pages). Why: a forward streams its weights once; with 4 KiB pages a 2.6 MB model touches ~650
    pages, whose address translations the dense twin's stream has pushed out of the TLB before each call in
    strict A B A B. Huge pages took 6% off the sparse model at batch 1 (2% off the dense twin). Smaller buffers
    keep plain pages: there they only made things slower (int8, batch 1)."""
    itemsize = np.dtype(dtype).itemsize
    if size * itemsize >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        nbytes = -(-size * itemsize // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # whole huge pages, and room to align
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled; private: THP
        memory.madvise(mmap.MADV_HUGEPAGE)  # before the first touch
        buffer = np.frombuffer(memory, dtype=np.uint8)  # keeps ``memory`` alive
        start = -buffer.ctypes.data % HUGE_PAGE
        return buffer[start:start + size * itemsize].view(dtype)
    buffer = np.zeros(size + line, dtype)
    start = (-buffer.ctypes.data % 64) // buffer.itemsize
    return buffer[start:start + size]


class FusedNet:
    """Callable (N, C, H, W) float32 -> (N, classes) logits running ``PackedNet`` through one compiled forward.

    All layers (encoder, hidden layers, head) live in one 64-byte-aligned buffer ``weights`` (panels:
    float32, bf16 bits or int8), one float32 buffer ``biases`` (biases; int8: also the weights' scales and
    column sums) and one int64 buffer ``tiles`` (live input tiles), every segment starting on a cache line,
    described by ``meta`` (one row per layer, columns ``META``; t_kernel is t_in rounded up to the inputs per
    multiply-add step: 1, 2 for bf16, 4 for int8): a few arrays to pass per call instead of tuples of ~20,
    which is most of numba's per-call cost at batch 1.

    ``isa`` (default: the widest this CPU runs, ``host_isa``) picks the micro-kernel shape; ``threads`` > 1
    compiles the parallel variant, run on that many numba threads; ``activation_scales`` (int8 only: one per
    layer output but the head's) makes int8 static (``_static_scales``)."""

    def __init__(self, packed: PackedNet, isa: str | None = None, precision: str = "fp32", threads: int = 1,
                 activation_scales: Sequence[float] | None = None):
        if not packed.layers:
            raise ValueError("the fused backend needs at least one hidden layer")
        isa = host_isa() if isa is None else isa
        if isa not in ISAS or precision not in PRECISIONS:
            raise ValueError(f"fused: unknown variant {isa}/{precision}; ISAs {', '.join(ISAS)}, precisions "
                             f"{', '.join(PRECISIONS)}")
        if not supported(isa, precision):
            raise ValueError(f"fused: this CPU ({host_isa()}) cannot run the {isa} kernel at {precision}"
                             + {"bf16": " (bf16 needs AVX512-BF16)", "int8": " (int8 needs AVX512-VNNI)"}.get(precision, ""))
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise ValueError(f"fused: threads must be 1..{numba.config.NUMBA_NUM_THREADS} (numba's thread count), "
                             f"got {threads}")
        self.isa, self.precision, self.threads = ISAS[isa], precision, threads
        # The encoder stays fp32 at every precision: its input tiles (p pixels) would need padding to the
        # kernel's pairs/quads, a per-value copy that cost more than its multiply-adds (a few % of the model's).
        layers = [_encoder(packed, self.isa, "fp32"),
                  *(_layer(l, self.isa, precision) for l in packed.layers),
                  _dense(packed.head_weight, packed.head_bias, self.isa, precision)]
        dtype = {"fp32": np.float32, "bf16": np.uint16, "int8": np.int8}[precision]
        group = {"fp32": 1, "bf16": 2, "int8": 4}[precision]  # inputs per multiply-add step
        line, bline = 64 // np.dtype(dtype).itemsize, 16  # elements per 64-byte cache line
        segments, meta, w_size, b_size, t_off = [], [], 0, 0, 0
        for li, ((panels, scale, colsum), idx, t_in, t_out, bias, width) in enumerate(layers):
            floats = li == 0 and precision != "fp32"  # fp32 panels among the float32 values
            offsets = []
            for values in (bias, scale, colsum, *((panels,) if floats else ())):  # in the float32 buffer ``biases``
                segments.append(("biases", b_size, values))
                offsets.append(b_size)
                b_size += -(-values.size // bline) * bline + self.isa.panel  # the kernel reads a panel anywhere
            if not floats:
                segments.append(("weights", w_size, panels))
            panel = self.isa.panel if li == 0 else _panel_width(self.isa, t_out)  # the encoder: always full panels
            meta.append((offsets[3] if floats else w_size, offsets[0], t_off, *idx.shape, t_in, t_out, width,
                         t_in if li == 0 else -(-t_in // group) * group, offsets[1], offsets[2], li == 0, floats,
                         panel, panel < self.isa.panel, packed.input_shape[2] // packed.patch_size if li == 0 else 0,
                         0, -1, panel > self.isa.panel))
            w_size += 0 if floats else -(-panels.size // line) * line
            t_off += idx.size
        self.weights, self.biases = _aligned(w_size, dtype, line), _aligned(b_size, np.float32, bline)
        for buffer, off, values in segments:
            getattr(self, buffer)[off:off + values.size] = values.reshape(-1)
        self.tiles = np.ascontiguousarray(np.concatenate([l[1].reshape(-1) for l in layers]), dtype=np.int64)
        self.meta = np.array(meta, dtype=np.int64)
        pairable = META.index("pairable")
        self.meta[:, pairable] = [_pairable(li, self.meta, self.tiles) for li in range(len(meta))]  # once, at load
        self.static_layers = self._static_scales(activation_scales)
        self.input_shape = tuple(packed.input_shape)
        self._forward = _compiled(isa, precision, threads > 1)

    def _static_scales(self, scales: Sequence[float] | None) -> int:
        """Record int8 static activation scales: layer li's outputs (the encoder's, every hidden layer's; all a ReLU's,
        so zero point 0) go out as uint8 at scales[li], so its consumer skips staging (range, scale and quantise per
        row: static scales take ~18% off the int8 sparse forward at batch 64, docs/kernel.md). Only where the consumer's input tiles need no
        padding to quads and the producer writes whole panels; elsewhere the per-row staging stays. Returns how many
        layers."""
        if scales is None:
            return 0
        n_out = self.meta.shape[0] - 1  # every layer but the head
        if self.precision != "int8":
            raise ValueError("fused: activation scales are for precision int8")
        scales = np.asarray(scales, dtype=np.float32).reshape(-1)
        if scales.size != n_out or not np.all(np.isfinite(scales)) or not np.all(scales > 0):
            raise ValueError(f"fused: activation scales must be {n_out} positive numbers (encoder and hidden layers' "
                             f"outputs), got {scales.tolist()}")
        col = {name: META.index(name) for name in META}
        extra, b_size = [], self.biases.size
        for li in range(n_out):
            m, nxt = self.meta[li], self.meta[li + 1]
            whole = m[col["t_out"]] % m[col["panel"]] == 0 and m[col["out_features"]] == m[col["n_tiles"]] * m[col["t_out"]]
            if whole and nxt[col["t_kernel"]] == nxt[col["t_in"]] and not nxt[col["float_weights"]]:
                self.meta[li, col["quant_offset"]] = b_size + 2 * len(extra)
                extra.append((scales[li], np.float32(1.0) / scales[li]))
        if extra:
            grown = _aligned(b_size + 2 * len(extra) + self.isa.panel, np.float32, 16)
            grown[:b_size] = self.biases
            grown[b_size:b_size + 2 * len(extra)] = np.asarray(extra, np.float32).reshape(-1)
            self.biases = grown
        return len(extra)

    @property
    def variant(self) -> dict:
        """What runs: for benchmark manifests."""
        return describe(self.isa.name, self.precision, self.threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"expected input (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        if self.threads > 1:
            numba.set_num_threads(self.threads)  # per calling thread
        if not x.shape[0]:  # no rows: nothing to plan (and reshape(0, -1) cannot infer the width)
            return np.zeros((0, int(self.meta[-1, META.index("out_features")])), np.float32)
        return self._forward(x.reshape(x.shape[0], -1), self.weights, self.biases, self.tiles, self.meta, self.threads)

