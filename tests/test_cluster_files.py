"""docker/: the images, the compose cluster and the KubeRay manifests.

No Docker daemon, Kubernetes or network here, so these tests check what can be checked without
them: every YAML file parses; the compose cluster wires the store, the bucket and the GPUs; the
KubeRay manifests have the right kinds, GPU limits and Secret; the Dockerfile installs the project
the way the Makefile does, with the same torch; and every ``blt-data`` / ``blt-train`` command
line in these files and in docker/README.md names commands and options the real CLI has (runnable
``blt-data`` lines are parsed in full by Click, and a ``patch`` also by its job config).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from pydantic import ValidationError

from cli.blt_data import app as blt_data_app
from cli.blt_train import app as blt_train_app

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
RAYCLUSTER = DOCKER / "kuberay" / "raycluster.yaml"
RAYJOB = DOCKER / "kuberay" / "rayjob-patch.yaml"
README = DOCKER / "README.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAKEFILE = (ROOT / "Makefile").read_text()

# Typer (0.29 here) carries its own copy of Click: reach its classes through typer, not `import click`.
CLICK_EXCEPTION = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "ClickException")

STORE = "s3://blt/registry"
MINIO_ENDPOINT = "http://minio:9000"
GPU = "nvidia.com/gpu"


def load_yaml(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def compose() -> dict:
    return load_yaml(COMPOSE)[0]


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` with an empty environment: the defaults."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def scripts() -> dict[str, str]:
    return PYPROJECT["project"]["scripts"]


def requirement(name: str) -> Requirement:
    return next(r for r in map(Requirement, PYPROJECT["project"]["dependencies"]) if r.name == name)


# --- the Dockerfile ------------------------------------------------------------------------


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


def dockerfile() -> tuple[dict[str, str], dict[str, list[Instruction]], dict[str, str]]:
    """(global ARG defaults, instructions per stage, each stage's parent stage or image)."""
    global_args: dict[str, str] = {}
    stages: dict[str, list[Instruction]] = {}
    parents: dict[str, str] = {}
    current: list[Instruction] | None = None
    logical, start = "", 0
    for number, raw in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        text = raw.strip()
        if text.startswith("#") or (not text and not logical):
            continue  # comments (also inside continued lines) and blank lines
        if not logical:
            start = number
        if text.endswith("\\"):
            logical += text[:-1] + " "
            continue
        logical += text
        keyword, _, args = logical.partition(" ")
        ins = Instruction(start, keyword.upper(), args.strip())
        logical = ""
        if ins.keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", ins.args, re.IGNORECASE)
            assert m and m.group(2), f"Dockerfile:{ins.line}: every stage is named (FROM IMAGE AS NAME)"
            current = stages.setdefault(m.group(2), [])
            parents[m.group(2)] = m.group(1)
        elif current is None:
            assert ins.keyword == "ARG", f"Dockerfile:{ins.line}: only ARG comes before the first FROM"
            name, _, default = ins.args.partition("=")
            global_args[name] = default
        else:
            current.append(ins)
    return global_args, stages, parents


def stage_chain(stage: str) -> list[Instruction]:
    """A target's instructions, its parent stages' first."""
    _, stages, parents = dockerfile()
    chain = []
    while stage in stages:
        chain = stages[stage] + chain
        stage = parents[stage]
    return chain


def stage_args(target: str) -> dict[str, str]:
    args = {}
    for ins in stage_chain(target):
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            args[name] = default
    return args


def run_commands(target: str) -> list[list[str]]:
    """Each shell command of the target's RUN lines, split into words."""
    commands = []
    for ins in stage_chain(target):
        if ins.keyword == "RUN":
            for part in re.split(r"&&|;", ins.args):
                if part.strip():
                    commands.append(shlex.split(part))
    return commands


def exec_form(ins: Instruction) -> list[str]:
    value = json.loads(ins.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), \
        f"Dockerfile:{ins.line}: {ins.keyword} in exec form (a JSON list), so signals reach the process"
    return value


TARGETS = ("worker", "trainer")


def test_dockerfile_has_worker_and_trainer_targets():
    _, stages, _ = dockerfile()
    assert set(TARGETS) <= set(stages)
    for target in TARGETS:
        keywords = [i.keyword for i in stage_chain(target)]
        assert "HEALTHCHECK" not in keywords
        users = [i.args for i in stage_chain(target) if i.keyword == "USER"]
        assert users, f"{target}: runs as a non-root user"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0"), f"{target} runs as {users[-1]}"


def test_image_commands_are_the_projects_console_scripts():
    for target in TARGETS:
        starts = [i for i in stage_chain(target) if i.keyword in ("CMD", "ENTRYPOINT")]
        assert starts, f"{target} has a default command"
        first = exec_form(next((i for i in starts if i.keyword == "ENTRYPOINT"), starts[-1]))
        assert first[0] in scripts(), f"{target} starts {first[0]!r}, not one of pyproject's {sorted(scripts())}"
    assert exec_form([i for i in stage_chain("trainer") if i.keyword == "CMD"][-1])[0] == "blt-train"
    assert exec_form([i for i in stage_chain("worker") if i.keyword == "CMD"][-1])[0] == "blt-data"


def makefile_words(pattern: str) -> list[str]:
    line = next(l for l in MAKEFILE.splitlines() if re.search(pattern, l))
    return shlex.split(line.strip())


def test_dockerfile_installs_the_project_like_the_makefile():
    # The Makefile: `uv pip install --python .venv/bin/python --compile-bytecode -e ".[test]"`.
    make = makefile_words(r"uv pip install .*-e")
    make_flags = {w for w in make if w.startswith("--")} - {"--python"}  # the venv's own
    assert "--compile-bytecode" in make_flags
    for target in TARGETS:
        installs = [c for c in run_commands(target) if c[:3] == ["uv", "pip", "install"]]
        project = [c for c in installs if any(re.fullmatch(r"\.(\[[\w,-]+\])?", w) for w in c)]
        assert project, f"{target}: `uv pip install ... .` installs the project, as the Makefile does"
        for c in project:
            assert make_flags <= set(c), f"{target}: {' '.join(c)} lacks {make_flags - set(c)} (the Makefile's flags)"
        copied = {w.rstrip("/").removeprefix("./") for i in stage_chain(target) if i.keyword == "COPY" for w in i.args.split()[:-1]}
        packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
        assert packages | {"pyproject.toml"} <= copied, f"{target}: COPY {sorted(packages - copied)}"


def test_dockerfile_torch_and_ray_follow_pyproject_and_the_makefile():
    # The Makefile pins the torch it installs (`pip install "torch==X"`); the images install the same.
    make_torch = next(w for w in makefile_words(r"pip install .*torch==") if w.startswith("torch=="))
    version = make_torch.removeprefix("torch==")
    for target in TARGETS:
        args = stage_args(target)
        assert args.get("TORCH_VERSION") == version, f"{target}: TORCH_VERSION={args.get('TORCH_VERSION')}, Makefile {version}"
        torch_installs = [c for c in run_commands(target) if "torch==${TORCH_VERSION}" in c]
        assert torch_installs and torch_installs[0][:2] == ["pip", "install"], "torch goes in with pip first, as in the Makefile"
        assert version in requirement("torch").specifier, f"torch {version} breaks pyproject's {requirement('torch')}"
        ray = args.get("RAY_VERSION")
        assert ray and ray in requirement("ray").specifier, f"RAY_VERSION={ray} breaks pyproject's {requirement('ray')}"
        assert any("ray[default]==${RAY_VERSION}" in c for c in run_commands(target)), "the image pins RAY_VERSION"
    python = dockerfile()[0]["PYTHON_VERSION"]
    assert python + ".0" in SpecifierSet(PYPROJECT["project"]["requires-python"])


def locked_versions(name: str) -> dict[str, str]:
    text = (ROOT / "requirements" / name).read_text()
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\\n]+)", text, re.M))


def test_locks_pin_what_the_images_and_the_makefile_install():
    """Both locks pin every package with hashes, agree on their versions, leave torch to the
    install steps (the Makefile's CPU build, the images' CUDA build) and pin the images' Ray."""
    base, test = locked_versions("base.lock"), locked_versions("test.lock")
    assert base and set(base) < set(test) and all(test[k] == v for k, v in base.items())
    assert "torch" not in test and not any(k.startswith("nvidia-") for k in test)
    assert base["ray"] == stage_args("worker")["RAY_VERSION"]
    for name in ("base.lock", "test.lock"):
        text = (ROOT / "requirements" / name).read_text()
        blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
        assert all("--hash=sha256:" in b for b in blocks if "==" in b), f"{name}: a pin without a hash"
    for spec in [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["test"]]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name != "torch":
            assert name in test, f"pyproject's {req.name} is not in the lock: run make lock"
            assert test[name] in req.specifier, f"the lock's {name}=={test[name]} breaks pyproject's {req}"


def test_dockerignore_keeps_local_state_out_of_the_context():
    entries = {l.strip().rstrip("/") for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")}
    assert {".git", ".venv", "blt-store", "bench/results"} <= entries


# --- compose ---------------------------------------------------------------------------------


def gpu_devices(service: dict) -> list[dict]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def test_compose_services():
    services = compose()["services"]
    assert {"minio", "create-bucket", "ray-head", "ray-worker", "trainer"} <= set(services)
    head, worker, trainer = services["ray-head"], services["ray-worker"], services["trainer"]

    head_cmd = head["command"]
    assert head_cmd[:2] == ["ray", "start"] and "--head" in head_cmd and "--dashboard-host=0.0.0.0" in head_cmd
    assert any(str(p).endswith(":8265") for p in head["ports"]), "the job API is published"
    assert all(str(p).startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", [])), \
        "ports are published on loopback only (Ray's auth is off)"
    assert worker["command"][:2] == ["ray", "start"] and "--address=ray-head:6379" in worker["command"]

    devices = gpu_devices(worker)
    assert devices and devices[0]["count"] in (1, "all"), "the Ray worker reserves a GPU"
    assert not gpu_devices(head), "the head schedules no GPU work"
    assert gpu_devices(trainer) and trainer.get("profiles") == ["train"]

    dockerfile_path = DOCKER / head["build"]["context"] / head["build"]["dockerfile"]
    assert dockerfile_path.resolve() == DOCKERFILE
    assert head["build"]["target"] == worker["build"]["target"] == "worker"
    assert head["image"] == worker["image"]
    assert trainer["build"]["target"] == "trainer"
    assert command_words(trainer["command"])[:1] == ["torchrun"]


def command_words(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_compose_store_wiring():
    services = compose()["services"]
    minio = services["minio"]["environment"]
    user, password = interpolate(minio["MINIO_ROOT_USER"]), interpolate(minio["MINIO_ROOT_PASSWORD"])
    for name in ("ray-head", "ray-worker", "trainer"):
        env = {k: interpolate(str(v)) for k, v in services[name]["environment"].items()}
        assert env["BLT_STORE"] == STORE and env["AWS_ENDPOINT_URL"] == MINIO_ENDPOINT
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (user, password), \
            "the cluster uses MinIO's (development) credentials"
        assert services[name]["environment"]["AWS_ACCESS_KEY_ID"].startswith("${"), "overridable from .env"
    mc = services["create-bucket"]
    assert "minio/mc" in mc["image"] and "minio" in mc["depends_on"]
    bucket = STORE.removeprefix("s3://").split("/")[0]
    assert mc["command"][:1] == ["mb"] and f"local/{bucket}" in mc["command"]
    assert interpolate(mc["environment"]["MC_HOST_local"]) == f"http://{user}:{password}@minio:9000"
    for name in ("ray-head", "trainer"):
        assert services[name]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"


def test_no_real_looking_credentials():
    for path in (COMPOSE, RAYCLUSTER, RAYJOB, DOCKERFILE, README):
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name} holds an AWS access key id"
        assert not re.search(r"[A-Za-z0-9/+]{40}", text), f"{path.name} holds something shaped like a secret key"


def test_compose_validates_with_docker_compose_when_installed():
    """`docker compose config` checks the file against the Compose schema; no daemon needed."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        cmd = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        cmd = ["docker-compose"]
    else:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    out = subprocess.run([*cmd, "-f", str(COMPOSE), "--profile", "train", "config", "-q"],
                         capture_output=True, text=True, timeout=60, cwd=DOCKER)
    assert out.returncode == 0, out.stderr


# --- KubeRay ---------------------------------------------------------------------------------


def cluster_specs() -> list[tuple[str, dict]]:
    (cluster,), (job,) = load_yaml(RAYCLUSTER), load_yaml(RAYJOB)
    return [("RayCluster", cluster["spec"]), ("RayJob", job["spec"]["rayClusterSpec"])]


def containers(spec: dict) -> list[tuple[str, dict]]:
    out = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec["workerGroupSpecs"]:
        out += [(group["groupName"], c) for c in group["template"]["spec"]["containers"]]
    return out


def test_kuberay_kinds():
    (cluster,), (job,) = load_yaml(RAYCLUSTER), load_yaml(RAYJOB)
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_kuberay_gpu_workers_and_image():
    ray_version = stage_args("worker")["RAY_VERSION"]
    images = set()
    for kind, spec in cluster_specs():
        assert spec["rayVersion"] == ray_version, f"{kind}: rayVersion is the image's Ray"
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert GPU not in head.get("resources", {}).get("limits", {}), f"{kind}: the head has no GPU"
        assert spec["workerGroupSpecs"], f"{kind}: a worker group"
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            for c in group["template"]["spec"]["containers"]:
                resources = c["resources"]
                assert resources["limits"][GPU] == 1, f"{kind}/{group['groupName']}: one GPU per worker"
                assert resources.get("requests", {}).get(GPU, 1) == resources["limits"][GPU]
        for _, c in containers(spec):
            images.add(c["image"])
        for pod in [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]:
            assert pod["securityContext"]["runAsNonRoot"] is True
    assert len(images) == 1, f"one image everywhere, the worker target: {images}"


def test_kuberay_s3_settings_from_a_secret():
    for kind, spec in cluster_specs():
        for where, c in containers(spec):
            env = {e["name"]: e for e in c["env"]}
            assert env["BLT_STORE"]["value"].startswith("s3://")
            secrets = set()
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert ref["key"] == key and not ref.get("optional", False), f"{kind}/{where}: {key} from the Secret"
                secrets.add(ref["name"])
            assert len(secrets) == 1
            if "AWS_ENDPOINT_URL" in env:  # optional: only S3-compatible stores need it
                assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_rayjob_entrypoint_joins_its_cluster():
    (job,) = load_yaml(RAYJOB)
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["blt-data", "patch"]
    ctx = check_command(words, "rayjob entrypoint", strict=True)
    assert ctx.params["ray_address"] == "auto"
    assert ctx.params["gpus_per_worker"] > 0
    workers = sum(g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert ctx.params["workers"] * ctx.params["gpus_per_worker"] <= workers, "the job's actors fit on the GPUs"


# --- every command line shown ------------------------------------------------------------------


PROGRAM = re.compile(r"(?<![\w./-])(blt-data|blt-train|-m\s+cli\.blt_data|-m\s+cli\.blt_train)(?![\w.-])")
PROGRAMS = {"blt-data": "blt-data", "blt-train": "blt-train", "cli.blt_data": "blt-data", "cli.blt_train": "blt-train"}
SHELL_BREAKS = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1"}
ELLIPSES = ("…", "...")


@dataclass
class Shown:
    where: str
    words: list[str]
    strict: bool  # a runnable line (not a mention in prose): parsed in full


def words_after(text: str) -> list[str]:
    text = text.split("`")[0]
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    for i, w in enumerate(words):
        if w in SHELL_BREAKS or w.startswith("#"):
            return words[:i]
    return words


def runnable_prefix(prefix: str) -> bool:
    """Whether what comes before a program word on a line leaves it a command to run."""
    prefix = prefix.strip().lstrip("#$>").strip()
    try:
        words = shlex.split(prefix)
    except ValueError:
        return False
    while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
        words.pop(0)  # VAR=value before the command
    return not words or words[0] in ("torchrun", "python", "python3")


def scan_lines(path: Path, only_comments: bool) -> list[Shown]:
    shown = []
    lines = path.read_text().splitlines()
    joined, start = [], 0
    for number, line in enumerate(lines, 1):  # join backslash-continued lines
        if not joined:
            start = number
        joined.append(line.rstrip()[:-1] if line.rstrip().endswith("\\") else line)
        if line.rstrip().endswith("\\"):
            continue
        text = " ".join(j.strip() if k else j for k, j in enumerate(joined))
        joined = []
        if only_comments and not text.lstrip().startswith("#"):
            continue
        for m in PROGRAM.finditer(text):
            program = PROGRAMS[m.group(1).split()[-1]]
            words = [program, *words_after(text[m.end():])]
            shown.append(Shown(f"{path.relative_to(ROOT)}:{start}", words, runnable_prefix(text[:m.start()])))
    return shown


def structured_commands() -> list[Shown]:
    """Commands that the files run: Dockerfile CMD/ENTRYPOINT, compose commands, the RayJob's."""
    shown = []

    def add(where: str, words: list[str]) -> None:
        for i, w in enumerate(words):
            if w in ("blt-data", "blt-train"):
                shown.append(Shown(where, [w, *words[i + 1:]], True))
                return
            if w == "-m" and i + 1 < len(words) and words[i + 1] in PROGRAMS:
                shown.append(Shown(where, [PROGRAMS[words[i + 1]], *words[i + 2:]], True))
                return

    for target in TARGETS:
        for ins in stage_chain(target):
            if ins.keyword in ("CMD", "ENTRYPOINT"):
                add(f"Dockerfile:{ins.line}", exec_form(ins))
    for name, service in compose()["services"].items():
        for key in ("entrypoint", "command"):
            if key in service:
                add(f"compose.yaml {name}.{key}", [interpolate(w) for w in command_words(service[key])])
    for path in (RAYCLUSTER, RAYJOB):
        for doc in load_yaml(path):
            if doc["kind"] == "RayJob":
                add(f"{path.name} entrypoint", shlex.split(doc["spec"]["entrypoint"]))
    return shown


def all_shown() -> list[Shown]:
    return [
        *structured_commands(),
        *scan_lines(DOCKERFILE, only_comments=True),
        *scan_lines(COMPOSE, only_comments=True),
        *scan_lines(RAYCLUSTER, only_comments=True),
        *scan_lines(RAYJOB, only_comments=True),
        *scan_lines(README, only_comments=False),
    ]


def is_group(command) -> bool:
    return hasattr(command, "commands")


def option_names(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if param.param_type_name == "option":
            names |= set(param.opts) | set(param.secondary_opts)
    return names


def check_command(words: list[str], where: str, strict: bool):
    """Check ``blt-data ...`` / ``blt-train ...`` against the apps; returns the parsed context."""
    program, args = words[0], [w for w in words[1:] if w not in ELLIPSES]
    strict = strict and len(args) == len(words) - 1  # an elided line is checked for names only
    if program == "blt-train":
        # The trainer's CLI is being built: check sub-command names only.
        group = typer.main.get_command(blt_train_app)
        if args and not args[0].startswith("-") and is_group(group):
            assert args[0] in group.commands, f"{where}: `blt-train {args[0]}` is not a command (has {sorted(group.commands)})"
        return None

    command = typer.main.get_command(blt_data_app)
    path = ["blt-data"]
    while is_group(command):
        if not args or args[0].startswith("-"):
            assert not strict or args[:1] == ["--help"], f"{where}: `{' '.join(words)}` names no command"
            return None
        assert args[0] in command.commands, f"{where}: `{' '.join(path)} {args[0]}` is not a command (has {sorted(command.commands)})"
        command = command.commands[args[0]]
        path.append(args.pop(0))

    known = option_names(command)
    nested = None
    for i, w in enumerate(args):
        if w == "--":
            nested = args[i + 1:]
            break
        if w.startswith("-") and w != "-" and not re.fullmatch(r"-[\d.]+", w):
            assert w.split("=")[0] in known, f"{where}: `{' '.join(path)}` has no option {w.split('=')[0]}"

    leaf = path[-1]
    if leaf == "submit" and nested:
        inner = check_command(["blt-data", *nested], where, strict)
        if inner is not None and nested[0] == "patch":
            assert inner.params["ray_address"], f"{where}: a submitted patch needs --ray-address auto to join the cluster"
    if not strict:
        return None
    try:
        ctx = command.make_context(" ".join(path), list(args))
    except CLICK_EXCEPTION as e:
        pytest.fail(f"{where}: `{' '.join(words)}`: {e.format_message()}")
    if leaf == "patch" and not ctx.params.get("config"):
        from blt_data.patching import PatchRule
        from pipelines.patch_job import PatchJobConfig

        given = {k: v for k, v in ctx.params.items() if k in PatchJobConfig.model_fields and v is not None}
        rule = {k: v for k, v in ctx.params.items() if k in PatchRule.model_fields and v is not None}
        try:
            PatchJobConfig(**given, rule=rule)
        except ValidationError as e:
            pytest.fail(f"{where}: `{' '.join(words)}`: {e.errors()[0]['msg']}")
    return ctx


def test_cluster_files_show_commands():
    """The scan itself finds what it should (so that the next test can't pass on nothing)."""
    shown = all_shown()
    where = {s.where.split(":")[0].split(" ")[0] for s in shown}
    assert {"Dockerfile", "compose.yaml", "rayjob-patch.yaml", "docker/README.md"} <= where
    runnable = [s.words[:2] for s in shown if s.strict]
    assert ["blt-data", "submit"] in runnable and ["blt-train", "train"] in runnable


@pytest.mark.parametrize("shown", all_shown(), ids=lambda s: f"{s.where} {' '.join(s.words[:3])}")
def test_command_lines_match_the_cli(shown: Shown):
    check_command(shown.words, shown.where, shown.strict)


def test_python_dash_m_modules_can_run():
    """`python -m cli.X` / `torchrun -m cli.X` runs only a module with a __main__ block."""
    for path in (DOCKERFILE, COMPOSE, RAYCLUSTER, RAYJOB, README):
        for module in set(re.findall(r"-m\s+(cli\.blt_\w+)", path.read_text())):
            source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
            assert 'if __name__ == "__main__":' in source, f"{path.name} runs `-m {module}`, which has no __main__ block"


def test_every_yaml_file_parses():
    files = sorted([*DOCKER.rglob("*.yaml"), *DOCKER.rglob("*.yml")])
    assert {COMPOSE, RAYCLUSTER, RAYJOB} <= set(files)
    for path in files:
        docs = load_yaml(path)
        assert docs and all(isinstance(d, dict) for d in docs), path
