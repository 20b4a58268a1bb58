"""Issue 14 item 4: one garment in every mode Pillow opens gets the answer of its 8-bit PNG."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from g2gserve.data.images import UnsupportedImage, decode_image, encode_png
from g2gserve.data.preprocess import Preprocess

from conftest import tiny_config
from test_export import _trained_like

SHAPE = (1, 28, 28)


def _garment() -> np.ndarray:
    """A light, smooth shape on a black background (what Fashion-MNIST looks like), uint8 28x28."""
    y, x = np.mgrid[:28, :28]
    body = ((x - 14) ** 2 / 60 + (y - 15) ** 2 / 140) < 1
    return np.where(body, 120 + 4 * y + x, 0).clip(0, 255).astype(np.uint8)


def _save(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _encodings(g: np.ndarray) -> dict[str, bytes]:
    """The same garment in each encoding; transparent pixels hide a bright colour underneath."""
    alpha = np.where(g > 0, 255, 0).astype(np.uint8)
    hidden = np.where(g > 0, g, 255).astype(np.uint8)  # white under the transparent background
    palette = Image.fromarray(hidden).convert("P")  # grey palette: index == value
    palette.info["transparency"] = 255
    return {
        "I;16 (16-bit grey PNG)": _save(Image.fromarray(g.astype(np.uint16) * 257)),
        "I (32-bit grey TIFF)": _save(Image.fromarray(g.astype(np.int32) * 257), "TIFF"),
        "F (float TIFF)": _save(Image.fromarray(g.astype(np.float32)), "TIFF"),
        "LA": _save(Image.fromarray(np.stack([hidden, alpha], -1), "LA")),
        "RGBA": _save(Image.fromarray(np.stack([hidden] * 3 + [alpha], -1), "RGBA")),
        "P with transparency": _save(palette, transparency=255),
        "L with a transparent colour": _save(Image.fromarray(hidden), transparency=255),
        "CMYK TIFF": _save(Image.fromarray(g).convert("RGB").convert("CMYK"), "TIFF"),
        "CMYK JPEG": _save(Image.fromarray(g).convert("RGB").convert("CMYK"), "JPEG", quality=100),
        "1 (bilevel)": _save(Image.fromarray(g).point(lambda v: 255 if v else 0).convert("1")),
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = _trained_like(tiny_config()).eval()
    pre = Preprocess(1, 28, 28, (0.3,), (0.35,))
    return lambda images: net(pre(images)).softmax(1)


def test_every_mode_gets_the_answer_of_the_8bit_png(model):
    g = _garment()
    reference = decode_image(encode_png(torch.from_numpy(g)[None]), SHAPE)
    assert torch.equal(reference[0], torch.from_numpy(g))
    with torch.no_grad():
        expected = model(reference[None])[0]
        for name, data in _encodings(g).items():
            decoded = decode_image(data, SHAPE)
            if name == "1 (bilevel)":  # a bilevel image keeps only the silhouette: compare that
                assert torch.equal(decoded[0] > 0, reference[0] > 0), name
                continue
            if "JPEG" not in name:  # lossless: the very same pixels
                assert torch.equal(decoded, reference), name
            got = model(decoded[None])[0]
            assert (got - expected).abs().max() < 0.01, (name, got, expected)


def test_rgb_models_get_the_same_pixels_in_every_channel():
    g = _garment()
    rgb = decode_image(_save(Image.fromarray(g.astype(np.uint16) * 257)), (3, 28, 28))
    assert rgb.shape == (3, 28, 28) and all(torch.equal(rgb[c], torch.from_numpy(g)) for c in range(3))


def test_a_mode_without_a_conversion_is_refused_with_415():
    lab = _save(Image.new("LAB", (8, 8)), "TIFF")
    with pytest.raises(UnsupportedImage):
        decode_image(lab, SHAPE)


def _pillow_only(data: bytes, shape) -> np.ndarray | type:
    """What ``decode_array`` gives without libspng (an array, or the ImageError class it raises)."""
    from g2gserve.data import images
    saved, images.pyspng = images.pyspng, None
    try:
        return images.decode_array(data, shape)
    except images.ImageError as e:
        return type(e)
    finally:
        images.pyspng = saved


def test_libspng_decodes_plain_pngs_as_pillow_does_and_leaves_the_rest_to_it(monkeypatch):
    """The fast path (8-bit PNG in the model's mode and size) gives Pillow's pixels; everything else goes the Pillow
    way, including what libspng refuses."""
    from g2gserve.data import images
    if images.pyspng is None:
        pytest.skip("pyspng is not installed")
    calls = []
    load = images.pyspng.load
    monkeypatch.setattr(images.pyspng, "load", lambda data: (calls.append(1), load(data))[1])
    rng = np.random.default_rng(3)
    g, rgb = _garment(), rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    noise = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    plain = {"grey": (_save(Image.fromarray(g)), SHAPE), "noise": (_save(Image.fromarray(noise)), SHAPE),
             "grey, best compression": (_save(Image.fromarray(g), compress_level=9), SHAPE),
             "RGB for an RGB model": (_save(Image.fromarray(rgb)), (3, 28, 28))}
    others = {"grey, transparent colour": (_save(Image.fromarray(g), transparency=0), SHAPE),
              "RGB for a grey model": (_save(Image.fromarray(rgb)), SHAPE),
              "grey, other size": (_save(Image.fromarray(noise[:20, :24])), SHAPE),
              "16-bit": (_save(Image.fromarray(g.astype(np.uint16) * 257)), SHAPE)}
    for name, (data, shape) in {**plain, **others}.items():
        calls.clear()
        got = images.decode_array(data, shape)
        assert np.array_equal(got, _pillow_only(data, shape)), name
        assert bool(calls) == (name in plain), name
    good = _save(Image.fromarray(noise))
    corrupt = {"bad CRC": good[:40] + bytes([good[40] ^ 0xFF]) + good[41:], "truncated": good[:-30],
               "IHDR only": good[:33]}
    for name, data in corrupt.items():
        try:
            got = images.decode_array(data, SHAPE)
        except images.ImageError as e:
            got = type(e)
        expected = _pillow_only(data, SHAPE)
        assert (got is expected) if isinstance(expected, type) else np.array_equal(got, expected), name
