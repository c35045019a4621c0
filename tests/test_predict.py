"""`resnet predict` on real JPEGs with a checkpoint of a real `resnet fit`: top-k against the network's own softmax,
names from the data's synsets, CSV and JSON, unreadable files and bad input."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from datamodules.folder import decode
from datamodules.transforms import normalize_batch, val_transform
from tests.conftest import run_resnet, tiny_fit_args
from train.predict import class_names
from train.weights import load_checkpoint


@pytest.fixture(scope="module")
def checkpoint(demo_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("predict") / "run"
    run_resnet(*tiny_fit_args(demo_root, run, "--trainer.max_epochs", "1"))
    return run / "checkpoints" / "last.ckpt"


def test_top_k_are_the_networks_softmax_with_the_datas_names(checkpoint, demo_root, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(demo_root / "val" / "n90000002", images / "a")
    (images / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (images / "a" / "moved.JPEG").symlink_to(tmp_path / "gone.JPEG")  # a dangling link: named, not skipped
    (images / "list.txt").write_text("a/ILSVRC2012_val_00000007.JPEG\n")
    out = tmp_path / "pred.csv"
    proc = run_resnet("predict", "--ckpt", str(checkpoint), str(images / "a"), str(images / "list.txt"),
                      "--output", str(out), "--top-k", "3")
    assert f"Predictions: {out}" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    jpegs = sorted(p for p in (images / "a").glob("*.JPEG") if p.exists())
    assert len(jpegs) == 5
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows if r["error"]) == ["broken.jpg", "moved.JPEG"]
    # One stdout line an image (8: 6 predicted, 2 unreadable), however long: scripts read them.
    assert len([line for line in proc.stdout.splitlines() if line.startswith(str(images))]) == 8
    assert len([r for r in rows if not r["error"]]) == 3 * (5 + 1)  # the listed image once more
    synsets = dict(line.split(" ", 1) for line in (demo_root / "synsets.txt").read_text().splitlines())

    # The first image by hand: the checkpoint's network on its validation crop (32 of 36 in the tiny fit).
    loaded = load_checkpoint(str(checkpoint))
    x = normalize_batch(val_transform(crop_size=32, resize_size=36)(decode(str(jpegs[0])))[None])
    with torch.inference_mode():
        probs = torch.softmax(loaded.net.eval()(x), dim=1)[0]
    expected = probs.topk(3)
    mine = [r for r in rows if r["path"] == str(jpegs[0])]
    assert [int(r["rank"]) for r in mine] == [1, 2, 3]
    assert [int(r["index"]) for r in mine] == expected.indices.tolist()
    assert [float(r["probability"]) for r in mine] == pytest.approx(expected.values.tolist(), abs=1e-6)
    assert [r["name"] for r in mine] == [synsets[loaded.classes[i]] for i in expected.indices.tolist()]
    assert [r["class"] for r in mine] == [loaded.classes[i] for i in expected.indices.tolist()]

    run_resnet("predict", "--ckpt", str(checkpoint), str(jpegs[0]), "--output", str(tmp_path / "pred.json"))
    (one,) = json.loads((tmp_path / "pred.json").read_text())
    assert one["path"] == str(jpegs[0]) and len(one["top"]) == 5  # the default top-5
    assert one["top"][0]["probability"] == pytest.approx(expected.values[0].item(), abs=1e-6)


def test_bad_input_names_the_cause(checkpoint, demo_root, tmp_path):
    proc = run_resnet("predict", str(tmp_path / "nowhere"), "--ckpt", str(checkpoint), expect_rc=2)
    assert f"resnet predict: error: {tmp_path}/nowhere: no such file or folder" in proc.stderr
    proc = run_resnet("predict", str(tmp_path), "--ckpt", str(checkpoint), "--weights", "x.pth", expect_rc=2)
    assert "give exactly one of --ckpt PATH or --weights" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_resnet("predict", str(tmp_path / "empty"), "--ckpt", str(checkpoint), expect_rc=2)
    assert "no images (.jpeg, .jpg, .png) to predict" in proc.stderr
    proc = run_resnet("predict", str(tmp_path), "--ckpt", str(checkpoint), "--output", "p.txt", expect_rc=2)
    assert "--output p.txt: expected a .csv or .json file" in proc.stderr
    (tmp_path / "taken.csv").mkdir()
    proc = run_resnet("predict", str(tmp_path), "--ckpt", str(checkpoint), "--output", str(tmp_path / "taken.csv"),
                      expect_rc=2)
    assert "taken.csv: a folder; name the .csv or .json file to write" in proc.stderr
    (tmp_path / "junk.txt").write_text("garbage\n")
    proc = run_resnet("predict", str(demo_root / "val"), "--ckpt", str(checkpoint), "--synsets",
                      str(tmp_path / "junk.txt"), expect_rc=2)
    assert "junk.txt: names none of the model's classes (e.g. n90000001)" in proc.stderr


def test_a_state_dict_gets_its_names_from_the_synsets_file(checkpoint, demo_root, tmp_path):
    # No classes travel with a bare state dict: the synsets file's sorted WordNet ids (one a line) stand for them.
    weights = tmp_path / "r18.pth"
    torch.save(load_checkpoint(str(checkpoint)).net.state_dict(), weights)
    image = sorted((demo_root / "val" / "n90000003").glob("*.JPEG"))[0]
    out = tmp_path / "p.json"
    run_resnet("predict", "--weights", str(weights), str(image), "--synsets", str(demo_root / "synsets.txt"),
               "--crop_size", "32", "--resize_size", "36", "--output", str(out))
    top = json.loads(out.read_text())[0]["top"]
    synsets = dict(line.split(" ", 1) for line in (demo_root / "synsets.txt").read_text().splitlines())
    assert [t["class"] for t in top] == [sorted(synsets)[t["index"]] for t in top]
    assert [t["name"] for t in top] == [synsets[t["class"]] for t in top]
    proc = run_resnet("predict", "--weights", str(weights), str(image), "--synsets", str(tmp_path / "no.txt"), expect_rc=2)
    assert f"--synsets {tmp_path}/no.txt: no such file" in proc.stderr


def test_class_ids_and_names_without_a_checkpoints_classes(demo_root):
    wnids = [f"n{i:08d}" for i in range(1000)]
    ids, names = class_names(wnids, 1000, None, None)
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue" and ids == wnids
    assert class_names(["b", "a"], 2, None, None) == (["b", "a"], ["b", "a"])  # no names anywhere: the ids
    ids, names = class_names(None, 6, None, str(demo_root))  # the training data's folders and synsets.txt
    assert ids == sorted(p.name for p in (demo_root / "train").iterdir()) and names[0] == "horizontal stripes"
