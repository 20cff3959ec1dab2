"""Dataset registry: every dataset as in-memory tensors with fixed splits and batched augmentation.

Layout: `registry` (names, sources, loading), `build` (the splits and normalisation every source goes through),
`dataset` (the in-memory `Dataset` and its augmentation), `folders` (decoding and caching what the folder datasets
share), and one module per source — `sklearn_digits`, `mnist5k`, `torchvision_sets`, `tinyimagenet`, `basicmotions`,
`uci_har`, the generated `cluttered`, `digit_addition`, `mnist_pairs` and `mnist_scenes` (with `digit_sources`, the
disjoint source digits they share), and the segmentation folders `voc` and `cityscapes`.

Why tensors and not DataLoaders: the benchmark's datasets are small enough to live in (GPU)
memory, and a per-sample Python transform would dominate training time on small networks.

Protocol (identical on every call and every machine):
- Splits. Datasets with an official test split keep it; validation is a stratified 10 % of the
  official training set (5 000 images for CIFAR). The embedded datasets have no official test
  split: a stratified 20 % of the whole set becomes test, then 10 % of the rest validation.
  All splits use ``SPLIT_SEED``, never a run seed, so every run sees the same examples; segmentation tasks, whose
  labels are maps with no class to stratify by, are carved by a permutation drawn with it. The generated tasks
  build all three splits themselves, each from its own disjoint set of source digits (`digit_sources`), and
  nothing is carved from them.
- Pixels are scaled to [0, 1], then normalised per channel with the mean/std of the training
  split only (validation and test must not leak into the statistics). Sensor series (N, C, T)
  are normalised the same way from their raw units.
- Storage. Images whose pixels are 8-bit (every value k / 255) stay uint8 in memory — on the GPU
  too — and each batch is normalised on its device by a per-channel lookup table computed with the
  same float32 arithmetic, so the numbers are bitwise those of normalising upfront (CIFAR-10's
  45 000 training images: 553 MB as float32, 138 MB as uint8). Everything else is held normalised.
- Augmentation is applied batched, on the batch's device, with randomness drawn from a CPU
  ``torch.Generator`` so that CPU and GPU runs see the same crops and flips. Series get none:
  the sensor perturbations (jitter, scaling, time-warp, permutation) belong to the `cet`
  objective (regimes/perturbations.py), so `cet` and `uniform` differ by its consistency term
  alone rather than by one of them also seeing augmented series.
"""

from benchmark.data.build import channel_statistics, stratified_split
from benchmark.data.dataset import (AUGMENTATIONS, IGNORE_INDEX, SPLITS, TASKS, Dataset, crop_and_flip,
                                    eight_bit_pixels, pixel_lookup)
from benchmark.data.registry import (clear_cache, dataset_available, dataset_kind, dataset_names, dataset_table,
                                     dataset_task, load_dataset, table_task)

__all__ = ["AUGMENTATIONS", "IGNORE_INDEX", "SPLITS", "TASKS", "Dataset", "channel_statistics", "clear_cache",
           "crop_and_flip", "dataset_available", "dataset_kind", "dataset_names", "dataset_table", "dataset_task",
           "eight_bit_pixels", "load_dataset", "pixel_lookup", "stratified_split", "table_task"]
