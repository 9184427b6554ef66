"""`open-clip-cxr convert`: the authors' releases -> our formats.

    open-clip-cxr convert --from llm2vec  --src LLM2VEC4CXR_DIR --out DIR
        -> our text tower as a transformers folder (AutoModel after `import open_clip_cxr`;
           usable as a tower's `base_weights`)
    open-clip-cxr convert --from llm2clip --src CKPT --out DIR [--text-base LLM2VEC4CXR_DIR] [--merge-lora]
        -> an OpenCLIP folder (`local-dir:DIR`), checked against the converted model on reload
"""
import logging
from pathlib import Path


def add_arguments(parser):
    parser.add_argument("--from", dest="source", required=True, choices=["llm2vec", "llm2clip"],
                        help="llm2vec: the llm2vec4cxr text encoder; llm2clip: the LLM2CLIP4CXR CLIP checkpoint")
    parser.add_argument("--src", required=True,
                        help="source folder or checkpoint file (.safetensors/.bin/.pt, DeepSpeed folder)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--merge-lora", action="store_true", help="llm2clip: fold LoRA into the weights")
    parser.add_argument("--model", default="cxr-llm",
                        help="llm2clip: OpenCLIP config (name or JSON file) to convert into")
    parser.add_argument("--text-base", default=None,
                        help="llm2clip: llm2vec4cxr folder (or our converted one) for the decoder and pooler")
    parser.add_argument("--tokenizer", default=None,
                        help="llm2clip: tokenizer folder (default: --text-base, else the config's)")
    parser.add_argument("--adapter-name", default="llm2clip", help="llm2clip: the trained LoRA adapter's name")
    parser.add_argument("--lora-alpha", type=float, default=None,
                        help="llm2clip: LoRA alpha (not stored in the weights; default: the config's, 32)")
    parser.add_argument("--pooler-from", default="auto", choices=["auto", "checkpoint", "text_base"],
                        help="llm2clip: where the latent-attention pooler comes from (auto: text_base when given)")
    parser.add_argument("--pooler", default="convert", choices=["convert", "drop"],
                        help="llm2vec: convert the latent-attention pooler, or drop it (decoder only, mean pooling)")
    parser.add_argument("--latent-heads", type=int, default=8,
                        help="llm2vec: latent-attention heads (not stored in the weights; the authors use 8)")
    parser.add_argument("--instruction-separator-id", type=int, default=None,
                        help="llm2vec: separator token id for instructions")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="llm2vec: saved dtype")


def _tokenizer(args, model_cfg):
    import open_clip
    text_cfg = model_cfg["text_cfg"]
    source = args.tokenizer or (args.text_base if args.text_base and (Path(args.text_base) / "tokenizer.json").is_file()
                                else text_cfg.get("hf_tokenizer_name"))
    import open_clip_cxr  # noqa: F401  (its hooks put our tokenizer under open_clip.factory.HFTokenizer)
    try:
        # ours, as `get_tokenizer` builds it: the config's text options (`drop_admin_lines`,
        # `fold_capitals`) apply to the reference embeddings and stay out of tokenizer_config.json
        return open_clip.factory.HFTokenizer(str(source), context_length=text_cfg.get("context_length"),
                                             **{**text_cfg.get("tokenizer_kwargs", {}), "trust_remote_code": False})
    except Exception as e:
        raise RuntimeError(f"could not load the tokenizer from {source!r} ({e}); pass --tokenizer DIR") from e


def run(args) -> int:
    import torch
    from open_clip_cxr.errors import UsageError
    if not Path(args.src).exists():
        raise UsageError(f"--src {args.src} does not exist; give the authors' release folder or checkpoint file")
    if args.source == "llm2vec":
        from .llm2vec import convert_llm2vec, save_text_tower
        model = convert_llm2vec(args.src, pooler=args.pooler, latent_heads=args.latent_heads,
                                instruction_separator_id=args.instruction_separator_id,
                                dtype=getattr(torch, args.dtype))
        out = save_text_tower(model, args.out, tokenizer_src=args.src)
        print(f"wrote {out}: {model.config.pooling} pooling, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
        return 0
    from .export import embeddings, export_folder, verify_export
    from .llm2clip import convert_llm2clip
    model, model_cfg, preprocess = convert_llm2clip(
        args.src, args.model, text_base=args.text_base, adapter_name=args.adapter_name,
        lora_alpha=args.lora_alpha, pooler_from=args.pooler_from)
    tokenizer = _tokenizer(args, model_cfg)
    reference = embeddings(model, tokenizer)
    out = export_folder(model, model_cfg, tokenizer, args.out, preprocess_cfg=preprocess, merge_lora=args.merge_lora)
    diffs = verify_export(out, reference)
    logging.info(f"reload check: {diffs}")
    print(f"wrote {out} (LoRA {'merged' if args.merge_lora else 'unmerged'}); reload max abs diff "
          + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    return 0
