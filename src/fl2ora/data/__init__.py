"""Datasets, image transforms and client partitioning for federated CLIP fine-tuning."""

from fl2ora.data.archive import default_cache_dir, extract_archive
from fl2ora.data.datasets import (
    CIFAR10_CLASSES,
    DATASET_LOADERS,
    DEFAULT_TEMPLATE,
    ImageClassificationData,
    ImageSamples,
    load_cifar10,
    load_dataset,
    load_image_folder,
    subsample_per_class,
)
from fl2ora.data.partition import ClientPartition, dirichlet_partition, iid_partition, partition
from fl2ora.data.transforms import CLIP_MEAN, CLIP_STD, clip_transforms

__all__ = [
    "CIFAR10_CLASSES",
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASET_LOADERS",
    "DEFAULT_TEMPLATE",
    "ClientPartition",
    "ImageClassificationData",
    "ImageSamples",
    "clip_transforms",
    "default_cache_dir",
    "dirichlet_partition",
    "extract_archive",
    "iid_partition",
    "load_cifar10",
    "load_dataset",
    "load_image_folder",
    "partition",
    "subsample_per_class",
]
