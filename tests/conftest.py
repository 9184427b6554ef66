"""Tests run offline, on the CPU, with tiny models built in the test."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny():
    """(model, preprocess, tokenizer) for the random `cxr-llm-tiny`, eval mode."""
    import open_clip
    import open_clip_cxr
    torch.manual_seed(0)
    model, _, preprocess = open_clip_cxr.create_model_and_transforms("cxr-llm-tiny")
    return model.eval(), preprocess, open_clip.get_tokenizer("cxr-llm-tiny")


@pytest.fixture()
def one_thread_fresh_accelerate():
    """For tests that train: one torch thread (2 shared cores: threading only adds contention) and
    accelerate's global state reset before and after, so runs in one process do not leak into each other."""
    from open_clip_cxr_train import common
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    common.reset_accelerator_state()
    yield
    common.reset_accelerator_state()
    torch.set_num_threads(threads)
