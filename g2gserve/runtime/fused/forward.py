"""The forward pass: how a batch's work is planned (``plan``: buffers, jobs, modes), split into micro-kernel calls
per layer, and shared by threads in one parallel region; ``compiled`` gives the numba function of one variant."""
from __future__ import annotations

import functools

import numpy as np

import numba
from llvmlite import ir
from numba import prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from g2gserve.runtime.fused.isa import ISAS
from g2gserve.runtime.fused.kernel import KERNELS, micro_kernel, njit, to_bf16, to_u8


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


@njit
def pairable(li, meta, tiles):
    """Whether layer li's panels can run two at a time in one call (pair and wide-pair modes, see ``plan``; decided
    once at load: the ``pairable`` column of ``FusedNet.meta``). Wide panels: any two, each reading its own input
    tiles, where the layer has whole tiles and an even number of panels. Else every even-numbered panel (o, c) in
    (tile, panel) order has a next one with the same live input tiles, both whole (width ``panel``), its weights one
    panel further on and its outputs ``panel`` further on: the panels of one output tile, or (one panel per tile)
    consecutive tiles that read the same inputs, as every dense layer's do."""
    t_off, n_tiles, k, t_out, panel = meta[li, 2], meta[li, 3], meta[li, 4], meta[li, 6], meta[li, 13]
    if meta[li, 11] or meta[li, 12] or meta[li, 14] or t_out % panel or meta[li, 7] != n_tiles * t_out:
        return False  # shared (encoder), float panels, narrow, cut-short panels
    n_panels = t_out // panel
    if meta[li, 18]:  # wide
        return n_tiles * n_panels % 2 == 0
    if n_panels % 2 == 0:
        return True
    if n_panels > 1 or n_tiles % 2:
        return False
    for o in range(0, n_tiles, 2):
        for kk in range(k):
            if tiles[t_off + o * k + kk] != tiles[t_off + (o + 1) * k + kk]:
                return False
    return True


@njit
def _rows_per_call(li, meta, max_rows):
    """The most rows layer li's single-panel kernel takes per call: half of them for wide panels (the same sums)."""
    return max_rows // 2 if meta[li, 18] else max_rows


@njit
def plan(x, meta, max_rows, wide_pair_rows, threads, bf16, int8):
    """Every layer's buffers in one float32 scratch array: offsets (n_layers, 4) of its staged input (bf16 pairs /
    uint8 quads, as float32 elements), its int8 row scales and zero points, and its output; and how its work splits
    into jobs: (n_layers, 3) = jobs, row parts per job (several where there are too few panels for the threads),
    mode: 1 patch-row mode (the encoder with fewer images than patches per patch row: a job is one patch row of one
    image, its patches the kernel's rows, instead of one patch for every image), 2 pair mode (at most max_rows / 2
    rows, ``pairable``: a job is two panels side by side for all the rows, the paired kernel), 3 wide-pair mode (at
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
        elif 0 < rows <= wide_pair_rows and wide and meta[li, 16]:  # two wide panels per call (``pairable``)
            jobs[li, 0], jobs[li, 1], jobs[li, 2] = n_jobs // 2, 1, 3
        elif 0 < rows <= max_rows // 2 and meta[li, 16] and not wide:  # pairable (``pairable``, decided at load)
            jobs[li, 0], jobs[li, 1], jobs[li, 2] = n_jobs // 2, 1, 2
        width = width_out
    offsets[n_layers, 0] = size
    return offsets, jobs


@njit
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
            to_bf16(h[r], t_in, t, row.view(np.uint16))
        else:
            to_u8(h[r], t_in, t, row.view(np.uint8), scales, zeros, r, li == 0)
        if claim:
            _fetch_add(counters, 4 * li + 1)


@njit
def _jobs(li, h, weights, biases, tiles, meta, scratch, offsets, jobs, counters, claim, code, code_fp32,
          code_narrow, code_pair, code_wide, code_wide_pair, max_rows, bf16, int8):
    """Layer li's jobs (see ``plan``): each one panel of one output tile for a part of the rows, through the
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
    if jobs[li, 2] >= 2:  # pair / wide-pair mode (see plan): panels 2*job, 2*job + 1 side by side
        while True:
            job = _fetch_add(counters, 4 * li + 2) if claim else job + 1
            if job >= jobs[li, 0]:
                return
            first = 2 * job
            o, c, o2 = first // n_panels, first % n_panels, (first + 1) // n_panels  # o2: the second panel's tile
            live = tiles[t_off + o * k:t_off + (o2 + 1) * k]
            col = o * t_out + c * panel_width
            if jobs[li, 2] == 3:  # the second wide panel reads tiles (o2 - o) * k further on
                micro_kernel(numba.literally(code_wide_pair), rows, weights, w_off + first * panel_size, flat, 0, ldx,
                             live, k, t, biases, b_off + col, lo, dest, col, width_out, s_off + col, c_off + col,
                             scales, zeros, 0, q_inv, (o2 - o) * k)
            else:
                micro_kernel(numba.literally(code_pair), rows, weights, w_off + first * panel_size, flat, 0, ldx, live,
                             k, t, biases, b_off + col, lo, dest, col, width_out, s_off + col, c_off + col, scales,
                             zeros, 0, q_inv, 0)
            if claim:
                _fetch_add(counters, 4 * li + 3)
    if jobs[li, 2] == 1:  # patch-row mode (see plan): patch px of the row is the kernel's row px, p values apart
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
                micro_kernel(numba.literally(code_fp32), across, biases, w_off + c * panel_size, flat, b * ldx, t_in,
                             live, k, t, biases, b_off + col, lo, dest, b * width_out + col, t_out, 0, 0, scales, zeros,
                             b, q_inv, 0)
            else:
                micro_kernel(numba.literally(code), across, weights, w_off + c * panel_size, flat, b * ldx, t_in, live,
                             k, t, biases, b_off + col, lo, dest, b * width_out + col, t_out, 0, 0, scales, zeros, b,
                             q_inv, 0)
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
                micro_kernel(numba.literally(code_fp32), n, biases, base, flat, b0 * ldx, ldx, live, k, t, biases,
                             b_off + col, lo, target, at, ld, 0, 0, scales, zeros, b0, q_inv, 0)
            elif narrow:
                micro_kernel(numba.literally(code_narrow), n, weights, base, flat, b0 * ldx, ldx, live, k, t, biases,
                             b_off + col, lo, target, at, ld, s_off + col, c_off + col, scales, zeros, b0, q_inv, 0)
            elif wide:
                micro_kernel(numba.literally(code_wide), n, weights, base, flat, b0 * ldx, ldx, live, k, t, biases,
                             b_off + col, lo, target, at, ld, s_off + col, c_off + col, scales, zeros, b0, q_inv, 0)
            else:
                micro_kernel(numba.literally(code), n, weights, base, flat, b0 * ldx, ldx, live, k, t, biases,
                             b_off + col, lo, target, at, ld, s_off + col, c_off + col, scales, zeros, b0, q_inv, 0)
            if not full:
                for r in range(n):
                    dest[(b0 + r) * width_out + col:(b0 + r) * width_out + col + width] = \
                        target[r * panel_width:r * panel_width + width]
            b0 += n
        if claim:
            _fetch_add(counters, 4 * li + 3)


@njit
def _output(li, x, scratch, offsets, meta):
    """Layer li's output (li = -1: the input ``x``), (rows, width)."""
    if li < 0:
        return x
    return scratch[offsets[li, 2]:offsets[li, 2] + x.shape[0] * meta[li, 7]].reshape(x.shape[0], meta[li, 7])


@njit
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
    offsets, jobs = plan(x, meta, max_rows, wide_pair_rows, 1, bf16, int8)
    scratch = np.empty(offsets[meta.shape[0], 0], np.float32)
    none = np.zeros(0, np.int64)
    for li in range(meta.shape[0]):
        h = _output(li - 1, x, scratch, offsets, meta)
        if (bf16 or int8) and not meta[li, 12]:
            _stage(li, h, biases, meta, scratch, offsets, none, False, bf16, int8)
        _jobs(li, h, weights, biases, tiles, meta, scratch, offsets, jobs, none, False, code, code_fp32, code_narrow,
              code_pair, code_wide, code_wide_pair, max_rows, bf16, int8)
    return _output(meta.shape[0] - 1, x, scratch, offsets, meta)


@njit
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
def compiled(isa_name: str, precision: str, parallel: bool):
    """The forward function of one micro-kernel variant: (x, weights, biases, tiles, meta, threads) -> logits, x the
    (N, C, H, W) images (a ValueError where C, H, W are not the model's), compiled now for its one ``signature``.

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

    def forward(x4, weights, biases, tiles, meta, threads):
        # the encoder's row of meta knows the image: k = C*p input tiles of t_in = p pixels, patches_across = W/p
        p, across = meta[0, 5], meta[0, 15]
        if x4.shape[1] * p != meta[0, 4] or x4.shape[2] != meta[0, 3] // across * p or x4.shape[3] != across * p:
            raise ValueError("fused: the input is not (N, C, H, W) of the model's image shape")
        if x4.shape[0] == 0:  # no rows: nothing to plan
            return np.zeros((0, meta[meta.shape[0] - 1, 7]), np.float32)
        x = x4.reshape(x4.shape[0], x4.shape[1] * x4.shape[2] * x4.shape[3])  # one flattened image per row
        if not parallel:
            return _layers(x, weights, biases, tiles, meta, code, code_fp32, code_narrow, code_pair, code_wide,
                           code_wide_pair, max_rows, wide_pair_rows, bf16, int8)
        offsets, jobs = plan(x, meta, max_rows, wide_pair_rows, threads, bf16, int8)
        scratch = np.empty(offsets[meta.shape[0], 0], np.float32)
        counters = np.zeros(4 * meta.shape[0], np.int64)
        for _ in prange(threads):
            _share(x, weights, biases, tiles, meta, scratch, offsets, jobs, counters, code, code_fp32, code_narrow,
                   code_pair, code_wide, code_wide_pair, max_rows, bf16, int8)
        return _output(meta.shape[0] - 1, x, scratch, offsets, meta)

    # A name of its own per variant: numba names a cached function's machine code and its environment after
    # the qualified name, and variants sharing one loaded each other's constants from the disk cache.
    forward.__name__ = f"forward_{isa_name}_{precision}_{'parallel' if parallel else 'serial'}"
    forward.__qualname__ = f"compiled.<locals>.{forward.__name__}"
    return njit(signature(precision), parallel=parallel)(forward)


def signature(precision: str) -> list[tuple]:
    """The one signature a forward is compiled for: (N, C, H, W) C-contiguous float32 images, the weight buffer
    (float32, bf16 bits or int8), biases, tiles, meta, threads. Explicit, so numba compiles it once (at load) and
    refuses any other argument types at once with a TypeError (``FusedNet.__call__`` then converts the input),
    instead of compiling another specialisation on a request; and the call costs no type-dispatch beyond that."""
    weights = {"fp32": types.float32, "bf16": types.uint16, "int8": types.int8}[precision]
    return [(types.Array(types.float32, 4, "C"), types.Array(weights, 1, "C"), types.Array(types.float32, 1, "C"),
             types.Array(types.int64, 1, "C"), types.Array(types.int64, 2, "C"), types.int64)]

