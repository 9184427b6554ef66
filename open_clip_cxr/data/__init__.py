"""Data pipeline: dataset sources -> WebDataset shards (`shard_writer`) -> loaders (`loader`).

Every reader of reports goes through the source registry (`registry`: `iter_source` for shards,
`iter_reports` for stage 1 and eval); a new dataset is one `@register_source` reader.

Names are resolved lazily so that `import open_clip_cxr.data` (and the CLI's --help) does
not pull in torch; the loader imports it when first used.
"""
import importlib

_EXPORTS = {
    "Sample": "records", "Skipped": "records", "iter_source": "registry", "iter_reports": "registry",
    "register_source": "registry", "sources": "registry",
    "EncodeOptions": "encode",
    "ShardLimits": "shard_writer", "write_shards": "shard_writer", "format_summary": "shard_writer",
    "ShardWriterError": "shard_writer",
    "load_manifest": "manifest", "shard_urls": "manifest", "count_samples": "manifest",
    "make_loader": "loader", "SampleSource": "loader", "split_tasks": "loader",
    "TRAIN_TEXT_CHOICE": "text_choice", "choose_text": "text_choice",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
