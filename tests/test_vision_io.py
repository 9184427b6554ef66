"""load_image / to_uint8 on real radiographs (DICOM, JPEG) and generated edge cases."""
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import dicom_path, jpeg_paths
from open_clip_cxr.vision import ImageReadError, load_image, to_uint8


def _dicom_path() -> str:
    return str(dicom_path())


def _jpeg_paths():
    return jpeg_paths()


def _write_dicom(path, pixels, photometric="MONOCHROME2", slope=None, intercept=None, window=None):
    """Minimal explicit-VR-little-endian secondary-capture DICOM with 16-bit unsigned pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# --- real DICOM -----------------------------------------------------------------------------------

def test_real_dicom_monochrome1_is_inverted():
    import pydicom

    path = _dicom_path()
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
    im = load_image(path)
    a = np.asarray(im).astype(np.float64)
    assert im.mode == "L" and a.shape == raw.shape
    assert a.max() - a.min() > 150  # uses the 8-bit range
    # MONOCHROME1 stores bone dark: after loading, intensity must run opposite to the raw values
    corr = np.corrcoef(raw[::7, ::7].ravel(), a[::7, ::7].ravel())[0, 1]
    assert corr < -0.99
    # and anatomically: aerated lungs darker than the mediastinum / spine
    h, w = a.shape
    lungs = np.concatenate([a[int(.2 * h):int(.5 * h), int(.15 * w):int(.35 * w)].ravel(),
                            a[int(.2 * h):int(.5 * h), int(.62 * w):int(.82 * w)].ravel()])
    mediastinum = a[int(.2 * h):int(.7 * h), int(.45 * w):int(.55 * w)]
    assert lungs.mean() + 20 < mediastinum.mean()


def test_real_dicom_from_bytes_fileobj_and_rgb():
    path = _dicom_path()
    data = Path(path).read_bytes()
    ref = np.asarray(load_image(path))
    # no name: detected by the "DICM" magic at offset 128
    assert np.array_equal(np.asarray(load_image(data)), ref)
    with open(path, "rb") as f:
        assert np.array_equal(np.asarray(load_image(f)), ref)
    rgb = np.asarray(load_image(path, mode="RGB"))
    assert rgb.shape == ref.shape + (3,)
    assert all(np.array_equal(rgb[..., c], ref) for c in range(3))


# --- synthetic DICOM: rescale, window, photometric ------------------------------------------------

@pytest.mark.parametrize("window", [(0, 1000), ([0, 300], [1000, 50])])  # multi-valued: first pair wins
def test_dicom_rescale_and_window(tmp_path, window):
    stored = np.tile(np.linspace(0, 1000, 101).round().astype(np.uint16), (4, 1))  # 4 x 101
    # slope 2, intercept -1000 -> -1000..1000; window 0 +- 500
    path = _write_dicom(tmp_path / "w.dcm", stored, slope=2, intercept=-1000, window=window)
    a = np.asarray(load_image(path)).astype(int)[0]
    value = stored[0] * 2.0 - 1000
    assert (a[value <= -500] == 0).all() and (a[value >= 500] == 255).all()
    mid = np.argmin(np.abs(value))
    assert abs(a[mid] - 128) <= 2
    inside = (value > -480) & (value < 480)
    assert (np.diff(a[inside]) > 0).all()  # strictly increasing inside the window


def test_dicom_without_window_and_monochrome1(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(100, 4000, size=(32, 40)).astype(np.uint16)
    p2 = _write_dicom(tmp_path / "m2.dcm", stored)
    p1 = _write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1")
    a2 = np.asarray(load_image(p2)).astype(int)
    a1 = np.asarray(load_image(p1)).astype(int)
    assert a2.min() == 0 and a2.max() == 255  # percentile stretch of 12-bit data
    assert np.array_equal(a1, 255 - a2)
    assert np.corrcoef(stored.ravel(), a2.ravel())[0, 1] > 0.99


# --- real JPEGs ---------------------------------------------------------------------------------------

def test_real_paediatric_jpegs():
    paths = _jpeg_paths()
    assert len(paths) >= 10
    for p in paths:
        im = load_image(p)
        with Image.open(p) as ref:
            assert im.size == ref.size
        a = np.asarray(im)
        assert im.mode == "L" and a.dtype == np.uint8 and a.std() > 10, p


# --- generated PNG / TIFF kinds ----------------------------------------------------------------------

def _gradient16():
    return np.tile(np.linspace(1000, 3000, 64).round().astype(np.uint16), (16, 1))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_keeps_contrast(tmp_path, fmt):
    arr = _gradient16()
    path = tmp_path / f"g16.{fmt.lower()}"
    Image.fromarray(arr).save(path, format=fmt)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    a = np.asarray(load_image(path)).astype(int)
    assert a.min() == 0 and a.max() == 255
    assert (np.diff(a[0]) >= 0).all() and len(np.unique(a[0])) > 50  # monotone, levels preserved


def test_16bit_small_values_not_stretched(tmp_path):
    arr = np.tile(np.arange(10, 200, 3, dtype=np.uint16), (4, 1))
    path = tmp_path / "small16.png"
    Image.fromarray(arr).save(path)
    assert np.array_equal(np.asarray(load_image(path)), arr.astype(np.uint8))


def test_grayscale_png_is_unchanged(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    path = tmp_path / "g.png"
    Image.fromarray(arr, "L").save(path)
    assert np.array_equal(np.asarray(load_image(path)), arr)
    assert np.array_equal(np.asarray(load_image(str(path))), arr)
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), arr)


def test_rgb_becomes_luminance():
    arr = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    expected = np.asarray(im.convert("L")).astype(int)
    got = np.asarray(load_image(im)).astype(int)
    assert np.abs(got - expected).max() <= 1
    assert np.abs(np.asarray(load_image(arr)).astype(int) - expected).max() <= 1


def test_rgba_composited_on_black(tmp_path):
    arr = np.full((10, 20, 4), 255, np.uint8)
    arr[:, 10:, 3] = 0      # right half fully transparent white
    arr[:, :5, 3] = 128     # a half-transparent strip
    path = tmp_path / "rgba.png"
    Image.fromarray(arr, "RGBA").save(path)
    a = np.asarray(load_image(path)).astype(int)
    assert (a[:, 10:] == 0).all() and (a[:, 5:10] == 255).all()
    assert (np.abs(a[:, :5] - 128) <= 1).all()


def test_palette(tmp_path):
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (6, 1))
    im = Image.fromarray(gray, "L").convert("RGB").quantize(colors=32)
    assert im.mode == "P"
    path = tmp_path / "p.png"
    im.save(path)
    a = np.asarray(load_image(path)).astype(int)
    assert np.abs(a - np.asarray(im.convert("L")).astype(int)).max() <= 1
    assert (np.diff(a[0]) > 0).all()


def test_numpy_inputs():
    g = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))
    assert np.array_equal(np.asarray(load_image(g)), g)
    assert np.array_equal(np.asarray(load_image(g[None])), g)  # CHW, one channel
    assert np.array_equal(np.asarray(load_image(np.repeat(g[None], 3, 0))), g)  # CHW RGB
    assert np.abs(np.asarray(load_image(g / 255.0)).astype(int) - g).max() <= 1  # float in [0, 1]
    wide = (g.astype(np.int32) * 100 + 5000)  # > 255: stretched to full range
    a = np.asarray(load_image(wide))
    assert a.min() == 0 and a.max() == 255


def test_to_uint8():
    a = np.array([[0, 1000], [2000, 4000]], np.uint16)
    assert to_uint8(a).tolist() == [[0, 64], [128, 255]]
    f = np.array([0.0, np.nan, 1.0, np.inf])
    assert to_uint8(f).tolist() == [0, 0, 255, 0]
    assert not to_uint8(np.full((3, 3), 7.0)).any()
    outlier = np.concatenate([np.linspace(0, 100, 1000), [1e6]])
    assert to_uint8(outlier, 0.0, 99.0)[500] > 100  # percentiles ignore the hot pixel
    u8 = np.arange(10, dtype=np.uint8)
    assert to_uint8(u8) is u8


# --- errors -------------------------------------------------------------------------------------------

def test_corrupt_file_names_file(tmp_path):
    bad = tmp_path / "broken_scan.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    with pytest.raises(ImageReadError, match="broken_scan.png") as e:
        load_image(bad)
    assert isinstance(e.value, ValueError) and e.value.name == str(bad)


def test_truncated_jpeg_names_file(tmp_path):
    src = _jpeg_paths()[0].read_bytes()
    bad = tmp_path / "cut_film.jpeg"
    bad.write_bytes(src[: len(src) // 2])
    with pytest.raises(ImageReadError, match="cut_film.jpeg"):
        load_image(bad)


def test_truncated_dicom_names_file(tmp_path):
    src = Path(_dicom_path()).read_bytes()
    bad = tmp_path / "cut_study.dcm"
    bad.write_bytes(src[: len(src) // 2])
    with pytest.raises(ImageReadError, match="cut_study.dcm"):
        load_image(bad)


def test_missing_empty_and_named_bytes(tmp_path):
    with pytest.raises(ImageReadError, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.jpg"):
        load_image(empty)
    with pytest.raises(ImageReadError, match="shard-0003/p10_s5"):
        load_image(b"not an image at all", name="shard-0003/p10_s5")
    with pytest.raises(ImageReadError, match="<file object>|BytesIO"):
        load_image(io.BytesIO(b"junk"))


def test_error_survives_pickle():
    # DataLoader workers ship exceptions across processes
    err = pickle.loads(pickle.dumps(ImageReadError("cannot read image 'x.png': bad")))
    assert isinstance(err, ImageReadError) and "x.png" in str(err)
