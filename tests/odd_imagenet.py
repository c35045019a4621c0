"""An ImageNet-layout copy holding what real copies hold (public bug reports of ImageNet users): interrupted copies,
truncated and garbage files, macOS and Windows companions, hidden folders, 16-bit PNGs, CMYK, gray, palette, alpha,
progressive and EXIF-rotated JPEGs, a PNG under a .JPEG name, a non-image file, and a val image leaked from train."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.demo import write_demo_dataset


def _png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG (Pillow writes 16-bit gray only): IHDR bit depth 16, colour type 2."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_odd_copy(dst: Path, base: Path | None = None) -> dict[str, list[str]]:
    """The demo set (6 classes, 8 train / 4 val images each, or a copy of `base`) plus one of each odd file.

    Returns:
        {kind: [paths relative to dst]}: "empty", "truncated", "corrupt" (unreadable: left out), "convert" (read as
        8-bit RGB), "extension" (content other than the name says), "hidden", "other", "leak" (the val copy),
        "readable_train" / "readable_val" (every file a backend must read, planted or not).
    """
    if base is None:
        base = write_demo_dataset(dst.with_name(dst.name + "-base"), train_per_class=8, val_per_class=4)
    shutil.copytree(base / "train", dst / "train")
    shutil.copytree(base / "val", dst / "val")
    classes = sorted(os.listdir(dst / "train"))
    c0, c1, c2 = (f"train/{c}" for c in classes[:3])
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    good = next((dst / c0).iterdir()).read_bytes()
    planted: dict[str, list[str]] = {k: [] for k in ("empty", "truncated", "corrupt", "convert", "extension",
                                                    "hidden", "other", "leak")}

    def put(rel: str, data: bytes | None = None, image: Image.Image | None = None, **save) -> str:
        path = dst / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if image is not None:
            buffer = io.BytesIO()
            image.save(buffer, **save)
            data = buffer.getvalue()
        path.write_bytes(data or b"")
        return rel

    planted["empty"].append(put(f"{c0}/interrupted_copy.JPEG", b""))
    planted["truncated"].append(put(f"{c0}/truncated.JPEG", good[: len(good) // 2]))
    planted["corrupt"].append(put(f"{c1}/garbage.JPEG", rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()))
    planted["convert"] += [
        put(f"{c0}/cmyk.JPEG", image=rgb.convert("CMYK"), format="JPEG"),
        put(f"{c1}/gray.JPEG", image=rgb.convert("L"), format="JPEG"),
        put(f"{c1}/palette.png", image=rgb.convert("P"), format="PNG"),
        put(f"{c2}/alpha.png", image=rgb.convert("RGBA"), format="PNG"),
        put(f"{c2}/gray16.png", image=Image.fromarray(rng.integers(0, 65536, (40, 50), dtype=np.uint16)),
            format="PNG"),
        put("val/" + classes[1] + "/cmyk.JPEG", image=rgb.transpose(Image.Transpose.ROTATE_180).convert("CMYK"),
            format="JPEG"),
    ]
    _png16(dst / c2 / "rgb16.png", rng.integers(0, 65536, (40, 50, 3), dtype=np.uint16))
    planted["convert"].append(f"{c2}/rgb16.png")
    planted["extension"].append(put(f"{c0}/png_named.JPEG", image=rgb, format="PNG"))
    planted["extension"].append(put(f"{c1}/gif_named.JPEG", image=rgb.convert("P"), format="GIF"))
    planted["not_for_dali"] = [f"{c1}/gif_named.JPEG"]  # DALI decodes no GIF: left out of its training samples
    # Read as ordinary 8-bit RGB JPEGs: nothing to report.
    put(f"{c1}/progressive.JPEG", image=rgb, format="JPEG", progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° on display; training reads the stored pixels, as PIL-based training
    put(f"{c2}/exif_rotated.JPEG", image=rgb, format="JPEG", exif=exif)
    planted["hidden"] += [
        put(f"{c0}/._n0_companion.JPEG", b"\x00\x05\x16\x07" + bytes(80)),  # macOS AppleDouble: not an image
        put("train/.DS_Store", b"Bud1" + bytes(60)),
        put("val/.DS_Store", b"Bud1" + bytes(60)),
        put(f"val/{classes[0]}/._ILSVRC2012_val_x.JPEG", b"\x00\x05\x16\x07" + bytes(80)),
    ]
    put("train/.hidden_class/a.JPEG", good)
    put("train/__MACOSX/x/._a.JPEG", b"\x00\x05\x16\x07")
    planted["hidden"] += ["train/.hidden_class/", "train/__MACOSX/"]
    planted["other"].append(put(f"{c1}/notes.txt", b"copied from the cluster\n"))
    train_file = sorted((dst / c2).glob("*_1.JPEG"))[0]  # a demo image
    leak = f"val/{classes[2]}/leaked.JPEG"
    shutil.copyfile(train_file, dst / leak)
    planted["leak"].append(leak)
    unreadable = set(planted["empty"] + planted["truncated"] + planted["corrupt"])
    for split in ("train", "val"):
        planted[f"readable_{split}"] = sorted(
            f"{split}/{c}/{f.name}" for c in classes for f in (dst / split / c).iterdir()
            if not f.name.startswith(".") and f.suffix.lower() in (".jpeg", ".png")
            and f"{split}/{c}/{f.name}" not in unreadable)
    return planted
