"""A tiny CLIP (Radford et al. 2021): images and captions embedded in one space by a
contrastive loss, then zero-shot classification by comparing an image with class captions.

The data are synthetic: small RGB images of a coloured shape on a dark background, captioned
"a <colour> <shape>". Captions are word ids; the text encoder averages word embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

COLOURS = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.2, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("a", *COLOURS, *SHAPES)


def caption_ids(caption: str) -> list[int]:
    """Word ids of a caption built from ``WORDS``."""
    try:
        return [WORDS.index(w) for w in caption.split()]
    except ValueError as error:
        raise ValueError(f"caption {caption!r} uses a word outside {WORDS}") from error


def class_captions() -> list[str]:
    """One caption per (colour, shape) class, in class-index order."""
    return [f"a {c} {s}" for c in COLOURS for s in SHAPES]


def draw_shape(shape: str, colour: str, size: int, generator: torch.Generator) -> Tensor:
    """One (3, size, size) image: a shape of random position and scale, plus pixel noise."""
    if shape not in SHAPES or colour not in COLOURS:
        raise ValueError(f"shape must be in {SHAPES} and colour in {tuple(COLOURS)}")
    r = size * (0.18 + 0.12 * torch.rand((), generator=generator).item())
    cx, cy = (r + (size - 2 * r) * torch.rand(2, generator=generator)).tolist()
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    elif shape == "square":
        inside = ((x - cx).abs() <= r * 0.85) & ((y - cy).abs() <= r * 0.85)
    else:  # upward triangle: below the top vertex, inside both slanted edges
        inside = (y >= cy - r) & (y <= cy + r) & ((x - cx).abs() <= (y - (cy - r)) / 2)
    image = inside.float()[None] * torch.tensor(COLOURS[colour])[:, None, None]
    return (image + 0.05 * torch.randn(image.shape, generator=generator)).clamp(0, 1)


def make_shapes(n: int, size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` images (n, 3, size, size) and their class indices (n,) into ``class_captions()``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(COLOURS) * len(SHAPES), (n,), generator=g)
    colours = list(COLOURS)
    images = torch.stack(
        [
            draw_shape(SHAPES[k % len(SHAPES)], colours[k // len(SHAPES)], size, g)
            for k in labels.tolist()
        ]
    )
    return images, labels


@dataclass
class CLIPConfig:
    image_size: int = 16
    projection_dim: int = 32  # width of the shared image-text space
    n_embd: int = 32  # convolution channels and word-embedding width
    init_temperature: float = 0.07


class TinyCLIP(nn.Module):
    """Image encoder (two convolutions + pooling) and text encoder (mean of word embeddings),
    each followed by a linear projection to ``projection_dim`` and L2 normalization."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        h = config.n_embd
        self.image_encoder = nn.Sequential(
            nn.Conv2d(3, h, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(h, h, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(h, config.projection_dim),
        )
        self.word_embedding = nn.Embedding(len(WORDS), h)
        self.text_projection = nn.Linear(h, config.projection_dim)
        self.log_inv_temperature = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))

    def embed_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> unit vectors (B, D)."""
        return nn.functional.normalize(self.image_encoder(images), dim=-1)

    def embed_texts(self, word_ids: Tensor) -> Tensor:
        """(B, L) word ids -> unit vectors (B, D)."""
        return nn.functional.normalize(
            self.text_projection(self.word_embedding(word_ids).mean(1)), dim=-1
        )

    def forward(self, images: Tensor, word_ids: Tensor) -> Tensor:
        """Similarity logits (B, B): image i against caption j, scaled by 1 / temperature."""
        scale = self.log_inv_temperature.exp().clamp(max=100)
        return scale * self.embed_images(images) @ self.embed_texts(word_ids).T


def contrastive_loss(logits: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE on (B, B) logits whose diagonal holds the matching pairs."""
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be square (B, B), got {tuple(logits.shape)}")
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (
        nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)
    )


@torch.no_grad()
def zero_shot_classify(model: TinyCLIP, images: Tensor, captions: list[str]) -> Tensor:
    """Index (B,) of the caption most similar to each image."""
    model.eval()
    word_ids = torch.tensor([caption_ids(c) for c in captions])
    return (model.embed_images(images) @ model.embed_texts(word_ids).T).argmax(-1)
