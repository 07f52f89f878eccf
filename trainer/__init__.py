"""The streaming trainer: native IXC2.5 model, shard loader, DeepSpeed training loop."""
