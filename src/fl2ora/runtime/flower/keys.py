"""Record and metric keys of the messages between the fl2ora ServerApp and ClientApp.

Kept free of imports so that a ClientApp process that replies to a partition
query starts without loading torch.
"""

ARRAYS_KEY = "arrays"
"""Record key of the trainable tensors, in instructions and replies (Flower's default)."""
CONFIG_KEY = "config"
"""Record key of the instruction's ConfigRecord (Flower's default)."""
METRICS_KEY = "metrics"
"""Record key of the reply's MetricRecord."""
RUN_CONFIG_KEY = "fl2ora-config"
"""ConfigRecord entry holding the resolved fl2ora configuration as JSON."""
ROUND_KEY = "server-round"
"""ConfigRecord entry holding the 1-based round (the name Flower's strategies use)."""
PROXIMAL_MU_KEY = "proximal-mu"
"""ConfigRecord entry of Flower's FedProx strategy."""
FEDDYN_STATE_KEY = "fl2ora.feddyn-gradient"
"""``context.state`` entry of a FedDyn client's gradient term, an ArrayRecord."""

PARTITION_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
REPLY_METRIC_KEYS = ("num-examples", "num-steps", "train-loss", PARTITION_KEY, "finite")
"""MetricRecord keys of a training reply: training samples (the FedAvg weight),
optimizer steps (FedNova), mean training loss, the partition the client trained,
and 1, or 0 when the loss became NaN or infinite."""
