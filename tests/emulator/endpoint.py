"""The kubelet's connection to one registered device plugin: channel, stub and ListAndWatch reader."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import structlog

from .model import DeviceInfo
from .protos import DEVICEPLUGIN

log = structlog.get_logger(__name__)

ListCallback = Callable[["PluginEndpoint", tuple[DeviceInfo, ...]], None]
EndCallback = Callable[["PluginEndpoint", str, bool], None]

_JOIN_TIMEOUT = 5.0


class _ClosedBeforeOpen(Exception):
    """close() won the race against the reader thread."""


class DialError(Exception):
    """The plugin's socket did not accept a connection in time."""


def devices_from_response(response: Any) -> tuple[DeviceInfo, ...]:
    """Convert a ListAndWatchResponse into DeviceInfo values, keeping the plugin's order."""
    return tuple(
        DeviceInfo(
            id=d.ID,
            health=d.health,
            numa_nodes=tuple(n.ID for n in d.topology.nodes) if d.HasField("topology") else None,
        )
        for d in response.devices
    )


class PluginEndpoint:
    """One plugin socket as the kubelet sees it; owns its channel and its ListAndWatch reader thread."""

    def __init__(self, resource: str, endpoint: str, socket_path: Path, epoch: int = 0) -> None:
        self.resource = resource
        self.endpoint = endpoint
        self.socket_path = socket_path
        self.epoch = epoch
        """The emulated kubelet's serving epoch this connection belongs to (a restart starts a new one)."""
        self.streaming = False
        """A list arrived and the stream has not ended yet (set by the books, under their lock)."""
        # grpcio uses "localhost" as the authority of unix targets, as the kubelet's client does.
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.stub: Any = DEVICEPLUGIN.grpc.DevicePluginStub(self._channel)
        self._lock = threading.Lock()
        self._closed = False
        self._ready: Any = None
        self._call: Any = None
        self._thread: threading.Thread | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def dial(self, timeout: float) -> None:
        """Block until the socket accepts a connection, like the kubelet's blocking dial (10 s there)."""
        with self._lock:
            if self._closed:
                raise DialError(f"connection to {self.socket_path} closed while dialing")
            self._ready = grpc.channel_ready_future(self._channel)
        try:
            self._ready.result(timeout=timeout)
        except grpc.FutureTimeoutError as exc:
            raise DialError(f"no connection to {self.socket_path} within {timeout:g}s") from exc
        except grpc.FutureCancelledError as exc:
            raise DialError(f"connection to {self.socket_path} closed while dialing") from exc

    def start_stream(self, on_list: ListCallback, on_end: EndCallback) -> None:
        """Open ListAndWatch on a reader thread; `on_end` runs once when the stream is over."""
        thread = threading.Thread(
            target=self._read_stream,
            args=(on_list, on_end),
            name=f"listandwatch-{self.resource}",
            daemon=True,
        )
        with self._lock:
            if self._closed:
                return
            self._thread = thread
            # Started under the lock so close() never sees a registered thread that has not started.
            thread.start()

    def _read_stream(self, on_list: ListCallback, on_end: EndCallback) -> None:
        reason = "stream completed by the plugin"
        try:
            with self._lock:
                if self._closed:
                    raise _ClosedBeforeOpen
                # No deadline: the stream lives as long as the registration (the kubelet sets none either).
                call = self.stub.ListAndWatch(DEVICEPLUGIN.pb2.Empty())
                self._call = call
            for response in call:
                on_list(self, devices_from_response(response))
        except _ClosedBeforeOpen:
            reason = "closed by the kubelet before the stream opened"
        except grpc.RpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # a bug in a callback must still end the stream visibly
            log.exception("listandwatch.reader_failed", resource=self.resource)
            reason = f"emulator error: {exc!r}"
        on_end(self, reason, self._closed)

    def close(self) -> None:
        """Cancel the stream and any dial in progress, close the channel, wait for the reader thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            call, ready, thread = self._call, self._ready, self._thread
        if ready is not None:
            ready.cancel()
        if call is not None:
            call.cancel()
        self._channel.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("listandwatch.reader_stuck", resource=self.resource, endpoint=self.endpoint)
