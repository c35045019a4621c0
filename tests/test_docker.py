"""docker/ without a Docker engine (none can run here): lint, the launch scripts against a stand-in `docker` that
records its arguments, and the image's entrypoint run on this machine, i.e. the Dockerfile's WORKDIR, COPY, ENV
and ENTRYPOINT applied to the installed `resnet`, with run.sh's mounts emulated."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, RESNET, tiny_fit_args

BIN = Path(sys.executable).parent  # shellcheck and hadolint come from PyPI (the `test` extra)
SCRIPTS = sorted([*REPO.glob("slurm/*.sh"), *REPO.glob("docker/*.sh")])
IMAGE = "resnet-imagenet:latest"  # docker/build.sh tags it, docker/run.sh runs it
NGC_ENTRYPOINT = "/opt/nvidia/nvidia_entrypoint.sh"  # sets up the container, then execs its arguments
KEY = "wk-4f9c1e7a"  # a WANDB_API_KEY value that must not reach docker's command line


def instructions() -> list[tuple[str, str]]:
    """docker/Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", "", (REPO / "docker/Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


def last(name: str) -> str:
    return [args for inst, args in instructions() if inst == name][-1]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for inst, args in instructions():
        if inst == "ENV":
            words = shlex.split(args)
            env.update(dict(w.split("=", 1) for w in words) if "=" in words[0] else {words[0]: " ".join(words[1:])})
    return env


@pytest.fixture
def fake_docker(tmp_path) -> tuple[Path, Path]:
    """A `docker` first on PATH that writes its arguments, one a line, to the returned file (its folder to .cwd)."""
    bin_dir, argv = tmp_path / "bin", tmp_path / "docker_argv"
    bin_dir.mkdir()
    record = f'pwd > {shlex.quote(f"{argv}.cwd")}\nprintf "%s\\n" "$@" > {shlex.quote(str(argv))}\n'
    (bin_dir / "docker").write_text(f"#!/bin/sh\n{record}")
    (bin_dir / "docker").chmod(0o755)
    return bin_dir, argv


def run_script(script: str, *args: str, bin_dir: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    ours = ("IMAGENET_DIR", "OUTPUT_DIR", "RESNET_IMAGE", "CUDA_VISIBLE_DEVICES")
    base = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith("WANDB_")}
    env = {**base, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run([str(REPO / script), *args], capture_output=True, text=True, timeout=30, env=env, cwd=cwd)


def split_docker_run(argv: list[str]) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """`docker run` arguments as ({option: values}, flags, the arguments after the image for the entrypoint)."""
    assert argv[0] == "run" and IMAGE in argv, argv
    at = argv.index(IMAGE)
    options, flags, i = {}, [], 1
    while i < at:
        if argv[i] in ("--gpus", "--user", "-v", "-e"):
            options.setdefault(argv[i], []).append(argv[i + 1])
            i += 2
        else:
            flags.append(argv[i])
            i += 1
    return options, flags, argv[at + 1:]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_clean(script):
    proc = subprocess.run([BIN / "shellcheck", "-x", script.relative_to(REPO)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_clean():
    proc = subprocess.run([BIN / "hadolint", "docker/Dockerfile"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_pins_base_runs_unprivileged_and_holds_no_secret():
    base = last("FROM")
    # 25.03 was NGC's first tag with /etc/pip/constraint.txt, which keeps the image's torch, torchvision and DALI.
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base) and base.split(":")[1][:5] >= "25.03", base
    assert last("USER").split(":")[0] not in ("root", "0")
    for inst, args in instructions():
        assert "WANDB_API_KEY" not in args, (inst, args)
        if inst in ("ENV", "ARG"):
            assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", args, re.IGNORECASE), (inst, args)
    entrypoint = json.loads(last("ENTRYPOINT"))
    assert entrypoint[-1] == "resnet" and entrypoint[:-1] in ([], [NGC_ENTRYPOINT])
    ignored = {line.strip().strip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", "runs", ".git", ".cache", ".pytest_cache"} <= ignored


def test_run_sh_passes_gpus_mounts_user_key_by_name_and_args(fake_docker, tmp_path):
    bin_dir, argv_file = fake_docker
    imagenet, out = tmp_path.resolve() / "imagenet", tmp_path.resolve() / "out"
    imagenet.mkdir()
    args = ["fit", "--config", "configs/imagenet_r50.yaml", "--trainer.max_epochs", "1"]
    proc = run_script("docker/run.sh", *args, bin_dir=bin_dir, cwd=tmp_path, IMAGENET_DIR=str(imagenet),
                      OUTPUT_DIR=str(out), WANDB_API_KEY=KEY, WANDB_PROJECT="resnet-imagenet")
    assert proc.returncode == 0, proc.stderr
    argv = argv_file.read_text().splitlines()
    options, flags, passed = split_docker_run(argv)
    assert passed == args  # unchanged and in order
    assert options["--gpus"] == ["all"] and "--ipc=host" in flags and "--rm" in flags
    assert "-it" not in flags  # no terminal here
    assert options["--user"] == [f"{os.getuid()}:{os.getgid()}"]
    assert sorted(options["-v"]) == sorted([f"{imagenet}:/data/imagenet:ro", f"{out}:{last('WORKDIR')}/runs"])
    assert out.is_dir()  # made by the caller, not by Docker as root
    assert options["-e"] == ["WANDB_API_KEY", "WANDB_PROJECT"]  # by name; WANDB_MODE is not set
    assert not any(KEY in a for a in argv)


def test_run_sh_refuses_a_missing_imagenet_dir(fake_docker, tmp_path):
    bin_dir, argv_file = fake_docker
    missing = tmp_path / "no_imagenet"
    proc = run_script("docker/run.sh", "fit", "--config", "configs/imagenet_r50.yaml", bin_dir=bin_dir, cwd=tmp_path,
                      IMAGENET_DIR=str(missing), OUTPUT_DIR=str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "IMAGENET_DIR" in proc.stderr and str(missing) in proc.stderr
    assert not argv_file.exists() and not (tmp_path / "out").exists()


def test_build_sh_builds_from_the_repo_root_with_the_commit(fake_docker, tmp_path):
    bin_dir, argv_file = fake_docker
    proc = run_script("docker/build.sh", bin_dir=bin_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    argv = argv_file.read_text().splitlines()
    assert argv[:7] == ["build", "-f", "docker/Dockerfile", "-t", IMAGE, "--build-arg", argv[6]] and argv[7:] == ["."]
    assert re.fullmatch(rf"GIT_COMMIT={head}(\+dirty)?", argv[6])
    assert Path(f"{argv_file}.cwd").read_text().strip() == str(REPO)


def container_here(tmp_path: Path, mounts: list[str]) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The container's working directory rebuilt under tmp_path (its COPYs, run.sh's mounts below it as symlinks),
    the Dockerfile's ENV with its paths moved under tmp_path, and the other mounts as {container path: host path}."""
    workdir, home = last("WORKDIR"), tmp_path / "home"
    here, current = tmp_path / "container", None
    here.mkdir()
    for inst, args in instructions():
        current = args if inst == "WORKDIR" else current
        if inst == "COPY" and current == workdir:
            src, dst = args.split()
            shutil.copytree(REPO / src, here / dst)
    outside = {}
    for mount in mounts:
        host, target = mount.split(":")[:2]
        if target.startswith(f"{workdir}/"):
            (here / target.removeprefix(f"{workdir}/")).symlink_to(host)
        else:
            outside[target] = host
    env = {}
    for name, value in dockerfile_env().items():
        if value.startswith("/home/"):  # the image user's home: any uid writes there
            value = str(home / value.removeprefix("/home/"))
            Path(value).mkdir(parents=True, exist_ok=True)
        env[name] = value
    return here, env, outside


def entrypoint_here() -> list[str]:
    """The image's ENTRYPOINT as this machine runs it: NGC's set-up script left out, `resnet` the installed one."""
    return [RESNET if word == "resnet" else word for word in json.loads(last("ENTRYPOINT")) if word != NGC_ENTRYPOINT]


def test_recipes_resolve_to_the_mounts_in_the_container_layout(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out = out.resolve()
    here, env, _ = container_here(tmp_path, [f"{out}:{last('WORKDIR')}/runs"])
    proc = subprocess.run([*entrypoint_here(), "fit", "--config", "configs/imagenet_r50.yaml", "--print_config"],
                          capture_output=True, text=True, timeout=120, cwd=here, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load(proc.stdout)
    assert config["data"]["root"] == "/data/imagenet" and config["trainer"]["default_root_dir"] == "runs/imagenet_r50"
    for recipe in sorted((here / "configs").glob("imagenet_r*.yaml")):  # every recipe: data and outputs in the mounts
        config = yaml.safe_load(recipe.read_text())
        assert config["data"]["root"] == "/data/imagenet", recipe.name
        assert (here / config["trainer"]["default_root_dir"]).resolve().is_relative_to(out), recipe.name


def test_tiny_fit_through_run_sh_and_the_entrypoint(fake_docker, tmp_path, demo_root):
    """What `docker/run.sh fit ... --config configs/logger/wandb.yaml` would run in the container, run here: the
    checkpoints, logs and offline W&B run land in OUTPUT_DIR, nothing is written to the (read-only) data or elsewhere
    in the working directory."""
    bin_dir, argv_file = fake_docker
    out = tmp_path / "out"
    host_env = {"IMAGENET_DIR": str(demo_root), "OUTPUT_DIR": str(out), "WANDB_MODE": "offline"}
    args = tiny_fit_args(Path("/data/imagenet"), Path("runs/tiny"), "--config", "configs/logger/wandb.yaml",
                         "--trainer.max_epochs", "1")
    args[args.index(str(REPO / "configs/demo.yaml"))] = "configs/demo.yaml"
    proc = run_script("docker/run.sh", *args, bin_dir=bin_dir, cwd=tmp_path, **host_env)
    assert proc.returncode == 0, proc.stderr
    options, _, passed = split_docker_run(argv_file.read_text().splitlines())
    assert passed == args
    here, env, outside = container_here(tmp_path, options["-v"])

    def to_host(arg: str) -> str:  # /data/imagenet cannot be made here: in the arguments it stands for its host folder
        for target, host in outside.items():
            arg = re.sub(rf"^{re.escape(target)}(?=/|$)", host, arg)
        return arg

    # The container's environment: the image's ENV and the `-e NAME` variables (the caller's values), not the rest.
    env.update({name: host_env[name] for name in options["-e"]})
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "CUDA_VISIBLE_DEVICES"}
    data_before = sorted(demo_root.rglob("*"))
    proc = subprocess.run([*entrypoint_here(), *map(to_host, passed)], capture_output=True, text=True, timeout=180,
                          cwd=here, env={**base, **env, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "tiny/checkpoints/last.ckpt").is_file() and (out / "tiny/logs/version_0/metrics.csv").is_file()
    assert list((out / "tiny/wandb").glob("offline-run-*"))
    assert sorted(p.name for p in here.iterdir()) == ["configs", "runs"]
    assert sorted(demo_root.rglob("*")) == data_before
