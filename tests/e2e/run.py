"""`make e2e`: the agent's NRI plugin against a real containerd, runc and crictl; cpusets read back from the
kernel.

Needs root, Go, and Debian's runc and busybox-static (installed with apt-get when missing). containerd
(github.com/containerd/containerd/v2, with NRI on) and crictl (sigs.k8s.io/cri-tools) are built from the
versions pinned in tests/e2e/go.mod, once per machine, under ${XDG_CACHE_HOME:-~/.cache}/cpupool/. The image
is made here from busybox-static. The kubelet is the grpcio emulator: it admits the pool pod (Allocate) and
answers the plugin's PodResources calls; crictl then plays the kubelet's CRI calls.

Prints what it checked and exits 0, or names what failed and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from agent.cpuset import CpuSet
from agent.logs import setup_logging
from agent.nri.allocations import PodResourcesAllocations
from agent.nri.plugin import NriPlugin, NriSettings
from agent.nri.view import SupervisorPoolView
from agent.supervisor import AgentSettings, Supervisor
from tests.emulator import KubeletEmulator

HERE = Path(__file__).resolve().parent
IMAGE = "docker.io/library/cpupool-busybox:e2e"
TOOLS = {
    "containerd": "github.com/containerd/containerd/v2/cmd/containerd",
    "containerd-shim-runc-v2": "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
    "ctr": "github.com/containerd/containerd/v2/cmd/ctr",
    "crictl": "sigs.k8s.io/cri-tools/cmd/crictl",
}


class E2EError(Exception):
    """A step failed; the message says which and why."""


def run(*argv: str, timeout: float = 120) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise E2EError(
            f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}"
        )
    return done.stdout


def tools() -> Path:
    """containerd, its runc shim, ctr and crictl, built once per go.sum."""
    digest = hashlib.sha256((HERE / "go.sum").read_bytes() + (HERE / "go.mod").read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cpupool" / f"e2e-{digest}"
    cache.mkdir(parents=True, exist_ok=True)
    for name, package in TOOLS.items():
        if not (cache / name).exists():
            print(f"e2e: building {name} (once per machine) ...", flush=True)
            subprocess.run(
                ["go", "build", "-trimpath", "-o", str(cache / f"{name}.tmp"), package],
                cwd=HERE, check=True, timeout=1800,
            )  # fmt: skip
            (cache / f"{name}.tmp").rename(cache / name)
    return cache


def debian_packages() -> None:
    missing = [
        p
        for p, path in (("runc", "/usr/sbin/runc"), ("busybox-static", "/bin/busybox"))
        if not Path(path).exists()
    ]
    if missing:
        print(f"e2e: apt-get install {' '.join(missing)}", flush=True)
        run("apt-get", "install", "-y", "--no-install-recommends", *missing, timeout=600)


def _blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def busybox_image(path: Path) -> None:
    """An OCI image archive whose only layer is Debian's static busybox (sh, sleep, cat linked to it)."""
    layer_io = io.BytesIO()
    with tarfile.open(fileobj=layer_io, mode="w") as layer:
        layer.add("/bin/busybox", arcname="bin/busybox")
        for applet in ("sh", "sleep", "cat"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            layer.addfile(link)
    layer_bytes = layer_io.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        layout = Path(tmp)
        (layout / "blobs" / "sha256").mkdir(parents=True)
        layer_digest = _blob(layout, layer_bytes)
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sleep", "1000000"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
        config_bytes = json.dumps(config).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _blob(layout, config_bytes),
                "size": len(config_bytes),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer_bytes),
                }
            ],
        }
        manifest_bytes = json.dumps(manifest).encode()
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _blob(layout, manifest_bytes),
                    "size": len(manifest_bytes),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": IMAGE,
                        "org.opencontainers.image.ref.name": "e2e",
                    },
                }
            ],
        }
        (layout / "index.json").write_text(json.dumps(index))
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        with tarfile.open(path, "w") as archive:
            for entry in sorted(layout.rglob("*")):
                archive.add(entry, arcname=str(entry.relative_to(layout)), recursive=False)


def containerd_config(work: Path) -> Path:
    config = work / "containerd.toml"
    config.write_text(
        f"""version = 3
root = "{work}/root"
state = "{work}/state"
[grpc]
  address = "{work}/containerd.sock"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "native"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{IMAGE}"
[plugins.'io.containerd.cri.v1.runtime']
  # Sandboxes ask for oom_score_adj -998; a VM or container without CAP_SYS_RESOURCE refuses lowering it.
  restrict_oom_score_adj = true
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    BinaryName = "{os.environ.get("CPUPOOL_E2E_RUNC", "/usr/sbin/runc")}"
    SystemdCgroup = false
[plugins.'io.containerd.nri.v1.nri']
  disable = false
  disable_connections = false
  socket_path = "{work}/nri.sock"
"""
    )
    return config


@contextlib.asynccontextmanager
async def containerd(work: Path, bin_dir: Path) -> AsyncIterator[Path]:
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log = (work / "containerd.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - containerd outlives this call; it is waited for below
        [str(bin_dir / "containerd"), "--config", str(containerd_config(work))],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    socket = work / "containerd.sock"
    try:
        for _ in range(300):
            if socket.exists() or proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        if proc.poll() is not None or not socket.exists():
            raise E2EError(f"containerd did not start; see {work / 'containerd.log'}")
        yield socket
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def crictl(bin_dir: Path, socket: Path, *args: str) -> str:
    endpoint = f"unix://{socket}"
    return run(
        str(bin_dir / "crictl"),
        "--runtime-endpoint",
        endpoint,
        "--image-endpoint",
        endpoint,
        "-t",
        "60s",
        *args,
    )


def start_container(
    bin_dir: Path, socket: Path, work: Path, pod: str, annotations: dict[str, str] | None = None
) -> int:
    """A pod (host network) and one busybox container in it, started; returns the container's pid.
    `annotations`: the container's CRI annotations, where a kubelet puts its device plugins' Allocate
    annotations."""
    pod_config = {
        "metadata": {"name": pod, "namespace": "default", "uid": f"{pod}-uid", "attempt": 0},
        "log_directory": str(work / "logs" / pod),
        "linux": {"cgroup_parent": "/cpupool-e2e", "security_context": {"namespace_options": {"network": 2}}},
    }
    container = {
        "metadata": {"name": "main"},
        "image": {"image": IMAGE},
        "command": ["/bin/sleep", "1000000"],
        "log_path": "main.log",
        "linux": {},
        "annotations": annotations or {},
    }
    (work / f"{pod}.json").write_text(json.dumps(pod_config))
    (work / f"{pod}-main.json").write_text(json.dumps(container))
    sandbox = crictl(bin_dir, socket, "runp", str(work / f"{pod}.json")).strip()
    cid = crictl(
        bin_dir, socket, "create", sandbox, str(work / f"{pod}-main.json"), str(work / f"{pod}.json")
    ).strip()
    crictl(bin_dir, socket, "start", cid)
    info = json.loads(crictl(bin_dir, socket, "inspect", "-o", "json", cid))
    return int(info["info"]["pid"])


def allowed_cpus(pid: int) -> CpuSet:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return CpuSet.parse(line.split(":", 1)[1])
    raise E2EError(f"/proc/{pid}/status has no Cpus_allowed_list")


def cgroup_cpuset(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpuset" in controllers.split(","):
            return (Path("/sys/fs/cgroup/cpuset") / path.lstrip("/") / "cpuset.cpus").read_text().strip()
        if controllers == "":
            cpuset = Path("/sys/fs/cgroup") / path.lstrip("/") / "cpuset.cpus.effective"
            if cpuset.exists():
                return cpuset.read_text().strip()
    raise E2EError(f"no cpuset cgroup for pid {pid}")


async def main() -> int:
    setup_logging("warning", "console")
    if os.geteuid() != 0:
        print("e2e: needs root (containerd and runc)", file=sys.stderr)
        return 1
    online = CpuSet(os.sched_getaffinity(0))
    if len(online) < 2:
        print("e2e: needs at least two CPUs (one pooled, one for everything else)", file=sys.stderr)
        return 1
    pooled = max(online)
    debian_packages()
    bin_dir = tools()
    work = Path(tempfile.mkdtemp(prefix="cpupool-e2e-", dir="/tmp"))
    busybox_image(work / "busybox.tar")
    plugin_dir = work / "device-plugins"
    plugin_dir.mkdir()
    (work / "config").mkdir()
    config = work / "config" / "poolconfig.yaml"
    config.write_text(
        f'resourceBaseName: cpupool.io\npools:\n  fast: {{cpus: "{pooled}", pooltype: exclusive}}\n'
    )
    pod_resources = work / "pod-resources.sock"
    settings = AgentSettings(
        config_path=config,
        root=Path("/"),
        plugin_dir=plugin_dir,
        pod_resources_socket=pod_resources,
        pin_self=False,
    )
    try:
        async with (
            containerd(work, bin_dir) as socket,
            KubeletEmulator(plugin_dir, pod_resources_socket=pod_resources) as emu,
        ):
            run(
                str(bin_dir / "ctr"),
                "-a",
                str(socket),
                "-n",
                "k8s.io",
                "images",
                "import",
                "--local",
                "--snapshotter",
                "native",
                str(work / "busybox.tar"),
            )
            supervisor = Supervisor(settings)
            agent = asyncio.create_task(supervisor.run())
            plugin = NriPlugin(
                NriSettings(socket=work / "nri.sock"),
                SupervisorPoolView(supervisor),
                PodResourcesAllocations(pod_resources),
                supervisor.metrics,
                start_after=supervisor.started,
                claims=supervisor.claims,
            )
            supervisor.plan_listeners.append(plugin.plan_changed)
            nri = asyncio.create_task(plugin.run())
            try:
                await emu.wait_devices("cpupool.io/fast", timeout=30)
                started = time.monotonic()
                while not plugin.connected:
                    if time.monotonic() - started > 30:
                        raise E2EError(
                            f"the plugin did not connect to containerd's NRI socket: {plugin.last_error}"
                        )
                    await asyncio.sleep(0.1)
                allocated = await emu.allocate("cpupool.io/fast", 1, pod="e2e-pool", container="main")
                # As a kubelet does: the Allocate answer's annotations go into the container's CRI config.
                pool_pid = await asyncio.to_thread(
                    start_container, bin_dir, socket, work, "e2e-pool", allocated.annotations
                )
                plain_pid = await asyncio.to_thread(start_container, bin_dir, socket, work, "e2e-plain")
                results = {
                    "pool container (holds cpupool.io/fast: 1)": (pool_pid, CpuSet([pooled])),
                    "plain container (strict: kept off the pool)": (plain_pid, online - CpuSet([pooled])),
                }
                failed = False
                for what, (pid, expected) in results.items():
                    allowed, cgroup = allowed_cpus(pid), cgroup_cpuset(pid)
                    ok = allowed == expected and CpuSet.parse(cgroup) == expected
                    failed |= not ok
                    print(
                        f"e2e: {what}: cgroup cpuset.cpus {cgroup}, Cpus_allowed_list {allowed.format()}, "
                        f"expected {expected.format()}: {'ok' if ok else 'WRONG'}"
                    )
                print(f"e2e: enforced: {json.dumps(plugin.enforced())}")
                # The pool container must have been answered from its claim: containerd handed the CRI
                # container annotations to NRI at CreateContainer (docs/enforcement.md, Claims).
                counts = supervisor.metrics.nri_adjustments
                started = time.monotonic()
                # The emulator lists only pods it admitted: the plain pod's check waits for it in vain.
                while counts.get(event="claim", outcome="confirmed") < 1 and time.monotonic() - started < 10:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
                outcomes = {
                    o: counts.get(event="claim", outcome=o)
                    for o in ("claimed", "none", "invalid", "confirmed", "corrected")
                }
                claims_ok = outcomes["claimed"] == 1 and outcomes["none"] == 1 and outcomes["confirmed"] == 1
                failed |= not claims_ok
                print(f"e2e: claims {outcomes}: {'ok' if claims_ok else 'WRONG'}")
                return 1 if failed else 0
            finally:
                with contextlib.suppress(E2EError, subprocess.TimeoutExpired):
                    for pod in json.loads(crictl(bin_dir, socket, "pods", "-o", "json")).get("items", []):
                        crictl(bin_dir, socket, "stopp", pod["id"])
                        crictl(bin_dir, socket, "rmp", pod["id"])
                nri.cancel()
                supervisor.stop()
                await asyncio.gather(nri, agent, return_exceptions=True)
    except E2EError as exc:
        print(f"e2e: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if os.environ.get("CPUPOOL_E2E_KEEP"):
            print(f"e2e: work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
