"""How a packed network is laid out for the kernel: every layer (the patch encoder, block and dense layers, the
head) as panels over live input tiles (``META`` describes each), in cache-line- and huge-page-aligned buffers."""
from __future__ import annotations

import mmap

import numpy as np

from g2gserve.formats import PackedLayer, PackedNet
from g2gserve.runtime.fused.isa import Isa
from g2gserve.runtime.fused.kernel import to_bf16


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
    to_bf16(flat, flat.size, flat.size, bits)
    return bits, none, none


def panel_width(isa: Isa, t_out: int) -> int:
    """Outputs per panel for output tiles of t_out units: one vector (the narrow kernel) where that holds them all;
    two panels' worth (the wide kernel) where the ISA has it and the tile is a multiple of that."""
    if t_out <= isa.vec:
        return isa.vec
    return 2 * isa.panel if isa.wide and t_out % (2 * isa.panel) == 0 else isa.panel


def dense_panels(weight: np.ndarray, bias: np.ndarray, isa: Isa, precision: str) -> tuple:
    """A dense [out, in] weight as panels over one input tile spanning all inputs (tiles of one panel)."""
    n_out, n_in = weight.shape
    width = panel_width(isa, n_out)
    n_tiles = -(-n_out // width)
    padded = np.zeros((n_tiles * width, n_in), np.float32)
    padded[:n_out] = weight
    blocks = padded.reshape(n_tiles, width, n_in).transpose(0, 2, 1)  # [O, in, panel]
    return (_panels(blocks, n_in, width, isa, precision, width), np.zeros((n_tiles, 1), np.int64), n_in, width, bias,
            n_out)


def encoder_panels(packed: PackedNet, isa: Isa, precision: str) -> tuple:
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


def layer_panels(layer: PackedLayer, isa: Isa, precision: str) -> tuple:
    """(panels, idx, t_in, t_out, bias, out_features) of any packed layer, from its format's tiles."""
    blocks, idx, t_in, t_out = layer.spec.fused_tiles(layer)  # blocks: [O, k*t_in, t_out], input unit major
    return (_panels(blocks, t_in, t_out, isa, precision, panel_width(isa, t_out)), idx.astype(np.int64), t_in, t_out,
            layer.tensors["bias"], layer.out_features)


META = ("weights_offset", "bias_offset", "tiles_offset", "n_tiles", "k", "t_in", "t_out", "out_features", "t_kernel",
        "scale_offset", "colsum_offset", "shared_weights", "float_weights", "panel", "narrow", "patches_across",
        "pairable", "quant_offset", "wide")


HUGE_PAGE = 2 << 20  # x86-64 / arm64 transparent huge page


def aligned(size: int, dtype, line: int) -> np.ndarray:
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

