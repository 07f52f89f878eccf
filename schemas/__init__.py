"""The data contract between `pipeline/` (writes shards) and `trainer/` (reads them).

This is the only package both sides import. It holds the input record format (`record`),
the findings/report types (`report`), the tokenized sample (`sample`), the shard manifest
(`manifest`) and the shard container format (`shards`).
"""
