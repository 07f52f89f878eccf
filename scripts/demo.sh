#!/usr/bin/env bash
# The README's main job on the shipped example data, end to end on CPU:
# tiny tokenizer -> validate -> shard -> train a tiny IXC2.5 (LoRA, DeepSpeed) -> save -> eval -> generate
# -> chat about a new image and a video.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/demo}
mkdir -p "$RUN"
set -x
xc-prep tiny-tokenizer --out "$RUN/tokenizer.model"
xc-prep validate data/data.txt --tokenizer "$RUN/tokenizer.model" --hd-num 4 --max-length 8192
xc-prep shard data/data.txt --tokenizer "$RUN/tokenizer.model" --hd-num 4 --max-length 8192 \
    --out shards/ --workers 2 --overwrite
xc-prep info shards/ --verify
xc-train --shards shards/ --model tiny --output-dir "$RUN" --recipe lora --resume none \
    --max-length 8192 --global-batch-size 2 --learning-rate 2e-3 --epochs 1 --num-workers 1
xc-train eval --model "$RUN/final" --shards shards/
xc-train generate --model "$RUN/final" --shards shards/ --sample 0 --max-new-tokens 16
xc-chat --adapter "$RUN/final" --image data/images/chelsea.jpg --prompt "What is in this image?" \
    --max-new-tokens 16 --temperature 0 --show-prompt
xc-chat --adapter "$RUN/final" --video data/videos/rocket_pan.mp4 --prompt "What happens in this video?" \
    --max-new-tokens 16 --temperature 0
