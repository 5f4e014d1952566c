"""The container image: built from the Dockerfile with podman, then run as its non-root user.

`scripts/image.sh build` makes the image from nothing in a temporary folder
(podman's config and storage included), on stand-ins for the python: base
images made from Debian bookworm; `scripts/image.sh clean` removes it all. The
image is built once for this module, which takes about two minutes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from peers import STEP_TIMEOUT
from test_operations import GatewayProcess, connect, echo_messages

from wsgate import __version__

REPO = Path(__file__).resolve().parent.parent
IMAGE_SH = REPO / "scripts" / "image.sh"
BUILD_TIMEOUT = 540.0


def _why_podman_cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "the image test needs root: debootstrap makes its base image, and podman runs as root here"
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found: apt-get install podman runc debootstrap (scripts/test.sh does)"
    return None


pytestmark = [
    pytest.mark.skipif(_why_podman_cannot_run() is not None, reason=str(_why_podman_cannot_run())),
    # The first test waits for the module's build as well.
    pytest.mark.timeout(BUILD_TIMEOUT + 60),
]


@dataclass
class Image:
    name: str
    env: dict[str, str]  # the podman config and storage `image.sh build` set up

    def podman(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **self.env}
        )

    def run(self, *args: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """`podman run` of the image, removed when it exits."""
        return self.podman("run", "--rm", "--network", "host", "--no-healthcheck", *options, self.name, *args)

    async def podman_async(self, *args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            "podman", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        async with asyncio.timeout(STEP_TIMEOUT):
            output, _ = await process.communicate()
        return process.returncode or 0, output.decode()

    def inspect(self) -> dict[str, Any]:
        result = self.podman("image", "inspect", self.name)
        assert result.returncode == 0, result.stderr
        (inspected,) = json.loads(result.stdout)
        return inspected

    def healthcheck(self) -> list[str]:
        """The HEALTHCHECK's test: podman shows it beside the config, not in it."""
        return self.inspect()["Healthcheck"]["Test"]


def _exported(env_file: Path) -> dict[str, str]:
    """The variables of the `export A="..." B="..."` lines image.sh writes for a shell."""
    variables = {}
    for line in env_file.read_text().splitlines():
        words = shlex.split(line)
        if words[:1] == ["export"]:
            variables.update(word.split("=", 1) for word in words[1:])
    return variables


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    """The image `scripts/image.sh build` makes, in a folder removed with everything in it afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="wsgate-image-test."))
    try:
        built = subprocess.run(
            [str(IMAGE_SH), "build", str(folder)], capture_output=True, text=True, timeout=BUILD_TIMEOUT
        )
        assert built.returncode == 0, built.stderr[-4000:]
        yield Image(built.stdout.strip(), _exported(folder / "env"))
    finally:
        cleaned = subprocess.run([str(IMAGE_SH), "clean", str(folder)], capture_output=True, text=True, timeout=120)
        assert cleaned.returncode == 0, cleaned.stderr
        assert not folder.exists()


def _container_config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "deploy" / "container" / "wsgate.yaml").read_text())


def test_the_image_runs_wsgate_as_the_user_kubernetes_expects(image: Image) -> None:
    version = image.run("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"wsgate {__version__}"), version.stderr
    ids = image.run("-c", "import os; print(os.getuid(), os.getgid())", options=("--entrypoint", "python"))
    deployment = yaml.safe_load((REPO / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert ids.stdout.split() == [str(pod["runAsUser"]), str(pod["runAsGroup"])], ids.stderr
    config = image.inspect()["Config"]
    # Numeric, so that the kubelet can tell it is not root without the image's /etc/passwd.
    assert config["User"] == f"{pod['runAsUser']}:{pod['runAsGroup']}"
    assert config["Entrypoint"] == ["wsgate"]
    assert config["Cmd"] == ["run", "-c", "/etc/wsgate/wsgate.yaml"]
    assert set(config["ExposedPorts"]) == {"8080/tcp", "9090/tcp"}
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert len(labels["org.opencontainers.image.revision"]) == 40
    assert image.healthcheck()[:2] == ["CMD", "python"]


def test_the_image_has_the_c_speed_up_and_uvloop_but_no_compiler(image: Image) -> None:
    script = (
        "import shutil, uvloop, wsgate._speedups, wsgate.frames as frames;"
        " print(frames.walk_frames is wsgate._speedups.walk_frames, [shutil.which(c) for c in ('cc', 'gcc')])"
    )
    result = image.run("-c", script, options=("--entrypoint", "python"))
    assert (result.returncode, result.stdout.strip()) == (0, "True [None, None]"), result.stderr


def test_wsgate_check_accepts_the_container_config(image: Image) -> None:
    result = image.run("check", "-c", "/etc/wsgate/wsgate.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "/etc/wsgate/wsgate.yaml: OK; routes: default (1 backends)"


async def test_wsgate_run_in_the_image_relays_an_echo_and_drains_on_sigterm(
    image: Image, ws_backend: Any, closed_port: int
) -> None:
    name = f"wsgate-test-{uuid.uuid4().hex[:12]}"
    # Ports 0 on the host's network: the container's config takes them from the environment.
    environment = {"WSGATE_PORT": "0", "WSGATE_ADMIN_PORT": "0", "WSGATE_BACKEND_URL": ws_backend.url}
    process = await asyncio.create_subprocess_exec(
        "podman", "run", "--rm", "--name", name, "--network", "host", "--health-interval", "disable",
        *(f"--env={key}={value}" for key, value in environment.items()), image.name,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **image.env},
    )
    gateway = GatewayProcess(process)
    try:
        port = await gateway.wait_for_line(r'"message": "listening on 0\.0\.0\.0:(\d+) \(public\)"')
        admin_port = await gateway.wait_for_line(r'"message": "admin listening on 0\.0\.0\.0:(\d+) ')
        async with asyncio.timeout(STEP_TIMEOUT):
            async with connect(f"ws://127.0.0.1:{port}/") as ws:
                await echo_messages(ws, 5)
            assert ws_backend.connections == 1
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{admin_port}/healthz") as response:
                    assert response.status == 200
        # The image's HEALTHCHECK, against this admin port and against one that is closed.
        check = image.healthcheck()[1:]
        for probed, healthy in ((admin_port, True), (str(closed_port), False)):
            status, output = await image.podman_async("exec", f"--env=WSGATE_ADMIN_PORT={probed}", name, *check)
            assert (status == 0) is healthy, output
        # SIGTERM reaches wsgate, PID 1 under the exec-form ENTRYPOINT: it drains and exits 0.
        status, output = await image.podman_async("kill", "--signal", "TERM", name)
        assert status == 0, output
        assert await gateway.wait() == 0, "".join(gateway.stderr)
        assert any('"message": "stop signal: draining"' in line for line in gateway.stderr)
    finally:
        await gateway.stop()
        image.podman("rm", "--force", "--ignore", name)
