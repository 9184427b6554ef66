"""Which decoder layer of the unadapted SmolLM2 embeds reports best? (why `cxr-llm-small-l4`)

Mean-pools each decoder layer's token states of `cxr-llm-small` (SmolLM2-135M made
bidirectional, no training at all) and runs the text-robustness suite on the Open-I validation
split with each layer as the embedding. One forward pass per text serves every layer.

    python bench/bench_layer_probe.py --limit 100 --layers 2,4,8,16,30
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import open_clip  # noqa: E402
import open_clip_cxr  # noqa: F401,E402  (registers the models)
from open_clip_cxr.eval.robustness import openi_reports, run_robustness  # noqa: E402
from open_clip_cxr_train.supcon import length_chunks  # noqa: E402
from open_clip_cxr_train.speedups import FrozenCast  # noqa: E402


def layer_means(tower, tokenizer, texts, max_tokens=2048):
    """text -> (n_layers, D): the masked mean of each decoder layer's output (the last one
    after the decoder's final norm, as the tower's pooler sees it)."""
    llm, pad = tower.base_llm(), tower.config.pad_token_id
    ids = tokenizer(list(texts), context_length=128)
    mask = ids != pad
    out = {}
    for idx in length_chunks(mask.sum(1).tolist(), max_tokens):
        rows = torch.tensor(idx)
        states = []
        hooks = [layer.register_forward_hook(lambda m, a, o: states.append(o[0] if isinstance(o, tuple) else o))
                 for layer in llm.layers]
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                tower(input_ids=ids[rows], attention_mask=mask[rows])
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            states[-1] = llm.norm(states[-1])
        hs = torch.stack(states, 1).float()                       # (B, layers, T, D); padding trimmed
        m = mask[rows][:, None, :hs.shape[2], None].float()
        means = (hs * m).sum(2) / m.sum(2)
        for j, i in enumerate(idx):
            out[texts[i]] = means[j]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cxr-llm-small")
    ap.add_argument("--split", default="validate")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--layers", default="2,4,8,16,24,30", help="1-based decoder layers to probe")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = open_clip.create_model(args.model, pretrained_image=False).eval()
    tower = model.text.transformer.merge_lora()
    FrozenCast(tower, torch.bfloat16)
    tokenizer = open_clip.get_tokenizer(args.model)
    reports = openi_reports(args.split, limit=args.limit)
    store = {}

    def encoder(layer):
        def encode(texts):
            missing = [t for t in dict.fromkeys(texts) if t not in store]
            if missing:
                store.update(layer_means(tower, tokenizer, missing))
            return torch.nn.functional.normalize(torch.stack([store[t][layer - 1] for t in texts]), dim=-1)
        return encode

    print(f"{len(reports)} {args.split} reports, {args.model}, mean pooling of one layer, no training")
    print(f"{'layer':>5}  {'variant mean':>12}  {'impr->find':>10}  {'find->impr':>10}  {'error disc':>10}")
    for layer in [int(x) for x in args.layers.split(",")]:
        t = time.time()
        r = run_robustness(reports, encoder(layer), seed=0)
        print(f"{layer:>5}  {r['variant_to_original_mean_R@1']:>12.3f}  {r['impression_to_findings_R@1']:>10.3f}  "
              f"{r['findings_to_impression_R@1']:>10.3f}  {r['error_discrimination']['accuracy']:>10.3f}"
              f"   ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
