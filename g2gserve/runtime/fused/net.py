"""``FusedNet``: a packed network laid out for the kernel and run through one compiled forward."""
from __future__ import annotations

from typing import Sequence

import numpy as np

import numba

from g2gserve.formats import PackedNet
from g2gserve.runtime.fused.forward import compiled, pairable
from g2gserve.runtime.fused.isa import ISAS, PRECISIONS, describe, host_isa, supported
from g2gserve.runtime.fused.layout import META, aligned, dense_panels, encoder_panels, layer_panels, panel_width


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
        layers = [encoder_panels(packed, self.isa, "fp32"),
                  *(layer_panels(l, self.isa, precision) for l in packed.layers),
                  dense_panels(packed.head_weight, packed.head_bias, self.isa, precision)]
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
            panel = self.isa.panel if li == 0 else panel_width(self.isa, t_out)  # the encoder: always full panels
            meta.append((offsets[3] if floats else w_size, offsets[0], t_off, *idx.shape, t_in, t_out, width,
                         t_in if li == 0 else -(-t_in // group) * group, offsets[1], offsets[2], li == 0, floats,
                         panel, panel < self.isa.panel, packed.input_shape[2] // packed.patch_size if li == 0 else 0,
                         0, -1, panel > self.isa.panel))
            w_size += 0 if floats else -(-panels.size // line) * line
            t_off += idx.size
        self.weights, self.biases = aligned(w_size, dtype, line), aligned(b_size, np.float32, bline)
        for buffer, off, values in segments:
            getattr(self, buffer)[off:off + values.size] = values.reshape(-1)
        self.tiles = np.ascontiguousarray(np.concatenate([l[1].reshape(-1) for l in layers]), dtype=np.int64)
        self.meta = np.array(meta, dtype=np.int64)
        self.meta[:, META.index("pairable")] = [pairable(li, self.meta, self.tiles)  # once, at load
                                                for li in range(len(meta))]
        self.static_layers = self._static_scales(activation_scales)
        self.input_shape = tuple(packed.input_shape)
        self._forward = compiled(isa, precision, threads > 1)

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
            grown = aligned(b_size + 2 * len(extra) + self.isa.panel, np.float32, 16)
            grown[:b_size] = self.biases
            grown[b_size:b_size + 2 * len(extra)] = np.asarray(extra, np.float32).reshape(-1)
            self.biases = grown
        return len(extra)

    @property
    def variant(self) -> dict:
        """What runs: for benchmark manifests."""
        return describe(self.isa.name, self.precision, self.threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # The fast path: the array straight into the compiled forward, which checks the image shape itself. A
        # batch-1 forward takes ~35 us, and in strict A B A B (every call after the dense twin's, caches cold) the
        # Python checks and reshapes of the careful path cost ~1 us of it, which the sparse model pays four times
        # as dearly as its twin. The forward's explicit signature refuses any other array type with a TypeError
        # (no compile on a request), its shape check raises a ValueError: then the careful path converts, or says
        # what is wrong.
        if self.threads == 1:
            try:
                return self._forward(x, self.weights, self.biases, self.tiles, self.meta, 1)
            except (TypeError, ValueError):
                pass
        return self._checked(x)

    def _checked(self, x) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"expected input (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        if not (x.flags.writeable and x.flags.aligned):  # numba types these apart from the compiled signature
            x = x.copy()
        if self.threads > 1:
            numba.set_num_threads(self.threads)  # per calling thread
        return self._forward(x, self.weights, self.biases, self.tiles, self.meta, self.threads)
