"""The micro-kernel, written in LLVM IR through a numba intrinsic (``micro_kernel``), in every variant
``KERNELS`` lists; and the conversions of a layer's input to the kernel's reduced precisions (``to_bf16``,
``to_u8``)."""
from __future__ import annotations

import functools

import numpy as np

import numba
from llvmlite import ir  # numba's own code generator
from numba.core import cgutils, types
from numba.extending import intrinsic

from g2gserve.runtime.fused.isa import ISAS, VARIANTS, Isa

PREFETCH_BYTES = 4096  # how far ahead of the panel row being read the kernel prefetches (see _emit_kernel)

_F32, _I32, _I16, _I8 = ir.FloatType(), ir.IntType(32), ir.IntType(16), ir.IntType(8)
_FAST = ("fast",)  # lets LLVM fuse the multiply and add into one FMA where the CPU has it


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
    """The body of ``micro_kernel`` for one variant (see there)."""
    bf16, int8 = precision == "bf16", precision == "int8"
    vec, pv = isa.vec, vectors
    panel = vec * pv
    nv = pv * span  # sum vectors per row: ``span`` panels side by side
    # streams 2: the second half of the panels reads its inputs from tiles[gstride + kk]
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
                for g in range(streams):
                    if group > 1:  # x holds the input pair / quad (group*i ...) in one 32-bit element: broadcast it
                        value = builder.load(builder.bitcast(at(x_rows[g][r], i), _I32.as_pointer()), typ=_I32)
                        undef = undef_i
                    else:
                        value = builder.load(at(x_rows[g][r], i), typ=_F32)
                        undef = undef_f
                    bcasts.append(builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(_I32, 0)),
                                                         undef, splat))
                for c, w_vec in enumerate(w_vecs):
                    bcast = bcasts[c * streams // nv]
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
            for g in range(streams):
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
def micro_kernel(typingctx, variant, rows, w, w_off, x, x_off, ldx, tiles, k, t, bias, b_off, lo, dest, dest_off, ld,
            s_off, c_off, rs, rz, row0, q_inv, gstride):
    """micro_kernel(variant, rows, w, w_off, x, x_off, ldx, tiles, k, t, bias, b_off, lo, dest, dest_off, ld,
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


njit = functools.partial(numba.njit, fastmath=True, cache=True, nogil=True)


@njit
def to_bf16(x, t, t_pad, out):
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


@njit
def to_u8(x, t, t_pad, out, scales, zeros, r, signed):
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

