import numpy as np
import pytest
import torch

from g2gserve.data.datasets import DEBIAN_FASHION_MNIST, DataError, augment_crop_flip, batches, load_split, read_idx
from g2gserve.data.preprocess import Preprocess


def test_idx_directory(idx_dir):
    train = load_split("fashion-mnist", "train", idx_dir)
    test = load_split("fashion-mnist", "test", idx_dir)
    assert train.x.shape == (256, 1, 28, 28) and train.x.dtype == torch.uint8
    assert test.y.shape == (64,) and test.y.dtype == torch.int64
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10


def test_npz_directory_and_subdirectory(npz_dir):
    for d in (npz_dir, npz_dir / "cifar10"):
        train = load_split("cifar10", "train", d)
        assert train.x.shape == (192, 3, 32, 32)
        assert train.classes == [f"class{i}" for i in range(10)]


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split("fashion-mnist", "train", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"no cifar10 data in .*train.npz.*cifar.py unpack"):
        load_split("cifar10", "train", tmp_path)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_split("fashion-mnist", "train", tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_split("mnist", "train", tmp_path)


def test_corrupt_files_are_reported(tmp_path, idx_dir):
    broken = idx_dir / "train-images-idx3-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_split("fashion-mnist", "train", idx_dir)
    (tmp_path / "train.npz").write_bytes(b"junk")
    (tmp_path / "test.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="train.npz: cannot read"):
        load_split("cifar10", "train", tmp_path)


def test_nothing_is_downloaded_with_data_dir(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(DataError):
        load_split("fashion-mnist", "train", tmp_path)


def test_download_path_uses_torchvision(tmp_path, monkeypatch):
    import torchvision

    class Fake:
        def __init__(self, root, train, download):
            assert download and root == str(tmp_path)
            self.data = torch.zeros(4, 32, 32, 3, dtype=torch.uint8).numpy()
            self.targets = [0, 1, 2, 3]
            self.classes = [f"k{i}" for i in range(10)]
    monkeypatch.setenv("G2G_DATA", str(tmp_path))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Fake)
    data = load_split("cifar10", "test")
    assert data.x.shape == (4, 3, 32, 32) and data.classes[1] == "k1"


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_from_the_debian_package():
    test = load_split("fashion-mnist", "test")
    assert test.x.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(test.y), torch.full((10,), 1000))
    raw = read_idx(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert np.array_equal(raw, test.y.numpy())


def test_augmentation_and_batches_are_reproducible(npz_dir):
    data = load_split("cifar10", "train", npz_dir)
    a = [x for x, _ in batches(data, 50, torch.Generator().manual_seed(1), augment=True)]
    b = [x for x, _ in batches(data, 50, torch.Generator().manual_seed(1), augment=True)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].shape == (50, 3, 32, 32)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    out = augment_crop_flip(x, torch.Generator().manual_seed(0), pad=1)
    assert out.shape == x.shape


def test_preprocess_fit_matches_numpy(npz_dir):
    data = load_split("cifar10", "train", npz_dir)
    pre = Preprocess.fit(data.x)
    ref = data.x.numpy().astype(np.float64) / 255
    assert np.allclose(pre.mean, ref.mean((0, 2, 3))) and np.allclose(pre.std, ref.std((0, 2, 3)), rtol=1e-4)
    y = pre(data.x)
    assert abs(float(y.mean())) < 1e-3
    with pytest.raises(ValueError, match="expected images of shape"):
        pre(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))


def test_rank_shards_make_up_the_single_process_batches(npz_dir):
    data = load_split("cifar10", "train", npz_dir)  # 192 images: batches of 50 leave a last batch of 42
    whole = list(batches(data, 50, torch.Generator().manual_seed(3), augment=True))
    shards = [list(batches(data, 50, torch.Generator().manual_seed(3), augment=True, rank=r, world=3)) for r in range(3)]
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([s[i][0] for s in shards]), x) and torch.equal(torch.cat([s[i][1] for s in shards]), y)
