"""Static checks of docker/ (fast, no engine): what the compose file and the images promise.

``docker/test-podman.sh`` (opt-in) runs them for real; these checks keep the promises from
silently breaking on every test run.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def sites(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if name.startswith("site-")}


def test_three_sites_each_with_its_own_read_only_data_and_key(compose):
    found = sites(compose)
    assert sorted(found) == ["site-a", "site-b", "site-c"]
    keys = set()
    for name, service in found.items():
        assert service["environment"]["SITE_NAME"] == name
        volumes = service["volumes"]
        assert f"${{FEDFREEZE_SITES:-./sites}}/{name}:/data:ro" in volumes
        key = f"${{FEDFREEZE_SECRETS:-./secrets}}/{name}.key:/keys/site.key:ro"
        assert key in volumes
        keys.add(key)
        assert "${FEDFREEZE_SECRETS:-./secrets}/ca.pem:/certs/ca.pem:ro" in volumes
        assert "${FEDFREEZE_APPROVED_APPS:-./approved-apps}:/approved-apps:ro" in volumes
        assert not any("server.key" in v for v in volumes)
        assert service["depends_on"] == {
            "coordinator": {"condition": "service_healthy"},
            "admin": {"condition": "service_completed_successfully"},
        }
    assert len(keys) == len(found)


def test_every_service_hardened_on_one_network(compose):
    for name, service in compose["services"].items():
        assert service["networks"] == ["fedfreeze"], name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        for volume in service["volumes"]:
            if "/certs/" in volume or "/keys/" in volume or volume.endswith(":/data:ro"):
                assert volume.endswith(":ro"), (name, volume)
    for name in ["coordinator", *sites(compose)]:
        service = compose["services"][name]
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"][:2] == ["CMD", "fedfreeze-healthcheck"], name
    coordinator = compose["services"]["coordinator"]
    assert coordinator["ports"] == ["${COORDINATOR_BIND:-0.0.0.0}:${COORDINATOR_PORT:-9093}:9093"]
    assert not any("/keys/" in v for v in coordinator["volumes"])  # no site's private key at the coordinator
    assert compose["services"]["admin"]["command"] == ["register", "--wait"]


def strings(node: object) -> Iterator[str]:
    """Every string of a parsed YAML document, keys included (where substitution can happen)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


# Debian 12's podman-compose 1.0.3 substitutes with this pattern (podman_compose.py, var_re): a
# default must be non-empty, so `${VAR:-}` matches nothing and reaches the container as it is
# (every site then exited with "--threads: invalid int value: '${SITE_THREADS:-}'").
PODMAN_COMPOSE_103 = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<named>[_a-zA-Z][_a-zA-Z0-9]*)|"
    r"(?:{(?P<braced>[_a-zA-Z][_a-zA-Z0-9]*)(?:(?::?-(?P<default>[^}]+))|(?::?\?(?P<err>[^}]+)))?}))"
)
PORTABLE = re.compile(r"\$\{[A-Z_][A-Z0-9_]*(?::-[^}$]+)?\}")  # ${VAR} or ${VAR:-non-empty default}


def test_substitutions_work_with_podman_compose_103_and_docker_compose(compose):
    """Only ${VAR} and ${VAR:-default} with a non-empty default, which Docker Compose v2, current
    podman-compose and 1.0.3 all replace; with 1.0.3's own pattern nothing is left unreplaced."""
    found = [s for s in strings(compose) if "$" in s]
    assert found  # the paths, the port and the tag do come from the environment
    for value in found:
        assert PORTABLE.sub("", value).count("$") == 0, f"not a portable substitution: {value!r}"
        for environment in ({}, {"SITE_THREADS": "2", "FEDFREEZE_SECRETS": "/srv/fedfreeze"}):

            def replace(m: re.Match[str], env: dict[str, str] = environment) -> str:
                name = m.group("named") or m.group("braced")
                return env.get(name, m.group("default") or "")

            assert "$" not in PODMAN_COMPOSE_103.sub(replace, value), value
    # the empty-default form that broke 1.0.3 is caught by the check above
    assert PODMAN_COMPOSE_103.sub(lambda m: "", "THREADS=${SITE_THREADS:-}") == "THREADS=${SITE_THREADS:-}"
    assert not PORTABLE.fullmatch("${SITE_THREADS:-}")
    for service in sites(compose).values():
        assert service["environment"]["THREADS"] == "${SITE_THREADS:-0}"  # 0: all the container's CPUs


def run_site_entrypoint(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """docker/site-entrypoint.sh with a stand-in `fedfreeze` that prints what it was given, and readable
    stand-ins for the certificate and key; ``settings`` are the container's environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fedfreeze"
    fake.write_text('#!/bin/sh\necho "args: $*"\necho "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"\n')
    fake.chmod(0o755)
    (tmp_path / "ca.pem").write_text("ca")
    (tmp_path / "site.key").write_text("key")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SITE_NAME": "site-a",
        "ROOT_CERT": str(tmp_path / "ca.pem"),
        "AUTH_KEY": str(tmp_path / "site.key"),
        **settings,
    }
    return subprocess.run(["sh", str(DOCKER / "site-entrypoint.sh")], capture_output=True, text=True, env=env)


@pytest.mark.process
@pytest.mark.parametrize(
    "threads, expected",
    [(None, None), ("", None), ("0", None), ("2", "2"), ("${SITE_THREADS:-}", "refused")],
)
def test_site_entrypoint_threads(tmp_path: Path, threads: str | None, expected: str | None):
    """THREADS unset, empty or 0 means all CPUs (no --threads); a number is passed on; anything else is refused."""
    proc = run_site_entrypoint(tmp_path, **({} if threads is None else {"THREADS": threads}))
    if expected == "refused":
        assert proc.returncode == 2 and "is not a number of CPU threads" in proc.stderr, proc
        return
    assert proc.returncode == 0, proc.stderr
    assert "args: site --data /data --name site-a --superlink coordinator:9093" in proc.stdout
    if expected is None:
        assert "--threads" not in proc.stdout and "OMP_NUM_THREADS=unset" in proc.stdout
    else:
        assert proc.stdout.splitlines()[0].endswith(f"--threads {expected}")
        assert f"OMP_NUM_THREADS={expected}" in proc.stdout


def test_images_non_root_from_a_wheelhouse_with_a_public_base():
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim\n" in text
    assert "ARG UID=49999" in text
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert [s.split()[2] for s in stages] == ["runtime", "server", "site"]
    for stage in stages[1:]:
        assert "\nUSER app\n" in stage and "HEALTHCHECK" in stage and "ENTRYPOINT" in stage
    installs = re.findall(r"pip install[^\n]*", text)
    assert installs and all("--no-index" in line for line in installs)  # nothing from an index: builds offline
    assert '"--tls-dir", "/certs", "--auth"' in text  # TLS and site authentication on by default


def test_build_context_and_git_keep_secrets_and_wheelhouses_out():
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"  # an allow-list: only what is named below enters the build context
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    assert not any(word in a for a in allowed for word in ("wheels", "secrets", "site-keys", "sites", ".venv"))
    copied = re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", (DOCKER / "Dockerfile").read_text(), flags=re.M)
    for sources in copied:
        for source in sources.split():
            assert any(source == a.rstrip("/") for a in allowed), source
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    for entry in ("wheels/", "docker/secrets/", "docker/site-keys/", "docker/sites/"):
        assert entry in gitignore


@pytest.mark.process
@pytest.mark.parametrize("script", sorted(p.name for p in DOCKER.glob("*.sh")))
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(DOCKER / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.process
@pytest.mark.parametrize("listed", [True, False])
def test_site_entrypoint_passes_the_approved_apps_list_when_there_is_one(tmp_path: Path, listed: bool):
    """A list file in place: the site runs approved apps only (`--approved-apps FILE`); none: no option,
    and `fedfreeze site` itself warns at start-up that it runs any app."""
    approved = tmp_path / "approved-apps.txt"
    if listed:
        approved.write_text("# none yet\n")
    proc = run_site_entrypoint(tmp_path, APPROVED_APPS=str(approved))
    assert proc.returncode == 0, proc.stderr
    assert (f"--approved-apps {approved}" in proc.stdout) is listed
