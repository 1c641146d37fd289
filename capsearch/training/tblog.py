"""A fine-tune's TensorBoard records: per-step loss and learning rates, probes and sample previews.

Each fine-tune with an output folder writes its events there (a search: RUN/trials/tNNN/), so
`tensorboard --logdir RUN/trials` shows every trial under its own name. A fine-tune resumed from a
checkpoint at step S opens a new event file in the same folder that starts with TensorBoard's restart
marker at S + 1 (tensorboardX's `purge_step`): the steps after S that the interrupted run had already
logged are discarded by TensorBoard and by `read_scalars`, so no step is shown twice.

`read_scalars` reads event files back without TensorBoard installed (the TFRecord framing over
tensorboardX's protobufs, checksums verified).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

LOSS_TAG = "train/loss"
LR_PREFIX = "lr/"  # one series per optimizer parameter group: lr/matrices, lr/vectors_0.001, ...
PROBE_PREFIX = "probe/"
PREVIEW_TAG = "previews"


def learning_rates(optimizer: Any) -> dict[str, float]:
    """The current rate of every parameter group by its name (capsearch.methods.optimizer_groups)."""
    if optimizer is None:
        return {}
    return {
        str(group.get("name", f"group{i}")): float(group["lr"])
        for i, group in enumerate(optimizer.param_groups)
    }


class TrainEvents:
    """The event file of one fine-tune session in `folder`; steps from `start` + 1 on."""

    def __init__(self, folder: Path, start: int = 0) -> None:
        # lazy: tensorboardX loads only for a run that logs to TensorBoard
        from tensorboardX import SummaryWriter

        # A fresh file per session (name: time, host, pid, first step): a resumed run never writes
        # into the file of the run it continues. Its restart marker sits at the first step it logs,
        # start + 1 (a run from scratch: 0, so nothing of an earlier run in the folder is kept).
        suffix = f".{os.getpid()}.s{start:09d}"
        purge = start + 1 if start else 0
        self.writer = SummaryWriter(
            str(folder), purge_step=purge, max_queue=100, flush_secs=30, filename_suffix=suffix
        )

    def step(self, step: int, loss: float, rates: Mapping[str, float]) -> None:
        """The loss of one optimizer step and the rate of each parameter group during it."""
        self.writer.add_scalar(LOSS_TAG, loss, step)
        # TensorBoard tags take no "@": the group vectors@0.01 is the series lr/vectors_0.01
        for name, rate in rates.items():
            self.writer.add_scalar(LR_PREFIX + name.replace("@", "_"), rate, step)

    def probe(self, step: int, values: Mapping[str, Any]) -> None:
        """The numeric values of one held-out probe (capsearch.training.probe)."""
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(PROBE_PREFIX + key, value, step)

    def image(self, step: int, png: Path) -> None:
        """A PNG (a preview grid) as the image of `step`."""
        with Image.open(png) as img:
            pixels = np.asarray(img.convert("RGB"))
        self.writer.add_image(PREVIEW_TAG, pixels, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """A text note (the trial's method spec) at `step`."""
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        """Write what is queued to disk (before a checkpoint: a resumed run purges what follows)."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


# --- reading back ------------------------------------------------------------------------------


def event_files(folder: Path) -> list[Path]:
    """The event files directly in `folder`, oldest session first."""
    files = [p for p in Path(folder).glob("events.out.tfevents.*") if p.is_file()]
    return sorted(files, key=lambda p: (_first_wall_time(p), p.name))


def _first_wall_time(path: Path) -> float:
    for event in read_events(path):
        return event.wall_time
    return float("inf")


def read_events(path: Path) -> Iterator[Any]:
    """The events of one file, in order (tensorboardX's Event protobufs); a cut-off last record ends it.

    A record is: length (uint64), masked CRC-32C of the length, the serialised event, its masked CRC-32C.
    """
    # lazy: tensorboardX loads only for a run that logs to TensorBoard
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    data = Path(path).read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        body = data[pos + 12 : pos + 12 + length]
        if (
            header_crc != masked_crc32c(header)
            or len(body) < length
            or pos + 16 + length > len(data)
        ):
            return  # a writer killed mid-record: what came before is whole
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        if body_crc != masked_crc32c(body):
            raise ValueError(f"{path}: corrupt event record at byte {pos}")
        yield Event.FromString(body)
        pos += 16 + length


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a fine-tune's folder as [(step, value)], restarts applied as TensorBoard
    applies them (a session-start marker at step S drops the earlier events at steps >= S)."""
    # lazy: tensorboardX loads only for a run that logs to TensorBoard
    from tensorboardX.proto.event_pb2 import SessionLog

    series: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(folder):
        for event in read_events(path):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                series = {
                    k: [(s, v) for s, v in pts if s < event.step] for k, pts in series.items()
                }
            if event.HasField("summary"):
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        series.setdefault(value.tag, []).append((event.step, value.simple_value))
    return series


def image_steps(folder: Path, tag: str = PREVIEW_TAG) -> list[int]:
    """The steps at which an image of `tag` was logged (after restarts), in order."""
    # lazy: tensorboardX loads only for a run that logs to TensorBoard
    from tensorboardX.proto.event_pb2 import SessionLog

    steps: list[int] = []
    for path in event_files(folder):
        for event in read_events(path):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                steps = [s for s in steps if s < event.step]
            if event.HasField("summary"):
                steps += [
                    event.step for v in event.summary.value if v.tag == tag and v.HasField("image")
                ]
    return steps
