"""ILSVRC evaluation: the protocols' views, view averaging, result files, ensembles, and `resnet evaluate` as run."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as v1
from torchvision.transforms import v2

from datamodules.evaluation import EvalDataModule
from datamodules.folder import decode
from datamodules.imagenet import ImageNetDataModule
from datamodules.transforms import EvalViews, normalize_batch
from tests.conftest import REPO, run_resnet, small_disk, tiny_fit_args, write_imagenet_val
from train.evaluate import ViewAveraging, evaluate
from train.networks import build_resnet
from train.results import ensemble, save_result, topk_accuracy
from train.weights import infer_arch, load_weights

# (width, height): ImageNet's common landscape and portrait shapes, a square, extremes of aspect ratio.
SIZES = [(500, 375), (375, 500), (500, 333), (256, 256), (640, 427), (260, 700)]


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory) -> Path:
    """Real JPEGs (quality 90) of several sizes and aspect ratios in the ImageNet layout, 2 classes."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        folder = root / "val" / f"n0000000{i % 2 + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([x * 255 / w, y * 255 / h, (x + y) % 64 * 4], -1) + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img_{i}.JPEG", quality=90)
    return root


def loader_batch(root: Path, views: EvalViews, batch_size: int = len(SIZES)):
    dm = EvalDataModule(str(root), batch_size=batch_size, num_workers=0, views=views)
    dm.setup("test")
    return dm, next(iter(dm.test_dataloader()))


def views_of(groups, position: int) -> list[torch.Tensor]:
    """The views of the image at `position` of a batch, in the order the protocol made them."""
    return [v for views, owners in groups for v, o in zip(views, owners) if o == position]


def test_ten_crop_views_equal_torchvision_tencrop(photo_root):
    dm, (groups, labels, indices) = loader_batch(photo_root, EvalViews("10crop", crop_size=224, resize_size=256))
    assert len(groups) == 1 and groups[0][0].shape == (10 * len(SIZES), 3, 224, 224)  # one batch of 10 x B
    for position, index in enumerate(indices.tolist()):
        resized = v2.Resize(256, antialias=True)(decode(dm.dataset.samples[index][0]))
        got = views_of(groups, position)
        expected = v1.TenCrop(224)(resized)  # torchvision's TenCrop on the same decoded, resized image
        assert len(got) == 10
        for g, e in zip(got, expected):
            assert torch.equal(g, e)
        h, w = resized.shape[-2:]
        assert min(h, w) == 256
        # The geometry spelled out: corners tl, tr, bl, br, centre, then the five same crops of the mirrored
        # image (so its top-left crop is the mirror of the top-right one).
        assert torch.equal(got[0], resized[:, :224, :224]) and torch.equal(got[3], resized[:, h - 224:, w - 224:])
        top, left = round((h - 224) / 2), round((w - 224) / 2)
        assert torch.equal(got[4], resized[:, top:top + 224, left:left + 224])
        mirrored = resized.flip(-1)
        assert torch.equal(got[5], got[1].flip(-1)) and torch.equal(got[6], got[0].flip(-1))
        assert torch.equal(got[7], got[3].flip(-1)) and torch.equal(got[8], got[2].flip(-1))
        assert torch.equal(got[9], mirrored[:, top:top + 224, left:left + 224])


def test_ten_crop_of_the_central_square_takes_alexnets_corners(photo_root):
    dm, (groups, _, indices) = loader_batch(
        photo_root, EvalViews("10crop", crop_size=224, resize_size=256, ten_crop_region="center_square"))
    for position, index in enumerate(indices.tolist()):
        resized = v2.Resize(256, antialias=True)(decode(dm.dataset.samples[index][0]))
        h, w = resized.shape[-2:]
        # By hand: the central 256 x 256 square (AlexNet's image), its corners and centre, then their mirrors.
        top, left = round((h - 256) / 2), round((w - 256) / 2)
        square = resized[:, top:top + 256, left:left + 256]
        expected = [square[:, :224, :224], square[:, :224, 32:], square[:, 32:, :224], square[:, 32:, 32:],
                    square[:, 16:240, 16:240]]
        expected += [e.flip(-1) for e in (expected[1], expected[0], expected[3], expected[2], expected[4])]
        got = views_of(groups, position)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)) and len(got) == 10
        if w != h:  # the corners differ from torchvision's TenCrop of the whole resized image
            assert not torch.equal(got[0], resized[:, :224, :224]) or not torch.equal(got[3], resized[:, h - 224:, w - 224:])
    with pytest.raises(ValueError, match="ten_crop_region='corners'"):
        EvalViews("10crop", ten_crop_region="corners")


def test_center_view_is_torchvision_protocol(photo_root):
    dm, (groups, _, indices) = loader_batch(photo_root, EvalViews("center", crop_size=224, resize_size=232))
    reference = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()  # resize 232, crop 224, bilinear
    for position, index in enumerate(indices.tolist()):
        (view,) = views_of(groups, position)
        image = decode(dm.dataset.samples[index][0])
        expected = reference(image)  # float, normalised
        # On the 0-255 scale the uint8 resize kernel (ours) and the preset's float one round apart by at most one
        # level (measured: ~15% of pixels differ, by exactly 1).
        diff = (normalize_batch(view[None])[0] - expected) * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
        assert diff.abs().max() <= 1.0 + 1e-3 and diff.abs().mean() < 0.3


def test_multiscale_views_have_the_asked_shorter_sides(photo_root):
    scales = (224, 256, 384, 480, 640)
    dm, (groups, _, indices) = loader_batch(photo_root, EvalViews("multiscale", scales=scales))
    for position, index in enumerate(indices.tolist()):
        image = decode(dm.dataset.samples[index][0])
        h0, w0 = image.shape[-2:]
        got = views_of(groups, position)
        assert len(got) == 2 * len(scales)
        for k, scale in enumerate(scales):
            view, flipped = got[2 * k], got[2 * k + 1]
            assert min(view.shape[-2:]) == scale  # uncropped: the shorter side is the scale
            longer = max(view.shape[-2:])
            assert abs(longer - scale * max(h0, w0) / min(h0, w0)) < 1  # aspect ratio kept
            assert (view.shape[-2] >= view.shape[-1]) == (h0 >= w0)
            assert torch.equal(flipped, view.flip(-1))
    sizes = {tuple(v.shape[-2:]) for views, _ in groups for v in views}
    assert len(groups) == len(sizes)  # grouped by size, one forward (or a few) per size
    no_flip = EvalViews("multiscale", scales=(300, 200), flip=False)
    assert len(no_flip(decode(dm.dataset.samples[0][0]))) == 2 and no_flip.views_per_image == 2


def test_view_average_equals_a_hand_computation(photo_root):
    torch.manual_seed(0)
    net = build_resnet("resnet18", num_classes=6).eval()
    _, (groups, labels, _) = loader_batch(photo_root, EvalViews("multiscale", scales=(64, 96)), batch_size=3)
    hand = torch.zeros(3, 6)
    with torch.no_grad():
        for position in range(3):
            views = views_of(groups, position)
            assert len(views) == 4
            probs = [net(normalize_batch(v[None])).softmax(1)[0] for v in views]
            hand[position] = torch.stack(probs).mean(0)
        for budget in (1, 64 * 200):  # one view per forward, or several same-size views at once
            module = ViewAveraging(net, max_pixels_per_forward=budget)
            got = module.average_views(groups, 3)
            assert torch.allclose(got, hand, atol=1e-5)
            assert torch.allclose(got.sum(1), torch.ones(3), atol=1e-5)


def fake_result(probs: np.ndarray, labels: np.ndarray, model: str, ids=None, classes=None) -> dict:
    n, c = probs.shape
    return {
        "model": model, "arch": "resnet50", "protocol": "10crop", "views": 10,
        "ids": ids or [f"n{c:08d}/img_{i}.JPEG" for i in range(n)], "labels": torch.from_numpy(labels),
        "classes": classes or [f"n{j:08d}" for j in range(c)], "probs": torch.from_numpy(probs).half(),
    }


def random_probs(rng, n: int, c: int) -> np.ndarray:
    """Rows of distinct values (no ties in float16, so top-k is unambiguous), normalised."""
    rows = np.stack([rng.permutation(c) + 1 for _ in range(n)]).astype(np.float32) ** 2
    return (rows / rows.sum(1, keepdims=True)).astype(np.float16)


def numpy_topk(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    ranks = (probs > probs[np.arange(len(labels)), labels][:, None]).sum(1)  # classes scored above the true one
    return 100.0 * (ranks < k).mean()


def test_ensemble_equals_a_direct_numpy_computation(tmp_path):
    rng = np.random.default_rng(1)
    n, c = 203, 20
    labels = rng.integers(0, c, n)
    probs = [random_probs(rng, n, c) for _ in range(3)]
    files = [save_result(tmp_path / f"m{i}.pt", fake_result(p, labels, f"model{i}")) for i, p in enumerate(probs)]
    weights = [1.0, 1.0, 2.0]
    out = ensemble([str(f) for f in files], weights, str(tmp_path / "ensemble.md"))
    mean = sum(w * p.astype(np.float32) for w, p in zip(weights, probs)) / sum(weights)
    for row, p in zip(out["rows"], probs + [mean]):
        assert row["acc1"] == pytest.approx(numpy_topk(p, labels, 1), abs=1e-9)
        assert row["acc5"] == pytest.approx(numpy_topk(p, labels, 5), abs=1e-9)
        assert row["top1_err"] == pytest.approx(100 - numpy_topk(p, labels, 1), abs=1e-9)
        assert row["images"] == n
    assert np.allclose(out["probs"].numpy(), mean, atol=1e-6)
    assert topk_accuracy(torch.from_numpy(probs[0]), torch.from_numpy(labels))["acc1"] == out["rows"][0]["acc1"]
    table = (tmp_path / "ensemble.md").read_text().splitlines()
    assert table[0].startswith("| model | protocol |") and len(table) == 2 + 4
    assert table[-1].startswith("| ensemble (weights 1,1,2) of 3 |")
    record = json.loads((tmp_path / "ensemble.json").read_text())
    assert record["weights"] == weights and record["rows"][-1]["acc1"] == out["rows"][-1]["acc1"]


def test_ensemble_rejects_mismatched_files_naming_both(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 6, 10)
    base = fake_result(random_probs(rng, 10, 6), labels, "a")
    a = save_result(tmp_path / "a.pt", base)
    reordered = fake_result(random_probs(rng, 10, 6), labels, "b", ids=list(reversed(base["ids"])))
    b = save_result(tmp_path / "b.pt", reordered)
    proc = run_resnet("ensemble", str(a), str(b), expect_rc=2)
    assert f"{a} and {b} do not cover the same images in the same order" in proc.stderr
    fewer = fake_result(random_probs(rng, 9, 6), labels[:9], "c", ids=base["ids"][:9])
    c = save_result(tmp_path / "c.pt", fewer)
    with pytest.raises(ValueError, match=f"{a} and {c} do not cover the same images.*10 vs 9 images"):
        ensemble([str(a), str(c)])
    other_labels = fake_result(random_probs(rng, 10, 6), labels, "d", classes=[f"n9{j:07d}" for j in range(6)])
    d = save_result(tmp_path / "d.pt", other_labels)
    with pytest.raises(ValueError, match=f"{a} and {d} use different label sets"):
        ensemble([str(a), str(d)])
    for weights in ([1.0], [float("nan"), 1.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="expected 2 non-negative numbers"):
            ensemble([str(a), str(a)], weights=weights)
    torch.save({**base, "probs": base["probs"][:, :5]}, tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"narrow.pt: probs \(10, 5\) / labels \(10,\) do not match 10 ids x 6 classes"):
        ensemble([str(a), str(tmp_path / "narrow.pt")])
    (tmp_path / "junk.pt").write_bytes(b"not a result")
    proc = run_resnet("ensemble", str(a), str(tmp_path / "junk.pt"), expect_rc=2)
    assert "junk.pt" in proc.stderr


@pytest.fixture(scope="module")
def demo_ckpt(demo_root, tmp_path_factory) -> Path:
    """A 2-epoch ResNet-18 of the small demo set at 32 pixels."""
    run_dir = tmp_path_factory.mktemp("evalrun") / "run"
    run_resnet(*tiny_fit_args(demo_root, run_dir, "--trainer.max_epochs", "2"))
    return run_dir / "checkpoints/last.ckpt"


def eval_args(root: Path, *extra: str) -> list[str]:
    return [
        "evaluate", "--data.root", str(root), "--data.batch_size", "8", "--data.num_workers", "0",
        "--crop_size", "32", "--resize_size", "36", "--scales", "32,36,55,69,91",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", *extra,
    ]


def test_demo_checkpoint_evaluates_under_all_three_protocols(demo_root, demo_ckpt, tmp_path):
    checkpoint = torch.load(demo_ckpt, map_location="cpu", weights_only=False)
    assert checkpoint["ImageNetDataModule"]["classes"] == sorted(p.name for p in (demo_root / "train").iterdir())
    results = {}
    for protocol, views in (("center", 1), ("10crop", 10), ("multiscale", 10)):
        out = tmp_path / f"{protocol}.pt"
        proc = run_resnet(*eval_args(demo_root, "--ckpt", str(demo_ckpt), "--protocol", protocol, "--output", str(out)))
        summary = json.loads(out.with_suffix(".json").read_text())
        assert summary["protocol"] == protocol and summary["views"] == views and summary["images"] == 30
        assert summary["num_classes"] == 6 and summary["arch"] == "resnet18" and summary["images_per_sec"] > 0
        assert f"{summary['top1_err']:.2f}" in proc.stdout  # printed as saved
        result = torch.load(out, weights_only=True)
        assert result["probs"].dtype == torch.float16 and result["probs"].shape == (30, 6)
        assert torch.allclose(result["probs"].float().sum(1), torch.ones(30), atol=2e-3)
        assert len(result["ids"]) == 30 and result["ids"][0] == "n90000001/ILSVRC2012_val_00000001.JPEG"
        assert result["labels"].tolist() == [i // 5 for i in range(30)]
        assert topk_accuracy(result["probs"], result["labels"])["acc1"] == summary["acc1"]
        results[protocol] = out
    proc = run_resnet("ensemble", *map(str, results.values()), "--output", str(tmp_path / "ens.md"))
    assert "ensemble of 3" in proc.stdout and (tmp_path / "ens.md").is_file()


def test_evaluate_reports_bad_input_clearly(demo_root, demo_ckpt, demo_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"--ckpt {tmp_path / 'missing.ckpt'}: no such file"):
        evaluate(ckpt=str(tmp_path / "missing.ckpt"), data={"root": str(demo_root)})
    with pytest.raises(FileNotFoundError, match=f"--ckpt {tmp_path}: a folder, not a file"):
        evaluate(ckpt=str(tmp_path), data={"root": str(demo_root)})
    with pytest.raises(ValueError, match="give exactly one of --ckpt PATH or --weights"):
        evaluate(data={"root": str(demo_root)})
    with pytest.raises(ValueError, match="name the .pt file of probabilities"):
        save_result(tmp_path / "r.json", {})
    (demo_copy / "val/n12345678").mkdir()
    shutil.copy(demo_root / "val/n90000001/ILSVRC2012_val_00000001.JPEG", demo_copy / "val/n12345678/x.JPEG")
    with pytest.raises(ValueError, match="evaluate it with --ckpt"):
        evaluate(weights=str(demo_ckpt), data={"root": str(demo_root)})
    with pytest.raises(ValueError, match="ddp_spawn: spawned processes cannot hand the result back"):
        evaluate(ckpt=str(demo_ckpt), data={"root": str(demo_root), "num_workers": 0},
                 trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"})
    proc = run_resnet(*eval_args(demo_copy, "--ckpt", str(demo_ckpt)), expect_rc=2)  # as a user sees it
    assert "val/n12345678: class 'n12345678' is not among the 6 train classes" in proc.stderr
    assert "Traceback" not in proc.stderr
    # --output on a disk with 2 KB left: the .pt fills it part-way (torch's RuntimeError over the ENOSPC)
    with small_disk(tmp_path / "full", "1m", leave=2048) as full:
        proc = run_resnet(*eval_args(demo_root, "--ckpt", str(demo_ckpt), "--output", str(full / "r.pt")), expect_rc=1)
        assert proc.stderr.strip().splitlines()[-1] == (
            f"resnet evaluate: error: No space left on device writing {full / 'r.pt'}: that file system, or your "
            "quota on it, is full. Free space or write elsewhere, then run the same command again (files already "
            "complete are kept)")
        assert "wrote" not in proc.stdout and os.listdir(full) == [".filler"]  # no partial file either


def test_labels_follow_the_checkpoint_classes_and_any_precision_runs(demo_copy, demo_ckpt):
    shutil.rmtree(demo_copy / "train")
    shutil.rmtree(demo_copy / "val/n90000001")  # a val subset: the sorted folders would shift every label by one
    args = dict(crop_size=32, resize_size=36, data={"root": str(demo_copy), "num_workers": 0, "batch_size": 25})
    fp32 = evaluate(ckpt=str(demo_ckpt), trainer={"accelerator": "cpu", "enable_progress_bar": False}, **args)
    assert fp32["images"] == 25 and fp32["labels"].tolist() == [1 + i // 5 for i in range(25)]
    assert fp32["classes"][0] == "n90000001" and len(fp32["classes"]) == 6
    bf16 = evaluate(ckpt=str(demo_ckpt), trainer={"accelerator": "cpu", "precision": "bf16-true", "enable_progress_bar": False}, **args)
    assert torch.allclose(bf16["probs"].float(), fp32["probs"].float(), atol=0.05)  # bfloat16 weights: ~3 digits


@pytest.mark.slow
def test_two_process_evaluation_saves_what_one_process_saves(demo_copy, demo_ckpt, tmp_path):
    next(iter(sorted((demo_copy / "val/n90000002").iterdir()))).unlink()  # 29 images: odd, and not / batch 8
    for protocol in ("10crop", "multiscale"):  # one batch of 10 x B; size groups that differ between ranks
        outputs = {}
        for devices in (1, 2):
            out = tmp_path / f"{protocol}_world{devices}.pt"
            run_resnet(*eval_args(demo_copy, "--ckpt", str(demo_ckpt), "--protocol", protocol, "--output", str(out),
                                  "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices == 2 else "auto"))
            outputs[devices] = torch.load(out, weights_only=True)
        one, two = outputs[1], outputs[2]
        assert two["world_size"] == 2 and one["world_size"] == 1
        assert two["ids"] == one["ids"] and len(one["ids"]) == 29 and len(set(two["ids"])) == 29
        assert torch.equal(two["labels"], one["labels"])
        assert torch.allclose(two["probs"].float(), one["probs"].float(), atol=1e-3)  # within float16
        assert two["acc1"] == one["acc1"] and two["acc5"] == one["acc5"]


def test_torchvision_weights_by_name_from_the_download_cache(tmp_path, monkeypatch):
    # Offline: torchvision's download cache already holds the file (here: random weights under the real name).
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "torch_home/hub/checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), cache / Path(weights.url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    loaded = load_weights("torchvision:resnet18.IMAGENET1K_V1")
    assert loaded.arch == "resnet18" and loaded.resize_size == 256 and loaded.published["acc@1"] == 69.758
    with pytest.raises(ValueError, match="resnet18 has weights IMAGENET1K_V1, DEFAULT, not 'IMAGENET1K_V2'"):
        load_weights("torchvision:resnet18.IMAGENET1K_V2")
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        load_weights("torchvision:vgg16.IMAGENET1K_V1")

    root = write_imagenet_val(tmp_path / "imagenet")
    out = tmp_path / "r18.pt"
    proc = run_resnet(
        "evaluate", "--weights", "torchvision:resnet18.IMAGENET1K_V1", "--data.root", str(root), "--data.batch_size", "100",
        "--data.num_workers", "0", "--crop_size", "32", "--resize_size", "36", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--output", str(out), env={"TORCH_HOME": str(tmp_path / "torch_home")},
    )
    assert "published (torchvision, center crop, resize 256): acc1 69.758" in proc.stdout
    assert "add --resize_size 256 to match it" in proc.stdout
    result = torch.load(out, weights_only=True)
    assert result["probs"].shape == (1000, 1000) and result["labels"].tolist() == list(range(1000))
    # The center protocol is torchvision's: resize, centre crop, normalise, softmax, image by image.
    preprocess = v2.Compose([v2.Resize(36, antialias=True), v2.CenterCrop(32)])
    with torch.no_grad():
        for i in range(0, 1000, 97):
            image = decode(str(root / "val" / result["ids"][i]))
            expected = net.eval()(normalize_batch(preprocess(image)[None])).softmax(1)[0]
            assert torch.allclose(result["probs"][i].float(), expected, atol=1e-3)

    proc = run_resnet("evaluate", "--weights", "torchvision:resnet18.IMAGENET1K_V1", "--data.root", str(REPO / "tests"),
                      env={"TORCH_HOME": str(tmp_path / "torch_home")}, expect_rc=2)
    assert "tests/val: missing" in proc.stderr
    # Folders named otherwise than by wnid would sort into another class order: refused, not mis-scored.
    for c in range(1000):
        (root / "val" / f"n{c:08d}").rename(root / "val" / str(c))
    with pytest.raises(ValueError, match=r"index the 1000 WordNet ids .* has class folders \['0', '1', '10'\]"):
        evaluate(weights="torchvision:resnet18.IMAGENET1K_V1", data={"root": str(root)}, trainer={"accelerator": "cpu"})


def test_state_dict_files_load_with_their_depth_inferred(tmp_path):
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        state = build_resnet(arch, num_classes=10).state_dict()
        assert infer_arch(state) == arch
    path = tmp_path / "r34.pth"
    torch.save(build_resnet("resnet34", num_classes=10).state_dict(), path)
    loaded = load_weights(str(path))
    assert loaded.arch == "resnet34" and loaded.net.fc.out_features == 10 and loaded.classes is None
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_weights(str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    junk = (r"--weights .*junk.pth: cannot read it, damaged or cut short\? \(a Lightning checkpoint\? evaluate it "
            r"with --ckpt\) \(UnpicklingError: Unsupported operand 0\)")
    with pytest.raises(ValueError, match=junk):
        load_weights(str(tmp_path / "junk.pth"))


def test_a_checkpoint_refuses_a_dataset_with_other_classes(demo_root):
    dm = ImageNetDataModule(str(demo_root))
    dm.setup("validate")
    dm.load_state_dict(dm.state_dict())  # the same classes: fine
    with pytest.raises(ValueError, match="classes differ from the 7 the checkpoint was trained on"):
        dm.load_state_dict({"classes": dm.classes + ["n99999999"]})
