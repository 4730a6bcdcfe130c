"""A folder of images in class subfolders, read into memory as a classification ``Dataset``.

Layout: ``root/train/<class>/*.png`` and ``root/test/<class>/*.png`` (``val`` or ``valid`` also name the
evaluation split), or just ``root/<class>/*.png``, from which a seeded ``test_fraction`` is held out. Classes are
the subfolder names in sorted order. Every image is converted to the mode of the first one (grayscale ``L`` or
``RGB``) and must have its size. Pixels become floats by ``scale`` and, where given, ``normalize=(mean, std)``
(``ts.data.load`` of a folder uses the folder's own mean and std per channel by default, as for a named set).

Example:
    >>> import tempfile, numpy as np
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for label in ("cat", "dog"):
    ...     (root / label).mkdir()
    ...     for i in range(5):
    ...         Image.fromarray(np.full((4, 4), 40 * i, dtype=np.uint8)).save(root / label / f"{i}.png")
    >>> data = image_folder(root, test_fraction=0.2)
    >>> data.classes, len(data.train), len(data.test), data.input_shape
    (('cat', 'dog'), 8, 2, (1, 4, 4))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from torchslim.core.errors import TorchslimError
from torchslim.data.datasets import Dataset, Split, normalize

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
EVAL_FOLDERS = ("test", "val", "valid", "validation")


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read(folder: Path, classes: list[str], mode: str | None, size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, str, tuple[int, int]]:
    try:
        from PIL import Image
    except ImportError:
        raise TorchslimError("reading an image folder needs Pillow: pip install pillow") from None
    images, labels = [], []
    for label, name in enumerate(classes):
        path = folder / name
        if not path.is_dir():
            raise TorchslimError(f"{folder}: class folder {name!r} is missing here (it exists in the other split)")
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS)
        for file in files:
            try:
                with Image.open(file) as image:
                    mode = mode or ("L" if image.mode in ("L", "1", "I;16", "I") else "RGB")
                    pixels = np.asarray(image.convert(mode))
            except OSError as error:
                raise TorchslimError(f"{file}: not a readable image ({error})") from None
            if size is None:
                size = pixels.shape[:2]
            if pixels.shape[:2] != tuple(size):
                raise TorchslimError(
                    f"{file}: image of {pixels.shape[1]}x{pixels.shape[0]} pixels; the folder's images are {size[1]}x{size[0]} (resize them first)"
                )
            images.append(pixels)
            labels.append(label)
    if not images:
        raise TorchslimError(f"{folder}: no images ({', '.join(sorted(EXTENSIONS))}) in its class folders")
    stacked = torch.from_numpy(np.stack(images))
    stacked = stacked.unsqueeze(1) if stacked.dim() == 3 else stacked.permute(0, 3, 1, 2)
    assert mode is not None and size is not None
    return stacked.contiguous(), torch.tensor(labels, dtype=torch.long), mode, size


def image_folder(
    root: str | Path,
    normalize_with: tuple[tuple[float, ...], tuple[float, ...]] | str | None = None,
    scale: float = 1 / 255,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """Read a folder of class subfolders (optionally under ``train/`` and ``test/``) into a ``Dataset``;
    ``normalize_with``: (mean, std), "dataset" (the mean and std of each channel over the training images, after
    ``scale``) or None (no standardization)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TorchslimError(f"{root}: no such folder of images")
    evaluation = next((root / name for name in EVAL_FOLDERS if (root / name).is_dir()), None)
    if (root / "train").is_dir() and evaluation is not None:
        classes = [p.name for p in _class_folders(root / "train")]
        train_images, train_labels, mode, size = _read(root / "train", classes, None, None)
        test_images, test_labels, _, _ = _read(evaluation, classes, mode, size)
        source = f"{root} (train/ and {evaluation.name}/)"
    else:
        classes = [p.name for p in _class_folders(root)]
        if len(classes) < 2:
            raise TorchslimError(f"{root}: expected class subfolders (or train/ and test/ folders holding them), found {len(classes)}")
        images, labels, mode, size = _read(root, classes, None, None)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        held = max(1, int(round(test_fraction * len(labels))))
        test, train = order[:held], order[held:]
        train_images, train_labels, test_images, test_labels = images[train], labels[train], images[test], labels[test]
        source = f"{root} ({test_fraction:.0%} held out for evaluation, seed {seed})"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    if isinstance(normalize_with, str):  # "dataset": the folder's own statistics, per channel, over its training images
        if normalize_with != "dataset":
            raise TorchslimError(f"normalize must be 'dataset' (the folder's statistics), None or (mean, std), got {normalize_with!r}")
        pixels = train_images.float().mul(scale).transpose(0, 1).reshape(train_images.shape[1], -1)
        mean, std = tuple(round(float(v), 4) for v in pixels.mean(dim=1)), tuple(round(float(v), 4) for v in pixels.std(dim=1))
    elif normalize_with is not None:
        mean, std = normalize_with
    return Dataset(
        name=root.name,
        train=Split(normalize(train_images, mean, std, scale), train_labels),
        test=Split(normalize(test_images, mean, std, scale), test_labels),
        num_classes=len(classes),
        input_shape=tuple(train_images.shape[1:]),
        mean=mean,
        std=std,
        source=source,
        scale=scale,
        classes=tuple(classes),
    )


__all__ = ["image_folder"]
