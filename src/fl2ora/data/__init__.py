"""Datasets, image transforms and client partitioning for federated CLIP fine-tuning."""

from fl2ora.data.archive import default_cache_dir, extract_archive
from fl2ora.data.catalog import (
    CIFAR100_CLASSES,
    DOMAIN_DATASET_LOADERS,
    load_cifar100,
    load_domain_dataset,
)
from fl2ora.data.coop_splits import (
    SPLIT_DATASETS,
    load_caltech101,
    load_dtd,
    load_flowers102,
    load_food101,
    load_oxford_pets,
    load_split_dataset,
    read_split_file,
)
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
from fl2ora.data.domains import DomainData, load_office_home, load_vlcs, stratified_split
from fl2ora.data.pacs import PACS_CLASSES, PACS_DOMAINS, load_pacs
from fl2ora.data.partition import ClientPartition, dirichlet_partition, iid_partition, partition
from fl2ora.data.transforms import CLIP_MEAN, CLIP_STD, clip_transforms

__all__ = [
    "CIFAR100_CLASSES",
    "CIFAR10_CLASSES",
    "CLIP_MEAN",
    "CLIP_STD",
    "ClientPartition",
    "DATASET_LOADERS",
    "DEFAULT_TEMPLATE",
    "DOMAIN_DATASET_LOADERS",
    "DomainData",
    "ImageClassificationData",
    "ImageSamples",
    "PACS_CLASSES",
    "PACS_DOMAINS",
    "SPLIT_DATASETS",
    "clip_transforms",
    "default_cache_dir",
    "dirichlet_partition",
    "extract_archive",
    "iid_partition",
    "load_caltech101",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_domain_dataset",
    "load_dtd",
    "load_flowers102",
    "load_food101",
    "load_image_folder",
    "load_office_home",
    "load_oxford_pets",
    "load_pacs",
    "load_split_dataset",
    "load_vlcs",
    "partition",
    "read_split_file",
    "stratified_split",
    "subsample_per_class",
]
