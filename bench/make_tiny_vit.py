"""Write a small randomly initialised ViT plus its image processor as a checkpoint folder.

No pretrained ViT can be had offline; this stands in for ``google/vit-base-patch16-224-in21k``
in offline runs (``configs/model/vit_tiny_random.yaml``). The weights depend only on the seed.

    python bench/make_tiny_vit.py runs/vit-tiny-random
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def make_vit(
    folder: Path,
    image_size: int = 112,
    patch_size: int = 16,
    hidden_size: int = 192,
    layers: int = 6,
    heads: int = 3,
    seed: int = 0,
) -> Path:
    """Save ``ViTModel`` weights (no head) and a ``ViTImageProcessor`` to ``folder``.

    Args:
        folder: Output folder (created; existing files are overwritten).
        image_size: Square input size; the processor resizes to it.
        patch_size: Patch edge in pixels.
        hidden_size: Width; the MLP is 4 times wider.
        layers: Transformer blocks.
        heads: Attention heads.
        seed: Seed of the random initialisation.

    Returns:
        ``folder``.
    """
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden_size,
    )
    torch.manual_seed(seed)
    model = ViTModel(config, add_pooling_layer=False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    # Mean and std 0.5 per channel, as the processor of google/vit-base-patch16-224-in21k.
    ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=Path("runs/vit-tiny-random"))
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=192)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = make_vit(args.folder, args.image_size, args.patch_size, args.hidden_size,
                      args.layers, args.heads, args.seed)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
