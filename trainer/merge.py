"""`xc-merge`: fold a LoRA adapter into its base and write a full checkpoint in the official layout.

W += (alpha / r) · B · A on the five target linears (PEFT's merge); every other tensor — the
Plora and unused lora_sft/dpo/web weights, norms, ViT, vision_proj, separators — is written with
the bytes it was loaded with. The result loads with `--model` like the released checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from trainer.modelio import ADAPTER_CONFIG, resolve_model_dir
from trainer.weights import CheckpointError, load_config, load_model, save_model


def merge(adapter: Path, base: str | None, out: Path, *, overwrite: bool = False) -> Path:
    from peft import PeftConfig, PeftModel

    if not (adapter / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{adapter}: no {ADAPTER_CONFIG}; expected a LoRA adapter folder from xc-train"
        )
    base_ref = base or PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    base_dir = resolve_model_dir(base_ref)
    dtype = load_config(base_dir).dtype
    model = load_model(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    save_model(merged, out, dtype=dtype, copy_from=base_dir, overwrite=overwrite)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xc-merge", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--adapter", type=Path, required=True, help="adapter folder written by xc-train --recipe lora"
    )
    parser.add_argument(
        "--base", default=None, help="base model folder or hub id (default: the adapter's recorded base)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder for the merged checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace weights already in --out")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        with torch.no_grad():
            merge(args.adapter, args.base, args.out, overwrite=args.overwrite)
    except (OSError, CheckpointError, ValueError) as e:  # OSError: missing folder, full disk, ...
        print(f"xc-merge: error: {e}", file=sys.stderr)
        return 1
    print(f"merged {args.adapter} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
