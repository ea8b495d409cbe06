"""Image preprocessing for CLIP: random crops for training, resize and center crop for evaluation."""

from __future__ import annotations

import logging
import numbers

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

logger = logging.getLogger(__name__)

# Per-channel RGB mean and standard deviation of OpenAI CLIP's image preprocessing.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def clip_transforms(image_size: int, train: bool, augment: bool = True) -> T.Compose:
    """Build the transform from an RGB PIL image to a normalised CLIP input tensor.

    With ``train=True`` and ``augment=True``: ``RandomResizedCrop(image_size, scale=(0.08, 1.0))``
    with bicubic interpolation, a random horizontal flip, ``ToTensor`` and normalisation with
    :data:`CLIP_MEAN` and :data:`CLIP_STD`. Otherwise (evaluation, or training without augmentation)
    the shorter side is resized to ``image_size`` with bicubic interpolation, the center is cropped to
    ``image_size`` x ``image_size``, then ``ToTensor`` and the same normalisation follow. That is
    OpenAI CLIP's own evaluation preprocessing.

    Args:
        image_size: side S of the square output in pixels, e.g. 224 for ViT-B/16.
        train: whether the transform is for training samples.
        augment: whether training uses random crops and flips; ignored when ``train`` is False.

    Returns:
        A transform mapping a PIL image to a (3, S, S) float32 tensor.

    Raises:
        ValueError: if ``image_size`` is not a positive int.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ValueError(f"image_size must be a positive int in pixels, got {image_size!r}. CLIP ViT-B uses 224.")
    image_size = int(image_size)
    to_normalised_tensor = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]

    if train and augment:
        return T.Compose([
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            *to_normalised_tensor,
        ])
    return T.Compose([
        T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        *to_normalised_tensor,
    ])
