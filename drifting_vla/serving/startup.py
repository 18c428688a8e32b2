"""What scripts/serve.py checks before it loads a model: the device and the address to listen on.

Loading a large checkpoint and warming it up takes minutes on a GPU machine; an address typed
wrong, a port already taken or `device=cuda` on a machine without CUDA should cost seconds, and
say which key of serve.yaml to change.
"""

from __future__ import annotations

import errno
import socket

import torch


class StartupError(ValueError):
    """A serve.yaml key that cannot work on this machine; the message names the key."""


def resolve_device(device: str) -> torch.device:
    """`device` (cpu, cuda, cuda:N, auto) as a device this machine has."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise StartupError(f"config key device={device!r} is not a device ({error}); use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise StartupError(f"config key device={device!r}, but this machine has no CUDA device torch can use; "
                               "use device=cpu (or device=auto)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise StartupError(f"config key device={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise StartupError(f"config key device={device!r}: the server runs on cpu or cuda")
    return resolved


def check_listen_address(host: str, port: int) -> None:
    """`host` is an address of this machine and `port` free on it: bound once and released (a
    process may still take the port in between; then the server's own bind names both keys)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise StartupError(f"config key host={host!r} does not resolve ({error.strerror}); give an address of this "
                           "machine, e.g. host=127.0.0.1 or host=0.0.0.0") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise StartupError(f"config key port={port}: {host}:{port} is in use by another process; choose "
                                       "another port, or port=0 for any free one") from None
                raise StartupError(f"config key host={host!r}: this machine cannot listen there ({error.strerror}); "
                                   "give one of its addresses, e.g. host=127.0.0.1 or host=0.0.0.0") from None
