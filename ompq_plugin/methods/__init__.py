"""Bit-allocation methods: the registry and what each needs (see ``objectives`` for the maths).

``ompq`` is the paper (Eq. 10); ``ompq-noise`` keeps ORM importance and scores each width by
the quantization error it causes; ``uniform``, ``size-greedy``, ``hawq``, ``random`` and
``measured`` are baselines through the same solver and BitConfig.
"""

from __future__ import annotations

METHODS: tuple[str, ...] = (
    "ompq-noise", "ompq", "uniform", "size-greedy", "hawq", "random", "measured"
)
ORM_METHODS = frozenset({"ompq", "ompq-noise"})
DEFAULT_METHOD = "ompq-noise"
# ompq: the authors' default. ompq-noise: beta 0 (theta = 1, the ORM does not weight the errors)
# won on the validation split (bench/results/allocation_validation.json): 0 > 0.3 > 1.
DEFAULT_BETA = {"ompq": 1.0, "ompq-noise": 0.0}
# ompq-noise's weight of the activation errors against the weight errors, chosen on the
# validation split at the BOPs budget (bench/results/allocation_validation.json, ResNet-20,
# top-1 on 2,000 validation images: weight 1 78.15, 4 80.30, 16 84.65, 64 84.20, uniform W4A6
# 84.65); it only matters where activation widths are free.
DEFAULT_ACT_WEIGHT = 16.0
HAWQ_IMAGES = 200  # labelled training images for the Hessian traces

METHOD_HELP = {
    "ompq-noise": "the quantization error of each width, weighted by ORM importance (default; "
    "at its default beta 0 every layer weighs the same and no ORM is computed)",
    "ompq": "the paper's Eq. 10 (linear in the bits: layers end at the ends of the range)",
    "uniform": "the widest uniform width that meets every budget (first/last layer included "
    "when their 8-bit pin would not fit)",
    "size-greedy": "Eq. 10 with equal importance (most bits to the smallest layers)",
    "hawq": "HAWQ-V2/V3: Hessian trace x ||Q(W) - W||^2 (needs labelled images)",
    "random": "a random feasible configuration (seeded)",
    "measured": "each layer quantized alone at each width, output distortion on the search "
    "images (as Sony MCT; one forward pass per layer and width)",
}
