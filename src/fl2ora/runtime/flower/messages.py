"""Message contents between the fl2ora ServerApp and ClientApp, and the checks on every reply.

A training instruction carries two records: the global trainable state as an
``ArrayRecord`` under ``"arrays"`` and a ``ConfigRecord`` under ``"config"`` with
the round, the resolved fl2ora configuration (JSON) and, for FedProx,
``proximal-mu``. A training reply carries exactly the trained trainable tensors
under ``"arrays"`` and a ``MetricRecord`` under ``"metrics"`` with the keys of
:data:`~fl2ora.runtime.flower.keys.REPLY_METRIC_KEYS`.

:func:`parse_train_reply` turns a reply into a
:class:`~fl2ora.federated.client.ClientUpdate` or raises :class:`InvalidReplyError`
with the reason, so that no malformed reply reaches an aggregation rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fl2ora.federated.client import ClientUpdate
from fl2ora.federated.rules import FedDynClientState
from fl2ora.model.trainable import StateDict
from fl2ora.runtime.flower.keys import ARRAYS_KEY, METRICS_KEY, NUM_PARTITIONS_KEY, PARTITION_KEY

TRAINABLE_DTYPE = "float32"
"""Every trainable tensor travels as fp32, as :func:`~fl2ora.model.trainable.trainable_state_dict` returns it."""


class InvalidReplyError(ValueError):
    """A client's reply that must not enter the aggregation; the message is the reason."""


def state_to_array_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Convert a trainable state dict into an ArrayRecord, keeping the key order."""
    return ArrayRecord.from_torch_state_dict(dict(state))


def array_record_to_state(record: ArrayRecord) -> StateDict:
    """Convert an ArrayRecord into a state dict of CPU tensors, keeping the key order."""
    return {name: torch.from_numpy(array.numpy()) for name, array in record.items()}


def feddyn_state_to_record(state: FedDynClientState) -> ArrayRecord:
    """Store a FedDyn client's gradient term as an ArrayRecord for ``context.state``."""
    return state_to_array_record(state.gradient)


def record_to_feddyn_state(record: ArrayRecord) -> FedDynClientState:
    """Read back what :func:`feddyn_state_to_record` stored."""
    return FedDynClientState(gradient=array_record_to_state(record))


def content_nbytes(message: Message) -> int:
    """Return the bytes of a message's records, as Flower's ``message_size_mod`` counts them.

    That is the serialised tensors plus the record keys and config values, without
    Flower's message metadata, HTTP framing or TLS. A message that carries an
    error counts as 0.
    """
    if not message.has_content():
        return 0
    return sum(record.count_bytes() for record in message.content.values())


def _int_metric(metrics: MetricRecord, key: str) -> int:
    value = metrics.get(key)
    if value is None:
        raise InvalidReplyError(f"the MetricRecord has no {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidReplyError(f"{key!r} must be an int, got {value!r}")
    return value


def parse_query_reply(content: RecordDict, num_partitions: int) -> int:
    """Return the partition id a node reports in its reply to a query.

    Raises:
        InvalidReplyError: when the MetricRecord lacks ``partition-id`` or
            ``num-partitions``, the node serves another number of partitions than
            the run, or the partition id is outside ``[0, num_partitions)``.
    """
    metrics = content.get(METRICS_KEY)
    if not isinstance(metrics, MetricRecord):
        raise InvalidReplyError(f"the reply has no MetricRecord {METRICS_KEY!r}")
    partition = _int_metric(metrics, PARTITION_KEY)
    reported = _int_metric(metrics, NUM_PARTITIONS_KEY)
    if reported != num_partitions:
        raise InvalidReplyError(
            f"the node's node_config has num-partitions={reported}, but the run has "
            f"partition.num_clients={num_partitions}"
        )
    if not 0 <= partition < num_partitions:
        raise InvalidReplyError(f"partition-id={partition} is outside [0, {num_partitions})")
    return partition


def parse_train_reply(
    content: RecordDict,
    expected_shapes: Mapping[str, tuple[int, ...]],
    partition_id: int,
) -> ClientUpdate:
    """Check a training reply and convert it into a client update.

    The reply is rejected when:

    - it has records other than the ArrayRecord and the MetricRecord;
    - a metric is missing or has the wrong type;
    - it reports another partition than the one the instruction went to;
    - its training loss became non-finite;
    - the example count is not positive, or the step count is below 1;
    - a tensor is missing or unexpected, has another shape or dtype than the
      global state, cannot be decoded, or contains NaN or infinite values.

    Args:
        content: the reply's records.
        expected_shapes: name -> shape of every tensor of the global trainable
            state, in the order the update should keep.
        partition_id: the partition the instruction was sent to.

    Returns:
        The update with fp32 CPU tensors, ``finite=True``.

    Raises:
        InvalidReplyError: naming the first defect found.
    """
    arrays = content.get(ARRAYS_KEY)
    if not isinstance(arrays, ArrayRecord):
        raise InvalidReplyError(f"the reply has no ArrayRecord {ARRAYS_KEY!r}")
    metrics = content.get(METRICS_KEY)
    if not isinstance(metrics, MetricRecord):
        raise InvalidReplyError(f"the reply has no MetricRecord {METRICS_KEY!r}")
    extra_records = sorted(set(content) - {ARRAYS_KEY, METRICS_KEY})
    if extra_records:
        raise InvalidReplyError(f"the reply has unexpected records {extra_records}")

    # Metrics: who trained, whether training stayed finite, and the aggregation weights.
    claimed = _int_metric(metrics, PARTITION_KEY)
    if claimed != partition_id:
        raise InvalidReplyError(f"the reply reports partition {claimed}, but the instruction went to {partition_id}")
    if _int_metric(metrics, "finite") == 0:
        raise InvalidReplyError("the client's training loss became NaN or infinite")
    num_examples = _int_metric(metrics, "num-examples")
    if num_examples <= 0:
        raise InvalidReplyError(f"num-examples must be positive, got {num_examples}")
    num_steps = _int_metric(metrics, "num-steps")
    if num_steps < 1:
        raise InvalidReplyError(f"num-steps must be >= 1, got {num_steps}")
    train_loss = metrics.get("train-loss")
    if isinstance(train_loss, bool) or not isinstance(train_loss, (int, float)) or not math.isfinite(train_loss):
        raise InvalidReplyError(f"train-loss must be a finite number, got {train_loss!r}")

    # Tensors: exactly the global state's names, shapes and dtype, all finite.
    missing = [name for name in expected_shapes if name not in arrays]
    if missing:
        raise InvalidReplyError(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(arrays) - set(expected_shapes))
    if unexpected:
        raise InvalidReplyError(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    state: StateDict = {}
    for name, shape in expected_shapes.items():
        array = arrays[name]
        if tuple(array.shape) != tuple(shape):
            raise InvalidReplyError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}")
        if array.dtype != TRAINABLE_DTYPE:
            raise InvalidReplyError(f"tensor {name!r} has dtype {array.dtype}, expected {TRAINABLE_DTYPE}")
        values = _decode(name, array)
        if values.shape != tuple(shape) or values.dtype != np.float32:
            raise InvalidReplyError(
                f"tensor {name!r} decodes to shape {values.shape} and dtype {values.dtype}, "
                f"which differ from its declared {tuple(shape)} and {TRAINABLE_DTYPE}"
            )
        if not np.isfinite(values).all():
            raise InvalidReplyError(f"tensor {name!r} contains NaN or infinite values")
        state[name] = torch.from_numpy(values)

    return ClientUpdate(
        client_id=partition_id,
        state=state,
        num_examples=num_examples,
        num_steps=num_steps,
        train_loss=float(train_loss),
        finite=True,
    )


def _decode(name: str, array: Any) -> np.ndarray:
    try:
        return array.numpy()
    except (ValueError, TypeError, OSError, EOFError) as error:
        raise InvalidReplyError(f"tensor {name!r} cannot be decoded: {error}") from error
