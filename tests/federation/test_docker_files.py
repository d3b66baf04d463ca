"""Static checks of docker/ (fast, no engine): what the compose file and the images promise.

``docker/test-podman.sh`` (opt-in) runs them for real; these checks keep the promises from
silently breaking on every test run.
"""

from __future__ import annotations

import re
import subprocess
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


@pytest.mark.parametrize("script", sorted(p.name for p in DOCKER.glob("*.sh")))
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(DOCKER / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
