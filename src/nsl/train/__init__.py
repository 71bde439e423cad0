r"""Training toolkit: configurations (:class:`TrainConfig`, protocols ``paper``, ``fast``, ``demo``,
``paper-attention``), one training loop (:func:`fit`) for every task, and the classification task
(:func:`train`, :func:`evaluate_checkpoint`). Modules, in import order: :mod:`.config` (settings),
:mod:`.run` (run directory, checkpoints, RNG, device, DDP, AMP), :mod:`.optim` (schedules, optimisers,
batch norm), :mod:`.shaping` (kernel-shape schedule), :mod:`.loop` (:func:`fit`, :class:`Task`),
:mod:`.classification` (:class:`ClassificationTask`). Few-shot training is another task on the same
loop (:mod:`nsl.fewshot.train`).

::

    from nsl.train import make_config, train
    cfg = make_config("paper", dataset="cifar10", data_dir="data", layer="dynamic-diagonal", out="runs/dd")
    summary = train(cfg)

Command line (every :class:`TrainConfig` field is also ``--set key=value``)::

    nsl train --dataset cifar10 --data-dir DATA --model cnn9 --layer dynamic-diagonal --protocol paper \
              --out runs/cnn9-dd [--iters N | --epochs N] [--batch-size B] [--seed S] [--device cpu|cuda]
    nsl train --out runs/cnn9-dd --resume                  # continue after an interruption
    nsl eval --checkpoint runs/cnn9-dd/checkpoints/best.pt [--fold]

The ``paper`` protocol is the authors' code, including its batch-norm moving average (momentum
0.001, eps 1e-3), which leaves test accuracy at chance for thousands of iterations; for shortened
runs add ``--bn-recalibrate 50`` (recompute BN statistics on 50 training batches before each
evaluation) or ``--bn-momentum 0.1``, and consider ``--warmup-iters 200`` (lr 0.1 from the first
step collapsed one of two seeds in our runs). Both are departures recorded in ``config.json``.
PyTorch's running variance starts at 1 (TensorFlow's moving variance at 0); with momentum 0.001
both are dominated by their start value for the first few thousand steps.

Data parallel (one process per GPU, ``--batch-size`` per process)::

    torchrun --nproc_per_node 8 -m nsl.cli train --dataset imagefolder --data-dir /data/imagenet \
        --model resnet50 --layer static-full --protocol fast --epochs 90 --batch-size 64 --device cuda \
        --set image_size=224 --set num_workers=8 --set bn_momentum=0.1 --out runs/r50-sf

``/data/imagenet`` holds ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` (the standard
ImageFolder layout; ``val`` sorted into class folders). Images stream through DataLoader workers
(decode, random-resized crop, flip, ImageNet normalisation; the ``input`` setting applies to tensor
datasets only). Several nodes: add ``--nnodes N --node_rank R --rdzv_endpoint HOST:PORT``. Only
rank 0 writes; resume with the same number of processes. With ImageFolder, resuming replays the
epoch's order exactly (each epoch's sampler is seeded by ``seed + epoch``) but worker augmentation
may differ; exact resumption is guaranteed for tensor datasets (GPULoader).
"""

from .classification import (
    ClassificationTask,
    build_from_checkpoint,
    build_model_for,
    evaluate,
    evaluate_checkpoint,
    load_data,
    train,
)
from .config import PROTOCOLS, ConfigBase, ConfigError, TrainConfig, apply_overrides, make_config, parse_value
from .loop import Task, TrainingDiverged, fit
from .optim import build_optimizer, lr_factor, orthogonality_filters, param_groups, recalibrate_bn
from .run import (
    CheckpointError,
    Process,
    RunDir,
    atomic_save,
    load_checkpoint,
    resolve_device,
    rng_state,
    set_rng_state,
)

__all__ = ["TrainConfig", "ConfigBase", "PROTOCOLS", "ConfigError", "make_config", "apply_overrides", "parse_value",
           "fit", "Task", "train", "ClassificationTask", "TrainingDiverged", "CheckpointError", "load_checkpoint",
           "build_from_checkpoint", "build_model_for", "load_data", "evaluate", "evaluate_checkpoint", "lr_factor",
           "param_groups", "build_optimizer", "orthogonality_filters", "recalibrate_bn", "RunDir", "Process",
           "atomic_save", "rng_state", "set_rng_state", "resolve_device"]
