"""Data: the synthetic scene world, WebDataset shard I/O, caption blending and aspect-ratio buckets.

    from dalle3_fast.data.world import generate, captions, parse_caption, detect, compare, prompt_cases
    from dalle3_fast.data.shards import ShardWriter, iter_samples, expand_shards, ShardStats
    from dalle3_fast.data.blending import BlendedShardDataset
    from dalle3_fast.data.buckets import TINY_BUCKETS, DALLE3_BUCKETS, BucketBatchSampler

Submodules are imported on use; importing ``dalle3_fast.data`` alone loads nothing heavy.
"""
