"""Checkpoints in and out: the authors' releases -> our format, LoRA merge, OpenCLIP Hub folders.

- `llm2vec`: lukeingawesome/llm2vec4cxr (text encoder) -> our `CXRTextModel` folder;
- `llm2clip`: the LLM2CLIP4CXR CLIP checkpoint -> an OpenCLIP `cxr-llm` model;
- the latent-attention layouts those use live in the library (`open_clip_cxr.text.pooler_layouts`);
- `checkpoints`: safe reading (safetensors / weights_only / DeepSpeed ZeRO) and clear mismatch errors;
- `lora`: merge for release, adapter-only files for fine-tuners;
- `export`: the OpenCLIP folder + `open-clip-cxr export`; `cli`: `open-clip-cxr convert`.
"""
