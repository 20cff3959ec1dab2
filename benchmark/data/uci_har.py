"""UCI HAR smartphone activity series, read from --data-root."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.data.build import RawSplits
from benchmark.errors import DataUnavailable


UCI_HAR_FOLDER = "UCI HAR Dataset"
UCI_HAR_SIGNALS = tuple(f"{signal}_{axis}" for signal in ("body_acc", "body_gyro", "total_acc") for axis in "xyz")
UCI_HAR_LAYOUT = (
    "{root}/UCI HAR Dataset/{{train,test}}/Inertial Signals/"
    "{{body_acc,body_gyro,total_acc}}_{{x,y,z}}_{{train,test}}.txt (one 128-step window per line) "
    "and {root}/UCI HAR Dataset/{{train,test}}/y_{{train,test}}.txt (labels 1..6)"
)


def _read_uci_har(root: Path, download: bool) -> RawSplits:
    """UCI HAR (Anguita et al., ESANN 2013): 9 inertial channels x 128 steps (2.56 s at 50 Hz), 6 activities,
    the official split by subject (21 train / 9 test volunteers). Channel c is UCI_HAR_SIGNALS[c].

    Validation follows the rule of every dataset (stratified by class), so its volunteers also appear in
    training; only the test volunteers are unseen.
    """
    folder = root / UCI_HAR_FOLDER
    splits = []
    for split in ("train", "test"):
        signal_files = [folder / split / "Inertial Signals" / f"{signal}_{split}.txt" for signal in UCI_HAR_SIGNALS]
        label_file = folder / split / f"y_{split}.txt"
        missing = [path for path in [*signal_files, label_file] if not path.is_file()]
        if missing:
            raise DataUnavailable(
                f"UCI HAR files missing under {root}, e.g. {missing[0]}: exitbench expects "
                f"{UCI_HAR_LAYOUT.format(root=root)}. Fix: download 'Human Activity Recognition Using Smartphones' "
                f"from the UCI Machine Learning Repository and unzip it into {root} (the download may hold "
                "'UCI HAR Dataset.zip': unzip that too). exitbench does not download it, with or without --download."
            )
        try:
            channels = [np.loadtxt(path, dtype=np.float32, ndmin=2) for path in signal_files]
            labels = np.loadtxt(label_file, dtype=np.int64, ndmin=1)
        except ValueError as error:
            raise DataUnavailable(f"UCI HAR file under {folder / split} is malformed: {error}") from error
        shapes = {path.name: channel.shape for path, channel in zip(signal_files, channels)}
        if len(set(shapes.values())) != 1 or next(iter(shapes.values()))[0] != len(labels):
            raise DataUnavailable(f"UCI HAR {split} files disagree on the number of windows or steps: "
                                  f"{shapes}, {label_file.name}: {len(labels)} labels")
        if labels.min() < 1 or labels.max() > 6:
            raise DataUnavailable(f"UCI HAR labels in {label_file} must lie in 1..6, "
                                  f"found {labels.min()}..{labels.max()}")
        splits += [np.stack(channels, axis=1), labels - 1]
    return tuple(splits)
