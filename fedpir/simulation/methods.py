"""The methods `fedpir simulate` compares (names only: the command checks them before anything heavy loads).

Methods (all but ``scratch`` start from the same public warm start, when the run has one):
    fedpir       Flower simulation; only the shared invariant weights are aggregated; each site adds all its DP noise
    fedpir-dn    fedpir under secure aggregation (SecAgg+) with distributed noise: every site adds its share
                 of the noise and the server sees only the sum, which carries it once (the recommended setting
                 wherever the sites' policies allow it)
    fedpir-noinv fedpir without the invariance term (weight 0), from a warm start pretrained without it
    scratch      fedpir from a random initialisation: what the warm start buys
    fedavg       Flower simulation; every weight is aggregated (plain FedAvg)
    fedbn        Flower simulation; everything but normalization layers (FedBN)
    fedper       Flower simulation; everything but the task heads (FedPer)
    local        each site trains alone, nothing is shared
    centralized  all sites' training patients pooled in one trainer, under the same DP (the non-federated reference)
References that the validity gates read (:mod:`fedpir.simulation.gates`):
    public-only  the public warm start as it is, evaluated at each site without any private round
    local-nodp   local without differential privacy, training every parameter group
    pooled-nodp  centralized without differential privacy, training every parameter group (what the
                 sites' data can teach at best)
"""

from __future__ import annotations

#: The no-DP references' recipe, whatever the run's private phase: every group, Adam, batches of 4, Dice+CE, 8
#: rounds (what the sites' data can teach at best, as measured before the private phase had its own recipe).
NODP_RECIPE: dict[str, object] = {"dp": False, "finetune_trainable": "all", "pretrain_trainable": "all", "optimizer": "adam",
                                  "lr": 1e-3, "batch_size": 4, "segment_positive_weight": 0.0, "finetune_rounds": 8}
#: Federated methods and the key policy each runs with.
FEDERATED: dict[str, str] = {"fedpir": "fedpir", "fedpir-dn": "fedpir", "fedpir-noinv": "fedpir", "scratch": "fedpir",
                             "fedavg": "fedavg", "fedbn": "fedbn", "fedper": "fedper"}
#: The references of the validity gates.
REFERENCES: tuple[str, ...] = ("public-only", "local-nodp", "pooled-nodp")
METHODS: tuple[str, ...] = (*FEDERATED, "local", "centralized", *REFERENCES)
#: What `fedpir simulate` runs unless told otherwise (FedPer is the second FedBN/FedPer-style baseline).
DEFAULT_METHODS: tuple[str, ...] = ("fedpir", "fedpir-dn", "fedpir-noinv", "scratch", "fedavg", "fedbn", "local", "centralized",
                                    *REFERENCES)
