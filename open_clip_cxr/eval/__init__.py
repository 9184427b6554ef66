"""Evaluation: study-level retrieval, zero-shot findings, retrieval-based report generation
(text metrics, GREEN) and the text-robustness suite. Submodules import lazily: import the one you need.

- retrieval: chunked top-k, ranks of true matches, recall@K, top-k CSV
- encode: embed shards / texts / images with any OpenCLIP model
- gallery: static HTML page of retrieval examples
- zeroshot: prompt-ensemble finding classification, rank AUC
- green: GREEN prompt, parser, score, and a batched cached LLM judge
- report_gen, text_metrics: nearest-report generation; BLEU/ROUGE-L/CIDEr/METEOR/BERTScore
- robustness: variant/section retrieval and error discrimination for any text encoder
- probe: fixed probe embeddings (the export / push round-trip check)
- cli: `open-clip-cxr eval`
"""
