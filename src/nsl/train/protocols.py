"""Training protocols as data: each a set of :class:`~nsl.train.TrainConfig` values applied over its defaults.

:data:`PROTOCOLS` maps a protocol's name to its values (``nsl train --protocol NAME``,
:func:`~nsl.train.make_config`); the ``paper`` protocol is the defaults themselves.
"""

from __future__ import annotations

__all__ = ["PROTOCOLS", "PAPER_ITERS", "PAPER_MILESTONES", "ATTENTION_ITERS", "ATTENTION_MILESTONES"]

# The authors' step schedule: lr x 0.1 at 20,000, 30,000 and 37,500 of 42,500 iterations. Stored as
# fractions of the run so that shortened runs keep the schedule's shape.
PAPER_ITERS = 42_500
PAPER_MILESTONES = (20_000 / PAPER_ITERS, 30_000 / PAPER_ITERS, 37_500 / PAPER_ITERS)
# The authors' attention model (train_sa.py): Adam, lr 1e-3, 64,000 iterations, lr / 10 at 34,000 and 54,000.
ATTENTION_ITERS = 64_000
ATTENTION_MILESTONES = (34_000 / ATTENTION_ITERS, 54_000 / ATTENTION_ITERS)


# Protocol defaults, each a set of TrainConfig values.
PROTOCOLS: dict[str, dict] = {
    # the authors' CIFAR protocol: the TrainConfig defaults
    "paper": dict(),
    # a modern short schedule for CPU-budget runs and quick comparisons (not from the paper)
    "fast": dict(iters=None, epochs=15, lr=0.1, nesterov=True, weight_decay=5e-4, decay_bn=False,
                 wd_static_diagonal=0.0, wd_static_full=5e-4, schedule="onecycle", onecycle_pct=0.2,
                 label_smoothing=0.1, input="normalize", bn_momentum=0.1, bn_eps=1e-5, paper_init=False,
                 amp="auto", eval_every=0, checkpoint_every=200, bias=True),
    # the authors' global-neural-similarity CIFAR model and its training (wy1iu/NSL nsl_global_ns: spherenet.py,
    # train_sa.py; method notes, section 5): Adam (TF defaults = PyTorch's), lr 1e-3, batch 128, 64k iterations,
    # lr / 10 at 34k and 54k; L2 5e-4 (tf l2_regularizer, coupled: optimizer adam) where the authors put it: the
    # attention projections, the classifier and BN scale/shift (the model's no_weight_decay() exempts the 3x3 and
    # fc6 cosine filters and the gates); orthogonality penalty 2e-4 on every conv filter, not the classifier.
    # Input (rgb - 127.5) / 128 (input="raw"; the model applies the shift and scale), BN as the paper protocol
    # (EMA 0.999, eps 1e-3), same augmentation as the paper protocol (cifar10_input.distorted_inputs). Not in
    # the stored snapshot of that code: its loss helper (loss2 'c_entropy'); label smoothing kept at the paper
    # protocol's 0.01 on the assumption that it is the same helper.
    # `nsl demo`: the zero-setup dataset (scikit-learn's 8x8 digits), CNN-9 at width 8, Adam one-cycle, no
    # augmentation (flips and 4-pixel shifts do not suit 8x8 digits); about 10 s per conv run on 2 CPU cores
    "demo": dict(dataset="digits", model="cnn9", width=8, iters=None, epochs=12, batch_size=64, optimizer="adam",
                 lr=3e-3, weight_decay=0.0, decay_bn=False, wd_static_diagonal=0.0, wd_static_full=0.0,
                 schedule="onecycle", onecycle_pct=0.25, label_smoothing=0.0, input="normalize", augment=False,
                 bn_momentum=0.1, bn_eps=1e-5, paper_init=False, amp="none", eval_every=0, checkpoint_every=0,
                 bias=True),
    "paper-attention": dict(model="sphere-attention", layer="conv", optimizer="adam", lr=1e-3,
                            iters=ATTENTION_ITERS, lr_milestones=ATTENTION_MILESTONES, lr_gamma=0.1, batch_size=128,
                            weight_decay=5e-4, decay_bn=True, orthogonality=2e-4, input="raw", paper_init=True,
                            bias=True),
}
