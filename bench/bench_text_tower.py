"""Our bidirectional text tower vs a plain transformers `AutoModel` forward of the same weights.

Same batch, same lengths (padded to the longest text, as a plain HF pipeline would). Target:
overhead <= 5 %. Also texts/s of the full tower (latent attention) in fp32 and bf16, and the
saving from trimming OpenCLIP's pad-to-context tokens.

    python bench/bench_text_tower.py [--model cxr-llm-small] [--batch 32]
"""
import argparse

import open_clip
import torch
from transformers import AutoModel

import open_clip_cxr  # noqa: F401  (registers the models)
from bench_common import machine, table, timeit_interleaved
from open_clip_cxr.text.pooling import masked_mean

REPORTS = [
    "The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.",
    "Moderate right pleural effusion with adjacent atelectasis. Left lung is clear. ETT 4 cm above the carina.",
    "No acute cardiopulmonary process.",
    "Mild cardiomegaly. Pulmonary vascular congestion and small bilateral effusions, consistent with CHF.",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cxr-llm-small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = open_clip.create_model(args.model).eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    tower = model.text.transformer.merge_lora()   # LoRA merged, as at inference
    texts = [REPORTS[i % len(REPORTS)] * (1 + i % 3) for i in range(args.batch)]
    full = tokenizer(texts)                                    # padded to the context length
    mask_full = full != tower.config.pad_token_id
    longest = int(mask_full.sum(1).max())
    ids, mask = full[:, :longest], mask_full[:, :longest]
    plain = AutoModel.from_config(tower.config.llm_config()).eval()
    plain.load_state_dict(tower.base_llm().state_dict())

    rows, speeds = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            t = timeit_interleaved({
                "plain": lambda: masked_mean(plain(input_ids=ids, attention_mask=mask).last_hidden_state, mask),
                "ours_mean": lambda: masked_mean(tower.llm(**_bidir_inputs(tower, ids, mask)).last_hidden_state, mask),
                "tower": lambda: tower(input_ids=ids),
                "padded": lambda: tower(input_ids=full),
            }, repeat=args.repeat)
        t_plain, t_ours_mean, t_tower, t_padded = t["plain"], t["ours_mean"], t["tower"], t["padded"]
        speeds[name] = args.batch / t_tower
        rows += [
            [name, "plain AutoModel (causal) + mean pool", f"{t_plain * 1e3:.0f}", f"{args.batch / t_plain:.1f}", "-"],
            [name, "ours: bidirectional decoder + mean pool", f"{t_ours_mean * 1e3:.0f}",
             f"{args.batch / t_ours_mean:.1f}", f"{(t_ours_mean / t_plain - 1) * 100:+.1f}%"],
            [name, "ours: full tower (latent attention + norm)", f"{t_tower * 1e3:.0f}",
             f"{args.batch / t_tower:.1f}", f"{(t_tower / t_plain - 1) * 100:+.1f}%"],
            [name, f"ours: full tower, input padded to {full.shape[1]}", f"{t_padded * 1e3:.0f}",
             f"{args.batch / t_padded:.1f}", f"{(t_padded / t_plain - 1) * 100:+.1f}%"],
        ]
    print(f"{args.model}, batch {args.batch}, longest {longest} tokens; {machine()}")
    print(table(rows, ["dtype", "forward", "ms", "texts/s", "vs plain"]))
    print(f"full tower texts/s: fp32 {speeds['float32']:.1f}, bf16 {speeds['bfloat16']:.1f} "
          f"({speeds['bfloat16'] / speeds['float32']:.2f}x)")


def _bidir_inputs(tower, ids, mask):
    """What `CXRTextModel.forward` hands its decoder (positions, 4D bidirectional mask)."""
    from open_clip_cxr.text.bidirectional import padding_mask_4d
    embeds = tower.base_llm().get_input_embeddings()(ids)
    return dict(inputs_embeds=embeds, attention_mask=padding_mask_4d(tower.base_llm().config, embeds, mask),
                position_ids=(mask.long().cumsum(1) - 1).clamp_min(0), use_cache=False)


if __name__ == "__main__":
    main()
