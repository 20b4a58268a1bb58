"""The ``fused`` CPU backend: the whole packed network as one compiled function (numba).

Why: at small batches a block-sparse layer's arithmetic is tiny, and onnxruntime and torch spend as
long on the ~10 small ops around each batched matmul (gather, reshapes, transposes, bias, ReLU) and
on intermediate tensors as on the matmul itself; at large batches what counts is how close each
multiply-add runs to the machine's peak. Here one ``@njit`` function runs the encoder, every layer and
the head, and every one of them is the same loop over *panels*:

* a layer's weights are stored, per output tile, as panels of ``Isa.panel`` output units: for each live
  input unit the panel holds those units' weights side by side ([k*t_in, panel], zero-padded past the
  tile's end), so a panel is one sequential stream and no input is ever gathered or copied;
* up to ``Isa.max_rows`` rows at a time, a micro-kernel written directly in LLVM IR (``kernel.micro_kernel``)
  keeps the rows x panel sums in vector registers and, per input unit, loads the panel row, broadcasts
  each row's input value and issues one fused multiply-add per sum vector: the layout of a tuned GEMM
  micro-kernel, with no horizontal sums and no C compiler (numba's LLVM compiles it for the CPU it runs on);
* bias and ReLU are applied as the sums are written out.

The vector width and register blocking (``ISAS``) are chosen once, at load, for the CPU (``host_isa``):
16-float vectors and a 12 x 32 tile where AVX-512 is present (32 vector registers; output tiles of 64 as one
6 x 64 panel), 8-float vectors and 6 x 16 on AVX2 (16 registers), 4-float vectors elsewhere (SSE, Arm NEON).
With ``threads`` > 1 the threads claim the panels (and, where there are few, the row chunks) of every layer from
shared counters, in one parallel region (``forward._share``).
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

Modules, data flowing down: ``isa`` (the kernel shapes, which one this CPU runs), ``kernel`` (the micro-kernel in
LLVM IR, input conversions to bf16 / uint8), ``layout`` (a packed network as panels in aligned buffers, ``META``),
``forward`` (planning a batch, the job loops, threads, the compiled forward per variant), ``net`` (``FusedNet``).
"""
from g2gserve.runtime.fused.isa import ISAS, PRECISIONS, VARIANTS, Isa, describe, host_features, host_isa, supported
from g2gserve.runtime.fused.net import FusedNet

__all__ = ["FusedNet", "ISAS", "Isa", "PRECISIONS", "VARIANTS", "describe", "host_features", "host_isa", "supported"]
