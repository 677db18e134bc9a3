"""A local Cloud Storage for the ``gs://`` tests: gcp-storage-emulator plus object generations.

orbax writes checkpoints through tensorstore, whose OCDBT manifest is updated by
read-modify-write under Cloud Storage's generation preconditions. The emulator keeps a
generation per object but neither reports it on reads (the ``x-goog-generation`` header) nor
honours ``ifGenerationMatch`` / ``ifGenerationNotMatch``; without them concurrent manifest
updates overwrite each other, and tensorstore fails reading a generation it cannot parse. The
handlers here add exactly that. The server handles one request at a time, so a check and the
write after it cannot interleave with another request.
"""

from __future__ import annotations

import http.server
import socket
import sys
import types
from http import HTTPStatus
from typing import Any

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_ORIGINAL = {"download": objects.download, "get": objects.get, "insert": objects.insert}


def _generation(storage: Any, bucket: str, name: str) -> int:
    """The object's generation; 0 when it does not exist (Cloud Storage's convention)."""
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0


def _preconditions_hold(request: Any, response: Any, current: int, *, read: bool) -> bool:
    match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
    if match and int(match[0]) != current:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return False
    if not_match and int(not_match[0]) == current:
        response.status = HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
        return False
    return True


def _read(original: str):
    def handler(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        p = request.params
        current = _generation(storage, p["bucket_name"], p["object_id"])
        if current and not _preconditions_hold(request, response, current, read=True):
            return None
        if current:
            response["x-goog-generation"] = str(current)
        return _ORIGINAL[original](request, response, storage, *args, **kwargs)

    return handler


def _insert(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
    names = request.query.get("name")
    if names:  # media and resumable uploads name the object in the query
        current = _generation(storage, request.params["bucket_name"], names[0])
        if not _preconditions_hold(request, response, current, read=False):
            _ = request.data  # read the body, so the client sees the answer rather than a reset
            return None
    return _ORIGINAL["insert"](request, response, storage, *args, **kwargs)


class _QuietServer(http.server.HTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients close connections they no longer need while an answer is being written; the
        # default prints a traceback for each of those into the test output.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def _install() -> None:
    # The emulator builds its server as ``server.HTTPServer`` from the http.server it imported.
    emulator.server = types.SimpleNamespace(HTTPServer=_QuietServer)
    download, get = _read("download"), _read("get")
    replace = {_ORIGINAL["download"]: download, _ORIGINAL["get"]: get, _ORIGINAL["insert"]: _insert}
    for _, handlers in emulator.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn in replace:
                handlers[method] = replace[fn]
    # The JSON API's metadata GET calls download() for alt=media, and the router falls back to
    # insert() for some upload paths: both through the module.
    objects.download, objects.get, objects.insert = download, get, _insert


def start(bucket: str) -> tuple[Any, str]:
    """Starts an in-memory emulator holding ``bucket`` on a free port; returns (server, URL)."""
    if objects.insert is _ORIGINAL["insert"]:
        _install()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    return server, f"http://127.0.0.1:{port}"
