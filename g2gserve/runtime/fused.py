"""The ``fused`` CPU backend: the whole packed network as one compiled function (numba).

Why: at small batches a block-sparse layer's arithmetic is tiny, and onnxruntime and torch spend as
long on the ~10 small ops around each batched matmul (gather, reshapes, transposes, bias, ReLU) and
on intermediate tensors as on the matmul itself; at large batches what counts is how close each
multiply-add runs to the machine's peak. Here one ``@njit`` function runs the encoder, every layer and
the head, and every one of them is the same loop over *panels*:

* a layer's weights are stored, per output tile, as panels of 16 output units: for each live input
  unit the panel holds those 16 weights side by side ([k*t_in, 16], zero-padded past the tile's end),
  so a panel is one sequential stream and no input is ever gathered or copied;
* up to 6 rows at a time, a micro-kernel written directly in LLVM IR (``_micro_kernel``) keeps the
  6 x 16 sums in 12 vector registers and, per input unit, loads the panel row (2 vectors), broadcasts
  each row's input value and issues 12 fused multiply-adds: the layout of a tuned GEMM micro-kernel,
  with no horizontal sums and no C compiler (numba's LLVM compiles it for the CPU it runs on);
* bias and ReLU are applied as the sums are written out.

Only live tiles are stored and read, so compute and memory traffic shrink with the density. Dense
layers (the encoder's patch conv, the head, every layer of the dense twin) are panels over one input
tile spanning all inputs, so sparse and dense run on the same kernel. CSR layers run densified.
The first call compiles (seconds); numba caches the machine code on disk for later processes.
"""
from __future__ import annotations

import functools

import numpy as np

from g2gserve.formats import PackedLayer, PackedNet

import numba  # imported only when the fused backend is asked for (runtime.load imports this module lazily)
from llvmlite import ir  # numba's own code generator
from numba.core import cgutils, types
from numba.extending import intrinsic


PANEL = 16     # output units per panel: two 8-float vectors
MAX_ROWS = 6   # rows per micro-kernel call: 6 x 2 accumulators + 2 weight vectors + 1 broadcast = 15 registers

_F32, _I32 = ir.FloatType(), ir.IntType(32)
_VEC = ir.VectorType(_F32, 8)
_FAST = ("fast",)  # lets LLVM fuse the multiply and add into one FMA where the CPU has it


def _micro_kernel(rows: int):
    """dest[dest_off + r*ld + 0:16] = max(bias + sum over live input tiles kk < k and units i < t of
    x[x_off + r*ldx + tiles[kk]*t + i] * w[w_off + 16*(kk*t + i) : +16], lo) for r < rows, where
    bias = w[b_off : b_off + 16] and lo is 0 (ReLU) or -inf (none).

    The loops are emitted in LLVM IR with explicit 8-float vectors because numba's auto-vectoriser
    vectorises the i loop instead (strided loads, sums spilled to the stack) whatever the source says.
    The sums stay in registers over all live tiles; bias and activation are applied on the way out, and
    ``dest`` is the layer's output itself for whole panels, so a panel costs one call and nothing else.
    With few rows there are too few independent sums to hide the FMA latency, so consecutive inputs go
    to ``splits`` separate sets of sums, added up at the end."""
    splits = max(1, min(4, 10 // (2 * rows)))  # >= ~10 independent FMA chains where registers allow

    @intrinsic
    def kernel(typingctx, w, w_off, x, x_off, ldx, tiles, k, t, b_off, lo, dest, dest_off, ld):
        arrays = {w: types.float32, x: types.float32, tiles: types.intp, dest: types.float32}
        if not all(isinstance(a, types.Array) and a.dtype == d and a.layout == "C" for a, d in arrays.items()):
            raise numba.core.errors.TypingError("micro-kernel: w, x, dest must be C-contiguous float32, tiles intp")
        if not all(isinstance(i, types.Integer) for i in (w_off, x_off, ldx, k, t, b_off, dest_off, ld)):
            raise numba.core.errors.TypingError("micro-kernel: offsets and counts must be integers")
        sig = types.void(w, w_off, x, x_off, ldx, tiles, k, t, b_off, types.float32, dest, dest_off, ld)

        def codegen(context, builder, signature, args):
            w_off_v, x_off_v, ldx_v, k_v, t_v, b_off_v, dest_off_v, ld_v = (
                context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 3, 4, 6, 7, 8, 11, 12))
            intp = context.get_value_type(types.intp)
            const = lambda v: ir.Constant(intp, v)  # noqa: E731
            data = lambda i: context.make_array(signature.args[i])(context, builder, args[i]).data  # noqa: E731
            at = lambda p, off: builder.gep(p, [off], source_etype=_F32)  # noqa: E731
            load_vec = lambda p: builder.load(builder.bitcast(p, _VEC.as_pointer()), typ=_VEC, align=4)  # noqa: E731
            vec_slot = lambda: cgutils.alloca_once(builder, _VEC)  # promoted to registers by LLVM  # noqa: E731
            x_base, tiles_ptr = at(data(2), x_off_v), data(5)
            zero = ir.Constant(_VEC, [0.0] * 8)
            sets = [[vec_slot() for _ in range(2 * rows)] for _ in range(splits)]
            for slot in (s for slots in sets for s in slots):
                builder.store(zero, slot)
            undef = ir.Constant(_VEC, ir.Undefined)
            splat = ir.Constant(ir.VectorType(_I32, 8), [0] * 8)

            def step(w_base, x_rows, i, slots):  # slots[2r + c] += x[r, i] * w[i, 8c : 8c + 8]
                w_row = at(w_base, builder.mul(i, const(PANEL)))
                w_vecs = (load_vec(w_row), load_vec(at(w_row, const(8))))
                for r in range(rows):
                    value = builder.load(at(x_rows[r], i), typ=_F32)
                    bcast = builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(_I32, 0)),
                                                   undef, splat)
                    for c, w_vec in enumerate(w_vecs):
                        slot = slots[2 * r + c]
                        total = builder.fadd(builder.load(slot, typ=_VEC), builder.fmul(bcast, w_vec, flags=_FAST),
                                             flags=_FAST)
                        builder.store(total, slot)

            main = builder.udiv(t_v, const(splits)) if splits > 1 else t_v
            with cgutils.for_range(builder, k_v) as tile:
                w_base = at(data(0), builder.add(w_off_v, builder.mul(tile.index, builder.mul(t_v, const(PANEL)))))
                src = builder.mul(builder.load(builder.gep(tiles_ptr, [tile.index], source_etype=intp), typ=intp), t_v)
                x_rows = [at(x_base, builder.add(src, builder.mul(ldx_v, const(r)))) for r in range(rows)]
                with cgutils.for_range(builder, main) as loop:
                    for s_, slots in enumerate(sets):
                        step(w_base, x_rows, builder.add(builder.mul(loop.index, const(splits)), const(s_)), slots)
                if splits > 1:
                    with cgutils.for_range(builder, builder.sub(t_v, builder.mul(main, const(splits)))) as loop:
                        step(w_base, x_rows, builder.add(builder.mul(main, const(splits)), loop.index), sets[0])
            bias = at(data(0), b_off_v)
            lo = builder.shuffle_vector(builder.insert_element(undef, args[9], ir.Constant(_I32, 0)), undef, splat)
            for j, slot in enumerate(sets[0]):
                r, c = divmod(j, 2)
                total = builder.load(slot, typ=_VEC)
                for extra in sets[1:]:
                    total = builder.fadd(total, builder.load(extra[j], typ=_VEC), flags=_FAST)
                total = builder.fadd(total, load_vec(at(bias, const(8 * c))), flags=_FAST)
                total = builder.select(builder.fcmp_unordered(">", total, lo), total, lo)  # max(total, lo)
                target = at(data(10), builder.add(dest_off_v, builder.add(builder.mul(ld_v, const(r)), const(8 * c))))
                builder.store(total, builder.bitcast(target, _VEC.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return kernel


_K1, _K2, _K3, _K4, _K5, _K6 = (_micro_kernel(r) for r in range(1, MAX_ROWS + 1))


_njit = functools.partial(numba.njit, fastmath=True, cache=True, nogil=True)


@_njit(inline="always")  # inlined: a call passes ~50 scalars
def _accumulate(rows, w, w_off, x, x_off, ldx, tiles, k, t, b_off, lo, dest, dest_off, ld):
    """The micro-kernel for 1..6 rows (each row count is its own unrolled kernel)."""
    if rows == 6:
        _K6(w, w_off, x, x_off, ldx, tiles, k, t, b_off, lo, dest, dest_off, ld)
    elif rows == 5:
        _K5(w, w_off, x, x_off, ldx, tiles, k, t, b_off, lo, dest, dest_off, ld)
    elif rows == 4:
        _K4(w, w_off, x, x_off, ldx, tiles, k, t, b_off, lo, dest, dest_off, ld)
    elif rows == 3:
        _K3(w, w_off, x, x_off, ldx, tiles, k, t, b_off, lo, dest, dest_off, ld)
    elif rows == 2:
        _K2(w, w_off, x, x_off, ldx, tiles, k, t, b_off, lo, dest, dest_off, ld)
    else:
        _K1(w, w_off, x, x_off, ldx, tiles, k, t, b_off, lo, dest, dest_off, ld)


@_njit
def _panel_layer(x, weights, tiles, m, out, relu):
    """out = act(x @ W.T + bias) for the layer described by m, a row of ``FusedNet.meta``: output tile o
    (t_out units) reads its k live input tiles tiles[tiles_off + o*k ...] (t_in units each); its panel c,
    at weights[w_off + (o * C + c) * k * t_in * 16], holds units o*t_out + 16c .. +16. Rows are split
    into near-equal chunks of at most 6 (64 = 9 x 6 + 2 x 5)."""
    w_off, b_off, t_off, n_tiles, k, t_in, t_out = m[0], m[1], m[2], m[3], m[4], m[5], m[6]
    n, ldx = x.shape
    n_panels = (t_out + PANEL - 1) // PANEL
    panel_size = k * t_in * PANEL
    flat, dest = x.reshape(-1), out.reshape(-1)
    ldo = out.shape[1]
    acc = np.empty(MAX_ROWS * PANEL, np.float32)  # for panels cut short by the tile or layer end
    lo = np.float32(0.0) if relu else np.float32(-np.inf)
    chunks = (n + MAX_ROWS - 1) // MAX_ROWS
    for o in range(n_tiles):
        live = tiles[t_off + o * k:t_off + (o + 1) * k]
        for c in range(n_panels):
            col = o * t_out + c * PANEL
            width = min(PANEL, t_out - c * PANEL, ldo - col)
            base = w_off + (o * n_panels + c) * panel_size
            b0 = 0
            for chunk in range(chunks):
                rows = n // chunks + (1 if chunk < n % chunks else 0)
                if width == PANEL:
                    _accumulate(rows, weights, base, flat, b0 * ldx, ldx, live, k, t_in, b_off + col, lo, dest,
                                b0 * ldo + col, ldo)
                else:
                    _accumulate(rows, weights, base, flat, b0 * ldx, ldx, live, k, t_in, b_off + col, lo, acc, 0,
                                PANEL)
                    for r in range(rows):
                        out[b0 + r, col:col + width] = acc[r * PANEL:r * PANEL + width]
                b0 += rows


@_njit
def _patches(x, p, out):
    """Every p x p patch of x as one row of ``out`` (N * patches, C*p*p), in (image, patch row, patch
    column) order."""
    n, channels, size = x.shape[0], x.shape[1], x.shape[2]
    grid = size // p
    for b in range(n):
        for c in range(channels):
            for py in range(grid):
                for i in range(p):
                    m0 = (c * p + i) * p
                    for px in range(grid):
                        r = (b * grid + py) * grid + px
                        for j in range(p):  # element by element: numba's slice objects cost more than the copy
                            out[r, m0 + j] = x[b, c, py * p + i, px * p + j]


@_njit
def _forward(x, p, weights, tiles, meta):
    """Encoder (layer 0, over patches), hidden layers, head (last, no ReLU)."""
    n, grid = x.shape[0], x.shape[2] // p
    patches = np.empty((n * grid * grid, x.shape[1] * p * p), np.float32)
    _patches(x, p, patches)
    h = np.empty((n * grid * grid, meta[0, 7]), np.float32)
    _panel_layer(patches, weights, tiles, meta[0], h, True)
    h = h.reshape(n, grid * grid * meta[0, 7])  # one image per row, the model's (N, patch * C_out + c) order
    last = meta.shape[0] - 1
    for li in range(1, last + 1):
        out = np.empty((n, meta[li, 7]), np.float32)
        _panel_layer(h, weights, tiles, meta[li], out, li < last)
        h = out
    return h


def _panels(blocks: np.ndarray, t_out: int) -> np.ndarray:
    """[O, K, t_out] (per output tile, input unit major) -> flat [O, ceil(t_out/16), K, 16], zero-padded."""
    n_tiles, k, _ = blocks.shape
    n_panels = -(-t_out // PANEL)
    out = np.zeros((n_tiles, n_panels, k, PANEL), np.float32)
    for c in range(n_panels):
        width = min(PANEL, t_out - c * PANEL)
        out[:, c, :, :width] = blocks[:, :, c * PANEL:c * PANEL + width]
    return out.reshape(-1)


def _dense(weight: np.ndarray, bias: np.ndarray) -> tuple:
    """A dense [out, in] weight as panels over one input tile spanning all inputs."""
    n_out, n_in = weight.shape
    n_tiles = -(-n_out // PANEL)
    padded = np.zeros((n_tiles * PANEL, n_in), np.float32)
    padded[:n_out] = weight
    blocks = padded.reshape(n_tiles, PANEL, n_in).transpose(0, 2, 1)  # [O, in, 16]
    return _panels(blocks, PANEL), np.zeros((n_tiles, 1), np.int64), n_in, PANEL, bias, n_out


def _layer(layer: PackedLayer) -> tuple:
    """(panels, idx, t_in, t_out, bias, out_features) of any packed layer, from its format's tiles."""
    blocks, idx, t_in, t_out = layer.spec.fused_tiles(layer)  # blocks: [O, k*t_in, t_out], input unit major
    return _panels(blocks, t_out), idx.astype(np.int64), t_in, t_out, layer.tensors["bias"], layer.out_features


META = ("weights_offset", "bias_offset", "tiles_offset", "n_tiles", "k", "t_in", "t_out", "out_features")


class FusedNet:
    """Callable (N, C, H, W) float32 -> (N, classes) logits running ``PackedNet`` through ``_forward``.

    All layers (encoder, hidden layers, head) live in one 64-byte-aligned float32 buffer ``weights``
    (panels and biases, every segment starting on a cache line) and one int64 buffer ``tiles`` (live
    input tiles), described by ``meta`` (one row per layer, columns ``META``): three arrays to pass per
    call instead of tuples of ~20, which is most of numba's per-call cost at batch 1."""

    def __init__(self, packed: PackedNet):
        if not packed.layers:
            raise ValueError("the fused backend needs at least one hidden layer")
        conv = packed.conv_weight.reshape(packed.conv_weight.shape[0], -1)
        layers = [_dense(conv, packed.conv_bias), *(_layer(l) for l in packed.layers),
                  _dense(packed.head_weight, packed.head_bias)]
        line = 16  # floats per 64-byte cache line
        segments, meta, size, t_off = [], [], 0, 0
        for panels, idx, t_in, t_out, bias, width in layers:
            w_off, b_off = size, size + -(-panels.size // line) * line
            size = b_off + -(-bias.size // line) * line + PANEL  # the kernel reads PANEL biases from any panel start
            segments += [(w_off, panels), (b_off, bias)]
            meta.append((w_off, b_off, t_off, *idx.shape, t_in, t_out, width))
            t_off += idx.size
        buffer = np.zeros(size + line, np.float32)
        start = (-buffer.ctypes.data % 64) // 4
        self.weights = buffer[start:start + size]
        for off, values in segments:
            self.weights[off:off + values.size] = values.reshape(-1)
        self.tiles = np.ascontiguousarray(np.concatenate([l[1].reshape(-1) for l in layers]), dtype=np.int64)
        self.meta = np.array(meta, dtype=np.int64)
        self.patch_size = packed.patch_size
        self.input_shape = tuple(packed.input_shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"expected input (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        return _forward(x, self.patch_size, self.weights, self.tiles, self.meta)

