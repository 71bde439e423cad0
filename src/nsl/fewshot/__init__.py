"""Few-shot learning data: episodic datasets and reproducible N-way K-shot episode sampling.

Typical use::

    from nsl.fewshot import get_fewshot_dataset, make_episode

    ds = get_fewshot_dataset("cifar-fs", root, "test").to("cuda")   # images uint8 on the GPU
    for ep in ds.sampler(n_way=5, k_shot=1, n_query=15, n_episodes=600, seed=0):
        xs, ys, xq, yq = make_episode(ds.images, ep, mean=MEAN, std=STD)

See :mod:`nsl.fewshot.data` for the datasets and their splits, :mod:`nsl.fewshot.sampler` for the
sampling contract (episode ``i`` depends only on ``(seed, i)``).
"""

from .data import (
    FEWSHOT_DATASETS,
    OMNIGLOT_TRAIN_CHARACTERS,
    FewShotDataset,
    get_fewshot_dataset,
    load_cifar_fs,
    load_fc100,
    load_mini_imagenet,
    load_omniglot,
    load_split_definition,
    with_rotations,
)
from .sampler import Episode, EpisodeSampler, episode_labels, make_episode

__all__ = [
    "FEWSHOT_DATASETS",
    "OMNIGLOT_TRAIN_CHARACTERS",
    "Episode",
    "EpisodeSampler",
    "FewShotDataset",
    "episode_labels",
    "get_fewshot_dataset",
    "load_cifar_fs",
    "load_fc100",
    "load_mini_imagenet",
    "load_omniglot",
    "load_split_definition",
    "make_episode",
    "with_rotations",
]
