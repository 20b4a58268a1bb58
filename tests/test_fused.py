"""The fused (numba) CPU kernel computes exactly the packed network, for every layer format and shape, and
every micro-kernel variant (vector width, tile, precision, threads) this CPU can run."""
import numba
import numpy as np
import pytest
import torch

from g2gserve.formats import densify, pack_model
from g2gserve.model.g2gnet import build_model
from g2gserve.runtime import load
from g2gserve.runtime.fused import ISAS, VARIANTS, FusedNet, describe, host_isa, supported
from g2gserve.runtime.fused.forward import compiled, pairable, plan
from g2gserve.runtime.fused.kernel import to_u8
from g2gserve.runtime.fused.layout import HUGE_PAGE, META, aligned

from conftest import tiny_config


PAIRED_64 = dict(granularity="block", hidden=(256, 256), block_size=64, conv_channels=16)  # block tiles of 64
ODD_64 = dict(granularity="block", hidden=(192, 384), block_size=64, conv_channels=12, groups=3, sparsity=0.5)  # 3, 6


def _model(**kw):
    torch.manual_seed(0)
    model = build_model(tiny_config(**kw)).eval()
    with torch.no_grad():  # non-zero biases, so a bias bug cannot hide
        for layer in model.hidden:
            layer.bias.normal_(0, 0.5)
    return model


def _error(net, model, batch):
    """Max abs error of the fused net's logits against PyTorch, and the logits' scale."""
    x = torch.randn(batch, *net.input_shape)
    with torch.no_grad():
        ref = model(x)
    return (torch.from_numpy(net(x.numpy())) - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.parametrize("kw,fmt", [
    (dict(granularity="block"), "auto"),           # block tiles of 8
    (dict(granularity="block", block_size=16), "auto"),
    (dict(granularity="block", hidden=(64,)), "auto"),  # a single hidden layer
    (dict(granularity="edge"), "csr"),             # CSR layers run densified
    (dict(kind="dense"), "auto"),
    (dict(kind="dense-params"), "auto"),           # 23 units: tiles of 1, odd output counts
    (dict(in_channels=3, image_size=32, granularity="block"), "auto"),
    (PAIRED_64, "auto"),                           # two panels per output tile: pair mode within a tile / wide panels
    (PAIRED_64 | dict(block_size=32), "auto"),     # one panel per tile: pair mode across tiles reading alike
    (ODD_64, "auto"),                              # an odd number of wide tiles: the last one alone at 1-2 rows
    (PAIRED_64 | dict(block_size=128, groups=2, sparsity=0.5), "auto"),  # two wide panels per tile: a wide pair reading the same tiles
])
def test_matches_pytorch_at_every_batch_size(kw, fmt):
    model = _model(**kw)
    packed = pack_model(model, fmt)
    rows = ISAS[host_isa()].max_rows
    for net in (FusedNet(packed), FusedNet(densify(packed))):
        for batch in (*range(1, rows + 1), 64):  # every micro-kernel row count, and 64 in near-equal chunks
            err, _ = _error(net, model, batch)
            assert err < 1e-4, (kw, fmt, batch, err)


def _modes(net, rows):
    """How each layer of ``net`` but the encoder runs at ``rows`` rows (``plan``'s mode column) and its jobs."""
    jobs = plan(np.zeros((rows, int(np.prod(net.input_shape))), np.float32), net.meta, net.isa.max_rows,
                 net.isa.wide_pair_rows, 1, False, False)[1][1:]
    return jobs[:, 2].tolist(), jobs[:, 0].tolist()


def test_pair_mode_runs_two_panels_per_call_where_they_read_alike():
    """With at most half a tile of rows, a layer's panels run two per call (``pairable``): the two panels of a
    64-wide block tile, or consecutive one-panel tiles with the same live input tiles (dense layers); never the
    encoder, a narrow layer (the head) or tiles that read different inputs. Parity: the tests above."""
    isa = ISAS["avx2"]  # no wide panels: 64-wide tiles are four 16-wide panels
    packed = pack_model(_model(**PAIRED_64), "auto")
    for net in (FusedNet(packed, isa="avx2"), FusedNet(densify(packed), isa="avx2")):  # 256 outputs: 16 panels
        assert _modes(net, 1) == ([2, 2, 0], [8, 8, 1])
        assert _modes(net, isa.max_rows // 2)[0] == [2, 2, 0]
        assert _modes(net, isa.max_rows // 2 + 1)[0] == [0, 0, 0]
    # one-panel tiles: pairable only where every even tile and the next read the same input tiles
    meta = np.zeros((1, len(META)), np.int64)
    meta[0, [META.index(c) for c in ("n_tiles", "k", "t_out", "out_features", "panel")]] = (4, 2, isa.panel,
                                                                                            4 * isa.panel, isa.panel)
    same, differ = np.array([0, 1, 0, 1, 2, 3, 2, 3]), np.array([0, 1, 0, 1, 2, 3, 2, 0])
    assert pairable(0, meta, same) and not pairable(0, meta, differ)
    meta[0, META.index("out_features")] -= 1  # the last panel cut short
    assert not pairable(0, meta, same)


@pytest.mark.skipif(not ISAS[host_isa()].wide, reason="no wide panels on this CPU's kernel shape")
def test_wide_panels_for_tiles_of_two_panels_two_per_call_at_one_or_two_rows():
    """Where the kernel shape has them (AVX-512), output tiles of a multiple of two panels (block tiles of 64 and 128,
    every dense layer of the dense twin, in tiles of 64) get wide panels, one weight stream per tile; at up to
    ``wide_pair_rows`` rows two of them run per call, each with its own input tiles (two block tiles, or the two
    panels of a 128-wide tile); the encoder, the head and block tiles of 32 keep their panels. Parity: above."""
    isa = ISAS[host_isa()]
    wide, panel = META.index("wide"), META.index("panel")
    packed = pack_model(_model(**PAIRED_64), "auto")
    for net in (FusedNet(packed), FusedNet(densify(packed))):  # 256 outputs: four wide panels
        assert net.meta[:, wide].tolist() == [0, 1, 1, 0] and net.meta[1, panel] == 2 * isa.panel
        for rows in range(1, isa.wide_pair_rows + 1):
            assert _modes(net, rows) == ([3, 3, 0], [2, 2, 1])
        assert _modes(net, isa.wide_pair_rows + 1)[0] == [0, 0, 0]
    odd = FusedNet(pack_model(_model(**ODD_64), "auto"))  # three tiles: no pairs
    assert odd.meta[:, wide].tolist() == [0, 1, 1, 0] and _modes(odd, 1)[0] == [0, 3, 0]
    assert FusedNet(pack_model(_model(**PAIRED_64 | dict(block_size=32)), "auto")).meta[:, wide].tolist() == [0] * 4


def test_narrow_panels_where_one_vector_holds_a_tile():
    """Output tiles of at most one vector (the 10-class head, block tiles of 8 or 16 at AVX-512) get one-vector
    panels and the narrow kernel (the parity tests above run them); the encoder always full panels."""
    narrow, panel = META.index("narrow"), META.index("panel")
    isa = ISAS[host_isa()]
    for block in (8, 16):
        net = FusedNet(pack_model(_model(granularity="block", block_size=block), "auto"))
        assert net.meta[0, narrow] == 0 and net.meta[0, panel] == isa.panel  # the encoder
        assert (net.meta[1:-1, narrow] == int(block <= isa.vec)).all(), block
        assert net.meta[-1, narrow] == 1 and net.meta[-1, panel] == isa.vec  # 10 classes


def test_large_buffers_are_aligned_to_huge_pages_and_small_ones_to_cache_lines():
    big, small = aligned(HUGE_PAGE // 4 + 3, np.float32, 16), aligned(1000, np.int8, 64)
    assert big.size == HUGE_PAGE // 4 + 3 and big.dtype == np.float32 and not big.any() and big.flags.writeable
    assert small.size == 1000 and small.ctypes.data % 64 == 0 and not small.any()
    if hasattr(__import__("mmap"), "MADV_HUGEPAGE"):
        assert big.ctypes.data % HUGE_PAGE == 0


def test_callers_on_several_python_threads_get_their_own_counters():
    """A server may call one multi-threaded net from several Python threads: every forward plans its own buffers
    and claim counters, so the regions never take each other's work."""
    import threading
    packed = pack_model(_model(granularity="block"), "auto")
    one, two = FusedNet(packed), FusedNet(packed, threads=2)
    xs = [np.random.default_rng(n).standard_normal((n, *one.input_shape)).astype(np.float32) for n in (1, 3, 17, 40)]
    refs, bad = [one(x) for x in xs], []

    def work(k):
        for i in range(40):
            j = (i + k) % len(xs)
            if not np.array_equal(two(xs[j]), refs[j]):
                bad.append((k, i))
    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not bad


@pytest.mark.parametrize("isa,precision", VARIANTS)
def test_every_variant_this_cpu_runs_matches_pytorch(isa, precision):
    """Every vector width / tile / precision, on odd shapes (tiles of 1, 23 units) and block tiles; the
    ones this CPU cannot run are compiled at least (fp32: LLVM splits wide vectors), or skipped (bf16)."""
    if not supported(isa, precision):
        if precision != "fp32":
            pytest.skip(f"{precision} needs AVX512-BF16 / AVX512-VNNI, which this CPU lacks")
        assert len(compiled(isa, precision, False).signatures) == 1  # compiled for its one signature
        return
    bound = 1e-4 if precision == "fp32" else None  # bf16 (8-bit mantissa), int8: relative to the logits
    for kw in (dict(granularity="block"), dict(kind="dense-params"), PAIRED_64):
        model = _model(**kw)
        packed = pack_model(model, "auto")
        for net in (FusedNet(packed, isa=isa, precision=precision),
                    FusedNet(densify(packed), isa=isa, precision=precision)):
            for batch in (*range(1, ISAS[isa].max_rows + 1), 64):
                err, scale = _error(net, model, batch)
                assert err < (bound or {"bf16": 0.02, "int8": 0.04}[precision] * scale), (isa, precision, kw, batch, err)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_threads_give_the_same_logits_as_one_thread(precision):
    if not supported(host_isa(), precision):
        pytest.skip(f"{precision} does not run on this CPU")
    for kw in (dict(granularity="block"), PAIRED_64):  # PAIRED_64: panels claimed in pairs at few rows
        packed = pack_model(_model(**kw), "auto")
        one = FusedNet(packed, precision=precision)
        two = FusedNet(packed, precision=precision, threads=2)
        for batch in (1, 5, 16, 17, 64):  # few panels (the head): row chunks shared out as well
            x = np.random.default_rng(batch).standard_normal((batch, *one.input_shape)).astype(np.float32)
            assert np.array_equal(one(x), two(x)), (kw, batch)
    assert two.variant["threads"] == 2 and two.variant["isa"] == host_isa()


def test_shared_work_finishes_when_one_thread_runs_every_part():
    """The threads claim panels from shared counters and wait only for claimed work: if the runtime gives the
    parallel region fewer threads than parts (nested, or a capped pool), one thread does it all, no deadlock."""
    import numba
    packed = pack_model(_model(granularity="block"), "auto")
    one, two = FusedNet(packed), FusedNet(packed, threads=2)
    x = np.random.default_rng(0).standard_normal((7, *one.input_shape)).astype(np.float32)
    numba.set_num_threads(1)
    try:  # the parallel forward, told of 2 parts, on a pool of 1 thread: part 0 claims everything
        logits = two._forward(x, two.weights, two.biases, two.tiles, two.meta, 2)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert np.array_equal(logits, one(x))


@pytest.mark.parametrize("row", [np.full(6, -0.8), np.full(6, 2.0), np.zeros(6), np.linspace(-1, 3, 6)])
def test_int8_inputs_come_back_within_half_a_step(row):
    """Each row's uint8 inputs (scale and zero point of its own, tiles of 3 padded to 4) dequantise to within
    half a step; constant rows (a background patch) exactly."""
    row = row.astype(np.float32)
    out, scales, zeros = np.full(8, 7, np.uint8), np.zeros(1, np.float32), np.zeros(1, np.float32)
    to_u8(row, 3, 4, out, scales, zeros, 0, True)
    tiles = out.reshape(2, 4)
    assert (tiles[:, 3] == 0).all()  # padding
    back = (tiles[:, :3].reshape(-1).astype(np.float32) - zeros[0]) * scales[0]
    assert np.abs(back - row).max() <= scales[0] / 2 + 1e-6
    if np.ptp(row) == 0:
        assert np.allclose(back, row, atol=1e-6)


def test_variant_is_chosen_for_the_cpu():
    assert host_isa({"avx512f", "avx2", "fma"}) == "avx512"
    assert host_isa({"avx2", "fma"}) == "avx2"
    assert host_isa({"neon"}) == "generic" and host_isa(set()) == "generic"
    assert not supported("avx512", "fp32", {"avx2", "fma"}) and supported("avx2", "fp32", {"avx512f"})
    assert not supported("avx512", "bf16", {"avx512f"}) and supported("avx512", "bf16", {"avx512f", "avx512bf16"})
    assert not supported("avx512", "int8", {"avx512f"}) and supported("avx512", "int8", {"avx512f", "avx512vnni"})
    assert ISAS["avx512"].vec == 16 and ISAS["avx2"].vec == 8
    assert ISAS["avx512"].max_rows * ISAS["avx512"].vectors > ISAS["avx2"].max_rows * ISAS["avx2"].vectors
    d = describe()
    assert d["isa"] == host_isa() and d["tile_columns"] == ISAS[host_isa()].panel
    assert d["tile"].startswith(f"{d['tile_rows']} x {d['tile_columns']} tile")


def test_dense_layers_are_panels_over_one_input_tile_spanning_all_inputs():
    packed = pack_model(_model(granularity="block"), "auto")
    sparse, dense = FusedNet(packed), FusedNet(densify(packed))
    col = {name: i for i, name in enumerate(META)}
    # rows: encoder, hidden layers, head; only the hidden layers differ, and only in their live input tiles
    assert len(dense.meta) == len(sparse.meta) == len(packed.layers) + 2
    for layer, d, s in zip(packed.layers, dense.meta[1:-1], sparse.meta[1:-1]):
        assert d[col["k"]] == 1 and d[col["t_in"]] == layer.in_features
        assert (dense.tiles[d[col["tiles_offset"]]:][:d[col["n_tiles"]]] == 0).all()
        assert s[col["k"]] * s[col["t_in"]] == pytest.approx(layer.in_features * layer.density)  # only live tiles
    for net in (sparse, dense):
        assert net.weights.ctypes.data % 64 == 0 and (net.meta[:, :2] % 16 == 0).all()  # cache-line aligned


def test_bad_input_is_refused():
    net = FusedNet(pack_model(_model(granularity="block"), "auto"))
    for shape in ((2, 3, 28, 28), (2, 1, 28, 21), (2, 1, 21, 28), (2, 4, 14, 14), (2, 784)):  # 4x14x14: 784 values
        with pytest.raises(ValueError, match=r"expected input \(N, 1, 28, 28\)"):
            net(np.zeros(shape, np.float32))
    packed = pack_model(_model(granularity="block"), "auto")
    with pytest.raises(ValueError, match="threads must be 1.."):
        FusedNet(packed, threads=10_000)
    with pytest.raises(ValueError, match="unknown variant"):
        FusedNet(packed, isa="sve")
    if not supported(host_isa(), "bf16"):
        with pytest.raises(ValueError, match="AVX512-BF16"):
            FusedNet(packed, precision="bf16")


def test_any_array_like_input_gives_the_same_logits_without_compiling_again():
    """The fast path takes (N, C, H, W) C-contiguous float32 arrays as they are; anything else (float64, strided,
    read-only, misaligned, lists, no rows) goes through the careful path, and the forward keeps its one compiled
    signature (no compile on a request)."""
    model = _model(granularity="block")
    net = FusedNet(pack_model(model, "auto"))
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
    ref = net(x)
    assert np.allclose(ref, model(torch.from_numpy(x)).detach().numpy(), atol=1e-4)
    frozen = x.copy()
    frozen.flags.writeable = False
    misaligned = np.ndarray(x.shape, np.float32, np.zeros(x.nbytes + 4, np.uint8).data, 1)  # one byte off
    misaligned[...] = x
    wide = np.zeros((5, 1, 28, 56), np.float32)
    wide[..., ::2] = x
    for same in (x.astype(np.float64), wide[..., ::2], frozen, misaligned, x.tolist()):
        assert np.array_equal(net(same), ref)
    assert net(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 10)
    assert len(net._forward.signatures) == 1


def test_runs_on_cpu_only(tmp_path):
    for backend in ("fused", "onnxruntime"):
        with pytest.raises(ValueError, match=f"the {backend} backend runs on the CPU"):
            load(tmp_path, backend=backend, device="cuda")
    with pytest.raises(ValueError, match="fused backend computes in fp32, bf16, int8"):
        load(tmp_path, backend="fused", dtype="fp16")
    with pytest.raises(ValueError, match="int8"):
        load(tmp_path, backend="onnxruntime", dtype="int8")


def test_variants_load_from_numba_cache_side_by_side():
    """A fresh process loading several variants from numba's disk cache gets each one's own code and constants
    (variants once shared a name there, and the second one loaded failed: "'descr' is NULL")."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; sys.path.insert(0, 'tests')\n"
            "import numpy as np\n"
            "from test_fused import _model\n"
            "from g2gserve.formats import pack_model\n"
            "from g2gserve.runtime.fused import FusedNet, VARIANTS, supported\n"
            "packed = pack_model(_model(granularity='block'), 'auto')\n"
            "x = np.ones((3, 1, 28, 28), np.float32)\n"
            "outs = [FusedNet(packed, isa=i, precision=p)(x) for i, p in VARIANTS if supported(i, p)]\n"
            "assert all(np.allclose(o, outs[0], atol=0.1) for o in outs), outs\n")
    root = Path(__file__).resolve().parent.parent
    for _ in range(2):  # the first run may compile; the second loads every variant from the cache
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]


STATIC = dict(granularity="block", block_size=16, conv_channels=32)  # every layer's outputs whole panels


def _static_int8_emulation(packed, x, scales):
    """The int8 path at static activation scales in numpy: fp32 encoder; per layer int8 weights (scale max |w| / 127
    per output unit), uint8 inputs min(255, floor(y / s + 1/2)) of the layer before (a ReLU's: zero point 0), exact
    integer sums, times both scales, plus the bias."""
    from g2gserve.export.calibration import layer_outputs
    y = layer_outputs(packed, x)[0]
    weights = [(l.dense_weight(), l.tensors["bias"]) for l in packed.layers] + [(packed.head_weight, packed.head_bias)]
    for i, (w, b) in enumerate(weights):
        s = np.float32(scales[i])
        q = np.minimum(np.floor(y * (np.float32(1) / s) + np.float32(0.5)), 255).astype(np.float64)
        sw = np.abs(w).max(axis=1) / np.float32(127)
        sw[sw == 0] = 1
        qw = np.rint(w / sw[:, None]).astype(np.float64)
        y = ((q @ qw.T) * (np.float64(s) * sw.astype(np.float64)) + b).astype(np.float32)
        if i < len(weights) - 1:
            y = np.maximum(y, 0)
    return y


@pytest.mark.skipif(not supported(host_isa(), "int8"), reason="int8 needs AVX512-VNNI, which this CPU lacks")
def test_int8_at_static_scales_computes_the_quantised_network():
    """With calibrated activation scales every layer writes the next one's uint8 inputs from its epilogue (no staging):
    the logits are those of the quantised network computed in numpy (saturating at 255 where the scale is too
    small; float32 rounding may put a rare value one step apart), at every row count, sparse and dense, one thread or two, and near the float model's."""
    from g2gserve.export.calibration import activation_scales
    model = _model(**STATIC)
    packed = pack_model(model, "auto")
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    scales = activation_scales(packed, calib)
    for shrink in (1.0, 0.25):  # 0.25: the top quarter of the range saturates
        s = [v * shrink for v in scales]
        for net in (FusedNet(packed, precision="int8", activation_scales=s),
                    FusedNet(densify(packed), precision="int8", activation_scales=s),
                    FusedNet(packed, precision="int8", activation_scales=s, threads=2)):
            assert net.static_layers == len(packed.layers) + 1  # encoder and every hidden layer
            exact = []
            for batch in (*range(1, ISAS[host_isa()].max_rows + 1), 64):
                x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
                got, want = net(x), _static_int8_emulation(packed, x, s)
                err, top = np.abs(got - want), np.abs(want).max()
                exact += list(err.max(axis=1) < 1e-5 * top)
                assert err.max() < 1e-2 * top, (shrink, batch, err.max())
            # exact for most images; the rest a rounding apart in float32 that lands a value one uint8 step apart
            assert np.mean(exact) > 0.9, (shrink, np.mean(exact))
    net = FusedNet(packed, precision="int8", activation_scales=scales)
    err, scale = _error(net, model, 64)
    assert err < 0.04 * scale  # as the per-row int8 kernel is held to


@pytest.mark.skipif(not supported(host_isa(), "int8"), reason="int8 needs AVX512-VNNI, which this CPU lacks")
def test_static_scales_apply_only_where_the_layout_allows_and_are_checked():
    """Where a consumer's input tiles need padding to quads (tiles of 1) or a producer writes part panels (8 of a
    16-wide one), that layer's inputs stay staged per row; bad scales are refused."""
    from g2gserve.export.calibration import activation_scales
    model = _model(kind="dense-params")  # 23 units: tiles of 1
    packed = pack_model(model, "auto")
    scales = activation_scales(packed, np.random.default_rng(1).standard_normal((32, 1, 28, 28)).astype(np.float32))
    net = FusedNet(packed, precision="int8", activation_scales=scales)
    assert net.static_layers < len(scales)
    err, scale = _error(net, model, 9)
    assert err < 0.04 * scale
    assert FusedNet(pack_model(_model(granularity="block"), "auto"), precision="int8",  # block 8, 8 channels
                    activation_scales=[0.01] * 3).static_layers == 0
    for bad in ([0.01], [0.01, 0.0, 0.01], [0.01, float("nan"), 0.01]):
        with pytest.raises(ValueError, match="activation scales must be 3 positive numbers"):
            FusedNet(pack_model(_model(granularity="block"), "auto"), precision="int8", activation_scales=bad)
    with pytest.raises(ValueError, match="activation scales are for precision int8"):
        FusedNet(pack_model(_model(granularity="block"), "auto"), activation_scales=[0.01] * 3)
