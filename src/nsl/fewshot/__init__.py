"""Few-shot learning: episodic datasets, N-way K-shot episode sampling, backbones, ProtoNet heads.

Typical use::

    from nsl.fewshot import get_fewshot_dataset, make_episode

    ds = get_fewshot_dataset("cifar-fs", root, "test").to("cuda")   # images uint8 on the GPU
    for ep in ds.sampler(n_way=5, k_shot=1, n_query=15, n_episodes=600, seed=0):
        xs, ys, xq, yq = make_episode(ds.images, ep, mean=MEAN, std=STD)

See :mod:`nsl.fewshot.data` for the datasets and their splits, :mod:`nsl.fewshot.sampler` for the
sampling contract (episode ``i`` depends only on ``(seed, i)``), :mod:`nsl.fewshot.models` for the
backbones (``conv4``, ``resnet12`` with every NSL layer kind) and :mod:`nsl.fewshot.protonet` for the
heads (Prototypical Networks, a bilinear neural-similarity metric), the episode loss and
:func:`evaluate` (mean accuracy with its 95% confidence interval)::

    model = FewShotClassifier(build_backbone("conv4", layer="dynamic-diagonal"), PrototypicalHead())
    loss, acc = episode_loss_and_accuracy(model, xs, ys, xq, yq)
    result = evaluate(model, test_ds, n_way=5, k_shot=1, n_query=15, n_episodes=600, seed=0)
    print(result)   # "55.12 +- 0.45 % (600 episodes)"

Training and evaluation runs (:mod:`nsl.fewshot.train`, ``nsl fewshot train`` / ``nsl fewshot eval``)::

    cfg = FewShotConfig(dataset="cifar-fs", data_dir=root, layer="dynamic-diagonal", out="runs/fs-dd")
    train_fewshot(cfg)                                   # RUN_DIR/{config.json,metrics.jsonl,checkpoints/}
    res = evaluate_fewshot_checkpoint("runs/fs-dd/checkpoints/best.pt", n_episodes=600, seed=0)
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
from .models import BACKBONES, Conv4, ResNet12, build_backbone
from .protonet import (
    HEAD_METRICS,
    BilinearSimilarityHead,
    EvalResult,
    FewShotClassifier,
    PrototypicalHead,
    check_episode,
    confidence_interval,
    episode_loss_and_accuracy,
    evaluate,
    prototypes,
)
from .sampler import Episode, EpisodeSampler, episode_labels, make_episode
from .train import (
    FEWSHOT_HEADS,
    FewShotConfig,
    apply_fewshot_overrides,
    build_fewshot_model,
    channel_stats,
    compare_results,
    evaluate_fewshot_checkpoint,
    load_fewshot_checkpoint,
    load_fewshot_split,
    train_fewshot,
)

__all__ = [
    "BACKBONES",
    "FEWSHOT_HEADS",
    "FEWSHOT_DATASETS",
    "HEAD_METRICS",
    "OMNIGLOT_TRAIN_CHARACTERS",
    "BilinearSimilarityHead",
    "Conv4",
    "Episode",
    "EpisodeSampler",
    "EvalResult",
    "FewShotConfig",
    "FewShotClassifier",
    "FewShotDataset",
    "PrototypicalHead",
    "ResNet12",
    "apply_fewshot_overrides",
    "build_backbone",
    "build_fewshot_model",
    "channel_stats",
    "check_episode",
    "compare_results",
    "confidence_interval",
    "episode_labels",
    "episode_loss_and_accuracy",
    "evaluate",
    "evaluate_fewshot_checkpoint",
    "get_fewshot_dataset",
    "load_cifar_fs",
    "load_fc100",
    "load_fewshot_checkpoint",
    "load_fewshot_split",
    "load_mini_imagenet",
    "load_omniglot",
    "load_split_definition",
    "make_episode",
    "prototypes",
    "train_fewshot",
    "with_rotations",
]
