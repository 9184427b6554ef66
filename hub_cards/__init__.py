"""Model cards and Hub upload for exported open_clip_cxr folders."""
