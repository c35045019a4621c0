"""`resnet predict`: the top-k classes of images (files, folders, or lists of paths) under a trained checkpoint or
torchvision's weights, with class names and probabilities, as CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
import yaml

from datamodules.folder import IMAGE_EXTENSIONS, CorruptImageError, decode, is_hidden
from datamodules.transforms import normalize_batch, val_transform
from train.results import atomic_write, console
from train.networks import num_outputs
from train.weights import LoadedModel, load_checkpoint, load_weights

log = logging.getLogger(__name__)


def image_paths(inputs: list[str]) -> list[str]:
    """Image files named by `inputs`: files, folders (searched recursively for .jpeg/.jpg/.png, hidden entries
    skipped, sorted) and `.txt` files listing one path a line.

    Raises:
        FileNotFoundError: an input that does not exist, naming it.
        ValueError: nothing to predict.
    """
    paths: list[str] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"{item}: no such file or folder")
        if p.is_dir():
            # A dangling link named .JPEG is listed too: its read fails and its row says so.
            paths += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS
                            and (f.is_file() or f.is_symlink())
                            and not any(is_hidden(part) for part in f.relative_to(p).parts))
        elif p.suffix.lower() == ".txt":
            listed = [line.strip() for line in p.read_text().splitlines() if line.strip()]
            paths += [str(p.parent / line) if not Path(line).is_absolute() else line for line in listed]
        else:
            paths.append(str(p))
    if not paths:
        raise ValueError(f"{', '.join(inputs)}: no images ({', '.join(IMAGE_EXTENSIONS)}) to predict")
    return paths


def class_names(classes: Optional[list[str]], outputs: int, synsets: Optional[str],
                data_root: Optional[str]) -> tuple[list[str], list[str]]:
    """(class id, readable name) per output. Ids: the checkpoint's classes, else the sorted WordNet ids of a synsets
    file with one line per output, else data_root/train's sorted class folders, else the output index. Names: from
    `synsets` ("wnid name" lines: ILSVRC's LOC_synset_mapping.txt, the demo's synsets.txt), else the one beside the
    training data, else torchvision's ImageNet names when the outputs are ImageNet-1k's (1,000 sorted WordNet ids),
    else the id itself.

    Raises:
        FileNotFoundError: a `synsets` file that does not exist.
    """
    if synsets and not Path(synsets).is_file():
        raise FileNotFoundError(f"--synsets {synsets}: no such file")
    candidates = [Path(synsets)] if synsets else [Path(data_root) / n for n in ("synsets.txt", "LOC_synset_mapping.txt")] if data_root else []
    mapping = {}
    for path in candidates:
        if path.is_file():
            mapping = {w: n.strip() for w, n in (line.split(" ", 1) for line in path.read_text().splitlines() if " " in line)}
            break
    ids = classes
    if ids is None and len(mapping) == outputs:  # LOC_synset_mapping.txt: the 1,000 WordNet ids, sorted
        ids = sorted(mapping)
    if ids is None and data_root and (Path(data_root) / "train").is_dir():
        found = sorted(e.name for e in os.scandir(Path(data_root) / "train") if e.is_dir() and not is_hidden(e.name))
        ids = found if len(found) == outputs else None
    if synsets and ids is not None and not set(ids) & set(mapping):
        raise ValueError(f"--synsets {synsets}: names none of the model's classes (e.g. {ids[0]}); expected "
                         "'wnid name' lines")
    if mapping and ids is not None:
        return ids, [mapping.get(i, i) for i in ids]
    ids = ids or [str(i) for i in range(outputs)]
    if outputs == 1000 and (classes is None or classes == sorted(classes)):
        from torchvision.models import ResNet50_Weights

        return ids, list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])  # in the order of the sorted WordNet ids
    return ids, ids


def _checkpoint_settings(loaded: LoadedModel) -> tuple[int, int, Optional[str], bool]:
    """(crop, resize, data root, flip averaging) of the training run's validation (a checkpoint), or torchvision's
    224 / 256 (232 for its V2 weights), no flip."""
    if loaded.config:
        data = (yaml.safe_load(loaded.config) or {}).get("data", {})
        crop = data.get("val_crop_size") or data.get("crop_size") or 224
        flip = bool(loaded.hparams.get("val_flip_average", False))
        return crop, data.get("val_resize_size") or round(crop / 0.875), data.get("root"), flip
    return 224, loaded.resize_size or 256, None, False


def predict(
    inputs: list[str],
    ckpt: Optional[str] = None,
    weights: Optional[str] = None,
    output: Optional[str] = None,
    top_k: int = 5,
    batch_size: int = 32,
    crop_size: Optional[int] = None,
    resize_size: Optional[int] = None,
    synsets: Optional[str] = None,
    device: str = "auto",
) -> list[dict]:
    """The top-k classes of each image, with names and softmax probabilities.

    Args:
        inputs: image files, folders (recursive) and .txt lists of paths (one a line, relative to the list).
        ckpt: a `resnet fit` checkpoint (its classes and validation geometry come with it).
        weights: instead of ckpt: `torchvision:resnet50.IMAGENET1K_V2`, `timm:resnet50.a1_in1k` or a state-dict file.
        output: `.csv` (path, rank, index, class, name, probability; an `error` column for unreadable images) or
            `.json` (one object per image); None = the table on stdout only.
        top_k: classes per image (at most the number of classes).
        batch_size: images per forward pass.
        crop_size, resize_size: centre crop side and shorter side before it, in pixels; None = the checkpoint's
            validation geometry (torchvision's weights: 224 of 256, 232 for V2).
        synsets: "wnid name" lines naming the classes (ILSVRC's LOC_synset_mapping.txt); None = found beside the
            training data, or torchvision's ImageNet names for 1,000 classes.
        device: `auto` (a CUDA GPU when there is one), `cpu` or `cuda`.

    A checkpoint trained with `model.val_flip_average` averages each image's logits with its mirror's, as its
    validation did.

    Returns:
        One dict per image: path, and `top` (a list of {index, class, name, probability}) or `error`.

    Raises:
        ValueError: neither or both of ckpt and weights, top_k < 1, no images, an unknown output suffix, a device
            that is not here.
        FileNotFoundError: a missing input, checkpoint or synsets file.
    """
    if (ckpt is None) == (weights is None):
        raise ValueError("give exactly one of --ckpt PATH or --weights (torchvision:<arch>.<weights>, timm:<model>.<tag> or a file)")
    if top_k < 1:
        raise ValueError(f"--top_k {top_k}: expected at least 1")
    if output and Path(output).suffix not in (".csv", ".json"):
        raise ValueError(f"--output {output}: expected a .csv or .json file")
    if output and Path(output).is_dir():
        raise ValueError(f"--output {output}: a folder; name the .csv or .json file to write")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU here (--device auto uses one when there is one)")
    paths = image_paths(inputs)
    loaded = load_checkpoint(ckpt) if ckpt else load_weights(weights)
    crop, resize, data_root, flip = _checkpoint_settings(loaded)
    transform = val_transform(crop_size=crop_size or crop, resize_size=resize_size or resize)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    net = loaded.net.to(dev).eval()
    outputs = num_outputs(net)
    ids, names = class_names(loaded.classes, outputs, synsets, data_root)
    k = min(top_k, outputs)
    rows: list[dict] = []
    for start in range(0, len(paths), batch_size):
        images, kept = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(transform(decode(path)))
                kept.append(path)
            except (CorruptImageError, OSError, RuntimeError) as e:
                log.warning("%s: cannot read it (%s)", path, e)
                rows.append({"path": path, "error": str(e)})
        if not images:
            continue
        with torch.inference_mode():
            batch = normalize_batch(torch.stack(images).to(dev))
            logits = net(batch).float()
            if flip:  # the checkpoint validated with the mirror's logits averaged in (val_flip_average)
                logits = (logits + net(batch.flip(3)).float()) / 2
            probs = torch.softmax(logits, dim=1)
        top = probs.topk(k, dim=1)
        for path, p, i in zip(kept, top.values.tolist(), top.indices.tolist()):
            rows.append({"path": path, "top": [{"index": c, "class": ids[c], "name": names[c], "probability": q}
                                               for c, q in zip(i, p)]})
    order = {p: n for n, p in enumerate(paths)}
    rows.sort(key=lambda r: order[r["path"]])
    _show(rows)
    if output:
        _write(rows, Path(output))
    return rows


def _show(rows: list[dict]) -> None:
    """One line an image, never wrapped: scripts read it."""
    for r in rows:
        if "error" in r:
            print(f"{r['path']}: unreadable ({r['error']})")
        else:
            print(f"{r['path']}: " + ", ".join(f"{t['name']} {100 * t['probability']:.1f}%" for t in r["top"]))


def _write(rows: list[dict], out: Path) -> None:
    def write(f) -> None:  # into the partial file of results.atomic_write: whole or not at all
        text = io.TextIOWrapper(f, newline="", encoding="utf-8")
        if out.suffix == ".json":
            text.write(json.dumps(rows, indent=1))
        else:
            writer = csv.writer(text)
            writer.writerow(["path", "rank", "index", "class", "name", "probability", "error"])
            for r in rows:
                if "error" in r:
                    writer.writerow([r["path"], "", "", "", "", "", r["error"]])
                for rank, t in enumerate(r.get("top", []), 1):
                    writer.writerow([r["path"], rank, t["index"], t["class"], t["name"], f"{t['probability']:.6f}", ""])
        text.flush()
        text.detach()  # the file is atomic_write's to close

    atomic_write(out, write)
    console().print(f"Predictions: {out}")


def predict_main(args: list[str]) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from train.evaluate import exit_with_error

    parser = ArgumentParser(prog="resnet predict", allow_abbrev=False, description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--config", action=ActionConfigFile, help="yaml file with any of the options below")
    parser.add_argument("inputs", nargs="+", help="image files, folders (recursive) and .txt lists of paths")
    parser.add_function_arguments(predict, skip={"inputs"})
    cfg = parser.parse_args(args).as_dict()
    cfg.pop("config", None)
    try:
        predict(**cfg)
    except (ValueError, OSError) as e:  # bad input: name the cause, no traceback
        exit_with_error("resnet predict", e)
