"""The `cpupool` command: discover, check-config, agent (and the webhook and status commands)."""

from __future__ import annotations

# First of all: `cpupool agent` keeps OpenSSL and importlib.metadata out of its process (6 MiB) and pauses the
# garbage collector for its start, which needs this before anything imports asyncio or betterproto2.
from agent import leanstart

# isort: split
import argparse
import asyncio
import io
import json
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.config import (
    ConfigError,
    Problem,
    Selection,
    parse_config_partial,
    read_config_dir,
    select_config,
    validate_partial,
)
from agent.logs import setup_logging
from agent.plan import MAX_MESSAGE_BYTES, Plan, build_plan, list_message_size
from agent.topology import Topology, TopologyError, discover, render_table, topology_to_json

if TYPE_CHECKING:
    from agent.nodelabels import LabelSource
    from agent.nri.accounting import AccountingMonitor
    from agent.nri.plugin import NriPlugin
    from agent.supervisor import Supervisor

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
# 128 + SIGPIPE: the reader of stdout went away before the output was written.
EXIT_BROKEN_PIPE = 141


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="auto: readable on a terminal, JSON otherwise",
    )


def _nri_index(text: str) -> str:
    # NRI refuses a registration whose index is not exactly two digits.
    if len(text) != 2 or not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a two-digit NRI plugin index such as 50")
    return text


# NRI's defaults for the command line. agent.nri.plugin has them too, but importing it (NRI's generated
# protocol) would put a quarter of a second before the agent's first registration; a test keeps them equal.
NRI_SOCKET = Path("/var/run/nri/nri.sock")
NRI_INDEX = "50"
# The values of agent.nri.policy.Policy, first the default: that module is loaded after the first lists went
# out (1.2 ms of the start for an enum); a test keeps them equal.
NRI_POLICIES = ("strict", "pools")


def _add_nri_arguments(agent: argparse.ArgumentParser) -> None:
    agent.add_argument("--nri-socket", type=Path, default=NRI_SOCKET, help="the runtime's NRI socket")
    agent.add_argument(
        "--no-nri", dest="nri", action="store_false", help="do not enforce cpusets through NRI"
    )
    agent.add_argument(
        "--nri-index",
        type=_nri_index,
        default=NRI_INDEX,
        help="NRI plugin index (two digits; plugins run in ascending order, default %(default)s)",
    )
    agent.add_argument(
        "--nri-policy",
        default=NRI_POLICIES[0],
        choices=NRI_POLICIES,
        help="strict: keep every other container off exclusive pools; pools: touch only pool containers",
    )
    agent.add_argument(
        "--kubelet-config",
        type=Path,
        default=Path("/var/lib/kubelet/config.yaml"),
        help="the kubelet's config file, read under --root to check its CPU accounting",
    )


def _labels(text: str) -> dict[str, str]:
    from agent.nodelabels import NodeLabelsError, parse_node_labels  # noqa: PLC0415

    try:
        return parse_node_labels(text)
    except NodeLabelsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _terminal_columns() -> int:
    """What shutil.get_terminal_size gives for the width: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's own formatter, its width found without importing shutil.

    argparse makes a formatter for every add_argument (to check the metavar), and the stock one imports
    shutil for the terminal's width: shutil (with bz2 and lzma) was 2 ms of the agent's start, for help the
    agent never prints. Same width as argparse's: the terminal's columns less 2."""

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        super().__init__(
            prog, indent_increment, max_help_position, _terminal_columns() - 2 if width is None else width
        )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with `command`, the options of the other commands that need imports of
    their own (status, webhook) are left out: `cpupool agent` must not load the webhook to start."""
    parser = argparse.ArgumentParser(
        prog="cpupool",
        description="Kubernetes CPU pools as device plugin resources",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    discover_cmd = sub.add_parser(
        "discover", help="show the host's CPU topology", formatter_class=_HelpFormatter
    )
    discover_cmd.add_argument("--root", type=Path, default=Path("/"), help="where sysfs and procfs are (/)")
    discover_cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_common(discover_cmd)

    check = sub.add_parser(
        "check-config",
        help="validate a pool config against this host and print the plan",
        formatter_class=_HelpFormatter,
    )
    check.add_argument("file", type=Path, help="a config file, or a directory of per-node-group files")
    check.add_argument("--root", type=Path, default=Path("/"))
    check.add_argument(
        "--node-labels",
        type=_labels,
        default=None,
        help="key=value,...: with a directory, the labels of the node whose file to choose and check",
    )
    check.add_argument("--json", action="store_true")
    _add_common(check)

    agent = sub.add_parser("agent", help="run the device plugin agent", formatter_class=_HelpFormatter)
    agent.add_argument(
        "--config",
        type=Path,
        default=None,
        help="pool config file, or a directory of per-node-group files (default: isolated CPUs)",
    )
    agent.add_argument(
        "--node-labels",
        type=_labels,
        default=None,
        help="key=value,...: the node's labels for choosing its file in a --config directory, instead of "
        "reading them from the Kubernetes API",
    )
    agent.add_argument("--root", type=Path, default=Path("/"), help="host root holding sys/ and proc/")
    agent.add_argument("--plugin-dir", type=Path, default=Path("/var/lib/kubelet/device-plugins"))
    agent.add_argument(
        "--pod-resources-socket", type=Path, default=Path("/var/lib/kubelet/pod-resources/kubelet.sock")
    )
    agent.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/var/lib/cpupool"),
        help="host directory keeping what every served device ID means across restarts ('' to not keep it)",
    )
    agent.add_argument(
        "--health-port", type=int, default=8081, help="0 disables /healthz, /readyz, /metrics, /enforcement"
    )
    agent.add_argument("--health-host", default="0.0.0.0")
    agent.add_argument(
        "--no-pin-self", dest="pin_self", action="store_false", help="do not move the agent off pooled CPUs"
    )
    _add_nri_arguments(agent)
    _add_common(agent)

    status_cmd = sub.add_parser(
        "status", help="what the agent serves and which pods hold which CPUs", formatter_class=_HelpFormatter
    )
    if command in (None, "status"):
        from agent import status  # noqa: PLC0415 - keeps `cpupool agent` start-up lean

        status.add_arguments(status_cmd)
    _add_common(status_cmd)

    webhook_cmd = sub.add_parser(
        "webhook", help="run the admission webhook that pins pool processes", formatter_class=_HelpFormatter
    )
    if command in (None, "webhook"):
        from agent import webhook  # noqa: PLC0415

        webhook.add_arguments(webhook_cmd)
    _add_common(webhook_cmd)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command word when it comes first (`cpupool agent ...`), else None (options first, or none)."""
    return argv[0] if argv and not argv[0].startswith("-") else None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _run(argv)
        # Output still buffered would otherwise meet a closed pipe at interpreter exit, outside this guard.
        sys.stdout.flush()
    except BrokenPipeError:
        return _reader_gone()
    return code


def _reader_gone() -> int:
    """The reader of stdout went away (`cpupool discover | head`): stop quietly, as `yes | head` does.

    Exit 141 (128 + SIGPIPE), what a shell reports for a command killed by SIGPIPE: the output was cut short,
    which `set -o pipefail` scripts may want to know, yet no traceback is printed."""
    try:
        # Python flushes stdout again at exit; point it at /dev/null so that flush has nowhere to fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        # stdout is not a file (tests capture it): there is no descriptor to point elsewhere.
        pass
    return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_of(words)).parse_args(words)
    setup_logging(args.log_level, args.log_format)
    command: str = args.command
    if command == "discover":
        return cmd_discover(args)
    if command == "check-config":
        return cmd_check_config(args)
    if command == "status":
        from agent import status  # noqa: PLC0415

        return status.run(args)
    if command == "webhook":
        from agent import webhook  # noqa: PLC0415

        return webhook.run(args)
    return cmd_agent(args)


def cmd_discover(args: argparse.Namespace) -> int:
    try:
        topology = discover(args.root)
    except TopologyError as exc:
        print(f"cpupool discover: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(topology_to_json(topology), indent=2))
    else:
        print(render_table(topology))
    return EXIT_OK


def plan_summary(plan: Plan) -> list[dict[str, Any]]:
    return [
        {
            "resource": r.name,
            "pooltype": str(r.pool_type),
            "hyperThreadingPolicy": str(r.ht_policy) if r.ht_policy else None,
            "cpus": r.cpus.format(),
            "devices": r.device_count,
            "socket": r.socket_name,
            "list_message_bytes": list_message_size(r),
        }
        for r in plan.resources.values()
    ]


def cmd_check_config(args: argparse.Namespace) -> int:
    path: Path = args.file
    if path.is_dir():
        return cmd_check_config_dir(args)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"cpupool check-config: cannot read {path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        topology = discover(args.root)
    except TopologyError as exc:
        print(f"cpupool check-config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    plan, warnings, problems = check_config(text, str(path), topology)
    if plan is None or problems:
        errors = [problem.describe(str(path)) for problem in problems]
        if args.json:
            print(json.dumps({"valid": False, "errors": errors}, indent=2))
        else:
            print(f"{path}: invalid", file=sys.stderr)
            for error in errors:
                print(f"  - {error}", file=sys.stderr)
        return EXIT_INVALID
    summary = plan_summary(plan)
    if args.json:
        print(json.dumps({"valid": True, "warnings": list(warnings), "resources": summary}, indent=2))
        return EXIT_OK
    print(f"{path}: valid, {len(summary)} resource(s)")
    _print_plan(plan, warnings)
    return EXIT_OK


def check_config(
    text: str, source: str, topology: Topology
) -> tuple[Plan | None, tuple[str, ...], list[Problem]]:
    """Every problem of a config text on this host: schema, host, and plan (the kubelet's message limit).

    Each stage goes on with the pools the earlier stages found no fault in, so one run lists every problem
    rather than the first stage's. The plan is None when the text is not a config at all."""
    config, problems = parse_config_partial(text, source)
    if config is None:
        return None, (), problems
    validated, host_problems = validate_partial(config, topology)
    problems += host_problems
    try:
        plan = build_plan(validated, topology)
    except ConfigError as exc:
        return None, validated.warnings, problems + exc.problems
    return plan, validated.warnings, problems


def cmd_check_config_dir(args: argparse.Namespace) -> int:
    """A config directory: every file's schema and the rules across files; the file a node with
    --node-labels gets (the only one, when no file has a nodeSelector) also against this host, with its plan.

    Files for other node groups are not checked against this host: their CPUs are another machine's."""
    directory: Path = args.file
    labels: dict[str, str] | None = args.node_labels
    try:
        configs = read_config_dir(directory)
        topology = discover(args.root)
    except OSError as exc:
        print(f"cpupool check-config: cannot read {directory}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TopologyError as exc:
        print(f"cpupool check-config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    errors = [problem.describe(configs.source) for problem in configs.problems]
    selection: Selection | None = None
    if labels is not None or not configs.selective:
        try:
            selection = select_config(configs, labels or {})
        except ConfigError as exc:
            errors += [problem.describe(exc.source) for problem in exc.problems]
    plan: Plan | None = None
    warnings: tuple[str, ...] = ()
    if selection is not None and selection.text is not None:
        plan, warnings, problems = check_config(selection.text, selection.source, topology)
        # The schema problems of the chosen file are in the directory's list already.
        errors += [
            p.describe(selection.source) for p in problems if p.describe(selection.source) not in errors
        ]
    files = sorted(configs.texts)
    chosen = _describe_selection(selection, labels, configs.selective)
    valid = not errors and (plan is not None or selection is None or selection.text is None)
    if args.json:
        body: dict[str, Any] = {
            "valid": valid,
            "files": files,
            "selected": None
            if selection is None
            else {
                # None: no file for this node, so the built-in isolated-CPU pool.
                "file": selection.source if selection.config is not None else None,
                "reason": selection.reason,
            },
            "errors": errors,
            "warnings": list(warnings),
        }
        if plan is not None:
            body["resources"] = plan_summary(plan)
        print(json.dumps(body, indent=2))
        return EXIT_OK if valid else EXIT_INVALID
    print(f"{directory}: {len(files)} config file(s): {', '.join(files) or 'none'}")
    print(chosen)
    if not valid:
        print(f"{directory}: invalid", file=sys.stderr)
        for error in errors:
            print(f"  - {error}", file=sys.stderr)
        return EXIT_INVALID
    if plan is not None:
        _print_plan(plan, warnings)
    return EXIT_OK


def _describe_selection(selection: Selection | None, labels: dict[str, str] | None, selective: bool) -> str:
    if selection is None:
        if selective and labels is None:
            return (
                "files with a nodeSelector: pass --node-labels k=v,... to see which file a node gets and "
                "check it against this host"
            )
        return "no file chosen (two files match these labels)"
    shown = ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "no labels"
    if selection.text is None:
        return f"a node with {shown} gets no file: {selection.reason}; it serves the kernel's isolated CPUs"
    return f"a node with {shown} gets {selection.source} ({selection.reason})"


def _print_plan(plan: Plan, warnings: tuple[str, ...]) -> None:
    summary = plan_summary(plan)
    header = f"{'RESOURCE':<32} {'TYPE':<10} {'CPUS':<16} {'DEVICES':>8} {'LIST BYTES':>11}"
    print(header)
    for row in summary:
        kind = row["pooltype"] + (f"/{row['hyperThreadingPolicy']}" if row["hyperThreadingPolicy"] else "")
        print(
            f"{row['resource']:<32} {kind:<10} {row['cpus']:<16} {row['devices']:>8} "
            f"{row['list_message_bytes']:>11}"
        )
    print(f"(the kubelet accepts a device list of up to {MAX_MESSAGE_BYTES} bytes)")
    for warning in warnings:
        print(f"warning: {warning}")


def config_path_problem(path: Path) -> str | None:
    """Why the agent cannot start on the config file at `path`, or None when it can read it.

    The built-in isolated-CPU pool is for an agent started without --config; a named file that is missing
    (a typo, a volume that is not mounted) must not quietly turn into it."""
    try:
        if path.is_dir():
            # A directory of per-node-group files: it must be listable; its files are checked as read.
            os.listdir(path)
            return None
        with path.open("rb"):
            return None
    except FileNotFoundError:
        return (
            f"config file {path} does not exist; fix the path or the volume that should hold it "
            "(leave out --config to serve the kernel's isolated CPUs)"
        )
    except OSError as exc:
        return f"cannot read config file {path}: {exc.strerror or exc}"


def cmd_agent(args: argparse.Namespace) -> int:
    if args.config is not None:
        problem = config_path_problem(args.config)
        if problem is not None:
            print(f"cpupool agent: {problem}", file=sys.stderr)
            log.error("agent.config_unusable", path=str(args.config), reason=problem)
            return EXIT_USAGE
    from agent.supervisor import AgentSettings, Supervisor, run_until_signalled  # noqa: PLC0415

    _bound_h2_memory()
    settings = AgentSettings(
        config_path=args.config,
        root=args.root,
        plugin_dir=args.plugin_dir,
        pod_resources_socket=args.pod_resources_socket,
        pin_self=args.pin_self,
        state_dir=args.state_dir if str(args.state_dir) not in ("", ".") else None,
    )
    supervisor = Supervisor(settings)
    extra: list[Callable[[], Coroutine[Any, Any, None]]] = []
    supervisor.node_labels = _label_source(args, supervisor, extra)
    # The health port listens from the start (probes never meet a refused connection); aiohttp, which
    # answers on it, loads once the kubelet has every resource, and answers what queued meanwhile.
    health = _listen(args.health_host, args.health_port) if args.health_port else None
    extra.append(lambda: _beside_the_device_plugin(args, supervisor, health))
    log.info(
        "agent.starting",
        config=str(args.config) if args.config else None,
        root=str(args.root),
        plugin_dir=str(args.plugin_dir),
    )
    try:
        asyncio.run(run_until_signalled(supervisor, extra))
    except TopologyError as exc:
        log.error("agent.topology_unreadable", reason=str(exc))
        return EXIT_USAGE
    return EXIT_OK


# How many closed streams each HTTP/2 connection remembers (h2's default is 2**16).
CLOSED_STREAMS_KEPT = 4096


def _bound_h2_memory() -> None:
    """h2 remembers how every closed stream ended, up to 2**16 per connection (about 8 MiB once full). The
    kubelet keeps one connection per resource for as long as both run, and each Allocate and
    GetPreferredAllocation is a stream: the agent's RSS would creep by up to 8 MiB per resource. The record
    tells a late frame on a closed stream apart: one on a stream h2 no longer remembers is a connection error.
    Under the benchmark's load (100 calls in flight) such frames came more than 256 streams late, and 256
    dropped connections; 4096 held at 1,000 in flight (the kubelet admits one pod at a time) and caps the
    record at about 0.5 MiB per connection. Process-wide: every connection of the agent, server and client."""
    import h2.connection  # noqa: PLC0415 - loaded already, with grpclib

    h2.connection.H2Connection.MAX_CLOSED_STREAMS = CLOSED_STREAMS_KEPT


def _label_source(
    args: argparse.Namespace, supervisor: Supervisor, extra: list[Callable[[], Coroutine[Any, Any, None]]]
) -> LabelSource | None:
    """--node-labels, or else (with a config directory) the Node object, watched through the API.

    The watch starts, and loads its client, only when a file of the directory has a nodeSelector."""
    from agent.nodelabels import NodeLabelWatch, StaticLabels, node_name_from_env  # noqa: PLC0415

    if args.node_labels is not None:
        return StaticLabels(args.node_labels)
    if args.config is None or not args.config.is_dir():
        return None
    watch = NodeLabelWatch(node_name_from_env(), lambda: supervisor.notify("config"))
    extra.append(watch.run)
    return watch


# How long enforcement and the health port wait for the kubelet to take every resource before they start
# anyway (a kubelet that is down must not keep /healthz away), and how often they look meanwhile.
SERVING_WAIT_S = 2.0
SERVING_CHECK_S = 0.01


def _listen(host: str, port: int) -> socket.socket | None:
    """A listening TCP socket for the health port, or None (logged) when it cannot be had."""
    try:
        # An ASCII host goes as bytes: a str is encoded with the IDNA codec, whose import (stringprep,
        # unicodedata) was 1 ms of the agent's start.
        name: str | bytes = host.encode("ascii") if host.isascii() else host
        family, kind, proto, _, address = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        log.error("health.unavailable", host=host, port=port, reason=str(exc))
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        log.error("health.unavailable", host=host, port=port, reason=str(exc))
        return None
    return sock


async def _beside_the_device_plugin(
    args: argparse.Namespace, supervisor: Supervisor, health: socket.socket | None
) -> None:
    """NRI enforcement, the kubelet accounting check and the health port, started once the kubelet has
    every resource (or SERVING_WAIT_S after the first plan): their imports (NRI's generated protocol,
    aiohttp) took half of the agent's start-up, and the kubelet needs none of them. Owns what it starts."""
    await supervisor.started.wait()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SERVING_WAIT_S
    # Start-up only, and bounded: the supervisor has no event for "every resource registered and listed".
    while not supervisor.ready and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(SERVING_CHECK_S)
    for state in list(supervisor.states.values()):
        # A 200,000-device list takes a while to go out; an import now would slow it down.
        await state.server.servicer.flush(max(0.0, deadline - loop.time()))
    # Start-up is over: the garbage collector, paused for it (agent.leanstart), runs again.
    leanstart.started()
    # In a thread: an Allocate arriving meanwhile is answered between the import's GIL slices.
    await asyncio.to_thread(_import_beside, args)
    helpers: list[Callable[[], Coroutine[Any, Any, None]]] = []
    nri, accounting = _enforcement(args, supervisor, helpers)
    accounting.plan_changed()  # the plans so far were applied before it listened
    if health is not None:
        from agent.health import serve_health  # noqa: PLC0415

        helpers.append(
            lambda: serve_health(
                supervisor, args.health_host, args.health_port, nri=nri, accounting=accounting, sock=health
            )
        )
    tasks = [asyncio.create_task(start()) for start in helpers]
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _import_beside(args: argparse.Namespace) -> None:
    import importlib  # noqa: PLC0415

    names = ["agent.nri.accounting", "agent.nri.view"]
    if args.nri:
        names += ["agent.nri.allocations", "agent.nri.plugin"]
    if args.health_port:
        names.append("agent.health")
    for name in names:
        importlib.import_module(name)


def _enforcement(
    args: argparse.Namespace,
    supervisor: Supervisor,
    extra: list[Callable[[], Coroutine[Any, Any, None]]],
) -> tuple[NriPlugin | None, AccountingMonitor]:
    """The NRI plugin (unless --no-nri) and the kubelet accounting check, run beside the supervisor."""
    from agent.nri.accounting import AccountingMonitor  # noqa: PLC0415
    from agent.nri.allocations import PodResourcesAllocations  # noqa: PLC0415
    from agent.nri.plugin import NriPlugin, NriSettings  # noqa: PLC0415
    from agent.nri.policy import Policy  # noqa: PLC0415
    from agent.nri.view import SupervisorPoolView  # noqa: PLC0415

    view = SupervisorPoolView(supervisor)
    kubelet_config = args.root / args.kubelet_config.relative_to(args.kubelet_config.anchor)
    accounting = AccountingMonitor(kubelet_config, view, supervisor.metrics)
    supervisor.plan_listeners.append(accounting.plan_changed)
    extra.append(accounting.run)
    if not args.nri:
        log.info("nri.disabled", reason="--no-nri", effect="cpusets are not enforced")
        return None, accounting
    settings = NriSettings(socket=args.nri_socket, index=args.nri_index, policy=Policy(args.nri_policy))
    allocations = PodResourcesAllocations(args.pod_resources_socket)
    # Connect once the first plan is served: a container created before that would meet an empty plan.
    plugin = NriPlugin(
        settings,
        view,
        allocations,
        supervisor.metrics,
        start_after=supervisor.started,
        # Verifies the claims the supervisor's Allocates sign: a new pod's cpuset without a kubelet call.
        claims=supervisor.claims,
    )
    supervisor.plan_listeners.append(plugin.plan_changed)
    extra.append(plugin.run)
    return plugin, accounting


if __name__ == "__main__":
    sys.exit(main())
