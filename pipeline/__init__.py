"""Offline data preparation: validate → tokenize → tile → shard. Needs no torch or deepspeed."""
