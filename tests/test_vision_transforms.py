"""cxr_transform: every input kind -> normalised 3xHxW tensor; padding, modes, augmentation."""
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import dicom_path, jpeg_paths
from open_clip_cxr.vision import cxr_transform, load_image, transforms_from_preprocess_cfg
from open_clip_cxr.vision.transforms import RandomAspectCrop, ResizeCover, ResizePad, Squash

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _dicom_path():
    return str(dicom_path())


def _jpeg_path():
    return jpeg_paths()[0]


def _norm_fill(fill):
    return torch.tensor([(fill / 255.0 - m) / s for m, s in zip(MEAN, STD)])


def _inputs(tmp_path):
    """One of each kind load_image accepts."""
    g16 = np.tile(np.linspace(1000, 3000, 48).round().astype(np.uint16), (32, 1))
    png16 = tmp_path / "g16.png"
    Image.fromarray(g16).save(png16)
    rgba = np.full((30, 40, 4), 200, np.uint8)
    rgba[:, 20:, 3] = 0
    pal = Image.fromarray(np.tile(np.arange(0, 240, 6, dtype=np.uint8), (30, 1))).convert("RGB").quantize(16)
    return {
        "dicom_path": _dicom_path(),
        "jpeg_path": _jpeg_path(),
        "png16_bytes": png16.read_bytes(),
        "rgba_pil": Image.fromarray(rgba, "RGBA"),
        "palette_pil": pal,
        "gray_array": np.tile(np.arange(0, 250, 5, dtype=np.uint8), (20, 1)),
        "rgb_pil": Image.new("RGB", (33, 21), (10, 200, 30)),
        "i16_pil": Image.fromarray(g16),
    }


@pytest.mark.parametrize("train", [False, True])
def test_every_input_kind(tmp_path, train):
    tf = cxr_transform(64, MEAN, STD, train=train)
    for kind, x in _inputs(tmp_path).items():
        y = tf(x)
        assert y.shape == (3, 64, 64) and y.dtype == torch.float32, kind
        assert torch.isfinite(y).all(), kind
        # gray replicated into all three channels before normalisation
        assert torch.allclose(y[0] * STD[0] + MEAN[0], y[2] * STD[2] + MEAN[2], atol=1e-5), kind


def test_16bit_contrast_survives_transform(tmp_path):
    x = _inputs(tmp_path)["png16_bytes"]
    y = cxr_transform(48, (0.0,) * 3, (1.0,) * 3, resize_mode="squash")(x)
    assert y.min() < 0.02 and y.max() > 0.98  # full range, not clipped to white


@pytest.mark.parametrize("fill", [0, 128])
def test_pad_keeps_aspect_and_fills(fill):
    im = Image.new("L", (200, 100), 255)  # 2:1 landscape, all white
    y = cxr_transform(64, MEAN, STD, resize_mode="pad", fill=fill)(im)
    white = torch.tensor([(1.0 - m) / s for m, s in zip(MEAN, STD)])
    filled = _norm_fill(fill)
    # content rows 16..47 (64 x 32), padding above and below equals the normalised fill
    assert torch.allclose(y[:, :16, :], filled[:, None, None].expand(3, 16, 64), atol=1e-5)
    assert torch.allclose(y[:, 48:, :], filled[:, None, None].expand(3, 16, 64), atol=1e-5)
    assert torch.allclose(y[:, 17:47, :], white[:, None, None].expand(3, 30, 64), atol=1e-5)


def test_pad_real_dicom_aspect():
    path = _dicom_path()
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    w, h = int(ds.Columns), int(ds.Rows)
    assert h > w  # portrait film
    y = cxr_transform(128, MEAN, STD, resize_mode="pad", fill=0)(path)
    pad = _norm_fill(0)[:, None]
    is_pad_col = torch.isclose(y, pad[..., None].expand_as(y), atol=1e-5).all(dim=0).all(dim=0)
    content = int((~is_pad_col).sum())
    assert abs(content - round(128 * w / h)) <= 2  # width scaled with the same factor as height


def test_non_square_and_modes():
    im = Image.new("L", (300, 100), 200)
    assert ResizePad((32, 64))(im).size == (64, 32)
    assert ResizeCover((32, 64))(im).size == (64, 32)
    assert Squash((32, 64))(im).size == (64, 32)
    y = cxr_transform((32, 64), MEAN, STD, resize_mode="crop")(Image.new("L", (100, 300), 255))
    assert y.shape == (3, 32, 64)
    assert torch.allclose(y[0], torch.full((32, 64), (1 - MEAN[0]) / STD[0]), atol=1e-5)  # no padding
    with pytest.raises(ValueError):
        cxr_transform(32, MEAN, STD, resize_mode="stretch")


def _asymmetric():
    a = np.zeros((120, 100), np.uint8)
    a[20:100, 10:40] = 255  # bright block on the image's left
    return Image.fromarray(a)


def _left_right(y):
    return float(y[0, :, :32].mean()), float(y[0, :, 32:].mean())


def test_no_horizontal_flip_by_default():
    random.seed(0)
    torch.manual_seed(0)
    tf = cxr_transform(64, MEAN, STD, train=True)
    im = _asymmetric()
    for _ in range(40):
        left, right = _left_right(tf(im))
        assert left > right


def test_hflip_when_asked():
    random.seed(0)
    torch.manual_seed(0)
    tf = cxr_transform(64, MEAN, STD, train=True, hflip=True)
    flips = []
    for _ in range(40):
        left, right = _left_right(tf(_asymmetric()))
        flips.append(left < right)
    assert any(flips) and not all(flips)


def test_train_is_random_eval_is_deterministic():
    x = np.asarray(Image.open(_jpeg_path()).convert("L"))
    train, ev = cxr_transform(64, MEAN, STD, train=True), cxr_transform(64, MEAN, STD)
    assert not torch.equal(train(x), train(x))
    assert torch.equal(ev(x), ev(x))


def test_random_aspect_crop_bounds():
    random.seed(1)
    crop = RandomAspectCrop((0.8, 1.0), (0.9, 1.1))
    im = Image.new("L", (400, 200))
    for _ in range(50):
        c = crop(im)
        area = c.width * c.height / (400 * 200)
        assert 0.7 <= area <= 1.0
        assert 0.85 * 2 <= c.width / c.height <= 1.15 * 2  # keeps the film's own aspect


def test_from_preprocess_cfg():
    cfg = dict(size=48, mean=MEAN, std=STD, interpolation="bicubic", resize_mode="longest", fill_color=128)
    tf = transforms_from_preprocess_cfg(cfg, train=False)
    assert any(isinstance(t, ResizePad) and t.fill == 128 for t in tf.transforms)
    y = tf(Image.new("L", (96, 48), 255))
    assert y.shape == (3, 48, 48)
    assert torch.allclose(y[:, 0, 0], _norm_fill(128), atol=1e-5)
    kinds = {m: type(transforms_from_preprocess_cfg(dict(cfg, resize_mode=m), False).transforms[1])
             for m in ("longest", "shortest", "squash")}
    assert kinds == {"longest": ResizePad, "shortest": ResizeCover, "squash": Squash}
    # OpenCLIP's default resize_mode is "shortest"
    assert isinstance(transforms_from_preprocess_cfg({"size": 32}, False).transforms[1], ResizeCover)
    train = transforms_from_preprocess_cfg(cfg, train=True, rotate=0, hflip=True)
    names = [type(t).__name__ for t in train.transforms]
    assert "RandomRotation" not in names and "RandomHorizontalFlip" in names


def test_from_openclip_preprocess_cfg_object():
    transform = pytest.importorskip("open_clip.transform")
    cfg = transform.PreprocessCfg(size=40, resize_mode="longest", fill_color=0)
    tf = transforms_from_preprocess_cfg(cfg, train=False)
    assert tf(Image.new("L", (80, 40), 255)).shape == (3, 40, 40)


def test_openclip_transform_with_load_image():
    """OpenCLIP's own transforms work on DICOM once load_image has decoded it."""
    transform = pytest.importorskip("open_clip.transform")
    tf = transform.image_transform(64, is_train=False, resize_mode="longest")
    y = tf(load_image(_dicom_path(), mode="RGB"))
    assert y.shape == (3, 64, 64) and torch.isfinite(y).all()


def test_pipeline_pickles():
    tf = cxr_transform(32, MEAN, STD, train=True, hflip=True)
    tf2 = pickle.loads(pickle.dumps(tf))
    assert tf2(Image.new("L", (40, 30), 100)).shape == (3, 32, 32)
