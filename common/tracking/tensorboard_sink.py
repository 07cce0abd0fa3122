"""TensorBoard: event files written with torch's SummaryWriter, read back on a resume with tensorboard's own
EventAccumulator.

A run killed after its last checkpoint has already written steps that the resumed run trains again. TensorBoard's
``purge_step`` would hide the killed attempt's steps and keep the replay's; the MLflow sink cannot do the same
(MLflow keeps every value it was sent and has no way to take one back). So that both sinks hold the same numbers,
both keep what reached them first: on a resume this sink reads the steps its folder holds and writes only the
others. A deterministic run (``--deterministic``) replays the same losses, so the curves are an uninterrupted
run's; otherwise the points past the checkpoint are the killed attempt's, up to where it was killed.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

log = logging.getLogger("convnets")

HPARAMS_TAG = "_hparams_/experiment"
# The metrics the hparams view shows beside the parameters: their last value in this run's scalars.
HPARAM_METRICS = {
    False: ("epoch/val.top1", "epoch/val.top5", "epoch/val.loss", "final/val.best_top1"),
    True: ("epoch/val.map", "epoch/val.f1_macro", "epoch/val.loss", "final/val.best_map"),
}


def held_points(folder: Path) -> tuple[set[tuple[str, int]], bool]:
    """((tag, step) of every scalar the event files in ``folder`` hold, whether they hold the hparams)."""
    if not folder.is_dir() or not any(folder.glob("events.out.tfevents.*")):
        return set(), False
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    points = {(tag, e.step) for tag in tags["scalars"] for e in events.Scalars(tag)}
    try:
        hparams = HPARAMS_TAG in events.PluginTagToContent("hparams")
    except KeyError:  # no summary of that plugin in the files
        hparams = False
    return points, hparams


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, folder: Path, resuming: bool):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            from common.errors import UserError

            raise UserError(
                f"--tensorboard needs the tensorboard package ({e}): pip install -e '.[tracking]'"
            ) from None
        self.folder = Path(folder)
        self.held, self.has_hparams = held_points(self.folder) if resuming else (set(), False)
        if self.held:
            log.info("tensorboard: %s holds %d points of the earlier attempt; the resumed run adds the others",
                     self.folder, len(self.held))  # fmt: skip
        self.writer = SummaryWriter(str(self.folder), flush_secs=30)
        self.last_step = max((s for _, s in self.held), default=0)
        log.info("tensorboard: event files in %s (tensorboard --logdir %s)", self.folder, self.folder.parent)

    def params(self, config: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        from common.tracking.sink import flat_params

        self.writer.add_text("run/config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        if not self.has_hparams:
            # Written into this run's own file: SummaryWriter.add_hparams would start a sub-run folder (a second
            # event file and run in the TensorBoard list) for them.
            values = {k: config[k] if isinstance(config[k], int | float | str | bool) else v
                      for k, v in flat_params(config).items()}  # fmt: skip
            metrics = dict.fromkeys(HPARAM_METRICS[bool(config.get("multilabel"))], 0.0)
            for summary in hparams(values, metrics):
                self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def tags(self, tags: dict) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in tags.items())
        self.writer.add_text("run/tags", f"| tag | value |\n| --- | --- |\n{rows}", 0)
        self.writer.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            if (key, step) not in self.held:
                self.writer.add_scalar(key, value, step)
        self.last_step = max(self.last_step, step)

    def artifact(self, path: Path) -> None:
        """Images go into the event file (the confusion matrix); config.json and log.json are already beside it."""
        if path.suffix.lower() == ".png":
            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))
            self.writer.add_image(f"val/{path.stem}", image, self.last_step, dataformats="HWC")

    def state(self) -> dict:
        return {}

    def close(self, status: str) -> None:
        self.writer.add_text("run/status", status, self.last_step)
        self.writer.close()
